"""`prepare`'s tokenizer stage: the tokenizer (a given tokenizer.json, or one trained on the kept train
texts), encoding kept documents into token shards, and the tokenizer's report for the manifest and card.

- With a given tokenizer, pass 1 encodes in the block workers and `Encoded` appends each block's kept
  tokens to the shards; a tokenizer to be trained needs the kept texts first, so pass 2 trains it on the
  train split's temporary JSONL file (`make_tokenizer`; for bpe, wordpiece and unigram a train split
  over `TOKENIZER_SAMPLE_BYTES` is sampled by document hash, and for bpe and unigram its Chinese and
  Japanese documents over `UNSPACED_SAMPLE_BYTES`) and `encode_split` encodes each split's
  file in batches. Both record the same statistics: train token counts (`top_tokens`) and [UTF-8
  bytes, tokens] per guessed language (`tokenizer_report`).
- A document whose line in the temporary file is over 1 MiB is read a chunk at a time (`_streamed_docs`) and
  encoded a piece at a time (`DocumentEncoder.encode_stream`), its ids written as they come, with exactly the
  ids of encoding it whole (tested on a 2.2 MB document), so pass 2's memory holds a chunk and a piece, not the
  document; char training counts it chunk by chunk too, and the bpe, wordpiece and unigram trainers get it
  read in chunks and cut into pieces of about PIECE_CHARS characters (`_sample_docs`; when the train split is
  sampled, its hash is taken over the chunks and the chunks read again). Measured (bench/long_document.py,
  memory added while encoding one 50 MB line): bpe 222 -> 17 MB, char 488 -> 26 MB; 200 MB: bpe 737 -> 18 MB,
  char 1,743 -> 27 MB (and 198 -> 122 CPU seconds: char encodes a piece faster than a 1M-character one).
  Training on one 50 MB line (`--prepare`, memory over the start of prepare): bpe 291 -> 70 MB, wordpiece
  287 -> 79 MB, unigram 292 -> 110 MB (pieces of 1M characters read whole before; README has the table).
- `tokenizer_kind`, `tokenizer_report` and `top_tokens` serve `prepare --merge` (merge.py) too.
- Split out of `prepare.py` (size guide); the passes themselves stay there, in the order the data flows.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from tqdm import tqdm

from lmforge.data.blocks import BlockResult
from lmforge.data.filters import GUESS_CHARS, LANGUAGES, guess_language, utf8_len
from lmforge.data.shards import ShardWriter
from lmforge.data.split import SPLITS, bucket, chunks_digest, doc_digest
from lmforge.tokenizer import fast_encode
from lmforge.tokenizer.fast_encode import DocumentEncoder, text_pieces
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe, train_char, train_unigram, train_wordpiece, with_nfkc

if TYPE_CHECKING:
    from lmforge.data.prepare import PrepareConfig

_ENCODE_BATCH_DOCS = 4096
_ENCODE_BATCH_CHARS = 4_000_000
# BPE training memory grows with the number of distinct words it has seen, so a huge train split is
# sampled (by document hash, deterministically) down to about this many bytes; nanochat trains its
# tokenizer on ~2B characters for the same reason.
TOKENIZER_SAMPLE_BYTES = 1 << 30
# ... but text without spaces (Chinese, Japanese) gives byte-level BPE one "word" per clause, nearly all
# distinct, and HF's trainer keeps ~50 bytes per byte of them (measured: 570 MB of RSS training on 5 MB
# of Hong Lou Meng, 800 MB on 10 MB, English flat at ~290 MB from 14 to 28 MB), so 1 GiB of Chinese
# asked for ~50 GB; Unigram (one Metaspace "word" per paragraph) took 534 MB on 1 MB and passed 2.5 GB
# on 5 MB. Such documents are sampled down to about these many bytes (~1 GB of trainer memory); 20 MB
# of Chinese is ~7M characters, 2 MB ~700k, for vocabularies of thousands to tens of thousands.
UNSPACED_SAMPLE_BYTES = {"bpe": 20_000_000, "unigram": 2_000_000}
UNSPACED_LANGUAGES = frozenset({"zh", "ja"})
TRAINED_TOKENIZERS = ("bpe", "char", "wordpiece", "unigram")


class Encoded:
    """Pass 1's shard writers and token statistics when the tokenizer is given (no pass 2)."""

    def __init__(self, tmp: Path, dtype: type[np.unsignedinteger], shard_tokens: int, vocab_size: int) -> None:
        self.writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        self.token_counts = np.zeros(vocab_size, dtype=np.int64)  # of train, EOS included
        self.by_language = np.zeros((len(SPLITS), len(LANGUAGES), 2), dtype=np.int64)  # [UTF-8 bytes, tokens]

    def write(self, r: BlockResult, keep: np.ndarray) -> None:
        """Append the kept documents' tokens to their splits' shards."""
        assert r.tokens is not None and r.token_counts is not None
        token_split = np.repeat(np.where(keep, r.splits, len(SPLITS)), r.token_counts + 1)
        for index, split in enumerate(SPLITS):
            tokens = r.tokens[token_split == index]
            if tokens.size:
                self.writers[split].write(tokens)
                if split == "train":
                    vocab = len(self.token_counts)
                    self.token_counts += np.bincount(tokens, minlength=vocab)[:vocab]
        where = (r.splits[keep], r.languages[keep])
        np.add.at(self.by_language[..., 0], where, r.nbytes[keep])
        np.add.at(self.by_language[..., 1], where, r.token_counts[keep])

    def write_long(self, r: BlockResult, encoder: Any) -> None:
        """`write` for a kept long document whose cleaned text is in the spill file `r.spill`
        (`BlockWorker._long_document`): read back and encoded a piece at a time (`DocumentEncoder.encode_stream`,
        the ids `encode` gives the whole text), so memory holds a chunk and a piece, not the document."""
        assert r.spill is not None and r.splits is not None and r.languages is not None and r.nbytes is not None
        split = int(r.splits[0])
        writer, train = self.writers[SPLITS[split]], SPLITS[split] == "train"
        vocab, n = len(self.token_counts), 0
        for ids in chain(encoder.encode_stream(_spilled_chunks(r.spill)), [np.frombuffer(encoder.eos, encoder.dtype)]):
            writer.write(ids)
            n += len(ids)
            if train:
                self.token_counts += np.bincount(ids, minlength=vocab)[:vocab]
        self.by_language[split, r.languages[0]] += (r.nbytes[0], n - 1)  # (tokens without the EOS)

    def language_stats(self, split: str) -> dict[str, list[int]]:
        """{language: [UTF-8 bytes, tokens without EOS]} of `split`, as `encode_split` counts them."""
        table = self.by_language[SPLITS.index(split)].tolist()
        return {LANGUAGES[i]: row for i, row in enumerate(table) if row[0] or row[1]}


