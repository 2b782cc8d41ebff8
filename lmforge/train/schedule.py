"""Learning-rate schedules as pure functions of the step.

`lr_at(step)` depends on nothing but its arguments, so a resumed run gets exactly the learning rate
a straight run would have had. Warmup is linear from 0 (step 0 gets lr/warmup, not 0, so the first
update is never wasted), then the chosen decay runs from `lr` to `final_lr` at `max_steps`.

"wsd" (warmup-stable-decay) holds `lr` after warmup and decays linearly to `final_lr` only over the
last `decay_fraction` of `max_steps`, so a long stable phase can be cut anywhere and cooled down.
"""

from __future__ import annotations

import math
from typing import Any

# The train settings that set every step's learning rate besides max_steps (min_lr: through `final_lr`)
LR_KEYS = ("warmup_steps", "lr", "min_lr", "schedule", "decay_fraction")


def lr_at(
    step: int,
    *,
    lr: float,
    final_lr: float,
    warmup_steps: int,
    max_steps: int,
    schedule: str,
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Args:
        step: the step about to be taken.
        lr: peak learning rate, reached at the end of warmup.
        final_lr: learning rate at `max_steps` for decaying schedules.
        warmup_steps: linear warmup length.
        max_steps: total steps of the run.
        schedule: "cosine", "linear", "constant" or "wsd".
        decay_fraction: for "wsd", the share of `max_steps` (at the end) spent decaying to `final_lr`.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_start = max(warmup_steps, max_steps - round(decay_fraction * max_steps))
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return lr + (final_lr - lr) * progress
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return lr + (final_lr - lr) * progress
    if schedule == "cosine":
        return final_lr + 0.5 * (lr - final_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def min_lr_note(*, lr: float, min_lr: float | None, schedule: str) -> str:
    """A note when `train.min_lr` is above `train.lr` (a preset's min_lr under a lowered --train.lr): the
    "decay" then raises the lr toward min_lr. Empty otherwise."""
    if schedule == "constant" or min_lr is None or min_lr <= lr:
        return ""
    return (
        f"note: train.min_lr {min_lr:g} is above train.lr {lr:g}, so the lr rises toward it while it should decay; "
        "lower --train.min_lr"
    )


def warmup_note(*, lr: float, warmup_steps: int, max_steps: int) -> str:
    """A note when warmup covers the whole run (`--train.max_steps 50` under the default 100 warmup steps):
    the lr never reaches `lr` nor decays, which nothing else in the log would show. Empty otherwise."""
    if warmup_steps < max_steps:
        return ""
    top = lr_at(max_steps - 1, lr=lr, final_lr=lr, warmup_steps=warmup_steps, max_steps=max_steps, schedule="constant")
    return (
        f"note: train.warmup_steps {warmup_steps} >= train.max_steps {max_steps}: the lr only warms up, to {top:.3g} "
        f"({top / lr:.0%} of train.lr) at the last step, and never decays; lower --train.warmup_steps"
    )


def schedule_change(old: Any, train: Any, step: int) -> str:
    """A note when a resume changes the learning-rate schedule (e.g. a longer train.max_steps): the lr at
    the next step then follows the new schedule, which can jump; "" when nothing changed.

    Args:
        old: the checkpoint's train settings, as `config.saved_train` reads them (a dict; anything else, e.g. None
            from an old checkpoint: no note).
        train: the resuming command's `TrainConfig`.
        step: the step the run resumes at.
    """
    if not isinstance(old, dict):
        return ""
    changed = [k for k in ("max_steps", *LR_KEYS) if k in old and old[k] != getattr(train, k)]
    if not changed:
        return ""
    t = train
    new_lr = lr_at(step, lr=t.lr, final_lr=t.final_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                   schedule=t.schedule, decay_fraction=t.decay_fraction)  # fmt: skip
    return (
        "note: the learning-rate schedule changed since the checkpoint ("
        + ", ".join(f"train.{k} {_shown(old[k])} -> {_shown(getattr(t, k))}" for k in changed)
        + f"); the lr follows the new one from step {step + 1} ({new_lr:.3g})"
    )


def _shown(value: Any) -> Any:
    return "unset (lr / 10)" if value is None else value  # (min_lr's default)
