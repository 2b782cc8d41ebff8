"""Cost model: how tokens/s, MFU and memory move as width, depth and context grow, and where a step's time goes.

For each preset (default tiny -> small -> gpt2-124m) the real training loop runs a few steps on
random tokens (vocab 4096 where the preset leaves it to the tokenizer) and two tables are printed:

1. params, batch x ctx, ms/step, tokens/s, MFU against the fp32 matmul peak measured in the same
   process (`lmforge.estimate.measure_matmul_flops`), the training state that lives between steps
   (weights and optimizer state; the loop frees grads after each step) and the peak bytes one step
   allocates on top of it, activations and grads included (`lmforge.estimate.measure_cpu_allocations`).
2. a `torch.profiler` breakdown of one step's time by category, as % of that (profiled) step's
   wall time. Each op's self CPU time goes to the category of its outermost enclosing op that has
   one, so `aten::linear -> aten::addmm` is matmul and the bmm inside a math attention is attention.
   Backward ops are classified by their autograd node (e.g. `AddmmBackward0` is matmul). "data" is
   the time spent fetching the batch; "python" is the step time not inside any profiled op
   (interpreter and loop overhead, plus profiler overhead).

    python bench/cost_model.py                              # ~2-3 minutes on 2 cores
    python bench/cost_model.py --presets tiny small --steps 20 --threads 2
"""

from __future__ import annotations

import platform
import re

import bench_cli
import torch
from train_speed import random_batches, stepper  # bench/ is on sys.path when run as a script

from lmforge.config import load_config
from lmforge.estimate import measure_cpu_allocations, measure_matmul_flops
from lmforge.models import build_model
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import pick_device, pick_precision

# Per preset: (sequences per step, timed steps). Small batches so the whole run stays a few minutes
# on 2 CPU cores; gpt2-124m at 1 x 1024 takes ~10-20 s a step there.
DEFAULTS = {"tiny": (16, 10), "small": (8, 3), "gpt2-124m": (1, 2)}

# (category, pattern on the lower-cased op / autograd-node name), first match wins.
CATEGORIES = [
    ("data", re.compile(r"^lmforge\.data$")),
    ("optimizer", re.compile(r"optimizer\.|_foreach_|adamw|_fused_adam|muon|clip_grad")),
    ("attention", re.compile(r"scaled_dot_product|scaleddotproduct|flash_attention|flashattention")),
    ("norms", re.compile(r"layer_norm|layernorm|rms_norm|rmsnorm")),
    ("cross-entropy", re.compile(r"cross_entropy|nll_loss|nllloss|log_softmax|logsoftmax")),
    ("matmul", re.compile(r"aten::(mm|addmm|bmm|linear|matmul)$|\b(mm|addmm|bmm|matmul)backward|linearbackward")),
    (
        "elementwise",
        re.compile(
            r"gelu|silu|relu|tanh|sigmoid|softmax|dropout|aten::(mul|add|sub|div|neg|pow|exp|sqrt|rsqrt)_?$|"
            r"\b(mul|add|sub|div|neg|pow|exp|sqrt|rsqrt)backward"
        ),
    ),
]
ORDER = ["matmul", "attention", "norms", "elementwise", "optimizer", "cross-entropy", "data", "other ops", "python"]


def _category(name: str) -> str | None:
    name = name.lower().removeprefix("autograd::engine::evaluate_function: ")
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return None


def breakdown(events, wall_us: float) -> dict[str, float]:
    """Percent of `wall_us` per category, from a profiler's FunctionEvents (self CPU time)."""

    def category_of(event) -> str:
        chain = []
        e = event
        while e is not None:
            chain.append(e)
            e = e.cpu_parent
        for e in reversed(chain):  # outermost first
            if (c := _category(e.name)) is not None:
                return c
        return "other ops"

    totals = dict.fromkeys(ORDER, 0.0)
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        totals[category_of(event)] += event.self_cpu_time_total
    totals["python"] = max(0.0, wall_us - sum(totals.values()))
    return {k: 100 * v / wall_us for k, v in totals.items()}