# A document whose JSON line is longer than this many bytes is read in chunks of this size (`_streamed_docs`)
_STREAM_BYTES = 1 << 20
_HIGH_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")


def _streamed_docs(path: Path) -> Iterator[str | Iterator[str]]:
    """The documents of docs file `path`, except that one longer than _STREAM_BYTES comes as an iterator over its
    text in chunks, read from the file as they are asked for (each must be used up before the next document).

    Read whole, a 50 MB one-line document was in memory twice (its JSON line and its text) before encoding."""
    for _, doc in _docs_at(path):
        yield doc


def _docs_at(path: Path) -> Iterator[tuple[int, str | Iterator[str]]]:
    """`_streamed_docs`, each document with the file offset of its line (`_chunks_at` reads a long one again)."""
    with open(path, "rb") as f:
        while True:
            offset = f.tell()
            line = f.readline(_STREAM_BYTES)
            if not line:
                return
            if line.endswith(b"\n") or len(line) < _STREAM_BYTES:
                yield offset, json.loads(line)
            else:
                yield offset, _json_string_chunks(f, line)


def _chunks_at(path: Path, offset: int) -> Iterator[str]:
    """The text of the long document whose line starts at `offset` of `path`, in chunks (a second reading)."""
    with open(path, "rb") as f:
        f.seek(offset)
        yield from _json_string_chunks(f, f.readline(_STREAM_BYTES))


