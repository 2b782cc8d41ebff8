"""Reading in blocks, for `prepare --workers`: the main process cuts a file into byte blocks at document
boundaries (`read_blocks`), and `block_documents` (in a worker) parses one block exactly as `ingest.read_documents`
parses the whole file.

- `read_blocks` cuts text and JSONL files (compressed or not) into ~4 MB byte blocks at document boundaries
  (after an empty or blank line; any line end for "line" and JSONL, never between the b"\\r" and b"\\n" of one)
  and `block_documents` parses one block in a worker with the same line parsers (`ingest_text`), so the documents
  are the same as `read_documents` gives (a test compares them at several block sizes). A block of valid UTF-8 in
  "paragraph" mode is split with one regex instead of line by line.
- Asked to (`long_bytes`, prepare's LONG_DOCUMENT_BYTES), `read_blocks` gives a text file's document that outgrows
  a block with no boundary in sight as a `LongDocument`, decoded chunks of ~1 MiB read as they are asked for
  (`_LongReader`), so a 200 MB one-line document is never held whole.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.clean import decode_utf8
from lmforge.data.compressed import open_input, read_errors
from lmforge.data.ingest_text import (
    DEFAULT_MAX_LINE_BYTES,
    DocUnit,
    RawDocument,
    check_not_binary,
    file_document,
    file_format,
    jsonl_lines,
    long_line_error,
    no_progress,
    text_documents,
    text_lines,
    too_big_file_error,
)
from lmforge.errors import DataError

BLOCK_BYTES = 4 << 20
# prepare streams a text file's document that grows past this without a boundary (`LongDocument`)
LONG_DOCUMENT_BYTES = 16 << 20
# A paragraph surely ends at a line that is empty or holds only ASCII blanks; blank lines made of
# other whitespace (U+3000 ...) are real separators too, but a block is only cut at these. The match
# is a line end (a "\r" only when no "\n" follows it), blanks, and the blank line's own end: "\n",
# "\r\n", or a "\r" followed by something else than "\n" (at the end of `data` it may be half a "\r\n").
_WHITESPACE = b" \t\f\v\r\n"  # what `_BLANK_LINE` and the line ends are made of
_BLANK_LINE = re.compile(rb"(?:\n|\r(?!\n))[ \t\f\v]*(?:\r?\n|\r(?=[^\n]))")


@dataclass(frozen=True)
class Block:
    """Whole lines of a file (bytes, decompressed): `first_lineno` is the 1-based number of the first one."""

    data: bytes
    first_lineno: int

    @property
    def file_start(self) -> bool:
        return self.first_lineno == 1


@dataclass(frozen=True)
class LongDocument:
    """One text-file document too long for a block (`read_blocks` with `long_bytes`): its raw text as decoded
    chunks (text, invalid UTF-8 sequences replaced in it), read from the file as they are asked for; they must
    be used up before the next block is asked for. Joined, they are the `RawDocument` the block parser gives."""

    chunks: Iterator[tuple[str, int]]


def reads_in_blocks(path: Path, doc_unit: DocUnit) -> bool:
    """True for inputs that `read_blocks` can cut: text files and JSONL, compressed or not. (A "file"-unit text file
    is one block, or a `LongDocument` streamed: read whole, --doc-unit file held a 200 MB file as bytes and text.)"""
    return file_format(path) in ("jsonl", "text")


def _line_end(data: bytes, jsonl: bool) -> int:
    """Length of the longest prefix of `data` made of whole lines (0 if none).

    JSON Lines end at b"\\n" only (a lone b"\\r" is whitespace inside JSON); text lines also at a lone
    b"\\r", but not at one that ends `data`, which may be the first half of a b"\\r\\n".
    """
    if jsonl:
        return data.rfind(b"\n") + 1
    end = len(data) - 1 if data.endswith(b"\r") else len(data)
    return max(data.rfind(b"\n", 0, end), data.rfind(b"\r", 0, end)) + 1


def _count_lines(data: bytes, jsonl: bool) -> int:
    """The line ends in whole lines `data` ("\\r\\n" counts once), as `jsonl_lines` / `text_lines` count them."""
    n = data.count(b"\n")
    if not jsonl and b"\r" in data:
        n += data.count(b"\r") - data.count(b"\r\n")
    return n


def _cut(data: bytes, doc_unit: DocUnit, jsonl: bool) -> int:
    """Length of the longest prefix of `data` that ends at a document boundary (0 if none)."""
    if doc_unit == "file" and not jsonl:  # (the end of the file: `read_blocks`)
        return 0
    if jsonl or doc_unit != "paragraph":
        return _line_end(data, jsonl)
    at = data.rfind(b"\n\n")
    if at >= 0:
        return at + 2
    last = None
    for last in _BLANK_LINE.finditer(data):  # noqa: B007 - rare: blank lines with spaces, CRLF or old-Mac ends
        pass
    return last.end() if last is not None else 0


def read_blocks(
    path: Path,
    *,
    doc_unit: DocUnit = "paragraph",
    on_bytes: Callable[[int], None] | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    block_bytes: int = BLOCK_BYTES,
    long_bytes: int | None = None,
) -> Iterator[Block | LongDocument]:
    """Cut a file accepted by `reads_in_blocks` into blocks of about `block_bytes` at document boundaries.

    Parsing the blocks with `block_documents` gives the documents of `read_documents`, in order. With
    `long_bytes`, a text file's document that passes `long_bytes` with no boundary in sight comes as a
    `LongDocument` instead, streamed in chunks (memory holds a chunk, not the document; see `_LongReader`).

    Raises:
        DataError: binary file, corrupt compression or a line longer than `max_line_bytes`.
    """
    check_not_binary(path)
    raw, stream = open_input(path)
    jsonl = file_format(path) == "jsonl"
    pending = bytearray()  # (appending to bytes would copy it all at each read)
    start = 0  # pending[:start] holds no document boundary and ends at a non-whitespace byte (or is empty)
    lineno = 1
    reported = 0

    def read() -> bytes:
        nonlocal reported
        data = stream.read(block_bytes)
        if on_bytes is not None:
            position = raw.tell()
            on_bytes(position - reported)
            reported = position
        return data

    try:
        while True:
            data = read()
            pending += data
            # Search only what is new since the last whitespace run began: a boundary is all whitespace
            # (line ends and blank lines), so one not found before must end in the new data. Searching from
            # 0 each time was quadratic on a long paragraph-mode file with no blank line.
            cut = len(pending) if not data else _cut(bytes(pending[start:]), doc_unit, jsonl)
            if cut and data:
                cut += start
            elif data and (kept := len(data.rstrip(_WHITESPACE))):
                start = len(pending) - len(data) + kept
            whole_file = doc_unit == "file" and not jsonl
            if cut or (whole_file and not data):  # (an empty file is one empty document, as `read_documents` says)
                block = Block(bytes(pending[:cut]), lineno)
                lineno += _count_lines(block.data, jsonl)
                del pending[:cut]
                start = 0
                yield block
            elif long_bytes is not None and not jsonl and data and len(pending) > long_bytes:
                reader = _LongReader(pending, read, path, doc_unit, max_line_bytes, lineno)
                yield LongDocument(reader.chunks())
                lineno, start = reader.lineno, 0
                if reader.eof:  # the file was read to its end: what the document left is the last block
                    if pending:
                        yield Block(bytes(pending), lineno)
                    return
            elif whole_file and len(pending) > max_line_bytes:
                raise too_big_file_error(path, max_line_bytes)
            elif len(pending) - (end := _line_end(pending, jsonl)) > max_line_bytes:
                raise long_line_error(path, lineno + _count_lines(pending[:end], jsonl), max_line_bytes)
            if not data:
                return
    except read_errors() as e:
        raise DataError(f"{path}: read failed ({e}); re-create the file or remove it from the inputs") from None
    finally:
        stream.close()
        raw.close()


# Where a long line may be cut into chunks: before a printable ASCII character or a CJK ideograph (U+4000-U+9FFF,
# 3 bytes from E4-E9). Such a character ends any invalid UTF-8 sequence before it (decoding the parts gives the
# text and the U+FFFD of decoding the whole), is no line break or control character that cleaning changes, and is
# a Unicode starter that no normalization composes with what comes before it: cleaning the parts cleans the whole.
_CHUNK_BYTES = 1 << 20


def _safe_cut(data: bytearray) -> int:
    """The last position in (0, _CHUNK_BYTES] of `data` where a long line may be cut (see above), searched in the
    64 KiB before it; 0 if none."""
    end = min(len(data) - 1, _CHUNK_BYTES)
    for i in range(end, max(0, end - (1 << 16)), -1):
        byte = data[i]
        if 0x20 <= byte <= 0x7E:
            return i
        if 0xE4 <= byte <= 0xE9 and i + 2 < len(data) and 0x80 <= data[i + 1] <= 0xBF and 0x80 <= data[i + 2] <= 0xBF:
            return i
    return 0


def _first_line_end(data: bytearray, final: bool) -> int:
    """The length of the first line of `data` with its end (b"\n", b"\r\n" or a lone b"\r"); 0 if it has not
    ended yet (a b"\r" that ends `data` may be the first half of a b"\r\n", unless `final`)."""
    n = data.find(b"\n")
    r = data.find(b"\r", 0, n if n >= 0 else len(data))
    if r < 0:
        return n + 1
    if r + 1 < len(data):
        return r + 2 if data[r + 1] == 0x0A else r + 1
    return r + 1 if final else 0


class _LongReader:
    """Reads one long document of a text file from `read_blocks`' pending bytes and stream, in chunks.

    The document is what `text_documents` would make of the lines that follow: in "line" mode the next non-blank
    line, in "paragraph" mode the lines up to a blank one (whitespace only, as decoded: `str.strip`); in "file"
    mode every line to the end of the file (`file_document`), blank ones too, and at most `max_line_bytes` in all.
    Whole lines are given one each; a line longer than _CHUNK_BYTES in parts cut by `_safe_cut`, a part that holds only
    whitespace held back until the line shows it is not blank; so a chunk is at most _CHUNK_BYTES, unless no
    position to cut comes in a line's 64 KiB before that. Blank lines before the document are skipped; the
    blank line after it and the rest stay in `pending` for `read_blocks`."""

    def __init__(
        self, pending: bytearray, read: Callable[[], bytes], path: Path, doc_unit: DocUnit, max_line_bytes: int,
        lineno: int,
    ) -> None:  # fmt: skip
        self.pending, self.read, self.path = pending, read, path
        self.doc_unit, self.max_line_bytes = doc_unit, max_line_bytes
        self.lineno = lineno  # the line that pending starts with
        self.eof = False
        self.given = 0  # bytes of the document given

    def chunks(self) -> Iterator[tuple[str, int]]:
        pending = self.pending
        started = False  # any line of the document given
        line_bytes = 0  # bytes of the current line given so far
        line_blank = True  # the current line's given parts are whitespace only
        while True:
            if self.doc_unit == "file" and self.given + len(pending) > self.max_line_bytes:
                raise too_big_file_error(self.path, self.max_line_bytes)
            end = _first_line_end(pending, self.eof) or (len(pending) if self.eof else 0)
            if (not end or end > _CHUNK_BYTES) and len(pending) > _CHUNK_BYTES and (cut := _safe_cut(pending)):
                text, bad = self._decode(bytes(pending[:cut]), line_bytes == 0)
                if not line_blank or text.strip():  # (a blank line's parts would be given before it shows blank)
                    line_bytes += cut
                    if line_bytes > self.max_line_bytes:
                        raise long_line_error(self.path, self.lineno, self.max_line_bytes)
                    del pending[:cut]
                    self.given += cut
                    started, line_blank = True, False
                    yield text, bad
                    continue
            if end:
                text, bad = self._decode(bytes(pending[:end]), line_bytes == 0)
                if (
                    line_blank and not text.strip() and self.doc_unit != "file"
                ):  # before the document skipped, after kept
                    if started:
                        return
                    del pending[:end]
                    self.lineno += 1
                    continue
                if line_bytes + end > self.max_line_bytes:
                    raise long_line_error(self.path, self.lineno, self.max_line_bytes)
                del pending[:end]
                self.given += end
                self.lineno += 1
                started, line_bytes, line_blank = True, 0, True
                yield text, bad
                if self.doc_unit == "line":
                    return
                continue
            if self.eof:
                return
            if len(pending) + line_bytes > self.max_line_bytes + 1:  # (+1: a last b"\r" may be a line end)
                raise long_line_error(self.path, self.lineno, self.max_line_bytes)
            data = self.read()
            self.eof = not data
            pending += data

    def _decode(self, data: bytes, line_start: bool) -> tuple[str, int]:
        text, bad = decode_utf8(data)
        if line_start and self.lineno == 1:  # the file's first line: a byte-order mark is no text
            text = text.removeprefix("\ufeff")
        return text, bad


def _fast_paragraphs(data: bytes, file_start: bool) -> list[str] | None:
    """The paragraphs of valid UTF-8 `data` with one regex split (None if the block has invalid UTF-8).

    Same result as `text_documents`: a line whose decoded text is only whitespace (`str.isspace`,
    which is what `str.strip` and the regex `\\s` use) ends a paragraph; a paragraph keeps its line ends.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if file_start:
        text = text.removeprefix("\ufeff")
    lone_cr = "\r" in text and text.count("\r") != text.count("\r\n")
    return [p for p in (_BLANK_LINES_CR if lone_cr else _BLANK_LINES).split(text) if p]


