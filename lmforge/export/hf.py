"""Hugging Face interop: export an lmforge run as an HF model directory, import an HF directory as a run.

`export_hf(run, out)` writes what `transformers` loads offline with `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained`:

    out/
        config.json               GPT2LMHeadModel, LlamaForCausalLM or Qwen2ForCausalLM config (eos_token_id:
                                  our end-of-text id, or an imported model's own, generate.hf_eos_of)
        model.safetensors         weights under HF names (a tied head stored once, as HF expects)
        generation_config.json    bos/eos/pad ids (eos: a list when the run has stop ids, generate.stop_ids_of);
                                  `suppress_tokens`: the ids of an embedding padded past its tokenizer
        tokenizer.json            ours, unchanged (it is already the HF `tokenizers` format)
        tokenizer_config.json     PreTrainedTokenizerFast; our end-of-text token as bos/eos/pad (and unk,
                                  unless the tokenizer has its own unknown token)
        special_tokens_map.json
        README.md                 model card: data, steps, tokens seen, last val loss/bpb, lmforge config

`import_hf(hf_dir, run)` in `export/hf_import.py` is the reverse for local GPT-2, Llama and Qwen2 directories,
with the key maps and config translations of `export/hf_families.py`: it writes a run directory (config.json,
tokenizer.json, weights-only checkpoint `checkpoints/step-000000/`) that `lmforge eval`, `lmforge
generate` and fine-tuning load like any other run. `verify_hf` loads an export with
`transformers` and reports the largest logit difference from the lmforge checkpoint.
BERT/ELECTRA runs and BERT directories are handed to `export/bert.py`, fine-tuned decoder classifiers to
`export/hf_classifier.py`; LoRA runs are merged first, or written as a PEFT adapter by `export/peft.py`.

Design decisions
- What differs per family (which of our variants have an HF twin, one key map per family, the
  config.json translation each way) is in `export/hf_families.py`, read by export here and by import
  (`hf_import.py`) alike, so nothing is written twice for the two directions. The tensors go through
  those maps here (`to_hf_state_dict`, `from_hf_state_dict`): a tensor without a mapping, or an HF
  tensor nobody asked for, is an error: nothing is dropped silently.
- Export needs no `transformers` at all: JSON and safetensors are written directly. Only `verify_hf`
  imports it, inside the function, with an install hint.
- Tensors are written contiguous with their own storage (safetensors refuses views that share a
  buffer, which splits and transposes are). Import stores float32, the dtype lmforge trains its master weights
  in (autocast does the rest), and records the source's dtype; export writes that again, for the import and for
  fine-tunes, continued pretraining and quantized copies of it (`imported_dtype` follows the lineage), else the
  checkpoint's dtype, unless `--dtype` names one (`export_dtype`).
- Outputs are atomic: everything goes to a hidden sibling folder that only lmforge names
  (`atomic.building_dir`) and is renamed to `out` at the end; an existing `out` is an error unless
  `overwrite`, and is replaced only once the new one is complete. An `out` that is, holds or sits in
  the run being read is refused even with `overwrite`.
- Tokenizer: our tokenizer encodes the text "<|endoftext|>" literally (see `tokenizer.py`) while an
  HF tokenizer parses it as the special token; ordinary text encodes to the same ids. transformers 5's
  AutoTokenizer makes any qwen2 directory's tokenizer a Qwen2Tokenizer, whose own pre-tokenizer gives other ids
  unless ours is split as Qwen2's (`qwen2_tokenizer_differs`); no file we could write changes that, so such an
  export notes it in one line and its model card loads `PreTrainedTokenizerFast`, which reads tokenizer.json as is.
- Decoder classifiers (`finetune --task classify` on a GPT-2/Llama/Qwen2 base) export as
  `*ForSequenceClassification` in `export/hf_classifier.py`, with the card and tokenizer helpers here.
"""

from __future__ import annotations

import json
import sys
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
from lmforge.export.hf_families import FAMILIES, STYLE_NAMES, _name_table, hf_family
from lmforge.models.gpt import GPTConfig
from lmforge.tokenizer.tokenizer import Tokenizer

