"""This machine, for training and planning: its measured matmul peak (`measure_matmul_flops`, which training
reports MFU against and `lmforge estimate --hardware cpu` plans with), the tensor bytes PyTorch's CPU allocator
hands out (`measure_cpu_allocations`, what tests and bench/ check the memory model against), its total memory,
and the checks `pretrain` and `finetune` run before building a model: `check_fits` (weights, gradients and
optimizer state, by `estimate_memory.memory_bytes`) and `check_batch_fits` (a micro-batch's token ids).

MFU = achieved model FLOP/s / peak FLOP/s. Datasheet peaks say little about a shared 2-core VM
(AVX2 hosts reach ~79 GFLOP/s fp32, AVX-512 ones ~186), so the CPU peak is *measured* on the same
machine in the same process: the best of several square matmuls at the training dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from typing import Any

import torch

from lmforge.config import OptimConfig
from lmforge.dist_config import local_world_size
from lmforge.errors import ConfigError
from lmforge.estimate_memory import StepShape, format_bytes, format_count, memory_bytes, param_counts
from lmforge.models.configs import GPTConfig


@functools.lru_cache(maxsize=8)
def measure_matmul_flops(device: str = "cpu", dtype: torch.dtype | None = None, seconds: float = 0.3) -> float:
    """Best observed FLOP/s of an n x n @ n x n matmul on `device` at `dtype` (n = 1024 CPU, 8192 GPU:
    large enough to reach a data-centre GPU's plateau, so MFU is not flattered by a low peak); dtype None: float32."""
    dtype = torch.float32 if dtype is None else dtype
    n = 8192 if device.startswith("cuda") else 1024
    # A private generator: measuring must not consume the global RNG, or a run's dropout masks would
    # depend on whether this (cached) measurement already happened in the process.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):  # warm up kernels and caches
        a @ b
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measure_cpu_allocations(fn: Any) -> int:
    """Peak bytes that PyTorch's CPU allocator hands out while `fn()` runs, above what was live before.

    Read from `torch.profiler`'s memory events ("Total Allocated"): exactly the tensor bytes the
    estimate predicts, unlike the RSS (malloc caching, loaded kernels) or tracemalloc (blind to C++).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    if not memory:
        return 0
    # "Total Allocated" also counts what earlier profiling sessions allocated and is still alive (e.g.
    # gradients): measure from what was allocated just before this session's first event.
    before = memory[0]["Total Allocated"] - memory[0].get("Bytes", 0)
    return max(m["Total Allocated"] for m in memory) - before


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of `device`: the GPU's own, or the machine's RAM (Linux /proc/meminfo); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or torch.cuda.current_device()).total_memory
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # (kB)
    except OSError:
        pass
    return None


def model_param_count(model: Any) -> int:
    """Parameters of any family's model (a tied matrix once) without allocating it: GPT/Llama-style by `param_counts`;
    BERT/ELECTRA and LSTM/GRU built on the meta device (no memory), with at most 3 layers: past that, each layer
    is the third's (the first may differ: an LSTM's reads the embedding), so n_layer 10**20 takes no longer."""
    if isinstance(model, GPTConfig):
        return param_counts(model)["total"]
    from lmforge.models import build_model

    def count(n_layer: int) -> int:
        with torch.device("meta"):
            built = build_model(dataclasses.replace(model, n_layer=n_layer))
        return sum(p.numel() for p in built.parameters())

    if model.n_layer <= 3:
        return count(model.n_layer)
    two, three = count(2), count(3)
    return two + (model.n_layer - 2) * (three - two)


def check_fits(
    model: Any, optim: OptimConfig, device: torch.device, *, world_size: int = 1, strategy: str = "ddp"
) -> None:
    """Refuse (ConfigError) a model whose weights, gradients and optimizer state alone exceed `device`'s total memory.

    A margin on purpose: activations, autocast copies and buffers are left out, so nothing that might fit is refused;
    this catches the model far too big for the machine before it is built (it grew to 21 GB before being killed).
    Under FSDP the three are each rank's share (`memory_bytes`). Every family: GPT/Llama-style by `memory_bytes`;
    BERT/ELECTRA and LSTM/GRU from `model_param_count` at 4 B weights + 4 B gradients + the optimizer's state
    (AdamW 8 B, SGD with momentum 4 B; Muon at its least, 4 B). On CPU the ranks torchrun started on this machine
    (LOCAL_WORLD_SIZE) share its RAM, so their needs together are checked against it; each GPU has its own memory.
    Every rank checks the same model against its own device, alike under torchrun, so the refusal is every rank's
    and rank 0 alone prints it."""
    total = device_memory_bytes(device)
    if total is None:
        return
    ranks = _ranks_sharing(device)
    if isinstance(model, GPTConfig):
        step = StepShape(seq_len=1, micro_batch=1, dtype="float32", device=device.type)
        mem = memory_bytes(model, optim, step, world_size=world_size, strategy=strategy)
        need = mem["weights"] + mem["gradients"] + mem["optimizer"]
    else:
        shards = world_size if strategy == "fsdp" else 1
        state = 2 if optim.name == "adamw" else 1 if optim.name == "muon" or optim.momentum > 0 else 0
        need = math.ceil(4 * (2 + state) * model_param_count(model) / shards)
    if need * ranks <= total:
        return
    needed, where = _need_and_memory(need, device)
    share = _share(f" per rank (FSDP over {world_size})" if strategy == "fsdp" and world_size > 1 else "", ranks)
    error = ConfigError(
        f"the {model.family} model ({format_count(model_param_count(model))} parameters: n_layer {model.n_layer}, "
        f"d_model {model.d_model}, vocab_size {model.vocab_size}) needs {needed}{share} for its fp32 weights, "
        f"gradients and {optim.name} state alone, more than the {format_bytes(total)} of {where}; use a smaller "
        "--model.n_layer, --model.d_model or --model.vocab_size"
        + _fewer_ranks(ranks)
        + (" ('lmforge estimate' shows what a config needs)" if isinstance(model, GPTConfig) else "")
    )
    error.every_rank = True  # (under torchrun: one line, from rank 0; every rank exits 2)
    raise error


def check_batch_fits(micro_batch: int, seq_len: int, device: torch.device) -> None:
    """Refuse (ConfigError) a micro-batch whose token ids alone (inputs and targets, int64) exceed `device`'s total
    memory: `finetune --train.batch_size 1e11` grew a Python list of examples until the machine ran out, ignoring
    Ctrl-C inside the step, and `pretrain`'s failed in its first step, its run folder written. Both check it before
    anything is written. A margin on purpose, as `check_fits`: the activations are left out; and as it, on CPU the
    LOCAL_WORLD_SIZE ranks of the machine share its RAM (each rank holds its own micro-batch)."""
    total = device_memory_bytes(device)
    need = 16 * micro_batch * max(1, seq_len)
    ranks = _ranks_sharing(device)
    if total is None or need * ranks <= total:
        return
    needed, where = _need_and_memory(need, device)
    error = ConfigError(
        f"a micro-batch of {micro_batch} examples x {seq_len} tokens needs {needed}{_share('', ranks)} for its token "
        f"ids alone, more than the {format_bytes(total)} of {where}; use a smaller --train.batch_size (or "
        f"--train.micro_batch_size){_fewer_ranks(ranks)}"
    )
    error.every_rank = True  # (pretrain under torchrun: each rank checks its own micro-batch alike; rank 0 prints)
    raise error


def _ranks_sharing(device: torch.device) -> int:
    """The ranks whose needs `check_fits` and `check_batch_fits` add up against `device`'s memory: on CPU those
    torchrun started on this machine (LOCAL_WORLD_SIZE), which share its RAM; a GPU is each rank's own."""
    return local_world_size() if device.type == "cpu" else 1


def _share(share: str, ranks: int) -> str:
    """`share` (whose need it is), then ' x N ranks on this machine' where `ranks` share the memory."""
    return f"{share or ' per rank'} x {ranks} ranks on this machine" if ranks > 1 else share


def _fewer_ranks(ranks: int) -> str:
    return " (or fewer CPU ranks per machine: torchrun --nproc-per-node)" if ranks > 1 else ""


def _need_and_memory(need: int, device: torch.device) -> tuple[str, str]:
    """How `check_fits` and `check_batch_fits` say a need and the memory it exceeds: (bytes, whose memory)."""
    needed = format_bytes(need) if need < 2**50 else f"{need:.3g} bytes"  # (n_layer 1e20 read "72736293077468.88 TiB")
    return needed, "this machine's RAM" if device.type == "cpu" else f"the GPU's memory ({device})"
