"""The text layer under `ingest`: which format an input is (`file_format`), the checks that a file is UTF-8 text
(`check_not_binary`), its lines, and the documents of plain text, shared by the whole-file reader
(`ingest.read_documents`) and the block reader (`ingest_blocks`), so a document comes out the same from both.

- A text file whose first 8 KiB look binary (NUL bytes, or mostly invalid UTF-8) stops the run with
  a one-line `DataError`: silently training on a PNG is worse than asking the user to remove it.
- Line ends: in text and CSV/TSV files a line ends at b"\\n", b"\\r\\n" or a lone b"\\r" (old Mac OS
  files, which would otherwise be one giant line), as `bytes.splitlines` and Python's universal
  newlines cut them; a blank line of any of them ends a paragraph. Documents keep their line ends;
  cleaning (`clean.clean_text`) turns them all into "\\n", so the three spellings of a text give the
  same prepared data. `.jsonl` lines end at b"\\n" only: that is the JSON Lines spec, where a lone
  "\\r" is JSON whitespace.
- A line longer than `max_line_bytes` (a 2 GB single-line file is a broken export, not a document) stops
  the run instead of filling memory.
- A UTF-8 byte-order mark at the start of a file is dropped.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from lmforge.data.clean import BINARY_SNIFF_BYTES, decode_utf8, legacy_encoding, looks_binary, utf16_encoding
from lmforge.data.compressed import inner_name, open_input, read_errors
from lmforge.errors import DataError

DocUnit = Literal["paragraph", "file", "line"]
Format = Literal["text", "json", "jsonl", "csv", "tsv", "parquet", "hf_disk", "hf_hub"]


# compressions and archives a corpus comes in that are not read, with the command that unpacks one
UNREAD_COMPRESSION = {
    ".bz2": "bunzip2 -k", ".xz": "unxz -k", ".lz4": "unlz4", ".zip": "unzip", ".7z": "7z x", ".tar": "tar -xf",
    ".tgz": "tar -xzf",
}  # fmt: skip
HUB_PREFIX = "hf:"
DEFAULT_MAX_LINE_BYTES = 1 << 28  # 256 MiB
PROGRESS_EVERY = 256  # lines between progress callbacks
_PIECE_BYTES = 1 << 16  # text is read in pieces this big and cut into lines (as fast as readline on LF files)


@dataclass(frozen=True)
class RawDocument:
    """A document as read: decoded text (not yet cleaned) and the invalid UTF-8 sequences replaced in it.

    `text` is None for a row with no text: a null (JSON, Parquet), an empty CSV/TSV cell, or a row without the
    field, which `missing` describes ("FILE:LINE: no field 'text' (keys: ...)"). `prepare` skips such rows and
    counts them (`no_text`); a field missing from every row of an input is a wrong --text-field (`no_text_error`).
    `surrogates`: of `invalid_utf8`, the lone surrogates a JSON string escaped (`"\\ud83d"`, an emoji cut in half):
    replaced and counted alike, but valid UTF-8 bytes, so no sign that the file is in another encoding.
    """

    text: str | None
    invalid_utf8: int
    missing: str | None = None
    surrogates: int = 0


def no_text_error(missing: str) -> DataError:
    """The error for an input none of whose rows has the text field; `missing` is its first row's."""
    return DataError(f"{missing}, nor has any other row; choose the text field with --text-field")


def column_hint(columns: list[str], text_field: str) -> str:
    """What to do about a `--text-field` that names no column: the column it differs from only in case or
    surrounding spaces (a hand-written 'id, text' header has ' text', an Excel one 'Text'; the listing of the
    columns hid the space), else to choose one."""
    wanted = text_field.strip().casefold()
    near = next((c for c in columns if c.strip().casefold() == wanted), None)
    if near is None:
        return "choose one with --text-field"
    return f"the column is spelled {near!r}: pass --text-field {shlex.quote(near)}"


def column_index(where: object, columns: list[str], text_field: str) -> int:
    """The index of the `--text-field` column among `columns` (which hold it), refusing a header that names it
    twice: a CSV headed 'text,text' or a Parquet file with two 'text' columns read the first without a word,
    where pandas and `csv.DictReader` read the last."""
    unique_columns(where, columns, [text_field])
    return columns.index(text_field)


def unique_columns(where: object, columns: list[str], names: list[str] | None = None) -> list[str]:
    """`columns` (a CSV/TSV header, a Parquet file's column names), refusing one of `names` (default: any) that two
    columns share, with one line naming it (`finetune`'s task file headed 'text,text,label' read the last 'text'
    without a word). Blank names, as a trailing delimiter leaves, are no column anything reads."""
    for name in dict.fromkeys(columns if names is None else names):
        count = columns.count(name)
        if count > 1 and str(name).strip():
            raise DataError(
                f"{where}: {count} columns are named '{name}', so which one to read is ambiguous; rename all but one "
                "of them"
            )
    return columns


