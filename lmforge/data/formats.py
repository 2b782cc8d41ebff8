"""Task data → token ids with loss masks: reading JSONL/CSV/TSV tables, field names, templates.

- `read_table(path)`: `.jsonl` / `.json` (a list of objects) / `.jsonl.gz`, `.csv` and `.tsv` with a
  header row (a .tsv's quotes read as `prepare` reads them, `data/tsv.py`), and headerless `.txt`
  (`a<TAB>b` per line, columns named after the task's fields, the layout of Tatoeba pair files and
  the UCI sentiment sentences). A file named without one of those extensions (a pipe, `<(zcat x.jsonl.gz)`) is
  read by its content (`_sniff_kind`), and every file is read once: a pipe gives its bytes only once.
- `TASK_FIELDS`: the default column names per task; `--field label=sentiment` renames one.
- Every LM-style example is one token list plus a per-token `train` flag: the token is a target
  (its loss counts) only where the flag is set. `lm_batch` shifts them into (inputs, targets) with
  targets = -100 where the flag is off, so prompts, user turns and padding cost nothing.
- Batches are padded on the right: causal attention keeps every real token blind to the padding
  after it, so no attention mask is needed. With `--pack`, short examples share a row instead
  (`pack_examples`, first fit in file order); each token carries its example's index and its
  position within the example, and the model gets a block-diagonal causal mask, so no example
  attends to another and each sees the positions it would see alone.
- The chat template (`lmforge.chat.ChatTemplate`) renders conversations as segments with a train
  flag, so the mask follows the template exactly (loss only on assistant turns and their EOS).

Over STYLE.md's 800 lines (~900): it grew past them this session with the table readers (a pipe or an
extensionless file read by its content, standard columns beside renamed ones); the next split is the readers
(`read_table` .. `read_rows_or_standard`) into data/tables.py, away from the example builders.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.data.clean import MAX_INVALID_UTF8, check_encoding, decode_utf8, json_line
from lmforge.data.tsv import allow_long_fields, extra_fields_error, tsv_rows  # (read as `prepare` reads them)
from lmforge.errors import DataError
from lmforge.objectives import IGNORE_INDEX

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


def read_table(path: str | Path, *, txt_columns: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / CSV / TSV / Parquet / headerless TXT file as dicts (one-line `DataError` on
    problems)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a directory; pass one .jsonl, .json, .csv, .tsv, .parquet or .txt file")
    if not p.exists():  # (a pipe such as <(cmd) exists without being a regular file, and reads fine)
        raise DataError(f"data file {p} not found; pass a .jsonl, .json, .csv, .tsv, .parquet or .txt file")
    name = p.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):  # e.g. a Hugging Face dataset's data files
        from lmforge.data.columnar import parquet_rows

        rows = parquet_rows(p)
        if not rows:
            raise DataError(f"{p} holds no rows; check the file")
        return rows
    kind = next((k for k in ("jsonl", "json", "csv", "tsv", "txt") if name.endswith("." + k)), None)
    raw = b""
    try:  # read once: a pipe (<(zcat data.jsonl.gz), named /dev/fd/63) cannot be read a second time
        raw = p.read_bytes()
        if p.name.lower().endswith(".gz") or (kind is None and raw.startswith(_GZIP_MAGIC)):
            raw = gzip.decompress(raw)
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
    except (OSError, EOFError) as e:  # (a damaged .gz read as "convert it to UTF-8")
        raise DataError(f"cannot read {p} ({e}); check the file, or re-create it if it is a damaged .gz") from None
    if "\x00" in text:  # UTF-16 or binary data (as prepare refuses it), or a NUL byte further in
        from lmforge.data.clean import BINARY_SNIFF_BYTES
        from lmforge.data.ingest import check_head_not_binary

        check_head_not_binary(p, raw[:BINARY_SNIFF_BYTES])
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataError(f"{p}:{line}: holds a NUL byte, which text never has; remove it or re-export the file")
    sniffed = kind is None
    if sniffed:
        kind = _sniff_kind(text)
    if kind in ("jsonl", "json"):
        rows = _read_json(text, p, lines=kind == "jsonl")
    elif kind == "tsv":
        # newline="": rows end at "\n", "\r\n" or a lone "\r" (old Mac OS), as `prepare` reads them
        table = tsv_rows(io.StringIO(text, newline=""))
        header = next(table, (0, []))[1]
        rows = [_no_extra_fields(_named(header, fields), p, line, len(header)) for line, fields in table]
    elif kind == "csv":
        # newline="": rows end at "\n", "\r\n" or a lone "\r" (old Mac OS), as csv wants them and as
        # `prepare` reads CSV/TSV; a line end inside a quoted field stays as written
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        allow_long_fields()  # as in `prepare`
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


def _sniff_kind(text: str) -> str:
    """The format of a file whose name does not say it (a pipe such as <(zcat data.jsonl.gz) is /dev/fd/63): JSON
    Lines if it starts with `{` (a JSON object, such as a SQuAD file, when its first line alone is not one), a JSON
    list if with `[`, else headerless tab-separated text, as a .txt file. (A CSV or TSV header row could not be told
    from a first row, so tables are read by extension only.)"""
    start = text.lstrip()
    if start.startswith("["):
        return "json"
    if start.startswith("{"):
        try:
            json.loads(start.split("\n", 1)[0])
        except json.JSONDecodeError:
            return "json"
        return "jsonl"
    return "txt"


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
    """A row lacks a column the task reads (`eval --task` then tries the standard column names)."""


def column(rows: list[dict[str, Any]], field: str, name: str, path: str | Path) -> list[Any]:
    """The values of one column; a row without it is a one-line `DataError` naming the rename flag."""
    for i, row in enumerate(rows, 1):
        if field not in row:
            columns = ", ".join(list(row)[:8])
            raise MissingColumnError(
                f"{path}: row {i} has no column {field!r} (columns: {columns}); rename with --field {name}=COLUMN"
            )
        if row[field] is None:
            raise null_cell(path, i, field)
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
# LM-style examples: ids + train flags


@dataclass
class LMExample:
    ids: list[int]
    train: list[bool]  # train[i]: token i is a target (predicted from the tokens before it)


def segments_example(segments: list[tuple[list[int], bool]], max_len: int, prefix: Sequence[int] = ()) -> LMExample:
    """Concatenate (ids, train) segments; cut to max_len + 1 tokens (inputs are the first max_len).

    The cut takes the end, unless that would leave no target at all (a prompt that fills the context):
    then the prompt loses its *start* instead, as in `completion_example`: the answer and the end of
    the prompt right before it are kept, and the answer is cut only when it alone does not fit. A
    `prefix` the ids start with (the tokenizer's `prompt_prefix`, an imported Llama's BOS) stays first
    and the start is cut after it, as `keep_end` cuts a prompt at inference."""
    ids: list[int] = []
    train: list[bool] = []
    for seg_ids, flag in segments:
        ids += seg_ids
        train += [flag] * len(seg_ids)
    first = train.index(True) if True in train else None  # the first target
    if first is None or first <= max_len:  # the end cut keeps a target
        return LMExample(ids[: max_len + 1], train[: max_len + 1])
    # The prefix stays when 2 tokens fit after it (max_len + 1 kept): the one that predicts the first target, and
    # that target. At max_len == len(prefix) only one would, and the example would train on nothing, so the prefix
    # goes and the window keeps a target; `keep_end`'s bound (n > len(prefix)) is the same rule for a prompt,
    # which needs only its last token after the prefix (tested at both boundaries).
    p = len(prefix) if prefix and ids[: len(prefix)] == list(prefix) and max_len > len(prefix) else 0
    n = max_len + 1 - p  # tokens kept after the prefix
    # the whole tail when it fits, else from the token that predicts the first target on
    start = min(len(ids) - n, first - 1)
    return LMExample(ids[:p] + ids[start : start + n], train[:p] + train[start : start + n])


def keep_end(ids: list[int], n: int, prefix: Sequence[int]) -> list[int]:
    """A prompt cut from its start to its last `n` tokens, for inference (eval's answers, `chat`, scored
    continuations). `prefix` (the tokenizer's `prompt_prefix`, an imported Llama's BOS) stays first when the
    prompt starts with it, and the cut is made after it: the model was trained on examples that start with it
    (`segments_example`, `completion_example`), and a cut from the very start dropped it."""
    if len(ids) <= n:
        return ids
    # (n == len(prefix): the prefix alone would drop every prompt token; the prompt's last n are kept instead)
    p = len(prefix) if prefix and ids[: len(prefix)] == list(prefix) and n > len(prefix) else 0
    return ids[:p] + ids[len(ids) - (n - p) :]


def completion_example(tok: Any, prompt: str, completion: str, max_len: int) -> LMExample:
    """prompt (no loss) + completion + EOS (loss): translation, DPO pairs, prompt/completion data.

    The prompt starts with the tokenizer's `prompt_prefix` (an imported Llama's BOS), as `generate` and
    `serve` put it before a prompt. Too long for the context: the prompt loses its *start* after that
    prefix (the completion right after it matters most), and the completion is cut only when it alone
    does not fit.
    """
    p, c = tok.encode(prompt), tok.encode(completion) + [tok.eos_id]
    room = max_len + 1 - len(c) - len(tok.prompt_prefix)
    p = tok.prompt_prefix + (p[-room:] if room > 0 else p[:1])
    return segments_example([(p, False), (c, True)], max_len)


def translate_prompt(source: str) -> str:
    """The decoder translation format: `<src> SOURCE <tgt> ` then the target (loss only on the target)."""
    return f"<src> {source.strip()} <tgt> "


def lm_batch(examples: list[LMExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (inputs (B, T), targets (B, T)); targets -100 where not trained or padded."""
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        ids = torch.tensor(e.ids, dtype=torch.long)
        flags = torch.tensor(e.train[1:], dtype=torch.bool)
        x[b, :n] = ids[:-1]
        y[b, :n] = torch.where(flags, ids[1:], IGNORE_INDEX)
    return x, y


