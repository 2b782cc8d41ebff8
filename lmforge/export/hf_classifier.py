"""Hugging Face export of fine-tuned decoder classifiers: GPT-2/Llama/Qwen2-style runs fine-tuned with
`finetune --task classify` (any of full/head/lora, LoRA merged) -> `GPT2/Llama/Qwen2ForSequenceClassification`.

`write_hf_classifier(trained, out)` (called by `export/hf.py`'s `export_hf` when the model has a head) writes:

    out/
        config.json               *ForSequenceClassification config, id2label/label2id from finetune.json,
                                  pad_token_id `classifier_pad_id` (never the end-of-text token)
        model.safetensors         the body under the family's HF names, our head as `score.weight`
        tokenizer.json            ours, framed as lmforge's rows are: `[prefix] text EOS` (TemplateProcessing)
        tokenizer_config.json     PreTrainedTokenizerFast, right padding
        special_tokens_map.json
        README.md                 model card with a `text-classification` pipeline example

`verify_classifier` loads such an export with `transformers` and reports the largest label-score difference.

Design decisions
- Both compute the same function: lmforge's head is a bias-free Linear on the last real token's final-normed
  state (adapt/heads.py), HF's `score` the same on the last token that is not padding, which is why the pad id
  must not be the EOS lmforge pools (`classifier_pad_id`).
- The key maps, tokenizer helpers, model-card helpers and atomic output are `export/hf.py`'s (the causal-LM
  export); this module holds only what differs for classifiers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import atomic_write_text, building_dir, fsync_file, save_safetensors, write_json
from lmforge.errors import LmforgeError
from lmforge.export.hf import (
    CARD_PATH_NOTE,
    CARD_PROMPTS,
    QWEN2_TOKENIZER_NOTE,
    _finetune_rows,
    _last_eval,
    _own,
    bos_id_of,
    card_language_header,
    card_path,
    data_language,
    framed_tokenizer_json,
    loaded_by_transformers,
    qwen2_tokenizer_differs,
    to_hf_state_dict,
    training_progress,
    unk_token_of,
)
from lmforge.export.hf_families import FAMILIES, hf_family
from lmforge.models.gpt import GPTConfig
from lmforge.tokenizer.tokenizer import Tokenizer

SEQUENCE_CLASSIFIERS = {
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
}
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")


def classifier_pad_id(tokenizer: Tokenizer, eos_id: int) -> int:
    """The pad id of a decoder classifier export: never its end-of-text token.

    lmforge classifies `text EOS` from the EOS's state (data/formats.py `classify_frame`); HF's
    *ForSequenceClassification pools the last token that is not config.pad_token_id. With EOS as the pad
    (lmforge's own padding) HF would skip the EOS and pool the token before it. Any other id finds it, for
    right and left padding alike: a tokenizer's own pad token, else its unknown token, else the lowest id."""
    for name in PAD_NAMES:
        token_id = tokenizer.hf.token_to_id(name)
        if token_id is not None and token_id != eos_id:
            return token_id
    unk = unk_token_of(tokenizer)
    if unk is not None and tokenizer.hf.token_to_id(unk) != eos_id:
        return tokenizer.hf.token_to_id(unk)
    return next(i for i in range(tokenizer.vocab_size) if i != eos_id and i not in tokenizer.prompt_prefix)


def write_hf_classifier(trained: Any, out: Path) -> Path:
    """Write a fine-tuned decoder classifier (`finetune --task classify` on a GPT-2/Llama/Qwen2-style base, any
    of full/head/lora, LoRA merged) as `GPT2/Llama/Qwen2ForSequenceClassification` at `out` (atomically).

    Both compute the same function: lmforge's head is a bias-free Linear on the last real token's final-normed
    state (adapt/heads.py), HF's `score` the same on the last token that is not padding. The tokenizer frames a
    text as lmforge's rows are, `[prefix] text EOS` (TemplateProcessing), and pads with `classifier_pad_id`."""
    from lmforge.export.bert import classifier_info

    model = trained.model
    cfg: GPTConfig = trained.config.model
    family = hf_family(cfg)
    info = classifier_info(trained)
    architecture = SEQUENCE_CLASSIFIERS[family]
    if model.head.bias is not None and bool(model.head.bias.detach().any()):
        raise LmforgeError(
            f"{trained.checkpoint.path} was fine-tuned when lmforge's decoder classification head had a bias, which "
            f"HF's {architecture} (a bias-free `score`) cannot hold; fine-tune it again to export it (heads are "
            "bias-free now)"
        )
    tokenizer: Tokenizer = trained.tokenizer
    eos_id = tokenizer.eos_id
    eos = tokenizer.id_to_token(eos_id)
    pad_id = classifier_pad_id(tokenizer, eos_id)
    labels = [str(label) for label in info["labels"]]
    body = {k: v for k, v in model.body.state_dict().items() if k != "lm_head.weight"}  # HF's classifier has none
    tensors = to_hf_state_dict(body, cfg, family)
    tensors["score.weight"] = _own(model.head.weight)  # (n_labels, C)
    dtype = model.body.tok_emb.weight.dtype
    prefix = list(tokenizer.prompt_prefix)
    hf_config = FAMILIES[family].config_to_hf(cfg, eos_id, dtype) | {
        "architectures": [architecture],
        "bos_token_id": bos_id_of(tokenizer, eos_id),
        "pad_token_id": pad_id,
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": "single_label_classification",
    }

    import tokenizers
    from tokenizers import processors

    hf = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    framing = [(tokenizer.id_to_token(i), i) for i in dict.fromkeys([*prefix, eos_id])]
    template = processors.TemplateProcessing(
        single=" ".join([*(tokenizer.id_to_token(i) for i in prefix), "$A", eos]), special_tokens=framing
    )
    specials = {"eos_token": eos, "pad_token": tokenizer.id_to_token(pad_id)}
    if prefix:
        specials["bos_token"] = tokenizer.id_to_token(prefix[0])
    if unk := unk_token_of(tokenizer):
        specials["unk_token"] = unk
    with building_dir(out) as tmp:
        write_json(tmp / "config.json", hf_config)
        save_safetensors(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        fsync_file(tmp / "model.safetensors")
        atomic_write_text(tmp / "tokenizer.json", framed_tokenizer_json(hf, template))
        write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **specials,
                "model_max_length": cfg.max_seq_len,
                # GPT-2's learned positions start at the first token: left padding would move them (HF counts
                # positions from the row's start), right padding is what lmforge trained with
                "padding_side": "right",
                "split_special_tokens": True,  # special-token strings in text stay text, as lmforge encodes them
                "clean_up_tokenization_spaces": False,
            },
        )
        write_json(tmp / "special_tokens_map.json", specials)
        n_params = sum(t.numel() for t in tensors.values())
        own_ids = family == "qwen2" and qwen2_tokenizer_differs(tokenizer.to_str())  # (AutoTokenizer's would differ)
        card = _classifier_card(out, trained, info, architecture, n_params, pad_id, own_tokenizer=own_ids)
        atomic_write_text(tmp / "README.md", card)
    if own_ids:
        print(QWEN2_TOKENIZER_NOTE.format(out=card_path(out)), file=sys.stderr, flush=True)
    return out


