"""`MixtureLoader`: one training stream from several prepared data directories, with weights.

    --data.mix "data/web=0.7,data/books=0.2,data/code=0.1"

Each global batch of `batch_size * world_size` sequences is filled slot by slot; slot i goes to the
source with the largest deficit `weight * (i + 1) - drawn` (ties: the first listed), a deterministic
"smooth weighted round robin". After n sequences every source has drawn within one sequence of
`weight * n`, so the mix is exact at every step, not only on average. Each source keeps its own
shuffled window stream (a `TokenLoader` with seed `seed + 1000003 * index`), so adding a source never
reorders another's data. Rank r keeps slots r, r + W, ... (as `TokenLoader` does).

State: the global slot position, the sequences drawn per source and every source's own loader
state, so `state_dict()` / `load_state_dict()` resume exactly; `achieved()` reports the mix drawn so
far (it is stored with every checkpoint's loader state).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import ConfigError, DataError

_STATE_VERSION = 1


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """`"a=0.7,b=0.3"` -> [("a", 0.7), ("b", 0.3)] with weights normalized to sum 1; a leading `~` is the home folder.

    Raises:
        ConfigError: a malformed entry, a weight that is not a positive number, or a repeated name.
    """
    entries: list[tuple[str, float]] = []
    for item in spec.split(","):
        name, sep, weight = item.strip().rpartition("=")
        if not sep or not name.strip():
            raise ConfigError(f"data.mix entry {item.strip()!r} must look like DATA_DIR=WEIGHT, e.g. data/web=0.7")
        try:
            value = float(weight)
        except ValueError:
            raise ConfigError(f"data.mix weight {weight!r} of {name!r} is not a number") from None
        if not 0 < value < math.inf:  # inf made every weight nan or 0: one source took every batch
            raise ConfigError(f"data.mix weight of {name!r} must be a finite number > 0, got {weight}")
        entries.append((os.path.expanduser(name.strip()), value))  # (`~/web=0.7`: as data.dir, config.py)
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.mix names a directory twice: {', '.join(names)}")
    total = sum(w for _, w in entries)
    return [(name, w / total) for name, w in entries]


class MixtureLoader:
    """Infinite, resumable micro-batch iterator over a weighted mixture of token-shard sets."""

    def __init__(
        self,
        sources: list[tuple[str, list[Path], float]],
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Args: sources as (name, train shards, weight summing to 1); the rest as for `TokenLoader`."""
        from lmforge.data.loader import TokenLoader

        if not sources:
            raise ConfigError("data.mix needs at least one DATA_DIR=WEIGHT entry")
        self.names = [name for name, _, _ in sources]
        self.weights = np.array([w for _, _, w in sources], dtype=np.float64)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        # source 0 uses the run seed itself: a one-source mix reads exactly what TokenLoader would
        self._loaders = [
            TokenLoader(shards, seq_len=seq_len, batch_size=1, seed=seed + 1_000_003 * i)
            for i, (_, shards, _) in enumerate(sources)
        ]
        self._drawn = np.zeros(len(sources), dtype=np.int64)
        self._position = 0

    @property
    def windows_per_epoch(self) -> int:
        """Windows in one pass over all sources (for the start-of-run log line)."""
        return sum(loader.windows_per_epoch for loader in self._loaders)

    def __iter__(self) -> MixtureLoader:
        return self

    def _choose(self) -> int:
        deficit = self.weights * (self._position + 1) - self._drawn
        return int(np.argmax(deficit))  # first maximum on ties

    def __next__(self) -> tuple[Any, Any]:
        """Next micro-batch: x, y int64 of shape (batch_size, seq_len)."""
        import torch

        xs, ys = [], []
        for slot in range(self.batch_size * self.world_size):
            source = self._choose()
            x, y = next(self._loaders[source])  # (1, T) each
            self._drawn[source] += 1
            self._position += 1
            if slot % self.world_size == self.rank:
                xs.append(x)
                ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def achieved(self) -> dict[str, float]:
        """Share of sequences drawn from each source so far (all ranks together)."""
        total = max(int(self._position), 1)
        return {name: round(int(n) / total, 6) for name, n in zip(self.names, self._drawn, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the mixture and of every source, plus the achieved mix."""
        return {
            "version": _STATE_VERSION,
            "kind": "mixture",
            "position": int(self._position),
            "weights": dict(zip(self.names, self.weights.tolist(), strict=True)),
            "drawn": dict(zip(self.names, self._drawn.tolist(), strict=True)),
            "achieved": self.achieved(),
            "sources": {name: loader.state_dict() for name, loader in zip(self.names, self._loaders, strict=True)},
            "seed": self.seed,
            "global_batch_windows": self.batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that produced `state` stopped.

        Raises:
            DataError: the state is not a mixture state, or has other sources, weights or seed.
        """
        if state.get("kind") != "mixture":
            raise DataError("cannot resume: the run was saved without --data.mix; resume with the original data flags")
        weights = dict(zip(self.names, self.weights.tolist(), strict=True))
        saved = state.get("weights", {})
        if list(saved) != self.names or any(abs(saved[n] - weights[n]) > 1e-12 for n in self.names):
            raise DataError(f"cannot resume: the run was saved with data.mix {saved}, now {weights}; use the same mix")
        if state.get("seed") != self.seed:
            raise DataError(f"cannot resume the data loader: saved with seed {state.get('seed')}, now {self.seed}")
        for name, loader in zip(self.names, self._loaders, strict=True):
            loader.load_state_dict(state["sources"][name])
        self._drawn = np.array([state["drawn"][n] for n in self.names], dtype=np.int64)
        self._position = int(state["position"])


def mixture_loader(
    spec: str, tokenizer_sha256: str, *, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> MixtureLoader:
    """Open the data directories of a `data.mix` spec and build the `MixtureLoader` over their train splits
    (errors: `mix_sources`)."""
    sources = mix_sources(spec, tokenizer_sha256)
    return MixtureLoader(sources, seq_len=seq_len, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)


def mix_sources(spec: str, tokenizer_sha256: str) -> list[tuple[str, list[Path], float]]:
    """(directory, train shards, weight) for each entry of a `data.mix` spec; cheap (manifests only), so
    `pretrain` checks the spec with it before the run folder is made.

    Raises:
        ConfigError: malformed spec. DataError: a directory is not prepared, has no train shards, or
            was tokenized with another tokenizer than the run's.
    """
    from lmforge.data.datadir import load_data_dir

    sources = []
    for name, weight in parse_mix(spec):
        data = load_data_dir(name)
        if data.manifest["tokenizer"]["sha256"] != tokenizer_sha256:
            raise DataError(
                f"data.mix: {name} was prepared with another tokenizer than --data; prepare it with "
                f"--tokenizer <data dir>/tokenizer.json"
            )
        shards = data.split_shards("train")
        if not shards:
            raise DataError(f"data.mix: {name} has no train shards; re-run 'lmforge prepare' with more text")
        sources.append((name, shards, weight))
    return sources
