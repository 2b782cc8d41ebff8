"""Batch iterators over token shards for causal language modelling.

`TokenLoader` (training): infinite, shuffled, resumable.

    shard tokens:  t0 t1 t2 ... t8 t9 ...           seq_len = 4, windows of seq_len + 1 = 5 tokens
    windows:       [t0..t4] [t4..t8] [t8..t12] ...   stride seq_len: a window's last token is the
                                                     next window's first, so every token is a target
    x = window[:-1], y = window[1:]

- All windows of all shards form one list; each epoch visits them in the order
  `np.random.default_rng([seed, epoch]).permutation(n_windows)`. Consecutive epochs form one
  endless *stream* of windows, so a batch that crosses an epoch boundary simply takes the rest of
  its windows from the next epoch's permutation (deterministic, no partial batches).
- Data parallelism: each step consumes `batch_size * world_size` consecutive windows of the stream
  and rank r takes windows r, r + W, r + 2W, ... of them. The global sequence of windows therefore
  depends only on the global batch, not on how it is split over ranks.
- State is one number, the global stream position (stored as epoch + cursor within the epoch),
  so `state_dict()` / `load_state_dict()` resume exactly, even with another world size as long as
  the global batch is the same.
- Shards are memory-mapped (`read_shard`); only the windows of the current batch are copied and
  turned into torch tensors. The permutation of the current epoch (8 bytes per window) is the only
  per-epoch memory: 10B tokens at seq_len 1024 is ~80 MB.

`eval_batches` (evaluation): the whole split exactly once, in order, no shuffling. Windows have
stride seq_len and the last window of a shard is padded (inputs with 0, targets with -100, the
`ignore_index` of cross-entropy), so every token except each shard's first is a target exactly once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import read_shard
from lmforge.errors import DataError

IGNORE_INDEX = -100
_STATE_VERSION = 1


class TokenLoader:
    """Infinite, resumable micro-batch iterator for causal LM training."""

    def __init__(
        self,
        shards: list[Path],
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ) -> None:
        """Index the windows of `shards`.

        Args:
            shards: token shard files (`DataDir.split_shards("train")`).
            seq_len: tokens per training sequence (windows hold seq_len + 1 tokens).
            batch_size: sequences per micro-batch on this rank.
            seed: shuffling seed; epoch e uses `default_rng([seed, e])`.
            rank: this process's data-parallel rank.
            world_size: number of data-parallel ranks.
            split: which split `shards` are, for the error when they are too short.

        Raises:
            DataError: no shards, or too few tokens for a single window.
        """
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len and batch_size must be > 0, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if not shards:
            raise DataError("no token shards for this split; run 'lmforge prepare' or add data to the split")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._tokens = [read_shard(p) for p in shards]
        counts = np.array([_n_windows(len(t), seq_len) for t in self._tokens], dtype=np.int64)
        if counts.sum() == 0:
            raise no_window_error([len(t) for t in self._tokens], seq_len, shards, split)
        self._first_window = np.concatenate([[0], np.cumsum(counts)])  # window id -> shard via searchsorted
        self._position = 0  # windows of the global stream consumed by all ranks together
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def windows_per_epoch(self) -> int:
        """Windows in one pass over the data (all ranks together)."""
        return int(self._first_window[-1])

    @property
    def epoch(self) -> int:
        """Epoch of the next window to be read."""
        return self._position // self.windows_per_epoch

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next micro-batch: x, y int64 of shape (batch_size, seq_len), y[:, i] = x[:, i + 1]."""
        B, T = self.batch_size, self.seq_len
        step_windows = B * self.world_size
        positions = self._position + self.rank + self.world_size * np.arange(B)
        batch = np.empty((B, T + 1), dtype=np.int64)
        for row, position in enumerate(positions):
            shard, start = self._window(int(position))
            batch[row] = self._tokens[shard][start : start + T + 1]
        self._position += step_windows
        batch_t = torch.from_numpy(batch)
        return batch_t[:, :-1].contiguous(), batch_t[:, 1:].contiguous()  # (B, T), (B, T)

    def _window(self, position: int) -> tuple[int, int]:
        """(shard index, start token) of the window at `position` of the stream."""
        epoch, index = divmod(position, self.windows_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows_per_epoch)
            self._perm_epoch = epoch
        window = int(self._perm[index])
        shard = int(np.searchsorted(self._first_window, window, side="right")) - 1
        return shard, (window - int(self._first_window[shard])) * self.seq_len

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream, plus what it is only valid for."""
        epoch, cursor = divmod(self._position, self.windows_per_epoch)
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "cursor": cursor,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "windows_per_epoch": self.windows_per_epoch,
            "global_batch_windows": self.batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that produced `state` stopped.

        Raises:
            DataError: the state belongs to other data, another seq_len or another seed.
        """
        for key, mine in (
            ("seq_len", self.seq_len),
            ("seed", self.seed),
            ("windows_per_epoch", self.windows_per_epoch),
        ):
            if state.get(key) != mine:
                what = "data" if key == "windows_per_epoch" else key
                raise DataError(
                    f"cannot resume the data loader: it was saved with {key}={state.get(key)}, now {mine}; "
                    f"resume with the same {what} as the original run"
                )
        self._position = int(state["epoch"]) * self.windows_per_epoch + int(state["cursor"])


