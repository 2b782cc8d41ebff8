"""`DocumentEncoder`: encode batches of documents into one token array (EOS after each document),
with exactly the ids of `Tokenizer.encode_batch`, several times faster for GPT-2-style tokenizers.

    text ──split before every " " that precedes a non-space──► segments ──cache hit?──► ids
                                                                   └─miss─► HF encode_batch (once per segment)

Why this is exact: a GPT-2-style byte-level BPE tokenizer (HF `ByteLevel` pre-tokenizer with its
split regex, `add_prefix_space=False`, no normalizer, no non-special added tokens) cuts text into
pieces with `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+` and
applies BPE to each piece on its own. At a position i where text[i] == " " and text[i+1] is not
whitespace, every piece boundary rule agrees: no alternative can cross it (letters, numbers and
symbols take at most one *leading* space; a whitespace run before i stops before i, because
`\\s+(?!\\S)` backtracks off the space that precedes a non-space). So the pieces of the text are the
pieces of its segments, and a segment's ids never depend on its neighbours: a segment seen before
reuses its ids from a dict. Python's `\\S` (not `str.isspace`) is stricter than the Rust regex's
(every Unicode White_Space character is `isspace`), so a doubtful position is simply not cut.
Every other tokenizer (WordPiece, Unigram, char, a BPE with a normalizer...) takes the plain
`encode_batch` path, so results are always the same ids - a test checks both on English, Chinese,
emoji, odd whitespace and the literal "<|endoftext|>".

Key design decisions:
- Segments after a space are cached without the space (`str.split(" ")` makes them for free when no
  space precedes whitespace or the end, the common case); the document's first segment has its own
  cache. Natural text repeats its words (Zipf), so after a few MB nearly every segment is a hit and
  the Rust tokenizer only sees new words; the caches are emptied when they pass `max_cache` entries
  or `max_cache_chars` characters of keys, so memory stays bounded. The character bound matters for
  text without spaces: a Chinese document is one segment, cached whole (~15 KB for 3,000 characters
  with its ids), and 125,000 of them under the entry bound alone held ~1.4 GB in every process.
- A segment not in the cache is cut further between ASCII letters, digits and symbols (also always
  piece boundaries, except after an apostrophe) and those pieces are cached too, so a new word like
  "[12.345]" costs dict lookups of "[", "12", ".", "345", "]" instead of a Rust call (~6 us each).
- The output is one numpy array per batch, built by `np.fromiter` over cached id tuples, plus the
  token count of every document: no per-token Python work.
"""

from __future__ import annotations

import json
import re
from itertools import chain

import numpy as np

from lmforge.tokenizer.tokenizer import Tokenizer

_UNSAFE = re.compile(r" (?=\s|\Z)")  # a space that is followed by whitespace or the end: not a safe cut
_CUT = re.compile(r"(?= \S)")  # safe cuts: before a space that precedes a non-space
# Inside a segment without a cached id list: more safe cuts, between ASCII letters L, digits N and
# other printable ASCII P, where the letter, number and symbol runs of the split regex must end. Not
# after an apostrophe before a letter ("'s", "'re" ... are pieces of their own).
_L, _N, _P, _P_NO_APOSTROPHE = "A-Za-z", "0-9", "!-/:-@\\[-`{-~", "!-&(-/:-@\\[-`{-~"
_SUBCUT = re.compile(
    f"(?<=[{_L}])(?=[{_N}{_P}])|(?<=[{_N}])(?=[{_L}{_P}])|(?<=[{_P}])(?=[{_N}])|(?<=[{_P_NO_APOSTROPHE}])(?=[{_L}])"
)
DEFAULT_MAX_CACHE = 500_000  # entries per cache; ~200 bytes each for typical words: ~100 MB per process
# characters of all keys together (English words: ~3M at the entry bound); ~4 bytes each for Chinese with ids
DEFAULT_MAX_CACHE_CHARS = 32_000_000


def segment_cache_ok(tok: Tokenizer) -> bool:
    """True when `tok` is a GPT-2-style byte-level BPE whose documents can be encoded segment by segment."""
    config = json.loads(tok.to_str())
    model = config.get("model") or {}
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    return (
        model.get("type") == "BPE"
        and model.get("dropout") is None
        and config.get("normalizer") is None
        and config.get("truncation") is None
        and config.get("padding") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and pre.get("add_prefix_space") is False
        and all(t.get("special") for t in config.get("added_tokens") or [])
        and tok.hf.encode_special_tokens
    )


LONG_DOCUMENT = 1 << 20  # characters; longer documents are encoded in pieces of about this size


