"""The model configs: one typed dataclass per family (`GPTConfig`, `BertConfig`, `RNNConfig`), torch-free.

Why here and not at the top of each model file (STYLE.md's usual place): `lmforge --help`, `lmforge pretrain
--help` and every flag or config error read these (through `config.RunConfig`) before any model is built, and a
model file imports torch (1.8 s) to define its `nn.Module`s. Each model file imports its config from here, so
`lmforge.models.gpt.GPTConfig` still names the same class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lmforge.fields import check, opt


@dataclass(kw_only=True)
class GPTConfig:
    family: Literal["gpt"] = opt("gpt", "model family: gpt, lstm, gru, bert or electra (each has its own fields)")
    vocab_size: int = opt(0, "vocabulary size; 0 = take it from the data's tokenizer")
    max_seq_len: int = opt(256, "context length in tokens")
    n_layer: int = opt(6, "Transformer blocks")
    n_head: int = opt(6, "attention heads")
    n_kv_head: int = opt(0, "key/value heads for grouped-query attention; 0 = n_head (plain multi-head)")
    d_model: int = opt(384, "residual stream width")
    d_ff: int = opt(0, "MLP hidden width; 0 = 8/3*d_model rounded up to 64 for swiglu, else 4*d_model")
    dropout: float = opt(0.0, "dropout on attention weights, residual branches and embeddings")
    bias: bool = opt(True, "biases in linear layers and LayerNorm")
    qkv_bias: bool = opt(False, "biases on the q/k/v projection alone (Qwen2); model.bias puts them everywhere")
    norm: Literal["layernorm", "rmsnorm"] = opt("layernorm", "normalisation layer")
    norm_eps: float = opt(1e-5, "epsilon of the normalisation layers")
    pos_emb: Literal["learned", "rope"] = opt("learned", "position encoding: learned table (GPT-2) or rotary (Llama)")
    rope_theta: float = opt(10000.0, "rotary base frequency")
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "relu2"] = opt(
        "gelu",
        "MLP type: gelu = exact erf GELU; gelu_tanh = GPT-2's tanh approximation (HF gelu_new); "
        "relu2 = ReLU squared (Primer, modded-nanogpt)",
    )
    tie_embeddings: bool = opt(True, "share the token embedding and output projection weights")
    init_std: float = opt(0.02, "std of the normal init; residual projections get std/sqrt(2*n_layer)")
    qk_norm: bool = opt(False, "RMS-normalise queries and keys per head before attention (no HF twin)")
    zero_init_proj: bool = opt(False, "initialise the residual output projections (attn.proj, mlp.proj) to zero")

    def __post_init__(self) -> None:
        check(self.vocab_size >= 0, f"model.vocab_size must be >= 0, got {self.vocab_size}")
        check(self.max_seq_len > 0, f"model.max_seq_len must be > 0, got {self.max_seq_len}")
        check(self.n_layer > 0, f"model.n_layer must be > 0, got {self.n_layer}")
        check(self.n_head > 0, f"model.n_head must be > 0, got {self.n_head}")
        check(self.d_model > 0, f"model.d_model must be > 0, got {self.d_model}")  # -8 % 4 == 0 passed below
        check(
            self.d_model % self.n_head == 0,
            f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})",
        )
        check(
            self.n_kv_head >= 0 and self.n_head % self.kv_heads == 0,
            f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})",
        )
        check(
            self.pos_emb != "rope" or self.head_dim % 2 == 0,
            f"rotary positions need an even head_dim, got model.d_model {self.d_model} / model.n_head {self.n_head} = "
            f"{self.head_dim}; pick a model.d_model or model.n_head that makes it even",
        )
        check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        check(self.d_ff >= 0, f"model.d_ff must be >= 0, got {self.d_ff}")
        # finite: inf passed these checks (norm_eps inf: every activation 0; rope_theta inf: every rotary frequency 0,
        # so no positional information at all; init_std inf: non-finite weights), all trained without a word
        check(0 <= self.norm_eps < math.inf, f"model.norm_eps must be a number >= 0, got {self.norm_eps}")
        check(0 < self.rope_theta < math.inf, f"model.rope_theta must be a number > 0, got {self.rope_theta}")
        check(0 <= self.init_std < math.inf, f"model.init_std must be a number >= 0, got {self.init_std}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return 64 * ((8 * self.d_model // 3 + 63) // 64)
        return 4 * self.d_model


@dataclass(kw_only=True)
class BertConfig:
    family: Literal["bert", "electra"] = opt(
        "bert", "model family: bert (MLM/NSP) or electra (generator + discriminator)"
    )
    vocab_size: int = opt(0, "vocabulary size incl. [PAD]/[CLS]/[SEP]/[MASK]; 0 = tokenizer's + the ones it lacks")
    max_seq_len: int = opt(128, "longest input in tokens ([CLS] and [SEP] included)")
    n_layer: int = opt(12, "Transformer layers")
    n_head: int = opt(12, "attention heads")
    d_model: int = opt(768, "hidden width")
    d_ff: int = opt(0, "MLP hidden width; 0 = 4*d_model")
    dropout: float = opt(0.1, "dropout on embeddings, attention weights and residual branches")
    norm_eps: float = opt(1e-12, "LayerNorm epsilon (BERT's 1e-12)")
    n_segments: int = opt(2, "segment (token type) embeddings")
    init_std: float = opt(0.02, "std of the normal init")
    generator_ratio: float = opt(0.25, "electra: generator width/heads/MLP as a fraction of the discriminator's")
    d_embed: int = opt(
        0,
        "electra: embedding width (HF ELECTRA's embedding_size), projected to each encoder's width; 0 = d_model",
    )

    def __post_init__(self) -> None:
        check(self.vocab_size >= 0, f"model.vocab_size must be >= 0, got {self.vocab_size}")
        check(self.max_seq_len >= 4, f"model.max_seq_len must be >= 4, got {self.max_seq_len}")
        check(self.n_layer > 0 and self.n_head > 0, "model.n_layer and model.n_head must be > 0")
        check(self.d_model > 0, f"model.d_model must be > 0, got {self.d_model}")  # -8 % 2 == 0 passed below
        check(self.d_ff >= 0, f"model.d_ff must be >= 0, got {self.d_ff}")
        check(
            self.d_model % self.n_head == 0,
            f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})",
        )
        check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        check(self.n_segments >= 1, "model.n_segments must be >= 1")
        # finite: inf passed (norm_eps inf: every activation 0; init_std inf: non-finite weights)
        check(0 <= self.norm_eps < math.inf, f"model.norm_eps must be a number >= 0, got {self.norm_eps}")
        check(0 <= self.init_std < math.inf, f"model.init_std must be a number >= 0, got {self.init_std}")
        check(0.0 < self.generator_ratio <= 1.0, "model.generator_ratio must be in (0, 1]")
        check(self.d_embed >= 0, f"model.d_embed must be >= 0, got {self.d_embed}")
        check(
            self.family == "electra" or self.d_embed in (0, self.d_model),
            "model.d_embed is for family electra (HF ELECTRA's embedding_size); a BERT's embeddings are d_model wide",
        )
        if self.family == "electra":
            g = self.generator
            check(
                g.d_model % g.n_head == 0,
                f"the generator ({g.d_model} wide, {g.n_head} heads) needs a width divisible by its heads; "
                "change model.generator_ratio",
            )

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def embed_dim(self) -> int:
        """Width of the token/position/segment embeddings (d_embed, or d_model when 0)."""
        return self.d_embed or self.d_model

    @property
    def generator(self) -> BertConfig:
        """The ELECTRA generator's shape: this config scaled by generator_ratio (same depth)."""
        r = self.generator_ratio
        return BertConfig(
            family="bert",
            vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
            n_layer=self.n_layer,
            n_head=max(1, round(self.n_head * r)),
            d_model=max(1, round(self.d_model * r)),
            d_ff=max(1, round(self.ff_dim * r)),
            dropout=self.dropout,
            norm_eps=self.norm_eps,
            n_segments=self.n_segments,
            init_std=self.init_std,
        )