def _text_chunks(path: Path) -> Iterator[str]:
    """The documents of `path`, a long one in several chunks."""
    for doc in _streamed_docs(path):
        yield from [doc] if isinstance(doc, str) else doc


def _json_string_chunks(f: BinaryIO, head: bytes) -> Iterator[str]:
    """The text of the JSON string on the line that starts with `head`, the rest read from `f` to the line's end."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    rest = decoder.decode(head)[1:]  # after the opening quote
    while True:
        block = f.readline(_STREAM_BYTES)
        end = block.endswith(b"\n") or not block
        rest += decoder.decode(block, final=end)
        if end:  # the closing quote, then the line end
            yield json.loads('"' + rest.rstrip("\n"))
            return
        cut = _json_cut(rest)
        if cut > 0:
            yield json.loads('"' + rest[:cut] + '"')
            rest = rest[cut:]


class _Quoted:
    """A spill file (JSON string content) read by `_json_string_chunks` as the line of that string: its closing
    quote and line end come after the file's bytes."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.closed = f, False

    def readline(self, size: int) -> bytes:
        data = self.f.readline(size)
        if data or self.closed:
            return data
        self.closed = True
        return b'"\n'


def _spilled_chunks(spill: str) -> Iterator[str]:
    """The text in file `spill`, the content of a JSON string (as `BlockWorker._long_document` writes it), in
    chunks of about _STREAM_BYTES."""
    with open(spill, "rb") as f:
        yield from _json_string_chunks(_Quoted(f), b'"')  # type: ignore[arg-type]


def _json_cut(content: str) -> int:
    """Where JSON string `content` (which starts outside an escape) may be cut: before its last character (it may
    be the closing quote), before the first escape in its last 12 characters (an escape is at most 6 long), and not
    between the halves of a \\u surrogate pair."""
    cut = len(content) - 1
    i = content.find("\\", max(0, cut - 12))
    while i >= 0:
        if _starts_escape(content, i):
            cut = i
            break
        i = content.find("\\", i + 1)
    if cut >= 6 and _HIGH_SURROGATE_ESCAPE.fullmatch(content, cut - 6, cut) and _starts_escape(content, cut - 6):
        cut -= 6
    return cut


def _starts_escape(content: str, i: int) -> bool:
    """Whether the backslash at `i` starts an escape: it ends an odd run of backslashes."""
    start = i
    while start > 0 and content[start - 1] == "\\":
        start -= 1
    return (i - start) % 2 == 0


def _sample_docs(path: Path, fraction: float, unspaced_fraction: float = 1.0) -> Iterator[str]:
    """Documents of `path`, each kept with probability `fraction` (`unspaced_fraction` for Chinese and
    Japanese ones, when lower), decided by its hash (deterministic), in pieces of about PIECE_CHARS.

    A document goes in pieces cut where no pre-tokenizer joins text (`text_pieces`: the trainer counts the same
    words): HF's trainers held ~120 bytes per character of the text they were given (3.6 GB for a 30 MB one-line
    file whole; in 1M-character pieces +323 MB for a 50 MB one). A long document is read in chunks (as pass 2
    reads it), and when it is sampled its hash is taken over the chunks and its text read a second time, so
    memory holds a chunk and a piece, not the document."""
    for offset, doc in _docs_at(path):
        chunks: Iterable[str] = [doc] if isinstance(doc, str) else doc
        keep = fraction
        if unspaced_fraction < fraction:
            head, chunks = _head(chunks, GUESS_CHARS)  # all that guess_language reads
            if guess_language(head) in UNSPACED_LANGUAGES:
                keep = unspaced_fraction
        if keep < 1:
            if isinstance(doc, str):
                digest = doc_digest(doc)
            else:
                digest, chunks = chunks_digest(chunks), _chunks_at(path, offset)
            if bucket(digest[8:16]) >= keep:  # digest bytes 8..16: independent of the split's bucket (0..8)
                continue
        yield from text_pieces(chunks, fast_encode.PIECE_CHARS)


def _head(chunks: Iterable[str], n: int) -> tuple[str, Iterable[str]]:
    """The first `n` characters of the text that `chunks` hold, and chunks that still hold all of it."""
    it = iter(chunks)
    taken: list[str] = []
    while sum(map(len, taken)) < n and (chunk := next(it, None)) is not None:
        taken.append(chunk)
    return "".join(taken)[:n], chain(taken, it)


