"""The Hugging Face families of lmforge's GPT (GPT-2, Llama, Qwen2): which one a config is, key maps, config.json.

`hf_family(cfg)` names the HF architecture that computes the same function as a GPT config; `FAMILIES[...]`
holds, per family, the key map (our parameter names <-> HF names) and the config translation both ways
(`config_to_hf`, `config_from_hf`, with the HF class defaults for keys a config.json leaves out). Export
(`export/hf.py`, `export/peft.py`) and import (`export/hf_import.py`) read the same tables, so nothing is
written twice for the two directions. BERT/ELECTRA have their own in `export/bert.py`.

Design decisions
- Which of our variants have an HF twin (checked on our config fields, never on parameter names):
      GPT-2 (GPT2LMHeadModel):  pos_emb=learned, norm=layernorm, mlp=gelu,   n_kv_head = n_head
      Llama (LlamaForCausalLM): pos_emb=rope,    norm=rmsnorm,   mlp=swiglu, any n_kv_head (GQA)
  Both with tied or untied output heads and with or without biases. Anything else (rope + layernorm,
  ...) is a one-line `LmforgeError` that names the fields to change.
- One key map per family (`FAMILIES[...].keys`), written against the parameter table in
  `models/gpt.py`, used in both directions (torchtitan's state-dict adapters, litgpt's
  `copy_weights_*`). Tensors go through it in `hf.py` (`to_hf_state_dict`, `from_hf_state_dict`).
- GPT-2: HF's Conv1D stores weights as (in, out), the transpose of nn.Linear; its fused `c_attn` has
  our [q; k; v] row order, so it is a single transpose. GPT-2 always has biases: a bias-free model is
  exported with zero biases (the same function), and an HF GPT-2 whose biases are all exactly zero
  imports as bias-free. HF GPT-2 ties the head by default and honours `tie_word_embeddings: false`
  (then `lm_head.weight` is stored), so untied models export too. `mlp="gelu"` (exact erf GELU) is
  HF's "gelu"; `mlp="gelu_tanh"` is GPT-2's tanh approximation, HF's "gelu_new" (OpenAI's checkpoints
  and HF's default), and "gelu_pytorch_tanh" / "gelu_fast" import as it too (the same function).
- Llama: our rotary layout is HF's rotate-half, so q/k need no permutation; our fused `qkv` rows
  [q; k; v] and `mlp.fc` rows [gate; up] are split into q/k/v_proj and gate/up_proj (and concatenated
  on import). `bias` maps to both `attention_bias` and `mlp_bias`. HF Llama has no embedding or
  residual dropout, so our `dropout` is exported as `attention_dropout` only (it matters for training,
  not inference). Rope scaling variants (llama3, yarn, ...) are refused on import.
- transformers 4.x and 5.x both read the files: `rope_theta` goes at the top level (4.x) and into
  `rope_parameters` (5.x), `torch_dtype` next to `dtype`; on import both spellings are read, and keys
  a config.json leaves out take the HF class defaults (save_pretrained omits some defaults).
- Split out of `hf.py` (size guide): what differs per family lives here, the directory writing there.

References:
- HF GPT-2: https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
- HF Llama: https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py
- torchtitan state-dict adapters: https://github.com/pytorch/torchtitan/tree/main/torchtitan/models
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.models.gpt import GPTConfig

# --------------------------------------------------------------------------------------------
# Which HF family a config belongs to


# the values each config field may take in a family
GPT2_STYLE = {"pos_emb": ("learned",), "norm": ("layernorm",), "mlp": ("gelu", "gelu_tanh")}
LLAMA_STYLE = {"pos_emb": ("rope",), "norm": ("rmsnorm",), "mlp": ("swiglu",)}


def _misfits(have: dict[str, str], style: dict[str, tuple[str, ...]]) -> str:
    """The fields of `have` that `style` does not allow, as 'field=a or b, ...' ('' when it fits)."""
    return ", ".join(f"{key}={' or '.join(allowed)}" for key, allowed in style.items() if have[key] not in allowed)


def hf_family(cfg: GPTConfig) -> str:
    """ "gpt2", "llama" or "qwen2": the HF architecture that computes the same function as `cfg`.

    Raises:
        LmforgeError: the variant has no HF twin; the message names the fields to change.
    """
    if cfg.family != "gpt":
        raise LmforgeError(
            f"this run's model.family is {cfg.family!r}, which has no Hugging Face counterpart; GPT/Llama-style, "
            "BERT and ELECTRA runs export"
        )
    if getattr(cfg, "qk_norm", False):
        raise LmforgeError(
            "this model normalises queries and keys (model.qk_norm=true), which neither HF GPT-2 nor Llama "
            "computes; train with model.qk_norm=false to export"
        )
    have = {key: getattr(cfg, key) for key in GPT2_STYLE}
    to_gpt2, to_llama = _misfits(have, GPT2_STYLE), _misfits(have, LLAMA_STYLE)
    if not to_llama and cfg.qkv_bias and not cfg.bias:  # Qwen2: a Llama with biases on q, k and v alone
        return "qwen2"
    if not to_gpt2:
        if cfg.kv_heads != cfg.n_head:
            raise LmforgeError(
                f"GPT-2 has no grouped-query attention; this GPT-2-style model has n_kv_head={cfg.n_kv_head} "
                f"< n_head={cfg.n_head} (train with model.n_kv_head=0, or use the Llama style to keep GQA)"
            )
        return "gpt2"
    if not to_llama:
        return "llama"
    state = ", ".join(f"{key}={value}" for key, value in have.items())
    raise LmforgeError(
        f"only GPT-2-style or Llama-style models export to HF; this one has {state} "
        f"(GPT-2 needs {to_gpt2}; Llama needs {to_llama})"
    )


# --------------------------------------------------------------------------------------------
# Key maps: our parameter names <-> HF names, one per family


@dataclass(frozen=True)
class KeyMap:
    """How one HF family names our parameters (names as in the table in `models/gpt.py`).

    `top` maps whole names; `block` maps names under `blocks.{i}.` to names under `block_prefix`;
    `fused` maps one of our block tensors to several HF tensors, concatenated along dim 0 in that
    order, with a function giving their sizes; `transposed` lists the HF block names stored as
    (in, out); `ignored` lists HF block names that are buffers in old checkpoints, not weights.
    """

    base_prefix: str  # HF's base-model prefix, missing from checkpoints saved from the bare model
    block_prefix: str
    top: dict[str, str]
    block: dict[str, str]
    fused: dict[str, tuple[tuple[str, ...], Callable[[GPTConfig], list[int]]]] = dataclasses.field(default_factory=dict)
    transposed: frozenset[str] = frozenset()
    ignored: frozenset[str] = frozenset()


GPT2_KEYS = KeyMap(
    base_prefix="transformer.",
    block_prefix="transformer.h.{i}.",
    top={
        "tok_emb.weight": "transformer.wte.weight",
        "pos_emb.weight": "transformer.wpe.weight",
        "norm_f.weight": "transformer.ln_f.weight",
        "norm_f.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    },
    block={
        "norm1.weight": "ln_1.weight",
        "norm1.bias": "ln_1.bias",
        "attn.qkv.weight": "attn.c_attn.weight",  # same [q; k; v] order, transposed
        "attn.qkv.bias": "attn.c_attn.bias",
        "attn.proj.weight": "attn.c_proj.weight",
        "attn.proj.bias": "attn.c_proj.bias",
        "norm2.weight": "ln_2.weight",
        "norm2.bias": "ln_2.bias",
        "mlp.fc.weight": "mlp.c_fc.weight",
        "mlp.fc.bias": "mlp.c_fc.bias",
        "mlp.proj.weight": "mlp.c_proj.weight",
        "mlp.proj.bias": "mlp.c_proj.bias",
    },
    transposed=frozenset({"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}),
    ignored=frozenset({"attn.bias", "attn.masked_bias"}),  # causal-mask buffers saved by old transformers
)


def _qkv_sizes(cfg: GPTConfig) -> list[int]:
    kv = cfg.kv_heads * cfg.head_dim
    return [cfg.n_head * cfg.head_dim, kv, kv]


def _gate_up_sizes(cfg: GPTConfig) -> list[int]:
    return [cfg.ff_dim, cfg.ff_dim]


LLAMA_KEYS = KeyMap(
    base_prefix="model.",
    block_prefix="model.layers.{i}.",
    top={
        "tok_emb.weight": "model.embed_tokens.weight",
        "norm_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    block={
        "norm1.weight": "input_layernorm.weight",
        "attn.proj.weight": "self_attn.o_proj.weight",
        "attn.proj.bias": "self_attn.o_proj.bias",
        "norm2.weight": "post_attention_layernorm.weight",
        "mlp.proj.weight": "mlp.down_proj.weight",
        "mlp.proj.bias": "mlp.down_proj.bias",
    },
    fused={
        "attn.qkv.weight": (
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            _qkv_sizes,
        ),
        "attn.qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), _qkv_sizes),
        "mlp.fc.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), _gate_up_sizes),
        "mlp.fc.bias": (("mlp.gate_proj.bias", "mlp.up_proj.bias"), _gate_up_sizes),
    },
    ignored=frozenset({"self_attn.rotary_emb.inv_freq"}),  # rotary buffer saved by old transformers
)


@dataclass(frozen=True)
class _Entry:
    hf: tuple[str, ...]  # HF name(s); several = our tensor is their concatenation along dim 0
    sizes: list[int]  # row counts of the HF tensors (for splitting on export)
    transposed: bool


def _name_table(keys: KeyMap, cfg: GPTConfig) -> dict[str, _Entry]:
    """Every name `keys` knows for a model of `cfg`'s depth: our name -> HF name(s)."""
    table = {ours: _Entry((hf,), [], False) for ours, hf in keys.top.items()}
    for i in range(cfg.n_layer):
        ours_prefix, hf_prefix = f"blocks.{i}.", keys.block_prefix.format(i=i)
        for ours, hf in keys.block.items():
            table[ours_prefix + ours] = _Entry((hf_prefix + hf,), [], hf in keys.transposed)
        for ours, (names, sizes) in keys.fused.items():
            table[ours_prefix + ours] = _Entry(tuple(hf_prefix + n for n in names), sizes(cfg), False)
    return table


