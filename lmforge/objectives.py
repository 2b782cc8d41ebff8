"""Training objectives: losses as plain functions, and the small `Objective` objects the loop calls.

Losses are returned *summed*, not averaged: the training loop first asks the objective how many
targets each micro-batch of the accumulation window holds (`count`), then divides every summed loss
by the window's total (torchtitan's "global valid tokens"), so gradient accumulation gives the same
update as one big batch. Targets equal to `IGNORE_INDEX` (-100) count for nothing.

An objective is anything with
    count(batch) -> int                      targets in this micro-batch (before any forward pass)
    loss(model, batch) -> scalar tensor      summed loss over those targets (runs the forward pass)
where `batch` is whatever the loader yields (a tuple or dict of tensors, already on the device).
Objectives that need more than (inputs, targets) (MLM masks, sentence pairs, a reference model)
are new classes here; the loop never changes.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class Objective(Protocol):
    def count(self, batch: Any) -> int: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...


class CausalLM:
    """Next-token prediction on (inputs, targets) batches: `causal_lm_loss(model(inputs), targets)`."""

    def count(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return count_targets(batch[1])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return causal_lm_loss(model(x), y)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy.

    Args:
        logits: (B, T, V) scores for the next token at each position.
        targets: (B, T) token ids, `IGNORE_INDEX` where there is no target.

    Returns:
        Scalar float32 tensor: the sum of the per-token losses over valid targets.
    """
    B, T, V = logits.shape
    return F.cross_entropy(
        logits.reshape(B * T, V).float(), targets.reshape(B * T), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_targets(targets: torch.Tensor) -> int:
    """Number of targets that contribute to the loss."""
    return int((targets != IGNORE_INDEX).sum())


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch (a tensor, or a tuple/list/dict of them) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
