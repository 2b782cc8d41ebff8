"""Fine-tuning objectives (the loop's `count(batch)` / `loss(model, batch)` protocol, summed losses).

Kept next to the adapters rather than in `lmforge/objectives.py` (the pretraining objectives) because
they need the task heads' interface (`model.classify`) and precomputed reference values; SFT,
translation, QA and continued pretraining are `objectives.CausalLM` on targets that are -100
outside the trained span, or `PackedCausalLM` when short examples are packed into one row.

- `Classification`: cross-entropy of `model.classify(ids, lengths)` against label ids.
- `DPO`: Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290), for a pair with policy log-probs
  (pc, pr) and frozen-reference log-probs (rc, rr) of the chosen / rejected completions:
      loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))
  By default the reference log-probs are computed once before training with the frozen base and
  carried in the batch ("precomputed reference log-probs"), so no second model sits in memory while
  training; `DPO(beta, reference=model)` (`--dpo-reference live`) instead runs a frozen copy of the
  base on every batch. Both give the same loss (tests/test_finetune_resume.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.objectives import IGNORE_INDEX


class PackedCausalLM:
    """Next-token loss on packed rows (inputs, targets, positions, segments): several examples per row,
    each attending only to itself (`heads.packed_logits`)."""

    def count(self, batch: tuple[Tensor, ...]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        from lmforge.adapt.heads import packed_logits
        from lmforge.objectives import causal_lm_loss

        x, y, positions, segments = batch
        return causal_lm_loss(packed_logits(model, x, positions, segments), y)


class Classification:
    """Batches (ids (B, T), lengths (B,), labels (B,)); one target per example."""

    def count(self, batch: tuple[Tensor, Tensor, Tensor]) -> int:
        return int(batch[2].numel())

    def tokens(self, batch: tuple[Tensor, Tensor, Tensor]) -> int:  # the examples' tokens, padding left out
        return int(batch[1].sum())

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        ids, lengths, labels = batch
        return F.cross_entropy(model.classify(ids, lengths).float(), labels, reduction="sum")


def sequence_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of log p(target) over the valid targets of each row: (B, T, V), (B, T) -> (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    valid = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * valid).sum(dim=-1)


def dpo_losses(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO losses and implicit rewards beta * (policy - reference), each (B,)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def pair_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Policy log-probs of the chosen and rejected completions, in one forward pass over both."""
    B = batch["chosen_x"].shape[0]
    T = max(batch["chosen_x"].shape[1], batch["rejected_x"].shape[1])

    def pad(t: Tensor, value: int) -> Tensor:
        return F.pad(t, (0, T - t.shape[1]), value=value)

    x = torch.cat([pad(batch["chosen_x"], 0), pad(batch["rejected_x"], 0)])  # (2B, T)
    y = torch.cat([pad(batch["chosen_y"], IGNORE_INDEX), pad(batch["rejected_y"], IGNORE_INDEX)])
    logp = sequence_logprobs(model(x), y)  # (2B,)
    return logp[:B], logp[B:]


def reference_pair(batch: dict[str, Tensor], reference: nn.Module | None) -> tuple[Tensor, Tensor]:
    """Reference log-probs (chosen, rejected), each (B,): precomputed in the batch, or from a live frozen model."""
    if "ref_chosen" in batch:
        return batch["ref_chosen"], batch["ref_rejected"]
    if reference is None:
        raise ValueError("a DPO batch without precomputed reference log-probs needs a reference model")
    with torch.no_grad():
        return pair_logprobs(reference, batch)


class DPO:
    """Batches: dict with chosen_x/chosen_y/rejected_x/rejected_y (B, T) and, when precomputed,
    ref_chosen/ref_rejected (B,); otherwise `reference` (a frozen model in eval mode) scores them."""

    def __init__(self, beta: float, reference: nn.Module | None = None) -> None:
        self.beta = beta
        self.reference = reference

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["chosen_x"].shape[0])

    def tokens(self, batch: dict[str, Any]) -> int:  # chosen and rejected rows, padded to one length
        return 2 * int(batch["chosen_x"].shape[0]) * max(batch["chosen_x"].shape[1], batch["rejected_x"].shape[1])

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        pc, pr = pair_logprobs(model, batch)
        rc, rr = reference_pair(batch, self.reference)
        losses, _, _ = dpo_losses(pc, pr, rc, rr, self.beta)
        return losses.sum()