# --------------------------------------------------------------------------------------------
# Config translation, per family


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gpt2_config_to_hf(cfg: GPTConfig, eos_id: int | None, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,  # legacy alias read by old transformers and other tools
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.ff_dim,
        "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",  # tanh or exact erf GELU
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
    }


# HF class defaults for keys a config.json may leave out (save_pretrained omits some defaults)
GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gpt2_config_from_hf(hf: dict[str, Any], where: Path) -> GPTConfig:
    h = {**GPT2_DEFAULTS, **hf}
    act = h["activation_function"]
    if act not in ("gelu", *GELU_TANH):
        raise LmforgeError(
            f"{where}: activation_function {act!r} is not supported; lmforge's GPT-2 MLP computes GELU "
            f"('gelu', or the tanh approximation: {', '.join(map(repr, GELU_TANH))})"
        )
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if h[key] != want:
            raise LmforgeError(f"{where}: {key}={h[key]!r} has no lmforge equivalent; only {key}={want} imports")
    if h["add_cross_attention"]:
        raise LmforgeError(f"{where}: add_cross_attention is set; lmforge imports decoder-only GPT-2 models")
    return GPTConfig(
        vocab_size=h["vocab_size"],
        max_seq_len=h["n_positions"],
        n_layer=h["n_layer"],
        n_head=h["n_head"],
        d_model=h["n_embd"],
        d_ff=h["n_inner"] or 0,
        dropout=float(h["resid_pdrop"]),
        bias=True,  # bias-free models are recognised from all-zero biases (see import_hf)
        norm="layernorm",
        norm_eps=float(h["layer_norm_epsilon"]),
        pos_emb="learned",
        mlp="gelu" if act == "gelu" else "gelu_tanh",
        tie_embeddings=bool(h["tie_word_embeddings"]),
        init_std=float(h["initializer_range"]),
    )


