"""Data parallelism on PyTorch's own distributed engine: torchrun env -> process group -> DDP or FSDP2.

Launch any `lmforge pretrain` command under torchrun and it runs data parallel:

    torchrun --nproc-per-node 2 -m lmforge pretrain --data D --out R --preset small
    torchrun --nproc-per-node 8 -m lmforge pretrain ... --dist.strategy fsdp

What stays the same whatever the world size (so results do not depend on it):
- `train.batch_size` is the *global* batch (sequences per optimizer step). Each rank runs
  micro-batches of `train.micro_batch_size` sequences (0 = batch_size / world_size) and accumulates
  batch_size / (micro_batch * world_size) of them. The loader (`TokenLoader(rank=, world_size=)`)
  gives every rank its own windows of one global stream, so the set of sequences in each step is
  the same as in a 1-process run.
- The loss is normalised by the target count of the whole global window (all-reduced), and DDP's
  gradient *average* is undone by scaling each rank's loss by world_size, so the update equals the
  1-process update to float tolerance.
- Stop decisions (signal, time budget) are all-reduced every step, so all ranks stop together.

Only rank 0 writes (logs, metrics.jsonl, checkpoints, loss.png); everyone else waits at a barrier.
Checkpoints are consolidated (full, unsharded tensors), so any world size can resume them and
`eval`/`generate`/`export` load them in one process; under `checkpoint.sharded` (FSDP2) and DiLoCo
(whose workers hold different states) every rank writes its own files, which load the same ways.
Collectives time out after `dist.timeout_s` (a hung or dead peer raises a clear error instead of
hanging forever). Models stay free of distributed code: wrapping happens here, in `wrap_model`.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import socket
import time
import traceback
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from lmforge.checkpoint import DILOCO_FILE
from lmforge.dist_config import DistConfig, DistInfo, all_reduce_traffic, env_info
from lmforge.errors import CheckpointError, CommFailure, ConfigError, LmforgeError, first_line, hold_interrupts
from lmforge.fields import flatten

joined = False  # `init` began joining the other ranks (read by cli._quiet_rank)
_peers: list[tuple[str, int]] = []  # each rank's (host, pid), from `init`: which one died (`describe_comm_failure`)
_wrapped: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the models `wrap_model` wrapped: freed before `shutdown`
SETUP_SIGNAL_NOTE = (
    "note: a stop signal arrived while the ranks set up; they stop together at the next point all of them reach "
    "(a second signal stops this one at once)"
)


def init(cfg: DistConfig, device_pref: str) -> tuple[DistInfo, torch.device]:
    """Start the process group when launched by torchrun; returns (info, this rank's device).

    NCCL on CUDA, gloo on CPU. Without torchrun (WORLD_SIZE unset or 1) nothing is initialised.
    """
    from lmforge.train.precision import pick_device

    global joined, _peers
    info = env_info()
    device = pick_device(device_pref, "--train.device")
    if not info.enabled:
        return info, device
    joined = True  # from here on a rank's error may be its own (its device, its peers)
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {info.local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                "lower --nproc-per-node"
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"distributed training supports cuda and cpu, not {device.type}; set --train.device")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        try:
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo",
                timeout=timeout,
                device_id=device if device.type == "cuda" else None,
                **_attempt_store(info, timeout),
            )
            _peers = [("", 0)] * info.world_size
            dist.all_gather_object(_peers, (socket.gethostname(), os.getpid()))
        except (RuntimeError, ValueError) as e:  # torch's DistError family subclasses RuntimeError
            raise CommFailure(
                f"rank {info.rank}: cannot connect to the other {info.world_size - 1} process(es) "
                f"({first_line(e)[:200]}); check that every process started and can reach the rendezvous "
                "endpoint (MASTER_ADDR/MASTER_PORT), then run the command again: it resumes from the latest checkpoint"
            ) from None
    # torchrun's SIGTERM after a peer died: acted on where the ranks meet (errors.hold_interrupts); a stop (Ctrl-C,
    # a scheduler's SIGTERM) at the next point of set-up where every rank checks for one (train/run.py)
    hold_interrupts(note=SETUP_SIGNAL_NOTE)
    return info, device


def _attempt_store(info: DistInfo, timeout: datetime.timedelta) -> dict[str, Any]:
    """`init_process_group` arguments that give each torchrun restart attempt its own keys in the launcher's store.

    torchrun's static rendezvous (`--master-port`, no `--rdzv-backend`) keeps one store for every attempt of
    `--max-restarts`, and torch 2.13 no longer prefixes the workers' keys by attempt (it assumes a new store per
    attempt, which only the c10d rendezvous makes): a restarted rank read its peer's address from the dead attempt,
    and the group failed ("Gloo connectFullMesh failed ... Connection refused") on every restart. {} (torch's own
    env:// set-up) outside torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size, is_master=False, timeout=timeout
    )
    return {
        "store": dist.PrefixStore(f"lmforge/attempt_{attempt}", client),
        "rank": info.rank,
        "world_size": info.world_size,
    }


