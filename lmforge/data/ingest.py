"""Read input files into a stream of raw documents (before cleaning).

Inputs are files, folders (searched recursively) and glob patterns (`data/*.txt`, `corpus/**/*.md`).
Formats, chosen by file name (case-insensitive), each optionally gzip-compressed (`.gz`):
- `.txt`, `.md`: plain text, cut into documents by `doc_unit`: "paragraph" (blank-line separated
  blocks, the default), "line" (each non-blank line) or "file" (the whole file).
- `.jsonl`: one JSON object per line; the string under `text_field` is one document.

Key design decisions:
- Deterministic order: every input is expanded, duplicates (same resolved file) dropped, and the
  files sorted by path, so the same inputs always give the same document stream.
- Files found inside folders or by a glob are read only if their format is known; others are
  skipped and reported (`skipped_files` in the manifest). Hidden files and folders (".git") are not
  searched. A file named explicitly - or by a glob that spells out its extension, like `logs/*.log` -
  is read as plain text whatever its extension, as long as it is text.
- A file whose first 8 KiB look binary (NUL bytes, or mostly invalid UTF-8) stops the run with a
  one-line `DataError`: silently training on a PNG is worse than asking the user to remove it.
- Streaming: text is read line by line in binary mode (a b"\\n" byte can never be inside a UTF-8
  multi-byte character, so decoding per line gives the same result as decoding the whole file);
  only one document is held in memory at a time ("file" mode holds one file).
- A UTF-8 byte-order mark at the start of a file is dropped.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from lmforge.data.clean import BINARY_SNIFF_BYTES, decode_utf8, looks_binary, replace_surrogates
from lmforge.errors import DataError

DocUnit = Literal["paragraph", "file", "line"]
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
_GLOB_CHARS = set("*?[")
_PROGRESS_EVERY = 256  # lines between progress callbacks


@dataclass(frozen=True)
class RawDocument:
    """A document as read: decoded text (not yet cleaned) and the invalid UTF-8 sequences replaced in it."""

    text: str
    invalid_utf8: int


def _inner_name(path: Path) -> str:
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def file_format(path: str | Path) -> Literal["text", "jsonl"]:
    """The reader for a file: "jsonl" for `.jsonl` / `.jsonl.gz`, "text" for everything else."""
    return "jsonl" if _inner_name(Path(path)).endswith(JSONL_SUFFIXES) else "text"


def is_known_format(path: str | Path) -> bool:
    """True for .txt, .md, .jsonl, each with or without .gz."""
    return _inner_name(Path(path)).endswith(KNOWN_SUFFIXES)


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def resolve_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders and globs into the files to read.

    Args:
        inputs: paths and glob patterns as the user typed them.

    Returns:
        (files to read, sorted by path; skipped files of unknown format found in folders/globs).

    Raises:
        DataError: a path does not exist, a pattern matches nothing, or a folder holds no readable file.
    """
    chosen: dict[Path, Path] = {}  # resolved -> as given
    skipped: dict[Path, Path] = {}

    def take(path: Path, explicit: bool) -> None:
        key = path.resolve()
        if explicit or is_known_format(path):
            chosen.setdefault(key, path)
        else:
            skipped.setdefault(key, path)

    for raw in inputs:
        path = Path(raw)
        if not path.exists() and _GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                raise DataError(f"input pattern {raw!r} matches no files; check the pattern (quote it for the shell)")
            for match in map(Path, matches):
                if match.is_dir():
                    for file in _walk(match):
                        take(file, explicit=False)
                elif match.is_file():
                    # `logs/*.log` names the extension, so the user means these files
                    take(match, explicit=raw.lower().endswith(match.suffix.lower()) and bool(match.suffix))
            continue
        if not path.exists():
            raise DataError(f"input {raw!r} does not exist; check the path")
        if path.is_dir():
            before = len(chosen)
            for file in _walk(path):
                take(file, explicit=False)
            if len(chosen) == before and not any(_walk(path)):
                raise DataError(f"input folder {raw!r} is empty; pass a folder with .txt, .md or .jsonl files")
        else:
            take(path, explicit=True)
    files = sorted(chosen.values(), key=str)
    skipped_names = sorted(str(p) for key, p in skipped.items() if key not in chosen)
    return files, skipped_names


