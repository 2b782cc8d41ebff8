"""Exporting fine-tuned runs: LoRA merged into the weights (the default), or as a PEFT adapter directory.

`load_exportable(path)` is how `export_hf` loads any run: pretrained, imported, quantized, or
fine-tuned. An adapter-only LoRA run is rebuilt on its base and merged (`adapt/lora.py merge_lora`), so
the export is a plain GPT-2/Llama model. Classifiers come back whole (LoRA merged) for export/bert.py
(BERT/ELECTRA) or export/hf.py (a GPT's last-token head) to write as `*ForSequenceClassification`, whose head
is the one they trained. Soft prompts are refused: transformers has no class that computes them.

`export_peft(path, out)` keeps the adapter separate instead (`lmforge export RUN --to hf --peft`):

    out/
        adapter_config.json        PEFT LoraConfig: r, lora_alpha, lora_dropout, target_modules (HF names),
                                   fan_in_fan_out (GPT-2's Conv1D), base_model_name_or_path = OUT/base
        adapter_model.safetensors  base_model.model.<HF module>.lora_A.weight / .lora_B.weight
        tokenizer.json, tokenizer_config.json, special_tokens_map.json   (the base's)
        README.md                  adapter card: base, task, rank, targets, training steps
        base/                      the base model as an HF directory (export_hf's layout)

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("out/base"), "out")

Design decisions
- Names come from export/hf_families.py's key maps, so adapters land on the modules the base weights went to.
  Our fused layers are split like their weights: on `qkv` (Llama: q/k/v_proj) and `mlp.fc` (gate/up),
  each HF module gets the same A (r x d_in) and its rows of B, which is the same update:
  [B_q; B_k; B_v] A x = [B_q A x; B_k A x; B_v A x]. GPT-2's fused c_attn keeps one adapter.
- GPT-2's Conv1D stores its weight (in, out); PEFT's adapters on it are still Linear(in, r) and
  Linear(r, out), i.e. our A and B unchanged, with `fan_in_fan_out: true` (used when PEFT merges).
- target_modules are name suffixes PEFT matches at a dot boundary ("attn.c_proj" hits attention's
  output projection, not "mlp.c_proj").
- The base is the model the adapter was trained on: the run's base with any earlier LoRA merged
  (LoRA-on-LoRA runs), exported next to the adapter. base_model_name_or_path is `OUT/base` with OUT as the
  user gave it (relative stays relative), as PEFT itself records the path its base was loaded from:
  `AutoPeftModelForCausalLM.from_pretrained(OUT)` opens that path from the working directory, so it works
  from where the export ran, also after the folder tree moved to another machine; an absolute path of the
  exporting machine did not. `PeftModel.from_pretrained(model, out)` ignores it and uses the model given.
- No `peft` import here: JSON and safetensors are written directly (tests load them with peft).

Reference: https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/config.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.atomic import atomic_write_text, save_safetensors, write_json
from lmforge.errors import LmforgeError


def load_exportable(path: str | Path) -> Any:
    """The model of any run or checkpoint as a `trained.Trained` on CPU; LoRA adapters merged
    (a checkpoint pruned mid-load by a training still running is re-resolved: `reading_latest`)."""
    from lmforge.checkpoint import reading_latest

    return reading_latest(path, _load_exportable)


def _load_exportable(ckpt_dir: Path) -> Any:
    from lmforge.adapt.lora import merge_lora
    from lmforge.checkpoint import load_checkpoint
    from lmforge.trained import Trained, load_trained

    if not (ckpt_dir.parent.parent / "finetune.json").is_file():
        return load_trained(ckpt_dir, torch.device("cpu"))
    ft = _load_lm(ckpt_dir, classifiers=True)
    merge_lora(ft.model)
    ckpt = load_checkpoint(ckpt_dir, verify=False)  # its folder and meta (load_finetuned checked its files)
    return Trained(model=ft.model, tokenizer=ft.tokenizer, config=ft.config, checkpoint=ckpt)


def _load_lm(ckpt_dir: Path, *, classifiers: bool = False) -> Any:
    """A fine-tuned language model; with `classifiers` a BERT/ELECTRA/GPT classifier too (merged exports write
    it as `*ForSequenceClassification`); anything else is a one-line error."""
    from lmforge.adapt.load import load_finetuned

    ft = load_finetuned(ckpt_dir, torch.device("cpu"))
    encoder = ft.config.model.family in ("bert", "electra")
    head = getattr(ft.model, "head", None) is not None
    if ft.model.__class__.__name__ != "GPT" and ft.info.get("adapt") == "prompt":
        # (a classifier's too: *ForSequenceClassification has no place for the soft prompt it reads first)
        use = "score it with eval --task classify" if head else "use it with generate, chat or serve"
        raise LmforgeError(
            f"{ft.run_dir} is a prompt-tuned {ft.info['task']} run (--adapt prompt): its soft prompt vectors have "
            f"no Hugging Face counterpart, so it does not export; {use}, or fine-tune with --adapt lora or full to "
            "export"
        )
    if classifiers and head:
        return ft
    if head:  # reached with --peft only: PEFT has no classifier adapter
        kind = f"{ft.config.model.family} encoder" if encoder else "decoder"
        raise LmforgeError(
            f"{ft.run_dir} is a {ft.info['task']} run (--adapt {ft.info['adapt']}) of a {kind}; export it without "
            "--peft (LoRA merged, as a *ForSequenceClassification)"
        )
    if ft.model.__class__.__name__ != "GPT":
        raise LmforgeError(
            f"{ft.run_dir} is a {ft.info['task']} run (--adapt {ft.info['adapt']}), not a language model; only "
            "language models export (fine-tune with --adapt full or lora on an LM task such as sft)"
        )
    return ft


def adapter_state_dict(model: nn.Module, family: str) -> tuple[dict[str, Tensor], list[str]]:
    """PEFT tensors (`base_model.model.<HF module>.lora_A.weight`, ...) and target_modules for `model`'s LoRA layers."""
    from lmforge.adapt.lora import LoRALinear
    from lmforge.export.hf import _own
    from lmforge.export.hf_families import FAMILIES, _name_table

    keys = FAMILIES[family].keys
    table = _name_table(keys, model.cfg)
    block_prefixes = tuple(keys.block_prefix.format(i=i) for i in range(model.cfg.n_layer))
    tensors: dict[str, Tensor] = {}
    targets: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        entry = table.get(name + ".weight")
        if entry is None:
            raise LmforgeError(f"LoRA layer {name!r} has no HF {family} module; export merged (without --peft)")
        parts = module.lora_B.split(entry.sizes, dim=0) if len(entry.hf) > 1 else (module.lora_B,)
        for hf_weight, lora_b in zip(entry.hf, parts, strict=True):
            hf_module = hf_weight.removesuffix(".weight")
            tensors[f"base_model.model.{hf_module}.lora_A.weight"] = _own(module.lora_A)  # (r, d_in)
            tensors[f"base_model.model.{hf_module}.lora_B.weight"] = _own(lora_b)  # (d_out part, r)
            prefix = next((p for p in block_prefixes if hf_module.startswith(p)), "")
            targets.add(hf_module.removeprefix(prefix))
    return tensors, sorted(targets)


