"""Hugging Face interop for encoders: BERT runs <-> `BertForPreTraining`, ELECTRA runs <-> `ElectraForPreTraining`,
fine-tuned BERT/ELECTRA classifiers -> `*ForSequenceClassification`.

`write_bert(trained, out)` (called by `export_hf` for model.family bert/electra) writes:

    out/
        config.json               BertForPreTraining (bert) or ElectraForPreTraining (electra) config
        model.safetensors         weights under HF names (the tied MLM decoder stored once, as HF expects)
        tokenizer.json            ours + the [PAD]/[CLS]/[SEP]/[MASK] it lacked as special tokens (those it has keep
                                  their names: <|cls|>, ...), "[CLS] A [SEP] (B [SEP])"
        tokenizer_config.json     PreTrainedTokenizerFast with cls/sep/pad/mask tokens
        special_tokens_map.json
        README.md                 model card: data, steps, tokens seen, last eval numbers, lmforge config

A fine-tuned BERT/ELECTRA classifier (`finetune --task classify`, any of full/head/lora, LoRA merged) exports
as `BertForSequenceClassification` / `ElectraForSequenceClassification` instead: the same encoder names, our
head as HF's `classifier` (BERT: on the body's pooler, `bert.pooler.dense`; ELECTRA: HF's
`ElectraClassificationHead`, dense -> GELU -> out_proj, which is ours), `id2label` from finetune.json; the
MLM/NSP heads and ELECTRA's generator stay behind; the `text-classification` pipeline loads it.

A BERT export loads with `AutoModelForMaskedLM` (BertForMaskedLM; the pooler and NSP head are then
unused), `AutoModelForPreTraining` and the `fill-mask` pipeline. `import_encoder(hf_dir, out)` is the
reverse for local BERT directories (BertForPreTraining, BertForMaskedLM or bare BertModel checkpoints) and
ELECTRA discriminators (ElectraForPreTraining or bare ElectraModel, e.g. google/electra-small-discriminator).

Design decisions
- Our encoder is HF BERT's post-LN layout with exact-erf GELU (see models/bert.py), so the map is
  one name per tensor except the fused attention input: our rows [q; k; v] are split into
  attention.self.query/key/value (and concatenated on import). The MLM output matrix is the token
  embedding in both (tied); HF's `cls.predictions.decoder.bias` is tied to `cls.predictions.bias`,
  so only the latter is stored.
- ELECTRA: only the discriminator leaves (`ElectraForPreTraining`, the model people fine-tune). HF's
  `embedding_size` is our `model.d_embed` (0 = d_model, as lmforge pretrains): when it is narrower than
  `hidden_size` (ELECTRA-small: 128 vs 256) HF's `electra.embeddings_project` is our
  `discriminator.in_proj`; the discriminator head is dense -> GELU -> dense_prediction in both.
  The generator is a training device and is not exported (the model card says so); an imported
  discriminator has none, so its run gets a freshly initialised one (fine-tuning drops it), unless the
  generator trained with it (ElectraForMaskedLM, e.g. google/electra-small-generator) is given as well
  (`import --generator`): ELECTRA trains one embedding table for both, which lmforge holds once, so its
  embeddings must be the discriminator's (checked exactly), and its shape the discriminator's scaled by one
  `generator_ratio` (width, heads, MLP; same depth), as Google's are. A generator directory alone is
  refused: the discriminator is what ELECTRA fine-tunes.
- Special tokens: an lmforge encoder appends the [PAD]/[CLS]/[SEP]/[MASK] ids its tokenizer lacks
  after the vocabulary (`data/masking.special_ids`); the export adds exactly those tokens to
  tokenizer.json as special added tokens (appended in the same order, so they get the same ids) and
  a post-processor that frames inputs as our MLM loader does: [CLS] text [SEP]. Tokens the tokenizer
  already has (<|cls|>, <s>, ...) keep their names. Ordinary text encodes to our ids in between.
- Import keeps nothing it cannot place: unknown tensors are an error. A missing pooler/NSP head
  (BertForMaskedLM checkpoints) or MLM head (BertModel checkpoints) is initialised as in pretraining,
  with a warning; a missing embedding or encoder tensor is an error.
- Same atomic output discipline as export/hf.py (a hidden build folder, then rename), the same helpers.

Reference: https://github.com/huggingface/transformers/blob/main/src/transformers/models/bert/modeling_bert.py ,
.../models/electra/modeling_electra.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.atomic import atomic_write_text, building_dir, fsync_file, save_safetensors, write_json
from lmforge.checkpoint import read_json
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.export.hf import (
    CARD_PATH_NOTE,
    FRAMING,
    HF_HINT,
    _last_eval,
    _own,
    _val_loss_text,
    card_language_header,
    card_path,
    data_language,
    framed_tokenizer_json,
    loaded_by_transformers,
    training_progress,
)
from lmforge.export.hf_families import _dtype_name
from lmforge.export.hf_import import read_hf_tensors, read_hf_tokenizer, source_dtype, write_imported_run
from lmforge.models.bert import Bert, BertConfig, Electra
from lmforge.tokenizer.tokenizer import Tokenizer

ENCODER_FAMILIES = ("bert", "electra")
SPECIAL_KEYS = ("pad", "cls", "sep", "mask")
DEFAULT_NAMES = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}

# our names under `{stack}.{i}.` -> HF names under `{prefix}encoder.layer.{i}.`
LAYER = {
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "norm1.weight": "attention.output.LayerNorm.weight",
    "norm1.bias": "attention.output.LayerNorm.bias",
    "fc.weight": "intermediate.dense.weight",
    "fc.bias": "intermediate.dense.bias",
    "proj.weight": "output.dense.weight",
    "proj.bias": "output.dense.bias",
    "norm2.weight": "output.LayerNorm.weight",
    "norm2.bias": "output.LayerNorm.bias",
}
PARTS = ("weight", "bias")
QKV = ("attention.self.query", "attention.self.key", "attention.self.value")  # our fused rows, in order
EMBED = {
    "embed.tok_emb.weight": "embeddings.word_embeddings.weight",
    "embed.pos_emb.weight": "embeddings.position_embeddings.weight",
    "embed.seg_emb.weight": "embeddings.token_type_embeddings.weight",
    "embed.norm.weight": "embeddings.LayerNorm.weight",
    "embed.norm.bias": "embeddings.LayerNorm.bias",
}
BERT_HEADS = {
    "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_head.bias": "cls.predictions.bias",
    "pooler.weight": "bert.pooler.dense.weight",
    "pooler.bias": "bert.pooler.dense.bias",
    "nsp_head.weight": "cls.seq_relationship.weight",
    "nsp_head.bias": "cls.seq_relationship.bias",
}
ELECTRA_HEADS = {
    "disc_dense.weight": "discriminator_predictions.dense.weight",
    "disc_dense.bias": "discriminator_predictions.dense.bias",
    "disc_head.weight": "discriminator_predictions.dense_prediction.weight",
    "disc_head.bias": "discriminator_predictions.dense_prediction.bias",
}
GENERATOR_HEADS = {  # our gen_head -> ElectraForMaskedLM's (its decoder weight is tied to the word embeddings)
    "gen_head.dense.weight": "generator_predictions.dense.weight",
    "gen_head.dense.bias": "generator_predictions.dense.bias",
    "gen_head.norm.weight": "generator_predictions.LayerNorm.weight",
    "gen_head.norm.bias": "generator_predictions.LayerNorm.bias",
    "gen_head.bias": "generator_lm_head.bias",
}
ELECTRA_NOT_EXPORTED = ("generator.", "gen_head.")  # the generator is a pretraining device only
# a fine-tuned classifier (`adapt.heads.Adapted` on an encoder): its `head.*` -> *ForSequenceClassification's
# names. BERT's head reads the body's pooler (kept, as `bert.pooler.dense`); its MLM and NSP heads stay behind.
CLASSIFIER_HEADS = {
    "bert": {"weight": "classifier.weight", "bias": "classifier.bias"},
    "electra": {f"{layer}.{part}": f"classifier.{layer}.{part}" for layer in ("dense", "out_proj") for part in PARTS},
}
BERT_PRETRAINING_HEADS = ("mlm_head.", "nsp_head.")
# HF tensors that are tied copies or buffers, never weights of their own
IGNORED = tuple(
    f"{model}.embeddings.{buffer}" for model in ENCODER_FAMILIES for buffer in ("position_ids", "token_type_ids")
)
IGNORED += ("cls.predictions.decoder.bias",)
# absent from BertForMaskedLM / BertModel (bert) and ElectraModel (electra) checkpoints
OPTIONAL_HEADS = {"bert": ("pooler.", "nsp_head.", "mlm_head."), "electra": ("disc_dense.", "disc_head.")}


def name_table(cfg: BertConfig) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> HF name(s) (several = our tensor is their concatenation along dim 0)."""
    electra = cfg.family == "electra"
    prefix, stack = ("electra.", "discriminator.layers") if electra else ("bert.", "encoder.layers")
    table = {ours: (prefix + hf,) for ours, hf in EMBED.items()}
    if electra and cfg.embed_dim != cfg.d_model:  # HF ELECTRA's embeddings_project (embedding_size -> hidden_size)
        table.update({f"discriminator.in_proj.{part}": (f"electra.embeddings_project.{part}",) for part in PARTS})
    table.update(_layers_table(stack, prefix, cfg.n_layer))
    table.update({ours: (hf,) for ours, hf in (ELECTRA_HEADS if electra else BERT_HEADS).items()})
    return table