def _llama_config_to_hf(cfg: GPTConfig, eos_id: int | None, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
    }


LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


def _llama_config_from_hf(hf: dict[str, Any], where: Path) -> GPTConfig:
    h = {**LLAMA_DEFAULTS, **hf}
    if h["hidden_act"] != "silu":
        raise LmforgeError(f"{where}: hidden_act {h['hidden_act']!r} is not supported; lmforge's SwiGLU uses silu")
    for rope in (h.get("rope_parameters") or {}, h.get("rope_scaling") or {}):  # both: either may scale
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise LmforgeError(
                f"{where}: rope scaling {rope_type!r} is not supported; lmforge imports plain rotary only"
            )
    rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
    if h["attention_bias"] != h["mlp_bias"]:
        raise LmforgeError(
            f"{where}: attention_bias={h['attention_bias']} with mlp_bias={h['mlp_bias']} has no lmforge "
            "equivalent; lmforge's `bias` switches both"
        )
    heads = h["num_attention_heads"]
    if h["head_dim"] not in (None, h["hidden_size"] // heads):
        raise LmforgeError(
            f"{where}: head_dim {h['head_dim']} != hidden_size / num_attention_heads; lmforge needs that equality"
        )
    kv_heads = h["num_key_value_heads"] or heads
    return GPTConfig(
        vocab_size=h["vocab_size"],
        max_seq_len=h["max_position_embeddings"],
        n_layer=h["num_hidden_layers"],
        n_head=heads,
        n_kv_head=0 if kv_heads == heads else kv_heads,
        d_model=h["hidden_size"],
        d_ff=h["intermediate_size"],
        dropout=float(h["attention_dropout"]),
        bias=bool(h["attention_bias"]),
        norm="rmsnorm",
        norm_eps=float(h["rms_norm_eps"]),
        pos_emb="rope",
        rope_theta=float(rope.get("rope_theta", h["rope_theta"])),
        mlp="swiglu",
        tie_embeddings=bool(h["tie_word_embeddings"]),
        init_std=float(h["initializer_range"]),
    )


QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
}


