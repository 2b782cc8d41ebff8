"""TrainState: everything about training progress that the next step depends on.

Together with the model, optimizer, torch RNG and the data loader's `state_dict()`, this is the
whole state of a run: the loop keeps nothing else, which is what makes resume bit-exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # target tokens trained on
    elapsed_s: float = 0.0  # training wall-clock summed over all sessions of this run
    best_val_loss: float | None = None  # the lowest validation loss so far (the "best" checkpoint's)
    best_step: int | None = None
    evals_since_best: int = 0  # early stopping: evaluations since one beat patience_ref by min_delta
    patience_ref: float | None = None  # the loss an evaluation must beat by early_stop_min_delta to count
    stop_reason: str = ""  # "", "max_steps", "time_budget", "early_stop", "interrupted"
    skipped_steps: int = 0  # optimizer steps skipped for non-finite gradients (or by the fp16 GradScaler)
    loss_ema: float | None = None  # running mean of logged train losses, for flagging loss spikes
    rollbacks: int = 0  # times the run went back to its latest checkpoint after repeated non-finite steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
