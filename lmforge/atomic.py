"""Atomic file writes: temp file + fsync + `os.replace`, so a reader (or a crash) never sees half a file.

Used for every small file lmforge writes in place (manifests, configs, tokenizers, checkpoint
metadata, the `latest` pointer), and for whole output directories (exports): written to `out.tmp/`,
checked first, renamed at the end. Its own module because data, tokenizer, checkpoint and export
code all need it and none of them should import the others for it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `path.tmp`, fsynced, then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write `data` as indented JSON, non-ASCII kept readable (Chinese stays Chinese)."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def fsync_file(path: Path) -> None:
    """Flush `path`'s data to disk (a writable handle: Windows refuses to flush a read-only one)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Output directories: checked first, written to out.tmp/, renamed at the end


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """A non-empty `out` is an error unless `overwrite`."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"{out} already exists; choose another --out or pass --overwrite to replace it")


def check_not_inside(out: Path, source: Path) -> None:
    """`out` may not be, contain or sit inside the directory being read."""
    out, source = out.resolve(), source.resolve()
    if out == source or out in source.parents or source in out.parents:
        raise LmforgeError(f"--out {out} overlaps the directory being read ({source}); choose another --out")


def fresh_tmp_dir(out: Path) -> Path:
    """An empty `out.tmp/` to write into (one left over from an interrupted run is removed)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is moved aside first and deleted last."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(out.name + ".old")
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
    os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