def _layers_table(stack: str, prefix: str, n_layer: int) -> dict[str, tuple[str, ...]]:
    """Our `{stack}.{i}.*` encoder layer names -> HF's `{prefix}encoder.layer.{i}.*`."""
    table: dict[str, tuple[str, ...]] = {}
    for i in range(n_layer):
        ours_prefix, hf_prefix = f"{stack}.{i}.", f"{prefix}encoder.layer.{i}."
        table.update({ours_prefix + ours: (hf_prefix + hf,) for ours, hf in LAYER.items()})
        for part in PARTS:
            table[f"{ours_prefix}attn.qkv.{part}"] = tuple(f"{hf_prefix}{n}.{part}" for n in QKV)
    return table


def generator_table(cfg: BertConfig) -> dict[str, tuple[str, ...]]:
    """An ELECTRA generator's names (ours -> HF `ElectraForMaskedLM`'s), the shared embeddings left out: our
    `generator.*` is its `electra.encoder.*` (and `electra.embeddings_project` when the embeddings are narrower),
    our `gen_head` its `generator_predictions` (dense -> GELU -> LayerNorm) and `generator_lm_head.bias`."""
    gen = cfg.generator
    table = _layers_table("generator.layers", "electra.", gen.n_layer)
    if cfg.embed_dim != gen.d_model:
        table.update({f"generator.in_proj.{part}": (f"electra.embeddings_project.{part}",) for part in PARTS})
    table.update({ours: (hf,) for ours, hf in GENERATOR_HEADS.items()})
    return table


