"""GGUF export for llama.cpp-family runtimes (llama.cpp, ollama, LM Studio): `lmforge export RUN --to gguf`.

One `.gguf` file holds the weights, the architecture metadata and the tokenizer. We write it with the
`gguf` package (llama.cpp's own Python writer), using llama.cpp's tensor names and metadata keys for
the "llama" architecture, as its `convert_hf_to_gguf.py` would for the HF export of the same run.

Key decisions:
- Llama-style models only (rotary positions, RMSNorm, SwiGLU; GQA, biases and tied/untied heads are
  fine). GPT-2-style models are refused with a one-line error: use `--to hf` and llama.cpp's
  converter for those.
- Biases: llama.cpp's Llama reads the optional `attn_q.bias` ... `ffn_down.bias` tensors, but
  transformers' GGUF loader (`from_pretrained(..., gguf_file=...)`, 5.x) maps no Llama bias and drops them
  without a word (measured: max |logit difference| 0.57 on a tiny model, other greedy tokens). The file
  is still written, for llama.cpp, with a one-line note on stderr that says to use `--to hf` for transformers.
- Rotary layout. Our `apply_rope` pairs dimension i with i + head_dim/2 ("rotate half", HF's layout);
  llama.cpp's LLAMA rope pairs neighbours (2i, 2i+1), as Meta's original checkpoints did. So the rows
  of the q and k projections (and their biases) are permuted within each head, exactly like
  `convert_hf_to_gguf.py`'s `LlamaModel.permute`: new row (2j + s) of a head = old row (s*half + j).
  q.k scores are then identical (tested in tests/test_gguf.py by running both rope layouts).
- Our fused projections are split: qkv -> attn_q / attn_k / attn_v, mlp.fc [gate; up] -> ffn_gate /
  ffn_up. A tied head writes no `output.weight` (llama.cpp then reuses `token_embd.weight`).
- dtypes: `f16` stores every matrix in float16; `bf16` in bfloat16; `q8_0` stores matrices whose rows are a
  multiple of 32 as Q8_0 (32-value blocks, one f16 scale each: 8.5 bits per weight), others in f16. 1-D tensors
  (norms, biases) stay float32, as llama.cpp expects. `auto` (the default) is bf16 for a model imported from
  bf16 weights (the same values; f16 would overflow past 65504 and lose the smallest ones, so llama.cpp's
  converter picks bf16 for such a model too), else f16, or bf16 with a note where a matrix holds a weight past
  f16's range; an explicit `--dtype f16` refuses such a weight in one line (it would be inf).
- Tokenizer, two kinds, each checked in llama.cpp itself (`bench/gguf_llamacpp.py`: same ids for thousands of
  English and Chinese snippets, same decoded text). Byte-level BPE (`lmforge prepare --tokenizer bpe`):
  tokenizer model "gpt2" with pre-tokenizer "gpt-2", the vocabulary in id order, the merges, token types
  (special tokens CONTROL; other added tokens, such as Qwen2.5's `<tool_call>`, USER_DEFINED, or CONTROL when
  they look special, `<|...|>`, as llama.cpp's converter types them: llama.cpp matches only those two types
  whole). Character level (`--tokenizer char`: single characters plus `<0xNN>` byte fallback, no merges):
  tokenizer model "llama", llama.cpp's SentencePiece tokenizer, which escapes each space as "▁", looks each
  character up and falls back to the byte tokens (type BYTE): so " " is written as "▁", no space is put before
  a text (`add_space_prefix` false), and a vocabulary that has its own "▁", lacks " " or holds longer pieces
  (SentencePiece would join them) is refused. Unigram and WordPiece get a one-line error: llama.cpp's Unigram
  tokenizer has no byte fallback and its WordPiece one is BERT's. `<|endoftext|>` is bos/eos/padding, no BOS
  added (our models never saw one); an imported model's eos is the one llama.cpp's converter would pick
  (`hf_named_eos`: Qwen2.5-Instruct's `<|im_end|>`, also its end of turn; `<|endoftext|>` stays bos and
  padding). GGUF has no place for a normalizer, so a tokenizer that NFKC-normalizes (`prepare --normalize
  NFKC`) gets a one-line note.
- Known difference, not ours to fix: llama.cpp's `llama_detokenize` drops the space before . , ! ? for any
  "gpt2" vocabulary (its `clean_spaces`, which no GGUF key turns off); the pieces it streams are exact.
- The file is written to a hidden `.FILE.lmforge-tmp-<random>` beside it and renamed, so an
  interrupted export leaves no half file (and a user's `FILE.tmp` is never touched).

References:
- GGUF spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
- llama.cpp convert_hf_to_gguf.py (LlamaModel.permute, tensor names): https://github.com/ggml-org/llama.cpp
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.atomic import check_not_inside, check_out_file_kind
from lmforge.errors import LmforgeError
from lmforge.export.hf import (
    bos_id_of,
    chat_template_of,
    check_float16_range,
    export_dtype,
    extra_stop_ids,
    has_chat_markers,
    hf_eos_of_trained,
    past_float16,
    without_chat_markers,
)

DTYPES = ("auto", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # values per Q8_0 block (ggml's QK8_0)


def permute_rope_rows(w: Tensor, n_head: int) -> Tensor:
    """Rows of a q or k projection (n_head * head_dim, ...) from rotate-half order to interleaved order.

    Within each head, new row 2j + s = old row s * head_dim/2 + j (s in {0, 1}), i.e. llama.cpp's
    `permute(w, n_head)`: reshape (n_head, 2, head_dim/2, ...), swap axes 1 and 2, flatten back.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Our GPT state dict -> {llama.cpp tensor name: float32 tensor (out, in) / (n,)}."""
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    out: dict[str, Tensor] = {"token_embd.weight": state["tok_emb.weight"]}
    for i in range(cfg.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = state[p + "norm1.weight"]
        for kind in ("weight", "bias"):
            qkv = state.get(p + f"attn.qkv.{kind}")
            if qkv is None:
                continue
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=0)
            out[b + f"attn_q.{kind}"] = permute_rope_rows(q, H)
            out[b + f"attn_k.{kind}"] = permute_rope_rows(k, Hkv)
            out[b + f"attn_v.{kind}"] = v
        for ours, theirs in (("attn.proj", "attn_output"), ("mlp.proj", "ffn_down")):
            for kind in ("weight", "bias"):
                if p + f"{ours}.{kind}" in state:
                    out[b + f"{theirs}.{kind}"] = state[p + f"{ours}.{kind}"]
        out[b + "ffn_norm.weight"] = state[p + "norm2.weight"]
        for kind in ("weight", "bias"):
            if p + f"mlp.fc.{kind}" in state:
                gate, up = state[p + f"mlp.fc.{kind}"].chunk(2, dim=0)
                out[b + f"ffn_gate.{kind}"] = gate
                out[b + f"ffn_up.{kind}"] = up
    out["output_norm.weight"] = state["norm_f.weight"]
    if "lm_head.weight" in state:
        out["output.weight"] = state["lm_head.weight"]
    return {name: t.detach().float().contiguous() for name, t in out.items()}


def hf_named_eos(trained: Any, template: Any) -> int | None:
    """The eos an imported HF directory names, as llama.cpp's `convert_hf_to_gguf.py` picks it (gguf's
    `SpecialVocab`: tokenizer_config.json `eos_token` first, else an int config.json `eos_token_id`), or None
    for runs lmforge trained (they name none). Qwen2.5-Instruct names `<|im_end|>`, its tokenizer's end of text
    being `<|endoftext|>`: llama.cpp then stops a chat reply at `<|im_end|>` through the eos."""
    named = getattr(template, "eos_token", "")  # an imported chat template keeps tokenizer_config.json's eos_token
    named_id = trained.tokenizer.hf.token_to_id(named) if named else None
    if named_id is not None:
        return named_id
    config_eos = hf_eos_of_trained(trained)  # config.json's eos_token_id, kept where it is not the tokenizer's
    return config_eos if type(config_eos) is int else None  # (a list: SpecialVocab takes none)


def _check_llama(cfg: Any) -> None:
    if getattr(cfg, "family", "gpt") != "gpt":
        raise LmforgeError(f"GGUF export covers Llama-style GPT models; this run's model.family is {cfg.family!r}")
    if getattr(cfg, "qk_norm", False):
        raise LmforgeError("GGUF export cannot express model.qk_norm=true (llama.cpp's Llama has no QK-norm)")
    have = {"pos_emb": cfg.pos_emb, "norm": cfg.norm, "mlp": cfg.mlp}
    if have != {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"}:
        state = ", ".join(f"{k}={v}" for k, v in have.items())
        raise LmforgeError(
            f"GGUF export needs a Llama-style model (pos_emb=rope, norm=rmsnorm, mlp=swiglu); this one has {state} "
            "(export it with --to hf and convert that with llama.cpp's convert_hf_to_gguf.py)"
        )


# The Llama 3 split regex, which llama.cpp calls "llama-bpe" (a Split before a regex-free ByteLevel)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def gguf_pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`), which decides how it
    splits text before BPE: "gpt-2" only for GPT-2's own ByteLevel regex (what lmforge trains),
    "llama-bpe" for Llama 3's split. Another split would tokenize differently in llama.cpp under either
    name, so it is an error rather than a guess."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        if (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT and steps[0].get("behavior") == "Isolated":
            return "llama-bpe"
    raise LmforgeError(
        f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is neither GPT-2's "
        "nor Llama 3's, and llama.cpp would split text differently; export with --to hf and convert that with "
        "llama.cpp's convert_hf_to_gguf.py"
    )


def _vocab(tokenizer: Any, vocab_size: int, *, chat: bool = False) -> tuple[str, list[str], list[int], list[str]]:
    """(llama.cpp tokenizer model, tokens in id order, token types, merges), padded to vocab_size: "gpt2" for a
    byte-level BPE, "llama" (SentencePiece) for a character-level one. `chat`: a chat-tuned run, whose role
    markers are ordinary text (see `without_chat_markers`)."""
    import gguf

    spec = json.loads(without_chat_markers(tokenizer.to_str()) if chat else tokenizer.to_str())
    model = spec.get("model") or {}
    kind = _tokenizer_kind(spec)
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    tokens: list[str | None] = [None] * max(vocab_size, tokenizer.vocab_size)
    for text, idx in model["vocab"].items():
        tokens[idx] = text
    for t in spec.get("added_tokens", []):
        tokens[t["id"]] = t["content"]
    if kind == "char":
        _check_char_vocab(model["vocab"], {t["content"] for t in spec.get("added_tokens", [])})
    types = []
    for idx, text in enumerate(tokens):
        if text is None:  # ids the model has but the tokenizer never produces
            tokens[idx] = f"[PAD{idx}]"
            types.append(gguf.TokenType.UNUSED)
        elif idx in specials or (idx in added and looks_special(text)):
            types.append(gguf.TokenType.CONTROL)
        elif idx in added:  # matched whole in any text, as the tokenizers library matches a non-special added token
            types.append(gguf.TokenType.USER_DEFINED)
        elif kind == "char" and BYTE_TOKEN.fullmatch(text):
            types.append(gguf.TokenType.BYTE)  # llama.cpp's byte fallback looks these up by their "<0xNN>" text
        else:
            types.append(gguf.TokenType.NORMAL)
            if kind == "char":  # llama.cpp's SentencePiece tokenizer reads every " " of a text as "▁"
                tokens[idx] = text.replace(" ", SPM_SPACE)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return ("gpt2" if kind == "bpe" else "llama"), [str(t) for t in tokens], [int(t) for t in types], merges


BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def looks_special(text: str) -> bool:
    """Whether llama.cpp's convert_hf_to_gguf.py (`does_token_look_special`) types an added token that is not
    marked special as CONTROL anyway (Qwen2.5's `<|fim_prefix|>`), rather than USER_DEFINED (its `<tool_call>`)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))  # DeepSeek's full-width bars
        or (text.startswith("<unused") and text.endswith(">"))
    )


