"""Device and precision choices: which device, which autocast dtype, whether to use a GradScaler.

bf16 autocast is used on CUDA GPUs that support it (no loss scaling needed); float16 needs a
GradScaler; float32 is the CPU default because CPU autocast gains depend on the chip and the
tiny models we run there (measure with bench/ before turning it on: `--train.dtype bfloat16`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.attention

from lmforge.errors import ConfigError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attention_kernels(name: str) -> contextlib.AbstractContextManager:
    """A context in which SDPA tries `name`'s CUDA kernel (`train.attention`) first, the others enabled
    behind it, so a shape the chosen kernel cannot run still runs (`auto`: torch's own choice, which with
    torch 2.11 on an H100 is already cuDNN's kernel)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]
    first = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}.get(
        name, SDPBackend.EFFICIENT_ATTENTION
    )
    return sdpa_kernel([first] + [b for b in order if b != first], set_priority=True)


def cpp_compiler_problem() -> str | None:
    """Why torch.compile cannot build CPU kernels here, or None: inductor compiles them with a C++ compiler
    (`CXX`, else g++). Checked before compiling, where the failure would be a traceback after a page of
    generated code."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # moved in another torch release: compiling itself will tell
        return None
    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - any reason it gives
        return first_line(e)[:200]
    return None


def pick_device(name: str, flag: str = "--device") -> torch.device:
    """`auto` → cuda if available, else cpu; an explicit unavailable device is a ConfigError naming `flag`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} cuda but no CUDA GPU is visible; use {flag} cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} mps but MPS is not available; use {flag} cpu (or auto)")
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 = no autocast
    attention: str = "auto"  # the CUDA SDPA kernel tried first (`train.attention`)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast at `dtype` (none for float32), with SDPA trying the `attention` kernel first."""
        stack = contextlib.ExitStack()
        stack.enter_context(attention_kernels(self.attention))
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self.dtype))
        return stack

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        if self.dtype == torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None


def pick_precision(device: torch.device, name: str, attention: str = "auto") -> Precision:
    """Resolve `train.dtype` for `device` (`auto` → bf16 on capable CUDA GPUs, float32 elsewhere) and
    check `train.attention` (a CUDA kernel choice: only `auto` elsewhere)."""
    if attention != "auto":
        if device.type != "cuda":
            raise ConfigError(
                f"--train.attention {attention} picks a CUDA attention kernel, and this run is on {device.type}; "
                "leave it at auto"
            )
        if "set_priority" not in inspect.signature(torch.nn.attention.sdpa_kernel).parameters:
            raise ConfigError(
                f"--train.attention {attention} needs a newer torch (sdpa_kernel's set_priority), "
                f"this is {torch.__version__}; upgrade torch or leave it at auto"
            )
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return Precision(device, torch.bfloat16, attention)
        return Precision(device, torch.float32, attention)
    if name == "float16" and device.type == "cpu":
        raise ConfigError(
            "float16 autocast is not supported for training on CPU; use --train.dtype bfloat16 or float32"
        )
    return Precision(device, DTYPES[name], attention)


def keep_freed_memory(device: torch.device) -> bool:
    """Stop glibc's malloc from handing freed memory back to the OS between training steps (CPU
    training on Linux; a no-op returning False for other devices and platforms).

    A CPU training step allocates and frees the same activation and gradient buffers every step. By
    default glibc trims the top of its heap once 128 KiB or more are free, and serves blocks above a
    (self-adjusting, <= 32 MiB) threshold with mmap/munmap, so each step page-faults its buffers back in
    (the kernel zero-fills every 4 KiB page). Raising the trim threshold to 2 GiB and fixing the mmap
    threshold at its 32 MiB maximum keeps that memory mapped for the next step: the process holds on to
    its peak (which training reaches every step anyway) and nothing changes numerically. Measured on
    the speedrun config: ~5% less wall-clock (see README "Speed"). Returns whether glibc accepted it.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