HF_HINT = "pip install 'lmforge[hf]'"
HF_DIR_FILES = "config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json"

# --------------------------------------------------------------------------------------------
# State dicts: our tensors <-> HF tensors, through the family's key map (hf_families.py)


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
# Export


def export_hf(path: str | Path, out: str | Path, *, overwrite: bool = False, dtype: str = "auto") -> Path:
    """Write the model of a run directory or checkpoint folder as an HF model directory.

    Args:
        path: an lmforge run directory (its latest checkpoint is used) or a checkpoint folder.
        out: the HF directory to create.
        overwrite: replace an existing `out` (only after the new one is complete).
        dtype: the weights' dtype in the export (`export_dtype`): "auto", "float32", "bfloat16" or "float16".

    Returns:
        `out`, which `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load.

    Raises:
        LmforgeError: the model has no HF twin (message names the fields), `out` exists, or the
            checkpoint is missing or damaged.
    """
    from lmforge.export.peft import load_exportable

    out = Path(out)
    check_dtype(dtype)
    check_not_inside(out, Path(path))  # the run given: never replaced, never written into
    check_out_dir(out, overwrite=overwrite)
    trained = load_exportable(path)  # LoRA runs come back merged
    check_not_inside(out, trained.checkpoint.path)
    # (the writers keep the dtype)
    cast_weights(trained.model, export_dtype(trained.checkpoint, trained.model, dtype), "--dtype bfloat16 or float32")
    if trained.config.model.family in ("bert", "electra"):
        from lmforge.export.bert import write_bert

        return write_bert(trained, out)
    if getattr(trained.model, "head", None) is not None:  # a fine-tuned decoder classifier
        from lmforge.export.hf_classifier import write_hf_classifier

        return write_hf_classifier(trained, out)
    return write_hf(trained, out)


HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: str) -> None:
    if dtype != "auto" and dtype not in HF_DTYPES:
        raise LmforgeError(
            f"--dtype {dtype!r} is not an HF export dtype; use auto (the default), {', '.join(HF_DTYPES)} "
            "(f16, bf16 and q8_0 are GGUF types, for --to gguf)"
        )


def export_dtype(ckpt: Any, model: torch.nn.Module, dtype: str) -> torch.dtype:
    """The dtype an HF export of checkpoint `ckpt` (a `checkpoint.Checkpoint`) writes its weights in. "auto": the
    dtype of the HF model the weights descend from (`imported_dtype`: a bf16 import, or a fine-tune or continued
    pretraining of one, exports as bf16, half float32's size; import only widened the values), else the dtype the
    weights are in (float32 for what lmforge trains). Otherwise the one named (`--dtype`), rounding float32
    weights to bfloat16/float16 when asked."""
    if dtype != "auto":
        return HF_DTYPES[dtype]
    return HF_DTYPES.get(imported_dtype(ckpt.path, ckpt.meta) or "", next(model.parameters()).dtype)


F16_MAX = 65504.0  # float16's largest finite value


def past_float16(named: Any) -> tuple[str, float] | None:
    """(name, largest magnitude) of the first of the (name, tensor) pairs `named` holding a value past float16's
    range, which float16 would hold as inf; None when they all fit."""
    for name, t in named:
        if t.is_floating_point() and t.numel() and (peak := float(t.detach().abs().max())) > F16_MAX:
            return name, peak
    return None


def check_float16_range(named: Any, fix: str) -> None:
    """Refuse to write float16 weights of which one is past float16's range: it would be inf in the file (numpy's
    cast only warned "overflow encountered in cast", and a bf16 import's 1e5 became inf). `named`: (name, tensor)
    pairs; `fix`: what to pass instead (the command's own dtype names)."""
    if past := past_float16(named):
        raise LmforgeError(
            f"{past[0]} holds a weight of {past[1]:.6g}, past float16's range (+-65,504): it would be inf in the "
            f"file; export with {fix}"
        )