def timed_data(loader):
    """The loader with each fetch labelled, so the profiler can charge it to "data"."""
    while True:
        with torch.profiler.record_function("lmforge.data"):
            batch = next(loader)
        yield batch


def state_bytes(model, optimizer) -> int:
    tensors = list(model.parameters())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


def measure(preset: str, *, batch: int, steps: int, warmup: int, peak: float) -> dict:
    cfg = load_config(
        preset=preset,
        overrides={
            "model": {"vocab_size": load_config(preset=preset).model.vocab_size or 4096, "dropout": 0.0},
            "train": {"batch_size": batch, "micro_batch_size": 0, "dtype": "float32", "device": "cpu"},
        },
    )
    dev = pick_device(cfg.train.device)
    precision = pick_precision(dev, cfg.train.dtype)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev)
    model.init_weights()
    optimizer = build_optimizer(model, cfg.optim, lr=cfg.train.lr, device=dev)
    seq_len = cfg.model.max_seq_len
    loader = timed_data(random_batches(cfg.model.vocab_size, batch, seq_len))
    run = stepper(cfg.train, cfg.optim, model, optimizer, loader, precision)

    run(warmup)  # kernels warmed up, optimizer state allocated
    seconds = run(steps)
    tok_s = steps * batch * seq_len / seconds
    step_peak = measure_cpu_allocations(lambda: run(1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = run(1)
    return {
        "preset": preset,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "shape": f"{batch}x{seq_len}",
        "ms_step": 1000 * seconds / steps,
        "tok_s": tok_s,
        "mfu": model.flops_per_token(seq_len) * tok_s / peak,
        "state_mib": state_bytes(model, optimizer) / 2**20,
        "step_mib": step_peak / 2**20,
        "profiled_ms": 1000 * profiled,
        "breakdown": breakdown(prof.events(), 1e6 * profiled),
    }


def main() -> None:
    parser = bench_cli.parser(__doc__)
    parser.add_argument("--presets", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    parser.add_argument(
        "--steps", type=bench_cli.count(0), default=0, help="timed steps per preset (default: per preset)"
    )
    parser.add_argument("--batch", type=bench_cli.count(0), default=0, help="sequences per step (default: per preset)")
    parser.add_argument("--warmup", type=bench_cli.count(0), default=1, help="untimed steps before timing")
    parser.add_argument(
        "--threads", type=bench_cli.count(0), default=0, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = measure_matmul_flops("cpu", torch.float32)
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, fp32; measured matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    rows = []
    for preset in args.presets:
        batch, steps = DEFAULTS[preset]
        rows.append(
            measure(preset, batch=args.batch or batch, steps=args.steps or steps, warmup=args.warmup, peak=peak)
        )

    print()
    print(
        f"| {'preset':<10} | {'params':>8} | {'batch x ctx':>11} | {'ms/step':>9} | {'tokens/s':>9} | {'MFU':>6} "
        f"| {'state MiB':>9} | {'step peak MiB':>13} |"
    )
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 13}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 11}|{'-' * 15}|")
    for r in rows:
        print(
            f"| {r['preset']:<10} | {r['params_m']:>7.2f}M | {r['shape']:>11} | {r['ms_step']:>9.1f} | "
            f"{r['tok_s']:>9.0f} | {100 * r['mfu']:>5.1f}% | {r['state_mib']:>9.1f} | {r['step_mib']:>13.1f} |"
        )

    print()
    widths = {c: max(9, len(c)) for c in ORDER}
    header = "".join(f" {c:>{widths[c]}} |" for c in ORDER)
    print(f"| {'preset':<10} | {'profiled ms':>11} |{header}")
    print(f"|{'-' * 12}|{'-' * 13}|" + "|".join("-" * (widths[c] + 2) for c in ORDER) + "|")
    for r in rows:
        cells = "".join(f" {r['breakdown'][c]:>{widths[c] - 1}.1f}% |" for c in ORDER)
        print(f"| {r['preset']:<10} | {r['profiled_ms']:>11.1f} |{cells}")


if __name__ == "__main__":
    bench_cli.run(main)
