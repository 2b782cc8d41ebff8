"""Reading a prepared data directory (written by `lmforge prepare`): `load_data_dir` -> `DataDir`.

Kept apart from prepare.py so training, evaluation and mixtures open a data directory without
importing the preparation pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.shards import read_header
from lmforge.data.split import SPLITS
from lmforge.errors import DataError
from lmforge.tokenizer.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class DataDir:
    """A validated prepared data directory (see `load_data_dir`)."""

    path: Path
    manifest: dict[str, Any]
    tokenizer_path: Path

    def split_shards(self, split: str) -> list[Path]:
        """Shard paths of `split` ("train", "val" or "test"), in order; empty if the split has no data.

        Raises:
            DataError: unknown split name.
        """
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.path} has no split {split!r}; choose one of {', '.join(splits)}")
        return [self.path / name for name in splits[split]["shards"]]

    def split_tokens(self, split: str) -> int:
        """Number of tokens (EOS included) in `split`."""
        self.split_shards(split)
        return int(self.manifest["splits"][split]["tokens"])

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were encoded with."""
        return Tokenizer.load(self.tokenizer_path)


def cleaning_settings(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The settings a prepared folder's text was cleaned with (`filters.CLEANING_SETTINGS`, for
    `DocumentCleaner.from_settings`): its manifest's "config"; for a `--merge`d folder, whose config is the
    merge's own (which cleans nothing), the settings its parts shared, which the merge records as
    "part_cleaning" (None: its parts were cleaned differently; a folder merged before that record: its config)."""
    config = manifest["config"]
    if config.get("merge") and "part_cleaning" in manifest:
        return manifest["part_cleaning"]
    return config


def load_data_dir(path: str | Path) -> DataDir:
    """Open and validate a directory written by `prepare`.

    Checks the manifest (readable, format version), that tokenizer.json exists, and every shard's
    header and size against the manifest's token counts (32 bytes read per shard).

    Raises:
        DataError: not a prepared directory, unreadable/foreign manifest, missing or damaged shard.
    """
    p = Path(path)
    manifest_path = p / MANIFEST
    if not p.is_dir() or not manifest_path.is_file():
        # the advice "prepare --out {p}" fits only a path that does not exist yet: never a text file or a run
        if p.is_file():
            raise DataError(
                f"{p} is a file, not a prepared data directory; prepare it first ('lmforge prepare {p} --out "
                "DATA_DIR') and pass DATA_DIR"
            )
        if (p / "config.json").is_file() or (p / "checkpoints").is_dir():
            raise DataError(
                f"{p} is a run or model directory, not a prepared data directory (no manifest.json); pass the "
                "folder made by 'lmforge prepare' (a run's config.json names it under data.dir)"
            )
        if p.is_dir():
            raise DataError(
                f"{p} is not a prepared data directory (no manifest.json); prepare its text first ('lmforge "
                f"prepare {p} --out DATA_DIR') and pass DATA_DIR"
            )
        raise DataError(
            f"{p} is not a prepared data directory (no manifest.json); run 'lmforge prepare INPUT... --out {p}' first"
        )
    rerun = f"re-run 'lmforge prepare ... --out {p} --overwrite'"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{manifest_path} is unreadable ({e}); {rerun}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise DataError(f"{manifest_path} is not an lmforge data manifest; {rerun}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path} has format_version {manifest['format_version']}, "
            f"this lmforge reads {FORMAT_VERSION}; {rerun}"
        )
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(s), dict) for s in SPLITS):
        raise DataError(f"{manifest_path} lacks the 'splits' table; {rerun}")
    tokenizer_path = p / TOKENIZER
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path} is missing; {rerun}")
    for split, info in splits.items():
        found = 0
        for name in info.get("shards", []):
            _, count = read_header(p / name)  # missing, foreign or truncated shard -> DataError
            found += count
        if found != info.get("tokens"):
            raise DataError(
                f"{p}: {split} shards hold {found} tokens but the manifest says {info.get('tokens')}; {rerun}"
            )
    return DataDir(path=p, manifest=manifest, tokenizer_path=tokenizer_path)
