"""Generation speed, batch 1 on CPU: `lmforge.generate` with its KV cache vs Hugging Face `generate`.

Both run the same weights: an lmforge GPT-2-style model is converted with the exporter's own key map
(`lmforge.export.hf.to_hf_state_dict`, the tensors `lmforge export --to hf` writes) into
`transformers.GPT2LMHeadModel`, and the script checks that the two give the same logits before timing.
Decoding is greedy for both, prompt and length are fixed (HF gets min_new_tokens = max_new_tokens and
no end-of-text id, so neither stops early), and the generated ids must agree. Timing is interleaved in
one process (median of rounds), so load from other processes on a shared machine hits both alike.

    python bench/generate_speed.py                            # 6L x 6H x 384, context 256
    python bench/generate_speed.py --shape 4,4,128,64 --new 48
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lmforge.export.hf import _gpt2_config_to_hf, to_hf_state_dict
from lmforge.generate import generate
from lmforge.models.gpt import GPT, GPTConfig

VOCAB = 65


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="6,6,384,256", help="n_layer,n_head,d_model,context")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new", type=int, default=100, help="generated tokens")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise SystemExit("bench/generate_speed.py needs transformers: pip install 'lmforge[hf]'") from None
    n_layer, n_head, d_model, ctx = (int(v) for v in args.shape.split(","))
    if args.prompt + args.new > ctx:
        raise SystemExit(f"--prompt + --new ({args.prompt + args.new}) must fit the context ({ctx})")

    cfg = GPTConfig(vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, d_model=d_model, max_seq_len=ctx, bias=True)
    torch.manual_seed(0)
    ours = GPT(cfg)
    ours.init_weights()
    ours.eval()
    hf_cfg = _gpt2_config_to_hf(cfg, eos_id=None, dtype=torch.float32)
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    hf_config = GPT2Config(**hf_cfg)
    hf_config._attn_implementation = "sdpa"
    theirs = GPT2LMHeadModel(hf_config)
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg, "gpt2"), strict=False)
    theirs.tie_weights()
    theirs.eval()

    prompt = torch.randint(0, VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(prompt) - theirs(prompt).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"the exported HF model does not compute the same logits (max diff {diff:.2e})")

    def run_ours() -> list[int]:
        return generate(ours, prompt[0].tolist(), max_new_tokens=args.new, temperature=0.0, use_cache=True)

    def run_hf() -> list[int]:
        with torch.no_grad():
            out = theirs.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        return out[0, args.prompt :].tolist()

    contestants = {"lmforge generate (KV cache)": run_ours, "HF generate (KV cache)": run_hf}
    outputs = {name: fn() for name, fn in contestants.items()}  # warm-up, and the answers to compare
    same = sum(a == b for a, b in zip(*outputs.values(), strict=True))
    times: dict[str, list[float]] = {name: [] for name in contestants}
    order = list(contestants)
    for r in range(args.rounds):
        for name in order[r % 2 :] + order[: r % 2]:  # alternate who goes first
            fn = contestants[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    rate = {name: args.new / statistics.median(ts) for name, ts in times.items()}
    hf_rate = rate["HF generate (KV cache)"]
    print(
        f"# torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; GPT-2 "
        f"{n_layer}L x {n_head}H x {d_model}, {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M params, "
        f"batch 1, prompt {args.prompt}, {args.new} new tokens greedy; logits max diff {diff:.1e}, "
        f"{same}/{args.new} generated ids identical; median of {args.rounds} interleaved rounds"
    )
    print("| generator | ms/token | tokens/s | vs HF |")
    print("|---|---|---|---|")
    for name, r in rate.items():
        print(f"| {name} | {1000 / r:.2f} | {r:.0f} | {r / hf_rate:.2f}x |")


if __name__ == "__main__":
    main()