class _SampledDocs:
    """`_sample_docs` as an iterable that reads the file again on each pass (WordPiece training makes two)."""

    def __init__(self, path: Path, fraction: float, unspaced_fraction: float) -> None:
        self.path, self.fraction, self.unspaced_fraction = path, fraction, unspaced_fraction

    def __iter__(self) -> Iterator[str]:
        return _sample_docs(self.path, self.fraction, self.unspaced_fraction)


def tokenizer_kind(tok: Tokenizer) -> str:
    """What a given tokenizer.json is, by its model type: "wordpiece", "unigram", "char" (lmforge's:
    BPE without merges, byte fallback) or "bpe"; "file" when none of these (e.g. WordLevel).

    Recorded as manifest["tokenizer"]["kind"], which `pretrain` reads to warn that a GPT trained on
    WordPiece cannot decode its own text back, so a shared tokenizer must not hide its kind."""
    model = json.loads(tok.to_str()).get("model") or {}
    kind = {"WordPiece": "wordpiece", "Unigram": "unigram", "BPE": "bpe"}.get(model.get("type"), "file")
    if kind == "bpe" and not model.get("merges") and model.get("byte_fallback"):
        return "char"
    return kind


def make_tokenizer(
    cfg: PrepareConfig,
    given: Tokenizer | None,
    train_docs: Path,
    train_bytes: int,
    progress: bool,
    *,
    unspaced_bytes: int = 0,
) -> tuple[Tokenizer, str]:
    """The given tokenizer, or one trained on `train_docs` (`train_bytes` UTF-8 bytes in all, `unspaced_bytes` of
    them in Chinese and Japanese documents: both decide how much of it the trainer sees)."""
    if given is not None:
        return given, tokenizer_kind(given)
    tok, kind = _train_tokenizer(cfg, train_docs, train_bytes, unspaced_bytes, progress)
    return (with_nfkc(tok) if cfg.normalize == "NFKC" else tok), kind  # later text normalized as this was


def _train_tokenizer(
    cfg: PrepareConfig, train_docs: Path, train_bytes: int, unspaced_bytes: int, progress: bool
) -> tuple[Tokenizer, str]:
    if cfg.tokenizer == "char":
        # memory: one counter per distinct character (and a chunk of a long document: characters count the same)
        return train_char(_text_chunks(train_docs)), "char"
    # the Rust trainers draw their own bar, and only print stray newlines when stderr is no terminal
    show = progress and sys.stderr.isatty()
    fraction = TOKENIZER_SAMPLE_BYTES / max(train_bytes, 1)
    unspaced_budget = UNSPACED_SAMPLE_BYTES.get(cfg.tokenizer)  # (WordPiece cuts Chinese into characters)
    unspaced_fraction = unspaced_budget / max(unspaced_bytes, 1) if unspaced_budget else 1.0
    texts = _SampledDocs(train_docs, fraction, unspaced_fraction)
    if cfg.tokenizer == "wordpiece":
        tok = train_wordpiece(texts, cfg.vocab_size, show_progress=show)
        _note_characters_only(tok, cfg.vocab_size)
        return tok, "wordpiece"
    if cfg.tokenizer == "unigram":
        return train_unigram(texts, cfg.vocab_size, show_progress=show), "unigram"
    return train_bpe(texts, cfg.vocab_size, show_progress=show, extra_specials=cfg.special_tokens == "all"), "bpe"


def _note_characters_only(tok: Tokenizer, asked: int) -> None:
    """WordPiece keeps every character and its ## form first (a --vocab-size below that is refused by the trainer):
    a --vocab-size of exactly that leaves no room for a single longer piece, and the tokenizer is character-level
    (English at ~1.2 bytes per token) without a word said."""
    pieces = [b.decode("utf-8") for b in tok.token_utf8() if b]  # the text each id adds ("##" cut; specials: none)
    if pieces and max(len(p) for p in pieces) == 1:
        print(
            f"note: the WordPiece vocabulary ({tok.vocab_size:,} ids for --vocab-size {asked:,}) is all single "
            "characters: the corpus' characters and their ## forms fill it; raise --vocab-size above "
            f"{tok.vocab_size:,} to learn words and subwords",
            file=sys.stderr,
        )


