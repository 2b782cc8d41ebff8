"""Atomic file writes: temp file + fsync + `os.replace`, so a reader (or a crash) never sees half a file.

Used for every small file lmforge writes in place (manifests, configs, tokenizers, checkpoint
metadata, the `latest` pointer), and for whole output directories (exports, prepared data, imports,
quantized runs): checked first, built in a hidden sibling folder only lmforge names, renamed at the
end. Its own module because data, tokenizer, checkpoint and export code all need it and none of them
should import the others for it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError


def tmp_beside(path: Path) -> Path:
    """The hidden temporary a file is written to before it is renamed over `path`: `.NAME.tmp`. (`NAME.tmp` may be
    a user's own file beside a `--out` of their choosing, e.g. `report.html.tmp`: it was overwritten, then renamed
    away.)"""
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError raised in the block names `path` when it named no file: a write through an open file (a full
    disk's ENOSPC, a file-size limit's EFBIG) raises a bare "[Errno 28] No space left on device", and the CLI's
    one line then said nothing of which file, or which --out, to free space for."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """`with replacing(path) as tmp:` write the whole file to `tmp` (`tmp_beside(path)`); it is renamed over `path`
    when the block ends. On any error (a full disk, Ctrl-C) the temporary is removed and `path` is as it was; an
    OSError names `path`, not the hidden temporary (nor no file at all, as a failed write through a handle)."""
    path = Path(path)
    tmp = tmp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno is None or (e.filename is not None and str(e.filename) != str(tmp)):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `tmp_beside(path)`, fsynced, then renamed over `path`.

    A failed write (a full disk) removes the temporary and names `path`: it left an empty `config.json.tmp`
    behind and the CLI's error was a bare "[Errno 28] No space left on device", with no file named."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for bytes (a plot's PNG): all of `data` at `path`, or `path` as it was."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write `data` as indented JSON, non-ASCII kept readable (Chinese stays Chinese)."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, the file then given the permissions any other file lmforge writes gets
    (0666 less the umask): the library creates it readable by its owner alone (0600), so the weights of a
    run or export shared with a group, or served from a shared folder, could not be read by the others
    while its config and tokenizer could.

    A failed write (a full disk, a lost permission) is an OSError naming `path`, with the errno the library's
    message gives ("I/O error: No space left on device (os error 28)"): safetensors raises its own
    SafetensorError for it, which `lmforge export --to hf` onto a full disk showed as a traceback.

    The header's metadata is then put in sorted key order (`_sort_metadata`), so equal tensors and metadata
    give equal bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata)
        if metadata and len(metadata) > 1:
            _sort_metadata(Path(path))
    except SafetensorError as e:
        if "I/O error" not in str(e):  # anything else is lmforge's bug: keep its traceback
            raise
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise OSError(f"could not write {path} ({e})") from None
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
    os.chmod(path, 0o666 & ~_umask())


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's JSON header in place with its `__metadata__` keys sorted.

    safetensors (0.8) writes the metadata in the order of a Rust HashMap, which changes from process to
    process (safetensors issue #584): a checkpoint's model.safetensors (format, lmforge_step and a tied
    weight's name) came out byte-different in half the runs with identical weights, so a resumed run's
    file hash differed from an uninterrupted one's. The sorted header has the same entries, so the same
    length (padded with spaces as the format allows); the tensor data after it does not move."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # (always: the same entries, reordered)
            f.seek(8)
            f.write(text.ljust(size))


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def fsync_file(path: Path) -> None:
    """Flush `path`'s data to disk (a writable handle: Windows refuses to flush a read-only one)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Output directories: checked first, built in a hidden sibling that only lmforge names, renamed at the end
