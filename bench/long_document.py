"""Memory and time of `prepare` on ONE long one-line document, as tables: pass-2 encoding alone, and a
whole `prepare` with a trained tokenizer (pass 1, training, pass 2).

The document is the packaged tinyshakespeare (public domain) with its newlines replaced by spaces, repeated to
`--size-mb`. Encoding table: the document is written to a docs file as pass 1 writes it (one JSON string per
line) and encoded by `encode_split` with a byte-level BPE (4,096 ids) or char tokenizer trained on the book
itself; "RSS before" is the process's resident memory after training, "peak" the most it held while encoding
(VmHWM, reset after training; Linux only), so "added" is what encoding the document cost. Prepare table
(`--prepare`): `prepare` of a .txt file holding the document on one line (`--val-fraction 0 --test-fraction 0`,
so it is the train split), with each trained tokenizer asked for (vocab 4,096); a thread samples the resident
memory every 10 ms, and each stage's "added" is its highest sample over the RSS before `prepare` started.
Each measurement is a fresh process.

    python bench/long_document.py                       # 50 MB, encoding with bpe and char
    python bench/long_document.py --size-mb 200 --tokenizers bpe
    python bench/long_document.py --prepare --tokenizers bpe wordpiece unigram
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

import bench_cli  # bench/ is on sys.path when run as a script

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


def measure_prepare(text_file: str, tokenizer: str, work: str) -> None:
    """Child process: `prepare` the one-line text file with a trained `tokenizer`, print one JSON line with the
    highest resident memory of each stage (pass 1 reading, tokenizer training, pass 2 encoding) over the start."""
    import threading

    import lmforge.data.prepare as prepare_module
    from lmforge.data.prepare import PrepareConfig, prepare

    stage = ["reading"]
    peaks: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            rss = _status_mb("VmRSS")
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss)

    def staged(name: str, fn):  # noqa: ANN001, ANN202 - wraps prepare's own calls to mark where a stage starts
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            stage[0] = name
            return fn(*args, **kwargs)

        return call

    prepare_module.make_tokenizer = staged("training", prepare_module.make_tokenizer)
    prepare_module.encode_split = staged("encoding", prepare_module.encode_split)
    cfg = PrepareConfig(
        inputs=[text_file], out=str(Path(work) / f"out-{tokenizer}"), tokenizer=tokenizer, vocab_size=4096,
        val_fraction=0.0, test_fraction=0.0, card=False,
    )  # fmt: skip
    before = _status_mb("VmRSS")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = prepare(cfg, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    sampler.join()
    added = {name: peak - before for name, peak in peaks.items()}
    tokens = manifest["splits"]["train"]["tokens"]
    print(
        json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_before_mb": before, "added": added, "tokens": tokens})
    )


def _run(args: list[str], what: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{what} failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = bench_cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=bench_cli.number(0), default=50, help="document size (default 50)")
    parser.add_argument(
        "--tokenizers", nargs="+", default=["bpe", "char"], choices=["bpe", "char", "wordpiece", "unigram"]
    )
    parser.add_argument("--prepare", action="store_true", help="measure a whole prepare (default: encoding only)")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--measure-prepare", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    if args.measure_prepare:
        measure_prepare(*args.measure_prepare)
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-long-doc-") as work:
        line = _book().replace("\n", " ")
        size = int(args.size_mb * 1e6)
        text = (line * (size // len(line) + 1))[:size]
        print(f"{os.cpu_count()} CPUs, one document of {args.size_mb:g} MB on one line, load {os.getloadavg()[0]:.1f}")
        if args.prepare:
            text_file = Path(work) / "long.txt"
            text_file.write_text(text + "\n", encoding="utf-8")
            del text
            print("| tokenizer | tokens | seconds | CPU s | RSS before MB | added MB: reading | training | encoding |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for tokenizer in args.tokenizers:
                r = _run(["--measure-prepare", str(text_file), tokenizer, work], f"prepare with {tokenizer}")
                added = [r["added"].get(stage) for stage in ("reading", "training", "encoding")]
                print(
                    f"| {tokenizer} | {r['tokens']:,} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} "
                    f"| {r['rss_before_mb']:.0f} | "
                    + " | ".join("-" if a is None else f"{a:.0f}" for a in added)
                    + " |"
                )
            return
        if not set(args.tokenizers) <= {"bpe", "char"}:
            sys.exit("the encoding table measures bpe and char; add --prepare for wordpiece and unigram")
        docs = Path(work) / "docs-train.jsonl.part"
        with open(docs, "w", encoding="utf-8") as f:
            f.write(json.dumps(text, ensure_ascii=False) + "\n")
        del text
        print("| tokenizer | tokens | seconds | CPU s | RSS before MB | peak MB | added MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for tokenizer in args.tokenizers:
            r = _run(["--measure", str(docs), tokenizer, work], tokenizer)
            before, peak = r["rss_before_mb"], r["peak_mb"]
            print(
                f"| {tokenizer} | {r['tokens']:,} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {before:.0f} "
                f"| {peak:.0f} | {peak - before:.0f} |"
            )


if __name__ == "__main__":
    bench_cli.run(main)