def cast_weights(model: torch.nn.Module, dtype: torch.dtype, fix: str) -> None:
    """`model.to(dtype)`, refusing a float16 cast that would turn a weight into inf (`check_float16_range`)."""
    if dtype == torch.float16:
        check_float16_range(model.state_dict().items(), fix)
    model.to(dtype)


LINEAGE_DEPTH = 32  # links followed from a checkpoint towards its import (a loop of hand-edited files ends too)


def imported_dtype(ckpt_dir: Path, meta: dict[str, Any]) -> str | None:
    """The dtype of the HF model a checkpoint's weights descend from, None when they descend from none.

    Import records it in the imported run's state.json (`imported_from.dtype`, `hf_import.source_dtype`). A
    fine-tune names its base checkpoint in finetune.json (`base`; an HF directory given as BASE is imported into
    RUN/base/ first), a continued pretraining its start in its config (`init_from`) and a quantized copy the
    checkpoint it quantized (`quantization.source`): those links are followed back to the import, so
    `lmforge import` of a bf16 model, then `finetune` (full, LoRA merged or not), `pretrain --init-from` or
    `quantize` on it, exports bf16 by default, as the import itself does. A link whose checkpoint is
    gone (a base deleted after a full fine-tune) ends the search: the weights' own dtype is used."""
    seen: set[Path] = set()
    while len(seen) < LINEAGE_DEPTH:
        imported = meta.get("imported_from")
        if isinstance(imported, dict):
            source = imported.get("dtype")
            return source if isinstance(source, str) else None
        parent = _lineage_parent(ckpt_dir, meta)
        if parent is None or parent in seen:
            return None
        seen.add(parent)
        try:
            meta = json.loads((parent / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict):
            return None
        ckpt_dir = parent
    return None


def _lineage_parent(ckpt_dir: Path, meta: dict[str, Any]) -> Path | None:
    """The checkpoint `ckpt_dir`'s weights started from: a quantized copy's source (`quantization.source`), a
    fine-tune's base, a continued pretraining's `--init-from` checkpoint; None for a run that started from scratch
    (or an unreadable record)."""
    from lmforge.checkpoint import resolve_checkpoint

    quant = meta.get("quantization")
    source = quant.get("source") if isinstance(quant, dict) else None
    if isinstance(source, str) and source:  # (checked first: a quantized fine-tune also carries finetune.json)
        return Path(source).resolve()
    info_path = ckpt_dir.parent.parent / "finetune.json"
    if ckpt_dir.parent.name == "checkpoints" and info_path.is_file():
        try:
            base = json.loads(info_path.read_text(encoding="utf-8")).get("base")
        except (OSError, ValueError, AttributeError):
            return None
        return Path(base).resolve() if isinstance(base, str) and base else None
    config = meta.get("config")
    start = config.get("init_from") if isinstance(config, dict) else None
    if not (isinstance(start, str) and start):
        return None
    try:  # (recorded as the checkpoint folder used; a run directory resolves to its latest)
        return resolve_checkpoint(start).resolve()
    except LmforgeError:
        return None


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


def bos_id_of(tokenizer: Tokenizer, eos_id: int | None, template: Any = None) -> int | None:
    """The BOS an export names: what the tokenizer puts before a text (an imported Llama's <s>), else the
    `bos_token` an imported chat template writes itself (Llama-3's `<|begin_of_text|>`: llama.cpp renders the
    template with the BOS id's text), else our end-of-text token (lmforge's own models never saw a BOS)."""
    prefix = tokenizer.prompt_prefix
    if len(prefix) == 1:
        return prefix[0]
    named = getattr(template, "bos_token", "")
    named_id = tokenizer.hf.token_to_id(named) if named else None
    return named_id if named_id is not None else eos_id


def unk_token_of(tokenizer: Tokenizer) -> str | None:
    """The token the tokenizer's model emits for what it cannot encode (WordPiece's and imported Llama-2's
    `unk_token`, Unigram's `unk_id`), or None when it has none (byte-level BPE, byte fallback only)."""
    model = json.loads(tokenizer.to_str()).get("model") or {}
    unk_id = model.get("unk_id")
    if model.get("type") == "Unigram" and type(unk_id) is int:
        return tokenizer.id_to_token(unk_id)
    unk = model.get("unk_token")
    return unk if isinstance(unk, str) and tokenizer.hf.token_to_id(unk) is not None else None


def extra_stop_ids(trained: Any, eos_id: int | None) -> list[int]:
    """An imported instruct model's end-of-turn ids beside its eos (`generate.stop_ids_of`), in order."""
    from lmforge.adapt.load import run_dir_of
    from lmforge.generate import stop_ids_of

    return [i for i in stop_ids_of(run_dir_of(trained.checkpoint.path)) if i != eos_id]


def hf_eos_of_trained(trained: Any) -> int | list[int] | None:
    """The eos_token_id of the HF config.json the run was imported from, when not its tokenizer's eos
    (`generate.hf_eos_of`), which config.json names again so that transformers stops where it did."""
    from lmforge.adapt.load import run_dir_of
    from lmforge.generate import hf_eos_of

    return hf_eos_of(run_dir_of(trained.checkpoint.path))


# transformers 5 loads every `model_type: "qwen2"` directory as Qwen2Tokenizer, whatever tokenizer_config.json
# names (qwen2 is in AutoTokenizer's MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS). That class keeps tokenizer.json's
# vocabulary and merges but rebuilds the rest as Qwen2's: byte-level BPE, NFC, this split (models/qwen2/
# tokenization_qwen2.py, PRETOKENIZE_REGEX; a real Qwen2 tokenizer.json has the same).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_TOKENIZER_NOTE = (
    "note: transformers' AutoTokenizer loads a Qwen2 directory as Qwen2Tokenizer, which splits text its own way "
    "(digits one by one) and would give other ids than this run's tokenizer; load it with "
    "PreTrainedTokenizerFast.from_pretrained({out}), as its model card does"
)


