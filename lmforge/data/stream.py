"""`StreamLoader`: contiguous batches for truncated backpropagation through time (LSTM/GRU).

`TokenLoader` shuffles windows, so consecutive batches are unrelated and a recurrent state carried
from one batch to the next would be meaningless. Here the token stream (all shards, in order) is cut
into `batch_size * world_size` equal rows, the classic "batchify" of Zaremba et al. 2014 and the
PyTorch word-language-model example; batch k holds the k-th seq_len chunk of each row:

    stream:  |------ row 0 ------|------ row 1 ------|------ row 2 ------| ...
    batch k: row r -> x = stream[r*L + k*T : r*L + k*T + T], y = the same shifted by one

so row r of batch k + 1 continues row r of batch k exactly. After the last full chunk the rows
start again from their beginnings (a new epoch); no shuffling, by design. State is one number (the
batch position), so resume is exact. Rank r of W takes rows [r*B, (r+1)*B).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import read_shard
from lmforge.errors import DataError

_STATE_VERSION = 1


class StreamLoader:
    """Infinite, resumable, contiguous-per-row micro-batch iterator (see the module docstring)."""

    def __init__(
        self, shards: list[Path], *, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len and batch_size must be > 0, got {seq_len} and {batch_size}")
        if not shards:
            raise DataError("no token shards for this split; run 'lmforge prepare' or add data to the split")
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self._tokens = [read_shard(p) for p in shards]
        self._offsets = np.concatenate([[0], np.cumsum([len(t) for t in self._tokens])])
        rows = batch_size * world_size
        self.row_len = (int(self._offsets[-1]) - 1) // rows
        self.chunks_per_epoch = self.row_len // seq_len
        if self.chunks_per_epoch == 0:
            raise DataError(
                f"{int(self._offsets[-1])} tokens are too few for {rows} rows of seq_len {seq_len}; "
                "lower --train.batch_size or --data.seq_len, or add data"
            )
        self._position = 0

    @property
    def windows_per_epoch(self) -> int:
        """Sequences in one pass over the data (all ranks together)."""
        return self.chunks_per_epoch * self.batch_size * self.world_size

    def __iter__(self) -> StreamLoader:
        return self

    def _read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the concatenated stream from `start` (may span shards)."""
        out, pos = [], start
        while length > 0:
            shard = int(np.searchsorted(self._offsets, pos, side="right")) - 1
            local = pos - int(self._offsets[shard])
            piece = np.asarray(self._tokens[shard][local : local + length], dtype=np.int64)
            out.append(piece)
            pos, length = pos + len(piece), length - len(piece)
        return np.concatenate(out)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next micro-batch: x, y int64 (batch_size, seq_len); row r continues row r of the previous one."""
        B, T = self.batch_size, self.seq_len
        chunk = self._position % self.chunks_per_epoch
        batch = np.stack(
            [self._read(row * self.row_len + chunk * T, T + 1) for row in range(self.rank * B, (self.rank + 1) * B)]
        )
        self._position += 1
        batch_t = torch.from_numpy(batch)
        return batch_t[:, :-1].contiguous(), batch_t[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "position": self._position,
            "seq_len": self.seq_len,
            "rows": self.batch_size * self.world_size,
            "row_len": self.row_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (
            ("seq_len", self.seq_len),
            ("rows", self.batch_size * self.world_size),
            ("row_len", self.row_len),
        ):
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the data loader: it was saved with {key}={state.get(key)}, now {mine}; "
                    "resume with the same data, seq_len and batch size as the original run"
                )
        self._position = int(state["position"])
