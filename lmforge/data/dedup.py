"""Deduplication: exact (content hash) and near-duplicate (MinHash + LSH over character shingles).

    exact: key = sha256(cleaned text)[:16]; a document whose key was seen before is removed.
    near:  shingles = every k-character substring (k = 5) of lower-cased, whitespace-collapsed text
           MinHash(num_perm=128) of the shingles -> LSH bands tuned for `threshold` (Jaccard)
           query the LSH for candidates, keep those whose estimated Jaccard (the share of equal
           MinHash values) is >= the threshold: any -> remove this one; else insert it

Key design decisions:
- Streaming and first-come: documents are checked in input order and the first of a cluster is kept,
  so `prepare` never holds the corpus, only the index (exact: 16 bytes per kept document; near:
  ~1.5 KB per kept document with 128 permutations, its signature and its band keys, so ~1.5 GB per
  million documents).
- The LSH tables are ours: datasketch's `MinHashLSH` picks the bands (16 of 8 rows at 0.8), but its
  own tables keep each band as a bytes key with a one-element set and a per-key list, 6.4 KB per
  document (measured on 20,000 news and book paragraphs), ~6 GB per million documents. Here a band is
  one dict entry per table, its 8 values hashed into a 64-bit int (a collision only adds
  a candidate, which the estimate check then judges), pointing to the id of the first document with
  that band (a list when several share it); the signatures live in fixed blocks of a 2-D uint32 array.
  Same candidates, same removals as datasketch's tables (tested).
- Character shingles, not words: Chinese has no spaces, and 5 characters of Chinese (or ~1 English
  word) is a shingle size that separates unrelated texts while tolerating small edits.
- `datasketch` (maintained, MIT) does MinHash and chooses the LSH bands; we choose the shingles. Its LSH picks
  the band/row split that minimises false positives + negatives at the threshold, and lets through
  pairs well below it (at threshold 0.8 real pairs at Jaccard 0.70-0.77 matched) while missing a
  quarter of those at 0.82-0.90. So the bands are tuned `LSH_MARGIN` below the threshold (finding
  ~99% of those) and every candidate is checked against the threshold on its MinHash estimate (128
  values: standard error ~0.035 at 0.8). The kept documents' MinHash values are kept for that, as
  uint32 (512 bytes each).
- Shingles are hashed with CRC-32 (deterministic across runs) rather than datasketch's default sha1
  wrapper, and every MinHash uses datasketch's permutations for seed 1; MinHash's random permutations
  supply the independence between hash functions. `minhash_signatures` computes datasketch's values
  (its affine32 scheme: fmix32, then a * h + b mod 2**32; equal bit for bit, tested) for a block of
  documents at once with numpy, in prepare's workers: a datasketch MinHash per document, a Python
  crc32 call per shingle, cost 0.8 ms per document of ~160 bytes and ran in the main process, which
  made `--dedup near` ~4x slower than exact and `--workers` no help (bench/prepare_speed.py).
- Band keys are computed for a block at once too (`band_keys`, numpy), not by a blake2b call per band.
- Clusters are counted by the kept document each removed one matched first; `examples` keeps up
  to `max_examples` (kept, removed) pairs with their estimated Jaccard for `--dedup-report`.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lmforge.errors import DataError

DedupMode = Literal["none", "exact", "near"]
_WHITESPACE = re.compile(r"\s+")
SNIPPET_CHARS = 160
# The LSH bands are tuned for a threshold this much below --near-threshold: at the threshold itself they
# find only ~75% of pairs at Jaccard 0.82-0.90; the estimate check then removes the extra candidates.
LSH_MARGIN = 0.15
_SIGNATURE_BLOCK = 4096  # signatures per block of the index (grown a block at a time, never copied)


def _crc32(data: bytes) -> int:
    return zlib.crc32(data)


def shingles(text: str, k: int) -> set[bytes]:
    """The set of k-character shingles of lower-cased, whitespace-collapsed `text` (UTF-8 bytes)."""
    norm = _WHITESPACE.sub(" ", text.lower()).strip()
    if len(norm) <= k:
        return {norm.encode("utf-8")}
    return {norm[i : i + k].encode("utf-8") for i in range(len(norm) - k + 1)}


def _crc_table() -> np.ndarray:
    """zlib's CRC-32 lookup table (reflected polynomial 0xEDB88320)."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table


