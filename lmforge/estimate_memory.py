"""Parameters, FLOPs and memory per device of a GPT/Llama-style training step, from the model config alone.

The arithmetic under `lmforge.estimate` (which adds hardware, time, communication and cost) and
`lmforge.estimate_adapt` (the fine-tuning modes on a frozen base); `lmforge.estimate_device` checks a model
against this machine's memory with it. Torch-free: the CLI's parser reads `estimate_adapt.ADAPT_MODES`, which
builds on this module, without loading torch.

Parameters are counted analytically and match `GPT(cfg).num_params()` exactly (tests check every
preset and every architecture switch). FLOPs use the same convention as `GPT.flops_per_token`:
6 * N_matmul + 12 * n_layer * d_model * seq_len (Kaplan et al. 2020 plus PaLM's attention term).

Memory, per device, for *our* loop (fp32 weights, fp32 gradients, optional bf16/fp16 autocast):
- weights 4 B/param (+ the rotary buffers, 2 x max_seq_len x head_dim fp32); gradients 4 B/param; optimizer:
  AdamW 2 fp32 moments (8 B/param), SGD with momentum 1 (4 B/param), without momentum 0; Muon one momentum buffer
  for the hidden matrices (4 B/param) and AdamW's two moments for embeddings, head, norms and biases (8 B/param).
- autocast copies: under bf16/fp16 autocast every matmul weight is cast once per forward and the
  copy is saved for backward (2 B per matmul weight); 0 in fp32.
- activations, per micro-batch, at their peak (the start of backward). Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", https://arxiv.org/abs/2205.05198,
  section 4.1) give s*b*h*(34 + 5*a*s/h) bytes per layer for a GPT block with 16-bit activations and
  dropout: 4sbh for the two LayerNorm inputs, 11sbh + 5as^2b for attention (QKV input 2, Q and K 4,
  V 2, output 2, dropout mask 1; softmax 2, its dropout mask 1, dropout output 2 per score), 19sbh for
  the MLP (input 2, GELU input 8, GELU output 8, dropout mask 1). Our block differs, and the formula
  below follows what autograd really saves (checked tensor by tensor in tests/test_estimate.py):
    * attention is SDPA: the flash / memory-efficient kernels keep q, k, v, the output and a fp32
      logsumexp (4 B per head per token) and no s x s matrix, so the 5as^2b term is gone. The one
      exception is dropout > 0 on CPU: PyTorch's CPU flash kernel has no dropout, SDPA falls back to
      the math path, which keeps fp32 copies of q, k, v and three fp32 s x s maps per head (scores
      after softmax, dropout noise, dropout output): 12*a*s^2*b bytes per layer.
    * the residual stream stays fp32 under autocast (fp32 embeddings + low-precision branch outputs
      promote to fp32), so the two norm inputs cost 4 B each, not 2; LayerNorm also keeps fp32 mean and
      rstd (8 B/token), RMSNorm (a composite op on CPU) its fp32 normalized input plus rsqrt.
    * q, k, v are one fused projection, kept whole (v is a view of it): (n_head + 2 n_kv_head) * head_dim
      values per token; rotary positions add the rotated q and k, and the cos/sin tables they are multiplied
      by (`rope_kept_bytes`: 2 x seq_len x (n_head + n_kv_head) x head_dim fp32, once, or each layer's cast
      copy under autocast; left out, a 4-layer Llama at 256 positions kept 8.6% more in bf16 than predicted).
    * SwiGLU keeps the fused [gate; up] output, silu(gate) and the product: 4 * d_ff values per token
      (GELU: input and output, 2 * d_ff).
    * dropout defaults to 0, and `F.dropout(p=0)` saves nothing; with dropout > 0 each of the two
      residual dropouts keeps a mask (1 B on CUDA, the tensor's dtype on CPU) and so does the
      embedding dropout.
  On top of the layers: the final norm and head input, the fp32 log-probabilities cross-entropy saves,
  and, at the start of backward, two fp32 logits-sized gradients (of nll and of log-softmax): 4 + 8 bytes
  per token per vocabulary entry. For small models with a big vocabulary this term dominates. The logits
  themselves are not kept: the objective (`objectives.CausalLM.loss`) returns only the loss, and neither
  the head matmul nor log-softmax saves them (counting them over-predicted a 4x64-token, 50,257-vocabulary
  step's allocator peak by 33% instead of 7%).
- activations_checkpointed: what activation checkpointing per block (`train.activation_checkpointing`)
  leaves: the block inputs (fp32 residual, 4*s*b*h per layer) + one block recomputed + the head and loss
  terms above. Measured against the allocator (6 layers, d_model 64, 8 x 64 tokens, vocab 64): total
  checkpointed 8.11 MiB predicted, 7.21 MiB allocated with checkpointing (17.43 / 16.33 MiB without).
- comm_buffers: DDP (world_size > 1) keeps gradient buckets as big as the gradients (its default,
  gradient_as_bucket_view=False); FSDP (FSDP2 `fully_shard` per block and on the root, fp32 params)
  gathers the largest unit's full parameters for the current and the prefetched unit and its full
  gradient before the reduce-scatter: 3 x 4 B x the largest unit.
- FSDP divides weights, gradients and optimizer state by world_size; activations are per device.
- DiLoCo (`dist.DiLoCo`, any world size): workers are not DDP-wrapped, so no gradient buckets; each keeps
  the outer state, the anchor (the parameters at the last sync) and the outer Nesterov momentum, fp32
  (outer_state: 8 B/param), and a sync builds the flat outer gradient it all-reduces (comm_buffers:
  4 B/param; the per-parameter differences it is concatenated from briefly double that, but gradients are
  freed by then, so the total still bounds the sync's peak).
- comm_bytes, each device's traffic over the run, sent and received: twice the bytes it sends in the
  collectives of `estimate.communication` (a ring collective receives as much as it sends), for every step
  (DiLoCo: every sync, ceil(steps / H)); 0 on one device. `dist.DiLoCo.comm_report`, which a DiLoCo run
  prints, counts its syncs' traffic the same way (`dist.all_reduce_traffic`).
- update_copy: on a logging step the loop copies the trainable parameters (fp32, this device's shard)
  before the optimizer step, for the update ratio; activations are freed by then, so it counts instead
  of them when it is larger (a tiny batch: 20.6 B/param measured against 16.7 predicted without it),
  and, one weight at a time, that weight's update (p - copy): the largest parameter's 4 B/element
  (without it, -2.1% (GPT-2) and -3.2% (Llama) of the allocator's peak of a 1 x 16-token step, d_model 128).
- total = the sum, with the larger of activations + autocast copies (freed as backward ends) and update_copy
  (`with_totals`). Gradients grow while activations
  are freed during backward, so for a single micro-batch the sum is an upper bound of the measured peak;
  with gradient accumulation the gradients of earlier micro-batches are all alive during the next one,
  and the sum is the peak.
  `micro_batch_size` is taken per device (each rank runs forward on that many sequences).

References:
- Kaplan et al. 2020, scaling laws, 6N FLOPs, non-embedding parameters: https://arxiv.org/abs/2001.08361
- Chowdhery et al. 2022 (PaLM), appendix B, attention FLOPs: https://arxiv.org/abs/2204.02311
- Korthikanti et al. 2022, activation memory: https://arxiv.org/abs/2205.05198
"""