def encode_split(
    tok: Tokenizer,
    docs: Path,
    out_dir: Path,
    split: str,
    dtype: type[np.unsignedinteger],
    max_tokens: int,
    bar: tqdm,
    *,
    token_counts: np.ndarray | None = None,
    by_language: dict[str, list[int]] | None = None,
) -> tuple[list[str], int]:
    """Encode one split's documents (EOS after each) into shards; return (shard names, tokens).

    `token_counts` (if given) accumulates how often each id occurs; `by_language` accumulates
    [UTF-8 bytes, tokens without EOS] per guessed language, for the tokenizer report.
    """
    writer = ShardWriter(out_dir, split, dtype, max_tokens)
    encoder = DocumentEncoder(tok, dtype)

    def write(tokens: np.ndarray) -> None:
        writer.write(tokens)
        if token_counts is not None:
            token_counts[:] += np.bincount(tokens, minlength=len(token_counts))[: len(token_counts)]

    def note(text: str, size: int, n: int) -> None:  # a document of `size` UTF-8 bytes and `n` tokens
        if by_language is not None:
            entry = by_language.setdefault(guess_language(text), [0, 0])
            entry[0] += size
            entry[1] += n

    def flush(batch: list[str]) -> None:
        tokens, counts = encoder.encode(batch)
        write(tokens)
        sizes = [utf8_len(text) for text in batch]
        bar.update(sum(sizes))
        for text, size, n in zip(batch, sizes, counts.tolist(), strict=True):
            note(text, size, n)

    def long_document(chunks: Iterator[str]) -> None:
        """One document read and encoded a piece at a time: memory holds a chunk and a piece, not the document."""
        head, size, n = "", 0, 0  # its first characters (all the language guess reads), UTF-8 bytes, tokens

        def counted() -> Iterator[str]:
            nonlocal head, size
            for chunk in chunks:
                head += chunk[: max(GUESS_CHARS - len(head), 0)]
                size += utf8_len(chunk)
                bar.update(utf8_len(chunk))
                yield chunk

        for ids in encoder.encode_stream(counted()):
            write(ids)
            n += len(ids)
        write(np.array([tok.eos_id], dtype=dtype))
        note(head, size, n)

    try:
        batch: list[str] = []
        chars = 0
        for doc in _streamed_docs(docs):
            if not isinstance(doc, str):
                if batch:  # documents go into the shards in order
                    flush(batch)
                    batch, chars = [], 0
                long_document(doc)
                continue
            batch.append(doc)
            chars += len(doc)
            if len(batch) >= _ENCODE_BATCH_DOCS or chars >= _ENCODE_BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
        return writer.close(), writer.total_tokens
    except BaseException:
        writer.abort()
        raise


def tokenizer_report(split: str, by_language: dict[str, list[int]]) -> dict[str, Any]:
    """Compression (UTF-8 bytes per token) on `split`, overall and for English and Chinese."""
    total = [sum(v[0] for v in by_language.values()), sum(v[1] for v in by_language.values())]
    report: dict[str, Any] = {"split": split, "bytes_per_token": {}, "documents_bytes": {}}
    for name, (nbytes, tokens) in [("all", total)] + [(lang, by_language.get(lang, [0, 0])) for lang in ("en", "zh")]:
        report["bytes_per_token"][name] = round(nbytes / tokens, 4) if tokens else None
        report["documents_bytes"][name] = nbytes
    return report


def top_tokens(tok: Tokenizer, counts: np.ndarray, k: int = 30) -> list[dict[str, Any]]:
    order = np.argsort(-counts, kind="stable")[:k]
    # the text each token adds (decode([id]) drops a lone word-start "▁" of a Metaspace tokenizer: ''),
    # or a special token's name (<|endoftext|>), which adds no text
    pieces = tok.token_utf8()
    shown = {int(i): pieces[int(i)].decode("utf-8", errors="replace") or tok.id_to_token(int(i)) for i in order}
    return [{"id": int(i), "token": shown[int(i)], "count": int(counts[i])} for i in order if counts[i] > 0]
