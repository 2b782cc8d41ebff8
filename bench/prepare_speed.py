"""`lmforge prepare` throughput (MB/s, MB per CPU second) and peak memory at 1 and 2 workers, as a table.

Builds a corpus of `--size-mb` (default 200) from real text: the packaged tinyshakespeare (public
domain) repeated with perturbations - each copy shuffles the paragraph order, swaps one word per
paragraph for another word of the book and tags it with the copy number, so copies are neither exact
nor (mostly) near duplicates and every stage does real work. Written as 8 plain-text files.

The tokenizer (byte-level BPE, 4,096 ids) is trained once on the original book and timed
separately; the timed runs encode with that existing tokenizer.json, as a large job would.
Each run is a fresh process (`--measure`), so its peak RSS is its own: "main" is the prepare
process, "worker" the largest --workers process. "CPU s" adds the user+system time of all of
them and "load" is the 1-minute load average before and after: on a shared machine, MB per CPU
second says how fast prepare is, MB/s how fast it was there and then.

    python bench/prepare_speed.py                     # 200 MB, workers 1 and 2
    python bench/prepare_speed.py --size-mb 20 --workers 1 2 --dedup near
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.quickstart import corpus_path

FILES = 8


def build_corpus(folder: Path, size_mb: float, seed: int = 0) -> int:
    """Write perturbed copies of tinyshakespeare into `folder` until `size_mb` is reached; return bytes."""
    with gzip.open(corpus_path(), "rt", encoding="utf-8") as f:
        paragraphs = [p for p in f.read().split("\n\n") if p.strip()]
    words = sorted({w for p in paragraphs for w in p.split() if w.isalpha()})
    rng = random.Random(seed)
    target = int(size_mb * 1e6)
    written, copy = 0, 0
    folder.mkdir(parents=True, exist_ok=True)
    handles = [open(folder / f"part-{i:02d}.txt", "w", encoding="utf-8") for i in range(FILES)]
    try:
        while written < target:
            order = paragraphs[:]
            rng.shuffle(order)
            chunk = []
            for i, para in enumerate(order):
                tokens = para.split(" ")
                tokens[rng.randrange(len(tokens))] = rng.choice(words)
                chunk.append(f"[{copy}.{i}] " + " ".join(tokens))
            text = "\n\n".join(chunk) + "\n\n"
            handles[copy % FILES].write(text)
            written += len(text.encode("utf-8"))
            copy += 1
    finally:
        for h in handles:
            h.close()
    return written


def measure(args: argparse.Namespace) -> None:
    """Child process: run prepare once, print one JSON line with seconds and peak RSS."""
    from lmforge.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(
        inputs=[args.corpus], out=args.out, tokenizer=args.tokenizer, workers=args.measure, dedup=args.dedup,
        overwrite=True, card=True,
    )  # fmt: skip
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    m = prepare(cfg, progress=False)
    seconds = time.perf_counter() - t0
    to_mb = 1 / 1024 if sys.platform != "darwin" else 1 / 1024 / 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "seconds": seconds,
        "cpu_seconds": me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime,
        "load": [load, os.getloadavg()[0]],
        "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mb,
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mb,
        "documents": m["documents"]["in"],
        "tokens": sum(s["tokens"] for s in m["splits"].values()),
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200, help="corpus size to build (default 200)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--dedup", default="exact", choices=["none", "exact", "near"])
    parser.add_argument("--work-dir", help="where to build the corpus (default: a temporary folder, removed after)")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lmforge-prepare-bench-"))
    try:
        t0 = time.perf_counter()
        size = build_corpus(work / "corpus", args.size_mb)
        print(f"corpus: {size / 1e6:.1f} MB in {FILES} files, built in {time.perf_counter() - t0:.1f} s")

        from lmforge.data.prepare import PrepareConfig, prepare

        t0 = time.perf_counter()
        book = work / "book.txt"
        with gzip.open(corpus_path(), "rt", encoding="utf-8") as f:
            book.write_text(f.read(), encoding="utf-8")
        prepare(
            PrepareConfig(inputs=[str(book)], out=str(work / "tok"), vocab_size=4096, card=False, overwrite=True),
            progress=False,
        )
        print(f"tokenizer: byte-level BPE 4096 trained on 1.1 MB in {time.perf_counter() - t0:.1f} s (incl. prepare)")
        tokenizer = str(work / "tok" / "tokenizer.json")

        rows = []
        for workers in args.workers:
            cmd = [
                sys.executable, __file__, "--measure", str(workers), "--corpus", str(work / "corpus"),
                "--out", str(work / "out"), "--tokenizer", tokenizer, "--dedup", args.dedup,
            ]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if result.returncode != 0:
                sys.exit(f"prepare failed with --workers {workers}: {result.stderr.strip().splitlines()[-1:]}")
            r = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append((workers, r))

        print(f"\n{os.cpu_count()} CPUs, dedup={args.dedup}, end to end (read, clean, dedup, split, encode, write)")
        print(
            f"{'workers':>7} | {'seconds':>7} | {'MB/s':>6} | {'docs/s':>8} | {'CPU s':>6} | {'MB per CPU s':>12} | "
            f"{'main RSS MB':>11} | {'worker RSS MB':>13} | {'load before/after':>17}"
        )
        print("-" * 112)
        for workers, r in rows:
            print(
                f"{workers:>7} | {r['seconds']:>7.1f} | {size / 1e6 / r['seconds']:>6.2f} | "
                f"{r['documents'] / r['seconds']:>8.0f} | {r['cpu_seconds']:>6.1f} | "
                f"{size / 1e6 / r['cpu_seconds']:>12.2f} | {r['main_rss_mb']:>11.0f} | {r['worker_rss_mb']:>13.0f} | "
                f"{r['load'][0]:>8.1f} {r['load'][1]:>8.1f}"
            )
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