class IdCheckedLoader:
    """Any training loader (`TokenLoader`, curriculum, mixture, MLM), with every batch's token ids checked
    against the vocabulary before the model sees them: a damaged shard (or one encoded with another
    tokenizer) is then a one-line `DataError`, not an embedding IndexError mid-run (or, on CUDA, a
    device-side assert). The check is one max over a CPU micro-batch; everything else is the loader's.
    """

    def __init__(self, loader: Any, vocab_size: int, data_dir: str | Path) -> None:
        self._loader = loader
        self._vocab_size = vocab_size
        self._data_dir = data_dir

    def __iter__(self) -> IdCheckedLoader:
        return self

    def __next__(self) -> Any:
        batch = next(self._loader)
        ids = batch if isinstance(batch, tuple) else (batch["input_ids"],) if "input_ids" in batch else ()
        top = max((int(t.max()) for t in ids if t.numel()), default=0)
        if top >= self._vocab_size:
            raise DataError(
                f"the training data in {self._data_dir} holds token id {top}, beyond the model's {self._vocab_size} "
                "ids: a shard is damaged or was encoded with another tokenizer; prepare the data again"
            )
        return batch

    def __getattr__(self, name: str) -> Any:  # state_dict, load_state_dict, windows_per_epoch, ...
        return getattr(self._loader, name)


def no_window_error(lengths: list[int], seq_len: int, shards: list[Path], split: str) -> DataError:
    """The error for shards of `lengths` tokens none of which holds a window of seq_len + 1 tokens (a window
    never crosses a shard): too little text, or shards cut small by `prepare --shard-tokens`."""
    total, longest = sum(lengths), max(lengths, default=0)
    if total >= seq_len + 1:  # enough tokens overall, but spread over small shards
        return DataError(
            f"no shard of the {split} split of {Path(shards[0]).parent} has seq_len+1 = {seq_len + 1} tokens (a "
            f"window never crosses a shard; the longest has {longest:,}, cut by 'lmforge prepare --shard-tokens'); "
            f"pass --data.seq_len {longest - 1} or lower, or prepare again with a --shard-tokens far above "
            f"{seq_len + 1} (default 50M)"
        )
    shorter = f"pass --data.seq_len {total - 1} or lower, or " if total > 1 else ""
    return DataError(
        f"the {split} split of {Path(shards[0]).parent} has {total} tokens, fewer than the "
        f"seq_len+1 = {seq_len + 1} one training sequence needs; {shorter}prepare more text"
    )


def _n_windows(n_tokens: int, seq_len: int) -> int:
    """Full windows of seq_len + 1 tokens at stride seq_len in a shard of n_tokens."""
    return max(0, (n_tokens - 1) // seq_len)


def eval_batches(
    shards: list[Path], *, seq_len: int, batch_size: int, max_sequences: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic batches covering the whole split once (or its first `max_sequences`), in order.

    Args:
        shards: token shard files (`DataDir.split_shards("val")`).
        seq_len: tokens per sequence.
        batch_size: sequences per batch (the last batch may be smaller).
        max_sequences: stop after this many sequences (`EvalConfig.sequences`); 0 = the whole split.

    Yields:
        x, y int64 of shape (b, seq_len): padded inputs are 0, padded targets are -100.
    """
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be > 0, got {seq_len} and {batch_size}")

    def windows() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for path in shards:
            tokens = read_shard(path)
            for start in range(0, len(tokens) - 1, seq_len):
                chunk = np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64)
                x = np.zeros(seq_len, dtype=np.int64)
                y = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
                x[: len(chunk) - 1] = chunk[:-1]
                y[: len(chunk) - 1] = chunk[1:]
                yield x, y

    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for x, y in itertools.islice(windows(), max_sequences or None):
        xs.append(x)
        ys.append(y)
        if len(xs) == batch_size:
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
            xs, ys = [], []
    if xs:
        yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