#
# The build folder is `.<out>.lmforge-tmp-<random>` (created with an exclusive mkdir, so it never
# existed before) and the old `out` is moved aside into `.<out>.lmforge-old-<random>/`: no name a user could
# have chosen (`out.tmp`, `out.old`) is ever written or deleted. Each holds a marker file naming the
# process that made it; a folder left by a killed lmforge run is removed (or, a moved-aside `out`, put
# back) by the next one only when its name has the prefix, the marker is there and that process is
# gone.

TMP_MARKER = ".lmforge-tmp"  # inside every folder made here, removed once it is published


# What a model folder that `export`, `import` or `quantize` wrote (or a run, a Hugging Face model) holds: a
# non-empty --out holding none of them is someone's own folder, which --overwrite would delete whole
MODEL_DIR_MARKERS = ("config.json", "adapter_config.json", "checkpoints", "status.json")


def refuse_link_loop(path: Path) -> None:
    """Raise the OSError (ELOOP) of a `path` that is a symbolic link loop (`ln -s loop loop`), which the CLI says in
    one line ("PATH is a symbolic link loop ..."); `exists()` is False for one, so it read as a missing path."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise


def check_out_file_kind(out: Path) -> None:
    """Refuse an `--out` FILE that exists as a device, pipe or socket (`--out /dev/null`, a FIFO): a file written
    whole beside it and renamed over it replaced it with a regular file, and as root /dev/null itself (for every
    program on the machine). A folder is each command's own message; a symbolic link loop is refused too (it was
    replaced by the file, where every other command refuses it)."""
    refuse_link_loop(out)
    if out.exists() and not out.is_file() and not out.is_dir():
        raise LmforgeError(
            f"--out {out} is a device or pipe, not a file: the output is written whole and renamed over it, which "
            "would replace it; choose a file name"
        )


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """A non-empty `out` is an error unless `overwrite`; even then, unless it is a model folder (above) that holds
    no other run and no live process trains. Nor may `out` lie inside a run (`runs.check_not_in_run`)."""
    from lmforge.runs import being_trained, check_holds_no_run, check_not_in_run  # (runs.py imports this module)

    check_not_in_run(out, error=LmforgeError)
    if not (out.exists() or out.is_symlink()) or (out.is_dir() and not any(out.iterdir())):
        return
    replaceable = out.is_dir() and any((out / name).exists() for name in MODEL_DIR_MARKERS)
    if not overwrite and not replaceable:  # (it said "pass --overwrite", which then refused it)
        what = "a file" if not out.is_dir() else "not a model folder"
        raise LmforgeError(f"{out} already exists and is {what}; choose another --out")
    if not overwrite:
        raise LmforgeError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    if not replaceable:
        raise LmforgeError(
            f"refusing to overwrite {out}: it is not a model folder (no config.json, adapter_config.json or "
            "checkpoints/), and --overwrite would delete everything in it; choose another --out"
        )
    if being_trained(out):
        raise LmforgeError(
            f"refusing to overwrite {out}: a live process is training this run right now; wait for it to end or "
            "stop it, or choose another --out"
        )
    check_holds_no_run(out, error=LmforgeError)


def check_not_inside(out: Path, source: Path, *, out_may_sit_inside: bool = False) -> None:
    """`out` may not be, contain or (unless `out_may_sit_inside`) sit inside the directory (or file) being read.

    Replacing `out` (--overwrite) deletes everything under it, and writing inside the source changes
    what is read: either way the source could be lost."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents or (source in out.parents and not out_may_sit_inside):
        what = "the file" if source.is_file() else "the directory"  # (`prepare a.txt --out a.txt`)
        raise LmforgeError(f"--out {out} overlaps {what} being read ({source}); choose another --out")


