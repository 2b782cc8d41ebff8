"""`CurriculumLoader`: easy training windows first, harder ones phased in over a schedule of steps.

    --data.curriculum doc_length --data.curriculum_steps 2000 --data.curriculum_start 0.1

Competence-based curriculum (Platanios et al. 2019, https://arxiv.org/abs/1903.09848):

    difficulty(window) = mean, over the window's tokens, of the length of the document each token is in
                         (its whole length, when `prepare` cut it at a shard's end)
    order              = windows sorted by difficulty (stable, so ties keep stream order)
    competence(step)   = min(1, sqrt(step * (1 - c0**2) / curriculum_steps + c0**2))      c0 = curriculum_start
    batch at step s    = windows order[i], i drawn uniformly from [0, competence(s) * n_windows)
                         with default_rng([seed, s]): accum_steps * W * micro draws; micro-batch m takes
                         draws [m * W * micro, (m + 1) * W * micro) and rank r of them keeps r, r + W, ...

The step s is the *optimizer* step, not the micro-batch: the loader is told how many micro-batches
(`accum_steps`) make one step, so gradient accumulation and the number of ranks (which sets the
micro-batch when train.micro_batch_size is 0) change neither the schedule nor the windows of a step,
only how they are split. Short documents (dialogue lines, headlines) are read first and long,
context-heavy documents are phased in; after `curriculum_steps` every window is eligible. The draw at
step s depends only on (seed, s), so the state is (step, micro-batches taken within it) and resume is
exact. Difficulty is computed once per shard with numpy from the EOS positions (an int32 per token
while indexing a shard).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.data.loader import no_window_error
from lmforge.data.shards import read_shard
from lmforge.errors import DataError

Curriculum = Literal["none", "doc_length"]
_STATE_VERSION = 2  # 1: 'step' counted micro-batches (read as such on resume)


def window_difficulty(tokens: np.ndarray, eos: int, seq_len: int, *, before: int = 0, after: int = 0) -> np.ndarray:
    """Mean document length (tokens) over each full window of `seq_len + 1` tokens at stride `seq_len`.

    `before`/`after`: tokens of the shard's first/last document that lie in the shards before/after it
    (`prepare` cuts a document at a shard's end and goes on in the next shard; `_seam_tokens`)."""
    n_windows = max(0, (len(tokens) - 1) // seq_len)
    if n_windows == 0:
        return np.zeros(0)
    ends = np.flatnonzero(np.asarray(tokens) == eos)
    if not len(ends) or ends[-1] != len(tokens) - 1:
        ends = np.append(ends, len(tokens) - 1)  # a trailing document without EOS (it goes on in the next shard)
    here = np.diff(np.concatenate([[-1], ends])).astype(np.int64)  # document tokens in this shard, EOS included
    lengths = here.copy()  # whole document lengths: a cut one counted only its piece here, so a long
    lengths[0] += before  # document's seam windows ranked as easy as a short one's
    lengths[-1] += after
    per_token = np.repeat(lengths.astype(np.int32), here)  # sum(here) == len(tokens)
    return per_token[: n_windows * seq_len].reshape(n_windows, seq_len).mean(axis=1)


def _seam_tokens(shards: list[np.ndarray], eos: int) -> list[tuple[int, int]]:
    """(before, after) of `window_difficulty` for each shard of a split, in order."""
    edges = []  # (tokens, first EOS, last EOS) of each shard; -1 when it has none
    for tokens in shards:
        ends = np.flatnonzero(np.asarray(tokens) == eos)
        edges.append((len(tokens), int(ends[0]) if len(ends) else -1, int(ends[-1]) if len(ends) else -1))
    before = [0] * len(shards)
    for k in range(1, len(shards)):
        n, _, last = edges[k - 1]
        before[k] = n - 1 - last if last >= 0 else before[k - 1] + n
    after = [0] * len(shards)
    for k in range(len(shards) - 2, -1, -1):
        n, _, last = edges[k]
        if last == n - 1:  # the shard ends with a document's EOS
            continue
        n_next, first_next, _ = edges[k + 1]
        after[k] = first_next + 1 if first_next >= 0 else n_next + after[k + 1]
    return list(zip(before, after, strict=True))


def competence(step: int, steps: int, start: float) -> float:
    """Share of the (easiest-first) windows eligible at `step`."""
    if steps <= 0:
        return 1.0
    return min(1.0, math.sqrt(step * (1 - start**2) / steps + start**2))


class CurriculumLoader:
    """Infinite, resumable micro-batch iterator that phases in harder windows (see the module docstring).

    `batch_size` is this rank's micro-batch; `accum_steps` micro-batches make one optimizer step, the
    unit of the competence schedule.
    """

    def __init__(
        self,
        shards: list[Path],
        *,
        eos: int,
        seq_len: int,
        batch_size: int,
        seed: int,
        steps: int,
        start: float = 0.1,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
    ) -> None:
        if not shards:
            raise DataError("no token shards for this split; run 'lmforge prepare' or add data to the split")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.steps, self.start, self.rank, self.world_size = steps, start, rank, world_size
        self.accum_steps = max(1, accum_steps)
        self._tokens = [read_shard(p) for p in shards]
        difficulty, where = [], []
        for index, (tokens, (before, after)) in enumerate(
            zip(self._tokens, _seam_tokens(self._tokens, eos), strict=True)
        ):
            d = window_difficulty(tokens, eos, seq_len, before=before, after=after)
            difficulty.append(d)
            where.append(np.stack([np.full(len(d), index), np.arange(len(d)) * seq_len], axis=1))
        if not sum(len(d) for d in difficulty):
            raise no_window_error([len(t) for t in self._tokens], seq_len, shards, "train")
        all_difficulty = np.concatenate(difficulty)
        self._order = np.concatenate(where)[np.argsort(all_difficulty, kind="stable")]  # (n_windows, 2)
        self.difficulty_range = (float(all_difficulty.min()), float(all_difficulty.max()))
        self._step = 0  # optimizer step
        self._micro = 0  # micro-batches of it already taken, < accum_steps

    @property
    def windows_per_epoch(self) -> int:
        return len(self._order)

    def __iter__(self) -> CurriculumLoader:
        return self

    def __next__(self) -> tuple[Any, Any]:
        """Next micro-batch: x, y int64 of shape (batch_size, seq_len)."""
        import torch

        n = len(self._order)
        eligible = max(1, min(n, math.ceil(competence(self._step, self.steps, self.start) * n)))
        per_micro = self.batch_size * self.world_size  # all ranks' rows of one micro-batch
        rng = np.random.default_rng([self.seed, self._step])
        draws = rng.integers(0, eligible, per_micro * self.accum_steps)[self._micro * per_micro :][:per_micro]
        T = self.seq_len
        batch = np.empty((self.batch_size, T + 1), dtype=np.int64)
        for row, index in enumerate(draws[self.rank :: self.world_size]):
            shard, start = self._order[index]
            batch[row] = self._tokens[shard][start : start + T + 1]
        self._micro += 1
        if self._micro == self.accum_steps:
            self._step, self._micro = self._step + 1, 0
        batch_t = torch.from_numpy(batch)
        return batch_t[:, :-1].contiguous(), batch_t[:, 1:].contiguous()  # (B, T), (B, T)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "kind": "curriculum",
            "step": self._step,
            "micro": self._micro,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "windows": len(self._order),
            "curriculum_steps": self.steps,
            "competence": competence(self._step, self.steps, self.start),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that produced `state` stopped.

        Raises:
            DataError: the state is not a curriculum state or belongs to other data/settings.
        """
        if state.get("kind") != "curriculum":
            raise DataError("cannot resume: the run was saved without --data.curriculum; use the original data flags")
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("windows", len(self._order)),
                          ("curriculum_steps", self.steps)):  # fmt: skip
            if state.get(key) != mine:
                raise DataError(f"cannot resume the curriculum: saved with {key}={state.get(key)}, now {mine}")
        if state.get("version", 1) == 1:  # counted micro-batches: resume at the optimizer step they make up
            self._step, self._micro = divmod(int(state["step"]), self.accum_steps)
        else:
            self._step, self._micro = int(state["step"]), int(state.get("micro", 0))
            if self._micro >= self.accum_steps:
                raise DataError(
                    f"cannot resume the curriculum mid-step: {self._micro} micro-batches of step {self._step} were "
                    f"taken, now {self.accum_steps} per step; resume with the original train.micro_batch_size"
                )
