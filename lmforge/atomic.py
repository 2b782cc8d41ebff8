"""Atomic file writes: temp file + fsync + `os.replace`, so a reader (or a crash) never sees half a file.

Used for every small file lmforge writes in place (manifests, configs, tokenizers, checkpoint
metadata, the `latest` pointer). Its own module because data, tokenizer and checkpoint code all
need it and none of them should import the others for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
