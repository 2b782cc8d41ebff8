"""`prepare --workers N` gives byte-identical output to one process, whatever the files' line ends; bad
input through the CLI."""

from __future__ import annotations

from pathlib import Path

from lmforge.data.prepare import PrepareConfig, prepare
from tests.conftest import run_cli, shakespeare_text
from tests.test_data_prepare import assert_nothing_written, docs_by_split, write


def test_workers_give_identical_output(tmp_path: Path) -> None:
    text = shakespeare_text(120_000)
    write(tmp_path / "in" / "a.txt", text)
    write(tmp_path / "in" / "b.txt", text[: len(text) // 2])  # exact duplicates across files
    manifests = {}
    for workers in (1, 3):
        cfg = PrepareConfig(
            inputs=[str(tmp_path / "in")], out=str(tmp_path / f"w{workers}"), vocab_size=300, workers=workers,
            min_alpha_ratio=0.5, max_line_repetition=0.3,
        )  # fmt: skip
        m = prepare(cfg, progress=False)
        del m["created"], m["config"]["out"], m["config"]["workers"]
        manifests[workers] = m
    assert manifests[1] == manifests[3] and manifests[1]["documents"]["removed"]["exact_dup"] > 300
    for name in sorted(p.name for p in (tmp_path / "w1").iterdir()):
        if name != "manifest.json":  # card.md has the creation time; card.json must match
            same = (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes()
            assert same or name == "card.md", name


def test_unix_windows_and_old_mac_line_ends_prepare_the_same_data(tmp_path: Path) -> None:
    """A lone "\\r" (old Mac OS) ends a line like "\\n" and "\\r\\n", blank lines of any of them end a
    paragraph, and cleaning turns every line end into "\\n": the same text prepares to the same shards."""
    text = shakespeare_text(30_000)  # "\n" line ends, a blank line between paragraphs
    paragraphs = text.count("\n\n") + 1
    want = None
    for name, end in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")):
        write(tmp_path / name / "a.txt", text.replace("\n", end))
        write(tmp_path / name / "b.txt.gz", text[: len(text) // 3].replace("\n", end))  # compressed, duplicates
        for workers in (1, 2):
            out = tmp_path / f"{name}-{workers}"
            cfg = PrepareConfig(inputs=[str(tmp_path / name)], out=str(out), vocab_size=300, workers=workers)
            m = prepare(cfg, progress=False)
            assert m["inputs"][0]["documents"] == paragraphs, (name, workers)
            got = {
                "documents": m["documents"],
                "cleaning": m["cleaning"],
                "splits": m["splits"],
                "texts": docs_by_split(out),
                # shards and tokenizer (manifest.json and card.json name the inputs and their sizes on disk)
                "files": {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".bin" or p.stem == "tokenizer"},
            }
            want = want or got
            assert got == want, (name, workers)
    assert len(want["texts"]["train"]) > 100 and "\r" not in "".join(want["texts"]["train"])


def test_cli_bad_inputs_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    for args, needle in [
        ([str(tmp_path / "empty")], "is empty"),
        ([str(tmp_path / "nope.csv")], "does not exist"),
        ([str(tmp_path / "empty"), "--languages", "xx"], "unknown languages"),
    ]:
        result = run_cli("prepare", *args, "--out", str(out))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and needle in result.stderr and "Traceback" not in result.stderr
        assert_nothing_written(tmp_path)
