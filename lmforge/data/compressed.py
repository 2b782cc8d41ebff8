"""Opening an input file for reading, decompressed: plain, gzip (`.gz`) or zstandard (`.zst`).

`open_input` gives (raw file, decompressed stream): the raw file's position measures progress. A file cut
short is an error (`read_errors()` lists what reading may raise), never silently less text.
"""

from __future__ import annotations

import gzip
import io
import sys
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.errors import DataError

_PIECE_BYTES = 1 << 16  # compressed bytes read at a time
COMPRESSED = (".gz", ".zst")  # the suffixes `open_input` decompresses


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
    raw = open(path, "rb")  # closed by the caller
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
