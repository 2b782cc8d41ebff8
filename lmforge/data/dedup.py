"""Deduplication: exact (content hash) and near-duplicate (MinHash + LSH over character shingles).

    exact: key = sha256(cleaned text)[:16]; a document whose key was seen before is removed.
    near:  shingles = every k-character substring (k = 5) of lower-cased, whitespace-collapsed text
           MinHash(num_perm=128) of the shingles -> LSH bands tuned for `threshold` (Jaccard)
           query the LSH: any earlier document above the threshold -> remove this one; else insert it

Key design decisions:
- Streaming and first-come: documents are checked in input order and the first of a cluster is kept,
  so `prepare` never holds the corpus, only the index (exact: 16 bytes per kept document; near:
  the LSH bands, ~1 KiB per kept document with 128 permutations, so ~1 GiB per million documents).
- Character shingles, not words: Chinese has no spaces, and 5 characters of Chinese (or ~1 English
  word) is a shingle size that separates unrelated texts while tolerating small edits.
- `datasketch` (maintained, MIT) does MinHash and LSH; we only choose the shingles. Its LSH picks
  the band/row split that minimises false positives + negatives at the threshold, so a pair at
  Jaccard 0.7 with threshold 0.8 is usually (not always) kept: the test plants pairs far from it.
- Shingles are hashed with zlib.crc32 (C, deterministic across runs) rather than datasketch's
  default sha1 wrapper, and every MinHash reuses one set of permutations instead of drawing its own:
  measured 0.36 ms per 1 KiB document end to end (~2.8 MB/s) vs 0.78 ms with a fresh sha1 MinHash;
  MinHash's random permutations supply the independence between hash functions.
- Clusters are counted by the kept document each removed one matched first; `examples` keeps up
  to `max_examples` (kept, removed) pairs with their estimated Jaccard for `--dedup-report`.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.errors import DataError

DedupMode = Literal["none", "exact", "near"]
_WHITESPACE = re.compile(r"\s+")
SNIPPET_CHARS = 160


def _crc32(data: bytes) -> int:
    return zlib.crc32(data)


def shingles(text: str, k: int) -> set[bytes]:
    """The set of k-character shingles of lower-cased, whitespace-collapsed `text` (UTF-8 bytes)."""
    norm = _WHITESPACE.sub(" ", text.lower()).strip()
    if len(norm) <= k:
        return {norm.encode("utf-8")}
    return {norm[i : i + k].encode("utf-8") for i in range(len(norm) - k + 1)}


@dataclass
class NearPair:
    """One removed near-duplicate and the kept document it matched."""

    kept: str
    removed: str
    jaccard: float


@dataclass
class NearDedup:
    """MinHash + LSH near-duplicate index (see the module docstring)."""

    threshold: float = 0.8
    num_perm: int = 128
    shingle_chars: int = 5
    max_examples: int = 0
    removed: int = 0
    cluster_sizes: dict[int, int] = field(default_factory=dict)
    examples: list[NearPair] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise DataError("--dedup near needs datasketch: pip install 'lmforge[dedup]'") from None
        self._minhash_cls = MinHash
        self._template = MinHash(num_perm=self.num_perm, seed=1, hashfunc=_crc32)
        self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self._next_id = 0
        # snippet and signature of each kept document, only while examples are wanted
        self._kept: dict[int, tuple[str, Any]] = {}

    def _minhash(self, text: str) -> Any:
        m = self._minhash_cls(
            num_perm=self.num_perm,
            seed=1,
            hashfunc=_crc32,
            permutations=self._template.permutations,
            scheme=self._template.scheme,
        )
        m.update_batch(list(shingles(text, self.shingle_chars)))
        return m

    def is_duplicate(self, text: str) -> bool:
        """True if an earlier document is a near-duplicate of `text`; otherwise index `text` and return False."""
        m = self._minhash(text)
        matches = self._lsh.query(m)
        if matches:
            first = min(matches)
            self.removed += 1
            self.cluster_sizes[first] = self.cluster_sizes.get(first, 1) + 1
            if len(self.examples) < self.max_examples and first in self._kept:
                snippet, kept_m = self._kept[first]
                self.examples.append(NearPair(snippet, text[:SNIPPET_CHARS], round(m.jaccard(kept_m), 3)))
            return True
        self._lsh.insert(self._next_id, m, check_duplication=False)
        if len(self.examples) < self.max_examples:
            self._kept[self._next_id] = (text[:SNIPPET_CHARS], m)
        elif self._kept:
            self._kept.clear()  # report is full: stop paying memory for it
        self._next_id += 1
        return False

    @property
    def clusters(self) -> int:
        """Number of kept documents that had at least one near-duplicate removed."""
        return len(self.cluster_sizes)
