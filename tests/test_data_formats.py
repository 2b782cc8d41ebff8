"""`prepare` inputs beyond text/JSONL: CSV, TSV, Parquet, .zst, save_to_disk datasets; bad-input errors."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from lmforge.data.columnar import parse_hub_name
from lmforge.data.ingest import file_format, is_known_format, read_documents, resolve_inputs
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.errors import DataError
from tests.conftest import run_cli
from tests.test_data_prepare import CHINESE, assert_nothing_written, docs_by_split, sentences, write

TEXTS = sentences(12, seed=21) + [CHINESE, 'a "quoted", comma, field\nwith a newline']


def run(tmp_path: Path, inputs: list[Path | str], out: str = "out", **kwargs: object) -> dict:
    kwargs.setdefault("vocab_size", 300)
    kwargs.setdefault("val_fraction", 0)
    kwargs.setdefault("test_fraction", 0)
    cfg = PrepareConfig(inputs=[str(p) for p in inputs], out=str(tmp_path / out), **kwargs)
    return prepare(cfg, progress=False)


def table(delimiter: str, line_end: str = "\n") -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=line_end)
    writer.writerow(["id", "content", "label"])
    for i, text in enumerate(TEXTS):
        writer.writerow([i, text, "x"])
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, line_end",
    [("t.csv", "\n"), ("t.tsv", "\n"), ("t.csv.gz", "\n"), ("t.tsv.zst", "\n"), ("t.csv", "\r"), ("t.tsv.gz", "\r\n")],
)
def test_csv_and_tsv(tmp_path: Path, name: str, line_end: str) -> None:
    text = table("\t" if ".tsv" in name else ",", line_end)  # rows may end in "\r" (old Mac OS), as Python's csv reads
    if name.endswith(".zst"):
        import zstandard

        (tmp_path / name).write_bytes(zstandard.ZstdCompressor().compress(text.encode("utf-8")))
    else:
        write(tmp_path / name, text)
    m = run(tmp_path, [tmp_path / name], text_field="content")
    assert m["documents"]["in"] == len(TEXTS) and m["documents"]["out"] == len(TEXTS)
    assert sorted(docs_by_split(tmp_path / "out")["train"]) == sorted(TEXTS)  # quoted newline kept in its row


def test_wrong_column_lists_the_columns(tmp_path: Path) -> None:
    write(tmp_path / "t.csv", table(","))
    with pytest.raises(DataError, match=r"t\.csv: no column 'text' \(columns: id, content, label\); .*--text-field"):
        run(tmp_path, [tmp_path / "t.csv"])
    assert_nothing_written(tmp_path)
    result = run_cli("prepare", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out"), "--text-field", "body")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no column 'body' (columns: id, content, label)" in result.stderr and "Traceback" not in result.stderr
    assert_nothing_written(tmp_path)


def test_a_column_spelled_with_other_case_or_spaces_is_named(tmp_path: Path) -> None:
    """A hand-written 'id, text' header's column is ' text' and Excel's may be 'Text': the listing of the columns
    hid the space, so the error names the column and the flag that reads it."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    write(tmp_path / "s.csv", "id, text\n1, hello there\n")
    write(tmp_path / "c.tsv", "id\tText\n1\thello there\n")
    pq.write_table(pa.table({"Text": ["hello there"]}), tmp_path / "p.parquet")
    for name, column in (("s.csv", "' text'"), ("c.tsv", "Text"), ("p.parquet", "Text")):
        with pytest.raises(
            DataError, match=rf"no column 'text' .*; the column is spelled .*: pass --text-field {column}$"
        ):
            run(tmp_path, [tmp_path / name])
    assert run(tmp_path, [tmp_path / "s.csv"], text_field=" text")["documents"]["out"] == 1


@pytest.mark.parametrize(("name", "header"), [("s.csv", "id;text"), ("t.csv", "id\ttext"), ("c.tsv", "id,text")])
def test_a_table_with_another_delimiter_says_so(tmp_path: Path, name: str, header: str) -> None:
    # a semicolon CSV read as one column was told to 'choose one with --text-field' (columns: id;text)
    write(tmp_path / name, f"{header}\n{header.replace('id', '1').replace('text', 'hello')}\n")
    with pytest.raises(DataError, match=r"no column 'text' .*; the file looks '.+'-separated, .* save it with commas"):
        run(tmp_path, [tmp_path / name])
    write(tmp_path / "h.csv", "hello there,1\n")  # a headerless file keeps the --text-field advice
    with pytest.raises(DataError, match=r"h\.csv: no column 'text' \(columns: hello there, 1\); choose one with"):
        run(tmp_path, [tmp_path / "h.csv"])


def test_ragged_csv_row(tmp_path: Path) -> None:
    write(tmp_path / "t.csv", "a,text\n1,fine\n2\n")
    with pytest.raises(DataError, match=r"t\.csv:3: row has 1 fields but the header has 2"):
        run(tmp_path, [tmp_path / "t.csv"])
    assert_nothing_written(tmp_path)
    # a quote never closed would make the rest of the file one document: an error at the row that opened it
    write(tmp_path / "t.csv", 'a,text\n1,"multi\nline, fine"\n2,"stray quote\n3,next\n4,last\n')
    with pytest.raises(DataError, match=r"t\.csv:4: a quote opened in this row is never closed"):
        run(tmp_path, [tmp_path / "t.csv"])
    assert_nothing_written(tmp_path)
    # text after a quoted field's closing quote: the error said only "',' expected after '\"'"
    write(tmp_path / "t.csv", 'text,label\nfine,1\n"Hi" he said.,0\n')
    with pytest.raises(DataError, match=r"t\.csv:3: not valid CSV .*quote the whole field and write the quotes in it"):
        run(tmp_path, [tmp_path / "t.csv"])
    assert_nothing_written(tmp_path)
    # in a .tsv that is a plain TSV's sentence that starts with a quote (Tatoeba's), read as written (data/tsv.py)
    (tmp_path / "t.csv").unlink()
    write(tmp_path / "t.tsv", 'text\tlabel\nfine\t1\n"Hi," he said.\t0\n')
    run(tmp_path, [tmp_path / "t.tsv"], dedup="none")
    assert sorted(docs_by_split(tmp_path / "out")["train"]) == ['"Hi," he said.', "fine"]


