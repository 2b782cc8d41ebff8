"""The torch-free part of `dist.py`: the `--dist.*` settings, torchrun's rank environment, and the ring
all-reduce byte counts `lmforge estimate` plans with. `config.py`, the CLI's parser and `estimate` read these
without loading torch (`lmforge --help` and a flag's error answer in well under a second)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

from lmforge.errors import ConfigError
from lmforge.fields import check, opt


@dataclass(kw_only=True)
class DistConfig:
    strategy: Literal["ddp", "fsdp", "diloco"] = opt(
        "ddp", "data parallelism under torchrun: ddp (replicas), fsdp (FSDP2) or diloco (local SGD, rare syncs)"
    )
    sync_every: int = opt(50, "diloco: inner optimizer steps each worker takes alone between outer syncs (H)")
    outer_lr: float = opt(0.7, "diloco: learning rate of the outer Nesterov SGD on the averaged parameter change")
    outer_momentum: float = opt(0.9, "diloco: momentum of the outer Nesterov SGD (0 = plain averaging at lr 1)")
    timeout_s: float = opt(600.0, "seconds a collective may wait for a peer before failing (hung or dead rank)")
    meta_init: bool = opt(
        False, "build the model on the meta device and allocate it after FSDP sharding (models larger than one rank)"
    )

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, f"dist.timeout_s must be > 0, got {self.timeout_s}")
        check(self.sync_every >= 1, f"dist.sync_every must be >= 1, got {self.sync_every}")
        check(self.outer_lr > 0, f"dist.outer_lr must be > 0, got {self.outer_lr}")
        check(0 <= self.outer_momentum < 1, f"dist.outer_momentum must be in [0, 1), got {self.outer_momentum}")

    def refuse_unused(self, names: set[str]) -> None:
        """A setting in `names` that `strategy` never reads is an error rather than silently ignored (`load_config`
        passes those the user wrote, and those off their defaults but for a run's config.json's)."""
        for name in sorted(names):
            readers = DIST_READERS.get(name, (self.strategy,))
            check(
                self.strategy in readers,
                f"dist.{name} is read only by --dist.strategy {' or '.join(readers)} (local SGD), not by "
                f"{self.strategy}; drop it, or pass --dist.strategy {readers[0]}",
            )


# The strategies that read each setting that not all of them read (`DiLoCo`; `meta_init` is read by all three and
# refused under ddp by train/run.py, in a run of several processes only).
DIST_READERS = dict.fromkeys(("sync_every", "outer_lr", "outer_momentum"), ("diloco",))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank, local rank and world size from torchrun's environment (1 process when absent)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("WORLD_SIZE/RANK/LOCAL_RANK must be integers; launch with torchrun") from None
    if world < 1 or not 0 <= rank < world or local < 0:  # (a hand-made launch: it waited dist.timeout_s, then
        raise ConfigError(  # said it could not connect to the others)
            f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}: each process needs a RANK from 0 to WORLD_SIZE-1 "
            "and a LOCAL_RANK of 0 or more; launch with torchrun, which sets them"
        )
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def local_world_size() -> int:
    """How many processes torchrun started on this machine (LOCAL_WORLD_SIZE; 1 when absent or unreadable)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def require_one_process(command: str) -> None:
    """Refuse a command that runs in one process when torchrun started several: each rank would do the whole
    job (two fine-tunes into one folder, eval printed twice, two writers of one export). Only `pretrain`
    spreads over ranks."""
    world = env_info().world_size
    if world > 1:
        raise ConfigError(
            f"{command} runs in one process, not under torchrun ({world} processes); "
            f"run it as 'lmforge {command} ...' (or torchrun --nproc-per-node 1)"
        )


def ring_all_reduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes each of `world_size` devices sends in a ring all-reduce of `nbytes` (reduce-scatter, then all-gather):
    2(n-1)/n x nbytes, and receives as many (NCCL's bus bandwidth; gloo's ring too). 0 on one device."""
    return math.ceil(2 * (world_size - 1) / world_size * nbytes)


def all_reduce_traffic(nbytes: int, world_size: int) -> int:
    """Bytes each device sends and receives in a ring all-reduce of `nbytes`: `comm_bytes` per all-reduce in
    `lmforge estimate` and the DiLoCo line a run prints."""
    return 2 * ring_all_reduce_bytes(nbytes, world_size)