from __future__ import annotations

import dataclasses
import math

from lmforge.config import OptimConfig
from lmforge.models.configs import GPTConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# --------------------------------------------------------------------------------------------
# Parameters and FLOPs (pure functions of the model config)


def param_counts(model: GPTConfig) -> dict[str, int]:
    """Parameter counts of `GPT(model)` without building it (a tied matrix counted once).

    Returns:
        total, non_embedding (Kaplan: without the token and position tables, so a tied head is left
        out too), embedding, matmul (weights that are multiplied, incl. the output projection tied or
        not: the N of 6N), block (one Transformer block), block_matmul (its Linear weights) and root
        (everything outside the blocks).
    """
    d, ff, vocab = model.d_model, model.ff_dim, model.vocab_size
    qkv_out = (model.n_head + 2 * model.kv_heads) * model.head_dim
    attn_in = model.n_head * model.head_dim
    fc_out = (2 if model.mlp == "swiglu" else 1) * ff  # swiglu: [gate; up] in one matrix
    norm = d * (2 if model.norm == "layernorm" and model.bias else 1)  # RMSNorm: weight only
    block_matmul = d * qkv_out + attn_in * d + d * fc_out + ff * d
    block_bias = (qkv_out + d + fc_out + d) if model.bias else qkv_out if model.qkv_bias else 0
    block = block_matmul + block_bias + 2 * norm
    embedding = vocab * d + (model.max_seq_len * d if model.pos_emb == "learned" else 0)
    head = 0 if model.tie_embeddings else vocab * d
    root = embedding + norm + head
    return {
        "total": model.n_layer * block + root,
        "non_embedding": model.n_layer * block + norm + head,
        "embedding": embedding,
        "matmul": model.n_layer * block_matmul + vocab * d,
        "block": block,
        "block_matmul": block_matmul,
        "root": root,
    }


