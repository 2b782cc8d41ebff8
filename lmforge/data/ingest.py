"""Read input files into a stream of raw documents (before cleaning).

Inputs are files, folders (searched recursively), glob patterns (`data/*.txt`, `corpus/**/*.md`),
Hugging Face datasets saved with `save_to_disk` (a folder holding `state.json` or
`dataset_dict.json`) and hub datasets named `hf:NAME[:CONFIG][:SPLIT]` (needs `datasets` and the
network). File formats, chosen by file name (case-insensitive):
- `.txt`, `.md`: plain text, cut into documents by `doc_unit`: "paragraph" (blank-line separated
  blocks, the default), "line" (each non-blank line) or "file" (the whole file).
- `.jsonl`: one JSON object per line; the string (or list of strings, joined by newlines) under `text_field`
  is one document.
  A dotted `text_field` that is not a key itself is a path into nested objects (`--text-field
  doc.body`); a list of objects on the way is walked item by item, each leaf (a string, or a list of
  strings joined by newlines) one document: `content.content.paragraphs` reads a book stored as
  {"content": [{"content": [{"paragraphs": [...]}, ...]}, ...]} one chapter per document (`jsonl.dotted_rows`).
- `.json`: a JSON array of documents (strings, or objects whose `text_field` holds a string or a list
  of strings, joined by newlines: one document per object), or one such object; a `.json` file that
  is really JSON Lines (one object per line) is read as JSONL. Read when named explicitly (or by a
  glob spelling out `.json`): folders often hold .json metadata, so a folder search skips them.
- `.csv`, `.tsv`: a header row, then one document per row: the column named `text_field`
  (RFC 4180 quoting, so a quoted field may hold newlines; in a .tsv a `"` that does not open a quoted
  field is text, as plain TSVs write it: `data/tsv.py`, shared with `finetune`'s task files).
- `.parquet` (needs pyarrow, `pip install 'lmforge[parquet]'`): the string column `text_field`.
- a file named without any extension (`corpus`, `corpus.gz`): JSON Lines if its first non-blank line is a JSON
  object (as `finetune --train` reads such a file), else text.
- text, JSONL, CSV and TSV may be compressed: `.gz` (standard library) or `.zst` (needs zstandard,
  `pip install 'lmforge[zstd]'`; opened by `data/compressed.py`).

Key design decisions:
- Deterministic order: every input is expanded, duplicates (same resolved file) dropped, and the
  files sorted by path, so the same inputs always give the same document stream.
- Files found inside folders or by a glob are read only if their format is known; others are
  skipped and reported (`skipped_files` in the manifest). Hidden files and folders (".git") are not
  searched; symbolic links to files and folders are followed (each folder walked once), and a link to
  nothing is an error. A file named explicitly - or by a glob that spells out its extension, like `logs/*.log` -
  is read as plain text whatever its extension, as long as it is text.
- A text file whose first 8 KiB look binary (NUL bytes, or mostly invalid UTF-8) stops the run with
  a one-line `DataError`: silently training on a PNG is worse than asking the user to remove it.
- Streaming: text is read line by line in binary mode (a b"\\n" or b"\\r" byte can never be inside a
  UTF-8 multi-byte character, so decoding per line gives the same result as decoding the whole file);
  only one document is held in memory at a time ("file" mode holds one file, unless `read_blocks` streams it).
  Parquet and Arrow files are read in record batches of 1,024 rows. A line longer than `max_line_bytes` (a 2 GB
  single-line file is a broken export, not a document) stops the run instead of filling memory.
- Line ends: in text and CSV/TSV files a line ends at b"\\n", b"\\r\\n" or a lone b"\\r" (old Mac OS
  files, which would otherwise be one giant line), as `bytes.splitlines` and Python's universal
  newlines cut them; a blank line of any of them ends a paragraph. Documents keep their line ends;
  cleaning (`clean.clean_text`) turns them all into "\\n", so the three spellings of a text give the
  same prepared data. `.jsonl` lines end at b"\\n" only: that is the JSON Lines spec, where a lone
  "\\r" is JSON whitespace.
- For `prepare --workers`, `read_blocks` cuts text and JSONL files (compressed or not) into ~4 MB
  byte blocks at document boundaries (after an empty or blank line; any line end for "line" and
  JSONL, never between the b"\\r" and b"\\n" of one) and `block_documents` parses one block in a
  worker with the same line parsers, so the documents are the same as `read_documents` gives (a test
  compares them at several block sizes). A block of valid UTF-8 in "paragraph" mode is split with one
  regex instead of line by line. Asked to (`long_bytes`, prepare's LONG_DOCUMENT_BYTES), it gives a text
  file's document that outgrows a block with no boundary in sight as a `LongDocument`, decoded chunks of ~1 MiB
  read as they are asked for (`_LongReader`), so a 200 MB one-line document is never held whole.
- JSONL and .json files are parsed by `jsonl.py` (the dotted `text_field` walk included), imported
  only when one is read, as `columnar.py` is.
- Parquet files, save_to_disk folders and hub datasets are read by `columnar.py`, with pyarrow alone
  but for hub names (which need `datasets`). A DatasetDict folder contributes all its splits; point at
  one split's subfolder to read only that.
- A UTF-8 byte-order mark at the start of a file is dropped.
- A row with no text (a JSON or Parquet null, an empty CSV/TSV cell, a JSON record without the field) is a
  `RawDocument` whose text is None, in every format alike: `prepare` skips and counts it (`no_text`). A field
  that no row of an input holds is a wrong `--text-field`, an error once the input is read (`no_text_error`).

Length (~1000 lines, over the 800-line guide): the whole-file readers and the block reader (`read_blocks`,
`_LongReader`, `block_documents`) share the line, encoding and long-line rules, and a document must come out the
same from both (tested); the next split would be the block reader (from `Block` to `block_documents`, ~280
lines) into a module of its own.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from lmforge.data.clean import (
    BINARY_SNIFF_BYTES,
    decode_utf8,
    legacy_encoding,
    looks_binary,
    replace_surrogates,
    utf16_encoding,
)
from lmforge.data.compressed import inner_name, open_input, read_errors
from lmforge.data.tsv import allow_long_fields, extra_fields_error, tsv_rows
from lmforge.errors import DataError

DocUnit = Literal["paragraph", "file", "line"]
Format = Literal["text", "json", "jsonl", "csv", "tsv", "parquet", "hf_disk", "hf_hub"]
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
TABLE_SUFFIXES = (".csv", ".tsv")
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES
# compressions and archives a corpus comes in that are not read, with the command that unpacks one
_UNREAD_COMPRESSION = {
    ".bz2": "bunzip2 -k", ".xz": "unxz -k", ".lz4": "unlz4", ".zip": "unzip", ".7z": "7z x", ".tar": "tar -xf",
    ".tgz": "tar -xzf",
}  # fmt: skip
HUB_PREFIX = "hf:"
DEFAULT_MAX_LINE_BYTES = 1 << 28  # 256 MiB
_GLOB_CHARS = set("*?[")
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


def skipped_json(names: list[str]) -> list[str]:
    """The .json files (maybe .gz/.zst) among the files a folder or glob walk skipped (`resolve_inputs`): read
    only when named, as they are usually metadata; `prepare` says so when it skipped some."""
    return [name for name in names if inner_name(Path(name)).endswith(".json")]


def unread_compressed(names: list[str]) -> list[str]:
    """The files among `names` (a walk's skipped files) compressed or archived in a way that is not read (.bz2, .xz,
    .zip, ...): `prepare` says to decompress them when nothing else was found."""
    return [name for name in names if Path(name).suffix.lower() in _UNREAD_COMPRESSION]


def column_hint(columns: list[str], text_field: str) -> str:
    """What to do about a `--text-field` that names no column: the column it differs from only in case or
    surrounding spaces (a hand-written 'id, text' header has ' text', an Excel one 'Text'; the listing of the
    columns hid the space), else to choose one."""
    wanted = text_field.strip().casefold()
    near = next((c for c in columns if c.strip().casefold() == wanted), None)
    if near is None:
        return "choose one with --text-field"
    return f"the column is spelled {near!r}: pass --text-field {shlex.quote(near)}"


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


def is_known_format(path: str | Path) -> bool:
    """True for .txt, .md, .jsonl, .csv, .tsv (each optionally .gz/.zst) and .parquet."""
    p = Path(path)
    return inner_name(p).endswith(KNOWN_SUFFIXES) or p.name.lower().endswith(".parquet")


def input_bytes(path: Path) -> int:
    """On-disk size of an input (a save_to_disk folder: its files; a hub name: 0)."""
    if is_hub(path):
        return 0
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _lmforge_output(folder: Path) -> bool:
    """A folder lmforge wrote: prepared data (manifest.json + tokenizer.json), a run (config.json +
    checkpoints/, metrics.jsonl or status.json: `runs.is_run_dir`) or a model export (config.json +
    model.safetensors). Found inside an input folder, its card.md, metrics.jsonl or config.json would
    otherwise be read as text."""
    from lmforge.runs import is_run_dir

    has = lambda name: (folder / name).exists()  # noqa: E731
    prepared = has("manifest.json") and has("tokenizer.json")
    return prepared or is_run_dir(folder) or (has("config.json") and has("model.safetensors"))


def _walk(folder: Path) -> Iterator[Path]:
    """Files under `folder`, sorted; hidden files and folders and lmforge's own outputs are left out.

    A `save_to_disk` dataset folder found inside is given whole, as a folder, not walked: its .arrow files
    are not read one by one, and walking it skipped them, so the dataset went missing from the corpus
    with only a note about its .json files. Symbolic links to folders are followed, as links to files are
    (os.walk's default skipped them silently, and with them a corpus assembled from links); a folder
    reached twice (a link loop, or two links to one folder) is walked once."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _lmforge_output(Path(root) / d))
        datasets = [d for d in dirs if is_hf_disk(Path(root) / d)]
        dirs[:] = [d for d in dirs if d not in datasets]
        yield from (Path(root) / d for d in datasets)
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def _under_out(path: Path, out: Path) -> bool:
    """`path` is inside `out` or inside one of lmforge's hidden build/backup siblings of it
    (`.<out>.lmforge-tmp-*`, `.<out>.lmforge-old-*`, see lmforge/atomic.py)."""
    if out == path or out in path.parents:
        return True
    prefix = f".{out.name}.lmforge-"
    return any(parent.parent == out.parent and parent.name.startswith(prefix) for parent in path.parents)


def resolve_inputs(inputs: list[str], out: Path | None = None) -> tuple[list[Path], list[str]]:
    """Expand files, folders and globs into the inputs to read.

    Args:
        inputs: paths, glob patterns and `hf:` hub names as the user typed them.
        out: the output folder being written, when it may sit inside an input folder: what a folder
            or glob finds under it (the last run's card.md, its shards) or under its hidden build
            and backup siblings is not input, or a re-run would read its own output back.

    Returns:
        (inputs to read, sorted by path; skipped files of unknown format found in folders/globs).

    Raises:
        DataError: a path does not exist, a pattern matches nothing, or a folder holds no readable file.
    """
    chosen: dict[Path, Path] = {}  # resolved -> as given
    skipped: dict[Path, Path] = {}

    exclude = out.resolve() if out is not None else None

    def take(path: Path, explicit: bool) -> None:
        key = path if is_hub(path) else path.resolve()
        if exclude is not None and not is_hub(path) and _under_out(key, exclude):
            return
        if explicit or is_known_format(path) or is_hf_disk(path):
            if not is_hub(path) and not path.exists():  # found by a folder walk or glob: a dangling link
                raise DataError(
                    f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; fix or remove the link"
                )
            if not is_hub(path) and not path.is_file() and not path.is_dir():  # opening a FIFO waits for a writer
                raise DataError(
                    f"{path} is a pipe or device, not a file: prepare reads each input more than once; save the "
                    "text to a file first (.gz and .zst files are read as they are)"
                )
            chosen.setdefault(key, path)
        else:
            skipped.setdefault(key, path)

    for raw in inputs:
        path = Path(raw)
        if is_hub(raw):
            if len(raw) == len(HUB_PREFIX):
                raise DataError("hub input 'hf:' needs a dataset name, like hf:roneneldan/TinyStories")
            take(Path(raw), explicit=True)
            continue
        if not path.exists() and _GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                raise DataError(f"input pattern {raw!r} matches no files; check the pattern (quote it for the shell)")
            datasets = {match for match in map(Path, matches) if is_hf_disk(match)}
            for match in map(Path, matches):
                if datasets & set(match.parents):  # `corpus/**` also lists a dataset's own files: it is read whole
                    continue
                if is_hf_disk(match):
                    take(match, explicit=True)
                elif match.is_dir():
                    for file in _walk(match):
                        take(file, explicit=False)
                elif match.is_file() or match.is_symlink():  # (a dangling link: refused in take)
                    # `logs/*.log` names the extension, so the user means these files
                    take(match, explicit=raw.lower().endswith(match.suffix.lower()) and bool(match.suffix))
            continue
        if raw == "-" and not path.exists():  # (a file named '-' is read, as any other)
            raise DataError(
                "input '-': prepare reads files, not stdin (it reads each input more than once); save the text to "
                "a file first and pass its path"
            )
        if not path.exists():
            raise DataError(f"input {raw!r} does not exist; check the path")
        if is_hf_disk(path):
            take(path, explicit=True)
        elif path.is_dir() and _lmforge_output(path):  # its card.md / config.json are no corpus
            if (path / "manifest.json").exists():
                raise DataError(
                    f"input {raw!r} is a prepared data folder, not text: combine prepared folders with "
                    f"'lmforge prepare PART... --merge --out DIR', or pass the text it was prepared from"
                )
            raise DataError(f"input {raw!r} is an lmforge run or model export, not text; pass text files or folders")
        elif path.is_dir():
            before = len(chosen)
            for file in _walk(path):
                take(file, explicit=False)
            if len(chosen) == before and not any(_walk(path)):
                raise DataError(
                    f"input folder {raw!r} is empty; pass a folder with .txt, .md, .jsonl, .csv, .tsv or .parquet files"
                )
        else:
            take(path, explicit=True)
    files = sorted(chosen.values(), key=str)
    skipped_names = sorted(str(p) for key, p in skipped.items() if key not in chosen)
    return files, skipped_names


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
        unpack = _UNREAD_COMPRESSION.get(path.suffix.lower())
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


def _lines(stream: BinaryIO, path: Path, max_line_bytes: int, first_lineno: int = 1) -> Iterator[bytes]:
    """JSON Lines of `stream` (with their b"\\n"), refusing any line longer than `max_line_bytes`."""
    lineno = first_lineno - 1
    while True:
        line = stream.readline(max_line_bytes + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_line_bytes:
            raise _long_line(path, lineno, max_line_bytes)
        yield line


def _text_lines(stream: BinaryIO, path: Path, max_line_bytes: int, first_lineno: int = 1) -> Iterator[bytes]:
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
                        raise _long_line(path, lineno + 1, max_line_bytes)
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
                raise _long_line(path, lineno, max_line_bytes)
            yield line
        if not piece:
            return


def _long_line(path: Path, lineno: int, max_line_bytes: int) -> DataError:
    return DataError(
        f"{path}:{lineno}: a line longer than {max_line_bytes:,} bytes; split the file into documents "
        "(one per line or paragraph) or raise --max-line-bytes"
    )


# --------------------------------------------------------------------------------------------
# reading


def read_documents(
    path: str | Path,
    *,
    doc_unit: DocUnit = "paragraph",
    text_field: str = "text",
    on_bytes: Callable[[int], None] | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[RawDocument]:
    """Yield the raw documents of one input.

    Args:
        path: a text, JSONL, CSV/TSV (each optionally .gz/.zst) or Parquet file, a save_to_disk
            folder, or a `hf:` hub name.
        doc_unit: how plain-text files are cut into documents.
        text_field: JSONL key / CSV, TSV, Parquet or dataset column holding the text.
        on_bytes: called with the number of (on-disk) bytes consumed since the last call, for progress.
        max_line_bytes: longest line (and longest "file"-mode document) accepted, in bytes.

    Raises:
        DataError: binary file, corrupt compression, a missing column/field, an over-long line, or a
            missing optional package (with the pip command that installs it).
    """
    path = Path(path) if not isinstance(path, Path) else path
    missing: str | None = None  # the first row's `RawDocument.missing`, while no row has had the field
    for doc in _read_documents(path, doc_unit, text_field, on_bytes, max_line_bytes):
        if doc.missing is None:
            missing = ""
        elif missing is None:
            missing = doc.missing
        yield doc
    if missing:
        raise no_text_error(missing)


def _read_documents(
    path: Path, doc_unit: DocUnit, text_field: str, on_bytes: Callable[[int], None] | None, max_line_bytes: int
) -> Iterator[RawDocument]:
    fmt = file_format(path)
    if fmt == "hf_hub":
        from lmforge.data.columnar import hub_documents

        yield from hub_documents(str(path), text_field)
        return
    if fmt in ("parquet", "hf_disk"):
        from lmforge.data.columnar import arrow_documents

        yield from arrow_documents(path, fmt, text_field)
        if on_bytes is not None:
            on_bytes(input_bytes(path))
        return
    check_not_binary(path)
    raw, stream = open_input(path)
    reported = 0

    def progress() -> None:
        nonlocal reported
        if on_bytes is not None:
            position = raw.tell()
            on_bytes(position - reported)
            reported = position

    try:
        if fmt == "jsonl":
            from lmforge.data.jsonl import jsonl_documents

            yield from jsonl_documents(path, _lines(stream, path, max_line_bytes), text_field, progress)
        elif fmt == "json":
            from lmforge.data.jsonl import json_documents

            yield from json_documents(path, stream, text_field, max_line_bytes)
        elif fmt in ("csv", "tsv"):
            lines = _text_lines(stream, path, max_line_bytes)
            yield from _table_documents(path, lines, "," if fmt == "csv" else "\t", text_field, progress)
        elif doc_unit == "file":
            data = read_whole(stream, path, max_line_bytes, _TOO_BIG_FILE)
            yield _file_document(data)
        else:
            yield from _text_documents(_text_lines(stream, path, max_line_bytes), doc_unit, progress)
        progress()
    except read_errors() as e:
        raise DataError(f"{path}: read failed ({e}); re-create the file or remove it from the inputs") from None
    finally:
        stream.close()
        raw.close()


# --------------------------------------------------------------------------------------------
# reading in blocks: the main process cuts a file into byte blocks at document boundaries, and
# `block_documents` (in a worker) parses one block exactly as `read_documents` parses the whole file


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
    """The line ends in whole lines `data` ("\\r\\n" counts once), as `_lines` / `_text_lines` count them."""
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
                raise _too_big_file(path, max_line_bytes)
            elif len(pending) - (end := _line_end(pending, jsonl)) > max_line_bytes:
                raise _long_line(path, lineno + _count_lines(pending[:end], jsonl), max_line_bytes)
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

    The document is what `_text_documents` would make of the lines that follow: in "line" mode the next non-blank
    line, in "paragraph" mode the lines up to a blank one (whitespace only, as decoded: `str.strip`); in "file"
    mode every line to the end of the file (`_file_document`), blank ones too, and at most `max_line_bytes` in all.
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
                raise _too_big_file(self.path, self.max_line_bytes)
            end = _first_line_end(pending, self.eof) or (len(pending) if self.eof else 0)
            if (not end or end > _CHUNK_BYTES) and len(pending) > _CHUNK_BYTES and (cut := _safe_cut(pending)):
                text, bad = self._decode(bytes(pending[:cut]), line_bytes == 0)
                if not line_blank or text.strip():  # (a blank line's parts would be given before it shows blank)
                    line_bytes += cut
                    if line_bytes > self.max_line_bytes:
                        raise _long_line(self.path, self.lineno, self.max_line_bytes)
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
                    raise _long_line(self.path, self.lineno, self.max_line_bytes)
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
                raise _long_line(self.path, self.lineno, self.max_line_bytes)
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

    Same result as `_text_documents`: a line whose decoded text is only whitespace (`str.isspace`,
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
    lines = (_lines if jsonl else _text_lines)(io.BytesIO(block.data), path, max_line_bytes, block.first_lineno)
    if jsonl:
        from lmforge.data.jsonl import jsonl_documents

        yield from jsonl_documents(path, lines, text_field, no_progress, block.first_lineno)
        return
    if doc_unit == "file":  # (the whole file: `read_blocks` never cuts one)
        yield _file_document(block.data)
        return
    if doc_unit == "paragraph" and len(block.data) <= max_line_bytes:  # no line can be too long
        paragraphs = _fast_paragraphs(block.data, block.file_start)
        if paragraphs is not None:
            for paragraph in paragraphs:
                yield RawDocument(paragraph, 0)
            return
    yield from _text_documents(lines, doc_unit, no_progress, file_start=block.file_start)


def no_progress() -> None:
    pass


def _text_documents(
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


_TOO_BIG_FILE = "too big for one document; use --doc-unit paragraph or line"


def _too_big_file(path: Path, max_bytes: int) -> DataError:
    """A "file"-unit document over --max-line-bytes, in `read_whole`'s words."""
    return DataError(f"{path}: longer than {max_bytes:,} bytes, {_TOO_BIG_FILE}, or raise --max-line-bytes")


def _file_document(data: bytes) -> RawDocument:
    """The one document of a whole text file (--doc-unit file)."""
    text, bad = decode_utf8(data)
    return RawDocument(text.removeprefix("\ufeff"), bad)


def read_whole(stream: BinaryIO, path: Path, max_bytes: int, too_big: str) -> bytes:
    """All of `stream`, refused (one line: `too_big`, then --max-line-bytes) when over `max_bytes`."""
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"{path}: longer than {max_bytes:,} bytes, {too_big}, or raise --max-line-bytes")
    return data


def _table_documents(
    path: Path, lines: Iterator[bytes], delimiter: str, text_field: str, progress: Callable[[], None]
) -> Iterator[RawDocument]:
    """Rows of a CSV/TSV file; the header names the columns."""
    bad_pending = 0

    def decoded() -> Iterator[str]:
        nonlocal bad_pending
        for lineno, line_bytes in enumerate(lines):
            if lineno % PROGRESS_EVERY == PROGRESS_EVERY - 1:
                progress()
            line, bad = decode_utf8(line_bytes)
            bad_pending += bad
            yield line.removeprefix("\ufeff") if lineno == 0 else line

    allow_long_fields()  # (the line limit already bounds a row)
    # (line number, fields) of each row: a TSV's from data/tsv.py (the line it starts on; quotes read as
    # `finetune` reads them, never a csv.Error), a CSV's from `csv` (the line it ends on)
    if delimiter == "\t":
        rows = tsv_rows(decoded())
    else:
        reader = csv.reader(decoded(), delimiter=delimiter, strict=True)  # strict: an unclosed quote is an error
        rows = ((reader.line_num, row) for row in reader)
    row_start = 1  # the line the row being read began on (an unclosed quote reads to the end of the file)
    try:
        header_end, header = next(rows, (0, None))
        if header is None:
            return
        if text_field not in header:
            columns = ", ".join(header[:20]) or "none"
            hint = "choose one with --text-field"
            other = next((c for c in ";|\t," if len(header) == 1 and c != delimiter and c in header[0]), None)
            # a semicolon CSV (Excel's in much of Europe) is one column, and --text-field 'id;text' read rows whole
            if other:
                hint = (
                    f"the file looks {other!r}-separated, but .csv files are read comma-separated and .tsv files "
                    "tab-separated; save it with commas as .csv or with tabs as .tsv"
                )
            else:
                hint = column_hint(header, text_field)
            raise DataError(f"{path}: no column '{text_field}' (columns: {columns}); {hint}")
        column = header.index(text_field)
        row_start = header_end + 1
        for lineno, row in rows:
            if row:  # (a blank line is no row)
                # more fields than the header: a delimiter in an unquoted field ('1,hello, world' kept 'hello'
                # and dropped the rest without a word); empty extras (a trailing delimiter) lose no text
                if column >= len(row) or any(row[len(header) :]):
                    raise extra_fields_error(path, lineno, len(row), len(header))
                if row[column]:
                    text, surrogates = replace_surrogates(row[column])
                    yield RawDocument(text, bad_pending + surrogates, surrogates=surrogates)
                else:  # an empty cell is the table's null: no text, skipped and counted as a null is
                    yield RawDocument(None, bad_pending)
                bad_pending = 0
            row_start = lineno + 1
    except csv.Error as e:  # (a CSV's)
        if "unexpected end of data" in str(e):
            raise DataError(
                f"{path}:{row_start}: a quote opened in this row is never closed, so the rest of the file would be "
                f'one field; close it (a literal quote inside a quoted field is written "")'
            ) from None
        if "expected after" in str(e):  # strict: text after the closing quote of a quoted field
            raise DataError(
                f"{path}:{reader.line_num}: not valid CSV ({e}): a field that starts with a quote is a quoted "
                f'field, which must end at its closing quote; quote the whole field and write the quotes in it as ""'
            ) from None
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e}); fix the row") from None
