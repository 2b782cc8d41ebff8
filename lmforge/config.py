"""Run configuration: typed dataclass sections, TOML files, dotted CLI overrides, validation.

Design:
- Each section is a `@dataclass(kw_only=True)`; every field has a type, a default and help text
  (`opt(default, "help")`), which also feeds `--help`.
- Precedence: dataclass defaults < preset (`--preset tiny`) < TOML file (`--config run.toml`) <
  dotted CLI overrides (`--train.lr 1e-3`). Everything is merged as nested dicts first and turned
  into dataclasses once, strictly: an unknown key is a `ConfigError` with a did-you-mean
  (nanotron's strict config), a wrong type is a `ConfigError` naming the key and the expected type.
- Validation lives in each section's `__post_init__`; nothing mutates a config after loading.
- Where the sections live: data, train, optim, eval, checkpoint and log in `config_sections` (re-exported here,
  the public home); model, objective and dist with their component (models/configs.py, objective_config.py,
  dist_config.py). Each section's fields, help and checks (`__post_init__`, and `refuse_unused` for settings
  the user wrote that the run would not read) stay beside each other. This module composes them (`RunConfig`)
  and reads them: presets, TOML, a run's config.json, dotted flags, `--help` text.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import ConfigError
from lmforge.fields import CONFIG_VERSION, changed_fields, check, opt, saved_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


# The sections RunConfig composes; none of these imports torch, so `--help` and config errors answer without it
# (tests/test_cli.py). The first are re-exported: lmforge.config is their public home.
from lmforge.config_sections import (
    OPTIM_READERS,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    TrainConfig,
)
from lmforge.dist_config import DistConfig
from lmforge.models.configs import CONFIGS, GPTConfig, ModelConfig
from lmforge.objective_config import ObjectiveConfig


@dataclass(kw_only=True)
class RunConfig:
    preset: str = opt("", "name of the preset this config started from")
    out: str = opt("", "run directory")
    init_from: str = opt(
        "",
        "a run (its latest checkpoint) or checkpoint folder whose model and weights start this run at step 0 "
        "(continued pretraining: --init-from RUN; the run's own checkpoints are resumed after that)",
    )
    model: ModelConfig = field(default_factory=GPTConfig, metadata={"help": "model architecture (by model.family)"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training data"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training loop"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation during training"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "checkpoints"})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"help": "pretraining objective"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "experiment trackers"})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"help": "distributed training (torchrun)"})

    def __post_init__(self) -> None:
        # cross-section checks, so that a bad combination fails before `pretrain` writes anything
        self.objective.check_encoder(self.model, self.data.seq_len)

    def to_dict(self) -> dict[str, Any]:
        """The config as saved (config.json, state.json): every section, under its `CONFIG_VERSION`."""
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# dict <-> dataclass, strictly


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _dataclass_members(tp: Any) -> list[type]:
    """The dataclasses of a section type: [tp] for a dataclass, the members of a union of them (model)."""
    if _is_dataclass_type(tp):
        return [tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = list(typing.get_args(tp))
        if members and all(_is_dataclass_type(m) for m in members):
            return members
    return []


def _section_class(tp: Any, value: dict[str, Any], key: str) -> type:
    """The dataclass for a section value; a union (the model section) is resolved by its `family` key."""
    members = _dataclass_members(tp)
    if len(members) == 1:
        return members[0]
    family = value.get("family", "gpt")
    if family not in CONFIGS:
        hint = difflib.get_close_matches(str(family), list(CONFIGS), n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{key}.family: {family!r} is not one of {', '.join(map(repr, CONFIGS))}{extra}")
    return CONFIGS[family]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and, for strings from the command line, convert) one value against a field type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}{extra}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, args[0], key)
    if origin is list:  # list[str] (e.g. input paths); a single string is a one-item list
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:  # allow 1e4 or 2.0 on the command line when it is a whole number
                    as_float = float(value)
                    if as_float.is_integer():
                        return int(as_float)
                except ValueError:
                    pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this bridge does not know is a programming error
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


# Names other trainers use (HF TrainingArguments, nanoGPT, litgpt) for settings lmforge calls otherwise:
# a did-you-mean by spelling would point `learning_rate` at `optim.name`.
_OTHER_NAMES = {
    "learning_rate": "train.lr",
    "lr": "train.lr",
    "max_lr": "train.lr",
    "max_iters": "train.max_steps",
    "num_steps": "train.max_steps",
    "steps": "train.max_steps",
    "lr_decay_iters": "train.max_steps",
    "warmup_iters": "train.warmup_steps",
    "warmup": "train.warmup_steps",
    "lr_scheduler_type": "train.schedule",
    "scheduler": "train.schedule",
    "per_device_train_batch_size": "train.batch_size",
    "global_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.micro_batch_size",
    "micro_batch": "train.micro_batch_size",
    "bf16": "train.dtype",
    "fp16": "train.dtype",
    "precision": "train.dtype",
    "dtype": "train.dtype",
    "gradient_checkpointing": "train.activation_checkpointing",
    "logging_steps": "train.log_every",
    "log_interval": "train.log_every",
    "max_grad_norm": "optim.grad_clip",
    "gradient_clipping": "optim.grad_clip",
    "clip_grad_norm": "optim.grad_clip",
    "adam_beta1": "optim.beta1",
    "adam_beta2": "optim.beta2",
    "adam_epsilon": "optim.eps",
    "optimizer": "optim.name",
    "optim": "optim.name",
    "eval_interval": "eval.every",
    "eval_steps": "eval.every",
    "eval_iters": "eval.max_batches",
    "per_device_eval_batch_size": "eval.batch_size",
    "save_steps": "checkpoint.every",
    "save_interval": "checkpoint.every",
    "save_total_limit": "checkpoint.keep",
    "n_embd": "model.d_model",
    "hidden_size": "model.d_model",
    "n_embd_hidden": "model.d_ff",
    "intermediate_size": "model.d_ff",
    "num_hidden_layers": "model.n_layer",
    "n_layers": "model.n_layer",
    "num_attention_heads": "model.n_head",
    "num_key_value_heads": "model.n_kv_head",
    "n_query_groups": "model.n_kv_head",
    "block_size": "data.seq_len",
    "context_length": "data.seq_len",
    "max_seq_length": "data.seq_len",
    "seq_len": "data.seq_len",
    "dataset": "data.dir",
    "data_dir": "data.dir",
    "output_dir": "out",
    "out_dir": "out",
    "epochs": "train.max_steps",
    "num_train_epochs": "train.max_steps",
}


def other_name(name: str) -> str:
    """lmforge's key for a setting another trainer calls `name` (`learning_rate` -> `train.lr`), or ''."""
    target = _OTHER_NAMES.get(name.lower().replace("-", "_"), "")
    return target if target != name else ""