def _qwen2_config_to_hf(cfg: GPTConfig, eos_id: int | None, dtype: torch.dtype) -> dict[str, Any]:
    """Qwen2's config: Llama's keys (it has q/k/v biases built in, none elsewhere) and no sliding window."""
    hf = _llama_config_to_hf(cfg, eos_id, dtype)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp", "head_dim"):  # not Qwen2Config fields
        del hf[key]
    hf |= {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    hf |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}
    hf["layer_types"] = ["full_attention"] * cfg.n_layer  # transformers 5.x
    return hf


def _qwen2_config_from_hf(hf: dict[str, Any], where: Path) -> GPTConfig:
    """Qwen2 (Qwen2 and Qwen2.5, base and instruct): Llama with biases on q, k and v alone. A sliding
    window narrower than the context is refused (lmforge attends to the whole context); Qwen2.5's configs
    have it switched off."""
    h = {**QWEN2_DEFAULTS, **hf}
    window = h.get("sliding_window")
    if h["use_sliding_window"] and window and window < h["max_position_embeddings"]:
        raise LmforgeError(
            f"{where}: use_sliding_window with sliding_window={window} < max_position_embeddings="
            f"{h['max_position_embeddings']}; lmforge attends to the whole context, so only models without a "
            "sliding window import"
        )
    cfg = _llama_config_from_hf({**h, "attention_bias": False, "mlp_bias": False}, where)
    return dataclasses.replace(cfg, qkv_bias=True)


@dataclass(frozen=True)
class Family:
    """Everything that differs between HF families: key map and config translation."""

    keys: KeyMap
    config_to_hf: Callable[[GPTConfig, int | None, torch.dtype], dict[str, Any]]
    config_from_hf: Callable[[dict[str, Any], Path], GPTConfig]
    architecture: str


STYLE_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2"}  # for model cards
FAMILIES: dict[str, Family] = {
    "gpt2": Family(GPT2_KEYS, _gpt2_config_to_hf, _gpt2_config_from_hf, "GPT2LMHeadModel"),
    "llama": Family(LLAMA_KEYS, _llama_config_to_hf, _llama_config_from_hf, "LlamaForCausalLM"),
    "qwen2": Family(LLAMA_KEYS, _qwen2_config_to_hf, _qwen2_config_from_hf, "Qwen2ForCausalLM"),  # Llama's names
}
