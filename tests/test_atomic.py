"""Output-directory discipline (atomic.py): lmforge builds in folders only it names and removes only
folders it made, so a user's `out.tmp` / `out.old` survive every prepare, export and import."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.atomic import TMP_MARKER, building_dir, fresh_tmp_dir, publish_dir
from tests.conftest import start_cli


def dead_pid() -> int:
    """The id of a process that has ended (so a folder marked with it is abandoned)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def users_folders(root: Path) -> None:
    for name in ("out.tmp", "out.old", "out.tmp.old"):
        (root / name).mkdir()
        (root / name / "notes.txt").write_text("precious", encoding="utf-8")


def assert_users_folders_intact(root: Path) -> None:
    for name in ("out.tmp", "out.old", "out.tmp.old"):
        assert (root / name / "notes.txt").read_text(encoding="utf-8") == "precious"


def lmforge_leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".lmforge-" in p.name)


def test_build_and_replace_never_touch_users_folders(tmp_path: Path) -> None:
    users_folders(tmp_path)
    out = tmp_path / "out"
    for text in ("first", "second"):  # a fresh out, then one replaced (--overwrite)
        with building_dir(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.lmforge-tmp-")
            (tmp / "f.txt").write_text(text, encoding="utf-8")
        assert (out / "f.txt").read_text(encoding="utf-8") == text
        assert sorted(p.name for p in out.iterdir()) == ["f.txt"]  # the marker is not published
    assert_users_folders_intact(tmp_path)
    assert lmforge_leftovers(tmp_path) == []


def test_failed_build_leaves_nothing_and_keeps_the_old_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError), building_dir(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert lmforge_leftovers(tmp_path) == []


KILLED_AT_PUBLISH = """
import os, signal, sys
from pathlib import Path
import lmforge.atomic as atomic
out = Path(sys.argv[1])
tmp = atomic.fresh_tmp_dir(out)
(tmp / "weights.bin").write_bytes(b"x" * 1000)
def replace(src, dst):  # SIGKILL as the build folder is about to become `out`
    if Path(src) == tmp:
        os.kill(os.getpid(), signal.SIGKILL)
    os.rename(src, dst)
atomic.os.replace = replace
atomic.publish_dir(tmp, out)
"""


@pytest.mark.parametrize("existing", [False, True])
def test_a_build_killed_as_it_is_published_is_cleaned_up_by_the_next_run(tmp_path: Path, existing: bool) -> None:
    """The marker used to be removed before the rename: a kill in between left an unmarked build folder that no
    later run would touch (it could be gigabytes of weights)."""
    out = tmp_path / "out"
    if existing:  # --overwrite: the old out is moved aside first, and must come back
        out.mkdir()
        (out / "old.txt").write_text("old", encoding="utf-8")
    p = subprocess.run([sys.executable, "-c", KILLED_AT_PUBLISH, str(out)], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    assert any(name.startswith(".out.lmforge-tmp-") for name in lmforge_leftovers(tmp_path))
    tmp = fresh_tmp_dir(out)  # the next run
    assert lmforge_leftovers(tmp_path) == [tmp.name]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] if existing else not out.exists()


def _mark(folder: Path, pid: int) -> None:
    folder.mkdir()
    (folder / TMP_MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}), encoding="utf-8")


def test_only_abandoned_marked_lmforge_folders_are_cleaned_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _mark(tmp_path / ".out.lmforge-tmp-dead0001", dead_pid())  # a killed build: removed
    _mark(tmp_path / ".out.lmforge-tmp-live0001", os.getpid())  # a live one: kept
    (tmp_path / ".out.lmforge-tmp-nomark01").mkdir()  # no marker: not recognisably ours, kept
    # killed mid-swap: the old out is moved aside and out is missing -> put back
    _mark(tmp_path / ".out.lmforge-old-dead0002", dead_pid())
    (tmp_path / ".out.lmforge-old-dead0002" / "out").mkdir()
    (tmp_path / ".out.lmforge-old-dead0002" / "out" / "manifest.json").write_text("{}", encoding="utf-8")
    users_folders(tmp_path)
    tmp = fresh_tmp_dir(out)
    assert (out / "manifest.json").is_file()
    assert lmforge_leftovers(tmp_path) == sorted([".out.lmforge-tmp-live0001", ".out.lmforge-tmp-nomark01", tmp.name])
    assert_users_folders_intact(tmp_path)
    publish_dir(tmp, out)
    assert not (out / "manifest.json").exists()