def _make_marked_dir(out: Path, kind: str) -> Path:
    """A new hidden sibling `.<out>.lmforge-<kind>-<random>/` holding a marker with this process's id."""
    out.parent.mkdir(parents=True, exist_ok=True)
    marker = json.dumps(this_process()) + "\n"  # (read before the folder exists: it reads /proc)
    while True:  # not tempfile.mkdtemp: its 0700 mode would stay on the published folder
        folder = out.parent / f".{out.name}.lmforge-{kind}-{secrets.token_hex(4)}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        try:  # a Ctrl-C/SIGTERM before the marker is written would leave a folder no later run knows as ours
            (folder / TMP_MARKER).write_text(marker, encoding="utf-8")
        except BaseException as e:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(e, OSError) and e.errno is not None:  # (a full disk: name `out`, not the hidden marker)
                raise OSError(e.errno, e.strerror, str(out)) from None
            raise
        return folder


def public_path(path: str | Path) -> str:
    """`path` (or each path in a message) as the user knows it: a file in a build folder
    (`.<out>.lmforge-tmp-<random>/config.json`) is named by where it is going (`<out>/config.json`)."""
    return re.sub(r"(^|/)\.([^/'\s]+)\.lmforge-(?:tmp|old)-[0-9a-f]{8}(?=[/'\s)]|$)", r"\1\2", os.fspath(path))


# --------------------------------------------------------------------------------------------
# Which process made a file: a pid alone is not enough. After a crash or a reboot the pid a status.json
# or a marker recorded may belong to an unrelated process, which made a dead run read "running" (and
# `report --watch` render it forever). So the process's start is recorded beside its pid, and a pid
# counts as that process only while its start is the same. Linux: the boot id and /proc/PID/stat's
# field 22 (start time in clock ticks since boot); Windows: the creation time (GetProcessTimes). Where it
# cannot be read (macOS, /proc mounted with hidepid), nothing is recorded or compared: a live pid is
# trusted, as it is in files written before the start was recorded.


def this_process() -> dict[str, Any]:
    """`pid`, `host` and (where it can be read) `pid_start` of this process, for a status or marker file."""
    info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
    start = process_start(os.getpid())
    if start is not None:
        info["pid_start"] = start
    return info


def process_alive(info: dict[str, Any]) -> bool:
    """Whether the process `this_process()` described in `info` is still alive (on this host: callers check
    `host`): its pid is alive and, where `pid_start` was recorded and can be read now, started then."""
    pid = info.get("pid")
    # (0 and negative pids name process groups to os.kill, and True is 1: a hand-edited file read "running")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not _pid_alive(pid):
        return False
    recorded = info.get("pid_start")
    if not isinstance(recorded, str):  # written before the start was recorded, or where it cannot be read
        return True
    now = process_start(pid)
    return now is None or now == recorded


