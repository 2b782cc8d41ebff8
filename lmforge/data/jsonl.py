"""The JSON Lines and .json readers of `ingest.read_documents` (and of `ingest.block_documents` for JSONL blocks).

What the two formats may hold, and how a dotted `text_field` reaches into nested objects, is listed in
`ingest`'s docstring; `dotted_rows` is that walk, shared by both readers and by `finetune`'s task files
(`tables.nested_rows`). `.jsonl` lines end at b"\\n" only
(the JSON Lines spec: a lone "\\r" is JSON whitespace); a `.json` file is read whole, up to `max_line_bytes`,
and one that is really JSON Lines (more than one value) is read as JSONL.

Split out of `ingest` (size guide); `ingest` imports it only for these formats.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

from lmforge.data.clean import decode_utf8, json_line, replace_surrogates
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
            yield from field_documents(record, text_field, where, bad if i == 1 else 0)
            continue
        if isinstance(record, dict):
            if text_field not in record:
                keys = ", ".join(list(record)[:8]) or "none"
                yield RawDocument(None, bad if i == 1 else 0, f"{where} has no field '{text_field}' (keys: {keys})")
                continue
            record = record[text_field]
        if record is None:  # a null item or text: no text, skipped and counted (as a Parquet null is)
            yield RawDocument(None, bad if i == 1 else 0)
            continue
        doc, surrogates = replace_surrogates(document_text(record, where, text_field))
        yield RawDocument(doc, (bad if i == 1 else 0) + surrogates, surrogates=surrogates)


def field_documents(record: dict[str, Any], field_path: str, where: str, bad: int) -> Iterator[RawDocument]:
    """The documents at dotted `field_path` in a JSON object (`dotted_rows`, a key missing on the way an error, as a
    missing flat --text-field is), each a string or a list of strings (joined by newlines); the first carries the
    line's `bad` (invalid UTF-8) count. A null there is no text, skipped and counted as a null flat field is
    (`{"doc": {"body": null}}` stopped the run, where `{"text": null}` was counted under no_text).

    Raises:
        DataError: a key missing on the way, or a leaf of another kind; the message names the path so far.
    """
    hint = "choose the text field with --text-field (a dotted path such as doc.text reaches into objects)"
    found = dotted_rows(record, [field_path], where, missing="error", hint=hint)
    for k, row in enumerate(found, 1):
        value, here = row[field_path], f"{where} (value {k} found there)" if len(found) > 1 else where
        if value is None:
            yield RawDocument(None, bad if k == 1 else 0)
            continue
        text, surrogates = replace_surrogates(document_text(value, here, field_path))
        yield RawDocument(text, (bad if k == 1 else 0) + surrogates, surrogates=surrogates)


def document_text(value: Any, where: str, text_field: str) -> str:
    """The document under `text_field`: a string, or a list of strings joined by newlines (a chapter's paragraphs),
    in every format that holds JSON values (.json, .jsonl, a dotted path's leaf, a hub dataset's column).
    A null in the list is left out, as a Parquet or Arrow list column's nulls are (`columnar.py`): the same
    rows gave a document from Parquet and a "not a list of strings" error from JSON Lines.

    Raises:
        DataError: any other value, naming `where` and the field.
    """
    if isinstance(value, list) and all(isinstance(t, str) or t is None for t in value):
        return "\n".join(t for t in value if t is not None)
    inner = value if isinstance(value, dict) else None
    if isinstance(value, list):
        inner = next((t for t in value if isinstance(t, dict)), None)
    if inner is not None:  # (古文观止's volumes of pieces, a JSONL {"text": {"en": ..., "zh": ...}}): name the keys
        keys = ", ".join(list(inner)[:8]) or "none"
        raise DataError(
            f"{where}: '{text_field}' holds objects (keys: {keys}), not text; reach into them with a dotted "
            f"--text-field {text_field}.KEY"
        )
    if not isinstance(value, str):
        # one odd row ({"text": 42} among strings) is that row's fault, not a wrong --text-field: say both, the row
        # first. Not skipped as a null is: a null says "no text", a number or a list of numbers is data that
        # would be lost without a word (a column of ids or labels chosen by mistake stops at its first row)
        shown = json.dumps(value, ensure_ascii=False, default=str)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise DataError(
            f"{where}: field '{text_field}' is {type(value).__name__} ({shown}), not a string (or a list of "
            "strings); fix that row (write the text as a string, or null to skip the row), or if the field holds "
            "no text, choose another with --text-field"
        )
    return value


def dotted_rows(
    record: Any, paths: Sequence[str], where: str, *, missing: Literal["error", "absent"], hint: str
) -> list[dict[str, Any]]:
    """The values at dotted `paths` in a JSON record (`prepare --text-field doc.body`, a task file's `--field
    output=instances.output`): one {path: value} per item of the list of objects they walk, one when they walk
    none, none for an empty list. Each key descends into an object; a list on the way is walked item by item
    (lists inside its items too); paths that walk lists must walk the same ones.

    `missing` is the policy for a key missing on the way. "error": a `DataError` naming `where`, the path so far
    and the keys there, ending with `hint` (prepare's dotted --text-field: a typo should stop a long run at
    the first record, not leave it with no documents). "absent": the path is left out of that
    dict (task files: an optional field such as sft's input may be missing from some items; `nested_rows` refuses
    a path that no row has).

    Raises:
        DataError: a missing key ("error"); a list of non-objects where a key is still to be found; paths that
            walk different lists.
    """

    def walk(value: Any, rest: dict[str, list[str]], at: str) -> tuple[list[dict[str, Any]], bool]:
        """(the dicts, whether a list was walked) for the paths in `rest` (path -> its keys still to descend)."""
        done = {path: value for path, keys in rest.items() if not keys}
        todo = {path: keys for path, keys in rest.items() if keys}
        if not todo:
            return [done], False
        if isinstance(value, list):
            odd = next((item for item in value if not isinstance(item, dict)), None)
            if odd is not None or None in value:
                raise DataError(
                    f"{where}: '{at}' holds {type(odd).__name__} values, not objects with keys for "
                    f"{', '.join(todo)}; {hint}"
                )
            rows = [row for k, item in enumerate(value) for row in walk(item, todo, f"{at}[{k}]")[0]]
            return [done | row for row in rows], True
        rows, walked_by = [done], ""
        groups: dict[str, dict[str, list[str]]] = {}
        for path, keys in todo.items():
            groups.setdefault(keys[0], {})[path] = keys[1:]
        for key, group in groups.items():
            if not isinstance(value, dict) or key not in value:
                if missing == "absent":
                    continue
                keys = (
                    (", ".join(list(value)[:8]) or "none") if isinstance(value, dict) else f"a {type(value).__name__}"
                )
                raise DataError(f"{where}: no field '{key}'{f' at {at!r}' if at else ''} (found: {keys}); {hint}")
            found, walked = walk(value[key], group, f"{at}.{key}" if at else key)
            if walked and walked_by:
                raise DataError(
                    f"{where}: the --field paths {walked_by}, {', '.join(group)} walk different lists; name fields "
                    "inside one list (e.g. instances.input and instances.output)"
                )
            walked_by = walked_by or (", ".join(group) if walked else "")
            rows = [row | more for row in rows for more in found]
        return rows, bool(walked_by)

    return walk(record, {path: path.split(".") for path in paths}, "")[0]


def jsonl_documents(
    path: Path, lines: Iterator[bytes], text_field: str, progress: Callable[[], None], first_lineno: int = 1
) -> Iterator[RawDocument]:
    for lineno, line_bytes in enumerate(lines, start=first_lineno):
        if lineno % PROGRESS_EVERY == 0:
            progress()
        line, bad = decode_utf8(line_bytes)
        line = json_line(line)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and "\r" in line[: e.pos]:  # (a raw CR is never inside a JSON string)
                raise DataError(
                    f"{path}:{lineno}: its lines end with a lone carriage return (old Mac OS), and JSON Lines end at "
                    "\\n; convert its line ends first (tr '\\r' '\\n' does)"
                ) from None
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a .jsonl file must be one JSON object"
            ) from None
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise DataError(f'{where}: expected a JSON object, got {kind}; each line must be {{"{text_field}": ...}}')
        if text_field not in record and "." in text_field:  # a path into nested objects
            yield from field_documents(record, text_field, where, bad)
            continue
        if text_field not in record:  # skipped and counted; an error when no row has it (ingest.read_documents)
            keys = ", ".join(list(record)[:8]) or "none"
            yield RawDocument(None, bad, f"{where}: no field '{text_field}' (keys: {keys})")
            continue
        if record[text_field] is None:  # a null: no text, skipped and counted (as a Parquet null is)
            yield RawDocument(None, bad)
            continue
        text, surrogates = replace_surrogates(document_text(record[text_field], where, text_field))
        yield RawDocument(text, bad + surrogates, surrogates=surrogates)
