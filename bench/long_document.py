"""Memory and time of `prepare`'s pass-2 encoding (`encode_split`) on ONE long one-line document, as a table.

The document is the packaged tinyshakespeare (public domain) with its newlines replaced by spaces, repeated to
`--size-mb`, written to a docs file as pass 1 writes it (one JSON string per line). Tokenizers: byte-level BPE
(4,096 ids) and char, trained on the book itself. Each measurement is a fresh process: "RSS before" is its
resident memory after training the tokenizer, "peak" the most it held while encoding (VmHWM, reset after
training; Linux only), so "added" is what encoding the document cost.

    python bench/long_document.py                       # 50 MB, bpe and char
    python bench/long_document.py --size-mb 200 --tokenizers bpe
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.quickstart import corpus_path


def _book() -> str:
    with gzip.open(corpus_path(), "rt", encoding="utf-8") as f:
        return f.read()


def _status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def measure(docs: str, tokenizer: str, work: str) -> None:
    """Child process: encode the docs file once, print one JSON line."""
    import numpy as np
    from tqdm import tqdm

    from lmforge.data.tokenizing import encode_split
    from lmforge.tokenizer.train import train_bpe, train_char

    tok = train_bpe([_book()], 4096) if tokenizer == "bpe" else train_char([_book()])
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # resets the peak (VmHWM) to the resident memory now: training's peak is not counted
    before = _status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    with tqdm(disable=True) as bar:
        shards, tokens = encode_split(tok, Path(docs), Path(work), "train", np.uint16, 1 << 30, bar)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    for name in shards:
        (Path(work) / name).unlink()
    peak = _status_mb("VmHWM")
    print(
        json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_before_mb": before, "peak_mb": peak, "tokens": tokens})
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=50, help="document size (default 50)")
    parser.add_argument("--tokenizers", nargs="+", default=["bpe", "char"], choices=["bpe", "char"])
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-long-doc-") as work:
        line = _book().replace("\n", " ")
        size = int(args.size_mb * 1e6)
        docs = Path(work) / "docs-train.jsonl.part"
        with open(docs, "w", encoding="utf-8") as f:
            f.write(json.dumps((line * (size // len(line) + 1))[:size], ensure_ascii=False) + "\n")
        print(f"{os.cpu_count()} CPUs, one document of {args.size_mb:g} MB on one line, load {os.getloadavg()[0]:.1f}")
        print("| tokenizer | tokens | seconds | CPU s | RSS before MB | peak MB | added MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for tokenizer in args.tokenizers:
            cmd = [sys.executable, __file__, "--measure", str(docs), tokenizer, work]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"{tokenizer} failed: {result.stderr.strip().splitlines()[-1:]}")
            r = json.loads(result.stdout.strip().splitlines()[-1])
            before, peak = r["rss_before_mb"], r["peak_mb"]
            print(
                f"| {tokenizer} | {r['tokens']:,} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {before:.0f} "
                f"| {peak:.0f} | {peak - before:.0f} |"
            )


if __name__ == "__main__":
    main()