def process_start(pid: int) -> str | None:
    """A token for when process `pid` started, different for two processes that had the same pid; None where
    it cannot be read (the process is gone or hidden, or the platform offers no way here)."""
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip()
            # field 2, the command name in parentheses, may itself hold spaces and ')': count after the last one
            return f"{boot}/{int(stat[stat.rindex(b')') + 2 :].split()[19])}"
        except (OSError, ValueError, IndexError):
            return None
    if os.name == "nt":
        return _windows_process(pid)[1]
    return None


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there
        return _windows_process(pid)[0]
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (OverflowError: a hand-edited pid beyond any process's)
        return False
    except OSError:  # PermissionError: alive, owned by someone else
        return True
    return True


def _windows_process(pid: int) -> tuple[bool, str | None]:
    """Windows: whether `pid` is alive, and its creation time (100 ns units since 1601) as a start token."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:  # 87, ERROR_INVALID_PARAMETER: no such process; anything else (access denied): alive
        return ctypes.get_last_error() != 87, None
    try:
        code = wintypes.DWORD()
        alive = not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
        times = [wintypes.FILETIME() for _ in range(4)]  # creation, exit, kernel, user
        if not kernel32.GetProcessTimes(handle, *(ctypes.byref(t) for t in times)):
            return alive, None
        return alive, f"win/{(times[0].dwHighDateTime << 32) | times[0].dwLowDateTime}"
    finally:
        kernel32.CloseHandle(handle)


try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

# Whether `try_lock` can lock here (`flock`). Where it cannot (Windows), each caller has its own fallback: `runs.claim`
# and `runs.being_trained` read a running status.json, `generate --out` does without the check.
FILE_LOCKS = fcntl is not None


def try_lock(handle: Any) -> bool | None:
    """Take an exclusive lock on the open file `handle` without waiting: True when taken (it is held until the
    handle is closed, which the OS does however the process ends, killed included, so no stale lock is left),
    False when another process holds it, None where there are no such locks (`FILE_LOCKS`). `flock` locks are
    per open file: the same file opened twice, even by one process, is locked once.

    Shared by `runs.claim` (a run folder being trained), `runs.being_trained` (a probe) and `generate --out`'s
    partial file, each of which says in its own words what is busy and what to do."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _abandoned(folder: Path) -> bool:
    """An lmforge build/backup folder whose maker (a process on this host) is gone."""
    try:
        info = json.loads((folder / TMP_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # no marker: not recognisably ours (or just being published); leave it
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")  # (a marker without a usable pid is not recognisably ours: the folder stays)
    return isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and not process_alive(info)


def clean_stale_dirs(out: Path) -> None:
    """Remove what killed lmforge runs left beside `out`; an `out` moved aside mid-swap is put back."""
    if not out.parent.is_dir():
        return
    prefix = f".{out.name}.lmforge-"
    for folder in out.parent.iterdir():
        if not (folder.name.startswith(prefix) and folder.is_dir() and not folder.is_symlink()):
            continue
        if not _abandoned(folder):
            continue
        moved = folder / out.name
        if folder.name.startswith(prefix + "old-") and (moved.exists() or moved.is_symlink()) and not out.exists():
            os.replace(moved, out)
        shutil.rmtree(folder, ignore_errors=True)


def fresh_tmp_dir(out: Path) -> Path:
    """A new, empty, uniquely named folder beside `out` to build it in (see above); never a user's folder."""
    clean_stale_dirs(out)
    return _make_marked_dir(out, "tmp")


def discard_tmp_dir(tmp: Path) -> None:
    """After an error: remove a build folder made by `fresh_tmp_dir` (and nothing else)."""
    if tmp.name.startswith(".") and ".lmforge-tmp-" in tmp.name:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, out: Path, *, then: Callable[[], None] | None = None) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is moved aside first and deleted last.

    If the swap fails (or is interrupted), the old `out` is put back; if the process is killed in
    the middle, the next `fresh_tmp_dir(out)` puts it back. `tmp` keeps its marker until it is `out`, so a
    build folder left by a kill or a failed rename is still recognisably ours and removed by the next run
    (a kill right after the rename leaves only the small hidden marker file in `out`).

    `then` runs once the new `out` is in place, before the old one is deleted: the rename of a file that goes
    with the folder (a Markdown report beside its `_files/` plots). If it fails, the new `out` goes back to
    `tmp` (for the caller's `discard_tmp_dir`) and the old one is put back, so the two change together."""
    aside = None
    if out.exists() or out.is_symlink():
        aside = _make_marked_dir(out, "old")
        os.replace(out, aside / out.name)
    try:
        os.replace(tmp, out)
        try:
            if then is not None:
                then()
        except BaseException:
            os.replace(out, tmp)
            raise
    except BaseException:
        if aside is not None:
            os.replace(aside / out.name, out)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    (out / TMP_MARKER).unlink(missing_ok=True)


@contextlib.contextmanager
def building_dir(out: Path) -> Iterator[Path]:
    """`with building_dir(out) as tmp:` write into `tmp`; published to `out` when the block ends, removed
    if it raises (Ctrl-C included), so an error leaves neither a half `out` nor a build folder."""
    tmp = fresh_tmp_dir(out)
    try:
        yield tmp
    except BaseException:
        discard_tmp_dir(tmp)
        with naming(out):  # (a full disk's error from a write through a handle names no file: it names `out`)
            raise
    publish_dir(tmp, out)
