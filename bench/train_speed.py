"""Training speed of lmforge's loop per preset: tokens/s, ms/step and MFU, printed as a table.

MFU is measured against the matmul peak measured in the same process on the same machine
(`lmforge.estimate.measure_matmul_flops`), because shared CPUs differ and drift. The loop timed is
the real one (`lmforge.train.loop.train`) on random tokens, after warm-up steps.

    python bench/train_speed.py                      # tiny and small, fp32, on the default device
    python bench/train_speed.py --presets tiny --steps 50 --dtype bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from lmforge.config import CheckpointConfig, EvalConfig, OptimConfig, TrainConfig, load_config
from lmforge.estimate import measure_matmul_flops
from lmforge.log import RunLogger
from lmforge.models import build_model
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


def stepper(train_cfg: TrainConfig, optim_cfg: OptimConfig, model, optimizer, loader, precision):
    """A function that runs the real training loop for n more steps (no eval, no saving) and returns seconds.

    `train_cfg` gives the batch and schedule (its max_steps is replaced); one optimizer step per batch of
    the loader (use micro_batch_size 0).
    """
    state = TrainState()

    def run(n_steps: int) -> float:
        until = state.step + n_steps
        t0 = time.perf_counter()
        train(
            model,
            optimizer,
            loader,
            cfg=dataclasses.replace(train_cfg, max_steps=until),
            optim_cfg=optim_cfg,
            eval_cfg=EvalConfig(every=0),
            ckpt_cfg=CheckpointConfig(every=0),
            precision=precision,
            state=state,
            log=RunLogger(None, max_steps=until, start_step=state.step, enabled=False),
            save=lambda s: None,
        )
        if precision.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


def bench(preset: str, *, batch: int, steps: int, warmup: int, dtype: str, device: str, fused: str = "auto") -> dict:
    cfg = load_config(
        preset=preset,
        overrides={
            "model": {"vocab_size": load_config(preset=preset).model.vocab_size or 4096, "dropout": 0.0},
            "train": {"batch_size": batch, "micro_batch_size": 0, "dtype": dtype, "device": device},
            "optim": {"fused": fused},
        },
    )
    dev = pick_device(cfg.train.device)
    precision = pick_precision(dev, cfg.train.dtype)
    keep_freed_memory(dev)  # as `pretrain` does
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev)
    model.init_weights()
    optimizer = build_optimizer(model, cfg.optim, lr=cfg.train.lr, device=dev)
    seq_len = cfg.model.max_seq_len
    loader = random_batches(cfg.model.vocab_size, batch, seq_len)
    run = stepper(cfg.train, cfg.optim, model, optimizer, loader, precision)

    run(warmup)
    seconds = run(steps)
    tokens = steps * batch * seq_len
    tok_s = tokens / seconds
    peak = measure_matmul_flops(dev.type, precision.dtype)
    return {
        "preset": preset,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "shape": f"{batch}x{seq_len}",
        "ms_step": 1000 * seconds / steps,
        "tok_s": tok_s,
        "tflops": model.flops_per_token(seq_len) * tok_s / 1e12,
        "peak": peak / 1e12,
        "mfu": model.flops_per_token(seq_len) * tok_s / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(DEFAULTS))
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: per preset)")
    parser.add_argument("--batch", type=int, default=0, help="sequences per step (default: per preset)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--fused", default="auto", choices=["auto", "on", "off"], help="fused AdamW (optim.fused)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, dtype {args.dtype}, fused AdamW {args.fused}"
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
            )
        )
    print(
        f"| {'preset':<10} | {'params':>8} | {'batch x ctx':>11} | {'ms/step':>9} | {'tokens/s':>9} "
        f"| {'TFLOP/s':>8} | {'peak TFLOP/s':>12} | {'MFU':>6} |"
    )
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 13}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 14}|{'-' * 8}|")
    for r in rows:
        print(
            f"| {r['preset']:<10} | {r['params_m']:>7.2f}M | {r['shape']:>11} | {r['ms_step']:>9.1f} | "
            f"{r['tok_s']:>9.0f} | {r['tflops']:>8.4f} | {r['peak']:>12.4f} | {100 * r['mfu']:>5.1f}% |"
        )


if __name__ == "__main__":
    main()
