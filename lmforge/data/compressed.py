"""Opening an input file for reading, decompressed: plain, gzip (`.gz`) or zstandard (`.zst`).

`open_input` gives (raw file, decompressed stream): the raw file's position measures progress. A file cut
short is an error (`read_errors()` lists what reading may raise), never silently less text.

Every input file is opened here (`open_raw`; `read_raw` for its bytes at once): a pipe or device that gives no
byte for `PIPE_NOTE_SECONDS` (`finetune --train <(slow_cmd)`, a FIFO no one writes to yet) gets one note on
stderr, then is waited on as `cat` would; it waited without a word.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import select
import stat
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.errors import DataError

_PIECE_BYTES = 1 << 16  # compressed bytes read at a time
COMPRESSED = (".gz", ".zst")  # the suffixes `open_input` decompresses
# seconds a pipe may stay silent before the note that it is being waited on; $LMFORGE_PIPE_NOTE_SECONDS overrides
PIPE_NOTE_SECONDS = 5.0


@contextlib.contextmanager
def noting_a_wait(name: str, kind: str) -> Iterator[None]:
    """Print "waiting for data on NAME (KIND)..." once on stderr if the block is still running after
    `PIPE_NOTE_SECONDS`; the block goes on waiting (Ctrl-C interrupts it as before)."""
    try:
        seconds = float(os.environ.get("LMFORGE_PIPE_NOTE_SECONDS") or PIPE_NOTE_SECONDS)
    except ValueError:  # (a note's delay is no reason to stop)
        seconds = PIPE_NOTE_SECONDS
    note = f"waiting for data on {name} ({kind}): nothing came in {seconds:g} s; Ctrl-C stops"
    timer = threading.Timer(seconds, lambda: print(note, file=sys.stderr, flush=True))
    timer.daemon = True  # (a Ctrl-C exit does not wait for it)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def wait_readable(stream: BinaryIO, name: str, kind: str) -> None:
    """Return once `stream` (a pipe, terminal or device) has a byte or its end to read, noting a long wait."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # (no file descriptor: an in-memory stream, always ready)
        return
    if os.name == "nt" or stat.S_ISREG(os.fstat(fd).st_mode):  # (select takes only sockets on Windows)
        return
    with noting_a_wait(name, kind):
        select.select([fd], [], [])


def open_raw(path: Path) -> BinaryIO:
    """`open(path, "rb")`, for an input file. A pipe or device is returned once it has a byte (or its end) to
    read: opening a FIFO waits for a writer, and reading it for the writer's data, so a silent one is noted on
    stderr after `PIPE_NOTE_SECONDS` (once; the wait goes on)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # (said by open)
        mode = 0
    if os.name == "nt" or not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        return open(path, "rb")
    kind = "a pipe" if stat.S_ISFIFO(mode) else "a device"
    with noting_a_wait(str(path), kind):
        f = open(path, "rb")  # (a FIFO: returns once a writer has opened it)
        try:
            select.select([f], [], [])
        except BaseException:
            f.close()
            raise
    return f  # type: ignore[return-value]


def read_raw(path: Path) -> bytes:
    """The bytes of an input file (`open_raw`: a silent pipe is noted)."""
    with open_raw(path) as f:
        return f.read()


def inner_name(path: Path) -> str:
    """`path`'s name, lowercase, without a .gz or .zst suffix (`Book.JSONL.gz`: `book.jsonl`)."""
    name = path.name.lower()
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if "zstandard" in sys.modules:
        errors += (sys.modules["zstandard"].ZstdError,)
    return errors


def open_input(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(raw file, decompressed stream); the raw file's position measures progress."""
    name = path.name.lower()
    zstd: Any = None
    if name.endswith(".zst"):
        try:
            import zstandard as zstd
        except ImportError:
            raise DataError(f"reading {path.name} needs zstandard: pip install 'lmforge[zstd]'") from None
    raw = open_raw(path)  # closed by the caller
    if name.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if zstd is not None:
        return raw, io.BufferedReader(ZstdReader(raw, zstd), 1 << 16)  # type: ignore[return-value]
    return raw, raw


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file (all its frames), raising `ZstdError` if it ends mid-frame.

    zstandard's own `stream_reader` returns what it could decode and then EOF when the file is cut
    short, without an error: a truncated download prepared silently as part (or, for one-block files,
    none) of the text. Gzip raises on the same damage (EOFError)."""

    def __init__(self, raw: BinaryIO, zstd: Any) -> None:
        self._raw, self._zstd = raw, zstd
        self._frame: Any = None  # the decompressobj of the current frame
        self._out = memoryview(b"")  # decompressed bytes not read yet
        self._next = b""  # compressed bytes past the end of the last frame

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            data = self._next or self._raw.read(_PIECE_BYTES)
            self._next = b""
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise self._zstd.ZstdError("the file ends in the middle of a frame (truncated)")
                return 0
            if self._frame is None or self._frame.eof:
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
            self._out = memoryview(self._frame.decompress(data))
            if self._frame.eof:
                self._next = self._frame.unused_data
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n