def _unknown_key(key: str, known: list[str], where: str, whole: str = "") -> ConfigError:
    """`key` is not one of `known` (its siblings); `whole`: the full dotted key asked for, when `key` is a
    section of it, looked up among every setting (`--log.every` is `train.log_every`). A name another
    trainer uses for a setting (`learning_rate`) points at lmforge's key for it (`train.lr`)."""
    leaf = (whole or key).rsplit(".", 1)[-1]
    if other_name(leaf):
        key = whole or key
        return ConfigError(f"unknown config key '{key}' in {where}; did you mean '{other_name(leaf)}'?")
    hint = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    extra = f"; did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{hint[0]}'?" if hint else ""
    if not hint and "." in whole:
        flat = whole.replace(".", "_")
        leaves = [row[0] for row in help_lines()]
        elsewhere = [k for k in leaves if k.endswith("." + flat)] or difflib.get_close_matches(whole, leaves, n=1)
        extra = f"; did you mean '{elsewhere[0]}'?" if elsewhere else ""
        key = whole
    return ConfigError(f"unknown config key '{key}' in {where}{extra}")


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "", where: str = "config") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types are `ConfigError`s."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            error = _unknown_key(full, names, where)
            if "family" in names and not str(error).endswith("?"):  # a model key of another family (n_head on LSTM)
                family = data.get("family", next(f.default for f in dataclasses.fields(cls) if f.name == "family"))
                error = ConfigError(
                    f"{error}: model.family {family!r} has no such setting (its settings: "
                    f"{', '.join(n for n in names if n != 'family')})"
                )
            raise error
        tp = hints[key]
        if _dataclass_members(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a table of settings, got {value!r}")
            kwargs[key] = from_dict(_section_class(tp, value, full), value, prefix=f"{full}.", where=where)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base` (later sources win key by key)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `["--train.lr", "1e-3", "--model.n_layer=6"]` into `{"train": {"lr": "1e-3"}, ...}`.

    Values stay strings here; `from_dict` converts them by field type. Keys are checked against
    `RunConfig` so a typo fails with a did-you-mean before anything runs.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, rest = arg.partition("=")
        if flag.replace("_", "-") == "--resume-from":  # the fault-tolerance issue's name for it: a short form
            arg = "--checkpoint.resume_from" + eq + rest
        # another tool's spelling of a setting (hydra's `train.lr=1e-3`, `--set train.lr=1e-3`, `-o ...`): it was
        # "settings look like --section.key VALUE", or for `--set=train.lr=1e-3` "did you mean 'preset'?"
        spelled_as = _setting_in(arg) or (
            _setting_in(args[i + 1]) if arg.startswith("-") and "=" not in arg and i + 1 < len(args) else ""
        )
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            if spelled_as:
                raise ConfigError(f"unexpected argument {arg!r}; did you mean {spelled_as}?")
            name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
            leaves = {row[0].rsplit(".", 1)[-1]: row[0] for row in help_lines()}
            flat = name.replace("-", "_")
            dotted = flat.replace("_", ".", 1)  # --train-lr, --train_max_steps: the section's dot typed as - or _
            known = other_name(name) or leaves.get(flat, "") or (dotted if dotted in leaves.values() else "")
            if name.replace("-", "_") in ("resume", "resume_from_checkpoint"):  # other trainers' resume flags
                raise ConfigError(
                    f"unexpected argument {arg!r}: re-running the same command on its --out resumes from the latest "
                    "checkpoint by itself; drop it (--checkpoint.resume_from previous or step-NNNNNN picks another)"
                )
            if known:
                raise ConfigError(f"unexpected argument {arg!r}; did you mean --{known}?")
            raise ConfigError(
                f"unexpected argument {arg!r}; settings look like --section.key VALUE (e.g. --train.lr 1e-3)"
            )
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif (i + 1 >= len(args) or args[i + 1].startswith("--")) and _check_key_path(key) is bool:
            value = "true"  # a bare boolean flag: --log.tensorboard
            i += 1
        else:
            # (`--train.lr --train.max_steps 5` took '--train.max_steps' as the lr and then called '5' unexpected)
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE")
            value = args[i + 1]
            i += 2
        _check_key_path(key)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _setting_in(text: str) -> str:
    """`--section.key VALUE` for a setting written another way (`train.lr=1e-3`, `set=train.lr=1e-3`, `train.lr`),
    "" when `text` names no setting."""
    body = text.lstrip("-")
    if body.partition("=")[0] in ("set", "o", "override", "cfg-options"):
        body = body.partition("=")[2]
    key, eq, value = body.partition("=")
    if "." not in key:
        return ""
    try:
        _check_key_path(key)
    except ConfigError:
        return ""
    return f"--{key} {value}" if eq else f"--{key} VALUE"


def _check_key_path(key: str) -> Any:
    """Check a dotted key against RunConfig (did-you-mean on typos); returns the field's type."""
    cls: Any = RunConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        members = _dataclass_members(cls)
        if not members:
            raise ConfigError(f"unknown config key '{key}'; '{'.'.join(parts[:depth])}' has no sub-keys")
        names = list(dict.fromkeys(f.name for m in members for f in dataclasses.fields(m)))  # any model family's
        if part not in names:
            raise _unknown_key(".".join(parts[: depth + 1]), names, "command-line overrides", whole=key)
        cls = next(typing.get_type_hints(m)[part] for m in members if part in typing.get_type_hints(m))
    if _dataclass_members(cls):
        first = dataclasses.fields(_dataclass_members(cls)[0])[0].name
        raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. --{key}.{first}")
    return cls


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a one-line `ConfigError`."""
    p = Path(path)
    if p.exists() and not p.is_file() and not p.is_dir():  # (a FIFO, /dev/stdin: it said "not found")
        raise ConfigError(f"config file {str(p)!r} is a pipe or device, not a file; save the settings to a .toml file")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass an existing .toml file to --config")
    try:  # utf-8-sig: a BOM (Windows Notepad's UTF-8) is no TOML; tomllib read it as "Invalid statement" at 1:1
        return tomllib.loads(p.read_bytes().decode("utf-8-sig"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e}); fix the file and retry") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text; save the config as UTF-8 TOML") from None


def read_config_file(path: str | Path) -> tuple[dict[str, Any], Path, bool]:
    """`--config`'s file as a nested dict: a TOML file, or a run's resolved `config.json` (written by `pretrain`,
    `finetune` and `import`), or the run folder that holds it, so a bigger run can be planned from an existing
    one. Returns (settings, the file read, whether it is a run's config.json); anything else is a `ConfigError`."""
    if not str(path).strip():  # (`--config ''`, an unset shell variable: it was no config at all)
        raise ConfigError("--config is empty; pass a .toml file or a run folder, or drop --config")
    p = Path(path).expanduser()  # (`--config=~/c.toml`: the shell leaves that `~`)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p} is a folder without config.json; pass a .toml file or a run folder to --config")
        p = p / "config.json"
    if p.suffix.lower() != ".json":
        settings = read_toml(p)
        if not settings:  # (an empty file, or comments only: it was taken as no config without a word)
            raise ConfigError(
                f"config file {str(p)!r} holds no settings; write them in it (e.g. [train] then lr = 1e-3)"
            )
        return settings, p, False
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass a .toml file or a run's config.json to --config")
    try:
        data = json.loads(p.read_bytes().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{p} is not valid JSON; pass a .toml file or a run's config.json to --config") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        hf = isinstance(data, dict) and ("model_type" in data or "architectures" in data)
        fix = (
            f"import it first ('lmforge import {p.parent} --out RUN_DIR') and pass RUN_DIR"
            if hf
            else "pass a .toml file or the config.json of an lmforge run"
        )
        kind = "a Hugging Face model's config.json" if hf else "not an lmforge run's config.json (no model section)"
        raise ConfigError(f"{p} is {kind}; {fix}")
    return saved_config(data), p, True


def load_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve a `RunConfig`: defaults < `base` < preset < TOML file < overrides.

    Args:
        preset: name from `lmforge.presets.PRESETS` (a TOML file may also say `preset = "..."`).
        config_file: path to a TOML file with sections like `[train]`, `[model]`, or a run's config.json or
            run folder (`read_config_file`).
        overrides: dotted CLI arguments (`["--train.lr", "1e-3"]`) or an equivalent nested dict.
        base: a nested dict applied before the preset (used by commands with their own defaults).
    """
    from lmforge.presets import preset_dict

    file_dict, config_path, from_run = read_config_file(config_file) if config_file is not None else ({}, None, False)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    _check_sections(file_dict, f"{config_path}")
    if from_run and preset and preset != file_dict.get("preset"):  # (it changed nothing, yet was recorded)
        raise ConfigError(
            f"--preset {preset}: {config_path} is a run's resolved config, which sets every key, so the preset would "
            "change nothing; drop --preset (or start from a .toml file)"
        )
    name = preset or overrides.get("preset") or file_dict.get("preset") or (base or {}).get("preset") or ""
    if not isinstance(name, str):
        raise ConfigError(f'preset: expected a preset name in quotes (preset = "tiny"), got {name!r}')
    from_preset = preset_dict(name) if name else {}
    merged = merge(base or {}, from_preset)
    merged = merge(merged, file_dict)
    merged = merge(merged, overrides)
    _drop_other_family_preset_keys(merged, from_preset, [file_dict, overrides])
    _drop_unused_preset_optim_keys(merged, from_preset, [file_dict, overrides])
    if from_run:  # a run's config.json lists every optimizer key: its values give way to another --optim.name too
        _drop_unused_preset_optim_keys(merged, file_dict, [overrides])
    if name:
        merged["preset"] = name
    where = f"{config_path}" if config_file else "config"
    user = [overrides] if from_run else [file_dict, overrides]
    try:
        cfg = from_dict(RunConfig, merged, where=where)
        _refuse_unread(cfg, user, from_run)
    except ConfigError as e:  # (`--config c.toml --train.schedule constant` was refused for min_lr, the file's)
        source = _source(str(e), overrides, [(str(config_path), file_dict), (f"preset {name}", from_preset)])
        if not source:
            raise
        raise ConfigError(f"{source}: {e}") from None
    # a `~` the shell did not expand (`dir = "~/data"` in a TOML file, `--data.dir=~/data`) is the home folder,
    # as the shell would have made it; it was a folder named "~" ("not found")
    cfg.data.dir, cfg.out = os.path.expanduser(cfg.data.dir), os.path.expanduser(cfg.out)
    return cfg


def _refuse_unread(cfg: RunConfig, user: list[dict[str, Any]], from_run: bool) -> None:
    """Settings that the run would not read, or that combine badly, are refused (`user`: the TOML file's and the
    flags' dicts, or the flags' alone for a run's config.json, which lists every key)."""
    # written by the user (TOML or flag), an objective setting the objective never reads is refused also
    # at its default value; a preset's own objective settings are not the user's, nor a run's config.json's
    # (it lists every key). The same for optimizer settings (--optim.momentum with AdamW was ignored), and those
    # off their defaults.
    cfg.objective.refuse_unused(_written_keys(user, "objective"))
    cfg.train.refuse_unused(_written_keys(user, "train"))
    cfg.data.refuse_unused(_written_keys(user, "data"))
    cfg.log.refuse_unused(_written_keys(user, "log"))
    cfg.optim.refuse_unused(changed_fields(cfg.optim) | _written_keys(user, "optim"))
    # (--dist.sync_every under ddp was ignored; a diloco run's config.json with another --dist.strategy is not)
    cfg.dist.refuse_unused(_written_keys(user, "dist") | (set() if from_run else changed_fields(cfg.dist)))
    if "carry_state" in _written_keys(user, "objective") and cfg.model.family not in ("lstm", "gru"):
        raise ConfigError(  # (a GPT or Llama model has no state to carry: the setting was accepted and never read)
            f"objective.carry_state is not used by model.family {cfg.model.family!r} (only by lstm or gru, whose "
            "hidden state it carries across batches); drop it"
        )
    if cfg.optim.name == "muon" and cfg.model.family in ("lstm", "gru"):  # (every weight got AdamW, without a word)
        raise ConfigError(
            f"optim.name muon orthogonalises the hidden nn.Linear matrices, which a model.family "
            f"{cfg.model.family!r} network has none of (its recurrent weights are not nn.Linear); "
            "use --optim.name adamw or sgd"
        )
    if not from_run or {"early_stop_patience", "every", "max_steps"} & (
        _written_keys(user, "train") | _written_keys(user, "eval")
    ):
        check_early_stopping(cfg.train, cfg.eval)  # (a saved run's config.json still loads, for eval and estimate)
    if cfg.eval.sample_tokens and cfg.model.family in ("bert", "electra"):  # (it was ignored without a word)
        raise ConfigError(
            f"eval.sample_tokens samples text, which a model.family {cfg.model.family!r} encoder does not generate; "
            "drop it (evaluations report the objective's metrics)"
        )


def _source(message: str, flags: dict[str, Any], sources: list[tuple[str, dict[str, Any]]]) -> str:
    """Where the settings a refusal names came from, as its prefix: the first of `sources` (name, nested dict)
    that writes the one it starts with (`train.min_lr is not used ...`), e.g. the --config file's path, and the
    flags that set the others it names ("c.toml and --model.n_head": `model.d_model (64) must be divisible by
    model.n_head (3)` was blamed on the file that set d_model alone); "" when a flag set the first (the user
    typed it) or nothing did."""
    match = re.match(r"([a-z_]+)\.([a-z0-9_]+)\b", message)
    if not match:
        return ""

    def writes(data: dict[str, Any], section: str, key: str) -> bool:
        return isinstance(data.get(section), dict) and key in data[section]

    section, key = match.groups()
    if writes(flags, section, key):
        return ""
    named = [m for m in dict.fromkeys(re.findall(r"\b([a-z_]+)\.([a-z0-9_]+)\b", message)) if writes(flags, *m)]
    first = [name for name, data in sources if writes(data, section, key)][:1]
    return " and ".join(first + [f"--{s}.{k}" for s, k in named])


def check_early_stopping(train: TrainConfig, eval_cfg: EvalConfig) -> None:
    """Early stopping counts periodic evaluations; with `eval.every` 0 there are none before the end, so
    `train.early_stop_patience` never stopped anything, without a word; nor with fewer than patience + 1 of them
    before `train.max_steps` (the first sets the reference). Refused here (pretrain and finetune)."""
    patience = train.early_stop_patience
    check(
        not (patience and not eval_cfg.every),
        f"train.early_stop_patience {patience} counts evaluations, and eval.every 0 runs none "
        "before the last step; pass --eval.every N (steps between evaluations) or drop --train.early_stop_patience",
    )
    runs = (train.max_steps - 1) // eval_cfg.every if patience else 0  # evaluations before the last step
    check(
        not patience or runs > patience,
        f"train.early_stop_patience {patience} can never stop this run: it needs {patience + 1} evaluations before "
        f"train.max_steps {train.max_steps}, and eval.every {eval_cfg.every} runs {runs}; lower --eval.every or "
        "--train.early_stop_patience, or drop it",
    )


def _written_keys(dicts: list[dict[str, Any]], section: str) -> set[str]:
    """The keys of `section` that any of `dicts` (the user's TOML file and flags) writes."""
    return {k for d in dicts if isinstance(d.get(section), dict) for k in d[section]}


def _check_sections(data: dict[str, Any], where: str) -> None:
    """A section written as a plain value (`train = 3`) must fail here: merged under a later source's
    table of the same section (a flag like --train.lr), it was replaced without a word."""
    hints = typing.get_type_hints(RunConfig)
    for key, value in data.items():
        if key in hints and _dataclass_members(hints[key]) and not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of settings ([{key}]), got {value!r} in {where}")
        # so must a value of the wrong type (`max_steps = "three"` under --train.max_steps 5 went unread, until the
        # flag was dropped); unknown keys are left to from_dict's did-you-mean
        for name, leaf in value.items() if key in hints and isinstance(value, dict) else ():
            if (key, name) == ("model", "family"):  # (its type is each family's own name: _section_class checks it)
                continue
            try:
                tp = _check_key_path(f"{key}.{name}")
            except ConfigError:
                continue
            try:
                _coerce(leaf, tp, f"{key}.{name}")
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None


def _drop_other_family_preset_keys(merged: dict[str, Any], preset: dict[str, Any], user: list[dict]) -> None:
    """`--preset tiny --model.family lstm`: the preset's model keys that the chosen family does not have
    (n_head for an LSTM) are the preset's, not the user's: drop them instead of calling them unknown."""
    model, preset_model = merged.get("model"), preset.get("model")
    if not isinstance(model, dict) or not isinstance(preset_model, dict):
        return
    family = model.get("family", "gpt")
    if family == preset_model.get("family", "gpt") or family not in CONFIGS:
        return
    known = {f.name for f in dataclasses.fields(CONFIGS[family])}
    given = _written_keys(user, "model")
    for key in [k for k in model if k not in known and k not in given and k in preset_model]:
        del model[key]


def _drop_unused_preset_optim_keys(merged: dict[str, Any], preset: dict[str, Any], user: list[dict]) -> None:
    """`--preset small --optim.name sgd`: the preset's AdamW betas are the preset's, not the user's: drop them
    instead of refusing them as settings SGD does not read."""
    optim, preset_optim = merged.get("optim"), preset.get("optim")
    if not isinstance(optim, dict) or not isinstance(preset_optim, dict):
        return
    name = optim.get("name", OptimConfig().name)
    given = _written_keys(user, "optim")
    for key in [k for k in preset_optim if k not in given and name not in OPTIM_READERS.get(k, (name,))]:
        optim.pop(key, None)


def config_from_json(data: dict[str, Any], where: str) -> RunConfig:
    """Rebuild a `RunConfig` saved in `config.json` / `state.json` (strict, same checks; `saved_config`)."""
    return from_dict(RunConfig, saved_config(data), where=where)


def help_lines(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every leaf field, for `--help` listings."""
    rows: list[tuple[str, str, Any]] = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _dataclass_members(tp):  # a union (model): each family's fields, each key once
            seen = {row[0] for row in rows}
            for member in _dataclass_members(tp):
                rows += [r for r in help_lines(member, f"{prefix}{f.name}.") if r[0] not in seen]
                seen = {row[0] for row in rows}
        else:
            rows.append((f"{prefix}{f.name}", f.metadata.get("help", ""), getattr(instance, f.name)))
    return rows