_CRC_TABLE = _crc_table()
_PIECE_CHARS = 1 << 16  # a longer text is hashed in overlapping pieces (same shingles), so memory stays bounded
_BATCH_CHARS = 1 << 17  # characters hashed per numpy batch
_CHUNK_SHINGLES = 1 << 12  # shingles per (permutations x shingles) array: 2 MB at 128 permutations


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's `a`, `b` (uint32) of MinHash(num_perm, seed=1), its default affine32 scheme."""
    try:
        from datasketch import MinHash
    except ImportError:
        raise DataError("--dedup near needs datasketch: pip install 'lmforge[dedup]'") from None
    template = MinHash(num_perm=num_perm, seed=1, hashfunc=_crc32)
    if template.scheme != "affine32":  # (a datasketch that changed its default: the vectorised form below is affine32)
        raise DataError(f"datasketch {template.scheme!r} MinHash is not supported; pip install 'datasketch>=2.0,<3'")
    a, b = template.permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def minhash_signatures(texts: list[str], num_perm: int = 128, shingle_chars: int = 5) -> np.ndarray:
    """The MinHash signature (uint32, `num_perm` values) of each text's `shingles`: equal to datasketch's
    `MinHash(num_perm, seed=1, hashfunc=zlib.crc32).update_batch(shingles)` (tested), computed for a batch
    of texts at once with numpy (CRC-32 of every shingle by table lookup, MurmurHash3's 32-bit finalizer,
    then min over the affine permutations), in memory bounded by the batch, not the longest text."""
    a, b = _permutations(num_perm)
    out = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    k = shingle_chars
    rows: list[int] = []
    pieces: list[str] = []
    chars = 0
    for row, text in enumerate(texts):
        norm = _WHITESPACE.sub(" ", text.lower()).strip()
        # pieces overlapping by k - 1 characters hold every shingle of `norm` (one piece unless it is long)
        for start in range(0, max(len(norm) - k + 1, 1), _PIECE_CHARS):
            piece = norm[start : start + _PIECE_CHARS + k - 1]
            rows.append(row)
            pieces.append(piece)
            chars += len(piece)
            if chars >= _BATCH_CHARS:
                _minhash_batch(rows, pieces, k, a, b, out)
                rows, pieces, chars = [], [], 0
    if pieces:
        _minhash_batch(rows, pieces, k, a, b, out)
    return out