def _without_trim_offsets(value: Any) -> Any:
    """A tokenizer.json section without ByteLevel's trim_offsets (it moves offsets, never ids)."""
    if isinstance(value, dict):
        return {k: _without_trim_offsets(v) for k, v in value.items() if k != "trim_offsets"}
    if isinstance(value, list):
        return [_without_trim_offsets(v) for v in value]
    return value


def qwen2_tokenizer_differs(tokenizer_json: str) -> bool:
    """Whether transformers' Qwen2Tokenizer, rebuilt from this tokenizer.json's vocabulary and merges, encodes
    text otherwise than the tokenizer.json itself: anything but a byte-level BPE with Qwen2's normalizer and
    pre-tokenizer (lmforge's own BPE keeps digits together; char, WordPiece and Unigram are other models)."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    qwen2 = HFTokenizer(BPE())
    qwen2.normalizer = normalizers.NFC()
    qwen2.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    want, have = json.loads(qwen2.to_str()), json.loads(tokenizer_json)
    model = have.get("model") or {}
    plain_bpe = model.get("type") == "BPE" and not any(
        model.get(key)
        for key in ("unk_token", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "ignore_merges")
    )
    same_split = all(
        _without_trim_offsets(have.get(k)) == _without_trim_offsets(want[k]) for k in ("normalizer", "pre_tokenizer")
    )
    return not (plain_bpe and same_split)


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


def padded_ids(model_vocab: int, tokenizer_vocab: int) -> list[int]:
    """The ids of an embedding padded past its tokenizer (`--model.vocab_size 50304` over GPT-2's 50257 ids,
    Qwen2's 151936 rows over 151665): lmforge generate never samples them (`generate(vocab_size=)`), and an HF
    export says the same in generation_config.json `suppress_tokens`, which transformers' generate applies to
    causal LMs (greedy, sampling and beam search alike). Without it, generate could emit an id its tokenizer
    cannot decode."""
    return list(range(tokenizer_vocab, model_vocab))


def write_hf(trained: Any, out: Path, *, adapter_base: bool = False) -> Path:
    """Write a loaded GPT (`trained.Trained`) as an HF directory at `out` (atomically). `adapter_base`: it is
    the base of an `export --peft` adapter (the fine-tune's LoRA layers stripped), which its card says."""
    cfg: GPTConfig = trained.config.model
    family = hf_family(cfg)
    tokenizer: Tokenizer = trained.tokenizer
    eos_id = tokenizer.eos_id_or_none  # None: a foreign tokenizer without a known end-of-text token
    eos = tokenizer.id_to_token(eos_id) if eos_id is not None else None
    state = trained.model.state_dict()
    dtype = trained.model.tok_emb.weight.dtype
    tensors = to_hf_state_dict(state, cfg, family)

    with building_dir(out) as tmp:
        template = chat_template_of(trained)
        bos_id = bos_id_of(tokenizer, eos_id, template)
        hf_config = {**FAMILIES[family].config_to_hf(cfg, eos_id, dtype), "bos_token_id": bos_id}
        if (hf_eos := hf_eos_of_trained(trained)) is not None:  # an imported model's own (Qwen: <|im_end|>)
            hf_config["eos_token_id"] = hf_eos
        write_json(tmp / "config.json", hf_config)
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
        if padded := padded_ids(cfg.vocab_size, tokenizer.vocab_size):  # rows no id of the tokenizer reaches
            generation["suppress_tokens"] = padded  # (transformers' generate sets their scores to -inf)
        write_json(tmp / "generation_config.json", generation)
        chat = template.jinja_for(tokenizer) if template else ""  # (a BOS tokenizer's starts with {{ bos_token }})
        markers = has_chat_markers(template)
        atomic_write_text(
            tmp / "tokenizer.json", without_chat_markers(tokenizer.to_str()) if markers else tokenizer.to_str()
        )
        specials = {f"{name}_token": eos for name in ("bos", "eos", "unk", "pad")} if eos is not None else {}
        if specials and bos_id != eos_id:
            specials["bos_token"] = tokenizer.id_to_token(bos_id)
        if unk := unk_token_of(tokenizer):  # AutoTokenizer's unk_token_id: the id encoding really emits
            specials["unk_token"] = unk
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
        own_ids = family == "qwen2" and qwen2_tokenizer_differs(tokenizer.to_str())  # (AutoTokenizer's would differ)
        card = _model_card(
            out, trained, family, n_params, chat=bool(chat), adapter_base=adapter_base, own_tokenizer=own_ids
        )
        atomic_write_text(tmp / "README.md", card)
    if own_ids and not adapter_base:  # (an adapter's folder has no config.json: AutoTokenizer reads it as is)
        print(QWEN2_TOKENIZER_NOTE.format(out=card_path(out)), file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer framing (decoder classifiers: export/hf_classifier.py; encoders: export/bert.py)

FRAMING = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")  # post-processors that add special tokens


def framed_tokenizer_json(hf: Any, template: Any) -> str:
    """tokenizer.json of the `tokenizers.Tokenizer` `hf` with the post-processor `template` (a TemplateProcessing
    that frames the text) after what `hf` already post-processes (byte-level offsets), an earlier framing (an
    imported tokenizer's own, a re-export's) dropped."""
    before = json.loads(hf.to_str())["post_processor"]
    hf.post_processor = template
    data = json.loads(hf.to_str())
    kept = before["processors"] if before and before["type"] == "Sequence" else [before] if before else []
    kept = [p for p in kept if p["type"] not in FRAMING]
    if kept:
        data["post_processor"] = {"type": "Sequence", "processors": [*kept, data["post_processor"]]}
    return json.dumps(data, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Model cards (the classifier's: export/hf_classifier.py; encoders': export/bert.py)


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


def _val_loss_text(ckpt_dir: Path, record: dict[str, Any]) -> str:
    """A model card's last validation loss with what it is per (`runs.loss_unit`): an sft fine-tune's is per answer
    token, an encoder's per masked token (+ its second term), not per token of the corpus as the card said."""
    from lmforge.runs import loss_unit

    return f"{record['val_loss']:.4f} {loss_unit(ckpt_dir.parent.parent)}"


# Model-card examples in the training data's language: a Chinese model continues Chinese, not "Once upon a time"
CARD_PROMPTS = {
    "zh": "从前有座山，山里有座庙。", "ja": "むかしむかし、", "ko": "옛날 옛적에", "en": "Once upon a time",
    "fr": "Il était une fois", "de": "Es war einmal", "es": "Érase una vez", "it": "C'era una volta",
    "pt": "Era uma vez", "nl": "Er was eens",
}  # fmt: skip


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


def finetune_info_of(trained: Any) -> dict[str, Any] | None:
    """finetune.json of the run `trained` was loaded from; None for a pretrained or imported run."""
    path = trained.checkpoint.path
    if path.parent.name != "checkpoints":
        return None
    try:
        return json.loads((path.parent.parent / "finetune.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finetune_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """Model-card rows naming a fine-tune's base, task and mode (config.json there holds the base's settings)."""
    settings = info.get("finetune_config") or {}
    how = f"`--task {info.get('task')}`, `--adapt {info.get('adapt')}`"
    if info.get("adapt") == "lora":
        how += " (LoRA merged into the weights)"
    if settings.get("teacher"):
        how += f", teacher `{settings['teacher']}`"
    return [("fine-tuned from", f"`{info.get('base_arg') or info.get('base')}`"), ("fine-tuning", how)]


def card_path(out: Path) -> str:
    """How a model card's usage example names its folder: the path the user exported to, as given (relative paths
    are from where `lmforge export` ran), as a Python string literal. It named the folder's last component alone,
    which `from_pretrained` looked for on the Hub unless the user happened to stand in the export's parent."""
    return json.dumps(out.as_posix(), ensure_ascii=False)


CARD_PATH_NOTE = (
    "`{path}` is where `lmforge export` wrote this folder (a relative path counts from where it ran); from "
    "elsewhere give its full path, and once it is uploaded to the Hub its repo id (`ORG/NAME`)."
)


def _model_card(
    out: Path,
    trained: Any,
    family: str,
    n_params: int,
    *,
    chat: bool = False,
    adapter_base: bool = False,
    own_tokenizer: bool = False,
) -> str:
    """The export's README.md. `own_tokenizer`: AutoTokenizer would not load tokenizer.json as it is
    (`qwen2_tokenizer_differs`), so the example loads it with PreTrainedTokenizerFast."""
    name, path = out.name, card_path(out)
    cfg = trained.config
    info = finetune_info_of(trained)
    step, tokens = training_progress(trained.checkpoint.meta)
    last = _last_eval(trained.checkpoint.path, step)
    architecture = FAMILIES[family].architecture
    data = f"`{cfg.data.dir}`" if cfg.data.dir else "(none recorded: imported or untrained)"
    rows = [
        ("architecture", f"{architecture} ({STYLE_NAMES[family]}-style lmforge GPT)"),
        ("parameters", f"{n_params:,}"),
        ("layers / width / heads", f"{cfg.model.n_layer} / {cfg.model.d_model} / {cfg.model.n_head}"),
        ("context", f"{cfg.model.max_seq_len} tokens"),
        ("vocabulary", f"{cfg.model.vocab_size} ({trained.tokenizer.vocab_size} in the tokenizer)"),
    ]
    if info is None:
        rows += [("training data", data), ("steps", f"{step:,}"), ("tokens seen", f"{tokens:,}")]
    elif adapter_base:  # the fine-tune's steps, tokens and evaluations are the adapter's, not this model's
        base = info.get("base_arg") or info.get("base")
        rows += [("weights", f"`{base}`, the base of the LoRA adapter in `..`"), ("pretraining data", data)]
        last = None
    else:  # config.json (and so `cfg`) holds the base's settings; the steps and evaluations are the fine-tune's
        rows += _finetune_rows(info)
        rows += [("pretraining data", data), ("fine-tuning steps", f"{step:,}"), ("fine-tuning tokens", f"{tokens:,}")]
    quant = trained.checkpoint.meta.get("quantization")
    if quant:  # `lmforge quantize`: the integer weights are stored dequantized here
        grouping = "per output channel" if quant["bits"] == 8 else f"in groups of {quant['group_size']} inputs"
        rows.append(("quantization", f"int{quant['bits']} weights ({grouping}) of `{quant['source']}`, dequantized"))
    if last is not None:
        rows.append(("last validation loss", f"{_val_loss_text(trained.checkpoint.path, last)} (step {last['step']})"))
        if last.get("val_bpb") is not None:
            rows.append(("last validation bits per byte", f"{last['val_bpb']:.4f}"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    config_json = json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False)
    if info is not None and not adapter_base:
        settings = {k: info[k] for k in ("finetune_config", "train", "optim") if k in info}
        config_json += "\n```\n\nFine-tuning settings (`finetune.json`; the config above is the base's):\n\n```json\n"
        config_json += json.dumps(settings, indent=2, ensure_ascii=False)
    language = data_language(cfg.data.dir) if cfg.data.dir else ""
    prompt = CARD_PROMPTS[language or "en"]
    tok = trained.tokenizer
    if chat and not adapter_base:
        used = chat_template_of(trained).prompt_length(tok, [{"role": "user", "content": prompt}])
    else:
        used = len(tok.prompt_prefix) + len(tok.encode(prompt))
    # the example's prompt and reply must fit the context: max_seq_len // 2 new tokens after a chat template's
    # prompt ran a 64-token model's positions out of range (IndexError in the example, as written)
    n_new = max(1, min(50, cfg.model.max_seq_len - used))
    if chat and not adapter_base:  # a chat-tuned model learned its prompts through the chat template
        encode = (
            f'messages = [{{"role": "user", "content": "{prompt}"}}]\n'
            'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
            "return_dict=True).input_ids"
        )
    else:
        encode = f'ids = tokenizer("{prompt}", return_tensors="pt").input_ids'
    tokenizer_class = "PreTrainedTokenizerFast" if own_tokenizer else "AutoTokenizer"
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
from transformers import AutoModelForCausalLM, {tokenizer_class}

tokenizer = {tokenizer_class}.from_pretrained({path})
model = AutoModelForCausalLM.from_pretrained({path})
{encode}
print(tokenizer.decode(model.generate(ids, max_new_tokens={n_new}, do_sample=False)[0]))
```

{CARD_PATH_NOTE.format(path=out.as_posix())}

Exported from `{trained.checkpoint.path}`.

## lmforge config

```json
{config_json}
```
"""


# --------------------------------------------------------------------------------------------
# Verification with transformers (the only place that imports it)


def loaded_by_transformers(load: Any, hf_dir: str | Path) -> Any:
    """`load()` (a transformers `from_pretrained`) as a float32 model in eval mode; a failure is a one-line error."""
    try:
        return load().float().eval()
    except (OSError, ValueError, KeyError) as e:
        raise LmforgeError(
            f"transformers cannot load {hf_dir} ({first_line(e)}); export it again with lmforge"
        ) from None


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
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise LmforgeError(f"verifying an HF export needs transformers: {HF_HINT}") from None
    hf_logging.disable_progress_bar()  # (its 'Loading weights' bar on stderr, between export's own lines)
    trained = load_exportable(path)
    if trained.config.model.family in ("bert", "electra"):
        from lmforge.export.bert import verify_bert

        return verify_bert(trained, hf_dir, seed=seed)
    if getattr(trained.model, "head", None) is not None:
        from lmforge.export.hf_classifier import verify_classifier

        return verify_classifier(trained, hf_dir, seq_len=seq_len, seed=seed)
    ours = trained.model.float()
    if peft:
        try:
            from peft import PeftModel
        except ImportError:
            raise LmforgeError("verifying a --peft export needs peft: pip install peft") from None
        theirs = loaded_by_transformers(
            lambda: PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(str(Path(hf_dir) / "base")), str(hf_dir)
            ),
            hf_dir,
        )
    else:
        theirs = loaded_by_transformers(lambda: AutoModelForCausalLM.from_pretrained(str(hf_dir)), hf_dir)
    T = min(seq_len, ours.cfg.max_seq_len)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, trained.tokenizer.vocab_size, (2, T), generator=generator)  # (B, T)
    diff = (ours(idx) - theirs(idx).logits).abs().max()
    return float(diff)
