"""Knowledge distillation: train a (smaller) student on a frozen teacher's soft targets plus the data.

`lmforge finetune STUDENT --task clm --adapt distill --teacher TEACHER_RUN --train FILE` trains every
weight of the student through the one training loop (`train/loop.py`); only the objective differs:

    per target token t (targets != -100):
        soft_t = T^2 * KL( softmax(teacher_t / T) || softmax(student_t / T) )
        hard_t = cross_entropy(student_t, y_t)
        loss   = sum_t [ alpha * soft_t + (1 - alpha) * hard_t ]      (summed; the loop divides by #targets)

Design:
- Hinton et al. (2015), "Distilling the Knowledge in a Neural Network": soft targets at temperature T,
  scaled by T^2 so their gradients keep the same magnitude as T changes; alpha = 1 is pure
  distillation, alpha = 0 is plain fine-tuning on the data.
- The teacher runs under `torch.no_grad()` in eval mode (no dropout); it is never in the optimizer,
  never saved with the student, and its logits are computed in float32 for the KL.
- Teacher and student must share the tokenizer (same fingerprint): the soft targets are distributions
  over token ids, meaningless across vocabularies. Their architectures may differ freely.
- `loss()` reads nothing back to the host (no `.item()`/`float()`: a GPU sync per micro-batch) but the number
  of targets, once (`distill_loss`);
  `kl_to_teacher()` measures the mean per-token KL (at T = 1) over validation batches, so the log
  shows the student approaching the teacher.

Reference: https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.objectives import IGNORE_INDEX, count_targets, to_device


def distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, temperature: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """(summed total loss, summed soft term T^2 * KL) over the valid targets of a batch.

    Args:
        student_logits, teacher_logits: (B, T, V) and (B, T, V'). Models of one tokenizer may pad their
            output past it by different amounts (`--model.vocab_size 50304`, Qwen2's 151936 rows); the
            soft term compares the two distributions over the ids both have, the tokenizer's among them.
        targets: (B, T) token ids, IGNORE_INDEX where nothing is predicted.
        temperature: T > 0 softens both distributions.
        alpha: weight of the soft term; 1 - alpha weighs the data cross-entropy.
    """
    # The N predicted positions, found once: a boolean-mask index (`x[valid]`) finds them again on each use, a
    # GPU-to-host sync for each of the three (the count sets the shape). Selecting by the same rows copies the same
    # values, so the loss is bit-identical. The one sync left is that count: keeping all B*T rows and zeroing the
    # others is sync-free but changes the sums' rounding (float32 sums with zeros appended differed in 24 of 45
    # sizes tried on CPU), and so the numbers.
    rows = (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    s = student_logits.flatten(0, 1).index_select(0, rows).float()  # (N, V)
    t = teacher_logits.flatten(0, 1).index_select(0, rows).float()
    shared = min(s.size(-1), t.size(-1))
    log_p_student = F.log_softmax(s[:, :shared] / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t[:, :shared] / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()  # summed over tokens and vocab
    soft = temperature**2 * kl
    hard = F.cross_entropy(s, targets.flatten().index_select(0, rows), reduction="sum")
    return alpha * soft + (1.0 - alpha) * hard, soft


class Distill:
    """The loop's objective for distillation on (inputs, targets) batches (see the module docstring)."""

    def __init__(self, teacher: nn.Module, *, temperature: float, alpha: float) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def count(self, batch: tuple[Tensor, Tensor]) -> int:
        return count_targets(batch[1])

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        total, _ = distill_loss(model(x), teacher_logits, y, temperature=self.temperature, alpha=self.alpha)
        return total


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], device: torch.device) -> float:
    """Mean per-target KL(teacher || student) at temperature 1, in nats, over `batches` of (inputs, targets)."""
    was_training = student.training
    student.eval()
    total, n = 0.0, 0
    for batch in batches:
        x, y = to_device(batch, device)
        _, soft = distill_loss(student(x), teacher(x), y, temperature=1.0, alpha=1.0)
        total += float(soft)
        n += count_targets(y)
    student.train(was_training)
    return total / max(n, 1)
