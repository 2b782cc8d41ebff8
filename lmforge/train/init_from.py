"""`pretrain --init-from RUN`: the checkpoint whose weights start a new run (continued pretraining), and its checks.

- `init_settings` gives the CLI RUN's model section and objective, applied under the flags (a resume of the new
  run: its own, from its latest checkpoint).
- `init_start` opens RUN's checkpoint and refuses, in one line and before anything is written, what cannot
  start from it: another model shape, an objective its family cannot train; then checks RUN's weights' sha256,
  the one time a process hashes them.
- `load_init_weights` puts RUN's weights into the model `train/run.py` built.

Another tokenizer (continued pretraining on new data often extends or retrains it, e.g. a Chinese corpus on an
English base): the vocabulary-indexed weights (the embedding, an untied output head, BERT's MLM bias) keep, for
each token whose string is in both vocabularies, the base's row of that string; the end-of-text token and an
encoder's [PAD]/[CLS]/[SEP]/[MASK] keep the base's row of the same role. New tokens (and rows past the tokens, a
larger `--model.vocab_size`) start at the mean of the base's token rows, so their logits start at the average
logit and their embeddings in the middle of the trained ones (Hewitt 2021, "Initializing new word embeddings
for pretrained language models", https://nlp.stanford.edu/~johnhew/vocab-expansion.html). Every other weight
loads as saved. The model's vocab_size is then the data's (unless `--model.vocab_size` sets another).
Which weights are vocabulary-indexed is found by building the base model with one more token on the meta
device, so every model family is covered without a list of names.
Split out of `train/run.py`, which owns the run directory rules; a resume of the new run reads its own checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.checkpoint import Checkpoint
from lmforge.config import RunConfig
from lmforge.errors import ConfigError, LmforgeError
from lmforge.models import build_model
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.trained import load_weights


def _open_init_source(source: str | Path) -> tuple[Checkpoint, RunConfig, Tokenizer]:
    """`--init-from`'s checkpoint (RUN's latest, or the checkpoint folder given), its config and tokenizer."""
    from lmforge.adapt.load import is_hf_dir
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.trained import open_trained

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
    ckpt, config, tokenizer = open_trained(ckpt_dir, verify="state")  # (the weights: `init_start`, as a run starts)
    if info is not None and config.model.family == "electra":
        raise ConfigError(
            f"--init-from {source}: an ELECTRA fine-tune keeps only its discriminator; start from its base run"
        )
    return ckpt, config, tokenizer


def init_settings(source: str | Path, *, out: str | Path = "", overwrite: bool = False) -> dict[str, Any]:
    """`pretrain --init-from RUN`'s starting settings, applied under the flags: RUN's model section (which a flag
    may not change, `init_start`) and objective (which one may, within what the model's family trains). A re-run
    that resumes `out`, a run that --init-from started, takes them from its own latest checkpoint instead (the
    model it trains, RUN's with the data's vocab_size after another tokenizer): RUN is not read, so it may since be
    gone or trained on. RUN's weights are not hashed here: `init_start` verifies them once, when a run starts."""
    own = None if overwrite or not out else _resumed_settings(Path(out).expanduser())  # (as load_config reads it)
    return own if own is not None else _settings(_open_init_source(source)[1])


def _settings(config: RunConfig) -> dict[str, Any]:
    return {"model": dataclasses.asdict(config.model), "objective": {"name": config.objective.name}}


def _resumed_settings(out: Path) -> dict[str, Any] | None:
    """The settings of the run in `out` that a re-run resumes, when --init-from started it (its latest checkpoint's
    config); None otherwise, or when that config is unreadable (the resume then says what is wrong with it)."""
    from lmforge.checkpoint import latest_checkpoint
    from lmforge.config import config_from_json

    latest = latest_checkpoint(out)
    if latest is None:
        return None
    try:
        saved = json.loads((latest / "state.json").read_text(encoding="utf-8"))["config"]
        config = config_from_json(saved, where=str(latest / "state.json"))
    except (OSError, ValueError, KeyError, TypeError, LmforgeError):
        return None
    return _settings(config) if config.init_from else None


@dataclass(frozen=True)
class InitStart:
    """What `pretrain --init-from` starts a run from: the base checkpoint, the base run's config and, when the
    data was prepared with another tokenizer than the base's, which base row each of the run's tokens keeps."""

    checkpoint: Checkpoint
    source: str  # --init-from as given (RUN or a checkpoint folder)
    base: RunConfig
    # per token id of the new run (its tokenizer's ids, then an encoder's appended specials): the base's row of
    # the same token, or -1 for a new one; None: the same tokenizer, every weight loads as saved
    rows: list[int] | None
    base_rows: int  # the base's rows that belong to its tokens (its tokenizer and appended specials)

    @property
    def kept(self) -> int:
        return sum(r >= 0 for r in self.rows) if self.rows is not None else self.base_rows

    def summary(self) -> str:
        """The line `pretrain` prints when the vocabulary changes ("" with the base's tokenizer)."""
        if self.rows is None:
            return ""
        n, m = self.kept, len(self.rows)
        return f"init-from: {n} of {m} tokens kept from {self.source}, {m - n} new"

    def record(self) -> dict[str, Any]:
        """What the run folder's `init_from.json` says about the start (written once, when the run starts)."""
        m = len(self.rows) if self.rows is not None else self.base_rows
        return {
            "checkpoint": str(self.checkpoint.path.resolve()),
            "tokenizer": "the base's" if self.rows is None else "another",
            "tokens": m,
            "kept": self.kept,
            "new": m - self.kept,
            "new_rows": "mean of the base's rows" if self.rows is not None and self.kept < m else None,
        }


def init_start(cfg: RunConfig, tokenizer: Tokenizer, *, starts: bool) -> tuple[RunConfig, InitStart | None]:
    """`--init-from`: the run config with what RUN decides (the checkpoint used, in `init_from`; with data of
    another tokenizer, the model's vocab_size from the data, on a resume too), and, when `starts`, what the run
    starts from, once RUN's model is checked to be the run's (one-line errors, before anything is written; a
    model.vocab_size 0, "from the data", is the run's)."""
    from lmforge.train.objective_setup import objectives_for

    source = cfg.init_from
    if not starts and (own := _resumed_settings(Path(cfg.out))) and own["model"] == dataclasses.asdict(cfg.model):
        return cfg, None  # a resume given its own model (`init_settings` gives the CLI it): nothing to read in RUN
    try:
        ckpt, config, source_tokenizer = _open_init_source(source)
    except LmforgeError:
        if starts:
            raise
        return cfg, None  # a resume ignores --init-from: RUN may be gone (the run's config is checked as always)
    same_tokens = source_tokenizer.fingerprint == tokenizer.fingerprint
    if not same_tokens and cfg.model.vocab_size == config.model.vocab_size:  # (init_settings gave RUN's)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=0))
    if not starts:  # a resume of the run: its own checkpoint, and --init-from is ignored (a note says so)
        return cfg, None
    if cfg.dist.meta_init:
        raise ConfigError(f"--init-from {source} loads whole weights before sharding; drop --dist.meta_init")
    want = with_new_defaults(dataclasses.asdict(config.model), cfg.model)
    given = {**dataclasses.asdict(cfg.model), **({} if cfg.model.vocab_size else {"vocab_size": want["vocab_size"]})}
    keys = ["family"] if want.get("family") != given.get("family") else [*given, *(k for k in want if k not in given)]
    for key in keys:
        if given.get(key) != want.get(key) and (same_tokens or key != "vocab_size"):
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
    base_rows = _token_count(source_tokenizer, cfg.model.family)
    rows = None if same_tokens else token_rows(source_tokenizer, tokenizer, cfg.model.family)
    # the weights' sizes and sha256, once per start (opening RUN reads state.json only: a 100 MB model was hashed by
    # the CLI's `init_settings`, again here, and again on every resume of the new run, which reads its own files)
    ckpt.verify(weights_only=True)
    cfg = dataclasses.replace(cfg, init_from=str(ckpt.path.resolve()))  # (config.json: the checkpoint used)
    return cfg, InitStart(checkpoint=ckpt, source=str(source), base=config, rows=rows, base_rows=base_rows)


def _token_count(tokenizer: Tokenizer, family: str) -> int:
    """The ids a model of `family` gives tokens: the tokenizer's, then an encoder's appended specials."""
    from lmforge.train.objective_setup import encoder_extra_vocab

    return tokenizer.vocab_size + encoder_extra_vocab(family, tokenizer)


def token_rows(base: Tokenizer, new: Tokenizer, family: str) -> list[int]:
    """For each token id of a `family` model trained with `new`: the id of the same token in `base` (the same
    vocabulary string; the end-of-text token and an encoder's specials by role), or -1 for a new token."""
    from lmforge.train.objective_setup import is_encoder

    base_ids = base.hf.get_vocab(with_added_tokens=True)
    rows = [-1] * _token_count(new, family)
    for string, token_id in new.hf.get_vocab(with_added_tokens=True).items():
        if token_id < len(rows):
            rows[token_id] = base_ids.get(string, -1)
    roles = [(new.eos_id_or_none, base.eos_id_or_none)]
    if is_encoder(family):
        from lmforge.data.masking import special_ids

        roles += list(zip(special_ids(new).all, special_ids(base).all, strict=True))
    for new_id, base_id in roles:
        if new_id is not None and base_id is not None and rows[new_id] < 0:
            rows[new_id] = base_id
    return rows


def vocab_dims(model_cfg: Any) -> dict[str, int]:
    """The state-dict names of a model's vocabulary-indexed weights and the dimension that the vocabulary
    indexes: those whose shape changes with one more token (both models built on the meta device)."""
    with torch.device("meta"):
        a = build_model(model_cfg).state_dict()
        b = build_model(dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size + 1)).state_dict()
    return {
        name: next(d for d in range(t.dim()) if t.shape[d] != b[name].shape[d])
        for name, t in a.items()
        if t.shape != b[name].shape
    }


