"""Column-stored inputs of `ingest.read_documents`: Parquet files, Hugging Face `save_to_disk` folders and
hub datasets (`hf:NAME[:CONFIG][:SPLIT]`), read as one string column.

- Parquet and Arrow files are read in record batches of `ARROW_BATCH_ROWS` rows, with pyarrow alone (a
  save_to_disk folder's data files are Arrow IPC streams), so only hub names need the `datasets` package.
- A dictionary-encoded column (a pandas Categorical) is decoded to its strings; a null row is no text
  (`RawDocument`); a list-of-strings column gives one document per row, its strings joined by newlines (as a
  .json file's lists); any other column type is refused with the `--text-field` advice.
- A dotted `--text-field doc.body` that names no column descends into the struct column `doc` (`_column_path`),
  as a dotted path reaches into JSON objects (`jsonl.py`); lists of structs are not walked.
- Split out of `ingest` (size guide); `ingest.read_documents` imports it only for these formats.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.data.clean import replace_surrogates
from lmforge.data.ingest import HUB_PREFIX, Format, RawDocument, column_hint, column_index
from lmforge.data.ingest_text import unique_columns
from lmforge.data.jsonl import document_text
from lmforge.errors import DataError, first_line
from lmforge.export.hub import check_hub, stall_limit

ARROW_BATCH_ROWS = 1024


def _need_pyarrow(what: str) -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401 - the submodules the readers use
    except ImportError:
        raise DataError(f"reading {what} needs pyarrow: pip install 'lmforge[parquet]'") from None
    return pyarrow


def parquet_rows(path: Path) -> list[dict[str, Any]]:
    """A Parquet task file's rows as dicts (a fine-tune's --train/--val, `eval --task`), lists kept as lists."""
    pa = _need_pyarrow(".parquet files")
    try:
        # two same-named columns: read_table failed with "Multiple matches for FieldRef.Name(text)", said as an
        # unreadable file to re-create; named here, as prepare names its text column named twice
        unique_columns(path, pa.parquet.ParquetFile(path).schema_arrow.names)
        return pa.parquet.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e)}); re-create it or remove it") from None


def _arrow_files(folder: Path) -> list[Path]:
    """The Arrow data files of a save_to_disk folder (a DatasetDict: every split, in its order)."""
    try:
        if (folder / "dataset_dict.json").is_file():
            splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
            return [f for split in splits for f in _arrow_files(folder / split)]
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return [folder / entry["filename"] for entry in state["_data_files"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"{folder}: not a readable save_to_disk dataset ({e}); save it again with save_to_disk"
        ) from None


_STRINGS = ("string", "large_string", "string_view")


def _check_column(where: object, names: list[str], text_field: str) -> int:
    if text_field not in names:
        columns = ", ".join(names[:20]) or "none"
        raise DataError(f"{where}: no column '{text_field}' (columns: {columns}); {column_hint(names, text_field)}")
    return column_index(where, names, text_field)


def _column_path(where: object, schema: Any, text_field: str) -> tuple[int, list[str]]:
    """(the column, the struct fields to descend into) `text_field` names: a column, or a dotted path into a struct
    column (`doc.body`, as a dotted --text-field reaches into JSON objects; a Parquet file of nested records,
    which pandas and `datasets` write as struct columns, was refused with "no column 'doc.body' (columns: doc)"
    and no --text-field could read it)."""
    names = schema.names
    top, *keys = text_field.split(".")
    if text_field in names or not keys or top not in names:
        return _check_column(where, names, text_field), []
    import pyarrow.types

    column = _check_column(where, names, top)
    kind, at = schema.field(column).type, top
    for key in keys:
        struct = pyarrow.types.is_struct(kind)
        if not struct or kind.get_field_index(key) < 0:
            inside = f"its fields: {', '.join(f.name for f in kind)}" if struct else f"it holds {kind}"
            raise DataError(f"{where}: no field '{key}' in column '{at}' ({inside}); choose the text with --text-field")
        kind, at = kind.field(key).type, f"{at}.{key}"
    return column, keys


def _string_rows(
    where: object, batch: Any, column: int, text_field: str, keys: list[str] | None = None
) -> Iterator[RawDocument]:
    array = batch.column(column)
    if keys:  # a dotted --text-field into a struct column (`_column_path`); a null record is a null field
        import pyarrow.compute

        array = pyarrow.compute.struct_field(array, keys)
    if str(array.type).startswith("dictionary<"):  # dictionary-encoded (pandas Categorical): decode its strings
        array = array.cast(array.type.value_type)
    kind = str(array.type)
    lists = kind.startswith(("list<", "large_list<")) and str(array.type.value_type) in _STRINGS
    if kind not in _STRINGS and not lists:
        raise DataError(
            f"{where}: column '{text_field}' holds {kind}, not strings (or lists of strings); choose one with "
            "--text-field"
        )
    for text in array.to_pylist():
        if text is None:  # a null row: no text, skipped and counted
            yield RawDocument(None, 0)
            continue
        if lists:  # one document per row, its strings joined by newlines, as a .json file's list of strings
            text = "\n".join(t for t in text if t is not None)
        text, surrogates = replace_surrogates(text)
        yield RawDocument(text, surrogates, surrogates=surrogates)


def arrow_documents(path: Path, fmt: Format, text_field: str) -> Iterator[RawDocument]:
    """Documents of a Parquet file or a save_to_disk folder, in record batches."""
    pa = _need_pyarrow(".parquet files" if fmt == "parquet" else "a Hugging Face dataset folder")
    if fmt == "parquet":
        try:
            parquet = pa.parquet.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e}); re-create it or remove it") from None
        column, keys = _column_path(path, parquet.schema_arrow, text_field)
        try:
            top = parquet.schema_arrow.names[column]
            for batch in parquet.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=[top]):
                yield from _string_rows(path, batch, 0, text_field, keys)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: read failed ({e}); re-create the file or remove it") from None
        finally:
            parquet.close()
        return
    for file in _arrow_files(path):
        try:
            with pa.memory_map(str(file)) as source:
                reader = pa.ipc.open_stream(source)
                column, keys = _column_path(path, reader.schema, text_field)
                for batch in reader:
                    yield from _string_rows(path, batch, column, text_field, keys)
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"{file}: not a readable Arrow file ({e}); save the dataset again with save_to_disk"
            ) from None


def parse_hub_name(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][:SPLIT]` -> (name, config or None, split; default "train")."""
    parts = spec[len(HUB_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(
            f"hub input {spec!r} must look like hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def hub_documents(spec: str, text_field: str) -> Iterator[RawDocument]:
    """Stream a hub dataset with `datasets.load_dataset(..., streaming=True)` (needs the network).

    Without network it fails fast, by the rule of hub models (`export/hub.check_hub`): with HF_HUB_OFFLINE (or
    HF_DATASETS_OFFLINE) `datasets` reads its own cache alone, and one that lacks `spec` is one line that says so;
    else the Hub is asked once, within `HUB_TIMEOUT_S`, before `datasets` asks it (a Hub that accepted the
    connection and never answered hung `prepare hf:...` for good), and from then on a Hub that stops sending for
    `HUB_STALL_S` ends the read in one line (`stall_limit`). A local folder needs no Hub."""
    name, config, split = parse_hub_name(spec)
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {spec} needs the datasets package: pip install 'lmforge[datasets]'") from None
    offline = datasets.config.HF_HUB_OFFLINE  # (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)
    on_hub = not Path(name).exists()  # (a local folder laid out like a hub dataset repo needs no Hub)
    limit: Any = contextlib.nullcontext()
    if on_hub and not offline:  # (then a stall of datasets' own requests is one line too)
        _, elsewhere = check_hub(spec, name, None, offline=False, repo_type="dataset", error=DataError)
        limit = stall_limit(spec, elsewhere, DataError)
    try:
        with limit:
            rows = datasets.load_dataset(name, config, split=split, streaming=True)
            for row in rows:
                if text_field not in row:
                    _check_column(spec, list(row), text_field)
                if row[text_field] is None:
                    yield RawDocument(None, 0)
                    continue
                text, surrogates = replace_surrogates(document_text(row[text_field], spec, text_field))
                yield RawDocument(text, surrogates, surrogates=surrogates)
    except DataError:
        raise
    except Exception as e:  # network, missing dataset, bad config: datasets raises many types
        if on_hub and offline and isinstance(e, ConnectionError):  # (datasets' own cache: nothing for `name`)
            check_hub(spec, name, None, offline=True, repo_type="dataset", error=DataError)
        raise DataError(
            f"{spec}: cannot load from the hub ({first_line(e)}); check the name, config, split and network"
        ) from None
