"""`StreamLoader`: contiguous batches for truncated backpropagation through time (LSTM/GRU).

`TokenLoader` shuffles windows, so consecutive batches are unrelated and a recurrent state carried
from one batch to the next would be meaningless. Here the token stream (all shards, in order) is cut
into `batch_size * world_size` equal rows, the classic "batchify" of Zaremba et al. 2014 and the
PyTorch word-language-model example; batch k holds the k-th seq_len chunk of each row:

    stream:  |------ row 0 ------|------ row 1 ------|------ row 2 ------| ...
    batch k: row r -> x = stream[r*L + k*T : r*L + k*T + T], y = the same shifted by one

so row r of batch k + 1 continues row r of batch k exactly. After the last full chunk the rows
start again from their beginnings (a new epoch); no shuffling, by design. That is the one place where
a row does not continue its previous chunk, so each batch is (x, y, fresh): `fresh` (B,) bool marks the
rows whose chunk starts their stream (all of them at chunk 0, i.e. the first batch and every epoch wrap),
and `objectives.CarriedStateLM` starts those rows from a zero state. Without it the state after the end
of row r (its last chunk) flowed into row r's beginning, unrelated text, once per epoch. Shard and
document boundaries inside a row need no mark: the shards concatenate into one text, with an EOS after
every document, as a model reads it at generation. State is one number (the batch position), so resume
is exact. Rank r of W takes rows [r*B, (r+1)*B).

With gradient accumulation, B is the rank's whole share of the optimizer step (micro-batch x
`accum_steps`), and the k-th chunk of those rows is served as `accum_steps` micro-batches of
consecutive rows: micro-batch m of step k holds rows [m*b, (m+1)*b) of chunk k. So batch 32 as 4 x 8
trains the same 32 streams as batch 32 in one forward (`objectives.CarriedStateLM` carries each
micro-batch's rows' state). It used to cut the stream into micro-batch rows only, and the 4
micro-batches of a step were 4 consecutive chunks of 8 streams: another run than the big batch's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import read_shard
from lmforge.errors import DataError

# 2: position counts optimizer steps (chunks of all the rows); 1 counted micro-batches of micro-batch rows,
# which is the same thing only without accumulation
_STATE_VERSION = 2


class StreamLoader:
    """Infinite, resumable, contiguous-per-row micro-batch iterator (see the module docstring)."""

    def __init__(
        self,
        shards: list[Path],
        *,
        seq_len: int,
        batch_size: int,
        accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """`batch_size` is the micro-batch; each optimizer step reads `accum_steps` of them (one chunk of
        `batch_size * accum_steps` rows on this rank)."""
        if seq_len <= 0 or batch_size <= 0 or accum_steps <= 0:
            raise ValueError(
                f"seq_len, batch_size and accum_steps must be > 0, got {seq_len}, {batch_size} and {accum_steps}"
            )
        if not shards:
            raise DataError("no token shards for this split; run 'lmforge prepare' or add data to the split")
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.accum_steps = accum_steps
        self._tokens = [read_shard(p) for p in shards]
        self._offsets = np.concatenate([[0], np.cumsum([len(t) for t in self._tokens])])
        rows = self.rows
        self.row_len = (int(self._offsets[-1]) - 1) // rows
        self.chunks_per_epoch = self.row_len // seq_len
        if self.chunks_per_epoch == 0:
            raise DataError(
                f"{int(self._offsets[-1])} tokens are too few for {rows} rows of seq_len {seq_len}; "
                "lower --train.batch_size or --data.seq_len, or add data"
            )
        self._position = 0  # micro-batches read

    @property
    def rows(self) -> int:
        """Streams (rows) of one optimizer step, all ranks together."""
        return self.batch_size * self.accum_steps * self.world_size

    @property
    def windows_per_epoch(self) -> int:
        """Sequences in one pass over the data (all ranks together)."""
        return self.chunks_per_epoch * self.rows

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

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next micro-batch: x, y int64 (batch_size, seq_len) and fresh bool (batch_size,); row r continues
        row r of the same micro-batch of the previous step, unless fresh[r] (its stream starts over)."""
        B, T = self.batch_size, self.seq_len
        step, micro = divmod(self._position, self.accum_steps)
        chunk = step % self.chunks_per_epoch
        first = (self.rank * self.accum_steps + micro) * B
        batch = np.stack([self._read(row * self.row_len + chunk * T, T + 1) for row in range(first, first + B)])
        self._position += 1
        batch_t = torch.from_numpy(batch)
        fresh = torch.full((B,), chunk == 0)  # the first chunk of an epoch follows nothing of its row
        return batch_t[:, :-1].contiguous(), batch_t[:, 1:].contiguous(), fresh

    def state_dict(self) -> dict[str, Any]:
        step, micro = divmod(self._position, self.accum_steps)
        return {
            "version": _STATE_VERSION,
            "position": step,  # optimizer steps (the loop saves between steps, so micro is 0)
            "micro": micro,
            "seq_len": self.seq_len,
            "rows": self.rows,
            "row_len": self.row_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version", 1) == 1 and state.get("rows") != self.rows:
            # version 1 read micro-batch rows: with accumulation its streams are not this run's rows
            raise DataError(
                f"cannot resume the data loader: the checkpoint was written by an older lmforge that trained "
                f"{state.get('rows')} LSTM/GRU streams (the micro-batch) where train.batch_size asks for {self.rows}; "
                f"resume with --train.batch_size {state.get('rows')} --train.micro_batch_size {state.get('rows')} "
                "to go on with its streams, or start over with --overwrite"
            )
        for key, mine in (
            ("seq_len", self.seq_len),
            ("rows", self.rows),
            ("row_len", self.row_len),
        ):
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the data loader: it was saved with {key}={state.get(key)}, now {mine}; "
                    "resume with the same data, seq_len and batch size as the original run"
                )
        # (version 1 counted micro-batches of `rows` rows: the same as steps when the rows are the same)
        self._position = int(state["position"]) * self.accum_steps + int(state.get("micro", 0))
