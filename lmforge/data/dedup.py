"""Deduplication: exact (content hash) and near-duplicate (MinHash + LSH over character shingles).

    exact: key = sha256(cleaned text)[:16]; a document whose key was seen before is removed.
    near:  shingles = every k-character substring (k = 5) of NFKC-folded, lower-cased, whitespace-collapsed text
           MinHash(num_perm=128) of the shingles -> LSH bands tuned for `threshold` (Jaccard)
           query the LSH for candidates, keep those whose estimated Jaccard (the share of equal
           MinHash values) is >= the threshold: any -> remove this one; else insert it

Key design decisions:
- Streaming and first-come: documents are checked in input order and the first of a cluster is kept,
  so `prepare` never holds the corpus, only the index (exact: 16 bytes per kept document; near:
  ~0.95 KB per kept document with 128 permutations, its 512-byte signature and its band keys, so ~1 GB
  per million documents; `python bench/prepare_speed.py --index 100000 1000000`).
- The LSH tables are ours: datasketch's `MinHashLSH` picks the bands (16 of 8 rows at 0.8), but its
  own tables keep each band as a bytes key with a one-element set and a per-key list, 6.4 KB per
  document (measured on 20,000 news and book paragraphs), ~6 GB per million documents. Here a band's
  8 values are hashed into a 64-bit key (a collision only adds a candidate, which the estimate check
  then judges). The newest documents' keys are in one dict per band (key -> id, a list when several
  share it): ~100 bytes a key, 1.5 KB a document, which for every document made 2.1 KB in all (2 GB
  per million). Every 1/16th of the corpus (at least 4,096 documents) they move into one sorted
  uint64 array of all bands' keys with a parallel array of id * bands + band (a key only matches in
  its own band) and a bucket directory by the top bits of the key, ~14 bytes a key; a chunk of
  documents is looked up there at once with numpy, then each in order in the dicts. The signatures
  live in fixed blocks of a 2-D uint32 array. Same candidates, same removals as datasketch's tables
  and as the dicts alone (tested); about as fast (bench/prepare_speed.py --index).
- Character shingles, not words: Chinese has no spaces, and 5 characters of Chinese (or ~1 English
  word) is a shingle size that separates unrelated texts while tolerating small edits.
- Shingles are taken from NFKC-folded text (`fold`; the documents themselves are kept as they are): copies of one
  Chinese text that differ only in full-width and half-width forms (，。：！ vs , . : !, ＡＢＣ１２３ vs ABC123) are
  near-duplicates. Chinese has a punctuation mark every few characters, so without the fold such a copy shared
  only ~20% of its 5-character shingles with the original (a Hong Lou Meng paragraph) and was kept unless
  `prepare --normalize NFKC` had already folded the text itself. ASCII text is unchanged by it.
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
  to `max_examples` (kept, removed) pairs with their estimated Jaccard for `--dedup-report`. Until the
  examples are found, any kept document may be a pair's first, so each one's first `SNIPPET_CHARS`
  characters are needed: they go to an unnamed temporary file (in `snippet_dir`) and memory holds only
  their offsets, 8 bytes a document (held as strings they cost 260 bytes a document in English, 450 in
  Chinese, 0.26-0.45 GB per million when duplicates are rare); a snippet is read back when a pair needs
  it (at most `max_examples` reads). The file is dropped once the examples are found.
"""

from __future__ import annotations

import functools
import re
import tempfile
import unicodedata
import weakref
import zlib
from array import array
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
# The newest kept documents' band keys are in dicts (fast to look up one document at a time, ~100 bytes a key) until
# there are max(_RECENT_MIN, merged documents / _RECENT_SHARE) of them; then they move into sorted arrays (12 bytes).
_RECENT_MIN = 4096
_RECENT_SHARE = 16
_WINDOW = 32  # keys compared from the start of a bucket (a larger bucket, of many keys alike, is searched in full)
_LOOKUP_ROWS = 2048  # documents looked up in the merged keys at once: (2048, 16, window ~13) int64 positions, 3 MB


def _crc32(data: bytes) -> int:
    return zlib.crc32(data)