def to_hf_state_dict(state: dict[str, Tensor], cfg: BertConfig) -> dict[str, Tensor]:
    """Our encoder state dict -> HF tensors (q/k/v split; the ELECTRA generator left out)."""
    table = name_table(cfg)
    out: dict[str, Tensor] = {}
    for ours, t in state.items():
        if cfg.family == "electra" and ours.startswith(ELECTRA_NOT_EXPORTED):
            continue
        if ours not in table:
            raise LmforgeError(f"parameter {ours!r} has no HF {cfg.family} name; this model cannot be exported")
        names = table[ours]
        parts = t.chunk(len(names), dim=0) if len(names) > 1 else (t,)
        out.update({name: _own(part) for name, part in zip(names, parts, strict=True)})
    return out


def classifier_to_hf(model: Any, cfg: BertConfig) -> dict[str, Tensor]:
    """A fine-tuned encoder classifier (LoRA merged) -> HF `*ForSequenceClassification` tensors."""
    body = {k: v for k, v in model.body.state_dict().items() if not k.startswith(BERT_PRETRAINING_HEADS)}
    tensors = to_hf_state_dict(body, cfg)
    heads = CLASSIFIER_HEADS[cfg.family]
    tensors.update({heads[name]: _own(t) for name, t in model.head.state_dict().items()})
    return tensors


def config_to_hf(cfg: BertConfig, pad_id: int, dtype: torch.dtype) -> dict[str, Any]:
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.ff_dim,
        "hidden_act": "gelu",  # exact erf GELU, as our encoder computes it
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.n_segments,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": pad_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
    }
    if cfg.family == "electra":
        electra = {"architectures": ["ElectraForPreTraining"], "model_type": "electra", "embedding_size": cfg.embed_dim}
        return electra | common
    return {"architectures": ["BertForPreTraining"], "model_type": "bert"} | common


# --------------------------------------------------------------------------------------------
# Tokenizer: ours + the encoder's special tokens, framed as [CLS] text [SEP]


def special_names(tokenizer: Tokenizer) -> dict[str, tuple[str, int]]:
    """key -> (token string, id) of [PAD]/[CLS]/[SEP]/[MASK] as the encoder was trained with them."""
    from lmforge.data.masking import special_ids

    ids = special_ids(tokenizer)
    names: dict[str, tuple[str, int]] = {}
    for key, token_id in zip(SPECIAL_KEYS, ids.all, strict=True):
        known = tokenizer.id_to_token(token_id) if token_id < tokenizer.vocab_size else None
        names[key] = (known or DEFAULT_NAMES[key], token_id)
    return names


def encoder_tokenizer_json(tokenizer: Tokenizer) -> tuple[str, dict[str, str]]:
    """tokenizer.json text for an encoder export, and the special-token map (cls_token: "[CLS]", ...)."""
    import tokenizers
    from tokenizers import AddedToken, processors

    names = special_names(tokenizer)
    hf = tokenizers.Tokenizer.from_str(tokenizer.to_str())  # a fresh copy: parses special tokens in text
    # existing names become special added tokens with their ids; missing ones are appended in
    # special_ids' order, so they get exactly the ids the model was trained with (checked below)
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in names.values()])
    for name, token_id in names.values():
        if hf.token_to_id(name) != token_id:
            raise LmforgeError(
                f"the tokenizer gives {name!r} id {hf.token_to_id(name)}, but the model was trained with {token_id}; "
                "this run's tokenizer.json was changed after training"
            )
    (cls, cls_id), (sep, sep_id) = names["cls"], names["sep"]
    template = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)],
    )
    specials = {f"{key}_token": name for key, (name, _) in names.items()}
    unk = next((t for t in ("[UNK]", "<unk>", "<|unk|>") if hf.token_to_id(t) is not None), None)
    if unk is not None:
        specials["unk_token"] = unk
    # (an earlier framing, e.g. a re-export of an imported BERT's, gives way to [CLS] text [SEP])
    return framed_tokenizer_json(hf, template), specials


