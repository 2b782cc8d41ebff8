"""Named presets: small functions returning nested config dicts (applied over the defaults).

A preset sets the model shape and the training settings that go with it; a TOML file and dotted
CLI overrides are applied on top (`config.load_config`). Sources of the numbers are cited per preset.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from lmforge.errors import ConfigError


def tiny() -> dict[str, Any]:
    """~0.1M non-embedding parameters: for tests and smoke runs (seconds on a laptop CPU)."""
    return {
        "model": {"n_layer": 2, "n_head": 4, "d_model": 64, "max_seq_len": 128},
        "train": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 20, "max_steps": 200},
        "optim": {"weight_decay": 0.1},
        "eval": {"every": 50},
        "checkpoint": {"every": 100},
    }


def small() -> dict[str, Any]:
    """~10.7M parameters: nanoGPT's shakespeare-char shape (6 layers, 6 heads, 384 wide, context 256).

    Source: karpathy/nanoGPT config/train_shakespeare_char.py.
    """
    return {
        "model": {"n_layer": 6, "n_head": 6, "d_model": 384, "max_seq_len": 256, "dropout": 0.2},
        "train": {"batch_size": 64, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "max_steps": 5000},
        "optim": {"beta2": 0.99, "weight_decay": 0.1},
        "eval": {"every": 250, "max_batches": 200},
        "checkpoint": {"every": 500},
    }


def quickstart() -> dict[str, Any]:
    """What `lmforge quickstart` trains: 0.8M parameters, ~3.1M tokens, ~3.5 min on 2 AVX-512 cores.

    Measured: 14k tok/s (fp32, ~48% of the measured matmul peak) on an AVX-512 2-vCPU VM. The time
    budget caps the run on slower (AVX2-only, ~2.3x lower peak) machines so quickstart stays ~5 min.
    """
    return {
        "model": {"n_layer": 4, "n_head": 4, "d_model": 128, "max_seq_len": 128, "bias": False},
        "train": {
            "batch_size": 24,
            "lr": 2e-3,
            "min_lr": 2e-4,
            "warmup_steps": 100,
            "max_steps": 1000,
            "time_budget": 270.0,
        },
        "optim": {"beta2": 0.99, "weight_decay": 0.1},
        "eval": {"every": 200, "max_batches": 40},
        "checkpoint": {"every": 250},
    }


def gpt2_124m() -> dict[str, Any]:
    """GPT-2 small, exactly: 12 layers, 12 heads, 768 wide, context 1024, vocab 50257, tied embeddings.

    Source: Radford et al. 2019 and the released `gpt2` config.json; training settings follow
    nanoGPT's config/train_gpt2.py (batch 480 x 1024 tokens, lr 6e-4, 2000 warmup, cosine to 6e-5).
    """
    return {
        "model": {
            "n_layer": 12,
            "n_head": 12,
            "d_model": 768,
            "max_seq_len": 1024,
            "vocab_size": 50257,
            "bias": True,
            "tie_embeddings": True,
            "dropout": 0.0,
        },
        "train": {
            "batch_size": 480,
            "micro_batch_size": 12,
            "lr": 6e-4,
            "min_lr": 6e-5,
            "warmup_steps": 2000,
            "max_steps": 600000,
        },
        "optim": {"beta2": 0.95, "weight_decay": 0.1},
        "eval": {"every": 1000, "max_batches": 5},  # 5 x 480 sequences: nanoGPT's eval_iters 200 x micro-batch 12
        "checkpoint": {"every": 1000},
    }


def _tiny_train() -> dict[str, Any]:
    return {
        "train": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 20, "max_steps": 200},
        "optim": {"weight_decay": 0.1},
        "eval": {"every": 50},
        "checkpoint": {"every": 100},
    }


def llama_tiny() -> dict[str, Any]:
    """~0.2M parameters (char vocab), Llama-style: RoPE, RMSNorm, SwiGLU, 4 query / 2 key-value heads, no biases."""
    model = {"n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_model": 64, "max_seq_len": 128}
    return {"model": model | _LLAMA, **_tiny_train()}


def llama_160m() -> dict[str, Any]:
    """~152M parameters: JackFram/llama-160m's shape (12 layers, 768 wide, 12 heads, SwiGLU 3072, vocab
    32000, context 2048, untied head) with grouped-query attention (4 key-value heads, as Llama 2/3).

    Source: https://huggingface.co/JackFram/llama-160m config.json; training settings follow Llama's
    (AdamW beta2 0.95, weight decay 0.1, cosine to 10% of peak, 2000 warmup steps).
    """
    model = {"n_layer": 12, "n_head": 12, "n_kv_head": 4, "d_model": 768, "d_ff": 3072, "max_seq_len": 2048}
    return {
        "model": model | _LLAMA | {"vocab_size": 32000, "tie_embeddings": False},
        "train": {"batch_size": 256, "micro_batch_size": 8, "lr": 6e-4, "warmup_steps": 2000, "max_steps": 100000},
        "optim": {"beta2": 0.95, "weight_decay": 0.1},
        "eval": {"every": 1000, "max_batches": 3},  # 3 x 256 sequences
        "checkpoint": {"every": 1000},
    }


_LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "norm_eps": 1e-6}


def lstm_tiny() -> dict[str, Any]:
    """~0.28M parameters (char vocab): 2-layer LSTM, 128 wide, tied embeddings, truncated BPTT over 64 tokens."""
    return {"model": {"family": "lstm", "n_layer": 2, "d_model": 128, "max_seq_len": 64}, **_tiny_train()}


def gru_tiny() -> dict[str, Any]:
    """~0.21M parameters (char vocab): 2-layer GRU, 128 wide, tied embeddings, truncated BPTT over 64 tokens."""
    return {"model": {"family": "gru", "n_layer": 2, "d_model": 128, "max_seq_len": 64}, **_tiny_train()}


def _encoder_tiny_train() -> dict[str, Any]:
    """`_tiny_train` at lr 1e-3: post-LN BERT/ELECTRA collapse at the decoders' 3e-3.

    Measured (200 steps of the tiny presets on SST-2 sentences, WordPiece 4000, seed 1337; mean pairwise
    cosine of the final hidden states over the tokens of 64 SST-2 dev sentences, 1.0 = every token the
    same vector): MLM at lr 3e-3 1.000 (collapsed: an SST-2 fine-tune then predicted one class, 0.509
    accuracy vs 0.734 from a 5e-4 run), 2e-3 0.29, 1.5e-3 0.17, 1e-3 0.29 (0.21 at seed 7), 5e-4 0.57;
    val MLM loss 6.79 / 6.70 / 6.71 / 6.73 / 6.76. MLM+NSP at 1e-3 0.72 (5e-4 0.75). The ELECTRA
    discriminator at 3e-3 1.000, 1e-3 0.94, 5e-4 0.88 (RTD AUC 0.52 / 0.56 / 0.57). 1e-3 is 2-3x below
    where MLM collapses and learns about as fast as the best stable value.
    """
    tiny_train = _tiny_train()
    return tiny_train | {"train": tiny_train["train"] | {"lr": 1e-3}}


def bert_tiny() -> dict[str, Any]:
    """~0.4M non-embedding parameters, MLM + NSP: the shape of Google's BERT-Tiny (L=2, H=128, A=2).

    Source: https://github.com/google-research/bert (the 24 smaller BERT models, Turc et al. 2019).
    """
    model = {"family": "bert", "n_layer": 2, "n_head": 2, "d_model": 128, "d_ff": 512, "max_seq_len": 128}
    return {"model": model, "objective": {"name": "mlm+nsp"}, **_encoder_tiny_train()}


def electra_tiny() -> dict[str, Any]:
    """ELECTRA with a BERT-Tiny discriminator (L=2, H=128, A=2) and a half-size generator (H=64, A=1)."""
    model = {"family": "electra", "n_layer": 2, "n_head": 2, "d_model": 128, "d_ff": 512, "max_seq_len": 128}
    return {"model": model | {"generator_ratio": 0.5}, "objective": {"name": "electra"}, **_encoder_tiny_train()}


def bert_base() -> dict[str, Any]:
    """BERT-Base, exactly: 12 layers, 768 wide, 12 heads, MLP 3072, 512 positions, vocab 30522, MLM + NSP.

    Source: Devlin et al. 2019 (batch 256 x 512 tokens, lr 1e-4, 10k warmup, linear decay, weight decay
    0.01, 1M steps) and the released bert-base-uncased config.json.
    """
    model = {"family": "bert", "n_layer": 12, "n_head": 12, "d_model": 768, "d_ff": 3072, "max_seq_len": 512}
    return {
        "model": model | {"vocab_size": 30522},
        "objective": {"name": "mlm+nsp"},
        "train": {
            "batch_size": 256,
            "micro_batch_size": 8,
            "lr": 1e-4,
            "warmup_steps": 10000,
            "max_steps": 1000000,
            "schedule": "linear",
        },
        "optim": {"beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01},
        "eval": {"every": 5000, "max_batches": 3},  # 3 x 256 sequences
        "checkpoint": {"every": 5000},
    }


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": tiny,
    "small": small,
    "quickstart": quickstart,
    "gpt2-124m": gpt2_124m,
    "llama-tiny": llama_tiny,
    "llama-160m": llama_160m,
    "lstm-tiny": lstm_tiny,
    "gru-tiny": gru_tiny,
    "bert-tiny": bert_tiny,
    "electra-tiny": electra_tiny,
    "bert-base": bert_base,
}


def preset_dict(name: str) -> dict[str, Any]:
    """The nested config dict of preset `name`; an unknown name is a `ConfigError` with a did-you-mean."""
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, list(PRESETS), n=1)
        extra = f"did you mean {hint[0]!r}? " if hint else ""
        raise ConfigError(f"unknown preset {name!r}; {extra}choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