def test_publish_dir_puts_the_old_folder_back_when_the_file_that_goes_with_it_fails(tmp_path: Path) -> None:
    """`publish_dir(..., then=...)`: a Markdown report's page is renamed in with its `_files/` folder; when that
    rename fails the old folder is back in place and the new one is in its build folder, for `discard_tmp_dir`."""
    out = tmp_path / "report_files"
    out.mkdir()
    (out / "loss.png").write_text("old", encoding="utf-8")
    tmp = fresh_tmp_dir(out)
    (tmp / "loss.png").write_text("new", encoding="utf-8")

    def then() -> None:
        assert (out / "loss.png").read_text(encoding="utf-8") == "new"  # (runs with the new folder in place)
        raise OSError(28, "No space left on device", str(tmp_path / "report.md"))

    with pytest.raises(OSError, match="No space left"):
        publish_dir(tmp, out, then=then)
    assert (out / "loss.png").read_text(encoding="utf-8") == "old" and (tmp / "loss.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report_files", tmp.name])
    publish_dir(tmp, out, then=lambda: None)
    assert [p.name for p in tmp_path.iterdir()] == ["report_files"] and [p.name for p in out.iterdir()] == ["loss.png"]
    assert (out / "loss.png").read_text(encoding="utf-8") == "new"