@dataclass(kw_only=True)
class RNNConfig:
    family: Literal["lstm", "gru"] = opt("lstm", "model family: lstm or gru")
    vocab_size: int = opt(0, "vocabulary size; 0 = take it from the data's tokenizer")
    max_seq_len: int = opt(128, "training window (truncated-BPTT length); generation is not limited by it")
    n_layer: int = opt(2, "stacked recurrent layers")
    d_model: int = opt(256, "embedding and hidden-state width")
    dropout: float = opt(0.0, "dropout on embeddings, between layers and before the output head")
    tie_embeddings: bool = opt(True, "share the token embedding and output projection weights")
    init_std: float = opt(1.0, "std of the normal init of the token embedding (see the module docstring)")

    def __post_init__(self) -> None:
        check(self.vocab_size >= 0, f"model.vocab_size must be >= 0, got {self.vocab_size}")
        check(self.max_seq_len > 0, f"model.max_seq_len must be > 0, got {self.max_seq_len}")
        check(self.n_layer > 0, f"model.n_layer must be > 0, got {self.n_layer}")
        check(self.d_model > 0, f"model.d_model must be > 0, got {self.d_model}")
        check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        # finite: inf passed (non-finite embedding weights, trained without a word)
        check(0 <= self.init_std < math.inf, f"model.init_std must be a number >= 0, got {self.init_std}")


ModelConfig = GPTConfig | BertConfig | RNNConfig

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