_COMM_MARKERS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "nccl", "gloo")


def is_comm_failure(e: BaseException) -> bool:
    """Whether an exception from training is a failed collective (not a bug in the step itself)."""
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _COMM_MARKERS)


def describe_comm_failure(e: BaseException, info: DistInfo, timeout_s: float) -> str:
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    # torchrun --max-restarts restarts the workers, which resume (measured on gloo with torch 2.13: README)
    restarts = " (torchrun --max-restarts does it automatically)"
    gone = _exited_peers(info)
    who = (
        f"rank{'s' * (len(gone) > 1)} {' and '.join(map(str, gone))} exited (its own output says why)"
        if gone
        else f"a peer died or hung (dist.timeout_s={timeout_s:g})"
    )
    return (
        f"rank {info.rank}: a collective with the other {info.world_size - 1} process(es) failed ({first[:200]}); "
        f"{who}. The latest checkpoint is intact: re-run the same command to resume{restarts}"
    )


def _exited_peers(info: DistInfo, wait_s: float = 0.5) -> list[int]:
    """The ranks on this host whose process has exited (a peer elsewhere cannot be seen from here); a peer's
    connection closes as it exits, a moment before it is a zombie, so this looks again for up to `wait_s`."""
    host = socket.gethostname()
    mine = [(r, pid) for r, (h, pid) in enumerate(_peers) if r != info.rank and h == host]
    deadline = time.monotonic() + wait_s
    while True:
        gone = [r for r, pid in mine if not _running(pid)]
        if gone or not mine or time.monotonic() > deadline:
            return gone
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether process `pid` runs: not gone, nor a zombie that its parent (torchrun) has not reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # (no /proc: macOS)
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def backend() -> str | None:
    """The process group's backend ("nccl", "gloo"), or None in one process."""
    return dist.get_backend() if dist.is_initialized() else None


