"""`pretrain --init-from RUN`: the checkpoint whose weights start a new run (continued pretraining), and its checks.

- `init_settings` gives the CLI RUN's model section and objective, applied under the flags.
- `init_checkpoint` opens RUN's checkpoint and refuses, in one line and before anything is written, what cannot
  start from it: another model shape, an objective its family cannot train, data prepared with another tokenizer.
- The weights are loaded by `train/run.py` into the model it built (`checkpoint.load_weights`).

Split out of `train/run.py`, which owns the run directory rules; a resume of the new run reads its own checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lmforge.checkpoint import Checkpoint
from lmforge.config import RunConfig
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer.tokenizer import Tokenizer


def _open_init_source(source: str | Path) -> tuple[Checkpoint, RunConfig, Tokenizer]:
    """`--init-from`'s checkpoint (RUN's latest, or the checkpoint folder given), its config and tokenizer."""
    from lmforge.adapt.load import is_hf_dir
    from lmforge.checkpoint import open_trained, resolve_checkpoint

    if is_hf_dir(Path(source)):  # (resolve_checkpoint called it a run without a checkpoint: "train it first")
        raise ConfigError(
            f"--init-from {source} is a Hugging Face model folder; import it first (lmforge import {source} --out "
            "RUN_DIR) and pass --init-from RUN_DIR"
        )
    ckpt_dir = resolve_checkpoint(source)
    info_path = ckpt_dir.parent.parent / "finetune.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else None
    # what a whole-model fine-tune of a decoder saves is a plain model; adapters, prompts, heads and ELECTRA's
    # discriminator alone are not (they failed later as weights "written for another model config")
    if isinstance(info, dict) and (info.get("saved") != "model" or info.get("task") == "classify"):
        raise ConfigError(
            f"--init-from {source}: that fine-tune saved {info.get('saved')} weights for task {info.get('task')}, "
            "not a whole language model; start from its base run, or from a fine-tune saved whole (--adapt full, "
            "or --merge)"
        )
    ckpt, config, tokenizer = open_trained(ckpt_dir)
    if info is not None and config.model.family == "electra":
        raise ConfigError(
            f"--init-from {source}: an ELECTRA fine-tune keeps only its discriminator; start from its base run"
        )
    return ckpt, config, tokenizer


def init_settings(source: str | Path) -> dict[str, Any]:
    """`pretrain --init-from RUN`'s starting settings, applied under the flags: RUN's model section (which a flag
    may not change, `init_checkpoint`) and objective (which one may, within what the model's family trains)."""
    config = _open_init_source(source)[1]
    return {"model": dataclasses.asdict(config.model), "objective": {"name": config.objective.name}}


def init_checkpoint(cfg: RunConfig, tokenizer: Tokenizer) -> Checkpoint:
    """`--init-from`: the checkpoint whose weights start a new run (RUN's latest, or the checkpoint folder given),
    once its model and tokenizer are checked to be the run's (one-line errors, before anything is written; a
    model.vocab_size 0, "from the data", is the run's)."""
    from lmforge.train.objective_setup import objectives_for

    source = cfg.init_from
    ckpt, config, source_tokenizer = _open_init_source(source)
    if cfg.dist.meta_init:
        raise ConfigError(f"--init-from {source} loads whole weights before sharding; drop --dist.meta_init")
    want = with_new_defaults(dataclasses.asdict(config.model), cfg.model)
    given = {**dataclasses.asdict(cfg.model), **({} if cfg.model.vocab_size else {"vocab_size": want["vocab_size"]})}
    keys = ["family"] if want.get("family") != given.get("family") else [*given, *(k for k in want if k not in given)]
    for key in keys:
        if given.get(key) != want.get(key):
            raise ConfigError(
                f"--init-from {source}: model.{key} {given.get(key)!r} differs from that run's {want.get(key)!r}; "
                f"drop --model.{key} (and any --preset): the model comes from {source}"
            )
    fits = objectives_for(cfg.model.family)
    if cfg.objective.name not in fits:  # (resolve_run_config's refusal suggested a --preset, which differs)
        raise ConfigError(
            f"--init-from {source}: objective {cfg.objective.name!r} cannot train its model.family "
            f"{cfg.model.family!r} model; pass --objective {' or '.join(fits)}"
        )
    if source_tokenizer.fingerprint != tokenizer.fingerprint:
        tok_path = ckpt.path.parent.parent / "tokenizer.json"
        raise DataError(
            f"the data in {cfg.data.dir} was prepared with another tokenizer than {source}'s; prepare it with "
            f"lmforge prepare INPUTS --out DATA --tokenizer {tok_path}"
        )
    return ckpt


def with_new_defaults(saved: Any, model: Any) -> Any:
    """A saved model section with the settings that lmforge added since it was written (model.qkv_bias, ...)
    at their defaults, which are the behaviour it was trained with: a run from an older lmforge was refused
    as "a different model config (qkv_bias None -> False)". Another family or a non-dict: unchanged."""
    if not isinstance(saved, dict) or saved.get("family", "gpt") != model.family:
        return saved
    defaults = {f.name: f.default for f in dataclasses.fields(model) if f.default is not dataclasses.MISSING}
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