def writable_text(value: Any) -> Any:
    """`value` (a manifest: dicts, lists, strings, numbers) with every string one UTF-8 can hold. A file name that
    is not UTF-8 (Latin-1 names unpacked from an old zip: `caf\\xe9.txt`) reaches Python as lone surrogates
    (`os.fsdecode`), and writing it into manifest.json stopped `prepare` with a UnicodeEncodeError traceback after
    all its work; its bytes are written as `\\xe9` instead (other lone surrogates as '?')."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            pass
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {writable_text(k): writable_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [writable_text(v) for v in value]
    return value


def is_hub(path: str | Path) -> bool:
    """True for a hub dataset name (`hf:NAME[:CONFIG][:SPLIT]`)."""
    return str(path).startswith(HUB_PREFIX)


def is_hf_disk(path: Path) -> bool:
    """True for a folder written by `datasets`' `save_to_disk` (Dataset or DatasetDict)."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def file_format(path: str | Path) -> Format:
    """The reader for an input: by name, or "hf_disk"/"hf_hub"; unknown extensions are "text"."""
    p = Path(path)
    if is_hub(path):
        return "hf_hub"
    if is_hf_disk(p):
        return "hf_disk"
    name = inner_name(p)
    if name.endswith(".parquet") and p.name.lower().endswith(".parquet"):
        return "parquet"
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".csv", "csv"), (".tsv", "tsv")):
        if name.endswith(suffix):
            return fmt  # type: ignore[return-value]
    if "." not in name and _starts_with_json_object(p):  # (a file saved as `corpus`, named explicitly)
        return "jsonl"
    return "text"


_SNIFF_LINE_BYTES = 1 << 20


def _starts_with_json_object(path: Path) -> bool:
    """The first non-blank line of `path` (decompressed) is a JSON object: a file named without an extension is
    then JSON Lines, as `finetune --train` reads such a file (`tables.read_table`), not text whose documents
    would be its raw JSON."""
    try:
        raw, stream = open_input(path)
    except OSError:
        return False  # (said when it is read)
    try:
        return first_line_is_json_object(stream)
    except read_errors():  # a damaged .gz: text (or said when it is read)
        return False
    finally:
        stream.close()
        raw.close()


def first_line_is_json_object(stream: BinaryIO) -> bool:
    """The first non-blank line of `stream` parses as a JSON object (a line past 1 MiB: it starts with `{`): the
    rule by which a file named without an extension is JSON Lines, for `prepare` and `finetune --task clm` alike."""
    while line := stream.readline(_SNIFF_LINE_BYTES):
        whole = len(line) < _SNIFF_LINE_BYTES or line.endswith(b"\n")  # (a longer line: by its start)
        line = line.removeprefix(b"\xef\xbb\xbf").strip()
        if line:
            try:
                return line.startswith(b"{") and (not whole or isinstance(json.loads(line), dict))
            except ValueError:  # not JSON, not UTF-8: text
                return False
    return False


# --------------------------------------------------------------------------------------------
# opening (decompression) and line reading


def check_not_binary(path: Path) -> None:
    """Raise `DataError` if the (decompressed) start of `path` looks like binary data."""
    try:
        raw, stream = open_input(path)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check that it is a readable file") from None
    try:
        head = stream.read(BINARY_SNIFF_BYTES)
    except read_errors() as e:
        raise DataError(
            f"{path}: cannot decompress ({e}); re-create the compressed file or remove it from the inputs"
        ) from None
    finally:
        stream.close()
        raw.close()
    check_head_not_binary(path, head)


def check_head_not_binary(path: Path, head: bytes) -> None:
    """`check_not_binary` on the (decompressed) first bytes of `path` already read: a pipe cannot be opened twice."""
    if looks_binary(head):
        encoding = legacy_encoding(head[:BINARY_SNIFF_BYTES])
        if encoding:
            raise DataError(
                f"{path} is not UTF-8: it reads as {encoding.upper()} (GB18030/GBK: simplified Chinese, BIG5: "
                f"traditional, SHIFT_JIS, EUC-KR); convert it first, e.g. {_iconv(path, encoding.upper())}"
            )
        utf16 = utf16_encoding(head)
        if utf16:
            raise DataError(f"{path} is UTF-16 text, not UTF-8; convert it first, e.g. {_iconv(path, utf16)}")
        unpack = UNREAD_COMPRESSION.get(path.suffix.lower())
        if unpack:  # (was "looks like a binary file, not text; remove it": a compressed corpus is no mistake)
            raise DataError(
                f"{path}: {path.suffix} files are not read (only .gz and .zst are decompressed); decompress it "
                f"first, e.g. {unpack} '{path}', or recompress it with gzip"
            )
        raise DataError(f"{path} looks like a binary file, not text; remove it from the inputs")


