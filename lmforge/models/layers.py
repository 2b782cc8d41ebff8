"""The few building blocks that more than one model family uses: norms, rotary positions, a KV cache.

- `make_norm` picks LayerNorm (GPT-2, BERT) or RMSNorm (Llama) from a config string, so every family
  spells the choice the same way.
- `rope_cos_sin` / `apply_rope`: rotary position embeddings (Su et al., 2021) in the "rotate half"
  layout that HF Llama uses (dimension i is paired with i + head_dim/2, not with its neighbour), so
  q/k projection weights copy to and from HF without a permutation.
- `gelu`: `F.gelu` without oneDNN's fixed per-call cost on the small tensors of one decoded token, and
  GPT-2's tanh form on CPU through a sigmoid (`GeluTanh`), which CPUs compute 3-4x faster than a tanh.
- `KVCache`: preallocated keys/values for incremental decoding; the model writes into it and reads
  back the prefix, nothing is concatenated or reallocated per token.

References:
- RoFormer, rotary embeddings: https://arxiv.org/abs/2104.09864
- RMSNorm: https://arxiv.org/abs/1910.07467
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lmforge.errors import ConfigError


def require_vocab_size(vocab_size: int, size_of: str = "the tokenizer's vocabulary size") -> None:
    """Models cannot be built before the vocabulary size is known (0 = "take it from the data")."""
    if vocab_size <= 0:
        raise ConfigError(f"model.vocab_size is 0; set it to {size_of} (training fills it in from the prepared data)")


# Below this many values ATen's own GELU kernel beats the oneDNN one it otherwise hands float32/bf16 CPU
# tensors to (torch 2.13, 2 threads, fp32: 1.7 vs 8.6 us at 1536 values, 9.6 vs 11.7 at 16k, even at 64k,
# oneDNN ahead above; bf16: even at 16k, so the switch stops there for both)
GELU_SMALL = 16384


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """`F.gelu(x, approximate)`, computed the fastest way for a CPU tensor, with the same values.

    - The exact (erf) form of a small CPU tensor runs in ATen's own kernel: ATen passes an exact GELU on a
      CPU tensor to oneDNN, whose setup costs ~7 us per call whatever the size; on one decoded token of a
      10.8M model (1536 values) that is 5x the work, 0.13 of 1.7 ms per token over 6 layers. For a tensor
      under `GELU_SMALL` values the oneDNN switch is turned off around this one call (values agree within
      ~1e-6); training's (batch x context, d_ff) activations are far above it and keep oneDNN.
    - The tanh form of a large float32 CPU tensor runs as `GeluTanh` (a sigmoid instead of a tanh, see there).
    - A compiled graph fuses GELU itself: inside one, `F.gelu` (the switch would be a graph break), with the
      tanh form of a float32 tensor written as x sigmoid(u) for inductor to fuse (its vectorised CPU tanh is
      the same slow one).
    """
    if x.device.type != "cpu":
        return F.gelu(x, approximate=approximate)
    if torch.compiler.is_compiling():  # inductor fuses the element-wise ops of either form into one kernel
        if approximate == "tanh" and x.dtype == torch.float32:  # its CPU tanh is as slow as ATen's
            return x * torch.sigmoid(x * (_GELU_C + _GELU_C * _GELU_A * x * x))
        return F.gelu(x, approximate=approximate)
    if approximate == "tanh":
        if x.dtype == torch.float32 and x.numel() >= GELU_SMALL:
            return GeluTanh.apply(x) if x.requires_grad and torch.is_grad_enabled() else _gelu_tanh_sigmoid(x)
        return F.gelu(x, approximate="tanh")
    if x.numel() >= GELU_SMALL or not torch.backends.mkldnn.enabled:
        return F.gelu(x)
    torch.backends.mkldnn.enabled = False
    try:
        return F.gelu(x)
    finally:
        torch.backends.mkldnn.enabled = True


# GPT-2's tanh GELU is 0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), and 0.5 (1 + tanh(z)) =
# sigmoid(2z): so it is x sigmoid(u) with u = x (C + C A x^2), for these two constants
_GELU_C = 2 * math.sqrt(2 / math.pi)
_GELU_A = 0.044715


def _gelu_tanh_gate(x: Tensor) -> tuple[Tensor, Tensor]:
    """(sigmoid(u), x^2) for GPT-2's tanh GELU x sigmoid(u): a sigmoid and a few in-place multiply-adds."""
    q = x.square()
    return torch.sigmoid_(torch.mul(q, _GELU_C * _GELU_A).add_(_GELU_C).mul_(x)), q


