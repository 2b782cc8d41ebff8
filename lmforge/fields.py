"""`opt()` and `check()`: the two helpers every config dataclass uses.

They live in their own tiny module (not in `config.py`) because model files define their config
dataclasses at the top (STYLE.md) and `config.py` imports those to compose `RunConfig`; keeping the
helpers here avoids an import cycle.
"""

from dataclasses import field
from typing import Any

from lmforge.errors import ConfigError


def opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and help text (shown by `--help`)."""
    return field(default=default, metadata={"help": help})


def check(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition` holds (for `__post_init__` validation)."""
    if not condition:
        raise ConfigError(message)
