"""`prepare --workers N` gives byte-identical output to one process, whatever the files' line ends; bad
input through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.tokenizer.train import train_char
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
        ([str(tmp_path / "empty"), "--languages", "xx"], "--languages: unknown language xx; choose from zh, en"),
    ]:
        result = run_cli("prepare", *args, "--out", str(out))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and needle in result.stderr and "Traceback" not in result.stderr
        assert_nothing_written(tmp_path)


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == pid and fields[0] not in "ZX":
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_end_quietly_when_the_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL of `prepare --workers 2` alone: its workers end at once, with no traceback and no output.

    They ran the block they held to the end (seconds: ~4 MB blocks with a char tokenizer, which encodes
    slowly), then each printed two BrokenPipeError tracebacks sending its result to no one. ~3 s (imports,
    the workers' first blocks)."""
    text = shakespeare_text(1_200_000)
    for i in range(3):  # ~4.4 MB each: one block per file
        write(tmp_path / "in" / f"{i}.txt", "".join(f"[{i}.{k}] " + text for k in range(4)))
    train_char([text]).save(tmp_path / "char.json")
    out = tmp_path / "out"
    # prepare() as `lmforge prepare` calls it, in a process of its own; without the CLI's imports (torch): ~4 s less
    code = (
        "import sys; from lmforge.data.prepare import PrepareConfig, prepare; a = sys.argv; "
        "prepare(PrepareConfig(inputs=[a[1]], tokenizer=a[2], workers=2, out=a[3]), progress=False)"
    )
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stderr:
        parent = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "in"), str(tmp_path / "char.json"), str(out)],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        workers: list[int] = []
        try:
            deadline = time.monotonic() + 60
            # both workers busy with a block: each has run a tenth of a second of its own
            while not (len(workers) == 2 and all(_cpu_seconds(w) > 0.1 for w in workers)):
                assert parent.poll() is None and time.monotonic() < deadline, "prepare ended before its workers ran"
                workers = _children(parent.pid)
                time.sleep(0.02)
            parent.send_signal(signal.SIGKILL)
            parent.wait()
            deadline = time.monotonic() + 2  # (a 4 MB block takes them several seconds)
            while any(map(_alive, workers)) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not any(map(_alive, workers)), "workers outlived their killed parent"
            time.sleep(0.2)  # anything they still printed has reached the file
            stderr.seek(0)
            assert stderr.read() == ""
            assert not out.exists()
        finally:
            for pid in workers:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
