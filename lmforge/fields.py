"""`opt()` and `check()`: the two helpers every config dataclass uses; `flatten()`: a config's dotted keys;
`spelled()`: a config value as a config file and the CLI write it (true/false, not Python's True/False);
`add_dataclass_args()` / `dataclass_from_namespace()`: argparse flags for a command whose options are one
flat dataclass (`prepare`, `finetune`).

They live in their own tiny module (not in `config.py`) because model files define their config
dataclasses at the top (STYLE.md) and `config.py` imports those to compose `RunConfig`; keeping the
helpers here avoids an import cycle. The version of a saved config (`CONFIG_VERSION`, `saved_train`,
`saved_config`, re-exported by `config.py`) is here so that `lmforge runs` and `report` read a saved config
as training does without importing torch (`config.py` imports the model files). The argparse bridge knows
nothing of `RunConfig` either: it turns any flat dataclass's fields into flags.
"""

import argparse
import dataclasses
import json
import typing
from dataclasses import MISSING, field, fields
from typing import Any, Literal

from lmforge.errors import ConfigError


def opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and help text (shown by `--help`)."""
    return field(default=default, metadata={"help": help})


def check(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition` holds (for `__post_init__` validation)."""
    if not condition:
        raise ConfigError(message)


def changed_fields(config: Any) -> set[str]:
    """Names of the dataclass fields of `config` whose value is not their default (a field without a
    default counts as changed): the settings a user gave, as far as a config alone can tell."""
    changed = set()
    for f in fields(config):
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            changed.add(f.name)
            continue
        if getattr(config, f.name) != default:
            changed.add(f.name)
    return changed


# The version of a saved config (config.json, state.json's config, finetune.json's train section). 2: train.min_lr
# unset means lr / 10 and 0 decays to zero; a saved config without a version was written when 0 meant lr / 10,
# and `saved_train` reads it so (its runs resume, are evaluated and continued with the schedule they trained with).
CONFIG_VERSION = 2


def saved_train(train: Any, version: Any) -> Any:
    """A saved train section as this lmforge reads it: one saved before version 2 with min_lr 0 decayed toward
    lr / 10, which is min_lr unset now. Anything else is returned as it is."""
    old = not (isinstance(version, int) and version >= 2)
    if old and isinstance(train, dict) and train.get("min_lr") == 0:
        return {**train, "min_lr": None}
    return train


def saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """A saved `RunConfig.to_dict()` (config.json, state.json) as the nested dict `from_dict` reads: without its
    config_version, its train section read by that version (`saved_train`)."""
    out = {k: v for k, v in data.items() if k != "config_version"}
    if "train" in out:
        out["train"] = saved_train(out["train"], data.get("config_version"))
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 0.001, ...}: a nested config dict's leaves under their dotted keys."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def spelled(value: Any) -> str:
    """`value` as a config file and the CLI spell it, for a message or a table: true/false and null (JSON, as
    config.json and TOML write them; Python's True/False/None is not what a user types), lists as JSON, a
    string as it is (`--model.mlp swiglu`, not 'swiglu')."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False, default=str)  # (anything else: its str)


# --------------------------------------------------------------------------------------------
# dataclass <-> argparse, for commands whose options are one flat dataclass (e.g. prepare)


class Once(argparse.Action):
    """An option that takes one value and refuses a second: argparse kept the last one without a word, so
    `--config base.toml --config run.toml` trained without base.toml's settings, `--prompt A --prompt B`
    completed B alone and `--out a --out b` wrote b alone. `hint` says what to do instead. (With a default of
    None, a value already there is taken for a first one.)"""

    def __init__(self, *args: Any, hint: str, **kwargs: Any) -> None:
        self.hint = hint
        super().__init__(*args, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        given = namespace.__dict__.setdefault("_once_given", set())  # (a default is no value given)
        if self.dest in given or (self.default is None and getattr(namespace, self.dest, None) is not None):
            raise ConfigError(f"{option_string} is given twice, but takes one value; {self.hint}")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


# `Once`'s hint for an output flag (--out, --data-out): a command writes one output
ONE_OUT = "the command writes one output: keep the one you mean (run the command again for another)"


def add_dataclass_args(
    parser: Any, cls: type, *, positional: tuple[str, ...] = (), once: dict[str, str] | None = None
) -> None:
    """Add one `--flag-name` per field of `cls` (help text, type, choices, defaults from the field).

    A `list[str]` field is a flag repeated once per value (`--val-input A --val-input B`), or, named in
    `positional`, a positional argument taking one or more; bools get `--x/--no-x`, Literals get choices.
    A field named in `once` (name -> what to do instead) refuses a second value (`Once`); its namespace value
    is None until given, so `dataclass_from_namespace` keeps the field's default.
    """

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", "")}
        origin = typing.get_origin(tp)
        if origin is list and f.name in positional:
            kwargs.update(nargs="+", default=default, metavar=f.name.upper().rstrip("S"))
        elif origin is list:  # repeatable flag, one value each, so it never swallows positional arguments
            kwargs.update(action="append", default=None, metavar=f.name.upper().removesuffix("S"))
            kwargs["help"] += " (repeat the flag for several)"
        elif tp is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif origin is Literal:
            kwargs.update(choices=list(typing.get_args(tp)), default=default)
        elif f.name in (once or {}):
            kwargs.update(action=Once, hint=once[f.name], type=tp, default=None, metavar=f.name.upper())
            kwargs["help"] += f" (default: {default})" if default not in ("", None) else ""
        else:
            kwargs.update(type=tp, default=default, metavar=f.name.upper())
        if f.name in positional:
            kwargs.pop("default", None)
            kwargs.pop("metavar", None)
            parser.add_argument(f.name, **kwargs)
        else:
            if "default" in kwargs and kwargs.get("action") is None and default not in ("", [], None):
                kwargs["help"] += f" (default: {default})"
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def dataclass_from_namespace(cls: type, namespace: Any) -> Any:
    """Build `cls` from the attributes `add_dataclass_args` defined (validation runs as usual)."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    return cls(**{k: v for k, v in values.items() if v is not None})