@pytest.mark.parametrize("name", ["t.csv", "t.tsv"])
def test_a_row_with_more_fields_than_the_header_is_an_error(tmp_path: Path, name: str) -> None:
    # an unquoted delimiter in the text ('hello, world and more') made the document 'hello', the rest dropped silently
    sep = "\t" if name.endswith(".tsv") else ","
    write(tmp_path / name, f"id{sep}text\n1{sep}fine\n2{sep}hello{sep} world and more\n")
    with pytest.raises(DataError, match=rf"{name}:3: row has 3 fields but the header has 2; .*quote fields"):
        run(tmp_path, [tmp_path / name])
    assert_nothing_written(tmp_path)
    write(tmp_path / name, f"id{sep}text\n1{sep}fine{sep}\n")  # an empty extra (a trailing delimiter) loses no text
    run(tmp_path, [tmp_path / name])
    assert docs_by_split(tmp_path / "out")["train"] == ["fine"]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = TEXTS * 100  # several record batches of 1,024 rows
    pq.write_table(pa.table({"n": list(range(len(rows))), "text": rows}), tmp_path / "a.parquet", row_group_size=300)
    m = run(tmp_path, [tmp_path], dedup="none")
    assert m["documents"]["in"] == len(rows) and [Path(i["path"]).name for i in m["inputs"]] == ["a.parquet"]
    assert sorted(docs_by_split(tmp_path / "out")["train"]) == sorted(rows)
    with pytest.raises(DataError, match=r"no column 'body' \(columns: n, text\)"):
        run(tmp_path, [tmp_path / "a.parquet"], out="o2", text_field="body")
    with pytest.raises(DataError, match=r"column 'n' holds int64, not strings"):
        run(tmp_path, [tmp_path / "a.parquet"], out="o3", text_field="n")
    cat = tmp_path / "cat" / "c.parquet"  # a dictionary-encoded column (pandas Categorical) holds strings too
    cat.parent.mkdir()
    pq.write_table(pa.table({"text": pa.array(TEXTS * 2).dictionary_encode()}), cat)
    run(tmp_path, [cat], out="o5", dedup="none")
    assert sorted(docs_by_split(tmp_path / "o5")["train"]) == sorted(TEXTS * 2)
    chapters = tmp_path / "lists" / "l.parquet"  # a list of strings per row (paragraphs): joined, as in .json
    chapters.parent.mkdir()
    pq.write_table(pa.table({"text": [["子曰", "有子曰"], ["one", None, "two"], None]}), chapters)
    assert [d.text for d in read_documents(chapters)] == ["子曰\n有子曰", "one\ntwo", None]  # a null row: no text
    (tmp_path / "lists" / "l.json").write_text(json.dumps([{"text": ["子曰", "有子曰"]}]), encoding="utf-8")
    assert [d.text for d in read_documents(tmp_path / "lists" / "l.json")] == ["子曰\n有子曰"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        run(tmp_path, [tmp_path / "bad.parquet"], out="o4")
    assert not (tmp_path / "o4").exists()


def test_a_dotted_text_field_reaches_into_a_parquet_struct_column(tmp_path: Path) -> None:
    """Nested records written to Parquet (pandas, `datasets`) are struct columns: `--text-field doc.body` was "no
    column 'doc.body' (columns: id, doc)", and no --text-field could read them, where the same records in JSONL
    read. A dotted path now descends into struct fields (a null record or field is no text); a column literally
    named with a dot wins, and a wrong field names the fields there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"body": "first body", "meta": {"lang": "en"}}, None, {"body": None, "meta": None}, {"body": "last"}]
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "doc": pa.array(records), "doc.x": ["a", "b", "c", "d"]}), path)
    assert [d.text for d in read_documents(path, text_field="doc.body")] == ["first body", None, None, "last"]
    assert [d.text for d in read_documents(path, text_field="doc.meta.lang")] == ["en", None, None, None]
    assert [d.text for d in read_documents(path, text_field="doc.x")] == ["a", "b", "c", "d"]
    with pytest.raises(DataError, match=r"no field 'text' in column 'doc' \(its fields: body, meta\)"):
        list(read_documents(path, text_field="doc.text"))
    with pytest.raises(DataError, match=r"no field 'y' in column 'doc\.body' \(it holds string\)"):
        list(read_documents(path, text_field="doc.body.y"))
    m = run(tmp_path, [path], tokenizer="char", text_field="doc.body")
    assert m["documents"]["removed"]["no_text"] == 2 and docs_by_split(tmp_path / "out")["train"] == [
        "first body",
        "last",
    ]


def test_a_row_with_no_text_is_skipped_and_counted_in_every_format(tmp_path: Path) -> None:
    """A null (JSON, Parquet), an empty CSV/TSV cell and a JSON record without the field are one thing: a row with no
    text, skipped and counted per input. A Parquet null was counted as "empty" while a JSON null stopped the run;
    a record without the field stopped it too, though only a field that no row holds is a wrong --text-field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.data.card import notes

    texts = [f"{TEXTS[0]} {i}" for i in range(10)]
    pq.write_table(pa.table({"text": [texts[0], None, texts[1]]}), tmp_path / "a.parquet")
    rows = [{"text": texts[2]}, {"text": None}, {"id": 7}, {"text": texts[3]}]
    write(tmp_path / "b.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(tmp_path / "c.json", json.dumps([texts[4], None, {"id": 1}, {"text": None}, {"text": texts[5]}]))
    write(tmp_path / "d.csv", f"id,text\n1,{texts[6]}\n2,\n3,{texts[7]}\n")
    write(tmp_path / "e.tsv", f"text\tid\n{texts[8]}\t1\n\t2\n{texts[9]}\t3\n")
    m = run(tmp_path, sorted(tmp_path.iterdir()) + [tmp_path / "c.json"], dedup="none", tokenizer="char")
    assert {Path(i["path"]).name: i["no_text"] for i in m["inputs"]} == {
        "a.parquet": 1, "b.jsonl": 2, "c.json": 3, "d.csv": 1, "e.tsv": 1
    }  # fmt: skip
    assert m["documents"]["removed"]["no_text"] == 8 and m["documents"]["removed"]["empty"] == 0
    assert m["documents"]["in"] == 18 and sorted(docs_by_split(tmp_path / "out")["train"]) == sorted(texts)
    said = [n for n in notes(m) if "no text" in n]
    assert len(said) == 5 and "b.jsonl: 2 of 4 rows have no text" in said[1] and "\n" not in "".join(said)
    # a field no row holds is a wrong name: one line, naming the first row and its keys (block-read JSONL too)
    write(tmp_path / "f.json", json.dumps([{"id": 1, "body": "x"}, {"id": 2}]))
    for name, where in (
        ("b.jsonl", r"b\.jsonl:1: no field 'body' \(keys: text\)"),
        ("f.json", r"item 1 has no field 'text'"),
    ):
        with pytest.raises(
            DataError, match=where + r".*nor has any other row; choose the text field with --text-field"
        ):
            run(tmp_path, [tmp_path / name], out="o2", text_field="text" if name == "f.json" else "body")
    assert not (tmp_path / "o2").exists()


def test_hf_save_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))})
    ds.save_to_disk(str(tmp_path / "ds"))
    dd = datasets.DatasetDict({"train": ds.select(range(10)), "test": ds.select(range(10, len(TEXTS)))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert file_format(tmp_path / "ds") == "hf_disk" and file_format(tmp_path / "dd") == "hf_disk"
    m = run(tmp_path, [tmp_path / "ds"])
    assert m["documents"]["in"] == len(TEXTS) and m["inputs"][0]["bytes"] > 0
    assert sorted(docs_by_split(tmp_path / "out")["train"]) == sorted(TEXTS)
    m = run(tmp_path, [tmp_path / "dd"], out="out2")  # a DatasetDict: all its splits
    assert m["documents"]["in"] == len(TEXTS)
    assert run(tmp_path, [tmp_path / "dd" / "test"], out="out3")["documents"]["in"] == len(TEXTS) - 10
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        run(tmp_path, [tmp_path / "ds"], out="out4", text_field="body")


def test_a_save_to_disk_dataset_inside_a_folder_is_read(tmp_path: Path) -> None:
    """A corpus folder holding a saved dataset (and a DatasetDict) beside text files reads them all; the walk
    used to skip the datasets' .arrow files, so they went missing with only a note about their .json files."""
    datasets = pytest.importorskip("datasets")
    corpus = tmp_path / "corpus"
    datasets.Dataset.from_dict({"text": TEXTS[:6]}).save_to_disk(str(corpus / "web"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[6:9]})})
    dd.save_to_disk(str(corpus / "sub" / "books"))
    write(corpus / "notes.txt", "\n\n".join(TEXTS[9:]))
    m = run(tmp_path, [corpus])
    assert [i["path"] for i in m["inputs"]] == [str(corpus / p) for p in ("notes.txt", "sub/books", "web")]
    assert m["skipped_files"] == [] and m["documents"]["in"] == len(TEXTS)
    assert sorted(docs_by_split(tmp_path / "out")["train"]) == sorted(TEXTS)
    # `corpus/**` lists the datasets' own files too: they are not skipped files (nor a note to read their .json)
    assert resolve_inputs([f"{corpus}/**"]) == (
        sorted([corpus / "notes.txt", corpus / "sub/books", corpus / "web"]),
        [],
    )


