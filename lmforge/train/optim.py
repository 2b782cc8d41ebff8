"""Optimizers: decay / no-decay parameter groups, AdamW and SGD builders, the L1 penalty.

Weight decay applies to matrices (linear and embedding weights, `p.dim() >= 2`) and not to biases
or norm gains, as in GPT-2/nanoGPT: decaying gains towards 0 fights the normalisation. For SGD
the same coefficient is the classic L2 penalty (`weight_decay` in `torch.optim.SGD`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (dim >= 2) and a non-decayed group."""
    decay, no_decay = [], []
    for p in model.parameters():  # .parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA when available) or SGD over `param_groups(model)`."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    fused = cfg.fused == "on" or (cfg.fused == "auto" and device.type == "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def l1_penalty(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Sum of |w| over the decayed parameters (the ones with weight_decay > 0 in their group)."""
    terms = [p.abs().sum() for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    return torch.stack(terms).sum() if terms else torch.zeros(())
