"""Compute planning: parameters, FLOPs, memory, time and cost of a training run, from its config alone.

`estimate(cfg, tokens=...)` answers "how big is this model, how much memory does a training step
need per device, and how long and how much money will `tokens` tokens take on this hardware?"
without building the model. `measure_matmul_flops` (the machine's measured matmul peak, which
training reports MFU against) lives here too. The fine-tuning plans on a frozen base (LoRA, head-only, prompt
tuning, and reading a fine-tune's finetune.json) are in `lmforge.estimate_adapt`, which reuses these terms.
The console table (`format_estimate`) is in `lmforge.estimate_table`.
(~1,000 lines, over the 800 of the house style: about 140 are this docstring, the derivation of every term, which
belongs beside the arithmetic it explains; hardware, time and communication (~300 lines) would be the next split.)

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
  collectives of `communication` (below; a ring collective receives as much as it sends), for every step
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

Time = compute + the communication not hidden behind it; cost = hours x price per device-hour x world_size.
Compute = train FLOPs / (peak FLOP/s x MFU x world_size). Communication (`communication`), with an interconnect
(`--interconnect`: a preset of `INTERCONNECTS` or a link speed, each way per device; none: not included): the
bytes each device sends in one sync / the link's bandwidth, ring algorithms throughout (NCCL's bus bandwidth):
- DDP: one all-reduce of the fp32 gradients per step (on the last micro-batch: `no_sync` before it):
  2 (n-1)/n x 4 B/param. It runs bucket by bucket during that micro-batch's backward (2/3 of its FLOPs), so
  only what does not fit in that backward is added, and never less than the last bucket (DDP's 25 MiB
  bucket_cap_mb: the first layers' gradients, ready when backward ends).
- FSDP (FSDP2, `dist.wrap_model`): every micro-batch all-gathers the parameters in the autocast dtype in
  forward and the blocks' again in backward (the root stays gathered after forward), and the last
  reduce-scatters the fp32 gradients: (n-1)/n x (accumulation x dtype bytes x (2 x params - root params) +
  4 B/param) per step. Prefetching overlaps the gathers with compute: what exceeds the step's compute is added.
- DiLoCo: one all-reduce of the flat fp32 outer gradient per sync (2 (n-1)/n x 4 B/param), every
  dist.sync_every steps and at the last; the workers wait for it, so all of it is added.
Latency, the DDP buffer broadcast (the small rotary tables) and NCCL reaching ~70-90% of a link's rate are
left out: the communication time is a lower bound.
Peaks: "cpu"/"measure" are measured here (`measure_matmul_flops`), "a100"/"h100" come from NVIDIA's
datasheets (dense, no sparsity), a number is the user's GFLOP/s. Default MFU and prices are stated
assumptions (see `DEFAULT_MFU`, `PRICE_PER_HOUR`); every assumption made ends up in the result's
"assumptions" list, which `format_estimate` prints.

MFU = achieved model FLOP/s / peak FLOP/s. Datasheet peaks say little about a shared 2-core VM
(AVX2 hosts reach ~79 GFLOP/s fp32, AVX-512 ones ~186), so the CPU peak is *measured* on the same
machine in the same process: the best of several square matmuls at the training dtype.

References:
- Kaplan et al. 2020, scaling laws, 6N FLOPs, non-embedding parameters: https://arxiv.org/abs/2001.08361
- Chowdhery et al. 2022 (PaLM), appendix B, attention FLOPs: https://arxiv.org/abs/2204.02311
- Korthikanti et al. 2022, activation memory: https://arxiv.org/abs/2205.05198
- Hoffmann et al. 2022 (Chinchilla), ~20 tokens per parameter: https://arxiv.org/abs/2203.15556
- NVIDIA A100 datasheet: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
- NVIDIA H100 datasheet: https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

from lmforge.config import OptimConfig, RunConfig
from lmforge.dist_config import local_world_size, ring_all_reduce_bytes
from lmforge.errors import ConfigError
from lmforge.models.configs import GPTConfig

if TYPE_CHECKING:  # torch loads in the functions that use it (building the CLI's parser imports this module)
    import torch

DEFAULT_VOCAB = 50257  # GPT-2's BPE vocabulary, assumed when model.vocab_size is 0 and no data.dir is given
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal training uses ~20 tokens per parameter
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STRATEGIES = ("ddp", "fsdp", "diloco")

# Dense peak FLOP/s per GPU from NVIDIA's datasheets (sparsity doubles the tensor-core numbers; we
# never use it). A100 (SXM and PCIe alike): 312 TFLOP/s bf16/fp16 tensor core, 19.5 TFLOP/s plain
# fp32 (our loop does not enable TF32, whose tensor-core peak is 156). H100 SXM5: 989 TFLOP/s
# bf16/fp16 tensor core, 67 TFLOP/s fp32 (PCIe cards are lower: 756 / 51).
PEAK_FLOPS = {
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
}
# Model FLOPs utilization assumed when the caller gives none. GPUs: 0.4 of the datasheet peak, measured
# with bench/train_speed.py for GPT-2 124M on one H100 in bf16 with `--train.compile true`: 0.39-0.41
# at 32-64 x 1024 tokens per step, 0.43-0.44 on an H200 (eager: 0.27; nanoGPT / PaLM report 0.4-0.5 at
# larger scale). CPU: 0.45, measured
# with bench/train_speed.py: the `small` preset reached 49% of the measured fp32 matmul peak on a
# 2-vCPU AVX-512 VM (quickstart 40-52%, tiny 22-29%: tiny models are overhead-bound, see
# bench/estimate_vs_measured.py).
DEFAULT_MFU = {"cpu": 0.45, "cuda": 0.4}
# On CPU a narrower model reaches less of the peak (its matmuls are small, and norms, the optimizer and
# Python take a larger share): the CPU default is scaled by d_model / 128 below this width (tiny, 64 wide:
# 0.225 for the 17-29% measured; quickstart, 128 wide: 40-52%; small, 384 wide: 49%).
CPU_FULL_MFU_WIDTH = 128
# Assumed on-demand prices in USD per device-hour (2024-25 cloud list prices vary 2x; pass your own).
PRICE_PER_HOUR = {"a100": 1.8, "h100": 2.5, "cpu": 0.05}
# Link speeds per device, each way, in Gbit/s (signalling rate after line encoding), for `--interconnect`: pass
# the slowest link a device's traffic crosses (across nodes: the network, per GPU). Sources: NVIDIA H100 and
# A100 datasheets (NVLink 900 / 600 GB/s, both ways together), the PCI-SIG 4.0 spec (16 GT/s per lane,
# 128b/130b), NVIDIA ConnectX-7 / DGX H100 (one 400 Gbit/s NDR port per GPU).
INTERCONNECTS = {
    "nvlink": (3600.0, "NVLink 4 (H100 SXM): 450 GB/s each way"),
    "nvlink-a100": (2400.0, "NVLink 3 (A100 SXM): 300 GB/s each way"),
    "pcie": (252.0, "PCIe 4.0 x16: 31.5 GB/s each way"),
    "ib": (400.0, "InfiniBand NDR, one 400 Gbit/s port per GPU"),
    "ethernet": (10.0, "10 Gigabit Ethernet"),
}
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's bucket_cap_mb default
# `--adapt`: what trains. full: every weight (pretraining, full or distillation fine-tuning); the others are
# `lmforge finetune`'s modes on a frozen base (adapt/heads.py set_trainable), as the table names them
ADAPT_NAMES = {"full": "full", "lora": "LoRA", "head": "head only", "prompt": "prompt tuning"}
ADAPT_MODES = tuple(ADAPT_NAMES)


@functools.lru_cache(maxsize=8)
def measure_matmul_flops(device: str = "cpu", dtype: torch.dtype | None = None, seconds: float = 0.3) -> float:
    """Best observed FLOP/s of an n x n @ n x n matmul on `device` at `dtype` (n = 1024 CPU, 8192 GPU:
    large enough to reach a data-centre GPU's plateau, so MFU is not flattered by a low peak); dtype None: float32."""
    import torch

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
    import torch

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


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of `device`: the GPU's own, or the machine's RAM (Linux /proc/meminfo); None where unknown."""
    import torch

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
    import torch

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
        f"the {model.family} model ({_count(model_param_count(model))} parameters: n_layer {model.n_layer}, d_model "
        f"{model.d_model}, vocab_size {model.vocab_size}) needs {needed}{share} for its fp32 weights, gradients "
        f"and {optim.name} state alone, more than the {_bytes(total)} of {where}; use a smaller --model.n_layer, "
        "--model.d_model or --model.vocab_size"
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
        f"ids alone, more than the {_bytes(total)} of {where}; use a smaller --train.batch_size (or "
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
    needed = _bytes(need) if need < 2**50 else f"{need:.3g} bytes"  # (n_layer 1e20 read "72736293077468.88 TiB")
    return needed, "this machine's RAM" if device.type == "cpu" else f"the GPU's memory ({device})"


# --------------------------------------------------------------------------------------------
# Hardware, time, cost


def resolve_hardware(hardware: str | float, dtype: str, train_device: str = "auto") -> dict[str, Any]:
    """Peak FLOP/s and defaults for a hardware name.

    Args:
        hardware: "cpu" (measure this machine's CPU), "measure" (measure `train_device`: the GPU if
            one is visible and train.device is auto/cuda), "a100", "h100", or a peak in GFLOP/s
            (a number or a numeric string).
        dtype: training dtype name, or "auto" (bfloat16 on GPUs, float32 on CPU, as training picks).
        train_device: `train.device`, used by "measure" and to tell whether a given number is a CPU.

    Returns:
        name, device ("cpu" or "cuda"), dtype (resolved), peak_flops, peak_source, default_mfu,
        price_per_hour (None when unknown).
    """
    import torch

    key = hardware.strip().lower() if isinstance(hardware, str) else hardware
    default_mfu: float | None = None
    if key in ("cpu", "measure"):
        device = "cpu"
        if key == "measure":
            from lmforge.train.precision import pick_device

            device = pick_device(train_device, "--train.device").type
            if device not in ("cpu", "cuda"):
                raise ConfigError(f"--hardware measure on {device} is not supported; use --hardware <GFLOPS> instead")
        dtype = _resolve_dtype(dtype, device)
        peak = measure_matmul_flops(device, getattr(torch, dtype))
        name = f"{device} (measured)"
        source = f"measured here: best {dtype} matmul (measure_matmul_flops)"
        price = PRICE_PER_HOUR["cpu"] if device == "cpu" else None
        if device == "cpu" and dtype != "float32":
            # bf16 autocast on a CPU trains small models no faster than fp32 (measured: the quickstart
            # preset ran 15.5k tokens/s in both, 6.8% of the AMX bf16 peak), so assume fp32's speed
            default_mfu = DEFAULT_MFU["cpu"] * measure_matmul_flops("cpu", torch.float32) / peak
    elif key in PEAK_FLOPS:
        device = "cuda"
        dtype = _resolve_dtype(dtype, device)
        peak = PEAK_FLOPS[key][dtype]
        name = key
        source = f"NVIDIA datasheet, dense {dtype}"
        price = PRICE_PER_HOUR[key]
    else:
        try:
            gflops = float(key)
        except (TypeError, ValueError):
            raise ConfigError(
                f"unknown hardware {hardware!r}; use cpu, measure, a100, h100 or a peak in GFLOP/s (e.g. 150)"
            ) from None
        if not math.isfinite(gflops) or gflops <= 0:
            raise ConfigError(f"hardware peak must be a positive number of GFLOP/s, got {hardware!r}")
        # a bare number says nothing of the device, and the device sets the dtype and the default MFU (0.4 on a
        # GPU, 0.45 or less on a CPU): train.device decides, and the name says which it was taken for
        device = "cpu" if train_device == "cpu" else "cuda"
        dtype = _resolve_dtype(dtype, device)
        peak = gflops * 1e9
        name = f"{gflops:g} GFLOP/s {'CPU' if device == 'cpu' else 'GPU'}"
        kind = "CPU" if device == "cpu" else "GPU"
        source = f"given by the user; taken as a {kind}'s {dtype} peak, as --train.device is {train_device}" + (
            "" if device == "cpu" else ": pass --train.device cpu for a CPU"
        )
        price = None
    return {
        "name": name,
        "device": device,
        "dtype": dtype,
        "peak_flops": peak,
        "peak_source": source,
        "default_mfu": default_mfu if default_mfu is not None else DEFAULT_MFU[device],
        "price_per_hour": price,
    }


def resolve_interconnect(interconnect: str | float) -> dict[str, Any]:
    """`--interconnect`: a name in `INTERCONNECTS` or a link speed in Gbit/s -> name, gbps (each way), source."""
    key = interconnect.strip().lower() if isinstance(interconnect, str) else interconnect
    if key in INTERCONNECTS:
        gbps, source = INTERCONNECTS[key]
        return {"name": key, "gbps": gbps, "source": source}
    try:
        gbps = float(key)
    except (TypeError, ValueError):
        raise ConfigError(
            f"unknown interconnect {interconnect!r}; use {', '.join(INTERCONNECTS)} or a link speed in Gbit/s "
            "each way per device (e.g. 100)"
        ) from None
    if not math.isfinite(gbps) or gbps <= 0:
        raise ConfigError(
            f"interconnect speed must be a positive number of Gbit/s, got {interconnect!r}; pass e.g. --interconnect "
            f"100, or one of {', '.join(INTERCONNECTS)}"
        )
    return {"name": f"{gbps:g} Gbit/s", "gbps": gbps, "source": "given by the user"}


def communication(
    counts: dict[str, int],
    *,
    strategy: str,
    world_size: int,
    steps: int,
    sync_every: int,
    accumulation: int,
    gather_bytes: int,
    step_compute_s: float,
    link: dict[str, Any] | None,
) -> dict[str, Any]:
    """Each device's collectives over the run and their time (the rules are in the module docstring).

    Returns:
        interconnect, link_gbps (None: no link given), collectives (what one sync runs), bytes_per_sync (sent by
        each device), syncs (steps, or DiLoCo's syncs), sync_s, time_s (all of it) and exposed_s (the part not
        hidden behind compute, which the run's time_s adds); times are None without a link, 0 on one device.
    """
    n, params = world_size, counts["total"]
    share = (n - 1) / n
    grads = 4 * params  # fp32 gradients (and DiLoCo's fp32 outer gradient)
    if n == 1:
        collectives, sent, syncs, overlap = "none (one device)", 0, 0, ""
    elif strategy == "fsdp":
        collectives = "all-gathers (forward, backward) + reduce-scatter of the fp32 gradients"
        gathered = accumulation * gather_bytes * (2 * params - counts["root"])
        sent, syncs = math.ceil(share * (gathered + grads)), steps
        overlap = "FSDP prefetching overlaps the gathers and reduce-scatters with the step's compute"
    else:
        what = "outer gradient" if strategy == "diloco" else "gradients"
        collectives = f"ring all-reduce of the fp32 {what}, 2(n-1)/n x 4 B/param"
        sent = ring_all_reduce_bytes(grads, n)
        syncs = math.ceil(steps / sync_every) if strategy == "diloco" else steps
        overlap = (
            "DiLoCo's workers wait for each sync: no overlap"
            if strategy == "diloco"
            else "DDP overlaps its bucketed all-reduce with the last micro-batch's backward, but for the last bucket"
        )
    out: dict[str, Any] = {
        "interconnect": link["name"] if link else None,
        "link_gbps": link["gbps"] if link else None,
        "collectives": collectives,
        "bytes_per_sync": sent,
        "syncs": syncs,
        "overlap": overlap,
        "sync_s": None,
        "time_s": None,
        "exposed_s": None,
    }
    if n == 1:
        return {**out, "sync_s": 0.0, "time_s": 0.0, "exposed_s": 0.0}
    if link is None:
        return out
    bandwidth = link["gbps"] * 1e9 / 8  # bytes/s each way
    sync_s = sent / bandwidth
    if strategy == "diloco":
        exposed = sync_s
    elif strategy == "fsdp":
        exposed = max(sync_s - step_compute_s, 0.0)
    else:
        backward_s = 2 / 3 * step_compute_s / accumulation  # the last micro-batch's backward: 4 of its 6 N FLOPs
        last_bucket_s = 2 * share * min(grads, DDP_BUCKET_BYTES) / bandwidth
        exposed = max(sync_s - backward_s, last_bucket_s)
    return {**out, "sync_s": sync_s, "time_s": sync_s * syncs, "exposed_s": exposed * syncs}


def _resolve_dtype(name: str, device: str) -> str:
    if name == "auto":  # as `train.precision.pick_precision`: bf16 on (capable) GPUs, fp32 on CPU
        return "bfloat16" if device == "cuda" else "float32"
    if name == "float16" and device == "cpu":
        raise ConfigError(
            "float16 autocast is not supported for training on CPU; use --train.dtype bfloat16 or float32"
        )
    return name


def estimate(
    cfg: RunConfig,
    *,
    tokens: int,
    hardware: str | float = "cpu",
    mfu: float = 0.0,
    world_size: int = 1,
    strategy: str | None = None,
    price_per_hour: float | None = None,
    interconnect: str | float | None = None,
    adapt: str = "full",
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] | None = None,
    lora_dropout: float | None = None,
    prompt_tokens: int | None = None,
    labels: int = 0,
    teacher: GPTConfig | None = None,
) -> dict[str, Any]:
    """Parameters, FLOPs, memory per device, time and cost of training `cfg.model` on `tokens` tokens.

    Args:
        cfg: the run config; `cfg.model` and the batch in `cfg.train` (and `cfg.optim.name`) are used, and
            `cfg.data.dir`'s tokenizer for the vocabulary when `model.vocab_size` is 0 (as `pretrain` does).
        tokens: training tokens (>= 1; a fraction is cut to a whole number).
        hardware: "cpu", "measure", "a100", "h100" or a peak in GFLOP/s (see `resolve_hardware`).
        mfu: model FLOPs utilization in (0, 1]; 0 = the documented default (`DEFAULT_MFU`).
        world_size: devices training together (data parallel).
        strategy: "ddp" (full replicas), "fsdp" (weights, gradients, optimizer sharded) or "diloco" (replicas
            that sync every `cfg.dist.sync_every` steps); None = `cfg.dist.strategy`.
        price_per_hour: USD per device-hour; None = the assumed default for the hardware (if any).
        interconnect: a name in `INTERCONNECTS` or a link speed in Gbit/s (each way, per device); None = the
            communication time is not included (see `communication`).
        adapt: "full" (every weight trains: pretraining or a full fine-tune) or one of finetune's modes on a frozen
            base, in one process (planned by `estimate_adapt.adapted_plan`): "lora" (`lora_rank` adapters on
            `lora_targets`; see `lora_memory_bytes`), "head" (the head alone; see `head_memory_bytes`) or "prompt"
            (`prompt_tokens` soft-prompt vectors; see `prompt_memory_bytes`). FLOPs per token: LoRA 4 N (forward,
            and backward to the inputs only: no weight gradients) + 6 x the adapters + attention, less the input
            gradients nothing before the first adapter needs (`lora_flops_per_token`); head 2 N (forward)
            + the head's backward; prompt 4 N + attention over the prompt and text positions, per text token.
            `lora_rank`, `lora_targets`, `lora_dropout` (its mask is kept: `lora_dropout_bytes`) and `prompt_tokens`
            default to finetune's (None).
        labels: plan `finetune --task classify` with this many labels (in every mode, full too): a head on the
            last token's state instead of the vocabulary logits; 0 = an LM task (sft, qa, translate, clm).
        teacher: a distillation fine-tune's frozen teacher (`finetune --adapt distill`; adapt full, an LM task, one
            process): its forward FLOPs, weights and the soft targets' memory are added (`estimate_adapt.teacher_plan`).

    Returns:
        A JSON-serializable dict: params, non_embedding_params, flops_per_token, attention_flops_share,
        train_flops, tokens, chinchilla_tokens, memory_bytes (per component), peak_flops, mfu,
        compute_time_s, communication (see `communication`), time_s (compute + communication not overlapped),
        cost_usd (None without a price), the settings used and an "assumptions" list.

    Raises:
        ConfigError: tokens < 1, unknown hardware, strategy or interconnect, mfu outside (0, 1], world_size < 1,
            negative price, data.seq_len > model.max_seq_len (less the soft prompt), a setting the adapt mode does
            not use, a fine-tuning mode on several devices.
    """
    if not (isinstance(tokens, (int, float)) and math.isfinite(tokens)):  # (inf: "must be >= 1" misled)
        raise ConfigError(
            f"tokens must be a finite number, got {tokens!r}; pass the number of training tokens (e.g. --tokens 1e9)"
        )
    if tokens < 1:  # 0.5 would become 0
        raise ConfigError(
            f"tokens must be >= 1, got {tokens!r}; pass the number of training tokens (e.g. --tokens 1e9)"
        )
    tokens = int(tokens)
    strategy = cfg.dist.strategy if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; use one of: {', '.join(STRATEGIES)}")
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ConfigError(
            f"world_size must be an integer >= 1, got {world_size!r}; pass the devices that train together "
            "(--world-size 8)"
        )
    if not (0.0 <= mfu <= 1.0):
        raise ConfigError(f"mfu must be in (0, 1] (a fraction, e.g. 0.4), got {mfu}; 0 = the default")
    if price_per_hour is not None and not (math.isfinite(price_per_hour) and price_per_hour >= 0):  # inf: "$inf"
        raise ConfigError(f"price_per_hour must be >= 0 and finite (USD per device-hour), got {price_per_hour}")
    link = None if interconnect is None else resolve_interconnect(interconnect)
    from lmforge.estimate_adapt import adapted_plan, check_adapt, teacher_plan  # (it builds on this module's terms)

    lora_rank, lora_targets, prompt_tokens, lora_dropout = check_adapt(
        adapt, world_size=world_size, lora_rank=lora_rank, lora_targets=lora_targets, prompt_tokens=prompt_tokens,
        labels=labels, lora_dropout=lora_dropout,
    )  # fmt: skip

    if teacher is not None and (adapt != "full" or labels or world_size > 1):
        raise ConfigError(
            "a distillation fine-tune trains every weight of the student, on an LM task, in one process: drop "
            "--adapt, --labels and --world-size to plan it"
        )
    assumptions = []
    model = cfg.model
    if model.family != "gpt":  # the formulas below are the decoder Transformer's (models/gpt.py)
        raise ConfigError(
            f"estimate covers GPT/Llama-style models only; model.family is {model.family!r} "
            "(a short 'lmforge pretrain' run reports its parameters and tokens/s)"
        )
    if model.vocab_size == 0 and cfg.data.dir:  # as pretrain sets it (train/run.py resolve_run_config)
        from lmforge.data.datadir import load_data_dir

        vocab = load_data_dir(cfg.data.dir).load_tokenizer().vocab_size
        model = dataclasses.replace(model, vocab_size=vocab)
        assumptions.append(f"model.vocab_size {vocab} from the tokenizer of {cfg.data.dir} (as pretrain sets it)")
    elif model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=DEFAULT_VOCAB)
        assumptions.append(
            f"model.vocab_size is 0 (training takes it from the tokenizer); assumed {DEFAULT_VOCAB} (GPT-2); "
            "pass --data.dir DATA_DIR or set --model.vocab_size for your tokenizer"
        )
    # a soft prompt takes the first positions of the context; the text gets the rest (finetune.py: max_len)
    context = model.max_seq_len - (prompt_tokens if adapt == "prompt" else 0)
    if context < 8:  # (finetune refuses it the same way)
        raise ConfigError(
            f"--prompt-tokens {prompt_tokens} leaves {context} of the model's {model.max_seq_len} context tokens for "
            f"the text (8 at least); use --prompt-tokens {model.max_seq_len - 8} or fewer"
        )
    seq_len = cfg.data.seq_len or context
    if seq_len > context:
        raise ConfigError(
            f"data.seq_len {seq_len} exceeds model.max_seq_len {model.max_seq_len}"
            + (f" less the {prompt_tokens} soft-prompt tokens" if adapt == "prompt" else "")
            + "; lower it"
        )
    hw = resolve_hardware(hardware, cfg.train.dtype, cfg.train.device)
    if hw["peak_source"].startswith("given by the user"):
        assumptions.append(
            f"a given peak is a {'CPU' if hw['device'] == 'cpu' else 'GPU'}'s {hw['dtype']} peak ("
            + ("--train.dtype bfloat16 for bf16" if hw["device"] == "cpu" else "--train.device cpu for a CPU, ")
            + ("" if hw["device"] == "cpu" else "--train.dtype float32 or float16 for another dtype")
            + ")"
        )
    batch, micro = cfg.train.batch_size, cfg.train.micro_batch_per_rank(world_size)  # per device, as training runs

    counts = param_counts(model)
    per_token = flops_per_token(model, seq_len)
    trainable = counts["total"]
    attention = attention_flops_per_token(model, seq_len)  # (per token of text, as per_token)
    step = StepShape(seq_len=seq_len, micro_batch=micro, dtype=hw["dtype"], device=hw["device"])
    memory = memory_bytes(model, cfg.optim, step, world_size=world_size, strategy=strategy)
    if adapt != "full" or labels:  # finetune's modes on a frozen base, or a full classification fine-tune
        plan = adapted_plan(
            model, cfg.optim, step, adapt=adapt, lora_rank=lora_rank, lora_targets=lora_targets,
            prompt_tokens=prompt_tokens, labels=labels, lora_dropout=lora_dropout,
        )  # fmt: skip
        trainable, per_token = plan["trainable"], plan["flops_per_token"]
        attention, memory = plan["attention"], plan["memory"]
        assumptions.append(plan["assumption"])
    distill = None
    if teacher is not None:
        if teacher.vocab_size == 0:  # (a preset's: the student's tokenizer, which a teacher must share)
            teacher = dataclasses.replace(teacher, vocab_size=model.vocab_size)
        if teacher.max_seq_len < seq_len:  # (finetune refuses it: adapt/load.load_teacher)
            raise ConfigError(
                f"the teacher's context of {teacher.max_seq_len} tokens is shorter than the {seq_len}-token examples; "
                f"use a teacher with a context of at least {seq_len}, or pass --data.seq_len {teacher.max_seq_len}"
            )
        distill = teacher_plan(teacher, model, step)
        per_token, attention = per_token + distill["flops_per_token"], attention + distill["attention"]
        extra = sum(distill["memory"].values())
        memory = {**memory, **distill["memory"]}
        memory.update(total=memory["total"] + extra, total_checkpointed=memory["total_checkpointed"] + extra)
        assumptions.append(distill["assumption"])
    train_flops = per_token * tokens
    assumptions.append(
        "memory per device: fp32 weights"
        + (
            f", gradients and {cfg.optim.name} state of the trained parameters only"
            if adapt != "full"
            else f" and gradients, {cfg.optim.name} state"
        )
        + f", {hw['dtype']} activations for {micro} x {seq_len} tokens per forward on each device; total is an "
        "upper bound (gradients grow as activations are freed) except under gradient accumulation"
    )
    if cfg.train.activation_checkpointing:  # (the plain total was the only headline, as if it did not)
        assumptions.append("train.activation_checkpointing is on: this run's peak is 'total, checkpointed'")
    if uses_math_attention(model, hw["device"]):
        assumptions.append("dropout > 0 on CPU: SDPA uses its math path, which keeps s x s attention maps")
    else:
        assumptions.append("attention by SDPA flash/memory-efficient kernels: no s x s matrix kept")
    if strategy == "diloco":
        assumptions.append(
            "DiLoCo keeps fp32 outer state (anchor + momentum) and builds the flat outer gradient at each sync; "
            f"one all-reduce every {cfg.dist.sync_every} steps (dist.sync_every) and at the last step"
        )
    elif world_size > 1:
        assumptions.append(
            "DDP keeps gradient buckets as large as the gradients"
            if strategy == "ddp"
            else "FSDP2 fully_shard per block + root, fp32 params: 3 x the largest unit gathered at a time"
        )

    if mfu == 0.0:
        mfu = hw["default_mfu"]
        narrow = hw["device"] == "cpu" and model.d_model < CPU_FULL_MFU_WIDTH
        if narrow:
            mfu *= model.d_model / CPU_FULL_MFU_WIDTH
        assumptions.append(
            f"MFU {mfu:.2f}: default for {hw['device']} "
            + (
                f"(measured by bench/train_speed.py on 2 CPU cores; scaled by d_model {model.d_model}/"
                f"{CPU_FULL_MFU_WIDTH}: narrow models are overhead-bound, the tiny preset measured 17-29%)"
                if narrow
                else "(measured by bench/train_speed.py on 2 CPU cores)"
                if hw["device"] == "cpu"
                else "(measured: GPT-2 124M on one H100 with --train.compile true; eager 0.27)"
            )
        )
        if hw["device"] == "cpu" and hw["dtype"] != "float32":
            # bench/estimate_vs_measured.py --dtype bfloat16 (2-vCPU AVX-512 VM, shared, noisy): tiny and
            # quickstart reached 3-20% of the measured bf16 matmul peak, far below their fp32 MFU
            assumptions.append("CPU bf16 autocast measured 3-20% MFU for small models; pass --mfu 0.1 or so")
    compute_s = train_flops / (hw["peak_flops"] * mfu * world_size)
    steps = math.ceil(tokens / (batch * seq_len))
    comm = communication(
        counts,
        strategy=strategy,
        world_size=world_size,
        steps=steps,
        sync_every=cfg.dist.sync_every,
        accumulation=batch // (micro * world_size),
        gather_bytes=DTYPE_BYTES[hw["dtype"]],
        step_compute_s=per_token * batch * seq_len / (hw["peak_flops"] * mfu * world_size),
        link=link,
    )
    time_s = compute_s + (comm["exposed_s"] or 0.0)
    if world_size > 1 and link is None:
        assumptions.append(
            "communication time not included: pass --interconnect (nvlink, nvlink-a100, pcie, ib, ethernet or "
            "Gbit/s each way per device)"
        )
    elif world_size > 1:
        assumptions.append(
            f"communication at {link['gbps']:g} Gbit/s each way per device ({link['source']}), ring collectives, "
            f"no latency: a lower bound; {comm['overlap']}"
        )
    # each device's traffic over the run, sent and received (a ring collective receives what it sends): the bytes
    # of `communication`, as the run's DiLoCo line counts them (dist.all_reduce_traffic)
    comm_bytes = 2 * comm["bytes_per_sync"] * comm["syncs"]
    price = price_per_hour if price_per_hour is not None else hw["price_per_hour"]
    if price_per_hour is None and price is not None:
        assumptions.append(f"price ${price:g} per device-hour: an assumed on-demand price; pass your own")
    cost = None if price is None else time_s / 3600 * price * world_size

    return {
        "model": {
            "n_layer": model.n_layer,
            "n_head": model.n_head,
            "n_kv_head": model.kv_heads,
            "d_model": model.d_model,
            "d_ff": model.ff_dim,
            "vocab_size": model.vocab_size,
            "pos_emb": model.pos_emb,
            "norm": model.norm,
            "mlp": model.mlp,
            "tie_embeddings": model.tie_embeddings,
        },
        "seq_len": seq_len,
        "batch_size": batch,
        "micro_batch_size": micro,
        "tokens_per_step": batch * seq_len,
        "steps": steps,
        "dtype": hw["dtype"],
        "optimizer": cfg.optim.name,
        "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "adapt": adapt,
        "trainable_params": trainable,
        "prompt_tokens": prompt_tokens if adapt == "prompt" else None,
        "labels": labels,
        "teacher_params": None if distill is None else distill["params"],
        "flops_per_token": per_token,
        "attention_flops_share": attention / per_token,
        "tokens": tokens,
        "train_flops": train_flops,
        "chinchilla_tokens": CHINCHILLA_TOKENS_PER_PARAM * counts["total"],
        "memory_bytes": memory,
        "hardware": hw["name"],
        "device": hw["device"],
        "peak_flops": hw["peak_flops"],
        "peak_source": hw["peak_source"],
        "mfu": mfu,
        "world_size": world_size,
        "strategy": strategy,
        "sync_every": cfg.dist.sync_every if strategy == "diloco" else None,
        "comm_bytes": comm_bytes,
        "communication": comm,
        "compute_time_s": compute_s,
        "time_s": time_s,
        "price_per_hour": price,
        "cost_usd": cost,
        "assumptions": assumptions,
    }


# --------------------------------------------------------------------------------------------
# Numbers for people (check_fits, and the console table in lmforge.estimate_table)


def _count(n: float) -> str:
    if abs(n) >= 1e15:  # (1e30 tokens read "1000000000000000000.00T")
        return f"{n:.3g}"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g} B"
