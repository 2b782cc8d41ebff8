"""Evaluation of encoder objectives: MLM accuracy/perplexity, NSP/SOP accuracy, ELECTRA accuracy/AUC.

Keys (as `lmforge eval --json` prints them):
- `mlm_accuracy`: share of the selected (masked) positions whose argmax is the original token
- `mlm_ppl`: exp(mean cross-entropy over the selected positions), the MLM "perplexity" of RoBERTa's
  tables (of the generator, for ELECTRA)
- `nsp_accuracy`: sentence-pair (NSP or SOP) classification accuracy
- `rtd_accuracy`, `rtd_auc`: the ELECTRA discriminator's per-token accuracy (threshold 0) and
  ROC AUC over every real token, replaced = positive
- `loss`: MLM mean (+ NSP mean) for BERT; generator MLM mean + rtd_weight * RTD mean for ELECTRA,
  the quantity training minimizes, which early stopping and best-checkpoint selection use
Masks (and ELECTRA's generator samples, from a fixed local generator) are the same at every
evaluation, so numbers are comparable across steps and runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.objectives import IGNORE_INDEX, electra_corrupt
from lmforge.train.precision import Precision


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties); nan when one class is absent."""
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]  # average rank within ties
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def evaluate_encoder(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    precision: Precision,
    electra: bool = False,
    rtd_weight: float = 50.0,
    seed: int = 0,
) -> dict[str, float]:
    """Evaluate a `Bert` (MLM, NSP/SOP) or `Electra` model over batches from `data.masking`.

    Returns:
        {"loss", "mlm_accuracy", "mlm_ppl", "tokens"} plus "nsp_accuracy" (pair batches) or
        "rtd_accuracy", "rtd_auc" (ELECTRA).
    """
    was_training = model.training
    model.eval()
    device = precision.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    mlm_nats, n_mlm, mlm_correct = 0.0, 0, 0
    pair_nats, pair_correct, n_pairs = 0.0, 0, 0
    rtd_nats, rtd_correct, n_rtd = 0.0, 0, 0
    rtd_scores: list[np.ndarray] = []
    rtd_labels: list[np.ndarray] = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        with precision.autocast():
            if electra:
                corrupted, replaced, _ = electra_corrupt(model, batch, generator=generator)
                hidden = model.generator_hidden(batch["input_ids"], batch["segments"], batch["pad_mask"])
                disc = model(corrupted, batch["segments"], batch["pad_mask"])
            else:
                hidden = model(batch["input_ids"], batch["segments"], batch["pad_mask"])
            logits = model.mlm_logits(hidden[selected]).float()
        target = labels[selected]
        mlm_nats += float(F.cross_entropy(logits, target, reduction="sum"))
        mlm_correct += int((logits.argmax(-1) == target).sum())
        n_mlm += int(selected.sum())
        if electra:
            real = batch["pad_mask"]
            s, y = disc.float()[real], replaced[real]
            rtd_nats += float(F.binary_cross_entropy_with_logits(s, y, reduction="sum"))
            rtd_correct += int(((s > 0).float() == y).sum())
            n_rtd += int(real.sum())
            rtd_scores.append(s.cpu().numpy())
            rtd_labels.append(y.cpu().numpy())
        elif "pair_labels" in batch:
            with precision.autocast():
                pair_logits = model.nsp_logits(hidden).float()
            pair_nats += float(F.cross_entropy(pair_logits, batch["pair_labels"], reduction="sum"))
            pair_correct += int((pair_logits.argmax(-1) == batch["pair_labels"]).sum())
            n_pairs += len(batch["pair_labels"])
    model.train(was_training)
    mlm_mean = mlm_nats / n_mlm if n_mlm else float("nan")
    out: dict[str, float] = {
        "loss": mlm_mean,
        "mlm_accuracy": mlm_correct / n_mlm if n_mlm else float("nan"),
        "mlm_ppl": math.exp(min(mlm_mean, 700.0)),
        "tokens": n_mlm,
    }
    if electra:
        out["loss"] = mlm_mean + rtd_weight * (rtd_nats / max(n_rtd, 1))
        out["rtd_accuracy"] = rtd_correct / n_rtd if n_rtd else float("nan")
        out["rtd_auc"] = roc_auc(np.concatenate(rtd_scores), np.concatenate(rtd_labels)) if rtd_scores else float("nan")
    elif n_pairs:
        out["loss"] = mlm_mean + pair_nats / n_pairs
        out["nsp_accuracy"] = pair_correct / n_pairs
    return out
