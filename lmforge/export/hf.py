"""Hugging Face interop: export an lmforge run as an HF model directory, import an HF directory as a run.

`export_hf(run, out)` writes what `transformers` loads offline with `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained`:

    out/
        config.json               GPT2LMHeadModel or LlamaForCausalLM config
        model.safetensors         weights under HF names (a tied head stored once, as HF expects)
        generation_config.json    bos/eos/pad ids (eos: a list when the run has stop ids, generate.stop_ids_of)
        tokenizer.json            ours, unchanged (it is already the HF `tokenizers` format)
        tokenizer_config.json     PreTrainedTokenizerFast; our end-of-text token as bos/eos/unk/pad
        special_tokens_map.json
        README.md                 model card: data, steps, tokens seen, last val loss/bpb, lmforge config

`import_hf(hf_dir, run)` in `export/hf_import.py` is the reverse for local GPT-2 and Llama directories,
with the key maps and config translations defined here: it writes a run directory (config.json,
tokenizer.json, weights-only checkpoint `checkpoints/step-000000/`) that `lmforge eval`, `lmforge
generate` and fine-tuning load like any other run. `verify_hf` loads an export with
`transformers` and reports the largest logit difference from the lmforge checkpoint.
BERT/ELECTRA runs and BERT directories are handed to `export/bert.py`; LoRA runs are merged first,
or written as a PEFT adapter by `export/peft.py`.

Design decisions
- Which of our variants have an HF twin (checked on our config fields, never on parameter names):
      GPT-2 (GPT2LMHeadModel):  pos_emb=learned, norm=layernorm, mlp=gelu,   n_kv_head = n_head
      Llama (LlamaForCausalLM): pos_emb=rope,    norm=rmsnorm,   mlp=swiglu, any n_kv_head (GQA)
  Both with tied or untied output heads and with or without biases. Anything else (rope + layernorm,
  ...) is a one-line `LmforgeError` that names the fields to change.
- One key map per family (`FAMILIES[...].keys`), written against the parameter table in
  `models/gpt.py`, used in both directions (torchtitan's state-dict adapters, litgpt's
  `copy_weights_*`). A tensor without a mapping, or an HF tensor nobody asked for, is an error:
  nothing is dropped silently.
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
- Export needs no `transformers` at all: JSON and safetensors are written directly. Only `verify_hf`
  imports it, inside the function, with an install hint.
- Tensors are written contiguous with their own storage (safetensors refuses views that share a
  buffer, which splits and transposes are). Export keeps the checkpoint's dtype; import stores float32,
  the dtype lmforge trains its master weights in (autocast does the rest).
- Outputs are atomic: everything goes to a hidden sibling folder that only lmforge names
  (`atomic.building_dir`) and is renamed to `out` at the end; an existing `out` is an error unless
  `overwrite`, and is replaced only once the new one is complete. An `out` that is, holds or sits in
  the run being read is refused even with `overwrite`.
- Tokenizer: our tokenizer encodes the text "<|endoftext|>" literally (see `tokenizer.py`) while an
  HF tokenizer parses it as the special token; ordinary text encodes to the same ids.
- Import (`hf_import.py`) reads the same key maps and config translations from here, so nothing is
  written twice for the two directions.

References:
- HF GPT-2: https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
- HF Llama: https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py
- torchtitan state-dict adapters: https://github.com/pytorch/torchtitan/tree/main/torchtitan/models
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.atomic import (
    atomic_write_text,
    building_dir,
    check_not_inside,
    check_out_dir,
    fsync_file,
    save_safetensors,
    write_json,
)
from lmforge.errors import CheckpointError, LmforgeError, first_line
from lmforge.models.gpt import GPTConfig
from lmforge.tokenizer.tokenizer import Tokenizer

HF_HINT = "pip install 'lmforge[hf]'"
HF_DIR_FILES = "config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json"

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


def _own(t: Tensor) -> Tensor:
    """A contiguous copy with its own storage (safetensors refuses tensors that share memory)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def to_hf_state_dict(state: dict[str, Tensor], cfg: GPTConfig, family: str) -> dict[str, Tensor]:
    """Our state dict -> HF tensors for `family` (split, transposed, contiguous copies)."""
    table = _name_table(FAMILIES[family].keys, cfg)
    out: dict[str, Tensor] = {}
    for ours, t in state.items():
        if ours not in table:
            raise LmforgeError(f"parameter {ours!r} has no HF {family} name; this model cannot be exported")
        entry = table[ours]
        parts = t.split(entry.sizes, dim=0) if len(entry.hf) > 1 else (t,)
        for name, part in zip(entry.hf, parts, strict=True):
            out[name] = _own(part.t() if entry.transposed else part)
    if family == "gpt2":
        # HF GPT-2 always has biases: zeros make it the same function as our bias-free model (or one with
        # model.qkv_bias, whose q/k/v biases are the only ones it has)
        for ours, entry in table.items():
            if ours.endswith(".bias") and entry.hf[0] not in out:
                weight = out[table[ours.removesuffix(".bias") + ".weight"].hf[0]]
                out[entry.hf[0]] = torch.zeros(weight.shape[-1], dtype=weight.dtype)  # Conv1D (in, out); norm (C,)
    return out


