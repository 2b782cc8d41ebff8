"""The rows of a .tsv file, read the one way `prepare` (data/ingest.py) and task files (data/tables.py) share.

Two kinds of TSV look alike and both are common:
- written by a CSV library (pandas `to_csv(sep="\\t")`, Python's `csv`): a field holding a tab, a line end
  or a `"` is quoted, with its quotes doubled (`"he said ""hi"" twice"`), so a row may span lines;
- plain TSV (GLUE, Tatoeba, UCI sentences, `paste` output): a field is the text between two tabs, and `"`
  is an ordinary character, also at the start of a field (`"Look," she said.`, `"unclosed start`).

Python's `csv` reads one kind or the other (`QUOTE_MINIMAL` or `QUOTE_NONE`), so the two readers used to
differ: `finetune` kept a pandas TSV's quotes and split its quoted tabs and newlines into other rows and
columns, while `prepare` refused a plain TSV whose sentence started with a quote. Here a field that starts
with `"` is read as quoted only when it is one: its closing quote (a lone `"`; `""` is a quote inside) comes
before a tab or the row's end, line ends inside it included. Otherwise it is read as written, up to the next
tab on its own line. A row whose first line, read as written, has the header's number of fields is read as
written when its quoted reading has another number, or spans lines that each, read as written, are a whole
row too: a stray quote opening one row and one closing a later row would otherwise merge the rows between
them. A plain field that is exactly `"text"` reads as `text`, as every CSV reader reads it (R's
`write.table` quotes every field): one Tatoeba cmn-eng pair in 29,155 is written so.

A quote that opens no quoted field is followed only up to the next `"` in the file, and for at most
`MAX_QUOTED_CHARS` (Python's `csv` stops at 128 kB a field), so reading stays linear in the file and a stray
quote in a multi-gigabyte plain TSV holds no more than that in memory.

Both readers' CSV and TSV rows also share two rules kept here: a field may be longer than Python `csv`'s own
128 KiB limit (`allow_long_fields`), and a row with more fields than its header is one error
(`extra_fields_error`).
"""

from __future__ import annotations

import csv
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from lmforge.errors import DataError

Line = tuple[int, str]  # (line number, the line with its line end)
MAX_QUOTED_CHARS = 1 << 20  # a "quoted field" longer than this is a stray quote in a plain TSV


def allow_long_fields() -> None:
    """Lift the `csv` module's 128 KiB field limit, which refused a long document as "not valid CSV"."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def extra_fields_error(path: str | Path, line: int, n_fields: int, n_header: int) -> DataError:
    """The error of a row with more (non-empty) fields than its header: a delimiter in an unquoted field, which
    would shift or drop text."""
    return DataError(
        f"{path}:{line}: row has {n_fields} fields but the header has {n_header}; fix the row or quote fields "
        "that contain the delimiter"
    )


def tsv_rows(lines: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """(the line a row starts on, its fields) for each row of a TSV file, the header first.

    Args:
        lines: the file's lines with their line ends ("\\n", "\\r\\n" or a lone "\\r"), as
            `io.StringIO(text, newline="")` or a binary file's `splitlines(keepends=True)` give them.
            An empty line is no row.
    """
    source = enumerate(lines, 1)
    pending: deque[Line] = deque()  # lines a quoted reading looked ahead at, then gave back

    def next_line() -> Line | None:
        return pending.popleft() if pending else next(source, None)

    width: int | None = None  # the header's number of fields
    while (item := next_line()) is not None:
        lineno, line = item
        body = _without_end(line)
        if not body:
            continue
        fields, taken = _quoted_row(line, next_line) if body.startswith('"') or '\t"' in body else (None, [])
        literal = body.split("\t")
        if fields is None or (width is not None and len(literal) == width and _written_rows(fields, taken, width)):
            pending.extendleft(reversed(taken))
            fields = literal
        width = len(fields) if width is None else width
        yield lineno, fields


def _written_rows(fields: list[str], taken: list[Line], width: int) -> bool:
    """Whether a quoted reading is better read as written, given that its first line read as written has the
    header's number of fields: it has another number, or it spans lines that each read as a whole row
    (a plain TSV's `"unclosed start` and a later `ends with a quote."`, which it would merge with the rows
    between them). In a one-column file every line is a whole row, so that says nothing there: its quoted
    reading is kept, as pandas and Python's `csv` read it (pandas' `df[["text"]].to_csv(sep="\t")` quotes each
    multi-line document, and each of its lines was a document of its own)."""
    if len(fields) != width:
        return True
    return width > 1 and bool(taken) and all(len(_without_end(t).split("\t")) == width for _, t in taken)


def _without_end(line: str) -> str:
    return line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith(("\n", "\r")) else line


def _quoted_row(line: str, next_line: Callable[[], Line | None]) -> tuple[list[str] | None, list[Line]]:
    """The row starting at `line`, reading fields that start with `"` as quoted; None when one is not a
    quoted field. Also the further lines it read (a quoted field may hold line ends)."""
    fields: list[str] = []
    taken: list[Line] = []
    i = 0
    while True:
        if not line.startswith('"', i):  # a plain field: up to the next tab or the line's end
            tab = line.find("\t", i)
            if tab < 0:
                fields.append(_without_end(line[i:]))
                return fields, taken
            fields.append(line[i:tab])
            i = tab + 1
            continue
        parts, i, size = [], i + 1, 0
        while True:
            quote = line.find('"', i)
            if quote < 0:  # the field goes on: its line end is text
                parts.append(line[i:])
                size += len(line) - i
                item = next_line() if size <= MAX_QUOTED_CHARS else None
                if item is None:  # never closed (or not within a field's size)
                    return None, taken
                taken.append(item)
                line, i = item[1], 0
                continue
            parts.append(line[i:quote])
            if line.startswith('"', quote + 1):  # "" is a quote inside the field
                parts.append('"')
                i = quote + 2
                continue
            i = quote + 1
            break
        fields.append("".join(parts))
        if line.startswith("\t", i):
            i += 1
        elif _without_end(line[i:]):  # text after the closing quote: the field was not quoted
            return None, taken
        else:
            return fields, taken
