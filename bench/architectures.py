"""Architecture comparison: LSTM, GRU, GPT-2-style and Llama-style LMs of ~0.4M parameters, trained on
the same prepared data for the same wall-clock budget, printed as a table (params, tokens/s, val bpb).

Every model goes through `lmforge pretrain` (the real loop, loaders and evaluation): the recurrent
ones with truncated BPTT and carried state (StreamLoader), the Transformers with shuffled windows.
Data: the packaged tinyshakespeare, char tokenizer, prepared once into --data-dir. Validation bpb is
measured on the same val windows (seq_len tokens, each scored from an empty context / zero state, so
the recurrent models get no state from the previous window either).

    python bench/architectures.py                    # 60 s per model, 1 thread
    python bench/architectures.py --budget 20 --models lstm gpt2
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import bench_cli  # bench/ is on sys.path when run as a script
import torch

from lmforge.config import load_config
from lmforge.log import read_metrics
from lmforge.train.run import pretrain

# ~0.4M non-embedding parameters each (char vocab of ~65 adds < 20k embedding parameters)
MODELS = {
    "lstm": {"family": "lstm", "n_layer": 2, "d_model": 160},
    "gru": {"family": "gru", "n_layer": 2, "d_model": 184},
    "gpt2": {"family": "gpt", "n_layer": 4, "n_head": 4, "d_model": 96},
    "llama": {
        "family": "gpt",
        "n_layer": 4,
        "n_head": 4,
        "n_kv_head": 2,
        "d_model": 96,
        "pos_emb": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "bias": False,
    },
}
LABELS = {"lstm": "LSTM", "gru": "GRU", "gpt2": "GPT-2-style", "llama": "Llama-style (GQA 4/2)"}


def prepare_data(out: Path) -> Path:
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.quickstart import corpus_path

    if not (out / "manifest.json").is_file():
        prepare(PrepareConfig(inputs=[str(corpus_path())], out=str(out), tokenizer="char"), progress=False)
    return out


def run(name: str, data: Path, out: Path, *, budget: float, seq_len: int, batch: int, lr: float) -> dict:
    cfg = load_config(
        overrides={
            "out": str(out / name),
            "data": {"dir": str(data)},
            "model": {**MODELS[name], "max_seq_len": seq_len},
            "train": {
                "max_steps": 10**6,
                "time_budget": budget,
                "batch_size": batch,
                "lr": lr,
                "min_lr": lr / 10,
                "warmup_steps": 50,
                "log_every": 20,
            },
            "eval": {"every": 0, "max_batches": 40},
            "checkpoint": {"every": 0, "keep": 1},
        }  # fmt: skip
    )
    state = pretrain(cfg, overwrite=True, progress=False)
    records = read_metrics(out / name / "metrics.jsonl")
    train_records = [r for r in records if "tokens_per_s" in r]
    final = [r for r in records if "val_bpb" in r][-1]
    from lmforge.trained import load_trained

    model = load_trained(out / name, torch.device("cpu")).model
    return {
        "model": LABELS[name],
        "params": sum(p.numel() for p in model.parameters()),
        # training tokens per second of training time (the final evaluation is not counted)
        "tok_s": train_records[-1]["tokens"] / train_records[-1]["elapsed_s"] if train_records else 0.0,
        "steps": state.step,
        "tokens": state.tokens,
        "val_bpb": final["val_bpb"],
    }


def main() -> None:
    parser = bench_cli.parser(__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per model (default: 60)")
    parser.add_argument("--seq-len", type=bench_cli.count(1), default=128)
    parser.add_argument("--batch", type=bench_cli.count(1), default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=bench_cli.count(1), default=1)
    parser.add_argument("--data-dir", default="data/bench-shakespeare-char")
    parser.add_argument("--out", default="runs/bench-architectures")
    args = parser.parse_args()
    if args.budget <= 0:  # train.time_budget 0 means "no limit": each model would train 10**6 steps
        parser.error(f"--budget must be > 0 seconds, got {args.budget:g}")
    torch.set_num_threads(args.threads)
    data = prepare_data(Path(args.data_dir))
    rows = []
    start = time.time()
    for name in args.models:
        rows.append(
            run(name, data, Path(args.out), budget=args.budget, seq_len=args.seq_len, batch=args.batch, lr=args.lr)
        )
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.budget:g} s per model, seq_len {args.seq_len}, batch {args.batch}, lr {args.lr} "
        f"(total {time.time() - start:.0f} s)\n"
    )
    print("| model | params | tokens/s | steps | tokens seen | val bpb |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.3f}M | {r['tok_s'] / 1e3:.1f}k | {r['steps']} | "
            f"{r['tokens'] / 1e6:.2f}M | {r['val_bpb']:.3f} |"
        )


if __name__ == "__main__":
    bench_cli.run(main)
