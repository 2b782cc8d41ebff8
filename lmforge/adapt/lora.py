"""LoRA: low-rank adapters on chosen linear layers, merge/unmerge, and the adapter-only state dict.

    x ──┬── W (frozen, d_out x d_in) ──────────────────────────┐
        └── dropout ─► A (r x d_in) ─► B (d_out x r) ─► * alpha/r ─(+)─► y

`LoRALinear` is an `nn.Linear` subclass that keeps the base weight under its original name
(`blocks.0.attn.qkv.weight`), so a base checkpoint loads into an injected model unchanged and the
adapter adds only `lora_A` / `lora_B` keys. B starts at zero, so an injected model computes exactly
what the base did until the first update (Hu et al. 2021, section 4.1). `merge_lora` folds
`B @ A * alpha / r` into W and swaps each layer back to a plain `nn.Linear`: the merged model is
an ordinary GPT that `lmforge export` and `generate` load, and gives the same outputs.

Target modules are name suffixes matched against `named_modules()`: `qkv` hits every
`blocks.{i}.attn.qkv`, `attn.proj` only the attention output (not `mlp.proj`). The same names
work on BERT (`encoder.layers.{i}.attn.qkv`, `.attn.proj`): its feed-forward layers sit directly
in the layer (`encoder.layers.{i}.fc`, `.proj`) and answer to `mlp.fc` / `mlp.proj` as in GPT, so
one `--lora-targets` list means the same layers in both families; `pooler` targets BERT's pooler.

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import ConfigError

LORA_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """`nn.Linear` plus a trainable low-rank update; the base weight/bias are frozen."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float) -> None:
        # build the shell on meta (no allocation), then adopt the base parameters themselves
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and the LoRA reference code)
        self.lora_dropout = nn.Dropout(dropout)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., d_out)
        return y + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def merged_weight(self) -> Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling  # (d_out, d_in)


_BERT_FFN = re.compile(r"^((?:encoder|discriminator)\.layers\.\d+)\.(fc|proj)$")  # BERT, ELECTRA


def target_name(name: str) -> str:
    """The name targets are matched against: BERT's `encoder.layers.{i}.fc` (ELECTRA's
    `discriminator.layers.{i}.fc`) reads as `...mlp.fc` (GPT's)."""
    return _BERT_FFN.sub(r"\1.mlp.\2", name)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def inject_lora(model: nn.Module, *, targets: list[str], rank: int, alpha: float, dropout: float) -> list[str]:
    """Replace every `nn.Linear` whose name ends with one of `targets` by a `LoRALinear`.

    Returns:
        The names of the wrapped layers.

    Raises:
        ConfigError: no linear layer matches a target (a typo such as `qvk`).
    """
    if rank <= 0:
        raise ConfigError(f"LoRA rank must be > 0, got {rank}; pass --lora-rank 8")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    names = []
    for target in targets:
        hits = [n for n, _ in linears if target_name(n) == target or target_name(n).endswith("." + target)]
        if not hits:
            local = re.compile(r"^(blocks|encoder\.layers|discriminator\.layers)\.\d+\.")
            known = sorted({local.sub("", target_name(n)) for n, _ in linears})
            raise ConfigError(f"LoRA target {target!r} matches no linear layer; choose from {', '.join(known)}")
        names += [h for h in hits if h not in names]
    modules = dict(linears)
    for name in names:
        _set_module(model, name, LoRALinear(modules[name], rank=rank, alpha=alpha, dropout=dropout))
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and restore plain `nn.Linear`s; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
            plain.bias = module.bias
            _set_module(model, name, plain)
            count += 1
    return count


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (`...lora_A`, `...lora_B`)."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in LORA_KEYS}
