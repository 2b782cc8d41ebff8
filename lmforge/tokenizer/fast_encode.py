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
from collections.abc import Iterable, Iterator
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


LONG_DOCUMENT = 1 << 20  # characters; longer documents are encoded in pieces (`encode_stream`)
# characters per piece of a long document: an HF `Encoding` holds ~190 bytes per character (offsets, strings),
# so a piece of 64K characters costs ~12 MB while it is encoded (1M-character pieces took ~200 MB)
PIECE_CHARS = 1 << 16


def long_pieces(text: str, size: int = LONG_DOCUMENT) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut just before a " " with a non-space on
    both sides (see `DocumentEncoder.encode_stream`); a piece grows past `size` until such a space comes."""
    return list(text_pieces([text], size)) or [text]


def text_pieces(chunks: Iterable[str], size: int) -> Iterator[str]:
    """The text that arrives as consecutive `chunks` (cut anywhere), given back in pieces cut as `long_pieces`
    cuts, as the chunks come: memory holds a chunk and a piece, not the whole text."""
    carry = ""
    for chunk in chunks:
        text, start = carry + chunk, 0
        while len(text) - start > size:
            cut = _next_cut(text, start + size)
            if cut < 0:
                break
            yield text[start:cut]
            start = cut
        carry = text[start:]
    if carry:
        yield carry


def _next_cut(text: str, cut: int) -> int:
    """The first position >= `cut` just before a " " with a non-space on both sides; -1 when none."""
    while cut < len(text) - 1 and not (
        text[cut] == " " and not text[cut - 1].isspace() and not text[cut + 1].isspace()
    ):
        cut = text.find(" ", cut + 1)
        if cut < 0:
            return -1
    return cut if cut < len(text) - 1 else -1


# Where a pre-tokenizer always ends a pre-token at a " " between two non-spaces (see `piecewise_exact`)
_CUTTING_PRE_TOKENIZERS = {"ByteLevel", "Whitespace", "WhitespaceSplit", "BertPreTokenizer", "Metaspace"}
# ... and those that only cut the pre-tokens further, each on its own
_SUBSPLITTING_PRE_TOKENIZERS = _CUTTING_PRE_TOKENIZERS | {"Digits", "Punctuation", "UnicodeScripts", "Split"}
# normalizers of one character at a time, whose output at a " " does not depend on its neighbours
_LOCAL_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "BertNormalizer"}


def piecewise_exact(tok: Tokenizer) -> bool:
    """True when encoding a text in pieces cut before a " " between two non-spaces gives the ids of the whole
    text: every tokenizer lmforge trains (byte-level BPE, char, WordPiece, Unigram) and tokenizer.json files
    built the same way. Not, for example, a Llama-2-style file (a `Prepend("▁")` normalizer: each piece would
    start with an extra "▁"), a pre-tokenizer that starts with a `Split` regex (Llama-3's: nothing says where
    it cuts), no pre-tokenizer over a BPE with merges (merges may cross spaces), or an added token that takes
    in the whitespace after it (`rstrip`): such tokenizers encode a long document whole."""
    config = json.loads(tok.to_str())
    model = config.get("model") or {}
    if model.get("dropout") is not None or config.get("truncation") is not None or config.get("padding") is not None:
        return False
    norm = config.get("normalizer")
    norms = (norm.get("normalizers") or [] if norm.get("type") == "Sequence" else [norm]) if norm else []
    if any(n.get("type") not in _LOCAL_NORMALIZERS for n in norms):
        return False
    for added in config.get("added_tokens") or []:
        matched = not added.get("special") or not tok.hf.encode_special_tokens  # (else never looked for in text)
        if matched and (added.get("rstrip") or any(c.isspace() for c in added.get("content", ""))):
            return False
    pre = config.get("pre_tokenizer")
    if pre is None:  # the whole text is one word: only a character-level BPE (no merges) cuts anywhere
        return model.get("type") == "BPE" and not model.get("merges")
    members = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [pre]
    if not members or not _cuts_at_spaces(members[0]):
        return False
    return all(m.get("type") in _SUBSPLITTING_PRE_TOKENIZERS for m in members[1:])


def _cuts_at_spaces(pre: dict) -> bool:
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True) is True  # GPT-2's split regex (see this module's docstring)
    if pre.get("type") == "Metaspace":  # a piece starts with " " -> "▁": nothing is prepended to it
        return pre.get("split", True) is True
    return pre.get("type") in _CUTTING_PRE_TOKENIZERS


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
        self.piecewise = self.cached or piecewise_exact(tok)
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
        short = [t if len(t) <= LONG_DOCUMENT else "" for t in texts]
        if self.cached:
            docs = self._cached_docs(short)
        else:
            docs = [np.array(ids, dtype=self.dtype).tobytes() + self.eos for ids in self.tok.encode_batch(short)]
        for i, text in enumerate(texts):
            if len(text) > LONG_DOCUMENT:  # split into millions of words at once, it took ~50 bytes a character
                docs[i] = b"".join(ids.tobytes() for ids in self.encode_stream([text])) + self.eos
        counts = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)) // self.dtype.itemsize - 1
        return np.frombuffer(b"".join(docs), dtype=self.dtype), counts

    def encode_stream(self, chunks: Iterable[str]) -> Iterator[np.ndarray]:
        """Ids of one document that arrives as consecutive `chunks` of its text (cut anywhere), a piece at a time
        (no EOS), so memory holds a chunk and a piece of about PIECE_CHARS characters, not the document.

        Pieces end before a " " between two non-spaces, where no pre-tokenizer of a `piecewise_exact` tokenizer
        joins text across, so the ids are those of the whole text (tested); text with no such space (e.g. a
        long run of Chinese) grows one piece until one comes. Other tokenizers get the whole text at once."""
        if not self.piecewise:
            yield self._piece_ids("".join(chunks))
            return
        for piece in text_pieces(chunks, PIECE_CHARS):
            yield self._piece_ids(piece)

    def _piece_ids(self, text: str) -> np.ndarray:
        if self.cached:  # a piece starts at a safe cut (see `long_pieces`), so its segments are the whole text's
            return np.frombuffer(self._cached_docs([text])[0][: -len(self.eos)], dtype=self.dtype)
        return np.array(self.tok.encode(text), dtype=self.dtype)

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
        # (set.difference(dict) looks each member up; `set - dict.keys()` walked the whole cache on every call,
        # ~5 ms a call for a Shakespeare-sized cache: a long document's hundreds of pieces paid it each)
        new_first = list({parts[0] for parts in split}.difference(first))
        new_spaced = list(set(chain.from_iterable(parts[1:] for parts in split)).difference(spaced))
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
        new = list(set(chain.from_iterable(pieces)).difference(first))
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
