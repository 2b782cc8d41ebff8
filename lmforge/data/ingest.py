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
- A text file whose first 8 KiB look binary stops the run with a one-line `DataError` (`ingest_text`).
- Streaming: text is read line by line in binary mode (a b"\\n" or b"\\r" byte can never be inside a
  UTF-8 multi-byte character, so decoding per line gives the same result as decoding the whole file);
  only one document is held in memory at a time ("file" mode holds one file, unless `read_blocks` streams it).
  Parquet and Arrow files are read in record batches of 1,024 rows. A line longer than `max_line_bytes` (a 2 GB
  single-line file is a broken export, not a document) stops the run instead of filling memory.
- Line ends: b"\\n", b"\\r\\n" or a lone b"\\r" in text and CSV/TSV files, b"\\n" only in `.jsonl` (`ingest_text`).
- For `prepare --workers`, `read_blocks` cuts text and JSONL files into ~4 MB byte blocks at document
  boundaries and `block_documents` parses one block in a worker with the same line parsers, so the documents
  are the same as `read_documents` gives (`ingest_blocks`, tested at several block sizes).
- JSONL and .json files are parsed by `jsonl.py` (the dotted `text_field` walk included), imported
  only when one is read, as `columnar.py` is.
- Parquet files, save_to_disk folders and hub datasets are read by `columnar.py`, with pyarrow alone
  but for hub names (which need `datasets`). A DatasetDict folder contributes all its splits; point at
  one split's subfolder to read only that.
- A row with no text (a JSON or Parquet null, an empty CSV/TSV cell, a JSON record without the field) is a
  `RawDocument` whose text is None, in every format alike: `prepare` skips and counts it (`no_text`). A field
  that no row of an input holds is a wrong `--text-field`, an error once the input is read (`no_text_error`).

Where things are: this module walks the inputs (`resolve_inputs`) and reads one whole (`read_documents`, and the
CSV/TSV rows); `ingest_text` holds what both readers share (format by name, binary and encoding checks, lines,
documents of plain text, `RawDocument`); `ingest_blocks` the block reader. Their public names are re-exported
here, the one import for reading inputs.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from lmforge.data.clean import decode_utf8, replace_surrogates
from lmforge.data.compressed import inner_name, open_input, read_errors
from lmforge.data.ingest_blocks import (  # noqa: F401 (re-exported: ingest is the package's entry for reading)
    BLOCK_BYTES,
    LONG_DOCUMENT_BYTES,
    Block,
    LongDocument,
    block_documents,
    read_blocks,
    reads_in_blocks,
)
from lmforge.data.ingest_text import (  # noqa: F401 (re-exported, as above)
    DEFAULT_MAX_LINE_BYTES,
    HUB_PREFIX,
    PROGRESS_EVERY,
    TOO_BIG_FILE,
    UNREAD_COMPRESSION,
    DocUnit,
    Format,
    RawDocument,
    check_head_not_binary,
    check_not_binary,
    column_hint,
    column_index,
    file_document,
    file_format,
    first_line_is_json_object,
    is_hf_disk,
    is_hub,
    jsonl_lines,
    no_progress,
    no_text_error,
    read_whole,
    text_documents,
    text_lines,
    writable_text,
)
from lmforge.data.tsv import allow_long_fields, extra_fields_error, tsv_rows
from lmforge.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
TABLE_SUFFIXES = (".csv", ".tsv")
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES
_GLOB_CHARS = set("*?[")


def skipped_json(names: list[str]) -> list[str]:
    """The .json files (maybe .gz/.zst) among the files a folder or glob walk skipped (`resolve_inputs`): read
    only when named, as they are usually metadata; `prepare` says so when it skipped some."""
    return [name for name in names if inner_name(Path(name)).endswith(".json")]


def unread_compressed(names: list[str]) -> list[str]:
    """The files among `names` (a walk's skipped files) compressed or archived in a way that is not read (.bz2, .xz,
    .zip, ...): `prepare` says to decompress them when nothing else was found."""
    return [name for name in names if Path(name).suffix.lower() in UNREAD_COMPRESSION]


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
    (`.<out>.lmforge-tmp-*`, `.<out>.lmforge-old-*`, see lmforge/atomic.py). Both are resolved, so comparing
    their text is exact: walking `path.parents` as Path objects made resolving 100,000 files (with `--out` given, as
    `prepare` gives it) take 16 CPU s, 7 s now."""
    text, root = str(path), str(out)
    if text == root or text.startswith(os.path.join(root, "")):
        return True
    return text.startswith(os.path.join(str(out.parent), f".{out.name}.lmforge-"))


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
                hidden = sorted(p.name for p in path.iterdir() if p.name.startswith("."))
                if hidden:  # (it said "is empty" of a folder of .txt files under a hidden folder)
                    raise DataError(
                        f"input folder {raw!r} holds only hidden files or folders ({', '.join(hidden[:3])}), and a "
                        f"folder search skips names that start with '.'; name them as inputs, e.g. '{path / hidden[0]}'"
                    )
                raise DataError(
                    f"input folder {raw!r} is empty; pass a folder with .txt, .md, .jsonl, .csv, .tsv or .parquet files"
                )
        else:
            take(path, explicit=True)
    files = sorted(chosen.values(), key=str)
    skipped_names = sorted(str(p) for key, p in skipped.items() if key not in chosen)
    return files, skipped_names


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

            yield from jsonl_documents(path, jsonl_lines(stream, path, max_line_bytes), text_field, progress)
        elif fmt == "json":
            from lmforge.data.jsonl import json_documents

            yield from json_documents(path, stream, text_field, max_line_bytes)
        elif fmt in ("csv", "tsv"):
            lines = text_lines(stream, path, max_line_bytes)
            yield from _table_documents(path, lines, "," if fmt == "csv" else "\t", text_field, progress)
        elif doc_unit == "file":
            data = read_whole(stream, path, max_line_bytes, TOO_BIG_FILE)
            yield file_document(data)
        else:
            yield from text_documents(text_lines(stream, path, max_line_bytes), doc_unit, progress)
        progress()
    except read_errors() as e:
        raise DataError(f"{path}: read failed ({e}); re-create the file or remove it from the inputs") from None
    finally:
        stream.close()
        raw.close()


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
        column = column_index(path, header, text_field)
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
