"""Weight-only quantization on a briefly trained model: bpb, size on disk and CPU generation speed for
fp32, int8 and int4, printed as a Markdown table.

Trains the `quickstart` preset (4 layers, d_model 128, char tokenizer) on the packaged Shakespeare
for --steps steps (or reuses --run), then runs `lmforge quantize` twice and times greedy decoding
(KV cache, batch 1, 1 thread) two ways: the quantized run loaded as lmforge loads it (dequantized
once into float32), and with `QuantLinear` (integer weights kept, dequantized in every forward).

    python bench/quantize.py                       # prepare + train (~2 min) + quantize + measure
    python bench/quantize.py --run runs/bench-quantize --steps 0   # reuse a trained run
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import bench_cli  # bench/ is on sys.path when run as a script
import torch

from lmforge.compress.quantize import generation_speed, quantize_run, to_quant_linears
from lmforge.config import load_config
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.eval.lm import evaluate_checkpoint
from lmforge.quickstart import corpus_path
from lmforge.train.run import pretrain
from lmforge.trained import load_trained


def main() -> None:
    parser = bench_cli.parser(__doc__)
    parser.add_argument("--run", default="runs/bench-quantize", help="run directory to train (or reuse)")
    parser.add_argument(
        "--steps", type=bench_cli.count(0), default=300, help="training steps; 0 = reuse --run as it is"
    )
    parser.add_argument("--group-size", type=bench_cli.count(1), default=64)
    parser.add_argument("--tokens", type=bench_cli.count(1), default=128, help="generated tokens per timing")
    parser.add_argument("--threads", type=bench_cli.count(1), default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)

    if args.steps:
        data = run.with_name(run.name + "-data")
        prepare(
            PrepareConfig(inputs=[str(corpus_path())], out=str(data), tokenizer="char", overwrite=True), progress=False
        )
        overrides = {"data": {"dir": str(data)}, "out": str(run)}
        overrides["train"] = {"max_steps": args.steps, "time_budget": 0.0, "warmup_steps": 30}
        pretrain(load_config(preset="quickstart", overrides=overrides), overwrite=True, progress=False)

    rows = []
    base = load_trained(run, torch.device("cpu"))
    fp32 = evaluate_checkpoint(str(run), device="cpu")
    ckpt_bytes = (base.checkpoint.path / "model.safetensors").stat().st_size
    rows.append(("fp32", fp32["bpb"], ckpt_bytes, generation_speed(base.model, n_tokens=args.tokens, repeats=3), None))
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (8, 4):
            out = Path(tmp) / f"int{bits}"
            r = quantize_run(run, out, bits=bits, group_size=args.group_size, compare=False)
            bpb = evaluate_checkpoint(str(out), device="cpu")["bpb"]
            loaded = load_trained(out, torch.device("cpu")).model
            on_load = generation_speed(loaded, n_tokens=args.tokens, repeats=3)
            fly = to_quant_linears(load_trained(run, torch.device("cpu")).model, bits, args.group_size)
            on_the_fly = generation_speed(fly, n_tokens=args.tokens, repeats=3)
            name = "int8 (per channel)" if bits == 8 else f"int4 (groups of {args.group_size})"
            rows.append((name, bpb, r["bytes_after"], on_load, on_the_fly))

    print(f"model: quickstart preset, {sum(p.numel() for p in base.model.parameters()) / 1e6:.2f}M params, "
          f"step {base.checkpoint.meta.get('step')}, whole val split ({fp32['tokens']} tokens)")  # fmt: skip
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)\n"
    )
    print("| weights | val bpb | Δ bpb | model.safetensors | tokens/s (dequantized on load) | tokens/s (QuantLinear) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, bpb, size, tok_s, fly in rows:
        delta = f"{100 * (bpb - rows[0][1]) / rows[0][1]:+.3f}%"
        print(
            f"| {name} | {bpb:.5f} | {delta} | {size / 1e6:.2f} MB ({size / rows[0][2]:.0%}) | {tok_s:.0f} | "
            + ("-" if fly is None else f"{fly:.0f}")
            + " |"
        )


if __name__ == "__main__":
    bench_cli.run(main)