def flops_per_token(model: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_matmul + 12 * n_layer * d_model * seq_len (as `GPT.flops_per_token`)."""
    return 6.0 * param_counts(model)["matmul"] + attention_flops_per_token(model, seq_len)


def attention_flops_per_token(model: GPTConfig, seq_len: int) -> float:
    """The attention-score part of `flops_per_token`: q @ k^T and att @ v, forward and backward (PaLM)."""
    return 12.0 * model.n_layer * model.d_model * seq_len


# --------------------------------------------------------------------------------------------
# Memory


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepShape:
    """What one device runs in a training step, which every memory plan (pretraining, full, LoRA, head-only, prompt
    tuning, distillation) takes: `seq_len` tokens per sequence, `micro_batch` sequences per forward, `dtype` the
    autocast dtype name ("float32" = no autocast) and `device` "cpu" or "cuda"."""

    seq_len: int
    micro_batch: int
    dtype: str
    device: str


def rope_buffer_bytes(model: GPTConfig) -> int:
    """The model's rotary buffers (`rope_cos`, `rope_sin`: fp32, max_seq_len x head_dim each); 0 without rotary
    positions. (Counted as max_seq_len x head_dim / 2 until 2026-11: half the buffers.)"""
    return 2 * model.max_seq_len * model.head_dim * 4 if model.pos_emb == "rope" else 0


def rope_table_bytes(model: GPTConfig, positions: int) -> int:
    """The fp32 cos and sin rows of one forward (`GPT.rope_tables`: expanded over the query and key heads, made
    contiguous, shared by every sequence of the batch); 0 without rotary positions."""
    if model.pos_emb != "rope":
        return 0
    return 2 * positions * (model.n_head + model.kv_heads) * model.head_dim * 4


def rope_kept_bytes(model: GPTConfig, step: StepShape, positions: int | None = None) -> int:
    """What autograd keeps of the rotary tables for backward (`layers.apply_rope` multiplies q and k by them): the
    fp32 pair, shared by every layer, or under autocast each layer's cast copy (`cos.to(x.dtype)`). Over
    `positions` (default: step.seq_len). Llama-style 4 layers, 256 positions, bf16: 384 KiB, 8.6% of the tensors a
    tiny step saves; 32 layers, 8192 positions, 40 heads of 128 in bf16: 5.0 GiB."""
    tables, e = rope_table_bytes(model, step.seq_len if positions is None else positions), DTYPE_BYTES[step.dtype]
    return tables if e == 4 else model.n_layer * tables // 4 * e


def largest_param(model: GPTConfig) -> int:
    """Elements of the model's largest parameter: the token table (or an untied head, the same size), the learned
    position table or one block's largest Linear."""
    qkv_out = (model.n_head + 2 * model.kv_heads) * model.head_dim
    fc_out = (2 if model.mlp == "swiglu" else 1) * model.ff_dim
    learned = model.max_seq_len if model.pos_emb == "learned" else 0
    d = model.d_model
    return max(model.vocab_size, learned, qkv_out, fc_out, model.n_head * model.head_dim) * d


def uses_math_attention(model: GPTConfig, device: str) -> bool:
    """Whether SDPA falls back to its math path (s x s maps kept): dropout > 0 on CPU, whose flash kernel has none."""
    return device == "cpu" and model.dropout > 0


def activation_bytes(model: GPTConfig, step: StepShape) -> dict[str, int]:
    """Activation memory of one micro-batch at the start of backward, by part (formula in the module docstring).

    Args:
        model: model config (vocab_size > 0).
        step: the tokens, dtype and device of one forward.

    Returns:
        per_layer (one block's saved tensors), layers (all blocks + the embedding dropout mask + the rotary
        tables, `rope_kept_bytes`), head
        (final norm, head input, log-probs, token ids and targets), loss_backward (the two fp32 logits-sized
        gradients at the start of backward), total,
        block_inputs (the fp32 block inputs kept under checkpointing) and checkpointed.
    """
    e, device = DTYPE_BYTES[step.dtype], step.device  # matmul inputs and outputs (autocast dtype)
    r = 4  # the residual stream stays fp32 under autocast
    s, b, h, ff, vocab = step.seq_len, step.micro_batch, model.d_model, model.ff_dim, model.vocab_size
    q = model.n_head * model.head_dim
    kv = model.kv_heads * model.head_dim
    mask = (e if device == "cpu" else 1) if model.dropout > 0 else 0  # dropout mask bytes per element

    # one norm: its input (the residual stream) + LayerNorm mean/rstd, or RMSNorm's rsqrt + normalized input
    norm = r * h + (8 if model.norm == "layernorm" else 4 + r * h)
    per_token = 2 * norm  # [Korthikanti: 4sbh for the two LayerNorm inputs]
    per_token += 2 * e * h  # inputs of qkv and of the MLP's fc [2sbh each]
    if uses_math_attention(model, device):
        per_token += 4 * 3 * q  # fp32 copies of q, k, v (k, v expanded to n_head) [Q, K, V: 6sbh]
        per_token += e * q  # output, reshaped for proj [2sbh]
        per_seq_scores = 12 * model.n_head * s * s  # softmax output, dropout noise, dropout output, fp32 [5as^2b]
    else:
        per_token += e * (q + 2 * kv)  # the fused q/k/v projection output, kept whole [Q, K, V: 6sbh]
        if model.pos_emb == "rope":
            per_token += e * (q + kv)  # rotated q and k
        per_token += e * q + 4 * model.n_head  # SDPA output (= proj input) and fp32 logsumexp [2sbh]
        per_seq_scores = 0  # flash / memory-efficient kernels keep no s x s matrix
    per_token += e * (4 * ff if model.mlp == "swiglu" else 2 * ff)  # [GELU input and output: 16sbh]
    per_token += 2 * mask * h  # the two residual dropouts [attention and MLP dropout masks: 2sbh]
    per_layer = s * b * per_token + b * per_seq_scores

    layers = model.n_layer * per_layer + s * b * mask * h  # + the embedding dropout mask
    layers += rope_kept_bytes(model, step)
    head = s * b * (norm + e * h + 4 * vocab + 16)  # final norm, head input, fp32 log-probs, int64 ids + targets
    loss_backward = s * b * 8 * vocab
    block_inputs = model.n_layer * s * b * r * h
    tables = rope_table_bytes(model, s)
    tail = head + loss_backward
    return {
        "per_layer": per_layer,
        "layers": layers,
        "head": head,
        "loss_backward": loss_backward,
        "total": layers + tail,
        "block_inputs": block_inputs,
        # + the fp32 rotary tables (the checkpointed blocks' inputs) and one block's cast copy under autocast
        "checkpointed": block_inputs + per_layer + tail + tables + (0 if e == 4 else tables // 4 * e),
    }


def memory_bytes(
    model: GPTConfig, optim: OptimConfig, step: StepShape, *, world_size: int = 1, strategy: str = "ddp"
) -> dict[str, int]:
    """Bytes per device of one training step, by component (see the module docstring for each term).

    Returns:
        weights, gradients, optimizer, autocast_copies, comm_buffers, outer_state (DiLoCo), activations,
        activations_checkpointed, update_copy, total and total_checkpointed.
    """
    counts = param_counts(model)
    n = counts["total"]
    shards = world_size if strategy == "fsdp" else 1
    if optim.name == "adamw":
        state_floats = 2 * n  # exp_avg, exp_avg_sq
    elif optim.name == "muon":  # one momentum buffer per hidden matrix, AdamW's two moments for the rest
        hidden = model.n_layer * counts["block_matmul"]  # (optim.muon_groups: every Linear but lm_head)
        state_floats = hidden + 2 * (n - hidden)
    else:
        state_floats = n if optim.momentum > 0 else 0  # momentum_buffer
    if strategy == "diloco":  # (module docstring) the flat outer gradient of a sync, on one worker too
        comm = 4 * n
    elif world_size == 1:
        comm = 0
    elif strategy == "ddp":
        comm = 4 * n  # gradient buckets
    else:
        comm = 3 * 4 * max(counts["block"], counts["root"])  # gathered params (current + prefetch) + full grads
    act = activation_bytes(model, step)
    dtype = step.dtype
    out = {
        "weights": math.ceil(4 * n / shards) + rope_buffer_bytes(model),
        "gradients": math.ceil(4 * n / shards),
        "optimizer": math.ceil(4 * state_floats / shards),
        "autocast_copies": 0 if dtype == "float32" else DTYPE_BYTES[dtype] * counts["matmul"],
        "comm_buffers": comm,
        "outer_state": 2 * 4 * n if strategy == "diloco" else 0,  # anchor + outer momentum (dist.DiLoCo)
        "activations": act["total"],
        "activations_checkpointed": act["checkpointed"],
        # the log step's copy of the weights and one weight's update (p - copy) at a time (loop._update_ratio)
        "update_copy": math.ceil(4 * n / shards) + math.ceil(4 * largest_param(model) / shards),
    }
    return with_totals(out)


def with_totals(memory: dict[str, int]) -> dict[str, int]:
    """`memory` with its total and total_checkpointed: what lives through the whole step (weights, gradients,
    optimizer and outer state, communication buffers) + the larger of what forward and backward hold (activations
    and the autocast copies, which the graph frees as backward ends) and the log step's update copy (made after
    them). The autocast copies were counted through the update: a bf16 step whose peak is that copy was planned
    +9.6% over the allocator's peak (1 x 64 tokens, d_model 128), now within 0.1%."""
    fixed = sum(memory.get(k, 0) for k in ("weights", "gradients", "optimizer", "comm_buffers", "outer_state"))
    copies, update = memory["autocast_copies"], memory["update_copy"]
    memory["total"] = fixed + max(memory["activations"] + copies, update)
    memory["total_checkpointed"] = fixed + max(memory["activations_checkpointed"] + copies, update)
    return memory


# --------------------------------------------------------------------------------------------
# Numbers for people (estimate_device.check_fits, and the console table in lmforge.estimate_table)


def format_count(n: float) -> str:
    if abs(n) >= 1e15:  # (1e30 tokens read "1000000000000000000.00T")
        return f"{n:.3g}"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def format_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g} B"
