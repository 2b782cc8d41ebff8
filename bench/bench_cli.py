"""The bench scripts' command line, held to `lmforge`'s own rules: a bad option is one line on stderr
(`lmforge.cli.Parser`: no usage dump), counts are checked as they are parsed (a negative `--steps` printed
negative speeds), and a user error from lmforge (`LmforgeError`: `--device cuda` on a machine without
CUDA, a setting the config refuses) is one line with exit code 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.cli import Parser
from lmforge.errors import LmforgeError


def parser(doc: str | None) -> Parser:
    return Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def _checked(convert: Callable[[str], Any], kind: str, ok: Callable[[Any], bool], want: str) -> Callable[[str], Any]:
    """An argparse `type`: `convert(text)`, refused unless `ok(value)`; `kind` and `want` word the two errors."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text}")
        return value

    return parse


def count(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `minimum`."""
    return _checked(int, "an integer", lambda v: v >= minimum, f"an integer >= {minimum}")


def number(above: float) -> Callable[[str], float]:
    """An argparse `type`: a finite number > `above` (a budget of 0 seconds or a -1 MB corpus is a typo)."""
    return _checked(float, "a number", lambda v: above < v < float("inf"), f"a finite number > {above:g}")


def ints(names: str) -> Callable[[str], str]:
    """An argparse `type`: comma-separated positive integers, one per name in `names` ("n_layer,n_head,...")."""

    def parse(text: str) -> str:
        parts = text.split(",")
        if len(parts) != len(names.split(",")) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected {names} as positive integers (e.g. 4,4,128,64), got {text!r}")
        return text

    return parse


def run(main: Callable[[], int | None]) -> int | None:
    """`main()` (its result returned), with an `LmforgeError` printed as `SCRIPT: error: MESSAGE` and exit code 2."""
    try:
        return main()
    except LmforgeError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