def load_init_weights(model: nn.Module, init: InitStart) -> None:
    """Put RUN's weights into `model` (built from the run's config): as saved, or with another tokenizer, each
    vocabulary-indexed weight's rows by token (`InitStart.rows`) and the mean of RUN's token rows for the rest."""
    if init.rows is None:
        load_weights(model, init.checkpoint)
        return
    with torch.random.fork_rng(devices=[]):  # (the run's RNG as without --init-from: its init_weights drew first)
        with torch.device("meta"):
            base = build_model(init.base.model)
        base = base.to_empty(device="cpu")
        base.init_weights()  # (buffers; the weights are overwritten by the checkpoint's)
    load_weights(base, init.checkpoint)
    base_state = base.state_dict()
    dims = vocab_dims(init.base.model)
    index = torch.tensor(init.rows)
    kept = index >= 0
    with torch.no_grad():
        for name, target in model.state_dict().items():
            source = base_state[name]
            if name in dims:
                dim = dims[name]
                rows_BV = source.movedim(dim, 0)  # (base vocab, ...)
                mean = rows_BV[: min(init.base_rows, rows_BV.shape[0])].mean(dim=0)
                out = mean.expand(target.shape[dim], *mean.shape).clone()  # (new vocab, ...)
                out[: len(init.rows)][kept] = rows_BV[index[kept]]
                source = out.movedim(0, dim)
            target.copy_(source)


def with_new_defaults(saved: Any, model: Any) -> Any:
    """A saved model section with the settings that lmforge added since it was written (model.qkv_bias, ...)
    at their defaults, which are the behaviour it was trained with: a run from an older lmforge was refused
    as "a different model config (qkv_bias None -> False)". Another family or a non-dict: unchanged."""
    if not isinstance(saved, dict) or saved.get("family", "gpt") != model.family:
        return saved
    defaults = {f.name: f.default for f in dataclasses.fields(model) if f.default is not dataclasses.MISSING}
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
