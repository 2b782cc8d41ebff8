"""Token shard format: header round trip, dtype choice, size caps, damaged files -> DataError."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.shards import HEADER_SIZE, MAGIC, ShardWriter, dtype_for_vocab, read_header, read_shard
from lmforge.errors import DataError


def write(tmp_path: Path, tokens: np.ndarray, dtype: type = np.uint16, max_tokens: int = 1000) -> list[Path]:
    writer = ShardWriter(tmp_path, "train", dtype, max_tokens)
    writer.write(tokens)
    return [tmp_path / name for name in writer.close()]


def test_dtype_for_vocab() -> None:
    assert dtype_for_vocab(256) is np.uint16
    assert dtype_for_vocab(65536) is np.uint16  # ids 0..65535 fit
    assert dtype_for_vocab(65537) is np.uint32
    assert dtype_for_vocab(150_000) is np.uint32


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_round_trip(tmp_path: Path, dtype: type) -> None:
    tokens = np.arange(500, dtype=np.int64) * (7 if dtype is np.uint16 else 9001)
    (path,) = write(tmp_path, tokens, dtype)
    assert path.name == "train-00000.bin"
    raw = path.read_bytes()
    magic, version, itemsize, count, reserved = struct.unpack("<8sIIQQ", raw[:32])
    assert (magic, version, itemsize, count, reserved) == (MAGIC, 1, np.dtype(dtype).itemsize, 500, 0)
    assert len(raw) == HEADER_SIZE + 500 * np.dtype(dtype).itemsize
    loaded = read_shard(path)
    assert isinstance(loaded, np.memmap) and loaded.ndim == 1 and not loaded.flags.writeable
    assert loaded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(loaded, tokens)


def test_split_into_shards_across_writes(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "val", np.uint16, max_tokens=100)
    chunks = [np.arange(start, start + n) for start, n in ((0, 30), (30, 150), (180, 20), (200, 45))]
    for chunk in chunks:
        writer.write(chunk)
    names = writer.close()
    assert names == ["val-00000.bin", "val-00001.bin", "val-00002.bin"]
    assert writer.total_tokens == 245
    assert [len(read_shard(tmp_path / n)) for n in names] == [100, 100, 45]
    joined = np.concatenate([read_shard(tmp_path / n) for n in names])
    np.testing.assert_array_equal(joined, np.arange(245))
    assert not list(tmp_path.glob("*.tmp"))


def test_no_tokens_no_shard(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "test", np.uint16, max_tokens=10)
    writer.write(np.array([], dtype=np.int64))
    assert writer.close() == []
    assert not list(tmp_path.iterdir())


def test_out_of_range_tokens_rejected(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "train", np.uint16, max_tokens=10)
    with pytest.raises(ValueError, match="out of range"):
        writer.write(np.array([1, 70_000]))
    writer.abort()
    assert not list(tmp_path.iterdir())


def test_unfinished_shard_has_tmp_name_only(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "train", np.uint16, max_tokens=10)
    writer.write(np.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["train-00000.bin.tmp"]
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["train-00000.bin"]


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"NOTSHARD" + bytes(24) + bytes(10))
    with pytest.raises(DataError, match="is not an lmforge token shard") as e:
        read_shard(path)
    assert str(path) in str(e.value) and "lmforge prepare" in str(e.value)


def test_too_short_for_header(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"LMF")
    with pytest.raises(DataError, match="not an lmforge token shard"):
        read_shard(path)


def test_truncated(tmp_path: Path) -> None:
    (path,) = write(tmp_path, np.arange(100))
    path.write_bytes(path.read_bytes()[:-20])  # 10 uint16 tokens missing
    with pytest.raises(DataError, match=r"is truncated \(expected 100 tokens, found 90\)"):
        read_shard(path)


def test_trailing_bytes(tmp_path: Path) -> None:
    (path,) = write(tmp_path, np.arange(100))
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    with pytest.raises(DataError, match="trailing bytes"):
        read_header(path)


def test_wrong_version(tmp_path: Path) -> None:
    (path,) = write(tmp_path, np.arange(10))
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 2)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="version 2"):
        read_shard(path)


def test_wrong_itemsize(tmp_path: Path) -> None:
    (path,) = write(tmp_path, np.arange(10))
    raw = bytearray(path.read_bytes())
    raw[12:16] = struct.pack("<I", 8)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="token size 8"):
        read_shard(path)


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing"):
        read_shard(tmp_path / "nope.bin")


def test_empty_shard_reads_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "e.bin"
    path.write_bytes(struct.pack("<8sIIQQ", MAGIC, 1, 2, 0, 0))
    assert len(read_shard(path)) == 0
