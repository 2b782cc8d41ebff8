"""Task data files → rows (dicts): reading JSONL/JSON/CSV/TSV/Parquet/TXT tables, field names, column checks.

- `read_table(path)`: `.jsonl` / `.json` (a list of objects) / `.jsonl.gz` or `.zst`, `.csv` and `.tsv` with a
  header row (a .tsv's quotes read as `prepare` reads them, `data/tsv.py`), and headerless `.txt`
  (`a<TAB>b` per line, columns named after the task's fields, the layout of Tatoeba pair files and
  the UCI sentiment sentences). A file named without one of those extensions (a pipe, `<(zcat x.jsonl.gz)`) is
  read by its content (`_sniff_kind`), and every file is read once: a pipe gives its bytes only once. For
  `--task clm`, plain text is documents cut at blank lines, as `prepare` cuts it (`_text_documents`), not
  tab-separated rows; which files are text is prepare's rule too: .txt, .md or any other extension whatever the
  file starts with, and a file or pipe named without one unless its first non-blank line is a JSON object.
- `TASK_FIELDS`: the default column names per task; `--field label=sentiment` renames one.
- `read_task_rows` / `read_rows_or_standard`: a task's rows, their columns checked (`check_columns`) with a
  one-line error naming the rename flag; rows become examples in `data/formats.py`.

Split out of `formats` (size guide): reading files here, examples and batches there.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

from lmforge.data.clean import MAX_INVALID_UTF8, check_encoding, decode_utf8, json_line
from lmforge.data.compressed import inner_name, open_input, read_errors, read_raw
from lmforge.data.formats import label_name, scalar_text
from lmforge.data.ingest_text import unique_columns
from lmforge.data.tsv import allow_long_fields, extra_fields_error, tsv_rows  # (read as `prepare` reads them)
from lmforge.errors import DataError

TASKS = ("classify", "sft", "translate", "qa", "dpo", "clm")

# The columns each task reads, in the order a headerless .txt file lists them.
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "classify": ("text", "label"),
    "sft": ("instruction", "input", "output", "messages"),
    "translate": ("source", "target"),
    "qa": ("question", "answer", "context"),
    "dpo": ("prompt", "chosen", "rejected"),
    "clm": ("text",),
}


def field_map(task: str, renames: list[str] | dict[str, str] | None) -> dict[str, str]:
    """Default field names of `task`, with `NAME=COLUMN` renames applied."""
    if task not in TASK_FIELDS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    fields = {name: name for name in TASK_FIELDS[task]}
    items = renames.items() if isinstance(renames, dict) else [r.split("=", 1) for r in renames or []]
    for item in items:
        if len(item) != 2 or not item[0] or not item[1]:
            raise DataError(f"--field {'='.join(item)!r} should look like NAME=COLUMN, e.g. --field text=sentence")
        name, column = item
        if name not in fields:
            raise DataError(f"task {task} has no field {name!r}; its fields are {', '.join(fields)}")
        fields[name] = column
    return fields


_LINE_END = re.compile(r"\r\n|\r|\n")
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")  # (text read with universal newlines)


def read_table(
    path: str | Path, *, txt_columns: tuple[str, ...] = (), text_column: str | None = None
) -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / CSV / TSV / Parquet / headerless TXT file as dicts (one-line `DataError` on
    problems). `text_column` (`--task clm`): plain text (a .txt, .md or other file, optionally .gz or .zst, whose
    name says no table format, or one named without an extension, such as a pipe, whose first non-blank line is not
    a JSON object) is documents, one row each under that column (`_text_documents`), not tab-separated lines."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a directory; pass one .jsonl, .json, .csv, .tsv, .parquet or .txt file")
    if not p.exists():  # (a pipe such as <(cmd) exists without being a regular file, and reads fine)
        raise DataError(f"data file {p} not found; pass a .jsonl, .json, .csv, .tsv, .parquet or .txt file")
    name = inner_name(p)  # (Book.JSONL.gz, data.csv.zst: book.jsonl, data.csv)
    if name.endswith(".parquet"):  # e.g. a Hugging Face dataset's data files
        from lmforge.data.columnar import parquet_rows

        rows = parquet_rows(p)
        if not rows:
            raise DataError(f"{p} holds no rows; check the file")
        return rows
    kind = next((k for k in ("jsonl", "json", "csv", "tsv", "txt") if name.endswith("." + k)), None)
    try:  # read once: a pipe (<(zcat data.jsonl.gz), named /dev/fd/63) cannot be read a second time
        if p.name.lower().endswith(".zst"):  # (as `prepare` reads it: zstandard, and an error when cut short)
            f, stream = open_input(p)
            with f:
                raw = stream.read()
        else:
            raw = read_raw(p)
            if p.name.lower().endswith(".gz") or (kind is None and raw.startswith(_GZIP_MAGIC)):
                raw = gzip.decompress(raw)
    except read_errors() as e:  # (a damaged .gz read as "convert it to UTF-8")
        raise DataError(f"cannot read {p} ({e}); check the file, or re-create it if it is damaged") from None
    sniffed = kind is None
    if sniffed:
        kind = _sniff_kind(raw)
    if sniffed and text_column is not None and kind != "txt":
        from lmforge.data.ingest import first_line_is_json_object

        # `--task clm` reads a file as `prepare` does (`ingest.file_format`): JSON Lines only when named without
        # an extension and its first non-blank line is a JSON object; else text (`{curly} text`, a `log.txt2`)
        if "." in name or not first_line_is_json_object(io.BytesIO(raw)):
            kind = "txt"
    if text_column is not None and (kind == "txt" or name.endswith(".md")):
        return _text_documents(p, raw, text_column)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # GBK, Big5, UTF-16...: say which and how to convert it
        from lmforge.data.clean import BINARY_SNIFF_BYTES
        from lmforge.data.ingest import check_head_not_binary

        # (names the encoding where the start of the file is mostly in it)
        check_head_not_binary(p, raw[:BINARY_SNIFF_BYTES])
        # mostly ASCII (a GBK .jsonl of Alpaca's English and Chinese fields): not flagged above, but still not UTF-8
        raise DataError(
            f"{p} is not UTF-8 (byte {e.start}: {e.reason}); convert it first with iconv -f ENCODING -t UTF-8 "
            "(GB18030 for simplified Chinese, BIG5 for traditional, CP1252 for Western European text)"
        ) from None
    if "\x00" in text:  # UTF-16 or binary data (as prepare refuses it), or a NUL byte further in
        from lmforge.data.clean import BINARY_SNIFF_BYTES
        from lmforge.data.ingest import check_head_not_binary

        check_head_not_binary(p, raw[:BINARY_SNIFF_BYTES])
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataError(f"{p}:{line}: holds a NUL byte, which text never has; remove it or re-export the file")
    if kind in ("jsonl", "json"):
        rows = _read_json(text, p, lines=kind == "jsonl")
    elif kind == "tsv":
        # newline="": rows end at "\n", "\r\n" or a lone "\r" (old Mac OS), as `prepare` reads them
        table = tsv_rows(io.StringIO(text, newline=""))
        header = unique_columns(p, next(table, (0, []))[1])
        rows = [_no_extra_fields(_named(header, fields), p, line, len(header)) for line, fields in table]
    elif kind == "csv":
        # newline="": rows end at "\n", "\r\n" or a lone "\r" (old Mac OS), as csv wants them and as
        # `prepare` reads CSV/TSV; a line end inside a quoted field stays as written
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        allow_long_fields()  # as in `prepare`
        unique_columns(p, reader.fieldnames or [])  # (DictReader lets the last of two same-named columns win)
        rows, start = [], 2  # start: the line the row being read began on
        try:
            for row in reader:
                rows.append(_no_extra_fields(row, p, start, len(reader.fieldnames or ())))
                start = reader.line_num + 1
        except csv.Error as e:  # strict: an unclosed quote would otherwise swallow the rest of the file
            raise DataError(
                f"{p}:{start}: not valid CSV ({e}); a quote opened in a field must be closed (a literal quote "
                'inside a quoted field is written "")'
            ) from None
    else:  # .txt, or text that is not JSON in a file named without an extension
        if not txt_columns:
            raise DataError(
                f"{p}: not JSON, and its name has no extension that says its format; save it as .csv, .tsv or .txt"
                if sniffed
                else f"{p}: a headerless .txt file needs a task to name its columns"
            )
        rows = []
        # lines end at "\n", "\r\n" or a lone "\r", as in `prepare`; not splitlines(): U+2028, U+0085
        # etc. are text inside a row
        for line in _LINE_END.split(text):
            if line.strip():
                # split from the right: UCI's imdb file has stray quotes and tabs inside sentences
                parts = line.rsplit("\t", len(txt_columns) - 1) if txt_columns[-1] == "label" else line.split("\t")
                rows.append(dict(zip(txt_columns, parts, strict=False)))  # extra columns: ignored
    if not rows:
        raise DataError(f"{p} holds no rows; check the file")
    return rows


_GZIP_MAGIC = b"\x1f\x8b"
_JSON_START = re.compile(rb"(?:\xef\xbb\xbf)?\s*([\[{])")  # (after a BOM and ASCII whitespace)


def _sniff_kind(raw: bytes) -> str:
    """The format of a file whose name does not say it (a pipe such as <(zcat data.jsonl.gz) is /dev/fd/63): JSON
    Lines if it starts with `{` (a JSON object, such as a SQuAD file, when its first line alone is not one), a JSON
    list if with `[`, else text, as a .txt file: headerless tab-separated rows, or for `--task clm` documents. (A CSV
    or TSV header row could not be told from a first row, so tables are read by extension only.) Sniffed on the
    bytes: plain text in a legacy encoding is still text for clm, read as `prepare` reads it."""
    start = _JSON_START.match(raw)
    if not start:
        return "txt"
    if start[1] == b"[":
        return "json"
    end = raw.find(b"\n", start.start(1))
    try:
        json.loads(raw[start.start(1) : end if end >= 0 else None])
    except ValueError:  # (not JSON, or not UTF-8: then said when the file is decoded)
        return "json"
    return "jsonl"


def _text_documents(p: Path, raw: bytes, column: str) -> list[dict[str, Any]]:
    """Plain text for `--task clm`, cut into documents at lines of only whitespace (as `prepare --doc-unit
    paragraph`), one row each under `column`; a pipe or a file named `corpus` reads as the same text in a .txt."""
    from lmforge.data.clean import BINARY_SNIFF_BYTES
    from lmforge.data.ingest import check_head_not_binary

    # as prepare: text in another encoding is refused, naming it; stray bad bytes pass
    check_head_not_binary(p, raw[:BINARY_SNIFF_BYTES])
    # decoded and checked as prepare does (it was read with errors="replace" and not a word said): a file
    # mixing encodings is refused, stray bad bytes are replaced, counted and reported; a BOM is no text
    # (str.strip keeps U+FEFF); any line end reads as "\n"; a line of only whitespace ends a document, as
    # in `prepare --doc-unit paragraph`
    text, invalid = decode_utf8(raw)
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    docs = [d.strip() for d in _BLANK_LINE.split(text) if d.strip()]
    check_encoding(p, invalid, sum(map(len, docs)), MAX_INVALID_UTF8, flag=False)
    if not docs:
        raise DataError(f"{p} holds no text; check the file")
    if invalid:
        print(
            f"note: {p}: {invalid} invalid UTF-8 sequence{'s' if invalid != 1 else ''} replaced with U+FFFD "
            "(invalid_utf8_replaced, as "
            "prepare counts them); the scores include them: convert the file to UTF-8 for exact ones",
            file=sys.stderr,
        )
    return [{column: d} for d in docs]


def _named(header: list[str], fields: list[str]) -> dict[Any, Any]:
    """A TSV row as `csv.DictReader` gives a CSV row: a missing field is None, extra ones a list under None."""
    row: dict[Any, Any] = dict(zip(header, fields, strict=False))
    row.update({name: None for name in header[len(fields) :]})
    if len(fields) > len(header):
        row[None] = fields[len(header) :]
    return row


def _no_extra_fields(row: dict[Any, Any], path: Path, line: int, n_header: int) -> dict[Any, Any]:
    """A CSV/TSV row without the fields past its header (`csv.DictReader` and `_named` list them under the key
    None, which crashed the fine-tune's hash of its rows). Blank ones (a trailing delimiter) are dropped; others
    are an error, as in `prepare`: an unquoted comma in a text shifts its label into the next column."""
    extra = row.pop(None, None)
    if extra and any(str(f).strip() for f in extra):
        raise extra_fields_error(path, line, n_header + len(extra), n_header)
    return row


def _read_json(text: str, p: Path, *, lines: bool) -> list[dict[str, Any]]:
    if not lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        from lmforge.data.qa import is_squad, squad_rows

        if is_squad(data):  # the official SQuAD file (CMRC 2018's, DRCD's): one row per question
            return squad_rows(data, p)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(
                f"{p} must hold a JSON list of objects (or use .jsonl, one object per line), or be a SQuAD file "
                '({"data": [{"paragraphs": [...]}]})'
            )
        return data
    rows = []
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines(): json.dumps leaves U+2028 unescaped
        line = json_line(line)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{i} is not valid JSON ({e.msg}); fix that line") from None
        if not isinstance(row, dict):
            raise DataError(f'{p}:{i} is not a JSON object; each line must be {{"field": ...}}')
        rows.append(row)
    return rows


class MissingColumnError(DataError):
    """A row lacks a column the task reads (`eval --task` then tries the standard column names); `column`'s name
    that column (`column`) and its task field (`field`)."""

    def __init__(self, message: str, *, column: str = "", field: str = "") -> None:
        super().__init__(message)
        self.column, self.field = column, field


def column(rows: list[dict[str, Any]], field: str, name: str, path: str | Path, *, messages: bool = False) -> list[Any]:
    """The values of one column; a row without it is a one-line `DataError` naming the rename flag. `messages`: a
    list (of chat messages) is a value too (DPO's conversational `chosen`, checked by `_check_dpo`)."""
    for i, row in enumerate(rows, 1):
        if field not in row:
            columns = ", ".join(list(row)[:8])
            raise MissingColumnError(
                f"{path}: row {i} has no column {field!r} (columns: {columns}); rename with --field {name}=COLUMN",
                column=field,
                field=name,
            )
        if row[field] is None:
            raise null_cell(path, i, field)
        if not (messages and isinstance(row[field], list)):
            refuse_structured(row[field], field, i, path)
    return [row[field] for row in rows]


def null_cell(path: str | Path, i: int, field: str) -> DataError:
    """Row `i`'s empty cell in `field` (JSON null, a CSV row cut short): str() would train on the text "None"."""
    return DataError(
        f"{path}: row {i} has no value in column {field!r} (null, or a CSV row cut short by an unclosed quote); "
        "fill it in or drop the row"
    )


def refuse_structured(value: Any, field: str, i: int, path: str | Path) -> None:
    """A JSON list or object where one text or label belongs: str() trained on its Python repr, silently
    (UltraFeedback-style DPO pairs, whose `chosen` is a list of messages; multi-label rows)."""
    if isinstance(value, (list, dict)):
        kind = "list" if isinstance(value, list) else "object"
        inner = value[0] if isinstance(value, list) and value else value
        keys = ", ".join(map(str, inner)) if isinstance(inner, dict) and "role" not in inner else ""  # (not chat)
        reach = f"; or reach into it with a dotted --field NAME={field}.KEY (keys: {keys})" if keys else ""
        raise DataError(
            f"{path}: row {i} column {field!r} holds a JSON {kind}, not one text or label; write it as a string "
            f"(a list of chat messages goes in an sft file's 'messages'; one label per row){reach}"
        )


# ---------------------------------------------------------------------------------------------
# task rows: columns checked per task (used by finetune and eval)


# the column an answer is trained on and scored against, per generating task
REFERENCE = {"sft": "output", "qa": "answer", "translate": "target"}


def check_columns(
    rows: list[dict[str, Any]], task: str, fields: dict[str, str], path: str | Path, *, scored: bool = False
) -> None:
    """Every row has the columns the task needs (one-line error naming the rename flag); `scored` (rows whose
    answers are scored: `eval --task`, a fine-tune's --val file): none has an empty reference answer."""
    if task == "sft":
        for i, row in enumerate(rows, 1):
            if fields["messages"] not in row:
                for name in ("instruction", "output"):
                    if fields[name] not in row:
                        # a column of message objects (ShareGPT's 'conversations', TRL's 'chosen') is a chat:
                        # it was told to rename it as the instruction
                        chat = [k for k, v in row.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
                        rename = f"messages={chat[0]}" if chat else f"{name}=COLUMN"
                        raise MissingColumnError(
                            f"{path}: row {i} has neither {fields['messages']!r} nor {fields[name]!r} "
                            f"(columns: {', '.join(list(row)[:8])}); rename with --field {rename}"
                        )
                    if row[fields[name]] is None:
                        raise null_cell(path, i, fields[name])
                    refuse_structured(row[fields[name]], fields[name], i, path)
    else:
        needed = {"classify": ("text", "label"), "translate": ("source", "target"), "qa": ()}
        needed |= {"dpo": ("chosen", "rejected"), "clm": ("text",)}
        for name in needed[task]:
            column(rows, fields[name], name, path, messages=task == "dpo")
        if task == "qa":  # an answer may be a list of references, SQuAD's answers object, or in `answers`
            from lmforge.data.qa import check_rows

            check_rows(rows, fields, path)
        if task == "dpo":
            _check_dpo(rows, fields, path)
    if task == "classify":  # a blank cell would become a class of its own, named ""
        for i, row in enumerate(rows, 1):
            if not label_name(row[fields["label"]]):
                raise DataError(f"{path}: row {i} has an empty {fields['label']!r}; label it or remove the row")
            # a blank text is the bare frame ([EOS], or [CLS] [SEP]): a label scored from nothing. To train on,
            # such a row is skipped and counted (`build_examples`; ChnSentiCorp_htl_all.csv's last row is "0,")
            if scored and not str(row[fields["text"]]).strip():
                raise DataError(f"{path}: row {i} has an empty {fields['text']!r}; write the text or remove the row")
    if scored and task == "sft":  # the last assistant turn is the reference: refused here, not after training
        _check_scored_conversations(rows, fields, path)
    # A blank reference would score an empty answer as perfect, so scored files are refused here. To train on,
    # an sft row with an empty answer is skipped and noted (`formats.build_examples`; Alpaca has a few).
    if scored and task in REFERENCE:
        from lmforge.data.qa import answer_column

        empty = [i for i, row in enumerate(rows, 1) if _reference(row, task, fields) == ""]
        if empty:
            where = (
                f"last assistant message in {fields['messages']!r}"
                if task == "sft" and fields["messages"] in rows[empty[0] - 1]
                else repr(answer_column(rows[empty[0] - 1], fields) if task == "qa" else fields[REFERENCE[task]])
            )
            more = f" ({len(empty)} rows have one)" if len(empty) > 1 else ""
            raise DataError(
                f"{path}: row {empty[0]} has an empty {where}{more}, which would score an empty answer as "
                f"perfect; write the reference {REFERENCE[task]} or remove the row"
            )


def _check_dpo(rows: list[dict[str, Any]], fields: dict[str, str], path: str | Path) -> None:
    """DPO rows are text (`prompt`, `chosen`, `rejected` strings) or TRL's conversational format (`chosen` and
    `rejected` lists of messages, an optional `prompt` list or text; `formats.chat_pair` reads them), not a mix
    of the two in one row."""
    chosen, rejected, prompt = fields["chosen"], fields["rejected"], fields["prompt"]
    for i, row in enumerate(rows, 1):
        chat = isinstance(row[chosen], list), isinstance(row[rejected], list)
        if chat[0] != chat[1]:
            lists, text = (chosen, rejected) if chat[0] else (rejected, chosen)
            raise DataError(
                f"{path}: row {i}: {lists!r} is a list of messages and {text!r} is not; write both as lists of "
                "{role, content} messages (TRL's conversational format) or both as text"
            )
        if isinstance(row.get(prompt), list) and not chat[0]:
            raise DataError(
                f"{path}: row {i}: {prompt!r} is a list of messages and {chosen!r}, {rejected!r} are text; write "
                "the replies as lists of messages too (TRL's conversational format), or the prompt as text"
            )
        if not isinstance(row.get(prompt), list):
            refuse_structured(row.get(prompt), prompt, i, path)


def _check_scored_conversations(rows: list[dict[str, Any]], fields: dict[str, str], path: str | Path) -> None:
    """Each `messages` row of a scored file is a valid conversation ending with the assistant reply to compare
    against. Checked when the file is read: a fine-tune's --val used to fail only after training, at the final
    scoring, and `eval` on a `messages` string stopped with a TypeError."""
    from lmforge.chat import check_messages

    for i, row in enumerate(rows, 1):
        if fields["messages"] not in row:
            continue
        turns = row[fields["messages"]]
        try:
            check_messages(turns, allow_trailing_user=True)
        except DataError as e:
            raise DataError(f"{path}: row {i}: {e}") from None
        if turns[-1]["role"] != "assistant":
            raise DataError(
                f"{path}: row {i}: the conversation ends with a {turns[-1]['role']} turn; a scored conversation "
                "must end with the assistant reply to compare against; add it or drop the row"
            )


def _reference(row: dict[str, Any], task: str, fields: dict[str, str]) -> str | None:
    """The stripped reference answer of a row of a generating task; None for a messages list that does not end
    with an assistant turn (the chat template and `eval` say what is wrong with it)."""
    if task == "sft" and fields["messages"] in row:
        turns = row[fields["messages"]]
        last = turns[-1] if isinstance(turns, list) and turns else None
        if not isinstance(last, dict) or last.get("role") != "assistant":
            return None
        return str(last.get("content") or "").strip()
    if task == "qa":  # (its first reference: the others are blank too when it is, `qa.references`)
        from lmforge.data.qa import references

        return references(row, fields)[0].strip()
    return scalar_text(row[fields[REFERENCE[task]]]).strip()


def read_task_rows(
    path: str | Path, task: str, fields: dict[str, str], *, scored: bool = False, limit: int = 0
) -> list[dict[str, Any]]:
    """Rows of a task file; plain text is documents for clm (`read_table`'s `text_column`). `scored`: the
    rows' answers will be scored, so an empty reference is an error (`check_columns`). `limit` > 0: only the
    first `limit` rows (`eval --limit`), and only they are checked: a bad row after them is never read."""
    p = Path(path)
    return _task_rows(_read_task_table(p, task, fields), p, task, fields, scored=scored, limit=limit)


def _read_task_table(p: Path, task: str, fields: dict[str, str]) -> list[dict[str, Any]]:
    # a headerless .txt's columns are the task's fields in order (source, target); --field then picks
    # among them as among a header's names (--field source=target --field target=source: zh -> en);
    # for clm, plain text is documents under the text column
    text_column = fields["text"] if task == "clm" else None
    return read_table(p, txt_columns=_txt_columns(task), text_column=text_column)


def _txt_columns(task: str) -> tuple[str, ...]:
    return tuple(f for f in TASK_FIELDS[task] if f not in ("input", "messages"))


def _task_rows(
    rows: list[dict[str, Any]], p: Path, task: str, fields: dict[str, str], *, scored: bool = False, limit: int = 0
) -> list[dict[str, Any]]:
    """`read_task_rows` on the rows of a table already read (`read_table`)."""
    txt_columns = _txt_columns(task)
    if task == "qa":  # a dotted answer path (answers.text) is one row's list of references, not a row per answer
        from lmforge.data.qa import dotted_answers

        rows = dotted_answers(rows, fields, p)
    rows = nested_rows(rows, fields, p)[: limit or None]
    if task == "sft":  # OpenAI's forms (a developer turn, text content parts) in the template's, as `serve` reads them
        rows = _text_messages(rows, fields["messages"], p)
    try:
        check_columns(rows, task, fields, p, scored=scored)
    except MissingColumnError as e:
        kind = inner_name(p).rsplit(".", 1)[-1]
        if kind not in ("csv", "tsv"):
            raise
        columns = list(rows[0]) if rows else []
        required = [f for f in txt_columns if f not in ("prompt", "context")]  # (dpo's prompt, qa's context: optional)
        if len(columns) < len(required) or any(fields[f] in columns for f in txt_columns):
            # a real header row (too few columns to be the task's data, or naming one of its columns): a review-only
            # CSV for classify was told to add "review,label" at its top, as if its header were missing
            if not e.column:
                raise
            raise MissingColumnError(
                f"{p}: its header row ({', '.join(columns)}) has no column {e.column!r} for --task {task}; add one, "
                f"or name the column that holds the {e.field} with --field {e.field}=COLUMN",
                column=e.column,
                field=e.field,
            ) from None
        # a headerless table (Tatoeba's and Moses' parallel text, UCI's sentences) lost its first row as the header;
        # one with only the required columns (dpo's chosen,rejected without a prompt) is hinted those, and .txt
        # only where a .txt would read its columns in that order (its lines are read as prompt, chosen, rejected)
        named = txt_columns if len(columns) >= len(txt_columns) else tuple(required)
        header = ("<TAB>" if kind == "tsv" else ",").join(fields[f] for f in named)
        as_txt = (
            f", or name it .txt (columns {', '.join(named)} in that order)"
            if named == txt_columns[: len(named)]
            else ""
        )
        raise MissingColumnError(
            f"{e}; if the file has no header row, add the line {header} at its top{as_txt}"
        ) from None
    return rows


def _text_messages(rows: list[dict[str, Any]], column: str, path: Path) -> list[dict[str, Any]]:
    from lmforge.chat import file_messages, sharegpt_messages, transcript_messages

    out = []
    for i, row in enumerate(rows, 1):
        if column not in row:
            out.append(row)
            continue
        try:
            messages = sharegpt_messages(transcript_messages(row[column]))
        except DataError as e:
            raise DataError(f"{path}: row {i}: {e}") from None
        if isinstance(messages, str):  # (it was "'messages' must be a list ..., not str", whatever the column)
            raise DataError(
                f"{path}: row {i}: column {column!r} holds text, not a list of {{role, content}} messages nor an "
                "HH-RLHF transcript ('Human: ...' / 'Assistant: ...' turns); write it as one of those, or train on "
                f"plain text with --task clm --field text={column}"
            )
        try:
            out.append(row | {column: file_messages(messages)})
        except DataError as e:
            raise DataError(f"{path}: row {i}: {e}; write the message's text as its content") from None
    return out


def read_rows_or_standard(
    path: str | Path, task: str, fields: dict[str, str], *, scored: bool = False, limit: int = 0
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(rows, fields) of a file read in `fields` (a run's renamed columns, e.g. --field text=review), or in the
    task's standard columns when it has those instead: a test or --val file is often in another layout than the
    training file (`eval --task` on a run trained on renamed columns; a fine-tune's --val JSONL of text/label
    beside a training CSV of review/label, which no --field could read both of)."""
    p = Path(path)
    table = _read_task_table(p, task, fields)  # read once: a pipe (<(zcat val.jsonl.gz)) cannot be read a second time
    try:
        return _task_rows(table, p, task, fields, scored=scored, limit=limit), fields
    except MissingColumnError as first:
        standard = field_map(task, None)
        if standard == fields:
            raise
        try:
            return _task_rows(table, p, task, standard, scored=scored, limit=limit), standard
        except MissingColumnError:
            raise first from None  # (neither: name the columns asked for)
        # any other error is about the file in the standard columns it has (an empty text, a null): it
        # propagates, where it was reported as a "no column" of the renamed ones


def nested_rows(rows: list[dict[str, Any]], fields: dict[str, str], path: str | Path) -> list[dict[str, Any]]:
    """Rows with each dotted column (`--field output=instances.output`) that is not a key itself read from
    nested objects by `jsonl.dotted_rows`, as `prepare --text-field doc.body` reads them; a list of objects on the
    way gives one row per item, the row's other columns repeated (Self-Instruct's tasks hold their {input, output}
    pairs in an `instances` list). Every such column that walks a list must walk the same one. A key missing
    from a row or item leaves its column out there (sft's optional input; a required one is refused by
    `check_columns`), but a column that no row has is a typo: an error naming the path and the keys found."""
    from lmforge.data.jsonl import dotted_rows

    dotted = [c for c in dict.fromkeys(fields.values()) if "." in c and rows and c not in rows[0]]
    if not dotted:
        return rows
    hint = "point --field NAME=COLUMN at the text"
    out = []
    for i, row in enumerate(rows, 1):
        for found in dotted_rows(row, dotted, f"{path}: row {i}", missing="absent", hint=hint):
            out.append(row | {c: v for c, v in found.items() if v is not None})  # (null: as if missing)
    for c in dotted:
        if out and not any(c in row for row in out):  # walked again to say where its path ends
            dotted_rows(rows[0], [c], f"{path}: row 1", missing="error", hint=f"no row has '{c}': {hint}")
    return out