def _minhash_batch(rows: list[int], pieces: list[str], k: int, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """Lower `out[rows[i]]` to the MinHash values of the shingles of `pieces[i]` (rows ascending, repeats adjacent)."""
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    data = "".join(pieces).encode("utf-8")
    buf = np.frombuffer(data, dtype=np.uint8)
    if len(buf) == lengths.sum():  # ASCII: character i is byte i
        char_byte = np.arange(len(buf) + 1, dtype=np.int64)
    else:  # byte offset of every character (a UTF-8 character starts with any byte but 10xxxxxx)
        char_byte = np.append(np.flatnonzero((buf & 0xC0) != 0x80), len(buf))
    per_piece = np.maximum(lengths - k + 1, 1)  # a piece of <= k characters (a short text) is one shingle
    piece_of = np.repeat(np.arange(len(pieces)), per_piece)
    first = np.cumsum(per_piece) - per_piece
    start_char = (np.cumsum(lengths) - lengths)[piece_of] + np.arange(len(piece_of)) - first[piece_of]
    start = char_byte[start_char]
    size = char_byte[start_char + np.minimum(lengths, k)[piece_of]] - start
    # CRC-32 of each shingle's bytes, a byte position at a time across all shingles
    crc = np.full(len(start), 0xFFFFFFFF, dtype=np.uint32)
    last = max(len(buf) - 1, 0)
    padded = buf if len(buf) else np.zeros(1, dtype=np.uint8)
    for j in range(int(size.max())):
        step = _CRC_TABLE[(crc ^ padded[np.minimum(start + j, last)]) & 0xFF] ^ (crc >> 8)
        crc = step if j < int(size.min()) else np.where(size > j, step, crc)
    hv = crc ^ np.uint32(0xFFFFFFFF)
    # datasketch's affine32 scheme: MurmurHash3 fmix32 once, then a * h + b (mod 2**32) per permutation
    hv ^= hv >> 16
    hv *= np.uint32(0x85EBCA6B)
    hv ^= hv >> 13
    hv *= np.uint32(0xC2B2AE35)
    hv ^= hv >> 16
    row_of = np.asarray(rows, dtype=np.int64)[piece_of]
    a, b = a[:, None], b[:, None]
    for s in range(0, len(hv), _CHUNK_SHINGLES):
        chunk_rows = row_of[s : s + _CHUNK_SHINGLES]
        values = a * hv[None, s : s + _CHUNK_SHINGLES]  # (permutations, shingles): reduceat's fast axis is the last
        values += b
        cuts = np.flatnonzero(np.diff(chunk_rows, prepend=-1))
        mins = np.minimum.reduceat(values, cuts, axis=1).T
        targets = chunk_rows[cuts]
        out[targets] = np.minimum(out[targets], mins)


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
        _permutations(self.num_perm)  # DataError with the install hint if datasketch is missing
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=max(0.1, self.threshold - LSH_MARGIN), num_perm=self.num_perm)
        self._bands, self._rows = lsh.b, lsh.r  # only its choice of bands: its tables cost ~6 KB a document
        self._tables: list[dict[int, int | list[int]]] = [{} for _ in range(self._bands)]  # band key -> id(s)
        self._next_id = 0
        self._signatures: list[np.ndarray] = []  # blocks of kept documents' MinHash values (uint32), by id
        self._snippets: dict[int, str] = {}  # each kept document's start, only while examples are wanted

    def signature(self, text: str) -> np.ndarray:
        """`text`'s MinHash values (uint32), as `is_duplicate` computes them."""
        return minhash_signatures([text], self.num_perm, self.shingle_chars)[0]

    def is_duplicate(self, text: str, signature: np.ndarray | None = None, keys: list[int] | None = None) -> bool:
        """True if an earlier document is a near-duplicate of `text`; otherwise index `text` and return False.
        `signature` and `keys`: its `minhash_signatures` row and `band_keys` when computed already (prepare does
        it a block at a time); `text` then only supplies the `--dedup-report` snippet."""
        if signature is None:
            signature = self.signature(text)
        if keys is None:
            keys = self.band_keys(signature[None])[0].tolist()
        # one dict operation per band: a band no document had yet gets this one's id at once (taken back if this
        # one is a duplicate), so a new document, the common case, costs 16 setdefault calls, not 16 gets + 16 sets
        doc_id = self._next_id
        tables = self._tables
        fresh: list[int] = []  # bands where this document was inserted
        hits: list[int] = []  # bands that held earlier documents
        for band, key in enumerate(keys):
            if tables[band].setdefault(key, doc_id) is doc_id:
                fresh.append(band)
            else:
                hits.append(band)
        candidates: set[int] = set()
        for band in hits:
            hit = tables[band][keys[band]]
            if isinstance(hit, int):
                candidates.add(hit)
            else:
                candidates.update(hit)
        similar = {}  # candidate id -> estimated Jaccard, for the candidates at or above the threshold
        if candidates:
            ids = sorted(candidates)
            rows = np.stack([self._signatures[i // _SIGNATURE_BLOCK][i % _SIGNATURE_BLOCK] for i in ids])
            for i, jaccard in zip(ids, (rows == signature).mean(axis=1).tolist(), strict=True):
                if jaccard >= self.threshold:
                    similar[i] = jaccard
        if similar:
            for band in fresh:
                del tables[band][keys[band]]
            first = min(similar)
            self.removed += 1
            self.cluster_sizes[first] = self.cluster_sizes.get(first, 1) + 1
            if len(self.examples) < self.max_examples and first in self._snippets:
                self.examples.append(NearPair(self._snippets[first], text[:SNIPPET_CHARS], round(similar[first], 3)))
            return True
        for band in hits:
            table, key = tables[band], keys[band]
            hit = table[key]
            if isinstance(hit, int):
                table[key] = [hit, doc_id]
            else:
                hit.append(doc_id)
        block, row = divmod(doc_id, _SIGNATURE_BLOCK)
        if block == len(self._signatures):
            self._signatures.append(np.zeros((_SIGNATURE_BLOCK, self.num_perm), dtype=np.uint32))
        self._signatures[block][row] = signature
        if len(self.examples) < self.max_examples:
            self._snippets[self._next_id] = text[:SNIPPET_CHARS]
        elif self._snippets:
            self._snippets.clear()  # report is full: stop paying memory for it
        self._next_id += 1
        return False

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(documents, bands) uint64 keys of `signatures` (documents, num_perm): each band's `rows` MinHash values
        hashed into one 64-bit int (MurmurHash3's fmix64 after mixing in each value), for a block at once."""
        n = len(signatures)
        bands = signatures[:, : self._bands * self._rows].reshape(n, self._bands, self._rows).astype(np.uint64)
        h = np.full((n, self._bands), self._rows, dtype=np.uint64)
        for j in range(self._rows):
            h ^= bands[:, :, j]
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xC4CEB9FE1A85EC53)
            h ^= h >> np.uint64(33)
        return h

    @property
    def clusters(self) -> int:
        """Number of kept documents that had at least one near-duplicate removed."""
        return len(self.cluster_sizes)
