"""Generation speed on CPU: `lmforge.generate` with its KV cache vs Hugging Face `generate`, and batched generation.

Both run the same weights: an lmforge GPT-2-style model (`--family llama`: Llama-style, rotary positions,
RMSNorm, SwiGLU, grouped-query attention with n_head / 3 (at least 1) k/v heads, no biases) is converted
with the exporter's own key map (`lmforge.export.hf.to_hf_state_dict`, the tensors `lmforge export --to hf`
writes) into `transformers.GPT2LMHeadModel` (`LlamaForCausalLM`), and the script checks that the two give
the same logits before timing.
Decoding is greedy for both, prompt and length are fixed (HF gets min_new_tokens = max_new_tokens and
no end-of-text id, so neither stops early), and the generated ids must agree. Timing is interleaved in
one process (median of rounds), so load from other processes on a shared machine hits all alike.
A third contestant is `generate(..., compile=True)` (`--compile` on the CLI: the decode step through
torch.compile); its compile time is shown apart and left out of its tokens/s, which is what a chat or
serve session sees after its first reply (`--no-compile` skips it).

Each shape's row also shows two floors, timed in the same run. Bandwidth floor: the weight bytes one
decoded token reads, divided by the bandwidth of a single fp32 matrix-vector product over a matrix of
that many bytes (one kernel, one long stream, the same cache level the weights live in). Matmul floor:
the model's own linear layers applied to one token back to back, nothing in between; the weights then
come as 4·n_layer+1 separate streams, which this CPU reads at about half the single-stream rate once
they outgrow L2. "HF / matmul floor" is the most any batch-1 decoder on these kernels could gain on HF.

`--batch N` adds a second table: N prompts of different lengths, answered by one `generate_batch` call
(one KV cache, left-padded) vs N sequential `generate` calls; the ids must be identical.

    python bench/generate_speed.py --threads 1                       # baby, middle and 10.8M shapes
    python bench/generate_speed.py --threads 1 --shape 4,4,128,64 --batch 16
    python bench/generate_speed.py --family llama                    # the same shapes, Llama-style
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import bench_cli
import torch

from lmforge.export.hf import to_hf_state_dict
from lmforge.export.hf_families import _gpt2_config_to_hf, _llama_config_to_hf
from lmforge.generate import _compile_failed, generate, generate_batch
from lmforge.models.gpt import GPT, GPTConfig

VOCAB = 65
# nanoGPT's baby GPT (what users train on CPU here), a middle one, and the 10.8M Shakespeare model
SHAPES = ["4,4,128,64", "6,4,256,256", "6,6,384,256"]


def interleaved(contestants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each contestant, rounds alternating who goes first."""
    times: dict[str, list[float]] = {name: [] for name in contestants}
    order = list(contestants)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            t0 = time.perf_counter()
            contestants[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def build(shape: str, family: str = "gpt2") -> tuple[GPT, GPTConfig]:
    n_layer, n_head, d_model, ctx = (int(v) for v in shape.split(","))
    arch = (
        dict(bias=True)
        if family == "gpt2"
        else dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=max(1, n_head // 3))
    )
    cfg = GPTConfig(vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, d_model=d_model, max_seq_len=ctx, **arch)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    return model.eval(), cfg


def weight_bytes(model: GPT) -> int:
    """Bytes of weights one decoded token reads: every parameter but the position table (one row of it)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n - (model.pos_emb.weight.nbytes if model.pos_emb is not None else 0)


def median_seconds(fn: Callable[[], object], rounds: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matvec_seconds(n_bytes: int, rounds: int) -> float:
    """One fp32 matrix-vector product over a (n_bytes / 4096, 1024) matrix: a single read of n_bytes."""
    w = torch.randn(max(1, n_bytes // 4 // 1024), 1024)
    x = torch.randn(1024)
    return median_seconds(lambda: torch.mv(w, x), max(rounds, 20))


@torch.inference_mode()
def matmul_seconds(model: GPT, rounds: int) -> float:
    """The model's own weight matrices applied to one token, back to back, nothing else in between."""
    mats = [(m.weight, m.bias) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if model.lm_head is None:
        mats.append((model.tok_emb.weight, None))  # the tied output projection
    xs = [torch.randn(1, 1, w.shape[1]) for w, _ in mats]

    def run() -> None:
        for (w, b), x in zip(mats, xs, strict=True):
            torch.nn.functional.linear(x, w, b)

    return median_seconds(run, max(rounds, 20))


def vs_hf(shape: str, args: argparse.Namespace) -> dict[str, object]:
    import transformers

    ours, cfg = build(shape, args.family)
    new = min(args.new, cfg.max_seq_len - args.prompt)
    to_hf = _gpt2_config_to_hf if args.family == "gpt2" else _llama_config_to_hf
    hf_cfg = to_hf(cfg, eos_id=None, dtype=torch.float32)
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    config_class, model_class = (
        (transformers.GPT2Config, transformers.GPT2LMHeadModel)
        if args.family == "gpt2"
        else (transformers.LlamaConfig, transformers.LlamaForCausalLM)
    )
    hf_config = config_class(**hf_cfg)
    hf_config._attn_implementation = "sdpa"
    theirs = model_class(hf_config)
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg, args.family), strict=False)
    theirs.tie_weights()
    theirs.eval()

    prompt = torch.randint(0, VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(prompt) - theirs(prompt).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"{shape}: the exported HF model does not compute the same logits (max diff {diff:.2e})")

    def run_ours() -> list[int]:
        return generate(ours, prompt[0].tolist(), max_new_tokens=new, temperature=0.0, use_cache=True)

    def run_compiled() -> list[int]:
        return generate(ours, prompt[0].tolist(), max_new_tokens=new, temperature=0.0, compile=True)

    def run_hf() -> list[int]:
        with torch.no_grad():
            out = theirs.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        return out[0, args.prompt :].tolist()

    a, b = run_ours(), run_hf()  # warm-up, and the answers to compare
    same = sum(x == y for x, y in zip(a, b, strict=True))
    contestants = {"ours": run_ours, "hf": run_hf}
    compile_s, same_compiled = float("nan"), 0
    if not args.no_compile:
        t0 = time.perf_counter()
        c = run_compiled()
        compile_s = time.perf_counter() - t0
        if ours in _compile_failed:
            compile_s = float("nan")  # it decoded eagerly; the warning says why
        else:
            same_compiled = sum(x == y for x, y in zip(b, c, strict=True))  # vs HF, as eager
            contestants["compiled"] = run_compiled
    t = interleaved(contestants, args.rounds)
    n_bytes = weight_bytes(ours)
    floor = matvec_seconds(n_bytes, args.rounds)
    matmuls = matmul_seconds(ours, args.rounds)
    return {
        "shape": shape,
        "params": sum(p.numel() for p in ours.parameters()),
        "bytes": n_bytes,
        "new": new,
        "ours_ms": 1000 * t["ours"] / new,
        "hf_ms": 1000 * t["hf"] / new,
        "compiled_ms": 1000 * t.get("compiled", float("nan")) / new,
        "compile_s": compile_s,
        "same_compiled": same_compiled,
        "floor_ms": 1000 * floor,
        "matmul_ms": 1000 * matmuls,
        "gbps": n_bytes / floor / 1e9,
        "same": same,
        "diff": diff,
    }


def batched(shape: str, args: argparse.Namespace) -> dict[str, object]:
    """generate_batch on `args.batch` prompts of different lengths vs one generate call per prompt."""
    model, cfg = build(shape, args.family)
    new = min(args.new, cfg.max_seq_len // 2)
    g = torch.Generator().manual_seed(2)
    longest = cfg.max_seq_len - new + 1
    lengths = torch.randint(max(1, longest // 4), longest + 1, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]

    def run_batch() -> list[list[int]]:
        return generate_batch(model, prompts, max_new_tokens=new)

    def run_sequential() -> list[list[int]]:
        return [generate(model, p, max_new_tokens=new, temperature=0.0) for p in prompts]

    a, b = run_batch(), run_sequential()
    same = sum(x == y for x, y in zip(a, b, strict=True))
    t = interleaved({"batch": run_batch, "seq": run_sequential}, max(3, args.rounds // 3))
    tokens = args.batch * new
    return {
        "shape": shape,
        "lengths": f"{min(lengths)}-{max(lengths)}",
        "new": new,
        "seq_tps": tokens / t["seq"],
        "batch_tps": tokens / t["batch"],
        "same": same,
    }


def main() -> None:
    parser = bench_cli.parser(__doc__)
    parser.add_argument(
        "--shape",
        action="append",
        type=bench_cli.ints("n_layer,n_head,d_model,context"),
        help=f"n_layer,n_head,d_model,context (repeatable; default: {' '.join(SHAPES)})",
    )
    parser.add_argument(
        "--family",
        choices=["gpt2", "llama"],
        default="gpt2",
        help="GPT-2 style (vs GPT2LMHeadModel) or Llama style (vs LlamaForCausalLM)",
    )
    parser.add_argument("--prompt", type=bench_cli.count(1), default=16, help="prompt tokens (vs HF)")
    parser.add_argument("--new", type=bench_cli.count(1), default=48, help="generated tokens (capped by the context)")
    parser.add_argument("--rounds", type=bench_cli.count(1), default=10)
    parser.add_argument(
        "--threads", type=bench_cli.count(0), default=0, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--batch", type=bench_cli.count(0), default=0, help="also time generate_batch on this many prompts"
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the HF comparison (with --batch)")
    parser.add_argument("--no-compile", action="store_true", help="skip the generate(compile=True) contestant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shape or SHAPES
    for shape in shapes:
        if args.prompt + 1 > int(shape.split(",")[3]):
            raise SystemExit(f"--prompt {args.prompt} leaves no room in the context of {shape}")
    print(
        f"# torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; {args.family} shapes "
        f"n_layer,n_head,d_model,context; greedy; median of {args.rounds} interleaved rounds"
    )
    if not args.no_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise SystemExit("bench/generate_speed.py needs transformers: pip install 'lmforge[hf]'") from None
        print(f"\nbatch 1, prompt {args.prompt} tokens, vs HF generate (KV cache both)\n")
        print(
            "| shape | params | weights | bandwidth floor ms/token (GB/s) | matmul floor ms/token "
            "| lmforge ms/token | HF ms/token | lmforge vs HF | compiled ms/token (compile s) | compiled vs HF "
            "| HF / matmul floor | ids identical to HF (eager, compiled) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for shape in shapes:
            r = vs_hf(shape, args)
            ran = r["compiled_ms"] == r["compiled_ms"]  # NaN: skipped, or compiling failed
            compiled = (
                f"{r['compiled_ms']:.2f} ({r['compile_s']:.1f}) | {r['hf_ms'] / r['compiled_ms']:.2f}x"
                if ran
                else "n/a | n/a"
            )
            same_compiled = f"{r['same_compiled']}/{r['new']}" if ran else "n/a"
            print(
                f"| {r['shape']} | {r['params'] / 1e6:.2f}M | {r['bytes'] / 1e6:.1f} MB "
                f"| {r['floor_ms']:.2f} ({r['gbps']:.0f}) | {r['matmul_ms']:.2f} | {r['ours_ms']:.2f} "
                f"| {r['hf_ms']:.2f} | {r['hf_ms'] / r['ours_ms']:.2f}x | {compiled} "
                f"| {r['hf_ms'] / r['matmul_ms']:.2f}x "
                f"| {r['same']}/{r['new']}, {same_compiled} |",
                flush=True,
            )
        print(
            "\nbandwidth floor: the weight bytes read per token over one fp32 matrix-vector product of that size; "
            "matmul floor: the model's own linear layers on one token, back to back. HF / matmul floor is the "
            "largest speed-up over HF any batch-1 decoder built on these kernels could show."
        )
    if args.batch:
        print(f"\n{args.batch} prompts of different lengths: one generate_batch call vs {args.batch} generate calls\n")
        print("| shape | prompt lengths | new tokens | sequential tokens/s | batched tokens/s | speed-up | identical |")
        print("|---|---|---|---|---|---|---|")
        for shape in shapes:
            r = batched(shape, args)
            print(
                f"| {r['shape']} | {r['lengths']} | {r['new']} | {r['seq_tps']:.0f} | {r['batch_tps']:.0f} "
                f"| {r['batch_tps'] / r['seq_tps']:.2f}x | {r['same']}/{args.batch} |",
                flush=True,
            )


if __name__ == "__main__":
    bench_cli.run(main)