def pack_examples(examples: list[LMExample], max_len: int) -> list[list[LMExample]]:
    """Group examples into rows of at most `max_len` input tokens (each example gives len(ids) - 1)."""
    rows: list[list[LMExample]] = []
    used: list[int] = []
    for e in examples:
        n = len(e.ids) - 1
        for i, u in enumerate(used):  # first fit: the first row with room
            if u + n <= max_len:
                rows[i].append(e)
                used[i] += n
                break
        else:
            rows.append([e])
            used.append(n)
    return rows


def packed_batch(rows: list[list[LMExample]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, positions, segments), each (B, T); padding has segment -1 and no target."""
    T = max(sum(len(e.ids) - 1 for e in row) for row in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), T), dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for k, e in enumerate(row):
            ex, ey = lm_batch([e], pad_id)
            n = ex.shape[1]
            x[b, start : start + n], y[b, start : start + n] = ex[0], ey[0]
            positions[b, start : start + n] = torch.arange(n)
            segments[b, start : start + n] = k
            start += n
    return x, y, positions, segments


def clm_examples(tok: Any, texts: list[str], seq_len: int) -> list[LMExample]:
    """Documents + EOS, concatenated and cut into windows of seq_len + 1 tokens (every token trains)."""
    stream: list[int] = []
    for ids in tok.encode_batch([str(t) for t in texts]):
        stream += ids + [tok.eos_id]
    windows = [stream[i : i + seq_len + 1] for i in range(0, max(len(stream) - 1, 1), seq_len)]
    return [LMExample(w, [True] * len(w)) for w in windows if len(w) >= 2]


# ---------------------------------------------------------------------------------------------
# classification


# an integer written as a float: pandas writes an int column that has a missing value as float64 ("1.0")
_INTEGER_AS_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)\.0+")


def label_name(value: Any) -> str:
    """A label as the string that names its class, spelled one way whichever file it comes from.

    Labels are compared as strings, so every spelling of one label must give the same string, or one
    dataset gets two classes ("1" and "1.0") and a --val file is refused as holding labels never trained
    on: CSV "1", JSON 1 or 1.0, a float column's 1.0 and pandas' "1.0" are "1" ("1.5" stays "1.5");
    JSON true, CSV "true" and pandas' "True" are "true". Other strings are kept as written (stripped).
    """
    if isinstance(value, bool):  # (before the numbers: a bool is an int) JSON's spelling, not Python's "True"
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    name = str(value).strip()
    if _INTEGER_AS_FLOAT.fullmatch(name):
        return str(int(name.split(".")[0]))  # (int: "-0.0" is "0")
    if name.lower() in ("true", "false"):
        return name.lower()
    return name


def label_key(name: str) -> tuple[int, float | str]:
    """The order of a classifier's labels: numeric ones in numeric order (2 before 10), others alphabetically."""
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def classify_frame(tok: Any, family: str) -> tuple[list[int], list[int], int]:
    """(ids before the text, ids after it, padding id) of a classification row for a model family.

    Decoders read `text EOS` and pool the last real token (padding: EOS, never attended to), after the
    tokenizer's `prompt_prefix` (an imported Llama's BOS, which `generate` puts first too; none for lmforge's);
    BERT and ELECTRA read `[CLS] text [SEP]` as in pretraining and pool [CLS] (padding: [PAD], masked out).
    """
    if family in ("bert", "electra"):
        from lmforge.data.masking import special_ids

        sp = special_ids(tok)
        return [sp.cls], [sp.sep], sp.pad
    return list(tok.prompt_prefix), [tok.eos_id], tok.eos_id


def classify_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(ids (B, T) right-padded, lengths (B,), labels (B,))."""
    T = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for b, (ids, _) in enumerate(examples):
        x[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in examples], dtype=torch.long)
    labels = torch.tensor([label for _, label in examples], dtype=torch.long)
    return x, lengths, labels


def augment_text(text: str, rng: random.Random, p: float = 0.1) -> str:
    """One of random deletion, swap or insertion of words (EDA, Wei & Zou 2019, arXiv:1901.11196).

    Text in a script written without spaces (Chinese, Japanese) has no words to split on: there each
    character is a word, as whole-word masking treats it (`masking.NO_SPACE_RANGES`), and so is each run of
    other non-space characters; its few spaces ("味道很好 送餐很快") stay between the words they were between
    (split at them, a Chinese review's phrases were its words, and one edit deleted or doubled a third of it)."""
    from lmforge.data.masking import NO_SPACE_RANGES

    no_space = any(a <= ord(ch) <= b for ch in text for a, b in NO_SPACE_RANGES)
    if no_space:
        cjk = "".join(f"{chr(a)}-{chr(b)}" for a, b in NO_SPACE_RANGES)
        pieces = re.findall(rf"\s+|[{cjk}]|[^\s{cjk}]+", text.strip())
        words = [piece for piece in pieces if not piece.isspace()]
        gaps = [piece if piece.isspace() else "" for prev, piece in itertools.pairwise(pieces) if not prev.isspace()]
    else:
        words = text.split()
        gaps = [" "] * (len(words) - 1)  # gaps[i]: the whitespace between words i and i + 1
    if len(words) < 2:
        return text
    n = max(1, int(p * len(words)))
    op = rng.choice(("delete", "swap", "insert"))
    for _ in range(n):
        if op == "delete" and len(words) > 1:
            k = rng.randrange(len(words))
            words.pop(k)
            gaps.pop(k if k < len(gaps) and (k == 0 or not gaps[k]) else k - 1)  # an empty gap goes first
        elif op == "swap":
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        elif op == "insert":
            at = rng.randrange(len(words) + 1)
            words.insert(at, rng.choice(words))
            gaps.insert(at, "" if no_space else " ")
    return words[0] + "".join(gap + word for gap, word in zip(gaps, words[1:], strict=True))


# ---------------------------------------------------------------------------------------------
# batches forever


class ExampleLoader:
    """Shuffled batches of examples, epoch after epoch (seeded; the position is a `state_dict`)."""

    def __init__(self, examples: list[Any], *, batch_size: int, seed: int, collate: Any) -> None:
        if not examples:
            raise DataError("no training examples; check the --train file")
        self.examples, self.batch_size, self.seed, self.collate = examples, batch_size, seed, collate
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        batch = []
        while len(batch) < self.batch_size:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            batch.append(self.examples[self._order[self.pos]])
            self.pos += 1
        return self.collate(batch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state_dict()` was taken (the epoch's order is re-derived from the seed)."""
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()


# ---------------------------------------------------------------------------------------------
# task rows -> examples (used by finetune and eval)


def conversation(row: dict[str, Any], fields: dict[str, str], task: str) -> list[dict[str, str]]:
    """A training row as chat messages (Alpaca, messages, or question/answer)."""
    if task == "qa":  # (the context whole: `qa.qa_messages` cuts it to fit)
        from lmforge.data.qa import context_of, references, user_content

        return [
            {"role": "user", "content": user_content(str(row[fields["question"]]), context_of(row, fields))},
            {"role": "assistant", "content": references(row, fields)[0]},
        ]
    if fields["messages"] in row:
        return row[fields["messages"]]
    prompt = str(row[fields["instruction"]]).strip()
    extra = str(row.get(fields["input"]) or "").strip()
    return [
        {"role": "user", "content": prompt + ("\n\n" + extra if extra else "")},
        {"role": "assistant", "content": str(row[fields["output"]])},
    ]


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
                        raise MissingColumnError(
                            f"{path}: row {i} has neither {fields['messages']!r} nor {fields[name]!r} "
                            f"(columns: {', '.join(list(row)[:8])}); rename with --field {name}=COLUMN"
                        )
                    if row[fields[name]] is None:
                        raise null_cell(path, i, fields[name])
                    refuse_structured(row[fields[name]], fields[name], i, path)
    else:
        needed = {"classify": ("text", "label"), "translate": ("source", "target"), "qa": ()}
        needed |= {"dpo": ("chosen", "rejected"), "clm": ("text",)}
        for name in needed[task]:
            column(rows, fields[name], name, path)
        if task == "qa":  # an answer may be a list of references, SQuAD's answers object, or in `answers`
            from lmforge.data.qa import check_rows

            check_rows(rows, fields, path)
        if task == "dpo":  # its optional prompt too (TRL's conversational format writes messages there)
            for i, row in enumerate(rows, 1):
                refuse_structured(row.get(fields["prompt"]), fields["prompt"], i, path)
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
    # A blank reference would score an empty answer as perfect. To train on, an empty output is data (the model
    # learns to stop at once; Alpaca has a few), so only files that are scored are checked.
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
    return str(row[fields[REFERENCE[task]]]).strip()


def split_shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf style pairs (whole dialogues, no prompt column): the shared prefix up to the last
    'Assistant:' turn is the prompt, the rest of each dialogue its completion."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    marker = chosen.rfind("Assistant:", 0, n)
    if marker >= 0:
        n = marker + len("Assistant:")
    return chosen[:n], chosen[n:], rejected[n:]


def read_task_rows(
    path: str | Path, task: str, fields: dict[str, str], *, scored: bool = False, limit: int = 0
) -> list[dict[str, Any]]:
    """Rows of a task file; a plain .txt is raw text for clm (blank-line separated documents). `scored`: the
    rows' answers will be scored, so an empty reference is an error (`check_columns`). `limit` > 0: only the
    first `limit` rows (`eval --limit`), and only they are checked: a bad row after them is never read."""
    p = Path(path)
    if _is_text_documents(p, task):
        from lmforge.data.ingest import check_not_binary

        check_not_binary(p)  # as prepare: text in another encoding is refused, naming it; stray bad bytes pass
        # decoded and checked as prepare does (it was read with errors="replace" and not a word said): a file
        # mixing encodings is refused, stray bad bytes are replaced, counted and reported; a BOM is no text
        # (str.strip keeps U+FEFF); any line end reads as "\n"; a line of only whitespace ends a document, as
        # in `prepare --doc-unit paragraph`
        text, invalid = decode_utf8(p.read_bytes())
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
        return [{fields["text"]: d} for d in docs][: limit or None]
    return _task_rows(_read_task_table(p, task), p, task, fields, scored=scored, limit=limit)


def _is_text_documents(p: Path, task: str) -> bool:
    return task == "clm" and p.suffix.lower() in (".txt", ".md") and p.is_file()


def _read_task_table(p: Path, task: str) -> list[dict[str, Any]]:
    # a headerless .txt's columns are the task's fields in order (source, target); --field then picks
    # among them as among a header's names (--field source=target --field target=source: zh -> en)
    return read_table(p, txt_columns=_txt_columns(task))


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
        kind = p.name.lower().removesuffix(".gz").rsplit(".", 1)[-1]
        if kind not in ("csv", "tsv"):
            raise
        # a headerless table (Tatoeba's and Moses' parallel text, UCI's sentences) lost its first row as the header
        header = ("<TAB>" if kind == "tsv" else ",").join(fields[f] for f in txt_columns)
        raise MissingColumnError(
            f"{e}; if the file has no header row, add the line {header} at its top, or name it .txt (columns "
            f"{', '.join(txt_columns)} in that order)"
        ) from None
    return rows


def _text_messages(rows: list[dict[str, Any]], column: str, path: Path) -> list[dict[str, Any]]:
    from lmforge.chat import openai_text_messages

    out = []
    for i, row in enumerate(rows, 1):
        try:
            out.append(row | {column: openai_text_messages(row[column])} if column in row else row)
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
    if _is_text_documents(p, task):  # (documents of text: no columns to miss)
        return read_task_rows(p, task, fields, scored=scored, limit=limit), fields
    table = _read_task_table(p, task)  # read once: a pipe (<(zcat val.jsonl.gz)) cannot be read a second time
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


def build_examples(
    rows: list[dict[str, Any]],
    *,
    task: str,
    tok: Any,
    fields: dict[str, str],
    max_len: int,
    labels: list[str] | None,
    path: str | Path,
    frame: tuple[list[int], list[int], int] | None = None,
    template: Any = None,
) -> list[Any]:
    """Rows → examples: (ids, label id) for classify, `LMExample` for LM tasks, dicts for DPO.

    `frame` is `classify_frame(tok, family)` (default: a decoder's `text EOS`); `template` the chat template of
    sft/qa (default: lmforge's `ChatTemplate`; an imported model's own is a `chat.JinjaChatTemplate`)."""
    from lmforge.chat import ChatTemplate

    if task == "classify":
        # (label_name: a run saved before labels were spelled one way may hold "1.0"; its rows now read "1")
        index = {label_name(name): i for i, name in enumerate(labels or [])}
        before, after, _ = frame or classify_frame(tok, "gpt")
        room = max_len - len(before) - len(after)
        if room < 1:
            raise DataError(
                f"max_len {max_len} leaves no room for the text (the classification frame takes "
                f"{len(before) + len(after)} tokens); raise --max-len"
            )
        out = []
        for i, row in enumerate(rows, 1):
            if not str(row[fields["text"]]).strip():  # nothing to learn the label from (scored files refuse it)
                continue
            name = label_name(row[fields["label"]])
            if name not in index:
                raise DataError(
                    f"{path}: row {i} has label {name!r}, which the model was not trained on "
                    f"(labels: {', '.join(labels or [])}); fix the row or fine-tune with it"
                )
            ids = before + tok.encode(str(row[fields["text"]]))[:room] + after
            out.append((ids, index[name]))
        if rows and not out:
            raise DataError(f"{path}: every row's {fields['text']!r} is empty; write the texts")
        return out
    if task == "qa":
        from lmforge.data.qa import qa_examples

        return qa_examples(
            rows, tok=tok, template=template or ChatTemplate(), fields=fields, max_len=max_len, path=path
        )
    if task == "sft":
        template = template or ChatTemplate()
        out = []
        for i, row in enumerate(rows, 1):
            try:
                segments = template.segments(tok, conversation(row, fields, task))
            except DataError as e:
                raise DataError(f"{path}: row {i}: {e}") from None
            out.append(segments_example(segments, max_len, tok.prompt_prefix))
        return out
    if task == "translate":
        return [
            completion_example(tok, translate_prompt(str(r[fields["source"]])), str(r[fields["target"]]), max_len)
            for r in rows
        ]
    if task == "clm":
        return clm_examples(tok, [r[fields["text"]] for r in rows], max_len)
    out = []  # dpo
    for row in rows:
        chosen, rejected = str(row[fields["chosen"]]), str(row[fields["rejected"]])
        if fields["prompt"] in row:
            prompt = str(row[fields["prompt"]])
        else:
            prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
        pair = {
            "chosen": completion_example(tok, prompt, chosen, max_len),
            "rejected": completion_example(tok, prompt, rejected, max_len),
        }
        # Identical sides state no preference: their DPO loss is log 2 with zero gradient whatever the model, and
        # scoring counts them as a wrong reward ordering. Dropped; the caller reports len(rows) - len(pairs).
        # An empty side is kept: it is a preference for (or against) stopping at once (hh-rlhf has 4 such).
        if pair["chosen"].ids != pair["rejected"].ids:
            out.append(pair)
    if not out:
        raise DataError(
            f"{path}: all {len(rows)} pairs have the same chosen and rejected tokens (within {max_len} tokens), so "
            "there is no preference to learn or score; check the chosen and rejected columns"
        )
    return out


def dpo_collate(pad_id: int) -> Any:
    def collate(pairs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cx, cy = lm_batch([p["chosen"] for p in pairs], pad_id)
        rx, ry = lm_batch([p["rejected"] for p in pairs], pad_id)
        batch = {"chosen_x": cx, "chosen_y": cy, "rejected_x": rx, "rejected_y": ry}
        if "ref" in pairs[0]:  # precomputed reference log-probs (without them: a live reference model)
            batch["ref_chosen"] = torch.tensor([p["ref"][0] for p in pairs])
            batch["ref_rejected"] = torch.tensor([p["ref"][1] for p in pairs])
        return batch

    return collate
