"""`lmforge quickstart`: the whole job on the built-in corpus, in about five minutes on 2 CPU cores.

prepare (built-in tinyshakespeare, ~1.1 MB, public domain, shipped gzipped in `lmforge/assets/`)
→ pretrain (preset `quickstart`) → eval on the whole validation split → a generated sample → where
everything is. Re-running resumes/reuses what is already there; `--overwrite` starts over.
"""

from __future__ import annotations

import shlex
import time
from importlib import resources
from pathlib import Path

CORPUS = "tinyshakespeare.txt.gz"
PROMPT = "ROMEO:\n"
TOKENIZER = "char"


def corpus_path() -> Path:
    """Path of the built-in corpus inside the installed package."""
    return Path(str(resources.files("lmforge") / "assets" / CORPUS))


def quickstart(
    *,
    out: str = "runs/quickstart",
    data_out: str = "data/quickstart",
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Prepare, train, evaluate and sample; returns the validation metrics."""
    import sys

    from lmforge.config import load_config, merge, parse_overrides
    from lmforge.data.prepare import PrepareConfig, load_data_dir, prepare
    from lmforge.errors import DataError

    t0 = time.perf_counter()
    cfg = load_config(  # first: a bad setting stops before anything is prepared (or torch is imported)
        preset="quickstart", overrides=merge(parse_overrides(overrides or []), {"data": {"dir": data_out}, "out": out})
    )
    from lmforge.checkpoint import STEP_DIR, latest_checkpoint
    from lmforge.eval.lm import evaluate_checkpoint
    from lmforge.generate import generate_from_checkpoint
    from lmforge.train.run import pretrain

    try:
        if overwrite:
            raise DataError("prepare again")
        load_data_dir(data_out)
        print(f"[1/4] using prepared data in {data_out} (pass --overwrite to prepare it again)")
    except DataError:
        print(f"[1/4] preparing the built-in Shakespeare corpus into {data_out}")
        prepare(PrepareConfig(inputs=[str(corpus_path())], out=data_out, tokenizer=TOKENIZER, overwrite=overwrite))

    print(f"[2/4] training a small GPT into {out}")
    before = None if overwrite else latest_checkpoint(Path(out))  # a re-run of a finished quickstart trains nothing
    state = pretrain(cfg, overwrite=overwrite)
    if before is not None and state.step == int(STEP_DIR.match(before.name).group(1)):
        # (its state says how the earlier run stopped: "the time budget ended training" was said of no training)
        print(
            f"      nothing new was trained: {out} was trained before, to step {state.step} of {cfg.train.max_steps} "
            "(the line above says why it stops there); the numbers below are for that step, and --overwrite "
            "trains it again from the start"
        )
    elif state.stop_reason == "time_budget":
        print(
            f"      the {cfg.train.time_budget:g} s time budget ended training at step {state.step} of "
            f"{cfg.train.max_steps} (this machine is slower or busier than the README's): the numbers below "
            "are for that step"
        )

    print("[3/4] evaluating on the whole validation split")
    metrics = evaluate_checkpoint(out, split="val")
    print(
        f"      val loss {metrics['loss']:.4f} | perplexity {metrics['ppl']:.2f} | bits per byte {metrics['bpb']:.4f}"
    )

    print(f"[4/4] sample (prompt {PROMPT!r}, temperature 0.8, top-k 50, seed 0):\n")
    generate_from_checkpoint(
        out,
        prompt=PROMPT,
        max_new_tokens=400,
        temperature=0.8,
        top_k=50,
        seed=0,
        stop_at_eos=False,
        stream=sys.stdout,
    )
    run = Path(out)
    print(
        f"\n\ndone in {time.perf_counter() - t0:.0f} s\n"
        f"  run directory : {run}\n"
        f"  loss curve    : {run / 'loss.png'}\n"
        f"  checkpoints   : {run / 'checkpoints'} (latest: {(run / 'checkpoints' / 'latest').read_text().strip()})\n"
        f"  metrics       : {run / 'metrics.jsonl'}\n"
        "next (one command a line):\n" + "\n".join(f"  {line}" for line in next_commands(run))
    )
    return metrics


def next_commands(run: Path) -> list[str]:
    """The commands quickstart suggests at its end, the run's path quoted for the shell (an --out with a space
    or a quote, such as 'my runs/q', was printed bare, so the pasted command named two paths)."""
    path = shlex.quote(str(run))
    return [f"lmforge generate {path} --prompt 'JULIET:'", f"lmforge eval {path} --split test"]