SPM_SPACE = "\u2581"  # SentencePiece's "▁", llama.cpp's escaped space


def _tokenizer_kind(spec: dict[str, Any]) -> str:
    """ "bpe" (byte-level BPE) or "char" (`prepare --tokenizer char`: a merge-free BPE with byte fallback and no
    pre-tokenizer, which is llama.cpp's SentencePiece tokenizer with single characters as pieces); any other is
    a one-line error saying why llama.cpp would tokenize it differently."""
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        return "bpe"
    if model.get("type") == "BPE" and model.get("byte_fallback") and not model.get("merges"):
        if spec.get("pre_tokenizer") is None and all(f"<0x{b:02X}>" in model["vocab"] for b in range(256)):
            return "char"
    why = {
        "Unigram": "llama.cpp's Unigram tokenizer has no byte fallback (unseen characters become its unknown token)",
        "WordPiece": "llama.cpp's WordPiece tokenizer is BERT's, for encoders, and splits text differently",
    }.get(model.get("type"))
    raise LmforgeError(
        f"GGUF export supports byte-level BPE and character-level tokenizers, not this {model.get('type')} one"
        f"{': ' + why if why else ''}; prepare the data with --tokenizer bpe (or char) and train again, or for an "
        "imported model export with --to hf and convert that with llama.cpp's convert_hf_to_gguf.py"
    )


