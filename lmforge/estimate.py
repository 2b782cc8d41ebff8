"""Compute estimates. For now: the machine's matmul peak, measured, which MFU is reported against.

MFU = achieved model FLOP/s / peak FLOP/s. Datasheet peaks say little about a shared 2-core VM
(AVX2 hosts reach ~79 GFLOP/s fp32, AVX-512 ones ~186), so the peak is *measured* on the same
machine in the same process: the best of several square matmuls at the training dtype.
"""

from __future__ import annotations

import functools
import time

import torch


@functools.lru_cache(maxsize=8)
def measure_matmul_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """Best observed FLOP/s of an n x n @ n x n matmul on `device` at `dtype` (n = 1024 CPU, 4096 GPU)."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype, generator=None)
    b = torch.randn(n, n, device=device, dtype=dtype)

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