# --------------------------------------------------------------------------------------------
# Export


def classifier_info(trained: Any) -> dict[str, Any] | None:
    """A fine-tuned classifier's finetune.json (`labels` in head order, `base_arg`, `adapt`), None for other runs."""
    if getattr(trained.model, "head", None) is None:
        return None
    from lmforge.adapt.load import run_dir_of
    from lmforge.checkpoint import read_json

    return read_json(run_dir_of(trained.checkpoint.path) / "finetune.json", "the fine-tuned run is damaged")


def write_bert(trained: Any, out: Path) -> Path:
    """Write a loaded BERT/ELECTRA run (`trained.Trained`) as an HF directory at `out` (atomically):
    `*ForPreTraining`, or `*ForSequenceClassification` for a fine-tuned classifier."""
    cfg: BertConfig = trained.config.model
    tokenizer: Tokenizer = trained.tokenizer
    info = classifier_info(trained)
    labels = [str(label) for label in info["labels"]] if info else None
    body = trained.model.body if labels else trained.model
    dtype = body.embed.tok_emb.weight.dtype
    tensors = classifier_to_hf(trained.model, cfg) if labels else to_hf_state_dict(body.state_dict(), cfg)
    tokenizer_json, specials = encoder_tokenizer_json(tokenizer)
    pad_id = special_names(tokenizer)["pad"][1]
    hf_config = config_to_hf(cfg, pad_id, dtype)
    if labels:
        hf_config["architectures"] = [f"{cfg.family.capitalize()}ForSequenceClassification"]
        hf_config["id2label"] = dict(enumerate(labels))
        hf_config["label2id"] = {label: i for i, label in enumerate(labels)}

    with building_dir(out) as tmp:
        write_json(tmp / "config.json", hf_config)
        save_safetensors(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        fsync_file(tmp / "model.safetensors")
        atomic_write_text(tmp / "tokenizer.json", tokenizer_json)
        write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **specials,
                "model_max_length": cfg.max_seq_len,
                "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
                "clean_up_tokenization_spaces": False,
            },
        )
        write_json(tmp / "special_tokens_map.json", specials)
        n_params = sum(t.numel() for t in tensors.values())
        atomic_write_text(tmp / "README.md", model_card(out, trained, n_params, specials["mask_token"], info))
    return out


def vocabulary_row(vocab_size: int, tokenizer: Tokenizer) -> str:
    """The model card's vocabulary: the model's ids, the tokenizer's tokens and the ids they span, and where the
    [PAD]/[CLS]/[SEP]/[MASK] tokens are. It said "N in the tokenizer before specials" for every encoder, also an
    imported one whose tokenizer holds its specials (none appended), and counted tokens as if they were ids: a
    vocab.txt that lists a token twice leaves the first line's id unused, so 74 tokens span ids 0-75."""
    n_tokens = len(tokenizer.hf.get_vocab(with_added_tokens=True))
    n_ids = tokenizer.vocab_size
    spans = f" on ids 0-{n_ids - 1}" if n_ids != n_tokens else ""
    appended = [name for name, token_id in special_names(tokenizer).values() if token_id >= n_ids]
    where = f"{', '.join(appended)} appended after them" if appended else "[PAD]/[CLS]/[SEP]/[MASK] among them"
    return f"{vocab_size} ({n_tokens} tokens in the tokenizer{spans}, {where})"


