"""Whether `lmforge finetune` may continue the run already in RUN_DIR, and what it says when it may not.

- `existing_finetune`: re-running the same command resumes; another base, task, adapt mode or setting (other than
  the `RESUME_FREE` ones, which only shape the final report) is a one-line error, as `pretrain` refuses
  another model config. A folder that is not a fine-tuning run, or a quantized copy, is refused too.
- `merged_refusal`: a LoRA run whose adapters `--merge` folded into its weights cannot train on.
- `base_argument`: BASE as finetune.json records it, which a resumed run must match.

The checks that need the loaded base and data (base and train-file hashes, seed, optimizer, labels) stay in
`finetune.py`, where those are read. Split out of it so the rules for continuing a run sit in one place.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import ConfigError
from lmforge.fields import spelled

if TYPE_CHECKING:
    from lmforge.finetune_config import FinetuneConfig

# settings that may change between a run and its resumption (they only shape the final report)
RESUME_FREE = ("eval_samples", "max_new_tokens", "doc_stride", "merge", "dpo_reference")


def base_argument(base: str | Path) -> str:
    """BASE as finetune.json records it: a resolved path, or a hub name (`hf:ORG/NAME`) as written."""
    from lmforge.export.hub import is_hub_spec

    return str(base) if is_hub_spec(base) else str(Path(base).resolve())


def existing_finetune(out: Path, base: str | Path, cfg: FinetuneConfig) -> dict[str, Any] | None:
    """finetune.json of the run in `out` when this command continues it; None for a new run.

    Re-running the same command resumes; another base, task, adapt mode or adapter shape is a
    one-line error (like `pretrain` with another model config).
    """
    from lmforge.checkpoint import read_json
    from lmforge.runs import has_run_markers, run_contents

    if not run_contents(out):  # (none, or a run killed as it began)
        return None
    if (out / "quantize.json").is_file():  # (it holds a copy of its fine-tune's finetune.json)
        raise ConfigError(
            f"{out} is a quantized copy, which finetune does not continue; fine-tune the original run, or choose "
            "another --out"
        )
    if not (out / "finetune.json").is_file():
        overwritable = has_run_markers(out)  # else --overwrite refuses it too
        raise ConfigError(
            f"{out} exists and is not a fine-tuning run; choose another --out"
            + (" or pass --overwrite" if overwritable else "")
        )
    info = read_json(out / "finetune.json", "pass --overwrite to start the run over")
    old = info.get("finetune_config", {})
    new = dataclasses.asdict(cfg)
    hint = "use another --out, or --overwrite to start over"
    for key in ("task", "adapt"):
        if old.get(key) != new[key]:
            raise ConfigError(f"{out} holds a --{key} {old.get(key)} run, not --{key} {new[key]}; {hint}")
    base_arg = base_argument(base)
    if info.get("base_arg", base_arg) != base_arg:
        raise ConfigError(f"{out} was fine-tuned from {info['base_arg']}, not {base_arg}; {hint}")
    changed = [
        f"{k} {spelled(old[k])} -> {spelled(v)}"
        for k, v in new.items()
        if k not in RESUME_FREE and k in old and old[k] != v
    ]
    if changed:
        raise ConfigError(f"{out} holds a run with other settings ({', '.join(changed[:3])}); {hint}")
    return info


def merged_refusal(out: Path, step: int, max_steps: int, done: str, task: str) -> str:
    """Why a run whose LoRA adapters `--merge` folded into its weights cannot go on, and what to do instead.

    Its weights are the base's plus the adapters, so a new fine-tune can start from them, except a
    classifier's (a model with a head is not a base `load_base` takes): that one can only be trained again.
    """
    if done:  # it merged, then stopped in its final evaluation (no eval.json)
        return (
            f"{out} merged its LoRA adapters at step {step} but stopped before its final evaluation; "
            f"score it with 'lmforge eval {out} --task {task} --data FILE', or pass --overwrite to fine-tune again"
        )
    instead = "" if task == "classify" else f"fine-tune it further as a new base ('lmforge finetune {out} ...'), or "
    return (
        f"{out} finished at step {step} with its LoRA adapters merged into the weights (--merge), so LoRA "
        f"training cannot continue to train.max_steps {max_steps}; {instead}pass --overwrite (or another --out) "
        f"to train from the base again for {max_steps} steps"
    )
