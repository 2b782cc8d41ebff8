"""`lmforge prepare` throughput (MB/s, MB per CPU second) and peak memory at 1 and 2 workers, as a table.

Builds a corpus of `--size-mb` (default 200) from real text: the packaged tinyshakespeare (public
domain) repeated with perturbations - each copy shuffles the paragraph order, swaps one word per
paragraph for another word of the book and tags it with the copy number, so copies are neither exact
nor (mostly) near duplicates and every stage does real work. Written as 8 plain-text files.

The tokenizer (byte-level BPE, 4,096 ids) is trained once on the original book and timed
separately; the timed runs encode with that existing tokenizer.json, as a large job would
(`--tokenizer bpe` has prepare train one on the corpus instead). About a fifth of the paragraphs come out
near-duplicates (a copy whose tag and swapped word leave Jaccard >= 0.8), which `--dedup near` removes.
Each run is a fresh process (`--measure`), so its peak RSS is its own: "main" is the prepare
process, "worker" the largest --workers process. "CPU s" adds the user+system time of all of
them and "load" is the 1-minute load average before and after: on a shared machine, MB per CPU
second says how fast prepare is, MB/s how fast it was there and then.

A second table splits each run by stage (wall seconds, MB/s and the main process's peak RSS when the
stage ended): pass 1 (read, clean, filter, hash, split, near MinHash, dedup; with a given tokenizer also
encoding and shard writing), tokenizer training, pass-2 encoding and the data card. Two `--size-mb`
values show what grows with the corpus (the dedup indexes should; nothing else).

    python bench/prepare_speed.py                     # 200 MB, workers 1 and 2
    python bench/prepare_speed.py --size-mb 20 --workers 1 2 --dedup near
    python bench/prepare_speed.py --size-mb 25 50 --dedup exact near --tokenizer given bpe --workers 1 2

`--index 100000 1000000` instead times the near-dedup index alone (NearDedup.duplicates, blocks of 25,000 as
prepare sends them) on random MinHash signatures with 10% planted near-duplicates, a fresh process per count:
its RSS growth per kept document (signatures included) and microseconds per document.
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

import bench_cli  # bench/ is on sys.path when run as a script

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


STAGES = ("pass 1", "tokenizer", "encode", "card")


def _cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _timed_stages(seconds: dict[str, float], cpu: dict[str, float], rss: dict[str, float]) -> None:
    """Wrap prepare's stage functions to add up each stage's seconds and note the peak RSS (this process's, MB)
    when it ends: pass 1 (read, clean, filter, hash, split, near MinHash, dedup, and with a given tokenizer
    encoding and shard writing), tokenizer training, encoding of pass 2 and the data card."""
    import lmforge.data.card as card
    import lmforge.data.prepare as prepare_module

    def wrap(owner: object, name: str, stage: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: object, **kwargs: object) -> object:
            t0, c0 = time.perf_counter(), _cpu_seconds()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
                cpu[stage] = cpu.get(stage, 0.0) + _cpu_seconds() - c0
                rss[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _TO_MB

        setattr(owner, name, timed)

    wrap(prepare_module, "_pass1", "pass 1")
    wrap(prepare_module, "make_tokenizer", "tokenizer")
    wrap(prepare_module, "encode_split", "encode")
    wrap(card, "write_card", "card")


_TO_MB = 1 / 1024 if sys.platform != "darwin" else 1 / 1024 / 1024  # ru_maxrss is KiB on Linux, bytes on macOS


def measure(args: argparse.Namespace) -> None:
    """Child process: run prepare once, print one JSON line with seconds, per-stage seconds and peak RSS."""
    from lmforge.data.prepare import PrepareConfig, prepare

    stage_seconds: dict[str, float] = {}
    stage_cpu: dict[str, float] = {}
    stage_rss: dict[str, float] = {}
    _timed_stages(stage_seconds, stage_cpu, stage_rss)
    cfg = PrepareConfig(
        inputs=[args.corpus], out=args.out, tokenizer=args.tokenizer_path, workers=args.measure, dedup=args.dedup[0],
        overwrite=True, card=True,
    )  # fmt: skip
    load = os.getloadavg()[0]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _TO_MB
    t0 = time.perf_counter()
    m = prepare(cfg, progress=False)
    seconds = time.perf_counter() - t0
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "seconds": seconds,
        "stage_seconds": stage_seconds,
        "stage_cpu_seconds": stage_cpu,
        "stage_rss_mb": stage_rss,
        "rss_before_mb": rss_before,
        "cpu_seconds": me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime,
        "load": [load, os.getloadavg()[0]],
        "main_rss_mb": me.ru_maxrss * _TO_MB,
        "worker_rss_mb": children.ru_maxrss * _TO_MB,
        "documents": m["documents"]["in"],
        "near_dup": m["documents"]["removed"]["near_dup"],
        "tokens": sum(s["tokens"] for s in m["splits"].values()),
    }))  # fmt: skip


def measure_index(documents: int, block: int = 25_000) -> None:
    """Child process: feed `documents` random signatures (a tenth of them copies of an earlier one with 8 of 128
    values changed) to a NearDedup; print one JSON line with the RSS it grew by and the seconds it took."""
    import numpy as np

    from lmforge.data.dedup import NearDedup

    def rss_mb() -> float:
        with open("/proc/self/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    rng = np.random.default_rng(0)
    index = NearDedup(threshold=0.8)
    index.duplicates([""], rng.integers(0, 2**32, size=(1, 128), dtype=np.uint32))  # (imports, first allocations)
    before, seconds, previous = rss_mb(), 0.0, None
    for start in range(0, documents, block):
        signatures = rng.integers(0, 2**32, size=(min(block, documents - start), 128), dtype=np.uint32)
        if previous is not None:  # plant near-duplicates of the previous block
            planted = rng.random(len(signatures)) < 0.1
            signatures[planted] = previous[rng.integers(len(previous), size=int(planted.sum()))]
            changed = rng.integers(128, size=(int(planted.sum()), 8))
            signatures[np.flatnonzero(planted)[:, None], changed] += np.uint32(1)
        t0 = time.perf_counter()
        index.duplicates([""] * len(signatures), signatures)
        seconds += time.perf_counter() - t0
        previous = signatures
    kept = documents + 1 - index.removed
    print(json.dumps({"rss_mb": rss_mb() - before, "seconds": seconds, "kept": kept, "removed": index.removed}))


def main() -> None:
    parser = bench_cli.parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--size-mb", type=bench_cli.number(0), nargs="+", default=[200], help="corpus sizes to build (default 200)"
    )
    parser.add_argument("--workers", type=bench_cli.count(1), nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--dedup", nargs="+", default=["exact"], choices=["none", "exact", "near"])
    parser.add_argument(
        "--tokenizer", nargs="+", default=["given"], choices=["given", "bpe"],
        help="'given': encode with a tokenizer.json trained beforehand (one pass); 'bpe': prepare trains a "
        "4,096-id BPE on the corpus (pass 1, training, pass 2)",
    )  # fmt: skip
    parser.add_argument("--work-dir", help="where to build the corpus (default: a temporary folder, removed after)")
    parser.add_argument(
        "--index", type=bench_cli.count(1), nargs="+", help="time the near-dedup index alone at these document counts"
    )
    parser.add_argument("--measure-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    if args.measure_index:
        measure_index(args.measure_index)
        return
    if args.index:
        print(f"{'documents':>9} | {'kept':>9} | {'removed':>7} | {'index RSS MB':>12} | {'bytes/kept doc':>14} | "
              f"{'us/doc':>6}")  # fmt: skip
        for documents in args.index:
            cmd = [sys.executable, __file__, "--measure-index", str(documents)]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            print(
                f"{documents:>9} | {r['kept']:>9} | {r['removed']:>7} | {r['rss_mb']:>12.0f} | "
                f"{r['rss_mb'] * 1e6 / r['kept']:>14.0f} | {r['seconds'] / documents * 1e6:>6.1f}"
            )
        return

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lmforge-prepare-bench-"))
    try:
        from lmforge.data.prepare import PrepareConfig, prepare

        t0 = time.perf_counter()
        book = work / "book.txt"
        book.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(corpus_path(), "rt", encoding="utf-8") as f:
            book.write_text(f.read(), encoding="utf-8")
        prepare(
            PrepareConfig(inputs=[str(book)], out=str(work / "tok"), vocab_size=4096, card=False, overwrite=True),
            progress=False,
        )
        print(f"tokenizer: byte-level BPE 4096 trained on 1.1 MB in {time.perf_counter() - t0:.1f} s (incl. prepare)")
        given = str(work / "tok" / "tokenizer.json")

        rows = []
        for size_mb in args.size_mb:
            t0 = time.perf_counter()
            corpus = work / f"corpus-{size_mb:g}"
            shutil.rmtree(corpus, ignore_errors=True)
            size = build_corpus(corpus, size_mb)
            print(f"corpus: {size / 1e6:.1f} MB in {FILES} files, built in {time.perf_counter() - t0:.1f} s")
            for tokenizer in args.tokenizer:
                for dedup in args.dedup:
                    for workers in args.workers:
                        cmd = [
                            sys.executable, __file__, "--measure", str(workers), "--corpus", str(corpus),
                            "--out", str(work / "out"), "--tokenizer-path", given if tokenizer == "given" else "bpe",
                            "--dedup", dedup,
                        ]  # fmt: skip
                        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
                        if result.returncode != 0:
                            sys.exit(
                                f"prepare failed with --workers {workers}: {result.stderr.strip().splitlines()[-1:]}"
                            )
                        r = json.loads(result.stdout.strip().splitlines()[-1])
                        rows.append((size, tokenizer, dedup, workers, r))
                        print(f"  {tokenizer} {dedup} workers {workers}: {r['seconds']:.1f} s", flush=True)
            shutil.rmtree(corpus, ignore_errors=True)

        print(f"\n{os.cpu_count()} CPUs, end to end (read, clean, dedup, split, encode, write)")
        print(
            f"{'MB':>5} | {'tokenizer':>9} | {'dedup':>5} | {'workers':>7} | {'seconds':>7} | {'MB/s':>6} | "
            f"{'docs/s':>8} | {'CPU s':>6} | {'MB per CPU s':>12} | {'main RSS MB':>11} | {'worker RSS MB':>13} | "
            f"{'load before/after':>17}"
        )
        print("-" * 148)
        for size, tokenizer, dedup, workers, r in rows:
            print(
                f"{size / 1e6:>5.0f} | {tokenizer:>9} | {dedup:>5} | {workers:>7} | {r['seconds']:>7.1f} | "
                f"{size / 1e6 / r['seconds']:>6.2f} | {r['documents'] / r['seconds']:>8.0f} | "
                f"{r['cpu_seconds']:>6.1f} | "
                f"{size / 1e6 / r['cpu_seconds']:>12.2f} | {r['main_rss_mb']:>11.0f} | {r['worker_rss_mb']:>13.0f} | "
                f"{r['load'][0]:>8.1f} {r['load'][1]:>8.1f}"
            )
        print(
            "\nper stage (wall seconds, input MB per wall second, CPU seconds of the main process - pass 1's --workers"
            " are joined at the end, so their CPU time is only in the total above -, peak RSS of the main process when"
            " the stage ended)"
        )
        print(f"{'MB':>5} | {'tokenizer':>9} | {'dedup':>5} | {'workers':>7} | {'stage':>9} | {'seconds':>7} | "
              f"{'MB/s':>7} | {'CPU s':>6} | {'peak RSS MB':>11}")  # fmt: skip
        print("-" * 93)
        for size, tokenizer, dedup, workers, r in rows:
            for stage in STAGES:
                if stage in r["stage_seconds"]:
                    sec = r["stage_seconds"][stage]
                    print(
                        f"{size / 1e6:>5.0f} | {tokenizer:>9} | {dedup:>5} | {workers:>7} | {stage:>9} | {sec:>7.1f} | "
                        f"{size / 1e6 / max(sec, 1e-9):>7.1f} | {r['stage_cpu_seconds'][stage]:>6.1f} | "
                        f"{r['stage_rss_mb'][stage]:>11.0f}"
                    )
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    bench_cli.run(main)