def test_prepare_and_merge_keep_a_users_out_tmp(tmp_path: Path) -> None:
    from lmforge.data.prepare import PrepareConfig, prepare

    (tmp_path / "a.txt").write_text("\n\n".join(f"document number {i} " * 5 for i in range(40)), encoding="utf-8")
    users_folders(tmp_path)
    (tmp_path / "m.tmp").mkdir()
    (tmp_path / "m.tmp" / "notes.txt").write_text("precious", encoding="utf-8")
    for overwrite in (False, True):
        prepare(
            PrepareConfig(inputs=[str(tmp_path / "a.txt")], out=str(tmp_path / "out"), tokenizer="char",
                          overwrite=overwrite, card=False),
            progress=False,
        )  # fmt: skip
    assert (tmp_path / "out" / "manifest.json").is_file()
    merged = PrepareConfig(inputs=[str(tmp_path / "out")], out=str(tmp_path / "m"), merge=True, card=False)
    prepare(merged, progress=False)
    assert (tmp_path / "m" / "manifest.json").is_file()
    assert_users_folders_intact(tmp_path)
    assert (tmp_path / "m.tmp" / "notes.txt").is_file()
    assert lmforge_leftovers(tmp_path) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_prepare_like_ctrl_c_and_removes_its_build_folder(tmp_path: Path, workers: int) -> None:
    """SIGTERM (kill, docker stop, a batch scheduler) used to end the process at once, leaving the hidden build
    folder in place until some later run cleaned it up; it now stops the command as Ctrl-C does."""
    import random
    import signal
    import time

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    text = tmp_path / "in.txt"  # ~3 MB: seconds of work after the build folder appears
    text.write_text("\n\n".join(" ".join(rng.choices(words, k=50)) for _ in range(10000)), encoding="utf-8")
    args = ["prepare", str(text), "--out", str(tmp_path / "out"), "--tokenizer", "bpe", "--workers", str(workers)]
    proc = start_cli(*args)  # (forked from the tests' zygote: the signal lands in the work, not the imports)
    deadline = time.monotonic() + 120
    while not lmforge_leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "prepare ended before its build folder was seen"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.strip()) == (130, "lmforge: interrupted")
    assert lmforge_leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_failed_atomic_write_names_the_file_and_leaves_no_tmp(tmp_path: Path) -> None:
    """A full disk (a real ENOSPC: `.config.json.tmp` links to /dev/full) while writing a small file:
    the old file stays, no `.tmp` is left, and the error names the file being written."""
    from lmforge.atomic import atomic_write_text

    path = tmp_path / "config.json"
    path.write_text("old\n", encoding="utf-8")
    (tmp_path / ".config.json.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError, match=r"No space left on device: '.*config\.json'"):
        atomic_write_text(path, "new\n" * 10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert path.read_text(encoding="utf-8") == "old\n"


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as on Linux")
def test_a_failed_safetensors_write_is_an_oserror_naming_the_file(tmp_path: Path) -> None:
    """safetensors reports a failed write (a full disk; here a real EFBIG from a file-size limit) as its own
    SafetensorError, which the CLI did not catch (`export --to hf` onto a full disk ended in a traceback);
    it is now an OSError naming the file, with the errno safetensors' message gives (the CLI's line says what a
    full disk or a file-size limit needs by it)."""
    import torch

    from lmforge.atomic import save_safetensors
    from tests.conftest import file_size_limit

    with file_size_limit(1000), pytest.raises(OSError, match=r"File too large: '.*model\.safetensors'") as e:
        save_safetensors({"w": torch.zeros(1000)}, tmp_path / "model.safetensors")
    assert e.value.errno == errno.EFBIG


def test_safetensors_metadata_is_written_in_sorted_order(tmp_path: Path) -> None:
    """safetensors writes its metadata in a Rust HashMap's order, which changes from process to process: a
    checkpoint's model.safetensors (format, lmforge_step, a tied weight's name) differed byte for byte in half
    the runs with identical weights. The header is now sorted, so equal contents give equal files."""
    import torch
    from safetensors.torch import load_file

    from lmforge.atomic import save_safetensors

    metadata = {f"key{i:02d}": str(i) for i in range(16)}  # (sorted by chance once in 16! orders)
    save_safetensors({"b": torch.ones(3), "a": torch.arange(5.0)}, tmp_path / "w.safetensors", metadata)
    raw = (tmp_path / "w.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    assert list(json.loads(raw[8 : 8 + size])["__metadata__"]) == sorted(metadata)
    assert load_file(tmp_path / "w.safetensors")["a"].tolist() == [0, 1, 2, 3, 4]  # the data did not move


def test_overwrite_refuses_a_run_that_a_live_process_trains(tmp_path: Path) -> None:
    """`export/import/quantize --overwrite` onto a run folder being trained replaced it under the training,
    which went on writing checkpoints into the export; a live claim on RUN/.lock is now a one-line refusal."""
    from lmforge.atomic import check_out_dir
    from lmforge.errors import LmforgeError
    from lmforge.runs import claim, release

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    claim(run)  # what a live `pretrain` holds (flock: another open of the lock conflicts, in this process too)
    try:
        with pytest.raises(LmforgeError, match="live process is training this run"):
            check_out_dir(run, overwrite=True)
    finally:
        release(run)
    check_out_dir(run, overwrite=True)  # the training ended: replacing a finished run is what --overwrite does


@pytest.mark.skipif(os.name == "nt", reason="no flock: the callers' own fallbacks")
def test_try_lock_takes_a_free_lock_and_reports_a_held_one(tmp_path: Path) -> None:
    """The one non-blocking lock of claim, being_trained and generate --out's partial file: taken, reported held
    through another open file (another process's, or this one's), and free again once the holder closes."""
    from lmforge.atomic import try_lock
    from lmforge.runs import being_trained, claim, release

    lock = tmp_path / "file.lock"
    with open(lock, "a+", encoding="utf-8") as holder:
        assert try_lock(holder) is True
        with open(lock, "a+", encoding="utf-8") as other:
            assert try_lock(other) is False
    with open(lock, "a+", encoding="utf-8") as other:
        assert try_lock(other) is True
    run = tmp_path / "run"
    claim(run)
    try:
        assert being_trained(run) and being_trained(run)  # a probe takes nothing
    finally:
        release(run)
    assert not being_trained(run)


def test_a_marker_whose_pid_now_belongs_to_another_process_is_abandoned(tmp_path: Path) -> None:
    """A build folder marked by a killed process whose pid was reused (after a reboot, say) stayed for good,
    and an `out` moved aside mid-swap was never put back: the marker records the process's start, and a live
    pid that started at another time is not its maker."""
    from lmforge.atomic import this_process

    me = this_process()
    if "pid_start" not in me:
        pytest.skip("the process start time cannot be read on this platform")
    out = tmp_path / "out"
    for name, start in (("old-reused01", me["pid_start"] + "0"), ("tmp-live0001", me["pid_start"])):
        (tmp_path / f".out.lmforge-{name}").mkdir()
        (tmp_path / f".out.lmforge-{name}" / TMP_MARKER).write_text(
            json.dumps({**me, "pid_start": start}), encoding="utf-8"
        )
    (tmp_path / ".out.lmforge-old-reused01" / "out").mkdir()  # killed mid-swap: put back
    tmp = fresh_tmp_dir(out)
    assert out.is_dir() and lmforge_leftovers(tmp_path) == sorted([".out.lmforge-tmp-live0001", tmp.name])
    assert json.loads((tmp / TMP_MARKER).read_text(encoding="utf-8")) == me  # what a new build records
