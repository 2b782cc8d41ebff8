"""Fine-tuning modes side by side on a real sentiment set: accuracy, macro-F1, trainable parameters,
peak memory and wall-clock for full / head / LoRA / prompt tuning, plus 4-shot in-context
classification (no training) as the floor.

Setup (all real data from ../shared/data, see its README):
1. pretrain a small GPT (byte-level BPE) on the SST-2 train sentences as unlabelled text, so the
   base knows the domain; cached in --work, reused by later runs;
2. fine-tune it on the first --n-train labelled SST-2 train sentences with each mode, the same
   steps, batch and seed, and score the 872 SST-2 dev sentences.
Each mode runs in its own process, so "peak RSS" is that process's maximum resident memory
(VmHWM), which includes the few hundred MB of the Python + torch runtime itself.

    python bench/finetune_modes.py                       # ~6 min on 2 CPU cores
    python bench/finetune_modes.py --steps 300 --pretrain-seconds 600
    python bench/finetune_modes.py --family bert         # a BERT (MLM) base: full / head / LoRA, pooled [CLS]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import bench_cli  # bench/ is on sys.path when run as a script

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODES = ["full", "head", "lora", "prompt"]


def read_sst(path: Path, limit: int = 0) -> list[dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for sentence, label in reader:
            rows.append({"text": sentence, "label": "positive" if label == "1" else "negative"})
            if limit and len(rows) >= limit:
                break
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def pretrain_base(work: Path, seconds: float, family: str = "gpt") -> Path:
    from lmforge.config import load_config
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.train.run import pretrain

    base = work / ("base" if family == "gpt" else f"base-{family}")
    if (base / "checkpoints" / "latest").is_file():
        return base
    corpus = work / "sst2_sentences.txt"
    corpus.write_text("\n".join(r["text"] for r in read_sst(SHARED / "sst2" / "train.tsv")) + "\n", encoding="utf-8")
    data = work / "data"
    if not (data / "manifest.json").is_file():
        prepare(
            PrepareConfig(
                inputs=[str(corpus)], out=str(data), tokenizer="bpe", vocab_size=4096, doc_unit="line",
                val_fraction=0.02,
            ),
            progress=False,
        )  # fmt: skip
    if family == "bert":  # the same shape as the GPT base (4 x 128), MLM only (no sentence pairs in SST-2)
        overrides = {
            "out": str(base),
            "data": {"dir": str(data)},
            "model": {"n_layer": 4, "n_head": 4, "d_model": 128, "d_ff": 512, "max_seq_len": 128},
            "objective": {"name": "mlm"},
            "train": {"batch_size": 16, "lr": 1e-3, "max_steps": 3000, "time_budget": seconds, "warmup_steps": 50},
            "eval": {"every": 500, "max_batches": 20},
            "checkpoint": {"every": 1000},
        }
        pretrain(load_config(preset="bert-tiny", overrides=overrides), progress=False)
        return base
    overrides = {
        "out": str(base),
        "data": {"dir": str(data)},
        "model": {"n_layer": 4, "n_head": 4, "d_model": 128, "max_seq_len": 256},
        "train": {"batch_size": 16, "lr": 2e-3, "max_steps": 3000, "time_budget": seconds, "warmup_steps": 50},
        "eval": {"every": 500, "max_batches": 20},
        "checkpoint": {"every": 1000},
    }
    pretrain(load_config(preset="tiny", overrides=overrides), progress=False)
    return base


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux VmHWM (reset at exec); ru_maxrss elsewhere, which on
    Linux would also carry the parent's peak across fork + exec."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def child(args: argparse.Namespace) -> None:
    """One mode in this process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    if args.mode == "fewshot":
        from lmforge.eval.tasks import evaluate_task

        t0 = time.perf_counter()
        m = evaluate_task(args.base, task="classify", data=args.val, k_shot=4, shots=args.train, device="cpu")
        result = {"mode": "4-shot in-context (no training)", "trainable": 0, "total": 0, "train_s": 0.0}
        result |= {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "eval_s": time.perf_counter() - t0}
    else:
        from lmforge.finetune import FinetuneConfig, finetune

        overrides = {
            "train": {"max_steps": args.steps, "batch_size": 32, "warmup_steps": 20, "log_every": 50, "device": "cpu"},
            "eval": {"every": 0},
        }
        cfg = FinetuneConfig(task="classify", adapt=args.mode, lora_rank=8)
        t0 = time.perf_counter()
        r = finetune(
            args.base, train_file=args.train, val_file=args.val, out=Path(args.work) / f"ft-{args.tag}{args.mode}",
            cfg=cfg,
            overrides=overrides, overwrite=True, progress=False,
        )  # fmt: skip
        result = {"mode": args.mode, "trainable": r["trainable_params"], "total": r["total_params"]}
        result |= {"accuracy": r["val"]["accuracy"], "macro_f1": r["val"]["macro_f1"], "train_s": r["train_seconds"]}
        result["eval_s"] = time.perf_counter() - t0 - r["train_seconds"]
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def main() -> None:
    parser = bench_cli.parser(__doc__)
    parser.add_argument("--work", default="runs/bench-finetune-modes", help="cache and run folder")
    parser.add_argument("--n-train", type=bench_cli.count(2), default=4000, help="labelled SST-2 train sentences")
    parser.add_argument("--steps", type=bench_cli.count(1), default=150, help="fine-tuning steps per mode (batch 32)")
    parser.add_argument(
        "--pretrain-seconds", type=bench_cli.number(0), default=150.0, help="time budget of the base pretraining"
    )
    parser.add_argument("--threads", type=bench_cli.count(1), default=1)
    parser.add_argument("--family", choices=["gpt", "bert"], default="gpt", help="the base: GPT or BERT (MLM)")
    parser.add_argument(
        "--modes", default="", help="default: full,head,lora,prompt,fewshot (GPT), full,head,lora (BERT)"
    )
    parser.add_argument("--child", dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--val", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tag = "" if args.family == "gpt" else f"{args.family}-"
    if args.mode:
        child(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = pretrain_base(work, args.pretrain_seconds, args.family)
    modes = args.modes or ",".join(MODES + ["fewshot"] if args.family == "gpt" else ["full", "head", "lora"])
    print(f"base: {base} (ready after {time.perf_counter() - t0:.0f} s)", flush=True)
    train_file, val_file = work / "train.jsonl", work / "dev.jsonl"
    write_jsonl(train_file, read_sst(SHARED / "sst2" / "train.tsv", args.n_train))
    write_jsonl(val_file, read_sst(SHARED / "sst2" / "dev.tsv"))
    results = []
    for mode in modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--base", str(base), "--train", str(train_file)]
        cmd += ["--val", str(val_file), "--work", str(work), "--steps", str(args.steps), "--threads", str(args.threads)]
        cmd += ["--family", args.family]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done: {mode}", flush=True)

    print(
        f"\n{args.family} base; SST-2 dev (872 sentences), {args.n_train} labelled train sentences, "
        f"{args.steps} steps x batch 32"
    )
    print("| mode | trainable params | share | accuracy | macro-F1 | peak RSS (MB) | train s | eval s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        share = f"{100 * r['trainable'] / r['total']:.2f}%" if r["total"] else "-"
        print(
            f"| {r['mode']} | {r['trainable']:,} | {share} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {r['train_s']:.1f} | {r['eval_s']:.1f} |"
        )


if __name__ == "__main__":
    bench_cli.run(main)