def strip_lora(model: nn.Module) -> int:
    """Drop every LoRA update, restoring the plain base `nn.Linear`s (the inverse of injection)."""
    from lmforge.adapt.lora import LoRALinear, _set_module

    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            _set_module(model, name, plain)
            count += 1
    return count


def export_peft(path: str | Path, out: str | Path, *, overwrite: bool = False, dtype: str = "auto") -> Path:
    """Write an adapter-only LoRA run as a PEFT adapter directory with its base next to it (module docstring);
    `dtype` as `hf.export_hf`'s, for the base and the adapter alike.

    Raises:
        LmforgeError: not an unmerged LoRA language-model run, no HF twin for the architecture, `out` exists.
    """
    from lmforge.atomic import building_dir, check_not_inside, check_out_dir, fsync_file
    from lmforge.checkpoint import load_checkpoint, resolve_checkpoint
    from lmforge.export.hf import cast_weights, check_dtype, export_dtype, write_hf
    from lmforge.export.hf_families import hf_family
    from lmforge.trained import Trained

    out = Path(out)
    check_dtype(dtype)
    check_not_inside(out, Path(path))
    check_out_dir(out, overwrite=overwrite)
    ckpt_dir = resolve_checkpoint(path)
    check_not_inside(out, ckpt_dir)
    info_path = ckpt_dir.parent.parent / "finetune.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    if info.get("adapt") != "lora" or info.get("lora_merged"):
        if info.get("adapt") == "prompt":  # exports neither way: its own error (it was sent to export without --peft)
            _load_lm(ckpt_dir)
        raise LmforgeError(
            f"{path} is not an adapter-only LoRA run (finetune --adapt lora without --merge); export it without --peft"
        )
    ft = _load_lm(ckpt_dir)
    ckpt = load_checkpoint(ckpt_dir, verify=False)  # its folder and meta (load_finetuned checked its files)
    cast_weights(ft.model, export_dtype(ckpt, ft.model, dtype), "--dtype bfloat16 or float32")
    family = hf_family(ft.model.cfg)
    tensors, targets = adapter_state_dict(ft.model, family)
    lora = info["lora"]
    strip_lora(ft.model)  # what is left is the base the adapter was trained on

    with building_dir(out) as tmp:
        base = write_hf(
            Trained(model=ft.model, tokenizer=ft.tokenizer, config=ft.config, checkpoint=ckpt),
            tmp / "base",
            adapter_base=True,
        )
        write_json(
            tmp / "adapter_config.json",
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": str(out / "base"),  # as given: see the module docstring
                "r": lora["rank"],
                "lora_alpha": lora["alpha"],
                "lora_dropout": lora["dropout"],
                "target_modules": targets,
                "fan_in_fan_out": family == "gpt2",  # Conv1D weights are (in, out)
                "bias": "none",
                "use_rslora": False,
                "use_dora": False,
                "modules_to_save": None,
                "init_lora_weights": True,
                "inference_mode": True,
            },
        )
        save_safetensors(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        fsync_file(tmp / "adapter_model.safetensors")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            atomic_write_text(tmp / name, (base / name).read_text(encoding="utf-8"))
        atomic_write_text(tmp / "README.md", _adapter_card(out, info, targets, family, ckpt_dir))
    return out


def _adapter_card(out: Path, info: dict[str, Any], targets: list[str], family: str, ckpt_dir: Path) -> str:
    lora = info["lora"]
    from lmforge.export.hf import CARD_PATH_NOTE, card_path, training_progress
    from lmforge.export.hf_families import FAMILIES

    steps, tokens = training_progress(json.loads((ckpt_dir / "state.json").read_text(encoding="utf-8")))
    rows = [
        ("base", f"`base/` ({FAMILIES[family].architecture}), from `{info.get('base')}`"),
        ("task", info.get("task", "")),
        ("rank / alpha / dropout", f"{lora['rank']} / {lora['alpha']} / {lora['dropout']}"),
        ("target modules", ", ".join(f"`{t}`" for t in targets)),
        ("steps", f"{steps:,}"),
        ("tokens seen", f"{tokens:,}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    name, path, base = out.name, card_path(out), card_path(out / "base")
    return f"""---
library_name: peft
base_model: ./base
tags:
- lmforge
- lora
---

# {name}

A LoRA adapter trained with `lmforge finetune --adapt lora`, exported for PEFT.

| | |
| --- | --- |
{table}

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({path})
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base}), {path})
model = model.merge_and_unload()  # optional: one plain model
```

{CARD_PATH_NOTE.format(path=out.as_posix())}

Exported from `{ckpt_dir}`.
"""
