"""`--dedup-report FILE` of `prepare` and `prepare --merge`: where the near-duplicate example pairs go, the
checks that the report can never replace prepare's own output or a file it reads, and the writing of it.

A report inside `--out` is written into the build folder (it appears with the rest at publish); one outside
it goes straight to its path. Both are checked before any work, so a bad path costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.atomic import atomic_write_text
from lmforge.data.datadir import MANIFEST, TOKENIZER
from lmforge.data.dedup import NearDedup
from lmforge.errors import DataError

if TYPE_CHECKING:
    from lmforge.data.prepare import PrepareConfig

_OUT_NAMES = frozenset({MANIFEST, TOKENIZER, "card.md", "card.json", "length_hist.png"})


def dedup_report_path(cfg: PrepareConfig, out: Path) -> Path | None:
    """Where --dedup-report goes relative to `out`, checked before any work: None when it lies
    outside `out` (its folder must exist), else its path inside `out`.

    A report inside `out` must be written into the build folder, not to `out` itself: `out` does not
    exist until publish, and an existing one is replaced by the folder swap, report and all."""
    if not cfg.dedup_report:
        return None
    report = Path(os.path.abspath(cfg.dedup_report))
    if report == out or out in report.parents:
        inside = report.relative_to(out)
        if report == out or inside.parts[0] in _OUT_NAMES or inside.suffix == ".bin":
            raise DataError(
                f"--dedup-report {cfg.dedup_report} would replace prepare's own output; choose another file"
            )
        return inside
    if not report.parent.is_dir():
        raise DataError(f"--dedup-report folder {report.parent} does not exist; create it or choose another file")
    if report.is_dir():
        raise DataError(f"--dedup-report {cfg.dedup_report} is a folder; name a file")
    return None


def check_report_not_read(cfg: PrepareConfig, read: list[Path]) -> None:
    """--dedup-report may not be a file the command reads (an input, --tokenizer) nor lie inside a folder
    it reads whole (a --merge part): the report replaced it, and the input text was lost."""
    if not cfg.dedup_report:
        return
    report = Path(cfg.dedup_report).resolve()
    for path in read:
        path = path.resolve()
        if report == path or path in report.parents:
            raise DataError(
                f"--dedup-report {cfg.dedup_report} would overwrite {path}, which prepare reads; choose another file"
            )


def write_dedup_report(cfg: PrepareConfig, inside: Path | None, tmp: Path, near: NearDedup | None) -> None:
    """Write the near-duplicate example pairs (JSONL) to --dedup-report, into the build folder `tmp`
    when the report lies inside --out (`inside`, from `dedup_report_path`)."""
    pairs = near.examples if near is not None else []
    target = Path(cfg.dedup_report) if inside is None else tmp / inside
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, "".join(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n" for p in pairs))