def long_pieces(text: str, size: int = LONG_DOCUMENT) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut just before a " " with a non-space on
    both sides (see `DocumentEncoder._long_doc`); a piece grows past `size` until such a space comes."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) - 1 and not (
            text[cut] == " " and not text[cut - 1].isspace() and not text[cut + 1].isspace()
        ):
            cut = text.find(" ", cut + 1)
            if cut < 0:
                cut = len(text)
                break
        if cut >= len(text) - 1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class DocumentEncoder:
    """Encode lists of documents to `(tokens, counts)`: ids with EOS after each document, and ids per document."""

    def __init__(
        self,
        tok: Tokenizer,
        dtype: type[np.unsignedinteger],
        *,
        max_cache: int = DEFAULT_MAX_CACHE,
        max_cache_chars: int = DEFAULT_MAX_CACHE_CHARS,
    ):
        self.tok = tok
        self.dtype = np.dtype(dtype).newbyteorder("=")
        self.eos = np.array([tok.eos_id], dtype=self.dtype).tobytes()
        self.cached = segment_cache_ok(tok)
        self.max_cache = max_cache
        self.max_cache_chars = max_cache_chars
        self._cache_chars = 0  # characters of the keys added since the caches were last emptied (an upper bound)
        # segment -> its ids as raw `dtype` bytes (joining bytes is a memcpy; no per-token Python work)
        self._first: dict[str, bytes] = {}  # first segment of a document
        self._spaced: dict[str, bytes] = {}  # segment after a space (key without it) -> ids of " " + key

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of `texts`, each followed by EOS, as one array; and each text's id count (EOS excluded)."""
        if not texts:
            return np.empty(0, dtype=self.dtype), np.empty(0, dtype=np.int64)
        if self.cached:
            docs = self._cached_docs([t if len(t) <= LONG_DOCUMENT else "" for t in texts])
            for i, text in enumerate(texts):
                if len(text) > LONG_DOCUMENT:  # split into millions of words at once, it took ~50 bytes a character
                    docs[i] = self._long_cached_doc(text)
        else:
            whole = self.tok.encode_batch([t if len(t) <= LONG_DOCUMENT else "" for t in texts])
            docs = [
                (self._long_doc(text) if len(text) > LONG_DOCUMENT else np.array(ids, dtype=self.dtype).tobytes())
                + self.eos
                for text, ids in zip(texts, whole, strict=True)
            ]
        counts = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)) // self.dtype.itemsize - 1
        return np.frombuffer(b"".join(docs), dtype=self.dtype), counts

    def _long_doc(self, text: str) -> bytes:
        """Ids of a document over LONG_DOCUMENT characters, encoded one piece at a time: an HF `Encoding`
        keeps ~190 bytes per character (offsets, strings), so a 47 MB one-line document took 9 GB at once.
        Pieces end before a space between two non-spaces, where no pre-tokenizer lmforge makes (byte-level
        BPE, WordPiece, Metaspace, characters) joins text across, so the ids are those of the whole text
        (tested); text with no such space (e.g. a long run of Chinese) stays in one piece."""
        return b"".join(
            np.array(self.tok.encode(piece), dtype=self.dtype).tobytes() for piece in long_pieces(text, LONG_DOCUMENT)
        )

    def _long_cached_doc(self, text: str) -> bytes:
        """Ids (and EOS) of a document over LONG_DOCUMENT characters, one piece at a time through the caches:
        a piece starts at a safe cut (see `long_pieces`), so its segments are the whole text's."""
        eos = len(self.eos)
        return b"".join(self._cached_docs([piece])[0][:-eos] for piece in long_pieces(text, LONG_DOCUMENT)) + self.eos

    def _cached_docs(self, texts: list[str]) -> list[bytes]:
        first, spaced = self._first, self._spaced
        if self._cache_chars > self.max_cache_chars:  # long keys (unspaced text): empty both
            first.clear()
            spaced.clear()
            self._cache_chars = 0
        if len(first) > self.max_cache // 4:  # first segments repeat less (titles, ids, numbers)
            first.clear()
        if len(spaced) > self.max_cache:
            spaced.clear()
        split = []
        for text in texts:
            if _UNSAFE.search(text):
                segments = _CUT.split(text)
                split.append([segments[0]] + [s[1:] for s in segments[1:]])
            else:
                split.append(text.split(" "))
        new_first = list({parts[0] for parts in split} - first.keys())
        new_spaced = list(set(chain.from_iterable(parts[1:] for parts in split)) - spaced.keys())
        # new first segments and new words go through `_encode_new`, which fills `first` with their pieces
        first_ids = self._encode_new(new_first)
        spaced.update(zip(new_spaced, self._encode_new([" " + s for s in new_spaced]), strict=True))
        first.update(zip(new_first, first_ids, strict=True))
        # (a first segment that is its own one piece was counted by `_encode_new` too: the count errs high)
        self._cache_chars += sum(map(len, new_first)) + sum(map(len, new_spaced))
        get, eos, join = spaced.__getitem__, self.eos, b"".join
        return [first[parts[0]] + join(map(get, parts[1:])) + eos for parts in split]

    def _encode_new(self, segments: list[str]) -> list[bytes]:
        """Ids of uncached segments: cut at `_SUBCUT`, pieces looked up in (or added to) the `_first` cache."""
        first = self._first
        pieces = [_SUBCUT.split(s) for s in segments]
        new = list(set(chain.from_iterable(pieces)) - first.keys())
        first.update(zip(new, self._encode_segments(new), strict=True))
        self._cache_chars += sum(map(len, new))
        join, get = b"".join, first.__getitem__
        return [join(map(get, parts)) for parts in pieces]

    def _encode_segments(self, segments: list[str], per_call: int = 256) -> list[bytes]:
        """Ids of each segment on its own, as bytes; many segments per Rust call (as pre-split words)."""
        groups = [segments[i : i + per_call] for i in range(0, len(segments), per_call)]
        out: list[bytes] = []
        for group, enc in zip(
            groups, self.tok.hf.encode_batch(groups, is_pretokenized=True, add_special_tokens=False), strict=True
        ):
            ids = np.array(enc.ids, dtype=self.dtype)
            ends = np.cumsum(np.bincount(np.array(enc.word_ids, dtype=np.int64), minlength=len(group)))
            starts = np.concatenate(([0], ends[:-1]))
            raw = ids.tobytes()
            size = self.dtype.itemsize
            out.extend(raw[a * size : b * size] for a, b in zip(starts.tolist(), ends.tolist(), strict=True))
        return out