def test_hub_input_on_a_local_dataset_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hf:NAME` goes through `datasets.load_dataset(streaming=True)`; a local folder laid out like a hub
    dataset repo (one data file per split) exercises that path offline, with the split and column checks."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    repo = tmp_path / "repo"
    repo.mkdir()
    for split, texts in (("train", TEXTS[:10]), ("test", TEXTS[10:])):
        (repo / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "n": 1}) + "\n" for t in texts))
    m = run(tmp_path, [f"hf:{repo}"])
    assert m["documents"]["in"] == 10 and m["inputs"][0]["path"] == f"hf:{repo}"
    assert sorted(docs_by_split(tmp_path / "out")["train"]) == sorted(TEXTS[:10])
    assert run(tmp_path, [f"hf:{repo}::test"], out="out2")["documents"]["in"] == len(TEXTS) - 10
    with pytest.raises(DataError, match=r"cannot load from the hub \(.*nope"):
        run(tmp_path, [f"hf:{repo}::nope"], out="out3")
    assert not (tmp_path / "out3").exists()
    with pytest.raises(DataError, match="no column 'body'"):
        run(tmp_path, [f"hf:{repo}"], out="out4", text_field="body")


def test_format_detection_and_hub_names() -> None:
    assert [file_format(n) for n in ("a.CSV", "b.tsv.gz", "c.jsonl.zst", "d.parquet", "e.txt.zst", "f.log")] == [
        "csv", "tsv", "jsonl", "parquet", "text", "text"
    ]  # fmt: skip
    assert is_known_format("x.md.zst") and not is_known_format("x.log") and not is_known_format("x.parquet.gz")
    assert file_format("hf:roneneldan/TinyStories") == "hf_hub"
    assert parse_hub_name("hf:wikitext:wikitext-2-raw-v1:validation") == ("wikitext", "wikitext-2-raw-v1", "validation")
    assert parse_hub_name("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    with pytest.raises(DataError, match="hf:NAME"):
        parse_hub_name("hf:a:b:c:d")
    assert resolve_inputs(["hf:org/name"])[0] == [Path("hf:org/name")]


def test_corrupt_zst(tmp_path: Path) -> None:
    (tmp_path / "a.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage that is not a zstd frame")
    with pytest.raises(DataError, match=r"a\.txt\.zst: cannot decompress"):
        run(tmp_path, [tmp_path / "a.txt.zst"])
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("name", ["cut.txt.zst", "cut.jsonl.zst"])
def test_truncated_zst_is_an_error(tmp_path: Path, name: str) -> None:
    # zstandard's stream_reader read a .zst cut short as a shorter text (here: nothing), with no error
    import zstandard

    texts = sentences(300, seed=23)
    body = "\n\n".join(texts) if name.endswith(".txt.zst") else "".join(json.dumps({"text": t}) + "\n" for t in texts)
    whole = zstandard.ZstdCompressor().compress(body.encode("utf-8"))
    (tmp_path / name).write_bytes(whole[: len(whole) - 20])
    with pytest.raises(DataError, match=rf"{name}: (cannot decompress|read failed) \(.*truncated"):
        run(tmp_path, [tmp_path / name])
    assert_nothing_written(tmp_path)
    frames = zstandard.ZstdCompressor().compress(body[:500].encode()) + zstandard.ZstdCompressor().compress(b"")
    (tmp_path / name).write_bytes(frames + zstandard.ZstdCompressor().compress(body[500:].encode()))
    assert [d.text for d in read_documents(tmp_path / name)] == [d.text for d in read_documents(_plain(tmp_path, body))]


def _plain(tmp_path: Path, body: str) -> Path:
    path = tmp_path / ("plain.jsonl" if body.startswith("{") else "plain.txt")
    path.write_text(body, encoding="utf-8")
    return path


def test_mixed_encodings_are_an_error(tmp_path: Path) -> None:
    utf8 = "\n\n".join(sentences(30, seed=22)).encode("utf-8")
    gbk = ("\n\n" + "中文段落使用了另一种编码。" * 20).encode("gbk")
    write(tmp_path / "mixed.txt", utf8 + gbk)
    with pytest.raises(DataError, match=r"mixed\.txt: \d+ invalid UTF-8 sequences .* mixes encodings.*iconv"):
        run(tmp_path, [tmp_path / "mixed.txt"])
    assert_nothing_written(tmp_path)
    m = run(tmp_path, [tmp_path / "mixed.txt"], max_invalid_utf8=1.0)  # opt out: replace and count
    assert m["cleaning"]["invalid_utf8_replaced"] > 16


def test_over_long_line_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "x" * 5000}) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:2: a line longer than 1,000 bytes.*--max-line-bytes"):
        run(tmp_path, [tmp_path / "a.jsonl"], max_line_bytes=1000)
    assert_nothing_written(tmp_path)
    write(tmp_path / "b.txt", "y" * 5000)
    with pytest.raises(DataError, match=r"b\.txt: longer than 1,000 bytes"):
        run(tmp_path, [tmp_path / "b.txt"], max_line_bytes=1000, doc_unit="file")
    docs = list(read_documents(tmp_path / "b.txt", max_line_bytes=5000))
    assert [len(d.text) for d in docs] == [5000]


def test_bz2_and_xz_inputs_say_to_decompress_them(tmp_path: Path) -> None:
    # a .bz2/.xz corpus (OpenWebText ships .xz) was 'looks like a binary file, not text; remove it from the inputs'
    # when named, and 'no readable ... files; check the paths' as a folder
    import bz2
    import lzma

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt.bz2").write_bytes(bz2.compress(b"some text " * 50))
    (tmp_path / "c" / "b.jsonl.xz").write_bytes(lzma.compress(b'{"text": "doc"}\n' * 50))
    with pytest.raises(DataError, match=r"a\.txt\.bz2: \.bz2 files are not read .*bunzip2 -k '.*a\.txt\.bz2'"):
        run(tmp_path, [tmp_path / "c" / "a.txt.bz2"])
    with pytest.raises(DataError, match=r"b\.jsonl\.xz: \.xz files are not read .*unxz -k"):
        run(tmp_path, [tmp_path / "c" / "b.jsonl.xz"])
    with pytest.raises(DataError, match=r"no readable .*a\.txt\.bz2 and the like are not read .* decompress them"):
        run(tmp_path, [tmp_path / "c"])
    assert_nothing_written(tmp_path)


def test_folder_of_other_extensions_says_to_name_the_files(tmp_path: Path) -> None:
    # a folder of .log (or extensionless) files was 'no readable ... files in the inputs; check the paths'
    write(tmp_path / "logs" / "a.log", "a log line of text")
    with pytest.raises(DataError, match=r"skip files of other extensions \(such as .*a\.log\);.*'.*logs/\*\.log'"):
        run(tmp_path, [tmp_path / "logs"])
    write(tmp_path / "notes" / "README", "notes")
    with pytest.raises(DataError, match=r"\(such as .*README\); name them as inputs .*e\.g\. '.*notes/README'"):
        run(tmp_path, [tmp_path / "notes"])
    assert_nothing_written(tmp_path)
    run(tmp_path, [str(tmp_path / "logs" / "*.log")], tokenizer="char", card=False)


def test_empty_folder_and_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="input folder .* is empty"):
        run(tmp_path, [tmp_path / "empty"])
    write(tmp_path / "dump" / "a.json", json.dumps(["a document"]))  # folders skip .json: say how to read it
    with pytest.raises(DataError, match=r"folders skip \.json files \(such as .*a\.json\); name them as inputs"):
        run(tmp_path, [tmp_path / "dump"])
    write(tmp_path / "secret.txt", "text")
    os.chmod(tmp_path / "secret.txt", 0)
    try:
        if os.access(tmp_path / "secret.txt", os.R_OK):
            pytest.skip("running as root: chmod 0 does not stop reading")
        with pytest.raises(DataError, match=r"cannot read .*secret\.txt"):
            run(tmp_path, [tmp_path / "secret.txt"])
    finally:
        os.chmod(tmp_path / "secret.txt", 0o644)
    assert_nothing_written(tmp_path)


def test_a_folder_of_hidden_files_is_not_called_empty(tmp_path: Path) -> None:
    """A folder holding only hidden files or folders (`.drafts/`, `.notes.txt`) was "input folder ... is empty",
    which it is not: the folder search skips names that start with '.'. The error says so, and naming one reads it."""
    write(tmp_path / "corpus" / ".drafts" / "a.txt", "\n\n".join(sentences(5, seed=1)))
    write(tmp_path / "corpus" / ".notes.txt", "a hidden note")
    with pytest.raises(
        DataError, match=r"holds only hidden files or folders \(\.drafts, \.notes\.txt\).*start with '\.'"
    ):
        run(tmp_path, [tmp_path / "corpus"], tokenizer="char")
    assert run(tmp_path, [tmp_path / "corpus" / ".drafts"], tokenizer="char")["documents"]["in"] == 5


def test_json_array_files(tmp_path: Path) -> None:
    """A .json file named explicitly: an array of strings or objects (a list of strings under the field is
    joined), JSON Lines under a .json name; a missing field lists the keys; folders skip .json."""
    write(tmp_path / "arr.json", json.dumps(["first doc", {"text": "second doc"}, {"text": ["third", "doc"]}]))
    write(tmp_path / "lines.json", '{"text": "fourth doc"}\n{"text": "fifth doc"}\n')
    docs = [d.text for name in ("arr.json", "lines.json") for d in read_documents(tmp_path / name)]
    assert docs == ["first doc", "second doc", "third\ndoc", "fourth doc", "fifth doc"]
    # a lone \r between JSON tokens is whitespace, as in a .jsonl file: the lines end at \n only
    lines = '{"text":\r "sixth doc"}\r\n{"text": "seventh doc"}\n'
    for name in ("cr.json", "cr.jsonl"):
        (tmp_path / name).write_bytes(lines.encode())
        assert [d.text for d in read_documents(tmp_path / name)] == ["sixth doc", "seventh doc"], name
    write(tmp_path / "keys.json", json.dumps([{"chapter": "学而", "paragraphs": ["子曰", "有子曰"]}]))
    with pytest.raises(DataError, match=r"item 1 has no field 'text' \(keys: chapter, paragraphs\)"):
        list(read_documents(tmp_path / "keys.json"))
    assert [d.text for d in read_documents(tmp_path / "keys.json", text_field="paragraphs")] == ["子曰\n有子曰"]
    # objects under the field (古文观止: volumes whose 'content' lists pieces): "got list" read as if a list were fine
    nested = {"title": "古文观止", "content": [{"title": "卷一", "content": [{"paragraphs": ["郑伯克段于鄢"]}]}]}
    write(tmp_path / "nested.json", json.dumps(nested, ensure_ascii=False))
    with pytest.raises(
        DataError, match=r"'content' holds objects \(keys: title, content\), not text; .* content\.KEY$"
    ):
        list(read_documents(tmp_path / "nested.json", text_field="content"))
    docs = read_documents(tmp_path / "nested.json", text_field="content.content.paragraphs")
    assert [d.text for d in docs] == ["郑伯克段于鄢"]
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "meta.json", '{"version": 1}')
    write(folder / "a.txt", "plain text")
    assert resolve_inputs([str(folder)]) == ([folder / "a.txt"], [str(folder / "meta.json")])


def test_jsonl_list_of_strings_is_joined_as_in_json(tmp_path: Path) -> None:
    # the same objects as a .json array and as JSON Lines (.jsonl, or under a .json name) give the same documents;
    # the lines were refused ("field 'text' is list, not a string; choose the field") where the array was read
    records = [{"text": ["子曰", "有子曰"]}, {"text": "plain"}]
    write(tmp_path / "arr.json", json.dumps(records))
    lines = "".join(json.dumps(r) + "\n" for r in records)
    write(tmp_path / "a.jsonl", lines)
    write(tmp_path / "lines.json", lines)
    for name in ("arr.json", "a.jsonl", "lines.json"):
        assert [d.text for d in read_documents(tmp_path / name)] == ["子曰\n有子曰", "plain"], name
    # a null in the list is left out, as Parquet's list columns leave it out (it was an error here)
    nulls = [{"text": ["子曰", None, "有子曰"]}, {"text": [None]}]
    write(tmp_path / "n.jsonl", "".join(json.dumps(r) + "\n" for r in nulls))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": [r["text"] for r in nulls]}), tmp_path / "n.parquet")
    for name in ("n.jsonl", "n.parquet"):
        assert [d.text for d in read_documents(tmp_path / name)] == ["子曰\n有子曰", ""], name
    # an object under the field names its keys and the dotted path, in .jsonl as in .json (it said "is dict")
    write(tmp_path / "o.jsonl", json.dumps({"text": {"en": "hi", "zh": "你好"}}) + "\n")
    with pytest.raises(
        DataError, match=r"o\.jsonl:1: 'text' holds objects \(keys: en, zh\), .* --text-field text\.KEY$"
    ):
        list(read_documents(tmp_path / "o.jsonl"))
    assert [d.text for d in read_documents(tmp_path / "o.jsonl", text_field="text.zh")] == ["你好"]
    write(tmp_path / "b.jsonl", json.dumps({"text": ["a", 1]}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'text' is list \(\[.a., 1\]\), not a string \(or a list"):
        list(read_documents(tmp_path / "b.jsonl"))


def test_labels_read_the_same_from_json_and_csv(tmp_path):
    """JSON `true` was the label "True" and a CSV's `true` the label "true", so a --val CSV was refused as
    holding labels the model was never trained on; JSON 1 and 1.0 and CSV "1" are one label too."""
    from lmforge.data.formats import label_name
    from lmforge.data.tables import field_map, read_task_rows

    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": true}\n{"text": "y", "label": 1.0}\n', encoding="utf-8")
    (tmp_path / "b.csv").write_text("text,label\nx,true\ny,1\n", encoding="utf-8")
    fields = field_map("classify", [])
    names = [
        [label_name(r["label"]) for r in read_task_rows(tmp_path / f, "classify", fields)] for f in ("a.jsonl", "b.csv")
    ]
    assert names[0] == names[1] == ["true", "1"]
    assert label_name(False) == "false" and label_name(0) == "0"


def test_a_dotted_text_field_reaches_into_nested_json(tmp_path):
    """A book stored as nested objects (as guwenguanzhi.json: volumes holding chapters holding paragraphs)
    is one document per chapter; in JSONL a dotted path reads a nested field. A literal dotted key wins."""
    from lmforge.errors import DataError

    book = {
        "title": "古文觀止",
        "content": [
            {
                "title": "卷一",
                "content": [{"chapter": "a", "paragraphs": ["第一段。", "第二段。"]}, {"paragraphs": "一段"}],
            },
            {"title": "卷二", "content": [{"chapter": "c", "paragraphs": ["另一章。"]}]},
        ],
    }
    (tmp_path / "book.json").write_text(json.dumps(book, ensure_ascii=False), encoding="utf-8")
    docs = [d.text for d in read_documents(tmp_path / "book.json", text_field="content.content.paragraphs")]
    assert docs == ["第一段。\n第二段。", "一段", "另一章。"]
    with pytest.raises(DataError, match=r"its top-level object: no field 'text' at 'content\[0\]\.content\[0\]'"):
        list(read_documents(tmp_path / "book.json", text_field="content.content.text"))
    with pytest.raises(DataError, match=r"'content\[0\]\.title' is dict|no field"):
        list(read_documents(tmp_path / "book.json", text_field="content.title.x"))

    rows = [{"doc": {"body": "nested text"}, "a.b": "literal key"}, {"doc": {"body": ["two", "lines"]}, "a.b": "x"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert [d.text for d in read_documents(tmp_path / "rows.jsonl", text_field="doc.body")] == [
        "nested text",
        "two\nlines",
    ]
    assert [d.text for d in read_documents(tmp_path / "rows.jsonl", text_field="a.b")] == ["literal key", "x"]
    with pytest.raises(DataError, match=r"rows\.jsonl:1: no field 'text' at 'doc' \(found: body\)"):
        list(read_documents(tmp_path / "rows.jsonl", text_field="doc.text"))


def test_a_dotted_text_field_walks_empty_lists_and_names_the_item_missing_a_key(tmp_path):
    """An empty list on the way (a chapter with no paragraphs yet) holds no documents; it was an error saying
    "no field 't' at 'doc.paras' (found: a list)", which no --text-field could fix. An item of a walked list
    without the key is an error naming the line and the item, as a missing flat --text-field is."""
    rows = [
        {"doc": {"paras": [{"t": "p one"}, {"t": ["p", "two"]}]}},
        {"doc": {"paras": []}},
        {"doc": {"paras": [{"t": "p3"}]}},
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert [d.text for d in read_documents(tmp_path / "r.jsonl", text_field="doc.paras.t")] == ["p one", "p\ntwo", "p3"]
    rows[2]["doc"]["paras"].append({"u": "no t"})
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"r\.jsonl:3: no field 't' at 'doc\.paras\[1\]' \(found: u\); choose the text"):
        list(read_documents(tmp_path / "r.jsonl", text_field="doc.paras.t"))


def test_a_null_at_a_dotted_text_field_is_no_text_as_a_flat_null_is(tmp_path: Path) -> None:
    """`{"doc": {"body": null}}` (a nested export's missing text) stopped the run with "field 'doc.body' is
    NoneType" at its line, where `{"text": null}` is skipped and counted under no_text. Now the dotted null is
    too, in .jsonl and .json, and in a walked list (`doc.paras.t`); a number there is still an error."""
    rows = [
        {"doc": {"body": "first body"}},
        {"doc": {"body": None}},
        {"doc": {"body": ["a", None, "b"]}},
        {"doc": [{"body": "listed"}, {"body": None}]},
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "r.json").write_text(json.dumps(rows), encoding="utf-8")
    for name in ("r.jsonl", "r.json"):
        docs = [d.text for d in read_documents(tmp_path / name, text_field="doc.body")]
        assert docs == ["first body", None, "a\nb", "listed", None]
    m = run(tmp_path, [tmp_path / "r.jsonl"], tokenizer="char", text_field="doc.body")
    assert m["documents"]["removed"]["no_text"] == 2 and m["documents"]["out"] == 3
    (tmp_path / "n.jsonl").write_text(json.dumps({"doc": {"body": 7}}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"n\.jsonl:1: field 'doc\.body' is int"):
        list(read_documents(tmp_path / "n.jsonl", text_field="doc.body"))


def test_a_jsonl_row_whose_text_is_a_number_is_named_with_its_type(tmp_path: Path) -> None:
    """One row whose text field holds a number or a bool among string rows was refused with only "choose the text
    field with --text-field", though the field was right: the error names the line, the type and the value, and
    says to fix that row first (a null is skipped and counted under no_text, as before)."""
    rows = [{"text": "a sentence"}, {"text": None}, {"text": 42}, {"text": "another"}]
    path = write(tmp_path / "odd.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"odd\.jsonl:3: field 'text' is int \(42\), not a string.*; fix that row"):
        list(read_documents(path))
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": True}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"odd\.jsonl:2: field 'text' is bool \(true\).*or if the field holds no text"):
        list(read_documents(path))
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": None}) + "\n", encoding="utf-8")
    assert [d.text for d in read_documents(path)] == ["ok", None]


def test_a_bom_at_the_start_of_any_jsonl_line_is_read_past(tmp_path: Path) -> None:
    """`cat a.jsonl b.jsonl` of two files a Windows editor saved puts b.jsonl's BOM (U+FEFF) at the start of a line
    in the middle: `prepare` (whole-file and block readers) and `finetune` (read_table) read it, where it was a
    one-line error ("ab.jsonl:2: not valid JSON (Unexpected UTF-8 BOM ...)"), and the BOM is not in the text."""
    from lmforge.data.ingest import block_documents, read_blocks
    from lmforge.data.tables import read_table

    rows = [{"text": "first file", "label": "a"}, {"text": "second file", "label": "b"}, {"text": "三", "label": "c"}]
    path = tmp_path / "ab.jsonl"
    path.write_bytes(b"".join(b"\xef\xbb\xbf" + json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows))
    texts = [r["text"] for r in rows]
    assert [doc.text for doc in read_documents(path)] == texts
    blocks = read_blocks(path, block_bytes=30)
    assert [doc.text for block in blocks for doc in block_documents(block, path)] == texts
    assert read_table(path) == rows
    m = run(tmp_path, [path], tokenizer="char")
    assert m["documents"]["out"] == 3 and docs_by_split(tmp_path / "out")["train"] == texts


def test_a_task_file_column_named_twice_is_refused(tmp_path: Path) -> None:
    """A CSV/TSV task file naming a column twice ('text,text,label') read the last of them without a word, and a
    Parquet one was "not a readable Parquet file; re-create it"; finetune now refuses each naming the column, as
    prepare refuses its text column named twice. A blank name a trailing delimiter repeats is no column: it reads."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.data.tables import read_table

    (tmp_path / "a.csv").write_text("text,text,label\nfirst,second,pos\n", encoding="utf-8")
    (tmp_path / "a.tsv").write_text("label\ttext\ttext\npos\tfirst\tsecond\n", encoding="utf-8")
    table = pa.Table.from_arrays(
        [pa.array(["first"]), pa.array(["second"]), pa.array(["pos"])], ["text", "text", "label"]
    )
    pq.write_table(table, tmp_path / "a.parquet")
    for name in ("a.csv", "a.tsv", "a.parquet"):
        with pytest.raises(DataError, match=r"a\.\w+: 2 columns are named 'text'.*rename all but one"):
            read_table(tmp_path / name)
    (tmp_path / "b.csv").write_text("text,label,,\nfirst,pos,,\n", encoding="utf-8")
    assert read_table(tmp_path / "b.csv")[0]["text"] == "first"


def test_a_file_named_without_an_extension_is_read_by_its_content(tmp_path: Path) -> None:
    """`prepare corpus` (a JSON Lines file saved without an extension) prepared each raw line of JSON as a document,
    where `finetune --train corpus` reads it by its content. A file named without any extension is JSON Lines when
    its first non-blank line is a JSON object (gzip-compressed too), else text, as before."""
    import gzip

    lines = '\n{"text": "第一篇"}\n{"text": "second one"}\n'
    (tmp_path / "corpus").write_text(lines, encoding="utf-8")
    (tmp_path / "corpus.gz").write_bytes(gzip.compress(("\ufeff" + lines).encode("utf-8")))
    for name in ("corpus", "corpus.gz"):
        assert file_format(tmp_path / name) == "jsonl"
        assert [d.text for d in read_documents(tmp_path / name)] == ["第一篇", "second one"], name
    (tmp_path / "notes").write_text("{curly} text\n\nnot JSON\n", encoding="utf-8")
    (tmp_path / "list").write_text('["a JSON list"]\n', encoding="utf-8")
    (tmp_path / "log.txt2").write_text('{"text": "an unknown extension is text, as before"}\n', encoding="utf-8")
    for name in ("notes", "list", "log.txt2"):
        assert file_format(tmp_path / name) == "text", name
    assert [d.text for d in read_documents(tmp_path / "notes")] == ["{curly} text\n", "not JSON\n"]


def test_clm_reads_a_file_in_the_format_prepare_reads_it_in(tmp_path: Path) -> None:
    """`finetune --task clm` sniffed any file not named .txt/.md/.json/... as JSON when it started with `{` or `[`
    (`{curly} text` was refused as bad JSON, a `log.txt2` of JSON lines read as rows), where `prepare` reads the same
    file as text. Both read it alike now: .txt and .md are text whatever they start with; a file (or pipe) named
    without an extension is JSON Lines only if its first non-blank line parses as a JSON object; else it is text."""
    from lmforge.data.tables import read_task_rows
    from tests.test_finetune import _pipe

    files = {
        "notes": "{curly} text\n\nnot JSON\n",
        "list": '["a JSON list"]\n\n[another]\n',
        "log.txt2": '{"text": "an unknown extension is text"}\n',
        "braces.txt": '{"text": "a .txt is text"}\n',
        "braces.md": "{not: json}\n\n# heading\n",
        "corpus": '\n{"text": "第一篇"}\n{"text": "second one"}\n',  # (JSON Lines, to both)
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        finetuned = [r["text"] for r in read_task_rows(tmp_path / name, "clm", {"text": "text"})]
        assert finetuned == [d.text.strip() for d in read_documents(tmp_path / name)], name
    assert finetuned == ["第一篇", "second one"]
    with _pipe(files["notes"].encode("utf-8")) as piped:
        assert read_task_rows(piped, "clm", {"text": "text"}) == [{"text": "{curly} text"}, {"text": "not JSON"}]


def test_zstandard_task_files_are_read_as_prepare_reads_them(tmp_path: Path) -> None:
    """`prepare` reads .zst inputs, but `finetune --train book.txt.zst` (clm) read the compressed bytes as text and
    `data.jsonl.zst` / `data.csv.zst` were refused; they now give the rows of the plain file, and a .zst cut short
    is one line naming the file, as a cut .gz is."""
    zstd = pytest.importorskip("zstandard")
    from lmforge.data.tables import field_map, read_task_rows

    files = {
        "book.txt": ("clm", "First paragraph,\nstill first.\n\n第二段。\n"),
        "data.jsonl": ("sft", '{"instruction": "hi", "output": "hello"}\n{"instruction": "说", "output": "好"}\n'),
        "data.csv": ("classify", "text,label\ngreat,positive\nawful,negative\n"),
    }
    for name, (task, text) in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        (tmp_path / f"{name}.zst").write_bytes(zstd.ZstdCompressor().compress(text.encode("utf-8")))
        fields = field_map(task, None)
        want = read_task_rows(tmp_path / name, task, fields)
        assert want and read_task_rows(tmp_path / f"{name}.zst", task, fields) == want, name
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes((tmp_path / "data.jsonl.zst").read_bytes()[:-6])
    with pytest.raises(DataError, match=r"cannot read .*cut\.jsonl\.zst \(.*\); check the file"):
        read_task_rows(cut, "sft", field_map("sft", None))


def test_clm_text_from_a_pipe_or_an_extensionless_file_is_documents_as_in_a_txt(tmp_path: Path, capsys) -> None:
    """`finetune --task clm --train <(zcat book.txt.gz)` or `--train corpus` made every line a document (the
    headerless tab-separated rows of a .txt table), where the same text in corpus.txt is cut into documents at
    blank lines, and a .txt.gz was read by lines too. Now plain text is documents whatever its name says (sniffed
    on its bytes: a stray invalid byte is replaced and noted, as in a .txt); `prepare` read `corpus` so already."""
    import gzip

    from lmforge.data.tables import read_rows_or_standard, read_task_rows
    from tests.test_finetune import _pipe

    data = "Chapter 1\nIt was a dark\tnight.\n \n第二段\r\n还有一行\r\n\r\nbad byte \udcff here\n".encode(
        "utf-8", "surrogateescape"
    )
    fields = {"text": "text"}
    (tmp_path / "corpus.txt").write_bytes(data)
    expected = read_task_rows(tmp_path / "corpus.txt", "clm", fields)
    assert expected == [
        {"text": "Chapter 1\nIt was a dark\tnight."},
        {"text": "第二段\n还有一行"},
        {"text": "bad byte \ufffd here"},
    ]
    (tmp_path / "corpus").write_bytes(data)
    (tmp_path / "corpus.gz").write_bytes(gzip.compress(data))
    (tmp_path / "corpus.txt.gz").write_bytes(gzip.compress(data))
    for name in ("corpus", "corpus.gz", "corpus.txt.gz"):
        assert read_task_rows(tmp_path / name, "clm", fields) == expected, name
    with _pipe(data) as piped:
        assert read_task_rows(piped, "clm", fields) == expected
    with _pipe(gzip.compress(data)) as piped:  # (renamed column: the documents are under it, read once)
        assert read_rows_or_standard(piped, "clm", {"text": "body"}) == (
            [{"body": r["text"]} for r in expected],
            {"text": "body"},
        )
    assert "1 invalid UTF-8 sequence replaced" in capsys.readouterr().err
    prepared = [d.text.replace("\r\n", "\n").strip() for d in read_documents(tmp_path / "corpus")]
    assert prepared == [r["text"] for r in expected]  # (as prepare cuts it, before cleaning)
    # JSON content is still rows, and other tasks still read plain text as tab-separated lines
    with _pipe(b'{"text": "one"}\n{"text": "two"}\n') as piped:
        assert read_task_rows(piped, "clm", fields) == [{"text": "one"}, {"text": "two"}]
    (tmp_path / "pairs").write_text("hello\tbonjour\n\nyes\toui\n", encoding="utf-8")
    assert read_task_rows(tmp_path / "pairs", "translate", {"source": "source", "target": "target"}) == [
        {"source": "hello", "target": "bonjour"},
        {"source": "yes", "target": "oui"},
    ]


def test_a_jsonl_file_with_lone_cr_line_ends_says_so(tmp_path: Path) -> None:
    """JSON Lines end at \\n (their spec), so a .jsonl saved with old-Mac lone CRs is one line of many objects: the
    error was "not valid JSON (Extra data); each line must be one JSON object", which did not say why. It names
    the line ends now, with --workers (block reader) too; CRLF files still read."""
    rows = [json.dumps({"text": t}) for t in TEXTS[:5]]
    (tmp_path / "cr.jsonl").write_bytes(("\r".join(rows) + "\r").encode())
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"cr\.jsonl:1: its lines end with a lone carriage return"):
            run(tmp_path, [tmp_path / "cr.jsonl"], tokenizer="char", workers=workers)
    (tmp_path / "crlf.jsonl").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    assert run(tmp_path, [tmp_path / "crlf.jsonl"], tokenizer="char")["documents"]["in"] == 5