def _check_char_vocab(vocab: dict[str, int], added: set[str]) -> None:
    """llama.cpp turns each space of a text into "▁" before looking characters up, so the vocabulary needs " "
    (written as "▁") and must not hold a "▁" of its own; and it joins neighbouring pieces whenever the pair is
    in the vocabulary, so every piece (the special tokens and "<0xNN>" aside) must be one character."""
    longer = [t for t in vocab if len(t) > 1 and t not in added and not BYTE_TOKEN.fullmatch(t)]
    if longer:
        raise LmforgeError(
            f"GGUF export: this merge-free tokenizer has pieces longer than one character ({longer[0]!r}), which "
            "llama.cpp would join where this tokenizer never does; export with --to hf instead"
        )
    if SPM_SPACE in vocab or " " not in vocab:
        which = "has the character '▁' (U+2581)" if SPM_SPACE in vocab else "has no space character"
        raise LmforgeError(
            f"GGUF export: this character-level vocabulary {which}, and llama.cpp reads every space of a text as "
            "'▁', so it would tokenize spaces differently; train on text with spaces and without '▁', or use "
            "--tokenizer bpe"
        )


def _is_gguf_file(path: Path) -> bool:
    """Whether `path` is a regular file that starts with GGUF's magic bytes (what --overwrite may replace)."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _as_f16(t: Tensor, dtype: str) -> bool:
    """Whether tensor `t` is written as float16 at `--dtype dtype`: the matrices at f16, and at q8_0 those whose
    rows are no whole number of Q8_0 blocks (1-D tensors stay float32)."""
    return t.dim() > 1 and dtype != "bf16" and not (dtype == "q8_0" and t.shape[-1] % Q8_BLOCK == 0)


def export_gguf(path: str | Path, out: str | Path, *, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Write a run (or checkpoint) of a Llama-style model as one GGUF file for llama.cpp.

    Args:
        path: run directory (its latest checkpoint) or a checkpoint folder.
        out: the .gguf file to write.
        dtype: "auto", "f16", "bf16" or "q8_0" for the matrices (1-D tensors stay float32); auto: bf16 for a model
            imported from bf16 weights, else f16 (bf16 where a matrix holds a weight past f16's range).
        overwrite: replace an existing GGUF file (any other file is refused).

    Returns:
        the written file.
    """
    try:
        import gguf
    except ImportError:
        raise LmforgeError("GGUF export needs the gguf package: pip install 'lmforge[gguf]'") from None
    from lmforge.export.peft import load_exportable

    if dtype not in DTYPES:
        raise LmforgeError(f"--dtype {dtype!r} is not supported for GGUF; use one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.is_dir():  # before "pass --overwrite", which cannot replace a directory
        raise LmforgeError(f"{out} is a directory; --out for GGUF is a file such as {out / 'model.gguf'}")
    check_out_file_kind(out)
    if out.exists() and not overwrite:
        raise LmforgeError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    if out.suffix.lower() != ".gguf":
        raise LmforgeError(
            f"--out {out}: a GGUF file's name ends in .gguf (llama.cpp looks for it); e.g. {out.stem}.gguf"
        )
    if out.exists() and not _is_gguf_file(out):  # --overwrite replaces an export, never another file
        raise LmforgeError(
            f"refusing to overwrite {out}: it is not a GGUF file (no GGUF magic), and --overwrite would replace it; "
            "choose another --out"
        )
    check_not_inside(out, Path(path))  # a run (or checkpoint) is never written into
    trained = load_exportable(path)  # any run: LoRA adapters merged, as for the HF export
    if getattr(trained.model, "head", None) is not None:  # finetune --task classify: a label head, no LM head
        raise LmforgeError(
            f"{path} is a classification fine-tune (its head scores labels; there is no language-model head), which "
            "GGUF's llama architecture cannot hold; export it with --to hf (as a *ForSequenceClassification model)"
        )
    cfg = trained.config.model
    _check_llama(cfg)
    chose_f16 = dtype == "auto" and export_dtype(trained.checkpoint, trained.model, "auto") != torch.bfloat16
    if dtype == "auto":  # (the source dtype import recorded, as the HF export reads it)
        dtype = "f16" if chose_f16 else "bf16"
    if cfg.bias or cfg.qkv_bias:  # see the module docstring: transformers would load this file without its biases
        which = "model.bias=true" if cfg.bias else "on q, k and v: model.qkv_bias=true"
        print(
            f"note: this model has biases ({which}); llama.cpp reads them from the GGUF file, but transformers' "
            "GGUF loader (from_pretrained(gguf_file=...)) drops them and computes other logits: load it in "
            "transformers from an --to hf export instead",
            file=sys.stderr,
            flush=True,
        )
    if '"NFKC"' in json.dumps(json.loads(trained.tokenizer.to_str()).get("normalizer")):  # prepare --normalize NFKC
        print(
            "note: this tokenizer normalizes text (NFKC: full-width ，！ become , !) before encoding, and llama.cpp "
            "does not: normalize prompts yourself (Python: unicodedata.normalize('NFKC', text)); --to hf keeps it",
            file=sys.stderr,
            flush=True,
        )
    template = chat_template_of(trained)
    # the HF export's tokenizer_config.json template (an imported model's own unchanged; lmforge's as written for
    # this tokenizer: a BOS tokenizer's starts with {{ bos_token }}), not the plain one
    chat = template.jinja_for(trained.tokenizer) if template else ""
    tok_model, tokens, types, merges = _vocab(trained.tokenizer, cfg.vocab_size, chat=has_chat_markers(template))
    pre_tokenizer = gguf_pre_tokenizer(json.loads(trained.tokenizer.to_str())) if tok_model == "gpt2" else None
    eos = trained.tokenizer.eos_id_or_none
    stops = extra_stop_ids(trained, eos)  # an imported model's end-of-sequence ids beside its eos
    if eos is None and stops:  # a tokenizer without an end-of-text token lmforge knows: the HF directory's first
        eos, stops = stops[0], stops[1:]
    end_of_turn = stops[:1]  # an imported instruct model's: llama.cpp's end of turn
    bos = bos_id_of(trained.tokenizer, eos, template)  # an imported Llama's <s> / <|begin_of_text|>, else eos
    pad = eos
    named = hf_named_eos(trained, template)
    if named is not None and named != eos:  # Qwen2.5-Instruct's <|im_end|>: eos (and end of turn), as llama.cpp's
        eos, end_of_turn = named, [named]  # converter writes it; <|endoftext|> stays bos and padding, as there
    tensors = gguf_tensors(trained.model.state_dict(), cfg)
    if chose_f16 and (past := past_float16((n, t) for n, t in tensors.items() if _as_f16(t, dtype))):
        dtype = "bf16"  # (what --dtype auto is for: the 16 bits that hold every weight)
        print(
            f"note: {past[0]} holds a weight of {past[1]:.6g}, past float16's range (+-65,504); the matrices are "
            "written bf16, not f16 (--dtype auto)",
            file=sys.stderr,
            flush=True,
        )
    check_float16_range(((n, t) for n, t in tensors.items() if _as_f16(t, dtype)), "--dtype bf16")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.lmforge-tmp-{secrets.token_hex(4)}")  # never a user's file (atomic.py)
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(Path(trained.config.out or out.stem).name or out.stem)
        file_types = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
        writer.add_file_type(getattr(gguf.LlamaFileType, file_types[dtype]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # (as llama.cpp's convert_hf_to_gguf.py writes it)
        writer.add_vocab_size(len(tokens))
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.ff_dim)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
        writer.add_tokenizer_model(tok_model)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if tok_model == "gpt2":
            writer.add_tokenizer_pre(pre_tokenizer)
            writer.add_token_merges(merges)
        else:  # SentencePiece: no merges, so the scores never decide anything; no space put before a text
            writer.add_token_scores([0.0] * len(tokens))
            writer.add_add_space_prefix(False)
        if bos is not None:
            writer.add_bos_token_id(bos)
        if eos is not None:
            writer.add_eos_token_id(eos)
            writer.add_pad_token_id(pad)
        writer.add_add_bos_token(bool(trained.tokenizer.prompt_prefix) and bos != eos)  # a template's BOS is its own
        if end_of_turn:
            writer.add_eot_token_id(end_of_turn[0])
        if chat:  # the template the run was tuned with, as the HF export writes it
            writer.add_chat_template(chat)
        for name, t in tensors.items():
            arr = t.numpy()
            if arr.ndim == 1:
                writer.add_tensor(name, arr.astype(np.float32))
            elif not _as_f16(t, dtype):
                qtype = gguf.GGMLQuantizationType.Q8_0 if dtype == "q8_0" else gguf.GGMLQuantizationType.BF16
                q = gguf.quants.quantize(arr, qtype)
                writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
            else:
                writer.add_tensor(name, arr.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:  # a full disk: the bare "4096 requested and 0 written" named no file
        if e.errno is not None:  # (the CLI's line for a full disk or a file-size limit goes by it)
            raise OSError(e.errno, e.strerror, str(out)) from None
        raise OSError(f"could not write {out} ({e})") from None
    finally:
        # closing flushes what the writer buffered, which fails again on a full disk: that second error skipped
        # the unlink (a `.m.gguf.lmforge-tmp-*` was left for good) and replaced the one naming the file
        with contextlib.suppress(OSError):
            writer.close()
        tmp.unlink(missing_ok=True)
    return out