def from_hf_state_dict(
    hf_state: dict[str, Tensor], cfg: GPTConfig, family: str, expected: list[str], where: Path
) -> dict[str, Tensor]:
    """HF tensors -> our state dict with exactly the names in `expected`; extra or missing tensors are errors."""
    keys = FAMILIES[family].keys
    table = _name_table(keys, cfg)
    remaining = dict(hf_state)
    out: dict[str, Tensor] = {}
    for ours in expected:
        entry = table[ours]
        missing = [name for name in entry.hf if name not in remaining]
        if missing:
            raise CheckpointError(f"{where} has no tensor {missing[0]!r}; is it a complete {family} checkpoint?")
        parts = [remaining.pop(name) for name in entry.hf]
        t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        out[ours] = (t.t() if entry.transposed else t).contiguous()
    ignored = {keys.block_prefix.format(i=i) + n for i in range(cfg.n_layer) for n in keys.ignored}
    ignored.add(keys.base_prefix + "rotary_emb.inv_freq")
    extra = sorted(set(remaining) - ignored)
    if extra:
        raise CheckpointError(
            f"{where} has tensors a plain {family} model does not ({', '.join(extra[:3])}); "
            "lmforge imports only the standard architecture"
        )
    return out


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


# --------------------------------------------------------------------------------------------
# Export


