"""Decoder-only Transformer language model: GPT-2 and Llama-style variants in one readable file.

`GPT(cfg)` maps token ids (B, T) to next-token logits (B, T, vocab_size). The architecture is a
stack of pre-norm blocks; the GPT-2 / Llama differences are config fields tested with plain `if`s:

Notable features
- positions: learned absolute table (`pos_emb="learned"`, GPT-2) or rotary on q/k (`"rope"`, Llama),
  rotary in HF's "rotate half" layout so weights map to HF without permutation
- norm: LayerNorm with optional bias (GPT-2) or RMSNorm (Llama), pre-norm plus a final norm
- MLP: GELU, exact erf form (`mlp="gelu"`, HF's "gelu"; faster on CPU) or GPT-2's own tanh
  approximation (`"gelu_tanh"`, HF's "gelu_new", which OpenAI's GPT-2 checkpoints use), or SwiGLU (Llama)
- speedrun options (off by default, modded-nanogpt's measured tricks): `qk_norm` (parameter-free RMS
  norm of q and k per head, before rotary; Dehghani et al. 2023), `mlp="relu2"` (ReLU squared, Primer:
  So et al. 2021), `zero_init_proj` (residual output projections start at 0, so each block starts as
  the identity); none of them has a Hugging Face twin except zero init, so export refuses the first two
- grouped-query attention (`n_kv_head` < `n_head`), via SDPA's `enable_gqa` (no repeated k/v copies)
- one fused q/k/v projection and `F.scaled_dot_product_attention` (flash kernels on CPU and GPU);
  `is_causal` everywhere except a multi-token chunk appended to a non-empty KV cache; a compiled CPU
  decode step spells one token's attention out (`decode_attention`) for inductor to fuse
- tied or untied output head; optional biases; dropout on embeddings, attention and residual branches
- KV cache (`layers.KVCache`) for prefill + one-token decode; `forward(idx, cache, pad)` takes a
  left-padded ragged batch (per-row positions, padding keys masked) for `generate.generate_batch`
- construction does not initialize: build on the meta device, `to_empty()`, then `init_weights()`;
  construction leaves the global CPU RNG untouched, so `manual_seed(s)` followed by build and
  `init_weights()` gives the same weights whether the model was built on CPU or on meta
- GPT-2 init: N(0, init_std) everywhere, residual output projections init_std / sqrt(2 * n_layer)
- `num_params()` and `flops_per_token()` for the estimator and MFU logging
- no loss, no `torch.distributed`: losses live in `objectives.py`, parallelism in `dist.py`

Residual layout (pre-norm: each branch reads a normalized copy of x and adds its output back):

    idx (B, T) ─► tok_emb (+ pos_emb rows [pos, pos+T) if learned) ─► drop ─► x
    blocks.{i}, i = 0 .. n_layer-1:
        x ──┬──────────────────────────────────────────────────────► (+) ─► x
            └─► norm1 ─► attn (qkv ─► rope? ─► SDPA ─► proj) ─► drop ─┘
        x ──┬──────────────────────────────────────────────────────► (+) ─► x
            └─► norm2 ─► mlp (fc ─► gelu | swiglu ─► proj) ─► drop ───┘
    x ─► norm_f ─► lm_head (tok_emb.weight if tied) ─► logits (B, T, vocab_size)

Parameter names (state_dict keys; the HF key maps in `export/hf_families.py` are written against these):
    tok_emb.weight                      (vocab_size, d_model)
    pos_emb.weight                      (max_seq_len, d_model)          learned positions only
    blocks.{i}.norm1.weight / .bias     (d_model,)                      bias: layernorm with bias only
    blocks.{i}.attn.qkv.weight / .bias  ((n_head + 2*n_kv_head) * head_dim, d_model)  rows: [q; k; v]
                                        (its bias: with bias or qkv_bias)
    blocks.{i}.attn.proj.weight / .bias (d_model, n_head * head_dim)
    blocks.{i}.norm2.weight / .bias
    blocks.{i}.mlp.fc.weight / .bias    (d_ff, d_model) gelu; (2*d_ff, d_model) swiglu, rows: [gate; up]
    blocks.{i}.mlp.proj.weight / .bias  (d_model, d_ff)
    norm_f.weight / .bias
    lm_head.weight                      (vocab_size, d_model)           untied only
When embeddings are tied there is no `lm_head` module: the logits use `tok_emb.weight` directly, so
the state dict holds no shared tensor (safetensors refuses those) and `to_empty()` cannot untie it.
The rotary tables are non-persistent buffers (`rope_cos`, `rope_sin`), rebuilt by `init_weights()`.

References:
- GPT-2 (pre-norm, scaled residual init): https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf
- nanoGPT model.py: https://github.com/karpathy/nanoGPT/blob/master/model.py
- Llama (RMSNorm, SwiGLU, rotary): https://arxiv.org/abs/2302.13971 ; SwiGLU: https://arxiv.org/abs/2002.05202
- GQA: https://arxiv.org/abs/2305.13245
- Kaplan et al. 2020 (non-embedding parameters, 6N FLOPs): https://arxiv.org/abs/2001.08361
- PaLM appendix B (12 * n_layer * d_model * T attention FLOPs): https://arxiv.org/abs/2204.02311
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.configs import GPTConfig
from lmforge.models.layers import KVCache, apply_rope, gelu, make_norm, require_vocab_size, rope_cos_sin

# --------------------------------------------------------------------------------------------
# Layers. Legend: B batch, T new tokens, L keys visible (cache prefix + T), C = d_model.


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache this layer owns
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.qk_norm = cfg.qk_norm
        # one matmul for q, k and v: rows [q (n_head*hd); k (n_kv_head*hd); v (n_kv_head*hd)]
        qkv_out = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x)  # (B, T, (n_head + 2 * n_kv_head) * head_dim)
        if self.qk_norm or rope is not None:
            # q and k are adjacent heads of qkv: normalised and rotated together, per head, with the same
            # values as one at a time in half the ops
            qk, v = qkv.split([(H + Hkv) * D, Hkv * D], dim=-1)
            qk = qk.view(B, T, H + Hkv, D)
            if self.qk_norm:  # bounded attention logits: tolerates the higher learning rates of a speedrun
                # CPU: torch runs F.rms_norm as separate ops there (HeadRMSNorm is 2.5x faster); CUDA has a
                # fused kernel for it
                qk = HeadRMSNorm.apply(qk) if qk.device.type == "cpu" else F.rms_norm(qk, (D,))
            if rope is not None:  # rotary positions (Llama); learned positions were added to x already
                qk = apply_rope(qk, *rope)
            q, k = qk.split([H, Hkv], dim=2)  # (B, T, n_head | n_kv_head, head_dim)
        else:
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = q.view(B, T, H, D)  # (B, T, n_head, head_dim)
            k = k.view(B, T, Hkv, D)  # (B, T, n_kv_head, head_dim)
        v = v.view(B, T, Hkv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_head | n_kv_head, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv_head, L, head_dim)
        if T == 1 and mask is None and not self.training and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = decode_attention(q, k, v)  # (B, n_head, 1, head_dim)
        else:
            # Without an explicit mask, T == L (no cache or an empty one: plain causal) or T == 1 (one
            # decoded token sees every cached key); SDPA's is_causal then picks its fastest kernel.
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and T > 1,
                enable_gqa=Hkv != H,
            )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, n_head * head_dim)
        return self.proj(y)


def decode_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention of one new token per head, q (B, n_head, 1, head_dim), over all of k, v (B, n_kv_head, L,
    head_dim): SDPA's result written as two matmuls and a float32 softmax.

    Used for a compiled CPU decode step (`generate --compile`), where inductor fuses these into its own
    loops while SDPA stays one opaque ATen call of ~25 us a layer: 1.51 -> 1.40 ms per token of the 10.8M
    model. Eager decoding keeps SDPA, which is faster there. A group of queries sharing a k/v head
    becomes that head's rows, so GQA needs no repeated keys.
    """
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    scores = q.reshape(B, Hkv, H // Hkv, D) @ k.transpose(-1, -2) * D**-0.5  # (B, n_kv_head, group, L)
    weights = scores.float().softmax(dim=-1).to(v.dtype)
    return (weights @ v).reshape(B, H, 1, D)


class ReLUSquared(torch.autograd.Function):
    """relu(x)^2 with a one-op backward: grad * 2 relu(x), from the saved relu(x) (which is 0 where x <= 0).

    Autograd on `F.relu(x).square()` saves two tensors and runs pow-backward (3 ops) then threshold-backward;
    this saves one and runs two multiplications, with bit-identical values and gradients (tested):
    2.6 -> 0.9 ms for a speedrun MLP activation (32 x 32 x 512) forward + backward on 2 CPU threads.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        return grad * (2 * r)


class HeadRMSNorm(torch.autograd.Function):
    """x / sqrt(mean(x^2) + eps) over the last dimension, no gain: QK-norm's per-head normalisation.

    `F.rms_norm` without a weight, in 4 element-wise passes instead of ~12: on CPU torch runs it as
    separate pow / mean / rsqrt / mul ops, and autograd differentiates each. Here the forward takes a
    norm and one multiplication, and the backward uses the closed form dx = r (dy - y mean(dy y)) with
    r = 1 / rms(x): one dot product per row and one fused multiply-add. Measured on 2 CPU threads, a
    speedrun layer's q and k (40 x 32 x 8 x 32): 1.88 -> 0.76 ms forward + backward. Equal to
    `F.rms_norm` up to float rounding (tested); eps is its default, the dtype's machine epsilon, and r
    is computed in (at least) float32 for bf16 inputs, as `F.rms_norm` does.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc).square_().div_(x.shape[-1])
        r = ms.add_(torch.finfo(x.dtype).eps).rsqrt_()  # (..., 1), float32 or float64
        y = (x * r).to(x.dtype)
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: Tensor) -> Tensor:
        y, r = ctx.saved_tensors
        dot = torch.linalg.vecdot(dy, y, dim=-1).unsqueeze(-1).div_(y.shape[-1])  # mean(dy * y) per row
        return torch.addcmul(dy, y, dot, value=-1).mul_(r).to(dy.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.relu2 = cfg.mlp == "relu2"
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"
        # swiglu: fc computes [gate; up] in one matmul, split below
        self.fc = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.ff_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, d_ff) or (B, T, 2 * d_ff)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # (B, T, d_ff)
        elif self.relu2:
            h = ReLUSquared.apply(h)  # (B, T, d_ff)
        else:
            # exact (erf) GELU as nanoGPT (HF "gelu"), or GPT-2's tanh form (HF "gelu_new"): they differ by
            # < 1e-3; the exact one is faster on CPU (12x64x512 forward + backward, torch 2.13, 1 thread, AVX2
            # host: 1.37 ms, the tanh form 2.15 through a sigmoid (layers.GeluTanh), 3.34 as ATen's kernel)
            h = gelu(h, approximate=self.approximate)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)  # residual dropout (a no-op call when p == 0)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        # dropout in eval mode or with p = 0 returns its input unchanged (no autograd node), so skipping
        # the call changes nothing but the ~3 us it costs per call when decoding one token at a time
        a = self.attn(self.norm1(x), rope, mask, cache)
        x = x + (self.drop(a) if self.training and self.drop.p > 0 else a)
        m = self.mlp(self.norm2(x))
        x = x + (self.drop(m) if self.training and self.drop.p > 0 else m)
        return x


