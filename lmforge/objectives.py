"""Training objectives as plain functions: model outputs + targets -> (summed loss, counted targets).

Losses are returned *summed* with the number of targets that counted, not averaged: the training
loop divides by the number of valid targets in the whole accumulation window (torchtitan's
"global valid tokens"), so gradient accumulation gives the same update as one big batch.
Targets equal to `IGNORE_INDEX` (-100) count for nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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
