"""Model registry: family name -> model class. `build_model(cfg)` builds (without initializing)."""

from __future__ import annotations

import torch.nn as nn

from lmforge.models.gpt import GPT, GPTConfig

MODELS: dict[str, type[nn.Module]] = {"gpt": GPT}


def build_model(cfg: GPTConfig) -> nn.Module:
    """Construct the model for `cfg.family`; call `model.init_weights()` to initialize it."""
    return MODELS[cfg.family](cfg)
