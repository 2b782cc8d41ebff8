"""Evaluation of encoder objectives: MLM accuracy/perplexity, NSP/SOP accuracy, ELECTRA accuracy/AUC.

Keys (as `lmforge eval --json` prints them):
- `mlm_accuracy`: share of the selected (masked) positions whose argmax is the original token
- `mlm_ppl`: exp(mean cross-entropy over the selected positions), the MLM "perplexity" of RoBERTa's
  tables (of the generator, for ELECTRA)
- `nsp_accuracy`: sentence-pair (NSP or SOP) classification accuracy
- `rtd_accuracy`, `rtd_auc`: the ELECTRA discriminator's per-token accuracy (threshold 0) and
  ROC AUC over every real token, replaced = positive
- `loss`: MLM mean over the selected positions (+ NSP mean over the pairs) for BERT; generator MLM mean
  + rtd_weight * RTD mean over the real tokens for ELECTRA: the quantity training minimizes and logs as
  `loss` (objectives.py, the same definition), which early stopping and best-checkpoint selection use
Masks (and ELECTRA's generator samples, from the batches' fixed `sample_noise`) are the same at
every evaluation, so numbers are comparable across steps and runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.objectives import IGNORE_INDEX, electra_step
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
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Evaluate a `Bert` (MLM, NSP/SOP) or `Electra` model over batches from `data.masking`.

    Under torchrun (`world_size` > 1, every rank passing the same `batches`) each rank evaluates
    batches i with i % world_size == rank, padding its last round so all ranks run as many forwards
    (see `eval.lm.shard_batches`); the sums are all-reduced and ELECTRA's discriminator scores
    gathered for the AUC, so every rank returns the metrics of the whole split.

    Returns:
        {"loss", "mlm_accuracy", "mlm_ppl", "tokens"} plus "nsp_accuracy" (pair batches) or
        "rtd_accuracy", "rtd_auc" (ELECTRA).
    """
    from lmforge.eval.lm import shard_batches

    was_training = model.training
    model.eval()
    device = precision.device
    generator = torch.Generator(device=device)  # only for batches without sample_noise
    generator.manual_seed(seed)
    mlm_nats, n_mlm, mlm_correct = 0.0, 0, 0
    pair_nats, pair_correct, n_pairs = 0.0, 0, 0
    rtd_nats, rtd_correct, n_rtd = 0.0, 0, 0
    rtd_scores: list[np.ndarray] = []
    rtd_labels: list[np.ndarray] = []
    for batch, mine in shard_batches(batches, rank, world_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        pairs = "pair_labels" in batch
        with precision.autocast():  # the heads run inside forward (one forward: FSDP-safe)
            if electra:
                step, replaced, _ = electra_step(model, batch, generator=generator)
                logits = step.gen_logits.float()
            else:
                logits, pair_logits = model(
                    batch["input_ids"], batch["segments"], batch["pad_mask"], select=selected, pairs=pairs
                )
                logits = logits.float()
        if not mine:  # padding forward of the last round
            continue
        target = labels[selected]
        mlm_nats += float(F.cross_entropy(logits, target, reduction="sum"))
        n_mlm += int(selected.sum())
        mlm_correct += int((logits.argmax(-1) == target).sum())
        if electra:
            real = batch["pad_mask"]
            s, y = step.disc_logits.float()[real], replaced[real]
            rtd_nats += float(F.binary_cross_entropy_with_logits(s, y, reduction="sum"))
            rtd_correct += int(((s > 0).float() == y).sum())
            n_rtd += int(real.sum())
            rtd_scores.append(s.cpu().numpy())
            rtd_labels.append(y.cpu().numpy())
        elif pairs:
            pair_logits = pair_logits.float()
            pair_nats += float(F.cross_entropy(pair_logits, batch["pair_labels"], reduction="sum"))
            pair_correct += int((pair_logits.argmax(-1) == batch["pair_labels"]).sum())
            n_pairs += len(batch["pair_labels"])
    model.train(was_training)
    scores = np.concatenate(rtd_scores) if rtd_scores else np.zeros(0, dtype=np.float32)
    flags = np.concatenate(rtd_labels) if rtd_labels else np.zeros(0, dtype=np.float32)
    if world_size > 1:  # every rank: the sums and the AUC's scores of the whole split
        from lmforge import dist

        sums = [mlm_nats, n_mlm, mlm_correct, pair_nats, pair_correct, n_pairs, rtd_nats, rtd_correct, n_rtd]
        mlm_nats, n_mlm, mlm_correct, pair_nats, pair_correct, n_pairs, rtd_nats, rtd_correct, n_rtd = dist.all_reduce(
            sums, device
        )
        n_mlm, n_pairs, n_rtd = int(n_mlm), int(n_pairs), int(n_rtd)
        if electra:
            scores = dist.all_gather_1d(torch.as_tensor(scores, device=device)).cpu().numpy()
            flags = dist.all_gather_1d(torch.as_tensor(flags, device=device)).cpu().numpy()
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
        out["rtd_auc"] = roc_auc(scores, flags) if len(scores) else float("nan")
    elif n_pairs:
        out["loss"] = mlm_mean + pair_nats / n_pairs
        out["nsp_accuracy"] = pair_correct / n_pairs
    return out
