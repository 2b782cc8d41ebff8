"""Fault injection: SIGKILL a training run at random moments, restart it each time, compare with a straight run.

    python bench/faults.py                    # 10 kills, 1 process
    python bench/faults.py --kills 5 --nproc 2   # 2 gloo ranks under torchrun, the whole group killed
    python bench/faults.py --nproc 2 -- --dist.strategy=fsdp --checkpoint.sharded=true   # extra pretrain flags

The run is the `tiny` preset on the built-in Shakespeare corpus, checkpointing every 5 steps. The kill
targets are random steps of the run (sorted): each attempt is SIGKILLed once metrics.jsonl reaches its
target step plus a random 0-300 ms (so kills land in steps, in evaluations and in checkpoint writes);
the same command is then re-run and resumes from the latest complete checkpoint.
At the end the final weights and the metrics.jsonl losses must be bit-identical to an uninterrupted
run (on CPU); the script prints one row per kill and exits 1 on any difference.

A kill that comes after the run had saved its last checkpoint (the process had ended, or was only closing
its log) tests no resume: its row says `missed`, it does not count as a pass, and the script exits 1 (a
short `--steps` run with a target near its end could otherwise report "bit-identical" after no real kill).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_cli  # bench/ is on sys.path when run as a script
import torch

from lmforge.checkpoint import load_checkpoint

FLAGS = [
    "--preset=tiny",
    "--model.n_layer=2",
    "--model.d_model=64",
    "--model.max_seq_len=64",
    "--model.dropout=0.1",
    "--train.batch_size=8",
    "--train.micro_batch_size=4",
    "--train.log_every=1",
    "--eval.every=20",
    "--eval.max_batches=2",
    "--checkpoint.every=5",
    "--checkpoint.keep=2",
    "--quiet",
]


def command(data: Path, out: Path, steps: int, nproc: int, extra: list[str]) -> list[str]:
    args = ["pretrain", f"--data={data}", f"--out={out}", f"--train.max_steps={steps}", *FLAGS, *extra]
    if nproc == 1:
        return [sys.executable, "-m", "lmforge", *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        "lmforge",
        *args,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def latest_step(run: Path) -> int:
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.is_file() else 0


def last_logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return 0


def losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def kill_attempt(cmd: list[str], run: Path, target: int, delay: float, steps: int) -> tuple[bool, float]:
    """Start `cmd`, SIGKILL it (all its processes) `delay` s after metrics.jsonl reaches step `target`; returns
    (whether the kill landed, seconds from the start to the kill). It missed when the run had saved its final
    checkpoint (step `steps`) before the kill: the process had ended, or was only closing its log, and a
    resume has nothing left to do."""
    p = subprocess.Popen(cmd, env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_start = time.perf_counter()
    while p.poll() is None and last_logged_step(run) < target:
        time.sleep(0.01)
    time.sleep(delay)
    ended = p.poll() is not None
    kill_tree(p.pid)  # torchrun starts each rank in its own session: kill them all, as a dead node would
    p.wait()
    return not ended and latest_step(run) < steps, time.perf_counter() - t_start


def main() -> int:
    parser = bench_cli.parser(__doc__)
    parser.add_argument("--kills", type=bench_cli.count(1), default=10)
    parser.add_argument("--steps", type=bench_cli.count(3), default=60)
    parser.add_argument("--nproc", type=bench_cli.count(1), default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="more pretrain flags, after --")
    args = parser.parse_args()
    if args.kills > args.steps - 2:  # kill targets are distinct steps in [2, steps)
        parser.error(f"--kills {args.kills} needs --steps of at least {args.kills + 2}, got {args.steps}")
    rng = random.Random(args.seed)

    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.quickstart import corpus_path

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        import gzip

        with gzip.open(corpus_path(), "rt", encoding="utf-8") as f:
            (tmp / "corpus.txt").write_text(f.read(200_000), encoding="utf-8")
        data = tmp / "data"
        prepare(PrepareConfig(inputs=[str(tmp / "corpus.txt")], out=str(data), tokenizer="char"), progress=False)

        t0 = time.perf_counter()
        straight = tmp / "straight"
        subprocess.run(command(data, straight, args.steps, args.nproc, args.extra), check=True, env=env())
        duration = time.perf_counter() - t0

        run = tmp / "killed"
        print(f"# straight run: {args.steps} steps in {duration:.1f} s; killing a second run {args.kills} times")
        print("| kill | target step | after s | latest checkpoint before | latest after kill | result |")
        print("|------|-------------|---------|--------------------------|-------------------|--------|")
        targets = sorted(rng.sample(range(2, args.steps), args.kills))
        missed = 0
        for k, target in enumerate(targets):
            before = latest_step(run)
            cmd = command(data, run, args.steps, args.nproc, args.extra)
            landed, delay = kill_attempt(cmd, run, target, rng.uniform(0.0, 0.3), args.steps)
            missed += not landed
            print(
                f"| {k + 1:4d} | {target:11d} | {delay:7.2f} | {before:24d} | {latest_step(run):17d} | "
                f"{'landed' if landed else 'missed'} |"
            )
        subprocess.run(
            command(data, run, args.steps, args.nproc, args.extra), check=True, env=env(), stdout=subprocess.DEVNULL
        )

        a = load_checkpoint(straight / "checkpoints" / f"step-{args.steps:06d}").model_state()
        b = load_checkpoint(run / "checkpoints" / f"step-{args.steps:06d}").model_state()
        same_weights = a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        same_losses = losses(straight) == losses(run)
        print(f"\nfinal weights bit-identical: {same_weights}; metrics.jsonl losses identical: {same_losses}")
        print(f"kills that landed before the final checkpoint: {args.kills - missed} of {args.kills}")
        if missed:
            print(
                f"{missed} kill(s) missed: the run had saved its step-{args.steps:06d} before them, so they test no "
                "resume; raise --steps (or lower --kills)"
            )
        return 0 if same_weights and same_losses and not missed else 1


if __name__ == "__main__":
    sys.exit(bench_cli.run(main))
