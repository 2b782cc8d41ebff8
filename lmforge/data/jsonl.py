"""The JSON Lines and .json readers of `ingest.read_documents` (and of `ingest.block_documents` for JSONL blocks).

What the two formats may hold, and how a dotted `text_field` reaches into nested objects, is listed in
`ingest`'s docstring; `field_texts` is that walk, shared by both readers. `.jsonl` lines end at b"\\n" only
(the JSON Lines spec: a lone "\\r" is JSON whitespace); a `.json` file is read whole, up to `max_line_bytes`,
and one that is really JSON Lines (more than one value) is read as JSONL.

Split out of `ingest` (size guide); `ingest` imports it only for these formats.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.data.clean import decode_utf8, replace_surrogates
from lmforge.data.ingest import PROGRESS_EVERY, RawDocument, no_progress, read_whole
from lmforge.errors import DataError


def json_documents(path: Path, stream: BinaryIO, text_field: str, max_bytes: int) -> Iterator[RawDocument]:
    """A .json file: an array of strings / objects (or one object); JSON Lines under a .json name too."""
    data = read_whole(
        stream, path, max_bytes, "and a .json file is read whole; convert it to .jsonl (one object per line)"
    )
    text, bad = decode_utf8(data)
    text = text.removeprefix("\ufeff")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # more than one value: JSON Lines under a .json name
            lines = iter(io.BytesIO(data))  # at b"\n" only, as .jsonl: a lone b"\r" is JSON whitespace
            yield from jsonl_documents(path, lines, text_field, no_progress)
            return
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    records = value if isinstance(value, list) else [value]
    for i, record in enumerate(records, 1):
        where = f"{path}: item {i}" if isinstance(value, list) else f"{path}: its top-level object"
        if isinstance(record, dict) and text_field not in record and "." in text_field:
            for j, text in enumerate(field_texts(record, text_field, where)):
                doc, surrogates = replace_surrogates(text)
                yield RawDocument(doc, (bad if i == 1 and j == 0 else 0) + surrogates)
            continue
        if isinstance(record, dict):
            if text_field not in record:
                keys = ", ".join(list(record)[:8]) or "none"
                raise DataError(f"{where} has no field '{text_field}' (keys: {keys}); choose one with --text-field")
            record = record[text_field]
        if isinstance(record, list) and all(isinstance(t, str) for t in record):
            record = "\n".join(record)  # e.g. a chapter's list of paragraphs
        inner = record if isinstance(record, dict) else None
        if isinstance(record, list):
            inner = next((t for t in record if isinstance(t, dict)), None)
        if inner is not None:  # (古文观止's volumes of pieces: "got list" read as if a list were fine)
            keys = ", ".join(list(inner)[:8]) or "none"
            raise DataError(
                f"{where}: '{text_field}' holds objects (keys: {keys}), not text; reach into them with a dotted "
                f"--text-field {text_field}.KEY"
            )
        if not isinstance(record, str):
            raise DataError(
                f"{where}: expected a string (or a list of strings) under '{text_field}', got "
                f"{type(record).__name__}; choose the text field with --text-field"
            )
        doc, surrogates = replace_surrogates(record)
        yield RawDocument(doc, (bad if i == 1 else 0) + surrogates)


def field_texts(record: dict[str, Any], field_path: str, where: str) -> Iterator[str]:
    """The texts at dotted `field_path` in a JSON object: each key descends into an object, a list of objects
    on the way is walked item by item, and each leaf is a string or a list of strings (joined by newlines).

    Raises:
        DataError: a key missing on the way, or a leaf of another kind; the message names the path so far.
    """
    parts = field_path.split(".")

    def walk(value: Any, depth: int, at: str) -> Iterator[str]:
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value) and depth < len(parts):
            for k, item in enumerate(value):
                yield from walk(item, depth, f"{at}[{k}]")
            return
        if depth == len(parts):
            if isinstance(value, list) and all(isinstance(t, str) for t in value):
                value = "\n".join(value)
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: '{at}' is {type(value).__name__}, not a string or a list of strings; "
                    "choose the text field with --text-field"
                )
            yield value
            return
        if not isinstance(value, dict) or parts[depth] not in value:
            keys = ", ".join(list(value)[:8]) if isinstance(value, dict) else f"a {type(value).__name__}"
            raise DataError(
                f"{where}: no field '{parts[depth]}' at '{at or field_path}' (found: {keys or 'none'}); "
                "choose the text field with --text-field (a dotted path such as doc.text reaches into objects)"
            )
        yield from walk(value[parts[depth]], depth + 1, ".".join(p for p in (at, parts[depth]) if p))

    yield from walk(record, 0, "")


def jsonl_documents(
    path: Path, lines: Iterator[bytes], text_field: str, progress: Callable[[], None], first_lineno: int = 1
) -> Iterator[RawDocument]:
    for lineno, line_bytes in enumerate(lines, start=first_lineno):
        if lineno % PROGRESS_EVERY == 0:
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
        if text_field not in record and "." in text_field:  # a path into nested objects
            for j, text in enumerate(field_texts(record, text_field, where)):
                text, surrogates = replace_surrogates(text)
                yield RawDocument(text, (bad if j == 0 else 0) + surrogates)
            continue
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
