"""Token shard files: a 32-byte versioned header followed by the raw token ids.

Layout (little-endian), after modded-nanogpt's shard header:

    offset  size  field
    0       8     magic b"LMFSHARD"
    8       4     format version (uint32, = 1)
    12      4     token itemsize (uint32: 2 = uint16, 4 = uint32)
    16      8     token count (uint64)
    24      8     reserved (uint64, 0)
    32      ...   count * itemsize bytes of token ids

Key design decisions:
- Readers check magic, version, itemsize and that the file size matches the count, and fail with a
  one-line `DataError` naming the file; shards are memory-mapped read-only, never loaded whole.
- `ShardWriter` streams tokens into `<prefix>-00000.bin`, `<prefix>-00001.bin`, ... of at most
  `max_tokens` each. Each shard is written as `name.tmp` with a placeholder count, the count is
  patched into the header at close, and only then is the file renamed (`os.replace`) to its name:
  a file with the final name is always complete. A split with no tokens gets no shard at all.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lmforge.errors import DataError

MAGIC = b"LMFSHARD"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, itemsize, count, reserved
HEADER_SIZE = HEADER.size  # 32
_DTYPES = {2: np.uint16, 4: np.uint32}
_RERUN = "re-run 'lmforge prepare'"


def dtype_for_vocab(vocab_size: int) -> type[np.unsignedinteger]:
    """np.uint16 when every id fits in 16 bits (vocab_size <= 65536), else np.uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def shard_name(prefix: str, index: int) -> str:
    """File name of shard `index` of a split, e.g. `train-00003.bin`."""
    return f"{prefix}-{index:05d}.bin"


class ShardWriter:
    """Stream token ids into size-capped shard files; `close()` returns the file names written."""

    def __init__(self, out_dir: str | Path, prefix: str, dtype: type[np.unsignedinteger], max_tokens: int) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.dtype = np.dtype(dtype).newbyteorder("<")  # shards are little-endian on every machine
        if self.dtype.kind != "u" or self.dtype.itemsize not in _DTYPES:
            raise ValueError(f"shard dtype must be uint16 or uint32, got {self.dtype}")
        self.max_tokens = max_tokens
        self.names: list[str] = []
        self.total_tokens = 0
        self._file: BinaryIO | None = None
        self._count = 0  # tokens in the open shard

    def write(self, tokens: np.ndarray | list[int]) -> None:
        """Append token ids, starting new shards as each one fills up."""
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype}: [{arr.min()}, {arr.max()}]")
        arr = arr.astype(self.dtype, copy=False).reshape(-1)
        start = 0
        while start < arr.size:
            if self._file is None:
                self._open()
            take = min(arr.size - start, self.max_tokens - self._count)
            self._file.write(arr[start : start + take].tobytes())
            self._count += take
            self.total_tokens += take
            start += take
            if self._count == self.max_tokens:
                self._finish()

    def close(self) -> list[str]:
        """Finish the open shard and return all shard file names (not paths), in order."""
        if self._file is not None:
            self._finish()
        return list(self.names)

    def abort(self) -> None:
        """Close and delete the shard being written (finished shards stay)."""
        if self._file is not None:
            path = Path(self._file.name)
            self._file.close()
            self._file = None
            path.unlink(missing_ok=True)

    def _open(self) -> None:
        name = shard_name(self.prefix, len(self.names))
        self._file = open(self.out_dir / (name + ".tmp"), "wb")  # closed in _finish / abort
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0, 0))
        self._count = 0

    def _finish(self) -> None:
        assert self._file is not None
        f = self._file
        f.seek(0)
        f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self._count, 0))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        name = shard_name(self.prefix, len(self.names))
        os.replace(f.name, self.out_dir / name)
        self.names.append(name)
        self._file = None
        self._count = 0


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """Validate a shard's header and size; return (token dtype, token count).

    Raises:
        DataError: the file is missing, not a shard, of another version, or truncated.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise DataError(f"token shard {p} is missing; {_RERUN}") from None
    except OSError as e:
        raise DataError(f"cannot read token shard {p} ({e.strerror}); check permissions or {_RERUN}") from None
    if len(head) < HEADER_SIZE or head[:8] != MAGIC:
        raise DataError(f"{p} is not an lmforge token shard (bad header); {_RERUN}")
    _, version, itemsize, count, _ = HEADER.unpack(head)
    if version != VERSION:
        raise DataError(f"{p} is a version {version} token shard, this lmforge reads version {VERSION}; {_RERUN}")
    if itemsize not in _DTYPES:
        raise DataError(f"{p} is not an lmforge token shard (token size {itemsize} bytes); {_RERUN}")
    found_bytes = size - HEADER_SIZE
    if found_bytes != count * itemsize:
        found = found_bytes // itemsize
        what = "is truncated" if found_bytes < count * itemsize else "has trailing bytes"
        raise DataError(f"{p} {what} (expected {count} tokens, found {found}); {_RERUN}")
    return np.dtype(_DTYPES[itemsize]).newbyteorder("<"), count


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens read-only (1-D `np.memmap`; an empty array for an empty shard).

    Raises:
        DataError: see `read_header`.
    """
    dtype, count = read_header(path)
    if count == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))
