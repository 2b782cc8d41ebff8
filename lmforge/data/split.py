"""Deterministic train/val/test split by document content hash.

    bucket = int.from_bytes(sha256(text)[:8], "big") / 2**64      # uniform in [0, 1]
    bucket <  test_fraction                  -> test
    bucket <  test_fraction + val_fraction   -> val
    otherwise                                -> train

Key design decisions:
- The split depends only on a document's own (cleaned) text, never on its position or on the
  other documents, so adding files never moves an old document to another split, and identical
  documents always land in the same split (duplicates cannot leak between train and eval).
- Test takes the lowest buckets and val the next ones, so changing val_fraction never moves test
  documents. When a split is given as explicit files (`val_input` / `test_input`), the hash split
  does not produce it: documents in its bucket range go to train (`explicit=`), and the other
  thresholds stay where they are.
- The same sha256 digest serves exact deduplication (`doc_digest`), so each document is hashed once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def doc_digest(text: str) -> bytes:
    """sha256 of the UTF-8 text (32 bytes)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def chunks_digest(chunks: Iterable[str]) -> bytes:
    """`doc_digest` of the text that `chunks` hold one after the other (a long document, never held whole)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk.encode("utf-8"))
    return h.digest()


def bucket(digest: bytes) -> float:
    """Map a digest to [0, 1] using its first 8 bytes (big-endian).

    (Float rounding maps the top 2**10 of 2**64 values to exactly 1.0; they go to train like their
    neighbours, since fractions are < 1.)
    """
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(
    digest: bytes, *, val_fraction: float, test_fraction: float, explicit: frozenset[str] = frozenset()
) -> Split:
    """The split of a document with this digest.

    Args:
        digest: `doc_digest` of the cleaned text.
        val_fraction: share of documents for val.
        test_fraction: share of documents for test.
        explicit: splits that come from explicit input files; the hash split sends their share to train.
    """
    b = bucket(digest)
    split: Split = "test" if b < test_fraction else "val" if b < test_fraction + val_fraction else "train"
    return "train" if split in explicit else split
