"""Compute planning: parameters, FLOPs, memory, time and cost of a training run, from its config alone.

`estimate(cfg, tokens=...)` answers "how big is this model, how much memory does a training step
need per device, and how long and how much money will `tokens` tokens take on this hardware?"
without building the model. This module is the planner: hardware, time, communication and cost, around
- `lmforge.estimate_args`: the checks of `estimate`'s arguments (`check_estimate`, torch-free: `lmforge estimate`
  runs them before it imports this module, which loads torch), the strategies, datasheet peaks and interconnects;
- `lmforge.estimate_memory`: parameters, FLOPs and memory per device, each term derived beside its arithmetic
  (torch-free);
- `lmforge.estimate_adapt`: the fine-tuning plans on a frozen base (LoRA, head-only, prompt tuning, distillation's
  teacher, and reading a fine-tune's finetune.json), which reuse those terms;
- `lmforge.estimate_device`: this machine's measured matmul peak (`measure_matmul_flops`, which training reports
  MFU against) and the fit checks pretrain and finetune run (`check_fits`, `check_batch_fits`);
- `lmforge.estimate_table`: the console table (`format_estimate`).
The memory and device names can be imported from here too (`from lmforge.estimate import memory_bytes`).

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

MFU = achieved model FLOP/s / peak FLOP/s; why the CPU peak is measured, not read from a datasheet:
`estimate_device`'s docstring.

References:
- Hoffmann et al. 2022 (Chinchilla), ~20 tokens per parameter: https://arxiv.org/abs/2203.15556
- NVIDIA A100 datasheet: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
- NVIDIA H100 datasheet: https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmforge.config import RunConfig
from lmforge.dist_config import ring_all_reduce_bytes
from lmforge.errors import ConfigError
from lmforge.estimate_adapt import adapted_plan, teacher_plan
from lmforge.estimate_args import (  # noqa: F401 (DEFAULT_VOCAB re-exported: tests)
    DEFAULT_VOCAB,
    PEAK_FLOPS,
    EstimateArgs,
    check_estimate,
    hardware_device,
    resolve_dtype,
)
from lmforge.estimate_device import (  # noqa: F401 (re-exported: tests, bench)
    check_batch_fits,
    check_fits,
    device_memory_bytes,
    measure_cpu_allocations,
    measure_matmul_flops,
    model_param_count,
)
from lmforge.estimate_memory import (  # noqa: F401 (re-exported: tests, bench)
    DTYPE_BYTES,
    StepShape,
    activation_bytes,
    attention_flops_per_token,
    flops_per_token,
    memory_bytes,
    param_counts,
    uses_math_attention,
)

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal training uses ~20 tokens per parameter
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
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's bucket_cap_mb default


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
    key = hardware.strip().lower() if isinstance(hardware, str) else hardware
    default_mfu: float | None = None
    device, gflops = hardware_device(hardware, train_device)  # (an unknown name or a bad peak: refused)
    if key in ("cpu", "measure"):
        if key == "measure":
            from lmforge.train.precision import pick_device

            device = pick_device(train_device, "--train.device").type
            if device not in ("cpu", "cuda"):
                raise ConfigError(f"--hardware measure on {device} is not supported; use --hardware <GFLOPS> instead")
        dtype = resolve_dtype(dtype, device)
        peak = measure_matmul_flops(device, getattr(torch, dtype))
        name = f"{device} (measured)"
        source = f"measured here: best {dtype} matmul (measure_matmul_flops)"
        price = PRICE_PER_HOUR["cpu"] if device == "cpu" else None
        if device == "cpu" and dtype != "float32":
            # bf16 autocast on a CPU trains small models no faster than fp32 (measured: the quickstart
            # preset ran 15.5k tokens/s in both, 6.8% of the AMX bf16 peak), so assume fp32's speed
            default_mfu = DEFAULT_MFU["cpu"] * measure_matmul_flops("cpu", torch.float32) / peak
    elif key in PEAK_FLOPS:
        dtype = resolve_dtype(dtype, device)
        peak = PEAK_FLOPS[key][dtype]
        name = key
        source = f"NVIDIA datasheet, dense {dtype}"
        price = PRICE_PER_HOUR[key]
    else:  # a peak given in GFLOP/s, taken for train.device's device (`hardware_device`)
        assert gflops is not None  # (for the type checker)
        dtype = resolve_dtype(dtype, device)
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


def estimate(cfg: RunConfig, **options: Any) -> dict[str, Any]:
    """Parameters, FLOPs, memory per device, time and cost of training `cfg.model` on `tokens` tokens:
    `plan(check_estimate(cfg, **options))` (the options' types and defaults: `estimate_args.check_estimate`).

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
    return plan(check_estimate(cfg, **options))


def plan(args: EstimateArgs) -> dict[str, Any]:
    """`estimate`'s plan of arguments `check_estimate` has checked (`lmforge estimate` checks them before it
    imports this module, which loads torch)."""
    cfg, model, tokens, seq_len = args.cfg, args.model, args.tokens, args.seq_len
    hardware, mfu, world_size, strategy = args.hardware, args.mfu, args.world_size, args.strategy
    price_per_hour, link, adapt, labels = args.price_per_hour, args.link, args.adapt, args.labels
    lora_rank, lora_targets, lora_dropout = args.lora_rank, args.lora_targets, args.lora_dropout
    prompt_tokens, teacher, assumptions = args.prompt_tokens, args.teacher, [*args.assumptions]
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