# Lines end at "\n" (a "\r" before it is one of the blank's whitespace characters) ...
_BLANK_LINES = re.compile(r"(?m)^[^\S\n]*(?:\n|\Z)")
# ... or, in a block with old-Mac line ends, also at a lone "\r": a line starts after a "\r" that no
# "\n" follows too. Measured 4x slower than _BLANK_LINES on LF text, so only used where needed.
_BLANK_LINES_CR = re.compile(r"(?m)(?:^|(?<=\r)(?!\n))[^\S\r\n]*(?:\r\n|\r|\n|\Z)")


def block_documents(
    block: Block,
    path: Path,
    *,
    doc_unit: DocUnit = "paragraph",
    text_field: str = "text",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[RawDocument]:
    """The raw documents of one block of `path` (see `read_blocks`)."""
    jsonl = file_format(path) == "jsonl"
    lines = (jsonl_lines if jsonl else text_lines)(io.BytesIO(block.data), path, max_line_bytes, block.first_lineno)
    if jsonl:
        from lmforge.data.jsonl import jsonl_documents

        yield from jsonl_documents(path, lines, text_field, no_progress, block.first_lineno)
        return
    if doc_unit == "file":  # (the whole file: `read_blocks` never cuts one)
        yield file_document(block.data)
        return
    if doc_unit == "paragraph" and len(block.data) <= max_line_bytes:  # no line can be too long
        paragraphs = _fast_paragraphs(block.data, block.file_start)
        if paragraphs is not None:
            for paragraph in paragraphs:
                yield RawDocument(paragraph, 0)
            return
    yield from text_documents(lines, doc_unit, no_progress, file_start=block.file_start)
