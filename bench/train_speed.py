"""Training speed of lmforge's loop per preset: tokens/s, ms/step and MFU, printed as a table.

MFU is measured against the matmul peak measured in the same process on the same machine
(`lmforge.estimate.measure_matmul_flops`), because shared CPUs differ and drift; a peak below the rate
training reached (a busy moment, or bf16 on a CPU that only emulates it) is raised to that rate, with a
note, as `pretrain` does, so MFU never exceeds 100%. The loop timed is
the real one (`lmforge.train.loop.train`) on random tokens, after warm-up steps.

    python bench/train_speed.py                      # tiny and small, fp32, on the default device
    python bench/train_speed.py --presets tiny --steps 50 --dtype bfloat16 --threads 2
    python bench/train_speed.py --device cuda --dtype bfloat16 --presets gpt2-124m --batch 16 --steps 30 \
        --compile on --vocab-size 50304 --nominal-peak 989.4      # the H100 row of the README

On CUDA the table adds the peak memory allocated, and `--nominal-peak` (the datasheet's dense TFLOP/s
at the dtype) adds MFU against it next to the measured one. Fused AdamW is `auto` = on for CUDA.

`--profile N` profiles N more steps after the timed ones and prints where the device time went, by kind
of kernel (matmul, attention, norms, cross-entropy, optimizer, ...), and how much of the wall-clock no
kernel ran (on CPU: operators' own CPU time, where a compiled graph is one item). `--inductor KEY=VALUE`
sets a `torch._inductor.config` option before compiling (e.g. `coordinate_descent_tuning=true`,
`max_autotune=true`), to try compiler settings without code changes.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import time

import bench_cli
import torch

from lmforge.config import CheckpointConfig, EvalConfig, OptimConfig, TrainConfig, load_config
from lmforge.estimate import measure_matmul_flops
from lmforge.log import RunLogger
from lmforge.models import build_model
from lmforge.objectives import CausalLM
from lmforge.train.loop import train
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import keep_freed_memory, pick_device, pick_precision
from lmforge.train.state import TrainState

# Per preset: (sequences per step, timed steps). `small` uses a smaller batch than its preset (64)
# so that one step takes seconds, not tens of seconds, on 2 CPU cores; tokens/s barely depends on it.
DEFAULTS = {"tiny": (16, 40), "small": (8, 6), "quickstart": (24, 30), "gpt2-124m": (4, 3)}


def random_batches(vocab: int, batch: int, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def stepper(train_cfg: TrainConfig, optim_cfg: OptimConfig, model, optimizer, loader, precision, forward_model=None):
    """A function that runs the real training loop for n more steps (no eval, no saving) and returns seconds.

    `train_cfg` gives the batch and schedule (its max_steps is replaced); the loader yields micro-batches,
    `train_cfg.accum_steps` of them per optimizer step. `forward_model`: what the loop calls (a `torch.compile`
    wrapper of `model`, as `pretrain --train.compile true` makes); default `model`.
    """
    state = TrainState()
    objective = CausalLM(compile=train_cfg.compile, mode=train_cfg.compile_mode)  # cross-entropy too, as pretrain

    def run(n_steps: int) -> float:
        if n_steps == 0:  # (--warmup 0)
            return 0.0
        until = state.step + n_steps
        t0 = time.perf_counter()
        train(
            model if forward_model is None else forward_model,
            optimizer,
            loader,
            cfg=dataclasses.replace(train_cfg, max_steps=until),
            optim_cfg=optim_cfg,
            eval_cfg=EvalConfig(every=0),
            ckpt_cfg=CheckpointConfig(every=0),
            precision=precision,
            state=state,
            log=RunLogger(None, max_steps=until, start_step=state.step, enabled=False),
            objective=objective,
            save=lambda s: None,
        )
        if precision.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


# Kernel kinds, first match wins, on the lowercased kernel name (cuBLAS/cuDNN/flash/inductor names).
KERNEL_KINDS = [
    ("attention", r"flash|fmha|sdpa|attention|cudnn_generated|mha"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|cublas|matmul|_mm_|bmm|addmm|^aten::(mm|linear)$"),
    ("optimizer", r"adam|multi_tensor|foreach|_amp_|lerp"),
    ("cross-entropy", r"log_softmax|nll_loss|logsumexp|cross_entropy"),
    ("norm", r"layer_norm|rms_norm|norm"),
    ("gelu/activation", r"gelu|relu|silu|tanh"),
    ("embedding", r"embedding|index|scatter|gather"),
    ("copy/fill", r"memcpy|memset|copy|fill|cast|convert|to_copy"),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, low):
            return kind
    return "other (fused elementwise)" if low.startswith("triton") else "other"


def profile_steps(run, n_steps: int, device: torch.device) -> dict:
    """Device time per kernel over `n_steps` steps of `run`, grouped by `kernel_kind`, and the wall-clock."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = run(n_steps)
    kernels: dict[str, tuple[float, int]] = {}
    for ev in prof.key_averages():
        if device.type == "cuda" and ev.device_type != DeviceType.CUDA:
            continue
        if "#" in ev.key or ev.key.startswith(("Torch-Compiled Region", "CompiledFunction")):
            continue  # a range annotated on the GPU's timeline (Optimizer.step#AdamW.step), not a kernel
        us = ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total
        if us > 0:
            t, c = kernels.get(ev.key, (0.0, 0))
            kernels[ev.key] = (t + us, c + ev.count)
    by_kind: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + us
    return {"wall_ms": 1000 * wall / n_steps, "kernels": kernels, "by_kind": by_kind, "steps": n_steps}