# --------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """Decoder-only Transformer; see the module docstring for the layout and parameter names."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        require_vocab_size(cfg.vocab_size)
        self.cfg = cfg
        # PyTorch layers draw their default init from the global RNG on CPU but not on the meta
        # device; forking it keeps `manual_seed(s); GPT(cfg).init_weights()` device-independent.
        with torch.random.fork_rng(devices=[]):
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            if cfg.pos_emb == "learned":
                self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
            else:
                self.pos_emb = None
                cos, sin = rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
                self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim)
                self.register_buffer("rope_sin", sin, persistent=False)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
            self.norm_f = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
            if cfg.tie_embeddings:
                self.lm_head = None  # logits use tok_emb.weight (see the module docstring)
            else:
                self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter and buffer in place, deterministically given the torch RNG.

        Linear and embedding weights ~ N(0, init_std); the two residual output projections of each
        block (attn.proj, mlp.proj) ~ N(0, init_std / sqrt(2 * n_layer)) so the residual stream's
        variance does not grow with depth (GPT-2), or 0 with `zero_init_proj`; biases 0; norm weights 1.
        Also recomputes the rotary tables, so meta-device `GPT(cfg)` + `to_empty()` + `init_weights()` is complete.
        """
        std = self.cfg.init_std
        resid_std = 0.0 if self.cfg.zero_init_proj else std / math.sqrt(2 * self.cfg.n_layer)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=std)
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb.weight, mean=0.0, std=std)
        for block in self.blocks:
            for linear, s in (
                (block.attn.qkv, std),
                (block.attn.proj, resid_std),
                (block.mlp.fc, std),
                (block.mlp.proj, resid_std),
            ):
                if s > 0:
                    nn.init.normal_(linear.weight, mean=0.0, std=s)
                else:  # zero_init_proj
                    nn.init.zeros_(linear.weight)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            block.norm1.reset_parameters()  # weight 1 (bias 0)
            block.norm2.reset_parameters()
        self.norm_f.reset_parameters()
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        if self.pos_emb is None:
            cos, sin = rope_cos_sin(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta, self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, idx: Tensor, cache: KVCache | None = None, pad: Tensor | None = None) -> Tensor:
        """Next-token logits for every position.

        Args:
            idx: token ids, (B, T) int64.
            cache: optional KV cache (from `new_cache`); idx then holds positions [cache.pos, cache.pos + T),
                their keys/values are appended and `cache.pos` advances by T.
            pad: optional (B,) int64 left-padding counts of a ragged batch (`generate.generate_batch`):
                row b's first pad[b] slots are padding, its tokens sit at positions slot - pad[b] (the
                positions an unpadded run gives them) and no query attends to a padding key.

        Returns:
            logits (B, T, vocab_size), in the dtype of the weights (or of autocast).
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        mask = None
        if pad is not None:  # ragged batch: per-row positions and a padding-aware causal mask
            slots = torch.arange(start, start + T, device=idx.device)  # (T,) absolute cache slots of the queries
            pos = (slots - pad[:, None]).clamp(min=0)  # (B, T); padding slots get position 0 (never seen)
            if self.pos_emb is not None:
                x = x + self.pos_emb.weight[pos]  # (B, T, C): the rows the unpadded run adds
            else:
                rope = self.rope_tables(pos)  # (B, T, n_head + n_kv_head, head_dim) each
            keys = torch.arange(start + T, device=idx.device)  # (L,)
            # query i sees key j <= i that is not padding; a padding query sees itself (a row of all
            # -inf would give NaN, which 0 attention weights cannot cancel in att @ v)
            mask = (keys <= slots[:, None]) & ((keys >= pad[:, None, None]) | (keys == slots[:, None]))  # (B, T, L)
            mask = mask[:, None]  # (B, 1, T, L): broadcast over heads
        elif self.pos_emb is not None:
            x = x + self.pos_emb.weight[start : start + T]  # (T, C) rows broadcast over B: a slice, no lookup
        else:
            rope = self.rope_tables(start, T)  # (T, n_head + n_kv_head, head_dim) each
        if self.training and self.drop.p > 0:
            x = self.drop(x)
        if pad is None and cache is not None and start > 0 and T > 1:
            # a chunk appended after cached tokens: query i (absolute start + i) sees keys 0..start + i.
            # SDPA's is_causal aligns the triangle top-left, which is wrong when L > T.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)  # (T, L)
        for block in self.blocks:
            x = block(x, rope, mask, cache)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        x = self.norm_f(x)
        if self.lm_head is None:
            logits = F.linear(x, self.tok_emb.weight)  # tied: (B, T, vocab_size)
        else:
            logits = self.lm_head(x)  # (B, T, vocab_size)
        return logits

    def rope_tables(self, pos: Tensor | int, length: int = 0) -> tuple[Tensor, Tensor]:
        """Rotary cos/sin rows for positions `pos` ((B, T) ids: (B, T, heads, head_dim)) or for the `length`
        positions from `pos` on (an int: (length, heads, head_dim)), expanded over the n_head + n_kv_head query
        and key heads that `apply_rope` rotates together, and contiguous: 1.8 ms of a 33 ms speedrun step
        faster than broadcasting (T, 1, head_dim). The int form narrows the table: a slice object would make
        torch.compile specialise a decode graph to each position (a recompile per token)."""
        heads = self.cfg.n_head + self.cfg.kv_heads

        def rows(table: Tensor) -> Tensor:
            t = table[pos] if isinstance(pos, Tensor) else table.narrow(0, pos, length)  # (..., T, head_dim)
            return t.unsqueeze(-2).expand(*t.shape[:-1], heads, t.shape[-1]).contiguous()

        return rows(self.rope_cos), rows(self.rope_sin)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for this model (max_len defaults to max_seq_len), on the weights' device/dtype."""
        weight = self.tok_emb.weight
        return KVCache(
            n_layer=self.cfg.n_layer,
            batch_size=batch_size,
            n_kv_head=self.cfg.kv_heads,
            max_len=max_len or self.cfg.max_seq_len,
            head_dim=self.cfg.head_dim,
            device=weight.device,
            dtype=weight.dtype,
        )

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (a tied matrix counted once).

        non_embedding=True follows Kaplan et al. (2020): leave out the token and position embedding
        tables. A tied output head *is* the token table, so it is left out too; an untied `lm_head`
        is an ordinary matmul and counts.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context length seq_len.

        6 * N_matmul + 12 * n_layer * d_model * seq_len (Kaplan's 6N plus PaLM's attention term, as in
        nanoGPT's MFU estimate): N_matmul counts every weight that is multiplied (all linear layers and
        the output projection, tied or not), not biases, norms or embedding lookups; the attention term
        is q @ k^T and att @ v over the full seq_len (the causal mask's saving is ignored by convention).
        """
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        if self.lm_head is None:
            n_matmul += self.tok_emb.weight.numel()  # the tied output projection is still a matmul
        return 6.0 * n_matmul + 12.0 * self.cfg.n_layer * self.cfg.d_model * seq_len
