"""Model registry: family name -> model class. `build_model(cfg)` builds (without initializing).

Each family's config dataclass is in `models/configs.py` (torch-free, so `--help` and config errors need no
torch); `RunConfig.model` is one of them, picked by the `family` key (`config.from_dict`), so `--model.family
lstm` switches architecture. The model classes are imported by `build_model`, the one place that needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmforge.models.configs import CAUSAL_FAMILIES, CONFIGS, ModelConfig

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["CAUSAL_FAMILIES", "CONFIGS", "ModelConfig", "build_model"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Construct the model for `cfg.family`; call `model.init_weights()` to initialize it."""
    from lmforge.models.bert import Bert, Electra
    from lmforge.models.gpt import GPT
    from lmforge.models.rnn import RNNLM

    models: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": Bert, "electra": Electra, "lstm": RNNLM, "gru": RNNLM}
    return models[cfg.family](cfg)