def fold(text: str) -> str:
    """`text` as near dedup compares it: NFKC (full-width forms as half-width), lower-cased, whitespace collapsed."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return _WHITESPACE.sub(" ", text.lower()).strip()


def shingles(text: str, k: int) -> set[bytes]:
    """The set of k-character shingles of `fold(text)` (UTF-8 bytes)."""
    norm = fold(text)
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
        norm = fold(text)
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
    # where the kept documents' snippets are spilled (None: the system's temp folder); prepare: beside --out, on the
    # disk it was given, and not in the build folder, which a file open in it could keep from being renamed (Windows)
    snippet_dir: str | None = None
    removed: int = 0
    cluster_sizes: dict[int, int] = field(default_factory=dict)
    examples: list[NearPair] = field(default_factory=list)

    def __post_init__(self) -> None:
        _permutations(self.num_perm)  # DataError with the install hint if datasketch is missing
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=max(0.1, self.threshold - LSH_MARGIN), num_perm=self.num_perm)
        self._bands, self._rows = lsh.b, lsh.r  # only its choice of bands: its tables cost ~6 KB a document
        # band keys of the kept documents: merged ones in two numpy arrays, the newest in dicts (see _merge)
        self._keys = np.zeros(0, dtype=np.uint64)  # sorted band keys of every merged document, all bands
        self._values = np.zeros(0, dtype=np.uint32)  # parallel: id * bands + band (a key matches in its own band)
        self._recent: list[dict[int, int | list[int]]] = [{} for _ in range(self._bands)]  # band key -> id(s)
        self._recent_rows: list[np.ndarray] = []  # band keys of the documents in `_recent` (ids `_merged` on)
        self._starts = np.zeros(2, dtype=np.intp)  # bucket b's keys: _keys[_starts[b]:_starts[b + 1]]
        self._shift = np.uint64(63)  # bucket of a key: key >> _shift
        self._window = np.zeros(0, dtype=np.intp)
        self._entries = 0  # keys in _keys (then _WINDOW copies of the last)
        self._merged = 0  # documents in _keys (ids 0 .. _merged - 1)
        self._next_id = 0
        self._signatures: list[np.ndarray] = []  # blocks of kept documents' MinHash values (uint32), by id
        # while examples are wanted: each kept document's first SNIPPET_CHARS characters (UTF-8) in an unnamed
        # temporary file, document i's at _snippet_starts[i] up to the next one's start (or the file's end)
        self._snippet_file = None
        self._snippet_starts = array("q")
        self._snippet_end = 0
        if self.max_examples > 0:
            self._snippet_file = tempfile.TemporaryFile(dir=self.snippet_dir)
            weakref.finalize(self, self._snippet_file.close)

    def signature(self, text: str) -> np.ndarray:
        """`text`'s MinHash values (uint32), as `is_duplicate` computes them."""
        return minhash_signatures([text], self.num_perm, self.shingle_chars)[0]

    def is_duplicate(self, text: str) -> bool:
        """True if an earlier document is a near-duplicate of `text`; otherwise index `text` and return False."""
        return self.duplicates([text], self.signature(text)[None])[0]

    def duplicates(self, texts: list[str], signatures: np.ndarray, keys: np.ndarray | None = None) -> list[bool]:
        """`is_duplicate` for each of a block of documents in order (an earlier one of the block counts too).
        `signatures`: their `minhash_signatures` rows (prepare's workers compute them), `keys` their `band_keys`
        when computed already; `texts` only supply the `--dedup-report` snippets."""
        if keys is None:
            keys = self.band_keys(signatures)
        out: list[bool] = []
        # a chunk at a time: its keys are looked up in the merged arrays at once, then each document in order in the
        # recent dicts, which are merged between chunks (so they stay small), never inside one
        for start in range(0, len(texts), _LOOKUP_ROWS):
            chunk = keys[start : start + _LOOKUP_ROWS]
            merged = self._merged_candidates(chunk) if self._merged else {}
            rows = chunk.tolist()
            dup = [
                self._check(texts[start + i], signatures[start + i], rows[i], merged.get(i)) for i in range(len(rows))
            ]
            self._recent_rows.append(chunk[~np.array(dup, dtype=bool)])
            out += dup
            if self._next_id - self._merged >= max(_RECENT_MIN, self._merged // _RECENT_SHARE):
                self._merge()
        return out

    def _check(self, text: str, signature: np.ndarray, keys: list[int], merged: list[int] | None) -> bool:
        """One document: `merged` are the merged documents sharing a band with it; the recent ones are looked up
        here, and it is indexed (among the recent ones) unless it is a duplicate."""
        # one dict operation per band: a band no recent document had yet gets this one's id at once (taken back if
        # this one is a duplicate), so a new document, the common case, costs 16 setdefault calls, not 16 gets + 16 sets
        doc_id = self._next_id
        tables = self._recent
        fresh: list[int] = []  # bands where this document was inserted
        hits: list[int] = []  # bands that held earlier recent documents
        for band, key in enumerate(keys):
            if tables[band].setdefault(key, doc_id) is doc_id:
                fresh.append(band)
            else:
                hits.append(band)
        candidates: set[int] = set(merged) if merged else set()
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
            if len(self.examples) < self.max_examples and first < len(self._snippet_starts):
                self.examples.append(NearPair(self._snippet(first), text[:SNIPPET_CHARS], round(similar[first], 3)))
            return True
        for band in hits:
            table, key = tables[band], keys[band]
            hit = table[key]
            if isinstance(hit, int):
                table[key] = [hit, doc_id]
            else:
                hit.append(doc_id)
        block, offset = divmod(doc_id, _SIGNATURE_BLOCK)
        if block == len(self._signatures):
            self._signatures.append(np.zeros((_SIGNATURE_BLOCK, self.num_perm), dtype=np.uint32))
        self._signatures[block][offset] = signature
        if len(self.examples) < self.max_examples:
            # (surrogatepass: a lone surrogate, which the JSON of a report can hold, comes back as it went)
            data = text[:SNIPPET_CHARS].encode("utf-8", "surrogatepass")
            self._snippet_starts.append(self._snippet_end)
            self._snippet_file.write(data)
            self._snippet_end += len(data)
        elif self._snippet_file is not None:  # report is full: stop paying disk and memory for it
            self._snippet_file.close()
            self._snippet_file, self._snippet_starts = None, array("q")
        self._next_id += 1
        return False

    def _snippet(self, doc_id: int) -> str:
        """The first SNIPPET_CHARS characters of kept document `doc_id`, read back from the snippet file."""
        start = self._snippet_starts[doc_id]
        end = self._snippet_starts[doc_id + 1] if doc_id + 1 < len(self._snippet_starts) else self._snippet_end
        self._snippet_file.seek(start)
        data = self._snippet_file.read(end - start)
        self._snippet_file.seek(0, 2)  # (writes go on at the end)
        return data.decode("utf-8", "surrogatepass")

    def _merged_candidates(self, keys: np.ndarray) -> dict[int, list[int]]:
        """For the documents (rows of band keys `keys`) that share a band with a merged document: row -> those
        documents' ids. A key's top bits pick its bucket of the sorted keys (`_starts`); the `_window` keys from the
        bucket's start hold every key equal to it (a bucket has ~2, rarely over 15; past the end the last entry is
        repeated, and an extra match of it only repeats an id), except in a bucket larger than _WINDOW (many
        documents with one band alike), searched in full. A chunk of documents at a time: per document, these few
        numpy calls cost more than the 16 dict lookups they replace; np.searchsorted costs ~20 cache misses a key."""
        bucket = keys >> self._shift
        first = self._starts[bucket]
        at = first[..., None] + self._window  # (documents, bands, window)
        docs, bands, columns = np.nonzero(self._keys[at] == keys[..., None])
        found: dict[int, list[int]] = {}
        if len(docs):
            values = self._values[at[docs, bands, columns]].astype(np.int64)
            same_band = values % self._bands == bands
            for doc, doc_id in zip(docs[same_band].tolist(), (values[same_band] // self._bands).tolist(), strict=True):
                found.setdefault(doc, []).append(doc_id)
        if len(self._window) == _WINDOW:  # the largest bucket may be larger than the window
            for doc, band in zip(*np.nonzero(self._starts[bucket + np.uint64(1)] - first > _WINDOW), strict=True):
                start = int(np.searchsorted(self._keys[: self._entries], keys[doc, band], side="left"))
                end = int(np.searchsorted(self._keys[: self._entries], keys[doc, band], side="right"))
                for value in self._values[start:end].tolist():
                    if value % self._bands == band:
                        found.setdefault(int(doc), []).append(value // self._bands)
        return found

    def _merge(self) -> None:
        """Move the recent documents' band keys from the dicts (~100 bytes a key) into the sorted arrays (~14 bytes a
        key: 8 of key, 4 of id and band, ~2 of bucket start) and empty the dicts. The recent share is kept at
        1/_RECENT_SHARE of the merged documents, so each merge copies the arrays but all merges together copy
        ~_RECENT_SHARE times their final size: linear in the corpus."""
        old_keys, old_values = self._keys[: self._entries], self._values[: self._entries]
        ids = np.arange(self._merged, self._next_id, dtype=np.uint64)
        values = (ids[:, None] * np.uint64(self._bands) + np.arange(self._bands, dtype=np.uint64)).ravel()
        if self._next_id * self._bands > np.iinfo(np.uint32).max:
            old_values = old_values.astype(np.uint64)
        keys = np.concatenate(self._recent_rows).ravel()
        order = np.argsort(keys)  # (the order among equal keys does not matter: candidates are a set)
        keys, values = keys[order], values[order].astype(old_values.dtype)
        at = np.searchsorted(old_keys, keys) + np.arange(len(keys))  # where each new key lands in the merged array
        n = len(old_keys) + len(keys)
        old = np.ones(n + _WINDOW, dtype=bool)
        old[at] = False
        old[n:] = False
        merged_keys = np.empty(
            n + _WINDOW, dtype=np.uint64
        )  # (_WINDOW more: a bucket's window never runs past the end)
        merged_keys[at], merged_keys[old] = keys, old_keys
        merged_values = np.empty(n + _WINDOW, dtype=old_values.dtype)
        merged_values[at], merged_values[old] = values, old_values
        merged_keys[n:], merged_values[n:] = merged_keys[n - 1], merged_values[n - 1]
        del old_keys, old_values, keys, values, at, old
        self._keys, self._values, self._entries = merged_keys, merged_values, n
        # buckets by the top bits: ~2-4 keys a bucket, so 2-4 bytes of start (int64) per key
        bits = max(1, (n // 4).bit_length())
        self._shift = np.uint64(64 - bits)
        counts = np.bincount((merged_keys[:n] >> self._shift).astype(np.intp), minlength=1 << bits)
        self._starts = np.zeros(len(counts) + 1, dtype=np.intp)
        np.cumsum(counts, out=self._starts[1:])
        self._window = np.arange(min(int(counts.max()), _WINDOW))
        self._merged = self._next_id
        self._recent = [{} for _ in range(self._bands)]
        self._recent_rows = []

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
