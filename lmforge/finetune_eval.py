"""Validation of fine-tuning runs: the loss (+ accuracy / reward accuracy) that `finetune` logs at each
evaluation, the DPO reference's log-probs it computes before training, and a finished run's val loss on its
own validation file.

- `val_metrics`: the training loop's `evaluate` callback over precomputed batches; {"loss", "bpb"} for LM
  tasks (`eval/lm.py`), {"loss", "accuracy"} for classify, {"loss", "reward_accuracy", "reward_margin"}
  for DPO (`adapt/objectives.py`'s loss, against the frozen reference).
- `reference_logprobs`: the frozen base's (chosen, rejected) log-probs stored in each DPO pair before
  training (`--dpo-reference precomputed`); `eval/tasks.py` scores DPO with them too.
- `task_val_metrics`: a fine-tuned run's val loss and bpb with its examples built as `finetune` built its
  --val examples; `lmforge quantize` compares a fine-tune before and after with it.

Split out of `finetune.py` (which runs the command) because `eval/tasks.py` and `compress/quantize.py` use
these too, and they change with the metrics, not with how a run is set up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.adapt.load import Finetuned

# ---------------------------------------------------------------------------------------------
# DPO reference


@torch.no_grad()
def reference_logprobs(model: nn.Module, pairs: list[dict[str, Any]], pad_id: int, device: torch.device) -> None:
    """Store the frozen reference's (chosen, rejected) log-probs in each pair as `ref` (before training)."""
    from lmforge.adapt.objectives import pair_logprobs
    from lmforge.data.formats import dpo_collate
    from lmforge.objectives import to_device

    was_training = model.training
    model.eval()
    collate = dpo_collate(pad_id)
    for start in range(0, len(pairs), 16):
        chunk = pairs[start : start + 16]
        for p in chunk:
            p.setdefault("ref", (0.0, 0.0))
        batch = to_device(collate(chunk), device)
        pc, pr = pair_logprobs(model, batch)
        for p, c, r in zip(chunk, pc.tolist(), pr.tolist(), strict=True):
            p["ref"] = (c, r)
    model.train(was_training)


# ---------------------------------------------------------------------------------------------
# evaluation during training (the loop's `evaluate` callback)


@torch.no_grad()
def val_metrics(
    model: nn.Module,
    task: str,
    batches: list[Any],
    *,
    beta: float,
    token_bytes: torch.Tensor,
    precision: Any,
    reference: nn.Module | None = None,
) -> dict[str, float]:
    """Validation loss (+ accuracy / reward accuracy) over precomputed batches: {"loss", "bpb"} for LM tasks,
    {"loss", "accuracy"} for classify, {"loss", "reward_accuracy", "reward_margin"} for DPO."""
    from lmforge.adapt.objectives import dpo_losses, pair_logprobs, reference_pair
    from lmforge.eval.lm import evaluate_lm
    from lmforge.objectives import to_device

    if task not in ("classify", "dpo"):
        return evaluate_lm(model, batches, token_bytes=token_bytes, precision=precision)
    was_training = model.training
    model.eval()
    total, correct, n, margin = 0.0, 0, 0, 0.0
    for batch in batches:
        batch = to_device(batch, precision.device)
        with precision.autocast():
            if task == "classify":
                ids, lengths, labels = batch
                logits = model.classify(ids, lengths).float()
                total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                n += int(labels.numel())
            else:
                pc, pr = pair_logprobs(model, batch)
                losses, rc, rr = dpo_losses(pc, pr, *reference_pair(batch, reference), beta)
                total += float(losses.sum())
                correct += int((rc > rr).sum())
                margin += float((rc - rr).sum())
                n += int(losses.numel())
    model.train(was_training)
    out = {"loss": total / max(n, 1)}  # no bits per byte: these losses are not over text
    if task == "classify":
        out["accuracy"] = correct / max(n, 1)
    else:
        out["reward_accuracy"] = correct / max(n, 1)
        out["reward_margin"] = margin / max(n, 1)
    return out


def task_val_metrics(ft: Finetuned, val_file: str | Path, *, max_batches: int = 0) -> dict[str, float]:
    """A fine-tuned LM's (`ft`, loaded on CPU) validation loss and bpb on `val_file`, with its examples built as
    `finetune` built its --val examples (the run's fields, max_len and chat template), so the whole file gives the
    val_loss / val_bpb its evaluations logged. `max_batches`: the first that many of the run's eval forward batches
    (0 = all). Used by `lmforge quantize` to compare a fine-tune before and after on its own validation data."""
    from lmforge.chat import ChatTemplate
    from lmforge.config import EvalConfig, TrainConfig, from_dict
    from lmforge.data.formats import build_examples, lm_batch
    from lmforge.data.tables import read_rows_or_standard
    from lmforge.eval.tasks import answer_context
    from lmforge.finetune_config import CHAT_TASKS
    from lmforge.train.precision import pick_precision

    info = ft.info or {}
    task = info["task"]
    rows, fields = read_rows_or_standard(val_file, task, info["fields"], scored=True)  # (as `finetune` read it)
    template = (ft.template or ChatTemplate()) if task in CHAT_TASKS else None
    kwargs = {"task": task, "tok": ft.tokenizer, "fields": fields, "max_len": info["max_len"], "labels": []}
    examples = build_examples(
        rows, path=val_file, template=template, context=answer_context(ft.model), run_max_len=True, **kwargs
    )
    train_cfg = from_dict(TrainConfig, info.get("train") or {}, prefix="train.", where=str(ft.run_dir))
    forward = from_dict(EvalConfig, info.get("eval") or {}, prefix="eval.", where=str(ft.run_dir)).forward_batch(
        train_cfg
    )
    if max_batches:
        examples = examples[: max_batches * forward]
    batches = [lm_batch(examples[i : i + forward], ft.tokenizer.eos_id) for i in range(0, len(examples), forward)]
    token_bytes = torch.as_tensor(ft.tokenizer.token_bytes(), dtype=torch.int64)
    precision = pick_precision(torch.device("cpu"), "float32")
    return val_metrics(ft.model, task, batches, beta=0.0, token_bytes=token_bytes, precision=precision)