def export_hf(path: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model of a run directory or checkpoint folder as an HF model directory.

    Args:
        path: an lmforge run directory (its latest checkpoint is used) or a checkpoint folder.
        out: the HF directory to create.
        overwrite: replace an existing `out` (only after the new one is complete).

    Returns:
        `out`, which `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load.

    Raises:
        LmforgeError: the model has no HF twin (message names the fields), `out` exists, or the
            checkpoint is missing or damaged.
    """
    from lmforge.export.peft import load_exportable

    out = Path(out)
    check_out_dir(out, overwrite=overwrite)
    check_not_inside(out, Path(path))  # the run given: never replaced, never written into
    trained = load_exportable(path)  # LoRA runs come back merged
    check_not_inside(out, trained.checkpoint.path)
    if trained.config.model.family in ("bert", "electra"):
        from lmforge.export.bert import write_bert

        return write_bert(trained, out)
    return write_hf(trained, out)


def chat_template_of(trained: Any) -> Any:
    """The chat template of a chat-tuned (sft) run or an imported instruct model (`chat.ChatTemplate`, its
    `.jinja` for `apply_chat_template`), None for other runs."""
    from lmforge.adapt.load import run_dir_of
    from lmforge.chat import load_template

    return load_template(run_dir_of(trained.checkpoint.path))


def has_chat_markers(template: Any) -> bool:
    """Whether `template` is lmforge's own, whose role markers are ordinary text (`without_chat_markers`);
    an imported model's own template goes out as it came in."""
    from lmforge.chat import TEMPLATE_NAME

    return template is not None and template.name == TEMPLATE_NAME


def bos_id_of(tokenizer: Tokenizer, eos_id: int | None) -> int | None:
    """The BOS an export names: what the tokenizer puts before a text (an imported Llama's <s>), else
    our end-of-text token (lmforge's own models never saw a BOS)."""
    prefix = tokenizer.prompt_prefix
    return prefix[0] if len(prefix) == 1 else eos_id


def extra_stop_ids(trained: Any, eos_id: int | None) -> list[int]:
    """An imported instruct model's end-of-turn ids beside its eos (`generate.stop_ids_of`), in order."""
    from lmforge.adapt.load import run_dir_of
    from lmforge.generate import stop_ids_of

    return [i for i in stop_ids_of(run_dir_of(trained.checkpoint.path)) if i != eos_id]


def without_chat_markers(tokenizer_json: str) -> str:
    """tokenizer.json for a chat-tuned export: the role markers (`<|user|>`, ...) leave the added tokens.

    lmforge's chat template writes them as ordinary text (chat.py) and trained on those ids. A
    tokenizer that reserves them as special tokens (`--special-tokens all`, WordPiece, Unigram) would
    make transformers, which must match the EOS string in the template (split_special_tokens off),
    encode each marker as its one reserved id instead. Out of the added tokens, they are encoded as
    text there too; their ids stay in the vocabulary, so decoding is unchanged."""
    from lmforge.chat import ROLES

    data = json.loads(tokenizer_json)
    markers = {f"<|{role}|>" for role in ROLES}
    data["added_tokens"] = [t for t in data.get("added_tokens") or [] if t.get("content") not in markers]
    return json.dumps(data, ensure_ascii=False)


def write_hf(trained: Any, out: Path) -> Path:
    """Write a loaded GPT (`checkpoint.Trained`) as an HF directory at `out` (atomically)."""
    cfg: GPTConfig = trained.config.model
    family = hf_family(cfg)
    tokenizer: Tokenizer = trained.tokenizer
    eos_id = tokenizer.eos_id_or_none  # None: a foreign tokenizer without a known end-of-text token
    eos = tokenizer.id_to_token(eos_id) if eos_id is not None else None
    state = trained.model.state_dict()
    dtype = trained.model.tok_emb.weight.dtype
    tensors = to_hf_state_dict(state, cfg, family)

    with building_dir(out) as tmp:
        bos_id = bos_id_of(tokenizer, eos_id)
        write_json(tmp / "config.json", {**FAMILIES[family].config_to_hf(cfg, eos_id, dtype), "bos_token_id": bos_id})
        save_safetensors(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # HF requires "format"
        fsync_file(tmp / "model.safetensors")
        # No max_length: transformers warns on every generate(max_new_tokens=...) when both are set;
        # the context length is in config.json (n_positions / max_position_embeddings).
        generation: dict[str, Any] = {} if bos_id is None else {"bos_token_id": bos_id}
        extra = extra_stop_ids(trained, eos_id)  # an imported instruct model's end of turn follows its eos
        if eos_id is not None:
            eos_ids: int | list[int] = [eos_id, *extra] if extra else eos_id
            generation.update(eos_token_id=eos_ids, pad_token_id=eos_id)
        elif extra:  # an imported tokenizer whose end token has another name: its stop ids end generation alone
            generation.update(eos_token_id=extra if len(extra) > 1 else extra[0], pad_token_id=extra[0])
        write_json(tmp / "generation_config.json", generation)
        template = chat_template_of(trained)
        chat = template.jinja if template else ""
        markers = has_chat_markers(template)
        atomic_write_text(
            tmp / "tokenizer.json", without_chat_markers(tokenizer.to_str()) if markers else tokenizer.to_str()
        )
        specials = {f"{name}_token": eos for name in ("bos", "eos", "unk", "pad")} if eos is not None else {}
        if specials and bos_id != eos_id:
            specials["bos_token"] = tokenizer.id_to_token(bos_id)
        if template and not markers:  # an imported template renders the bos/eos strings its model had (or none)
            for name in ("bos_token", "eos_token"):
                if getattr(template, name):
                    specials[name] = getattr(template, name)
                else:
                    specials.pop(name, None)
        write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **specials,
                "model_max_length": cfg.max_seq_len,
                # lmforge encodes special-token strings found in text as plain text (only ids it adds are
                # special); HF does the same with this set. A chat-tuned run's template writes its EOS as
                # text after each assistant turn, which must become the EOS id: there it stays unset (an imported
                # template's special tokens, e.g. <|im_start|>, are written as text too).
                "split_special_tokens": not chat,
                "clean_up_tokenization_spaces": False,  # byte-level decoding is exact; no space "clean-up"
                **({"chat_template": chat} if chat else {}),
            },
        )
        write_json(tmp / "special_tokens_map.json", specials)
        n_params = sum(t.numel() for t in state.values())
        atomic_write_text(tmp / "README.md", _model_card(out.name, trained, family, n_params))
    return out


def training_progress(meta: dict[str, Any]) -> tuple[int, int]:
    """(optimizer steps, tokens seen) recorded in a checkpoint's state.json, for model cards."""
    train_state = meta.get("train_state", {})
    return int(meta.get("step", train_state.get("step", 0))), int(train_state.get("tokens", 0))


def _last_eval(ckpt_dir: Path, step: int) -> dict[str, Any] | None:
    """The last validation record at or before `step` in the run's metrics.jsonl, if there is one."""
    from lmforge.log import read_metrics

    if ckpt_dir.parent.name != "checkpoints":
        return None
    evals = [r for r in read_metrics(ckpt_dir.parent.parent / "metrics.jsonl") if "val_loss" in r]
    evals = [r for r in evals if r.get("step", 0) <= step]
    return evals[-1] if evals else None


# Model-card examples in the training data's language: a Chinese model continues Chinese, not "Once upon a time"
CARD_PROMPTS = {"zh": "从前有座山，山里有座庙。", "ja": "むかしむかし、", "ko": "옛날 옛적에", "en": "Once upon a time"}


def data_language(data_dir: str) -> str:
    """The language most of the training data was guessed to be (`manifest["languages"]` of `prepare`) when it is
    one `CARD_PROMPTS` has an ISO 639-1 code for; "" when unknown or the data folder is gone."""
    try:
        languages = json.loads((Path(data_dir) / "manifest.json").read_text(encoding="utf-8")).get("languages") or {}
    except (OSError, ValueError):
        return ""
    top = max(languages, key=languages.get, default="")
    return top if top in CARD_PROMPTS else ""


def card_language_header(language: str) -> str:
    """The model card's `language:` metadata line(s) (what the Hub filters by), or "" when unknown."""
    return f"language:\n- {language}\n" if language else ""


def _model_card(name: str, trained: Any, family: str, n_params: int) -> str:
    cfg = trained.config
    step, tokens = training_progress(trained.checkpoint.meta)
    last = _last_eval(trained.checkpoint.path, step)
    architecture = FAMILIES[family].architecture
    n_new = max(1, min(50, cfg.model.max_seq_len // 2))  # the snippet must fit in the context
    rows = [
        ("architecture", f"{architecture} ({STYLE_NAMES[family]}-style lmforge GPT)"),
        ("parameters", f"{n_params:,}"),
        ("layers / width / heads", f"{cfg.model.n_layer} / {cfg.model.d_model} / {cfg.model.n_head}"),
        ("context", f"{cfg.model.max_seq_len} tokens"),
        ("vocabulary", f"{cfg.model.vocab_size} ({trained.tokenizer.vocab_size} in the tokenizer)"),
        ("training data", f"`{cfg.data.dir}`" if cfg.data.dir else "(none recorded: imported or untrained)"),
        ("steps", f"{step:,}"),
        ("tokens seen", f"{tokens:,}"),
    ]
    if last is not None:
        rows.append(("last validation loss", f"{last['val_loss']:.4f} nats/token (step {last['step']})"))
        if last.get("val_bpb") is not None:
            rows.append(("last validation bits per byte", f"{last['val_bpb']:.4f}"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    config_json = json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False)
    language = data_language(cfg.data.dir) if cfg.data.dir else ""
    prompt = CARD_PROMPTS[language or "en"]
    return f"""---
{card_language_header(language)}library_name: transformers
pipeline_tag: text-generation
tags:
- lmforge
- {family}
---

# {name}

A causal language model trained with lmforge and exported to the Hugging Face format
(`{architecture}`; loads with `transformers`, no lmforge needed).

| | |
| --- | --- |
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
ids = tokenizer("{prompt}", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens={n_new}, do_sample=False)[0]))
```

Exported from `{trained.checkpoint.path}`.

## lmforge config

```json
{config_json}
```
"""


# --------------------------------------------------------------------------------------------
# Verification with transformers (the only place that imports it)


@torch.no_grad()
def verify_hf(path: str | Path, hf_dir: str | Path, *, seq_len: int = 64, seed: int = 0, peft: bool = False) -> float:
    """Largest |logit difference| between an lmforge run/checkpoint and its HF export loaded by `transformers`.

    Both models run in float32 on CPU on the same random token ids (2 sequences of
    min(seq_len, max_seq_len) tokens, drawn from a local generator so the global RNG is untouched).
    `peft`: `hf_dir` is an `export --peft` adapter directory, loaded as `PeftModel.from_pretrained(
    AutoModelForCausalLM.from_pretrained(hf_dir / "base"), hf_dir)` (needs the peft package).

    Raises:
        LmforgeError: transformers is not installed, or either side fails to load.
    """
    from lmforge.export.peft import load_exportable

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise LmforgeError(f"verifying an HF export needs transformers: {HF_HINT}") from None
    trained = load_exportable(path)
    if trained.config.model.family in ("bert", "electra"):
        from lmforge.export.bert import verify_bert

        return verify_bert(trained, hf_dir, seed=seed)
    ours = trained.model.float()
    try:
        if peft:
            try:
                from peft import PeftModel
            except ImportError:
                raise LmforgeError("verifying a --peft export needs peft: pip install peft") from None
            base = AutoModelForCausalLM.from_pretrained(str(Path(hf_dir) / "base"))
            theirs = PeftModel.from_pretrained(base, str(hf_dir)).float().eval()
        else:
            theirs = AutoModelForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    except (OSError, ValueError, KeyError) as e:
        raise LmforgeError(
            f"transformers cannot load {hf_dir} ({first_line(e)}); export it again with lmforge"
        ) from None
    T = min(seq_len, ours.cfg.max_seq_len)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, trained.tokenizer.vocab_size, (2, T), generator=generator)  # (B, T)
    diff = (ours(idx) - theirs(idx).logits).abs().max()
    return float(diff)