def _open(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(raw file, decompressed stream); the raw file's position measures progress."""
    raw = open(path, "rb")  # closed by the caller
    if path.name.lower().endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw, raw


def check_not_binary(path: Path) -> None:
    """Raise `DataError` if the (decompressed) start of `path` looks like binary data."""
    try:
        raw, stream = _open(path)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check that it is a readable file") from None
    try:
        head = stream.read(BINARY_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot decompress ({e}); re-create the .gz file or remove it from the inputs"
        ) from None
    finally:
        stream.close()
        raw.close()
    if looks_binary(head):
        raise DataError(f"{path} looks like a binary file, not text; remove it from the inputs")


def read_documents(
    path: str | Path,
    *,
    doc_unit: DocUnit = "paragraph",
    text_field: str = "text",
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[RawDocument]:
    """Yield the raw documents of one file.

    Args:
        path: a text or JSONL file (optionally .gz).
        doc_unit: how plain-text files are cut into documents.
        text_field: JSONL key holding the text.
        on_bytes: called with the number of (on-disk) bytes consumed since the last call, for progress.

    Raises:
        DataError: binary file, corrupt gzip, or a JSONL line that is not an object with `text_field`.
    """
    path = Path(path)
    check_not_binary(path)
    raw, stream = _open(path)
    reported = 0

    def progress() -> None:
        nonlocal reported
        if on_bytes is not None:
            position = raw.tell()
            on_bytes(position - reported)
            reported = position

    try:
        if file_format(path) == "jsonl":
            yield from _jsonl_documents(path, stream, text_field, progress)
        elif doc_unit == "file":
            text, bad = decode_utf8(stream.read())
            yield RawDocument(text.removeprefix("\ufeff"), bad)
        else:
            yield from _text_documents(stream, doc_unit, progress)
        progress()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: read failed ({e}); re-create the file or remove it from the inputs") from None
    finally:
        stream.close()
        raw.close()


def _text_documents(stream: BinaryIO, doc_unit: DocUnit, progress: Callable[[], None]) -> Iterator[RawDocument]:
    lines: list[str] = []
    bad_total = 0
    for lineno, line_bytes in enumerate(stream):
        line, bad = decode_utf8(line_bytes)
        if lineno == 0:
            line = line.removeprefix("\ufeff")
        if lineno % _PROGRESS_EVERY == _PROGRESS_EVERY - 1:
            progress()
        if not line.strip():  # a blank line separates paragraphs; in "line" mode it is no document
            if lines:
                yield RawDocument("".join(lines), bad_total)
                lines, bad_total = [], 0
            continue
        if doc_unit == "line":
            yield RawDocument(line, bad)
        else:
            lines.append(line)
            bad_total += bad
    if lines:
        yield RawDocument("".join(lines), bad_total)


def _jsonl_documents(
    path: Path, stream: BinaryIO, text_field: str, progress: Callable[[], None]
) -> Iterator[RawDocument]:
    for lineno, line_bytes in enumerate(stream, start=1):
        if lineno % _PROGRESS_EVERY == 0:
            progress()
        line, bad = decode_utf8(line_bytes)
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a .jsonl file must be one JSON object"
            ) from None
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise DataError(f'{where}: expected a JSON object, got {kind}; each line must be {{"{text_field}": ...}}')
        if text_field not in record:
            keys = ", ".join(list(record)[:8]) or "none"
            raise DataError(f"{where}: no field '{text_field}' (keys: {keys}); choose the text field with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            kind = type(text).__name__
            raise DataError(
                f"{where}: field '{text_field}' is {kind}, not a string; choose the field with --text-field"
            )
        text, surrogates = replace_surrogates(text)
        yield RawDocument(text, bad + surrogates)