def _gelu_tanh_sigmoid(x: Tensor) -> Tensor:
    """GPT-2's tanh GELU as x sigmoid(u), without autograd (no gradient to compute): in place after x^2."""
    return torch.sigmoid_(x.square().mul_(_GELU_C * _GELU_A).add_(_GELU_C).mul_(x)).mul_(x)


class GeluTanh(torch.autograd.Function):
    """GPT-2's tanh GELU (`F.gelu(x, approximate="tanh")`) for float32 CPU tensors, as x sigmoid(u).

    On CPU, torch's vectorised tanh is slow: on an AVX2-only host 1.7 ms for a 12 x 64 x 512 activation
    against 0.47 ms for a sigmoid (torch 2.13, 1 thread), and ATen's tanh-GELU kernel and its backward each
    pay it. Here the forward is a sigmoid and a few multiply-adds, and it also computes the slope
    dy/dx = s + x s u' (1 - s) (s = sigmoid(u), u' = C + 3 C A x^2), which it saves in place of x (the same
    memory as `F.gelu`): the backward is one multiplication. That activation on the AVX2 host, forward +
    backward: 3.34 -> 2.15 ms (the exact erf GELU: 1.37); forward alone without a gradient (in place,
    `_gelu_tanh_sigmoid`): 1.54 -> 0.77 ms. Values and gradients equal `F.gelu`'s within float32 rounding
    (tested against float64).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:
        s, q = _gelu_tanh_gate(x)
        y = x * s
        q.mul_(3 * _GELU_C * _GELU_A).add_(_GELU_C).mul_(y)  # x s u'
        ctx.save_for_backward(torch.rsub(s, 1).mul_(q).add_(s))  # s + x s u' (1 - s): 0 where s rounds to 1
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        (slope,) = ctx.saved_tensors
        return grad * slope


def make_norm(kind: str, dim: int, *, eps: float, bias: bool) -> nn.Module:
    """LayerNorm (with or without bias) or RMSNorm (weight only) over the last dimension."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Rotary tables for positions 0..seq_len-1, each (seq_len, head_dim), float32, in the rotate-half
    layout with the sign folded in: cos = [c, c] and sin = [-s, s] for c, s = cos, sin of (seq_len,
    head_dim / 2) angles.

    Frequency j is theta^(-2j/head_dim), computed like HF Llama (integer arange, then float) so the
    tables match theirs bit for bit (HF's cos is [c, c] too; its sin is [s, s] with the sign in rotate_half).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (seq_len, head_dim/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, heads, head_dim) by position; cos/sin are `rope_cos_sin`'s rows for x's positions,
    shaped to broadcast against x ((T, heads, head_dim), (B, T, heads, head_dim), or (T, 1, head_dim)):
    [x1, x2] -> [x1 c - x2 s, x2 c + x1 s], as x * cos + [x2, x1] * sin.

    Two multiplications, an addition and a roll (the textbook x1 c - x2 s, x2 c + x1 s takes seven ops
    and two zero-filled slice gradients), with the same values bit for bit (a - b = a + (-b) and
    a + b = b + a in IEEE arithmetic), which are also HF Llama's. Tables already expanded over the heads
    and contiguous (`GPT.rope_tables`) multiply fastest: broadcasting over a middle dimension costs more
    on CPU than the copy. The tables are cast to x's dtype (as HF does) so a bf16 q/k stays bf16.
    """
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # [x2, x1]
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


class KVCache:
    """Preallocated keys and values of every layer, for decoding one token at a time.

    `k[i]` and `v[i]` hold layer i's cache, shape (B, n_kv_head, max_len, head_dim); `pos` is how many
    positions are filled. A forward pass calls `update(i, k, v)` in each layer (which writes at
    [pos, pos + T) and returns the filled prefix), then `advance(T)` once at the end, so every layer
    of one pass sees the same `pos`. All rows of the batch share `pos` (no ragged batches).
    """

    def __init__(
        self,
        *,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # one view per layer, made once: a decode step then costs a narrow + copy_ per layer instead
        # of a four-index slice assignment (measured ~4 -> ~3 us per call on CPU, x 2 x n_layer per token)
        self.k_layers = self.k.unbind(0)  # n_layer x (B, n_kv_head, max_len, head_dim)
        self.v_layers = self.v.unbind(0)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        """Forget the cached positions (the memory is reused, not cleared)."""
        self.pos = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) at [pos, pos + T); return keys/values [0, pos + T)."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, the cache holds {self.max_len}")
        k_all, v_all = self.k_layers[layer], self.v_layers[layer]
        k_all.narrow(2, self.pos, k.shape[2]).copy_(k)
        v_all.narrow(2, self.pos, k.shape[2]).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)  # (B, n_kv_head, pos + T, head_dim)

    def advance(self, n: int) -> None:
        """Mark n more positions as filled (called once per forward pass, after the last layer)."""
        self.pos += n
