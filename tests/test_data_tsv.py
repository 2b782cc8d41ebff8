"""A .tsv reads the same in `prepare` (data/ingest.py) and in task files (data/tables.py `read_table`):
quoted fields where a CSV library quoted them (pandas, R), quotes as text in plain TSVs (data/tsv.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.data.ingest import read_documents
from lmforge.data.tables import read_table

TEXTS = ['he said "hi" to me', "a\ttab inside", "two\nlines here", "plain text", '"Look," she said.']
LABELS = ["pos", "pos", "neg", "pos", "neg"]
# as pandas' `DataFrame({"text": TEXTS, "label": LABELS}).to_csv(sep="\t", index=False)` writes them (checked below):
# a field holding a tab, a line end or a quote is quoted, its quotes doubled
PANDAS_TSV = (
    'text\tlabel\n"he said ""hi"" to me"\tpos\n"a\ttab inside"\tpos\n"two\nlines here"\tneg\n'
    'plain text\tpos\n"""Look,"" she said."\tneg\n'
)


def both_readers(path: Path) -> tuple[list[dict], list[str]]:
    """`finetune`'s rows and `prepare`'s documents (column "text") of one file."""
    return read_table(path), [d.text for d in read_documents(path)]


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_a_tsv_written_by_pandas_reads_its_quoted_fields(tmp_path: Path, line_end: str):
    """`finetune` read this file with csv.QUOTE_NONE: the quotes stayed in the text, and the quoted tab and line
    end made other columns and rows ("two" and "lines here" as two rows, labels None and "neg")."""
    path = tmp_path / "pandas.tsv"
    path.write_bytes(PANDAS_TSV.replace("\n", line_end).encode("utf-8"))
    rows, documents = both_readers(path)
    texts = [t.replace("\n", line_end) for t in TEXTS]  # a line end inside a quoted field stays as written
    assert rows == [{"text": t, "label": label} for t, label in zip(texts, LABELS, strict=True)]
    assert documents == texts


def test_the_pandas_tsv_above_is_what_pandas_writes():
    pandas = pytest.importorskip("pandas")  # (installed with the dev extras' `datasets`)
    assert pandas.DataFrame({"text": TEXTS, "label": LABELS}).to_csv(sep="\t", index=False) == PANDAS_TSV


def test_a_plain_tsv_reads_its_quotes_as_text(tmp_path: Path):
    """`prepare` read .tsv with RFC 4180 quoting: a sentence starting with a quote (Tatoeba's `"Look," she said.`)
    stopped it with "'\\t' expected after '\\"'", and an unclosed one would have swallowed the rows after it. A quote
    opening one row and one closing a later row must not merge the rows between them; a file quoted throughout
    (R's write.table) is read as quoted."""
    lines = [
        'the "best" movie ever\tpos',  # UCI / SST-style quotes inside a sentence
        '"Look," she said.\tneg',  # Tatoeba: a sentence that starts with a quote
        '"unclosed start\tpos',  # ... and never closes it
        "middle row\tneg",
        'Looks great and is strong."\tpos',  # amazon_cells_labelled.txt: a sentence that ends with a quote
        'it was "ok\tneg',
    ]
    path = tmp_path / "plain.tsv"
    path.write_text("text\tlabel\n" + "\n".join(lines) + "\n", encoding="utf-8")
    rows, documents = both_readers(path)
    assert rows == [dict(zip(("text", "label"), line.split("\t"), strict=True)) for line in lines]
    assert documents == [line.split("\t")[0] for line in lines]

    quoted = tmp_path / "r.tsv"  # R: write.table(df, sep="\t", row.names=FALSE)
    quoted.write_text('"text"\t"label"\n"good film"\t"pos"\n"say ""hi"""\t"neg"\n', encoding="utf-8")
    rows, documents = both_readers(quoted)
    assert rows == [{"text": "good film", "label": "pos"}, {"text": 'say "hi"', "label": "neg"}]
    assert documents == ["good film", 'say "hi"']


def test_a_one_column_tsv_written_by_pandas_reads_its_multi_line_fields(tmp_path: Path):
    """In a one-column file every line reads as a whole row, which made each line of a quoted multi-line document
    a document of its own, its quotes kept ('"two' and 'lines here'), where pandas reads one field."""
    texts = ["two\nlines here", 'he said "hi"', "plain", "a\n\nparagraph break"]
    path = tmp_path / "one.tsv"
    path.write_text('text\n"two\nlines here"\n"he said ""hi"""\nplain\n"a\n\nparagraph break"\n', encoding="utf-8")
    pandas = pytest.importorskip("pandas")
    assert pandas.DataFrame({"text": texts}).to_csv(sep="\t", index=False) == path.read_text(encoding="utf-8")
    rows, documents = both_readers(path)
    assert rows == [{"text": t} for t in texts]
    assert documents == texts
