"""Device and precision choices: which device, which autocast dtype, whether to use a GradScaler.

bf16 autocast is used on CUDA GPUs that support it (no loss scaling needed); float16 needs a
GradScaler; float32 is the CPU default because CPU autocast gains depend on the chip and the
tiny models we run there (measure with bench/ before turning it on: `--train.dtype bfloat16`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """`auto` → cuda if available, else cpu; an explicit unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--train.device cuda but no CUDA GPU is visible; use --train.device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--train.device mps but MPS is not available; use --train.device cpu (or auto)")
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 = no autocast

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        if self.dtype == torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None


def pick_precision(device: torch.device, name: str) -> Precision:
    """Resolve `train.dtype` for `device` (`auto` → bf16 on capable CUDA GPUs, float32 elsewhere)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return Precision(device, torch.bfloat16)
        return Precision(device, torch.float32)
    if name == "float16" and device.type == "cpu":
        raise ConfigError(
            "float16 autocast is not supported for training on CPU; use --train.dtype bfloat16 or float32"
        )
    return Precision(device, DTYPES[name])
