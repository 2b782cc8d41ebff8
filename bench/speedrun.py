"""Time to quality on tinyshakespeare (character level): lmforge's speedrun config vs the nanoGPT replica.

    python bench/speedrun.py                          # both configs, one run each
    python bench/speedrun.py --configs configs/speedrun-shakespeare-char.toml --target 1.886

Data: the first 90% of the packaged tinyshakespeare for training, the last 10% for validation
(nanoGPT's split), prepared once with a character tokenizer. Each config is trained by
`python -m lmforge pretrain --config FILE` in a fresh process; the clock starts before the process
is launched (import, data loading and compilation count) and each evaluation is timestamped when its
line lands in metrics.jsonl. Evaluations use the whole validation split. The table gives the time at
which validation loss first reached the target, the final loss, and the ratio to the replica, with
the matmul peak measured on this host (runs are only comparable within one invocation).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_cli

REPO = Path(__file__).resolve().parent.parent
REPLICA = "configs/nanogpt-baby-cpu.toml"
SPEEDRUN = "configs/speedrun-shakespeare-char.toml"


def prepare_split(tmp: Path) -> Path:
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.quickstart import corpus_path

    with gzip.open(corpus_path(), "rt", encoding="utf-8") as f:
        text = f.read()
    cut = int(len(text) * 0.9)
    (tmp / "train.txt").write_text(text[:cut], encoding="utf-8")
    (tmp / "val.txt").write_text(text[cut:], encoding="utf-8")
    out = tmp / "data"
    prepare(
        PrepareConfig(
            inputs=[str(tmp / "train.txt")],
            val_input=[str(tmp / "val.txt")],
            out=str(out),
            tokenizer="char",
            doc_unit="file",
            val_fraction=0.0,
            test_fraction=0.0,
            card=False,
        ),
        progress=False,
    )
    return out


def run(config: str, data: Path, out: Path, extra: list[str]) -> tuple[list[tuple[float, int, float]], float]:
    """Train one config; returns [(seconds since launch, step, val_loss)] and the total wall-clock."""
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--config", config, "--data", str(data), "--out", str(out)]
    cmd += ["--quiet", *extra]
    metrics = out / "metrics.jsonl"
    evals: list[tuple[float, int, float]] = []
    seen = 0
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while True:
        done = p.poll() is not None
        if metrics.is_file():
            lines = metrics.read_text(encoding="utf-8").splitlines()
            now = time.perf_counter() - t0
            for line in lines[seen:]:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line being written: read it next time
                seen += 1
                if "val_loss" in record:
                    evals.append((now, record["step"], record["val_loss"]))
        if done:
            break
        time.sleep(0.02)
    if p.returncode != 0:
        raise SystemExit(f"{config} failed with exit code {p.returncode}")
    return evals, time.perf_counter() - t0


def config_path(text: str) -> str:
    """`--configs FILE`: as given (from the working directory), else under the repository (the defaults)."""
    for path in (Path(text), REPO / text):
        if path.is_file():
            return str(path.resolve())  # (each run's process starts in the repository)
    raise argparse.ArgumentTypeError(f"config file {text!r} not found; pass an existing .toml file")


def main() -> None:
    parser = bench_cli.parser(__doc__)
    default = [REPLICA] + ([SPEEDRUN] if (REPO / SPEEDRUN).is_file() else [])  # the speedrun config is still to come
    parser.add_argument("--configs", nargs="+", type=config_path, default=default)
    parser.add_argument("--target", type=float, default=1.886, help="validation loss to reach (nats/char)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run")
    args = parser.parse_args()

    import torch

    from lmforge.estimate import measure_matmul_flops

    peak = measure_matmul_flops("cpu", torch.float32, seconds=1.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = prepare_split(tmp)
        for i, config in enumerate(args.configs):
            evals, total = run(config, data, tmp / f"run{i}", args.extra)
            reached = next(((t, s, v) for t, s, v in evals if v <= args.target), None)
            rows.append((config, evals, total, reached))

    base = rows[0][3][0] if rows[0][3] else rows[0][2]
    print(
        f"# torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; target val loss {args.target} (whole val split)"
    )
    print("| config | evals | final val loss | reached target at step | seconds to target | total s | vs first |")
    print("|---|---|---|---|---|---|---|")
    for config, evals, total, reached in rows:
        final = evals[-1][2] if evals else float("nan")
        step, secs = (reached[1], f"{reached[0]:.1f}") if reached else ("-", "not reached")
        ratio = f"{reached[0] / base:.1%}" if reached else "-"
        print(f"| {Path(config).stem} | {len(evals)} | {final:.4f} | {step} | {secs} | {total:.1f} | {ratio} |")


if __name__ == "__main__":
    bench_cli.run(main)