def _classifier_card(
    out: Path,
    trained: Any,
    info: dict[str, Any],
    architecture: str,
    n_params: int,
    pad_id: int,
    *,
    own_tokenizer: bool = False,
) -> str:
    """The classifier export's README.md (`own_tokenizer`: as `_model_card`'s)."""
    cfg = trained.config
    labels = [str(label) for label in info["labels"]]
    step, tokens = training_progress(trained.checkpoint.meta)
    last = _last_eval(trained.checkpoint.path, step)
    rows = [
        ("architecture", f"{architecture} (lmforge GPT, classify: {', '.join(labels)})"),
        ("parameters", f"{n_params:,}"),
        ("layers / width / heads", f"{cfg.model.n_layer} / {cfg.model.d_model} / {cfg.model.n_head}"),
        ("context", f"{cfg.model.max_seq_len} tokens (the end-of-text token after the text included)"),
        ("padding", f"`{trained.tokenizer.id_to_token(pad_id)}` (id {pad_id}), on the right"),
        *_finetune_rows(info),
        ("fine-tuning steps", f"{step:,}"),
        ("fine-tuning tokens", f"{tokens:,}"),
    ]
    if last is not None:
        numbers = {k: v for k, v in last.items() if k.startswith("val_") and isinstance(v, (int, float))}
        for key, value in numbers.items():
            rows.append((f"last validation {key.removeprefix('val_').replace('_', ' ')}", f"{value:.4f}"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    language = data_language(cfg.data.dir) if cfg.data.dir else ""
    path = card_path(out)
    load = f'from transformers import pipeline\n\nclassify = pipeline("text-classification", model={path})'
    if own_tokenizer:
        load = (
            "from transformers import PreTrainedTokenizerFast, pipeline\n\n"
            f"tokenizer = PreTrainedTokenizerFast.from_pretrained({path})\n"
            f'classify = pipeline("text-classification", model={path}, tokenizer=tokenizer)'
        )
    return f"""---
{card_language_header(language)}library_name: transformers
pipeline_tag: text-classification
tags:
- lmforge
- text-classification
---

# {out.name}

A decoder fine-tuned with lmforge to classify texts, exported to the Hugging Face format (`{architecture}`;
loads with `transformers`, no lmforge needed). It reads `text <end of text>` (the tokenizer adds the end-of-text
token) and scores the last token's state, as in training.

| | |
| --- | --- |
{table}

## Use

```python
{load}
print(classify("{CARD_PROMPTS[language or "en"]}"))  # [{{'label': ..., 'score': ...}}], labels {", ".join(labels)}
```

{CARD_PATH_NOTE.format(path=out.as_posix())}

Exported from `{trained.checkpoint.path}`.
"""


def verify_classifier(trained: Any, hf_dir: str | Path, *, seq_len: int, seed: int) -> float:
    """Largest |label score difference| of a decoder classifier and its `*ForSequenceClassification` export, on
    2 rows framed as lmforge's (random ids, then EOS), the second padded after half its tokens."""
    from transformers import AutoModelForSequenceClassification

    theirs = loaded_by_transformers(lambda: AutoModelForSequenceClassification.from_pretrained(str(hf_dir)), hf_dir)
    ours = trained.model.float().eval()
    T = min(seq_len, ours.cfg.max_seq_len)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, trained.tokenizer.vocab_size, (2, T), generator=generator)  # (B, T)
    lengths = torch.tensor([T, max(1, T // 2)])
    real = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    idx[torch.arange(2), lengths - 1] = trained.tokenizer.eos_id  # a row ends with EOS, as training's did
    idx[~real] = theirs.config.pad_token_id
    return float((ours.classify(idx, lengths) - theirs(input_ids=idx, attention_mask=real.long()).logits).abs().max())
