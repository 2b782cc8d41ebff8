"""Generation tasks on real data: BLEU/chrF of a small English->French translation run, and the loss
mask of chat SFT made visible.

1. Translation: a char-level GPT pretrained briefly on Tatoeba English and French sentences, then
   fine-tuned (full) on `<src> English <tgt> French` pairs with loss on the French side only, and
   scored with sacrebleu on held-out pairs (greedy decoding). Tatoeba, CC BY 2.0 FR.
2. SFT loss mask: one Self-Instruct seed task (Apache-2.0) rendered with the chat template; the
   characters whose tokens are training targets are shown between « and ».

    python bench/finetune_tasks.py                       # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import bench_cli  # bench/ is on sys.path when run as a script

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def show_mask(tok, messages: list[dict[str, str]]) -> str:
    """The rendered conversation with trained spans in «...»."""
    from lmforge.chat import ChatTemplate

    out = []
    for ids, train in ChatTemplate().segments(tok, messages):
        text = tok.decode(ids)
        out.append(f"«{text}»" if train else text)
    return "".join(out)


def main() -> None:
    parser = bench_cli.parser(__doc__)
    parser.add_argument("--work", default="runs/bench-finetune-tasks")
    parser.add_argument("--pretrain-seconds", type=bench_cli.number(0), default=120.0)
    parser.add_argument("--steps", type=bench_cli.count(1), default=300)
    parser.add_argument("--n-train", type=bench_cli.count(1), default=8000)
    parser.add_argument("--n-test", type=bench_cli.count(1), default=200)
    parser.add_argument("--threads", type=bench_cli.count(1), default=1)
    args = parser.parse_args()

    import torch

    from lmforge.config import load_config
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.finetune import FinetuneConfig, finetune
    from lmforge.train.run import pretrain

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pairs = [line.split("\t")[:2] for line in (SHARED / "tatoeba" / "eng-fra.txt").read_text("utf-8").splitlines()]
    # every 5th pair is held out, so train and test cover the same sentence lengths
    test = [p for i, p in enumerate(pairs) if i % 5 == 0][-args.n_test :]
    train = [p for i, p in enumerate(pairs) if i % 5 != 0][-args.n_train :]
    base = work / "base"
    t0 = time.perf_counter()
    if not (base / "checkpoints" / "latest").is_file():
        corpus = work / "tatoeba_sentences.txt"
        corpus.write_text("\n".join(s for p in train for s in p) + "\n", encoding="utf-8")
        prepare(
            PrepareConfig(inputs=[str(corpus)], out=str(work / "data"), tokenizer="char", doc_unit="line"),
            progress=False,
        )
        overrides = {
            "out": str(base),
            "data": {"dir": str(work / "data")},
            "model": {"n_layer": 4, "n_head": 4, "d_model": 128, "max_seq_len": 192},
            "train": {"batch_size": 16, "lr": 2e-3, "max_steps": 5000, "time_budget": args.pretrain_seconds},
            "eval": {"every": 1000, "max_batches": 10},
        }
        pretrain(load_config(preset="tiny", overrides=overrides), progress=False)
    pretrain_s = time.perf_counter() - t0
    for name, rows in (("train", train), ("test", test)):
        lines = [json.dumps({"source": s, "target": t}, ensure_ascii=False) for s, t in rows]
        (work / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = finetune(
        base,
        train_file=work / "train.jsonl",
        val_file=work / "test.jsonl",
        out=work / "translate",
        cfg=FinetuneConfig(task="translate", eval_samples=args.n_test, max_new_tokens=64, pack=True),
        overrides={
            "train": {"max_steps": args.steps, "batch_size": 8, "lr": 1e-3, "device": "cpu"},
            "eval": {"every": 0},
        },
        overwrite=True,
        progress=False,
    )
    val = result["val"]
    print(
        f"translation eng->fra: base pretrained {pretrain_s:.0f} s, fine-tuned {result['steps']} steps x 8 packed "
        f"rows ({result['train_seconds']:.0f} s) on {len(train)} pairs; {val['n']} held-out pairs, greedy"
    )
    print(f"| BLEU | chrF |\n| ---: | ---: |\n| {val['bleu']:.1f} | {val['chrf']:.1f} |")
    for s in val["samples"]:
        print(f"  {s['source']!r} -> {s['prediction']!r} (reference {s['reference']!r})")

    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(base / "tokenizer.json")
    seed = json.loads((SHARED / "alpaca_zh_en" / "self_instruct_seed_tasks.jsonl").read_text("utf-8").splitlines()[3])
    instance = seed["instances"][0]
    messages = [
        {"role": "user", "content": seed["instruction"] + ("\n\n" + instance["input"] if instance["input"] else "")},
        {"role": "assistant", "content": instance["output"]},
    ]
    print("\nSFT loss mask (targets between « and »; <|endoftext|> is the EOS target):\n")
    print(show_mask(tok, messages))


if __name__ == "__main__":
    bench_cli.run(main)