def model_card(out: Path, trained: Any, n_params: int, mask: str, info: dict[str, Any] | None = None) -> str:
    """README.md of an encoder export (`info`: a fine-tuned classifier's finetune.json): what it is, how it was
    trained, how to use it, the config."""
    name, path = out.name, card_path(out)
    cfg = trained.config
    step, tokens = training_progress(trained.checkpoint.meta)
    last = _last_eval(trained.checkpoint.path, step)
    electra = cfg.model.family == "electra"
    labels = [str(label) for label in info["labels"]] if info else None
    architecture = f"{cfg.model.family.capitalize()}For{'SequenceClassification' if labels else 'PreTraining'}"
    trained_as = f"classify: {', '.join(labels)}" if labels else f"objective `{cfg.objective.name}`"
    rows = [
        ("architecture", f"{architecture} (lmforge {cfg.model.family}, {trained_as})"),
        ("parameters", f"{n_params:,}" + (" (discriminator; the generator is not exported)" if electra else "")),
        ("layers / width / heads", f"{cfg.model.n_layer} / {cfg.model.d_model} / {cfg.model.n_head}"),
        *(
            [("embedding width", f"{cfg.model.embed_dim} (`embedding_size`, projected to the width)")]
            if cfg.model.d_embed
            else []
        ),
        ("context", f"{cfg.model.max_seq_len} tokens ([CLS] and [SEP] included)"),
        ("vocabulary", vocabulary_row(cfg.model.vocab_size, trained.tokenizer)),
        ("training data", f"`{cfg.data.dir}`" if cfg.data.dir else "(none recorded: imported or untrained)"),
        *(
            [("fine-tuned from", f"`{info.get('base_arg') or info.get('base')}` (--adapt {info.get('adapt')})")]
            if info
            else []
        ),
        ("steps", f"{step:,}"),
        ("tokens seen", f"{tokens:,}"),
    ]
    if last is not None:
        numbers = {k: v for k, v in last.items() if k.startswith("val_") and isinstance(v, (int, float))}
        for key, value in numbers.items():
            text = _val_loss_text(trained.checkpoint.path, last) if key == "val_loss" else f"{value:.4f}"
            rows.append(
                (f"last validation {key.removeprefix('val_').replace('_', ' ')}", f"{text} (step {last['step']})")
            )
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    config_json = json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False)
    language = data_language(cfg.data.dir) if cfg.data.dir else ""
    zh = language == "zh"  # WordPiece/char Chinese is one token per character: mask one, replace one
    replaced = "我今天吃了一本书。" if zh else "The quick brown fox ate over the lazy dog."
    if labels:
        tag, pipeline = cfg.model.family, "pipeline_tag: text-classification\n"
        use = f"""```python
from transformers import pipeline

classify = pipeline("text-classification", model={path})
print(classify("{replaced}"))  # [{{'label': ..., 'score': ...}}], labels {", ".join(labels)}
```"""
    elif electra:
        tag, pipeline = "electra", ""
        use = f"""```python
import torch
from transformers import AutoTokenizer, ElectraForPreTraining

tokenizer = AutoTokenizer.from_pretrained({path})
model = ElectraForPreTraining.from_pretrained({path})
inputs = tokenizer("{replaced}", return_tensors="pt")
replaced = torch.sigmoid(model(**inputs).logits) > 0.5  # True where a token looks replaced
```"""
    else:
        tag, pipeline = "bert", "pipeline_tag: fill-mask\n"
        use = f"""```python
from transformers import pipeline

fill = pipeline("fill-mask", model={path})
print(fill("{f"中国的首都是北{mask}。" if zh else f"The capital of France is {mask}."}"))
```

`AutoModelForMaskedLM` gives the MLM head alone, `AutoModelForPreTraining` adds the NSP head;
fine-tune with `AutoModelForSequenceClassification` (a new head on the pooled [CLS] state)."""
    return f"""---
{card_language_header(language)}library_name: transformers
{pipeline}tags:
- lmforge
- {tag}
---

# {name}

A bidirectional encoder trained with lmforge and exported to the Hugging Face format
(`{architecture}`; loads with `transformers`, no lmforge needed). Inputs are framed as
`[CLS] text [SEP]` (pairs: `[CLS] A [SEP] B [SEP]`) by the tokenizer, as in training.

| | |
| --- | --- |
{table}

## Use

{use}

{CARD_PATH_NOTE.format(path=out.as_posix())}

Exported from `{trained.checkpoint.path}`.

## lmforge config

```json
{config_json}
```
"""


# --------------------------------------------------------------------------------------------
# Import


def config_from_hf(h: dict[str, Any], where: Path) -> BertConfig:
    """An HF BERT or ELECTRA config.json -> our BertConfig; settings we do not compute are one-line errors."""
    family = h["model_type"]
    defaults = {"hidden_act": "gelu", "position_embedding_type": "absolute", "type_vocab_size": 2}
    h = defaults | h
    if h["hidden_act"] != "gelu":
        raise LmforgeError(
            f"{where}: hidden_act {h['hidden_act']!r} is not supported; lmforge's {family.upper()} uses exact GELU"
        )
    if h["position_embedding_type"] != "absolute":
        raise LmforgeError(
            f"{where}: position_embedding_type {h['position_embedding_type']!r} is not supported; "
            f"lmforge's {family.upper()} has absolute learned positions"
        )
    if h.get("is_decoder") or h.get("add_cross_attention"):
        raise LmforgeError(f"{where}: a decoder {family.upper()} (is_decoder / add_cross_attention) cannot be imported")
    fields = dict(
        family=family,
        vocab_size=int(h["vocab_size"]),
        max_seq_len=int(h["max_position_embeddings"]),
        n_layer=int(h["num_hidden_layers"]),
        n_head=int(h["num_attention_heads"]),
        d_model=int(h["hidden_size"]),
        d_ff=int(h["intermediate_size"]),
        dropout=float(h.get("hidden_dropout_prob", 0.1)),
        norm_eps=float(h.get("layer_norm_eps", 1e-12)),
        n_segments=int(h["type_vocab_size"]),
        init_std=float(h.get("initializer_range", 0.02)),
    )
    if family == "bert":
        return BertConfig(**fields)
    # ElectraConfig's own default embedding_size is 128; d_embed 0 (= d_model) when they agree, as lmforge's runs
    d_embed = int(h.get("embedding_size", 128))
    fields["d_embed"] = 0 if d_embed == fields["d_model"] else d_embed
    # the directory holds no generator (a discriminator does not say how big its generator was): lmforge's
    # default 1/4 size, or the next ratio whose width divides into its heads; 1 always does
    for ratio in (0.25, 0.5):
        try:
            return BertConfig(**fields, generator_ratio=ratio)
        except ConfigError:
            pass
    return BertConfig(**fields, generator_ratio=1.0)  # an error here is the discriminator's own