def print_profile(p: dict, flops_per_step: float, top: int = 25) -> None:
    steps, wall = p["steps"], p["wall_ms"]
    busy = sum(p["by_kind"].values()) / 1000 / steps
    print(
        f"\n# profile: {steps} steps, {wall:.1f} ms/step wall, {busy:.1f} ms/step in kernels ({100 * busy / wall:.1f}%)"
    )
    print(f"| {'kernel kind':<26} | {'ms/step':>8} | {'share':>6} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 8}|")
    for kind, us in sorted(p["by_kind"].items(), key=lambda kv: -kv[1]):
        ms = us / 1000 / steps
        extra = ""
        if kind == "matmul" and ms > 0:
            extra = f" ({flops_per_step / (ms / 1000) / 1e12:.0f} TFLOP/s on the model's matmul FLOPs)"
        print(f"| {kind:<26} | {ms:>8.2f} | {100 * ms / wall:>5.1f}% |{extra}")
    print(f"| {'(no kernel running)':<26} | {wall - busy:>8.2f} | {100 * (wall - busy) / wall:>5.1f}% |")
    print(f"\n# top {top} kernels by device time per step")
    for name, (us, count) in sorted(p["kernels"].items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{us / 1000 / steps:8.2f} ms {count // steps:5d}x  {kernel_kind(name):<14} {name[:110]}")


def set_inductor_options(options: list[str]) -> None:
    """`KEY=VALUE` strings onto torch._inductor.config (true/false, ints, floats, else strings)."""
    import torch._inductor.config as inductor_config

    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not hasattr(inductor_config, key):
            raise SystemExit(
                f"error: --inductor {option!r}: expected KEY=VALUE with KEY a torch._inductor.config option"
            )
        low = value.lower()
        parsed: object = value
        if low in ("true", "false"):
            parsed = low == "true"
        elif re.fullmatch(r"-?\d+", value):
            parsed = int(value)
        elif re.fullmatch(r"-?\d*\.\d+", value):
            parsed = float(value)
        setattr(inductor_config, key, parsed)


def bench(
    preset: str,
    *,
    batch: int,
    steps: int,
    warmup: int,
    dtype: str,
    device: str,
    fused: str = "auto",
    compile: bool = False,
    compile_mode: str = "default",
    vocab_size: int = 0,
    attention: str = "auto",
    profile: int = 0,
    log_every: int = 0,
    accum: int = 1,
) -> dict:
    vocab = vocab_size or load_config(preset=preset).model.vocab_size or 4096
    cfg = load_config(
        preset=preset,
        overrides={
            "model": {"vocab_size": vocab, "dropout": 0.0},
            "train": {
                "batch_size": batch * accum,
                "micro_batch_size": batch,
                "dtype": dtype,
                "device": device,
                "compile": compile,
                "compile_mode": compile_mode,
                "attention": attention,
                **({"log_every": log_every} if log_every else {}),
            },
            "optim": {"fused": fused},
        },
    )
    dev = pick_device(cfg.train.device)
    precision = pick_precision(dev, cfg.train.dtype, cfg.train.attention)
    keep_freed_memory(dev)  # as `pretrain` does
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev)
    model.init_weights()
    optimizer = build_optimizer(model, cfg.optim, lr=cfg.train.lr, device=dev)
    seq_len = cfg.model.max_seq_len
    loader = random_batches(cfg.model.vocab_size, batch, seq_len)
    forward_model = torch.compile(model, mode=compile_mode) if compile else model  # as train/run.py does
    run = stepper(cfg.train, cfg.optim, model, optimizer, loader, precision, forward_model)

    t0 = time.perf_counter()
    run(warmup)  # includes compilation
    warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = run(steps)
    tokens = steps * accum * batch * seq_len
    tok_s = tokens / seconds
    prof = profile_steps(run, profile, dev) if profile else None
    measured_peak = measure_matmul_flops(dev.type, precision.dtype)
    achieved = model.flops_per_token(seq_len) * tok_s
    # As the training loop does: a measured peak below the rate training reached (a busy moment, or a
    # dtype this CPU only emulates: bf16 without AVX512-BF16/AMX runs at ~1 GFLOP/s) is raised to that
    # rate, so MFU never exceeds 100%; main() prints a note with the measured figure.
    peak = max(measured_peak, achieved)
    return {
        "profile": prof,
        # the linear layers' share of the count (flops_per_token less its attention term)
        "matmul_flops_step": accum
        * batch
        * seq_len
        * (model.flops_per_token(seq_len) - 12.0 * cfg.model.n_layer * cfg.model.d_model * seq_len),
        "preset": preset,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "shape": f"{batch}x{seq_len}" + (f" x{accum}" if accum > 1 else ""),
        "ms_step": 1000 * seconds / steps,
        "tok_s": tok_s,
        "tflops": model.flops_per_token(seq_len) * tok_s / 1e12,
        "peak": peak / 1e12,
        "measured_peak": measured_peak / 1e12,
        "mfu": achieved / peak,
        "warmup_s": warmup_s,
        "mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        # what the process holds: CUDA graphs' private pool is reserved, not counted as allocated
        "reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30 if dev.type == "cuda" else None,
    }


def main() -> None:
    parser = bench_cli.parser(__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(DEFAULTS))
    parser.add_argument("--steps", type=bench_cli.count(0), default=0, help="timed steps (default: per preset)")
    parser.add_argument("--batch", type=bench_cli.count(0), default=0, help="sequences per step (default: per preset)")
    parser.add_argument("--warmup", type=bench_cli.count(0), default=3)
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument(
        "--threads", type=bench_cli.count(0), default=0, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--fused", default="auto", choices=["auto", "on", "off"], help="fused AdamW (optim.fused)")
    parser.add_argument("--compile", default="off", choices=["on", "off"], help="torch.compile the model")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="train.compile_mode (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--vocab-size", type=bench_cli.count(0), default=0, help="override the preset's vocabulary (e.g. 50304)"
    )
    parser.add_argument(
        "--attention", default="auto", choices=["auto", "flash", "cudnn", "efficient"], help="train.attention (CUDA)"
    )
    parser.add_argument("--nominal-peak", type=float, default=0.0, help="datasheet TFLOP/s: adds an MFU column")
    parser.add_argument(
        "--profile", type=bench_cli.count(0), default=0, help="profile N more steps: device time by kernel kind"
    )
    parser.add_argument(
        "--log-every",
        type=bench_cli.count(0),
        default=0,
        help="train.log_every (default: the preset's); a log step syncs the host",
    )
    parser.add_argument(
        "--accum",
        type=bench_cli.count(1),
        default=1,
        help="micro-batches of --batch per optimizer step (gradient accumulation)",
    )
    parser.add_argument("--inductor", action="append", default=[], help="KEY=VALUE torch._inductor.config option")
    args = parser.parse_args()
    set_inductor_options(args.inductor)
    pick_device(args.device)  # --device cuda without CUDA: one line, before the header asks for the GPU's name
    if args.threads:
        torch.set_num_threads(args.threads)
    where = platform.processor() or platform.machine()
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    print(
        f"# torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, dtype {args.dtype}, "
        f"fused AdamW {args.fused}, compile {args.compile}"
        + (f" ({args.compile_mode})" if args.compile == "on" else "")
        + f", attention {args.attention}"
        + (f", inductor {' '.join(args.inductor)}" if args.inductor else "")
    )
    rows = []
    for preset in args.presets:
        batch, steps = DEFAULTS[preset]
        rows.append(
            bench(
                preset,
                batch=args.batch or batch,
                steps=args.steps or steps,
                warmup=args.warmup,
                dtype=args.dtype,
                device=args.device,
                fused=args.fused,
                compile=args.compile == "on",
                compile_mode=args.compile_mode,
                vocab_size=args.vocab_size,
                attention=args.attention,
                profile=args.profile,
                log_every=args.log_every,
                accum=args.accum,
            )
        )
    gpu = rows[0]["mem_gib"] is not None
    head = (
        f"| {'preset':<10} | {'params':>8} | {'batch x ctx':>11} | {'ms/step':>9} | {'tokens/s':>9} "
        f"| {'TFLOP/s':>8} | {'peak TFLOP/s':>12} | {'MFU':>6} |"
    )
    rule = f"|{'-' * 12}|{'-' * 10}|{'-' * 13}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 14}|{'-' * 8}|"
    if args.nominal_peak:
        head += f" MFU of {args.nominal_peak:g} |"
        rule += "-" * (len(f" MFU of {args.nominal_peak:g} ")) + "|"
    if gpu:
        head += " peak mem GiB | reserved GiB | warm-up s |"
        rule += "--------------|--------------|-----------|"
    print(head)
    print(rule)
    for r in rows:
        line = (
            f"| {r['preset']:<10} | {r['params_m']:>7.2f}M | {r['shape']:>11} | {r['ms_step']:>9.1f} | "
            f"{r['tok_s']:>9.0f} | {r['tflops']:>8.4f} | {r['peak']:>12.4f} | {100 * r['mfu']:>5.1f}% |"
        )
        if args.nominal_peak:
            mfu = r["tflops"] / args.nominal_peak
            line += f" {100 * mfu:>{len(f'MFU of {args.nominal_peak:g}') - 1}.1f}% |"
        if gpu:
            line += f" {r['mem_gib']:>12.2f} | {r['reserved_gib']:>12.2f} | {r['warmup_s']:>9.1f} |"
        print(line)
    for r in rows:
        if r["peak"] > r["measured_peak"]:
            print(
                f"note: {r['preset']} trained at {r['tflops']:.4f} TFLOP/s, above the {r['measured_peak']:.4f} "
                f"TFLOP/s {args.dtype} matmul peak measured after it (a busy moment, or a dtype this CPU "
                "emulates); its peak is the rate it reached, so its MFU reads 100%"
            )
    for r in rows:
        if r["profile"]:
            print(f"\n## {r['preset']} {r['shape']}")
            print_profile(r["profile"], r["matmul_flops_step"])


if __name__ == "__main__":
    bench_cli.run(main)