def _iconv(path: Path, encoding: str) -> str:
    """The iconv command that converts `path` to UTF-8, written where its format suffix is kept, so a .csv
    stays a .csv (`reviews.csv` -> `reviews.utf8.csv`). A compressed file is decompressed into it first
    (`zcat 'book.txt.gz' | iconv ... > 'book.utf8.txt'`): iconv on the .gz itself fails on its binary bytes."""
    unpack = {".gz": "zcat", ".zst": "zstdcat"}.get(path.suffix)
    inner = path.with_suffix("") if unpack else path
    out = inner.with_name(f"{inner.stem}.utf8{inner.suffix}" if inner.suffix else f"{inner.name}.utf8.txt")
    convert = f"iconv -f {encoding} -t UTF-8"
    return f"{unpack} '{path}' | {convert} > '{out}'" if unpack else f"{convert} '{path}' > '{out}'"


def jsonl_lines(stream: BinaryIO, path: Path, max_line_bytes: int, first_lineno: int = 1) -> Iterator[bytes]:
    """JSON Lines of `stream` (with their b"\\n"), refusing any line longer than `max_line_bytes`."""
    lineno = first_lineno - 1
    while True:
        line = stream.readline(max_line_bytes + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_line_bytes:
            raise long_line_error(path, lineno, max_line_bytes)
        yield line


def text_lines(stream: BinaryIO, path: Path, max_line_bytes: int, first_lineno: int = 1) -> Iterator[bytes]:
    """Lines of a text or CSV `stream` with their ends (b"\\n", b"\\r\\n" or a lone b"\\r", as
    `bytes.splitlines` cuts them), refusing any line longer than `max_line_bytes`.

    Read in pieces of `_PIECE_BYTES`: a file with old-Mac line ends has no b"\\n" for `readline` to
    stop at. A piece's last line is held back (in parts, so a long line is joined once) until a later
    piece ends it: it may have no end yet, or end in a b"\\r" that the next piece's b"\\n" completes.
    """
    lineno = first_lineno - 1
    tail: list[bytes] = []  # the unfinished last line, in parts
    tail_bytes = 0
    while True:
        piece = stream.read(_PIECE_BYTES)
        lines = piece.splitlines(keepends=True)
        if tail:
            if lines and (piece[:1] == b"\n" or not tail[-1].endswith(b"\r")):  # the piece goes on with it
                if len(lines) == 1 and not lines[0].endswith(b"\n"):
                    tail.append(lines[0])
                    tail_bytes += len(lines[0])
                    if tail_bytes > max_line_bytes:
                        raise long_line_error(path, lineno + 1, max_line_bytes)
                    continue
                lines[0] = b"".join([*tail, lines[0]])
            else:  # it ended in a lone "\r", or the file ends
                lines.insert(0, b"".join(tail))
            tail, tail_bytes = [], 0
        if piece and lines and not lines[-1].endswith(b"\n"):
            tail = [lines.pop()]
            tail_bytes = len(tail[0])
        for line in lines:
            lineno += 1
            if len(line) > max_line_bytes:
                raise long_line_error(path, lineno, max_line_bytes)
            yield line
        if not piece:
            return


def long_line_error(path: Path, lineno: int, max_line_bytes: int) -> DataError:
    return DataError(
        f"{path}:{lineno}: a line longer than {max_line_bytes:,} bytes; split the file into documents "
        "(one per line or paragraph) or raise --max-line-bytes"
    )


# --------------------------------------------------------------------------------------------
# documents of plain text (the whole-file and block readers alike)


def no_progress() -> None:
    pass


def text_documents(
    lines: Iterator[bytes], doc_unit: DocUnit, progress: Callable[[], None], *, file_start: bool = True
) -> Iterator[RawDocument]:
    paragraph: list[str] = []
    bad_total = 0
    for lineno, line_bytes in enumerate(lines):
        line, bad = decode_utf8(line_bytes)
        if lineno == 0 and file_start:
            line = line.removeprefix("\ufeff")
        if lineno % PROGRESS_EVERY == PROGRESS_EVERY - 1:
            progress()
        if not line.strip():  # a blank line separates paragraphs; in "line" mode it is no document
            if paragraph:
                yield RawDocument("".join(paragraph), bad_total)
                paragraph, bad_total = [], 0
            continue
        if doc_unit == "line":
            yield RawDocument(line, bad)
        else:
            paragraph.append(line)
            bad_total += bad
    if paragraph:
        yield RawDocument("".join(paragraph), bad_total)


TOO_BIG_FILE = "too big for one document; use --doc-unit paragraph or line"


def too_big_file_error(path: Path, max_bytes: int) -> DataError:
    """A "file"-unit document over --max-line-bytes, in `read_whole`'s words."""
    return DataError(f"{path}: longer than {max_bytes:,} bytes, {TOO_BIG_FILE}, or raise --max-line-bytes")


def file_document(data: bytes) -> RawDocument:
    """The one document of a whole text file (--doc-unit file)."""
    text, bad = decode_utf8(data)
    return RawDocument(text.removeprefix("\ufeff"), bad)


def read_whole(stream: BinaryIO, path: Path, max_bytes: int, too_big: str) -> bytes:
    """All of `stream`, refused (one line: `too_big`, then --max-line-bytes) when over `max_bytes`."""
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"{path}: longer than {max_bytes:,} bytes, {too_big}, or raise --max-line-bytes")
    return data
