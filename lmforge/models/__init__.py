"""Model registry: family name -> model class. `build_model(cfg)` builds (without initializing).

Each family's config dataclass sits at the top of its model file; `RunConfig.model` is one of them,
picked by the `family` key (`config.from_dict`), so `--model.family lstm` switches architecture.
"""

from __future__ import annotations

import torch.nn as nn

from lmforge.models.bert import Bert, BertConfig, Electra
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.rnn import RNNLM, RNNConfig

ModelConfig = GPTConfig | BertConfig | RNNConfig

MODELS: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": Bert, "electra": Electra, "lstm": RNNLM, "gru": RNNLM}

# family -> config class (the union's members, by the families their `family` Literal allows)
CONFIGS: dict[str, type] = {
    "gpt": GPTConfig,
    "bert": BertConfig,
    "electra": BertConfig,
    "lstm": RNNConfig,
    "gru": RNNConfig,
}

# families trained with next-token prediction (the others are encoders: MLM, NSP, ELECTRA)
CAUSAL_FAMILIES = ("gpt", "lstm", "gru")


def build_model(cfg: ModelConfig) -> nn.Module:
    """Construct the model for `cfg.family`; call `model.init_weights()` to initialize it."""
    return MODELS[cfg.family](cfg)