# a bare BertModel / ElectraModel checkpoint's keys, unprefixed
BARE = {"bert": ("embeddings.", "encoder.", "pooler."), "electra": ("embeddings.", "embeddings_project.", "encoder.")}
# what the standard checkpoints hold besides the encoder, per family (anything else is a task head or unknown)
STANDARD = {
    "bert": ("bert.", "cls."),
    "electra": ("electra.", "discriminator_predictions."),
}
ARCHITECTURES = {
    "bert": "BertModel / BertForMaskedLM / BertForPreTraining",
    "electra": "ElectraModel / ElectraForPreTraining, the discriminator",
}


def _read_weights(hf_dir: Path, family: str) -> dict[str, Tensor]:
    """The directory's tensors under BertForPreTraining / ElectraForPreTraining names (bare BertModel /
    ElectraModel keys get `bert.` / `electra.`; others, such as a task head's `classifier.*`, keep the names
    the checkpoint has, so an error names them as stored)."""
    state, _ = read_hf_tensors(hf_dir)
    return {f"{family}.{k}" if k.startswith(BARE[family]) else k: v for k, v in state.items()}


def _without_framing(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer without a post-processor that adds [CLS]/[SEP] (`FRAMING`), the inverse of
    `encoder_tokenizer_json`: lmforge frames encoder input itself and never applies it, and with it the
    run's tokenizer would differ (fingerprint) from the one its data was prepared with, for the same ids."""
    data = json.loads(tokenizer.to_str())
    post = data.get("post_processor")
    steps = post["processors"] if post and post.get("type") == "Sequence" else [post] if post else []
    kept = [p for p in steps if p.get("type") not in FRAMING]
    if len(kept) == len(steps):
        return tokenizer
    data["post_processor"] = (
        None if not kept else kept[0] if len(kept) == 1 else {"type": "Sequence", "processors": kept}
    )
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def _take(hf_state: dict[str, Tensor], names: tuple[str, ...], like: Tensor, hf_dir: Path) -> Tensor:
    """Pop the HF tensors `names` (our tensor is their concatenation along dim 0) as float32 shaped like `like`."""
    parts = [hf_state.pop(n) for n in names]
    t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if t.shape != like.shape:
        raise CheckpointError(
            f"{hf_dir}: {names[0]} has shape {tuple(t.shape)}, config.json implies {tuple(like.shape)}"
        )
    return t.float()


def with_generator_of(cfg: BertConfig, gen_dir: Path) -> BertConfig:
    """`cfg` (an imported discriminator's) with the generator_ratio that gives lmforge's generator the shape of the
    HF ELECTRA generator in `gen_dir` (ElectraForMaskedLM); a generator lmforge cannot hold is a one-line error.

    lmforge's generator is the discriminator scaled by one ratio in width, heads and MLP, at the same depth, and
    reads the discriminator's embeddings (models/bert.py), as Google's generators are: electra-small's at 1,
    base's at 1/3 (256 of 768 wide, 4 of 12 heads, 1024 of 3072), large's at 1/4."""
    where = gen_dir / "config.json"
    h = read_json(where, "an HF ELECTRA generator directory holds config.json and model.safetensors")
    if not isinstance(h, dict) or h.get("model_type") != "electra":
        kind = h.get("model_type") if isinstance(h, dict) else None
        raise CheckpointError(f"{where}: model_type {kind!r} is not an ELECTRA generator (ElectraForMaskedLM)")
    try:
        gen = config_from_hf(h, where)
    except (TypeError, ValueError, KeyError, ConfigError) as e:
        raise CheckpointError(f"{where}: unusable electra config ({e})") from None
    shared = ("vocab_size", "max_seq_len", "n_segments", "embed_dim")
    theirs, ours = (tuple(getattr(c, k) for k in shared) for c in (gen, cfg))
    if theirs != ours:
        raise CheckpointError(
            f"{gen_dir}: the generator's embeddings (vocabulary, positions, segments, width: {theirs}) are not the "
            f"discriminator's {ours}; ELECTRA's generator reads the discriminator's embeddings, so pass the "
            "generator trained with this discriminator"
        )
    shape = ("n_layer", "n_head", "d_model", "ff_dim", "norm_eps")
    try:
        scaled = dataclasses.replace(cfg, generator_ratio=gen.d_model / cfg.d_model)
        fits = tuple(getattr(scaled.generator, k) for k in shape) == tuple(getattr(gen, k) for k in shape)
    except ConfigError:
        fits = False
    if not fits:
        have = ", ".join(f"{k} {getattr(gen, k)}" for k in shape)
        want = ", ".join(f"{k} {getattr(cfg, k)}" for k in shape)
        raise CheckpointError(
            f"{gen_dir}: a generator of {have} is not the discriminator ({want}) scaled by one ratio in width, heads "
            "and MLP at the same depth, which lmforge's ELECTRA generator is (model.generator_ratio); import without "
            "--generator to start a fresh one"
        )
    return scaled


def generator_state(gen_dir: Path, cfg: BertConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The `generator.*` and `gen_head.*` tensors of the HF ElectraForMaskedLM in `gen_dir` under our names, for a
    model of `cfg` (`with_generator_of`) whose discriminator tensors `state` holds: its embeddings must be those
    (ELECTRA trains one table for both; lmforge holds it once), its decoder tied to them."""
    hf_state = _read_weights(gen_dir, "electra")
    if "generator_predictions.dense.weight" not in hf_state:
        raise CheckpointError(
            f"{gen_dir} is not an ELECTRA generator (no generator_predictions.*); pass the ElectraForMaskedLM "
            "directory saved beside the discriminator (e.g. google/electra-small-generator)"
        )
    for ours, hf in EMBED.items():
        t = hf_state.pop(f"electra.{hf}", None)
        if t is None or t.shape != state[ours].shape or not torch.equal(t.float(), state[ours]):
            raise CheckpointError(
                f"{gen_dir}: the generator's electra.{hf} is not the discriminator's; ELECTRA's generator and "
                "discriminator share their embeddings (lmforge holds them once), so this generator was not trained "
                "with this discriminator: pass its own, or import without --generator"
            )
    decoder = hf_state.pop("generator_lm_head.weight", None)
    if decoder is not None and not torch.equal(decoder.float(), state["embed.tok_emb.weight"]):
        raise CheckpointError(f"{gen_dir}: generator_lm_head is not tied to the word embeddings, as ELECTRA's is")
    out: dict[str, Tensor] = {}
    for ours, names in generator_table(cfg).items():
        absent = [n for n in names if n not in hf_state]
        if absent:
            raise CheckpointError(f"{gen_dir} has no tensor {absent[0]!r}; is it a complete ELECTRA generator?")
        out[ours] = _take(hf_state, names, state[ours], gen_dir)
    extra = sorted(k for k in hf_state if k not in IGNORED)
    if extra:
        raise CheckpointError(
            f"{gen_dir} has tensors an ELECTRA generator (ElectraForMaskedLM) does not ({', '.join(extra[:3])})"
        )
    return out


def import_encoder(hf_dir: Path, hf_cfg: dict[str, Any], out: Path, generator: Path | None = None) -> Path:
    """Write a local HF BERT or ELECTRA (discriminator) directory as an lmforge run at `out` (model_type
    "bert" / "electra"; checks on `out` done by `import_hf`). `generator`: the ELECTRA generator directory
    (ElectraForMaskedLM) trained with the discriminator, imported too (else the run's starts freshly initialised)."""
    from lmforge.config import RunConfig
    from lmforge.data.masking import special_ids
    from lmforge.objective_config import ObjectiveConfig

    family = hf_cfg["model_type"]
    name = family.upper()
    article = "an" if family == "electra" else "a"
    where = hf_dir / "config.json"
    try:
        cfg = config_from_hf(hf_cfg, where)
    except (TypeError, ValueError, KeyError, ConfigError) as e:
        raise CheckpointError(f"{where}: unusable {family} config ({e})") from None
    if generator is not None:
        cfg = with_generator_of(cfg, generator)
    tokenizer, tok_path = read_hf_tokenizer(hf_dir)
    tokenizer = _without_framing(tokenizer)
    ids = special_ids(tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size or max(ids.all) >= cfg.vocab_size:
        raise CheckpointError(
            f"{tok_path} (with [PAD]/[CLS]/[SEP]/[MASK]) needs {max(tokenizer.vocab_size, max(ids.all) + 1)} ids "
            f"but the model has {cfg.vocab_size}; the tokenizer does not belong to this model"
        )
    hf_state = _read_weights(hf_dir, family)
    dtype = source_dtype(hf_state)
    if any(k.startswith(("generator_predictions.", "generator_lm_head.")) for k in hf_state):
        raise CheckpointError(
            f"{hf_dir} is an ELECTRA generator (ElectraForMaskedLM); lmforge imports the discriminator, the model "
            "ELECTRA fine-tunes: import its ElectraForPreTraining directory (e.g. google/electra-small-discriminator), "
            "with this one as --generator"
        )
    decoder = hf_state.pop("cls.predictions.decoder.weight", None)
    if decoder is not None and not torch.equal(decoder, hf_state.get("bert.embeddings.word_embeddings.weight")):
        raise CheckpointError(f"{hf_dir}: the MLM decoder is not tied to the word embeddings; lmforge's BERT ties them")

    with torch.device("meta"):
        model = (Electra if family == "electra" else Bert)(cfg)
    model = model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):  # heads the checkpoint lacks start as in pretraining, reproducibly
        torch.manual_seed(0)
        model.init_weights()
    state = model.state_dict()
    missing_heads = set()
    for ours, names in name_table(cfg).items():
        absent = [n for n in names if n not in hf_state]
        if absent and ours.startswith(OPTIONAL_HEADS[family]):
            missing_heads.add(ours.split(".", 1)[0])
            continue
        if absent:
            raise CheckpointError(f"{hf_dir} has no tensor {absent[0]!r}; is it a complete {name} checkpoint?")
        state[ours] = _take(hf_state, names, state[ours], hf_dir)
    extra = sorted(k for k in hf_state if k not in IGNORED)
    if extra and not any(k.startswith(STANDARD[family]) for k in extra):  # a task head beside the encoder
        architectures = hf_cfg.get("architectures") or ["a task model"]
        raise CheckpointError(
            f"{hf_dir} is {architectures[0]}: its task head ({', '.join(extra[:3])}) is not part of {article} {name} "
            f"that lmforge imports; save its encoder alone (transformers: model.{family}.save_pretrained(DIR), with "
            "the tokenizer) and import DIR, then 'lmforge finetune' a new head on it"
        )
    if extra:
        raise CheckpointError(
            f"{hf_dir} has tensors a plain {name} does not ({', '.join(extra[:3])}); lmforge imports only the "
            f"standard architecture ({ARCHITECTURES[family]})"
        )
    if family == "electra" and generator is not None:
        state.update(generator_state(generator, cfg, state))
    elif family == "electra":  # a discriminator directory never holds its generator
        missing_heads.add("generator")
    if missing_heads:
        print(  # one line, as lmforge's other notes (a UserWarning printed the file, line and source line too)
            f"note: {hf_dir} has no {', '.join(sorted(missing_heads))} weights; they start freshly initialised"
            + (" (fine-tuning uses the discriminator alone)" if family == "electra" else ""),
            file=sys.stderr,
            flush=True,
        )
    model.load_state_dict(state, strict=True)
    if family == "electra":
        objective = "electra"
    else:
        objective = "mlm+nsp" if "nsp_head" not in missing_heads and "pooler" not in missing_heads else "mlm"
    run_cfg = RunConfig(out=str(out), model=cfg, objective=ObjectiveConfig(name=objective))
    return write_imported_run(out, run_cfg, model.eval(), tokenizer, hf_dir, family, dtype)


# --------------------------------------------------------------------------------------------
# Verification with transformers


@torch.no_grad()
def verify_bert(trained: Any, hf_dir: str | Path, *, seed: int = 0) -> float:
    """Largest |difference| of MLM + NSP logits (bert), discriminator scores (electra) or a fine-tuned
    classifier's label scores from `transformers`."""
    try:
        import transformers
    except ImportError:
        raise LmforgeError(f"verifying an HF export needs transformers: {HF_HINT}") from None
    ours = trained.model.float().eval()
    cfg: BertConfig = ours.cfg
    classifier = getattr(ours, "head", None) is not None
    kind = "SequenceClassification" if classifier else "PreTraining"
    cls = getattr(transformers, f"{cfg.family.capitalize()}For{kind}")
    theirs = loaded_by_transformers(lambda: cls.from_pretrained(str(hf_dir)), hf_dir)
    T = min(32, cfg.max_seq_len)
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))  # (B, T)
    if classifier:  # the second row padded after half its tokens
        lengths = torch.tensor([T, max(1, T // 2)])
        pad_mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
        return float(
            (ours.classify(idx, lengths) - theirs(input_ids=idx, attention_mask=pad_mask.long()).logits).abs().max()
        )
    if cfg.family == "electra":
        return float((ours(idx) - theirs(input_ids=idx).logits).abs().max())
    hidden, ref = ours(idx), theirs(input_ids=idx)
    mlm = (ours.mlm_logits(hidden) - ref.prediction_logits).abs().max()
    return float(torch.maximum(mlm, (ours.nsp_logits(hidden) - ref.seq_relationship_logits).abs().max()))
