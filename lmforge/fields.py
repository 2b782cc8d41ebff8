"""`opt()` and `check()`: the two helpers every config dataclass uses; `flatten()`: a config's dotted keys.

They live in their own tiny module (not in `config.py`) because model files define their config
dataclasses at the top (STYLE.md) and `config.py` imports those to compose `RunConfig`; keeping the
helpers here avoids an import cycle.
"""

from dataclasses import MISSING, field, fields
from typing import Any

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


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 0.001, ...}: a nested config dict's leaves under their dotted keys."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