def shutdown(leaving: BaseException | None = None) -> None:
    """Destroy the process group once nothing else holds it; `leaving`: the exception the run ends by (None: it
    returned), whose traceback keeps the run's frames, and the DDP wrapper in their locals, alive. A group whose
    peer died or hung (a CommFailure in `leaving`'s chain) cannot close: it is left to the process's exit.

    The order matters on gloo. DDP's reducer holds the group too; destroyed while the reducer still held it, the
    group's destructor ran later, when the reducer was freed, holding the GIL: it joins gloo's worker threads, and
    a worker still releasing a finished collective's tensors waited for the GIL. The rank hung at exit until
    killed (rank 1 of a run whose rank 0 was signalled in set-up: 30 s, then the launcher's SIGKILL). The frames'
    locals are cleared first (and cycles collected, where a wrapped model outlived that), so the reducer is gone and
    `destroy_process_group` runs the destructor itself, without the GIL (torch binds it so), before this returns.
    (Where torch._dynamo was first imported after the group started, as DDP's set-up does in a fresh interpreter,
    torch 2.13 keeps references to the group for good: it is never destroyed, and its threads idle until the
    process ends. Imported before, as the tests' zygotes and library users may, the above applies.)"""
    chain = []
    while leaving is not None:
        chain.append(leaving)
        leaving = leaving.__context__
    if not dist.is_initialized() or any(isinstance(e, CommFailure) for e in chain):
        return
    for e in chain:
        traceback.clear_frames(e.__traceback__)
    if _wrapped:  # (a full collection takes 0.1-0.8 s with torch loaded)
        gc.collect()
    dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Reduce a few numbers over all ranks (sum or max) in one collective; identity without a group."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_1d(values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D tensor (lengths may differ), concatenated in rank order; no pickling (the
    tensors are padded to the longest); identity without a group."""
    if not dist.is_initialized():
        return values
    world = dist.get_world_size()
    lengths = [torch.zeros(1, dtype=torch.int64, device=values.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([len(values)], dtype=torch.int64, device=values.device))
    padded = torch.zeros(int(max(n.item() for n in lengths)), dtype=values.dtype, device=values.device)
    padded[: len(values)] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n.item())] for part, n in zip(parts, lengths, strict=True)])


def check_same_config(config: dict[str, Any], device: torch.device) -> None:
    """Refuse to train, on every rank, when the ranks were started with different settings.

    Ranks launched with other flags (by hand, or one node's command edited) otherwise fail deep inside
    DDP with a traceback wall (another model shape), hang (another batch size) or silently train apart
    (another learning rate). The configs travel as JSON bytes (no pickle); no-op without a group."""
    if not dist.is_initialized():
        return
    config = {**config, "data": {**config.get("data", {}), "dir": None}}  # (nodes may hold local copies elsewhere)
    mine = torch.tensor(list(json.dumps(config, sort_keys=True).encode("utf-8")), dtype=torch.uint8, device=device)
    lengths = all_gather_1d(torch.tensor([len(mine)], dtype=torch.int64, device=device)).tolist()
    parts = all_gather_1d(mine).cpu().split(lengths)
    reference = flatten(json.loads(bytes(parts[0].tolist())))
    for rank, part in enumerate(parts[1:], start=1):
        other = flatten(json.loads(bytes(part.tolist())))
        diffs = [f"{k} {other.get(k)!r} vs {reference.get(k)!r}" for k in sorted(reference.keys() | other.keys())
                 if other.get(k) != reference.get(k)]  # fmt: skip
        if diffs:
            more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            raise ConfigError(
                f"rank {rank} was started with other settings than rank 0 ({'; '.join(diffs[:3])}{more}); "
                "start every rank with the same command and flags"
            )


def eval_share(strategy: str, rank: int, world_size: int) -> dict[str, int]:
    """`rank` / `world_size` keyword arguments for a sharded evaluation (`eval.lm.shard_batches`): {} (each
    rank evaluates everything) under DiLoCo, whose workers hold different weights between syncs."""
    return {} if strategy == "diloco" else {"rank": rank, "world_size": world_size}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(
    model: nn.Module,
    strategy: str,
    device: torch.device,
    param_dtype: torch.dtype,
    *,
    find_unused: bool = False,
) -> nn.Module:
    """DDP or FSDP2 (`fully_shard` per block, then the root) around `model`; unchanged without a
    process group (`init` starts one only for 2+ ranks; a 1-rank group, as the GPU tests make, wraps).

    FSDP2 mixed precision: parameters are gathered in `param_dtype` (the autocast dtype, e.g. bf16)
    for compute, gradients are reduced in fp32, and the sharded master weights stay fp32.
    `find_unused`: some parameters may get no gradient in a step (BERT's NSP head under plain MLM);
    DDP then looks for them after each forward (their gradients stay None, as in one process).
    """
    if not dist.is_initialized() or strategy == "diloco":  # DiLoCo workers train alone between syncs (see DiLoCo)
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused
        )
        _wrapped.add(wrapped)
        return wrapped
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in getattr(model, "blocks", []):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    _wrapped.add(model)
    return model


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each Transformer block's activations in backward instead of keeping them.

    Only the block inputs stay alive between forward and backward (see `lmforge estimate`'s
    "activations, checkpointed"), for about one extra forward pass of compute. Parameter names and
    numerics are unchanged (non-reentrant `torch.utils.checkpoint`, RNG state preserved for dropout).
    Inference (no grad, KV cache) runs the blocks normally. Returns the number of blocks wrapped.
    """
    import functools

    from torch.utils.checkpoint import checkpoint

    blocks = list(getattr(model, "blocks", []))
    for block in blocks:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
    return len(blocks)


def no_grad_sync(model: nn.Module, sync: bool) -> Any:
    """Context for one micro-batch: gradient all-reduce only on the last one of the window."""
    import contextlib

    if sync or not dist.is_initialized():
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def fsdp_no_sync() -> Any:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return getattr(model, "module", model)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Consolidated CPU state dict on every rank (a collective under FSDP2: all ranks must call it)."""
    model = unwrap(model)
    if not dist.is_initialized():
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # ~0.3 s import

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(model: nn.Module, ckpt: Any, worker: int = 0) -> None:
    """Load a checkpoint's weights into a live model: whole normally (a DiLoCo checkpoint: saved worker
    `worker`'s, see `resume_worker`); under FSDP2 each rank reads only the rows of each tensor it holds
    (from a consolidated or a sharded checkpoint of any world size), so no rank materialises the whole
    model (`--dist.meta_init` resumes stay within each rank's share)."""
    if not _fsdp(model):
        ckpt.load_model(unwrap(model), worker)
        return
    from torch.distributed.tensor import DTensor

    state = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            start, stop = _chunk_rows(t)
            state[name] = _as_dtensor(ckpt.read_rows(0, name, start, stop), t)
        else:
            state[name] = ckpt.read_whole(0, name)
    model.load_state_dict(state)


def _chunk_rows(t: Any) -> tuple[int, int]:
    """Rows [start, stop) of the whole tensor that this rank's Shard(0) chunk of DTensor `t` holds
    (`torch.chunk` order: chunks of ceil(n / world) rows; trailing ranks may hold fewer or none)."""
    _require_row_shards(t, "load a tensor")
    n, world = t.shape[0], t.device_mesh.size()
    size = -(-n // world)
    start = min(t.device_mesh.get_local_rank() * size, n)
    stop = min(start + size, n)
    if stop - start != t.to_local().shape[0]:
        raise LmforgeError(f"unexpected FSDP2 chunk: rows {start}:{stop} of {n}, local {tuple(t.to_local().shape)}")
    return start, stop


def _require_row_shards(t: Any, doing: str) -> None:
    """Sharded checkpoints handle FSDP2's placement, Shard(0): each rank holds a block of rows."""
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),):
        raise LmforgeError(f"cannot {doing} placed as {t.placements}; expected (Shard(0),)")


def _as_dtensor(rows: torch.Tensor, like: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        rows.to(like.device, like.dtype), like.device_mesh, like.placements, run_check=False,
        shape=like.shape, stride=like.stride(),
    )  # fmt: skip


def _fsdp(model: nn.Module) -> bool:
    return dist.is_initialized() and hasattr(model, "set_requires_gradient_sync")


def checkpoint_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict]:
    """(consolidated weights or None, optimizer state in `optimizer.state_dict()` form) for saving.

    Under FSDP2 this is a collective (every rank must call it) that gathers full tensors to CPU;
    parameter names in the optimizer state are turned back into the integer ids a 1-process run
    uses, so the checkpoint is the same whatever the world size. Otherwise: (None, state_dict()).
    """
    if not _fsdp(model):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = full_state_dict(model)
    named = get_optimizer_state_dict(model, optimizer, options=options)
    if "param_groups" not in named:  # cpu_offload gathers to rank 0 only; the others get {}
        return weights, {}
    ids = {fqn: i for i, fqn in enumerate(fqn for g in named["param_groups"] for fqn in g["params"])}
    state = {ids[fqn]: value for fqn, value in named["state"].items()}
    groups = [{**g, "params": [ids[fqn] for fqn in g["params"]]} for g in named["param_groups"]]
    return weights, {"state": state, "param_groups": groups}


def local_shards(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's part of the model and optimizer state, for a sharded checkpoint: nothing is gathered.

    Under FSDP2 every parameter (and its AdamW moments) is a DTensor split along dim 0 (`Shard(0)`);
    its local chunk is kept and its name listed as split. Everything else (one process, AdamW's step
    count) is whole and identical on every rank. Optimizer entries use the integer parameter ids of a
    1-process `optimizer.state_dict()`, so the checkpoint does not depend on the world size.
    Returns {"model", "tied", "optim", "structure", "split_model", "split_optim"}.
    """
    from torch.distributed.tensor import DTensor

    from lmforge.train.state import flatten_optimizer, savable

    def local(name: str, t: torch.Tensor, split: list[str]) -> torch.Tensor:
        if not isinstance(t, DTensor):
            return t
        _require_row_shards(t, f"save {name} sharded:")
        split.append(name)
        return t.to_local()

    split_model: list[str] = []
    weights = {n: local(n, t, split_model) for n, t in unwrap(model).state_dict().items()}
    weights, tied = savable(weights)
    split_model = [n for n in split_model if n in weights]
    sd = optimizer.state_dict()
    tagged: list[str] = []
    state = {
        pid: {k: local(f"{pid}.{k}", v, tagged) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        for pid, entry in sd["state"].items()
    }
    tensors, structure = flatten_optimizer({"state": state, "param_groups": sd["param_groups"]})
    return {
        "model": weights,
        "tied": tied,
        "optim": tensors,
        "structure": structure,
        "split_model": split_model,
        "split_optim": tagged,  # "<param id>.<name>": the flattened names
    }


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    tokenizer_json: str,
    diloco: DiLoCo | None = None,
) -> Path:
    """A collective: every rank writes its own shards (no gather to rank 0, so no rank ever holds the
    whole model), then rank 0 checksums them and seals the checkpoint. The folder must be on a
    filesystem every rank sees. Returns the checkpoint folder.

    With `diloco` (whose workers are not sharded: each file holds one worker's whole state), rank 0 also
    writes the outer state the workers share to `DILOCO_FILE`, and state.json notes the worker count."""
    from lmforge.atomic import save_safetensors
    from lmforge.checkpoint import (
        begin_checkpoint,
        finish_checkpoint,
        shard_files,
        step_dir,
        tmp_step_dir,
        write_failed,
        write_shard,
    )

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shards = local_shards(model, optimizer)
    tmp = begin_checkpoint(run_dir, step) if rank == 0 else tmp_step_dir(run_dir, step)
    barrier()
    try:
        write_shard(tmp, rank, world, shards["model"], shards["optim"])
    except OSError as e:  # a full disk: the failing rank's one-line error (its peers then fail at the barrier)
        raise write_failed(run_dir, step, e) from None
    barrier()
    if rank != 0:
        return step_dir(run_dir, step)
    meta = {
        **state,
        "optimizer": shards["structure"],
        "sharded": {
            "world_size": world,
            "model": shards["split_model"],
            "optim": shards["split_optim"],
            "tied": shards["tied"],
        },
    }
    files = [name for r in range(world) for name in shard_files(r, world)]
    try:
        if diloco is not None:
            save_safetensors(diloco.state_dict(), str(tmp / DILOCO_FILE), {"format": "pt"})
            files.append(DILOCO_FILE)
            meta["diloco"] = {"workers": world}
        return finish_checkpoint(tmp, step=step, files=files, meta=meta, tokenizer_json=tokenizer_json)
    except OSError as e:
        raise write_failed(run_dir, step, e) from None


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Any, worker: int = 0) -> list[str]:
    """Restore a checkpoint's optimizer state: whole normally (a DiLoCo checkpoint: saved worker `worker`'s);
    under FSDP2 each rank reads only the rows of its parameters' moments (as `load_model_state` does for
    the weights). Returns the group settings the current config changes (`Checkpoint.load_optimizer`)."""
    if not _fsdp(model):
        return ckpt.load_optimizer(optimizer, rank=worker)
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    tensors = {}
    for pid, entry in ckpt.meta.get("optimizer", {"state": {}})["state"].items():
        p = params[int(pid)] if int(pid) < len(params) else None  # None: load_state_dict says it does not fit
        for value in entry.values():
            if not (isinstance(value, dict) and "tensor" in value):
                continue
            flat = value["tensor"]
            if isinstance(p, DTensor) and ckpt.whole_shape(1, flat) == tuple(p.shape):  # a moment: its rows
                start, stop = _chunk_rows(p)
                tensors[flat] = _as_dtensor(ckpt.read_rows(1, flat, start, stop), p)
            else:  # e.g. AdamW's step count
                tensors[flat] = ckpt.read_whole(1, flat)
    return ckpt.load_optimizer(optimizer, tensors)


class DiLoCo:
    """Local SGD with an outer optimizer (DiLoCo, Douillard et al. 2023, https://arxiv.org/abs/2311.08105).

    Every worker runs the inner optimizer (AdamW) alone on its own data for `sync_every` steps; then
    the workers average their parameter change since the last sync (one all-reduce of the parameters)
    and apply it to the shared parameters with Nesterov SGD (`outer_lr`, `outer_momentum`), and every
    worker continues from the result. The last step of a finished run (max_steps, early stopping) syncs
    too, so its final checkpoint holds the synced weights. A run stopped by a signal (Ctrl-C, SIGTERM) or
    by its time budget does not: raising train.time_budget to train on must give what one longer run
    gives, as a resume after Ctrl-C does, and a sync the longer run would not make changes every weight
    after it. Such a checkpoint, like every one between syncs, gives `eval`, `generate` and `export`
    worker 0's weights: a whole model, trained from the last synced weights on worker 0's share of the
    data since (the run's final evaluation scores the same model); the synced model comes at the step
    that reaches train.max_steps. Communication: one all-reduce per `sync_every` steps instead of one per
    step (DDP), i.e. about `sync_every` x less traffic, for slow interconnects between nodes. With
    outer_lr 1 and momentum 0 it is plain parameter averaging; with one worker, plain training.

    Resume is exact at any step: a checkpoint holds each worker's own weights (they differ between
    syncs) and inner optimizer state (AdamW's moments always differ) in per-rank files, as sharded FSDP2
    checkpoints do (`save_sharded_checkpoint`), and the outer state, identical on every worker, once
    (`state_dict`: the anchor, i.e. the shared parameters at the last sync, and the momentum). The data
    position and the torch RNG are the same on every worker (one global stream; dropout draws the same
    amount everywhere), so rank 0's, in state.json, resume them all, as under DDP. Resumed by another
    number of workers, every worker starts from worker 0's state (`resume_worker` says so).
    """

    def __init__(self, model: nn.Module, cfg: DistConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.anchor = [p.detach().clone() for p in self.params]  # the shared parameters at the last sync
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params)  # the flat outer gradient's
        self.syncs = 0
        self.synced_at = -1  # the step of the last sync

    @torch.no_grad()
    def after_step(self, step: int, last: bool = False) -> None:
        """The outer sync, every `sync_every` steps and at the `last` step of the run (once per step).
        A collective: every rank must call it with the same arguments."""
        if step == self.synced_at or (step % self.cfg.sync_every and not last):
            return
        world = dist.get_world_size() if dist.is_initialized() else 1
        flat = torch.cat([(a - p).flatten() for a, p in zip(self.anchor, self.params, strict=True)])
        if world > 1:
            dist.all_reduce(flat)  # summed outer gradient (the change each worker made, undone)
            flat /= world
        offset = 0
        lr, mu = self.cfg.outer_lr, self.cfg.outer_momentum
        for a, p, m in zip(self.anchor, self.params, self.momentum, strict=True):
            g = flat[offset : offset + a.numel()].view_as(a)
            offset += a.numel()
            m.mul_(mu).add_(g)
            a.sub_(lr * (g + mu * m) if mu else lr * g)  # Nesterov
            p.copy_(a)
        self.syncs += 1
        self.synced_at = step

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The outer state (the same on every worker), by parameter name, for `DILOCO_FILE`."""
        return {
            f"{kind}.{name}": t.detach().cpu().contiguous()
            for kind, tensors in (("anchor", self.anchor), ("momentum", self.momentum))
            for name, t in zip(self.names, tensors, strict=True)
        }

    @torch.no_grad()
    def load_checkpoint(self, ckpt: Any) -> None:
        """Restore the outer state from checkpoint `ckpt`, once the weights are loaded. A checkpoint without
        it (saved under another strategy or by an older lmforge) restarts it: the anchor is the loaded
        weights and the momentum zero. The steps after the checkpoint's are to come (again, after a rollback),
        so their syncs are too: a rollback to before the last sync once skipped redoing that step's sync."""
        self.synced_at = -1
        if "diloco" not in ckpt.meta:
            for a, p, m in zip(self.anchor, self.params, self.momentum, strict=True):
                a.copy_(p)
                m.zero_()
            return
        saved = ckpt.read_file(DILOCO_FILE)
        for kind, tensors in (("anchor", self.anchor), ("momentum", self.momentum)):
            for name, t in zip(self.names, tensors, strict=True):
                value = saved.get(f"{kind}.{name}")
                if value is None or value.shape != t.shape:  # (copy_ would broadcast a smaller one silently)
                    raise CheckpointError(
                        f"{ckpt.path / DILOCO_FILE} has no {kind}.{name} of shape {list(t.shape)}; was it written "
                        "for another model? Use an earlier checkpoint (--checkpoint.resume_from step-NNNNNN)"
                    )
                t.copy_(value)

    def comm_report(self, world_size: int, steps: int) -> str:
        """Bytes sent and received per worker by this run's syncs vs what DDP would move for the same steps (its
        fp32 gradients' all-reduce: as many bytes); `lmforge estimate` reports the same (`comm_bytes`)."""
        per_sync = all_reduce_traffic(self.param_bytes, world_size)
        diloco, ddp = per_sync * self.syncs, per_sync * steps
        workers = "1 worker syncs" if world_size == 1 else f"{world_size} workers sync"
        return (
            f"diloco: {workers} every {self.cfg.sync_every} steps; all-reduce traffic (sent + received) per worker "
            f"{diloco / 2**20:.1f} MiB for {steps} steps vs {ddp / 2**20:.1f} MiB with DDP"
            + (f" ({ddp / diloco:.3g}x less)" if diloco else "")
        )


def resume_worker(ckpt: Any, strategy: str, info: DistInfo) -> tuple[int, str]:
    """(the saved rank whose weights and optimizer state this rank resumes from, a note or "").

    A DiLoCo checkpoint holds one state per worker: a DiLoCo run with as many workers takes its own
    (exact); any other run takes worker 0's, and the note says the resume is not exact. Other
    checkpoints hold one state for every rank (0)."""
    saved = ckpt.meta.get("diloco", {}).get("workers")
    name = ckpt.path.name
    if strategy != "diloco":
        if saved is None:
            return 0, ""
        run = f"{strategy} run" if info.enabled else "one-process run"  # (strategy is "ddp" by default)
        return 0, (
            f"note: {name} is a DiLoCo checkpoint: this {run} resumes from worker 0's weights and optimizer "
            "state, without the outer momentum"
        )
    if saved is None:
        return 0, (
            f"note: {name} holds no DiLoCo outer state (saved under another strategy or an older lmforge): the "
            "outer momentum restarts from zero, so the resume is not exact"
        )
    if saved != info.world_size:
        return 0, (
            f"note: {name} holds {saved} DiLoCo workers' states and this run has {info.world_size}: each worker "
            "resumes from worker 0's weights and inner optimizer state, so the resume is not exact"
        )
    return info.rank, ""
