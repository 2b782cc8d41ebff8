"""The fast paths of `prepare`: the segment-cached encoder, block reading, and one-pass encoding with
a given tokenizer.json (workers or not) must give exactly what the plain slow paths give."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import ingest, ingest_blocks, ingest_text
from lmforge.data.clean import clean_text
from lmforge.data.ingest import block_documents, read_blocks, read_documents
from lmforge.data.prepare import PrepareConfig, load_data_dir, prepare
from lmforge.data.shards import read_shard
from lmforge.errors import DataError
from lmforge.tokenizer.fast_encode import DocumentEncoder, segment_cache_ok
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe, train_char, train_wordpiece
from tests.conftest import shakespeare_text
from tests.test_data_prepare import assert_nothing_written, write

TRICKY = [
    "a  b   c",  # spaces before spaces: not cut there
    "trailing space ",
    " leading space",
    "tab\there \t x",
    "new\n line\n\n  two blank",
    "emoji 😀 👍🏽 ok",
    "the <|endoftext|> string is text",
    "nbsp\u00a0here \u00a0x \u3000全角",
    "ctrl \x1c after a space",
    "café naïve ﬁ Ⅻ ¼ 123 4567",
    "it's they're we'll I'd 'sup",
    "[12.345] x'sup ?'s 'twas a1b2 1,000.5% e.g. --'re don't 5's café1 ROMEO:\nHello _x_ $9.99",
    "天地玄黄，宇宙洪荒。 中文 English",
    "line\u2028sep \u2029 x",
    "",
    " ",
    "x",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe([shakespeare_text(60_000), *TRICKY], 400)


def reference(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    ids = tok.encode_batch(texts)
    return np.array([i for doc in ids for i in [*doc, tok.eos_id]]), [len(doc) for doc in ids]


def test_document_encoder_gives_the_ids_of_encode_batch(bpe: Tokenizer) -> None:
    assert segment_cache_ok(bpe)
    texts = shakespeare_text(30_000).split("\n\n") + TRICKY
    encoder = DocumentEncoder(bpe, np.uint16, max_cache=50)  # tiny cache: cleared between calls
    for batch in (texts, TRICKY, texts[::-1]):
        tokens, counts = encoder.encode(batch)
        want, want_counts = reference(bpe, batch)
        assert tokens.dtype == np.uint16 and np.array_equal(tokens, want) and counts.tolist() == want_counts
    assert len(encoder._spaced) > 0  # the cache was used
    empty, no_counts = encoder.encode([])
    assert empty.size == 0 and no_counts.size == 0


def test_document_encoder_on_random_strings(bpe: Tokenizer) -> None:
    rng = random.Random(0)
    alphabet = list("abcXYZ019'\"!?.,:;-_[](){}<>|/\\@#$%^&*~`+= ") + [" ", " ", "\n", "\t", "\r", "\u00a0"]
    alphabet += ["\u3000", "\x1c", "\x85", "\u2028", "é", "中", "😀", "\u0301", "Ⅻ", "٣", "\u200b", "'s", "'re", "ll"]
    alphabet += ["<|endoftext|>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30))) for _ in range(3000)]
    encoder = DocumentEncoder(bpe, np.uint16, max_cache=400)
    for start in range(0, len(texts), 500):
        tokens, counts = encoder.encode(texts[start : start + 500])
        want, want_counts = reference(bpe, texts[start : start + 500])
        assert np.array_equal(tokens, want) and counts.tolist() == want_counts


def test_document_encoder_cache_is_bounded_in_characters(bpe: Tokenizer) -> None:
    """Text without spaces (Chinese) is one segment per document, cached whole: under the entry bound alone,
    125,000 documents of 3,000 characters held ~1.4 GB. The characters of the keys are bounded too."""
    rng = random.Random(2)
    han = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏"
    texts = ["".join(rng.choice(han) for _ in range(300)) for _ in range(60)]
    encoder = DocumentEncoder(bpe, np.uint16, max_cache_chars=2_000)
    for start in range(0, len(texts), 10):
        batch = texts[start : start + 10]
        tokens, counts = encoder.encode(batch)
        want, want_counts = reference(bpe, batch)
        assert np.array_equal(tokens, want) and counts.tolist() == want_counts
        held = sum(map(len, encoder._first)) + sum(map(len, encoder._spaced))
        assert held <= 2_000 + 2 * 10 * 300  # the bound, plus what one batch added
    assert encoder._first  # the cache was used


def test_other_tokenizers_take_the_plain_path() -> None:
    text = shakespeare_text(20_000)
    for tok in (train_char([text]), train_wordpiece([text], 200)):
        assert not segment_cache_ok(tok)
        tokens, counts = DocumentEncoder(tok, np.uint16).encode(TRICKY)
        want, want_counts = reference(tok, TRICKY)
        assert np.array_equal(tokens, want) and counts.tolist() == want_counts
    gpt2_like = json.loads(train_bpe([text], 300).to_str())
    gpt2_like["pre_tokenizer"]["add_prefix_space"] = True  # a space added per call: cutting would change ids
    assert not segment_cache_ok(Tokenizer.from_str(json.dumps(gpt2_like)))


def test_long_documents_are_encoded_in_pieces_with_the_same_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """A document over LONG_DOCUMENT characters is encoded piece by piece (bounded memory); pieces end
    before a space between non-spaces, so every tokenizer type gives the ids of the whole text."""
    from lmforge.tokenizer import fast_encode
    from lmforge.tokenizer.train import train_unigram

    text = shakespeare_text(20_000)
    rng = random.Random(1)
    long_docs = [" ".join(TRICKY) * 3, text[:6000], "中文" * 200 + " x", "  ".join(text[:3000].split(" "))]
    long_docs += ["".join(rng.choice("ab  \n\t中é.") for _ in range(3000))]
    monkeypatch.setattr(fast_encode, "LONG_DOCUMENT", 50)
    monkeypatch.setattr(fast_encode, "PIECE_CHARS", 50)
    calls = []
    for tok in (train_char([text]), train_wordpiece([text], 200), train_unigram([text], 400)):
        encode = tok.encode
        monkeypatch.setattr(tok, "encode", lambda piece, encode=encode: calls.append(piece) or encode(piece))
        tokens, counts = DocumentEncoder(tok, np.uint16).encode(long_docs + TRICKY)
        want, want_counts = reference(tok, long_docs + TRICKY)
        assert np.array_equal(tokens, want) and counts.tolist() == want_counts
    assert len(calls) > 100  # the documents really went in pieces...
    assert max(len(c) for c in calls if c in text) < 200  # ... of about 50 characters where spaces allow
    assert all("".join(fast_encode.long_pieces(d, 50)) == d for d in long_docs)


def test_long_documents_go_through_the_segment_cache_in_pieces(bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Split into its millions of words at once, a 30 MB one-line document took 1.5 GB to encode; over
    LONG_DOCUMENT characters it is encoded piece by piece, with the ids of the whole text."""
    from lmforge.tokenizer import fast_encode

    text = shakespeare_text(20_000)
    long_docs = [" ".join(TRICKY) * 3, text[:6000], "中文" * 200 + " x", text[:3000] + " "]
    monkeypatch.setattr(fast_encode, "LONG_DOCUMENT", 50)
    monkeypatch.setattr(fast_encode, "PIECE_CHARS", 50)
    encoder = DocumentEncoder(bpe, np.uint16)
    seen: list[int] = []
    cached_docs = encoder._cached_docs
    monkeypatch.setattr(encoder, "_cached_docs", lambda texts: seen.extend(map(len, texts)) or cached_docs(texts))
    tokens, counts = encoder.encode(long_docs + TRICKY)
    want, want_counts = reference(bpe, long_docs + TRICKY)
    assert np.array_equal(tokens, want) and counts.tolist() == want_counts
    assert len(seen) > 100 and max(seen) <= 400  # pieces of ~50 (the 400-character Chinese run: one piece)


def _one_line_document(n_chars: int) -> str:
    """Real English (the packaged Shakespeare) on one line, with JSON escapes and non-ASCII text inside."""
    book = shakespeare_text(1_200_000).replace("\n", " ")
    tricky = ' "quoted" back\\slash\\\\ tab\there \x01\x1f ctrl 😀👍🏽 emoji 天地玄黄，宇宙洪荒 café '
    text = ""
    while len(text) < n_chars:
        text += tricky + book
    return text[:n_chars]


def _encode_docs_file(
    tmp_path: Path, tok: Tokenizer, docs: list[str], *, trace: bool = False
) -> tuple[np.ndarray, np.ndarray, dict, int]:
    """`encode_split` of a docs file holding `docs` (as pass 1 writes it): (ids, train token counts, by_language,
    the peak of Python's allocations during `encode_split` in bytes when `trace`, else 0)."""
    import tracemalloc

    from tqdm import tqdm

    from lmforge.data.tokenizing import encode_split

    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    token_counts, by_language = np.zeros(tok.vocab_size, dtype=np.int64), {}
    if trace:
        tracemalloc.start()
    try:
        with tqdm(disable=True) as bar:
            shards, _ = encode_split(
                tok,
                path,
                tmp_path,
                "train",
                np.uint16,
                1 << 30,
                bar,
                token_counts=token_counts,
                by_language=by_language,
            )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    ids = np.concatenate([read_shard(tmp_path / name) for name in shards])
    for name in shards:
        (tmp_path / name).unlink()
    return ids, token_counts, by_language, peak


@pytest.mark.slow
def test_a_multi_mb_one_line_document_is_streamed_with_the_ids_of_the_whole(bpe: Tokenizer, tmp_path: Path) -> None:
    """A 2.2 MB one-line document (over LONG_DOCUMENT and the streaming line length) is read from the docs
    file in chunks and encoded in pieces: exactly `tokenizer.encode` of the whole text, for the byte-level
    BPE (segment cache) and char tokenizers; the statistics too. ~10 s: the whole-text reference encodes."""
    from lmforge.data import tokenizing
    from lmforge.tokenizer import fast_encode

    big = _one_line_document(2_200_000)
    assert len(big.encode("utf-8")) > 2 * tokenizing._STREAM_BYTES and len(big) > 2 * fast_encode.LONG_DOCUMENT
    docs = ["a short one", big, "", "天地 after"]
    for tok in (bpe, train_char([shakespeare_text(60_000)])):
        ids, token_counts, by_language, _ = _encode_docs_file(tmp_path, tok, docs)
        want = np.array([i for d in docs for i in [*tok.encode(d), tok.eos_id]])
        assert np.array_equal(ids, want)
        assert np.array_equal(token_counts, np.bincount(want, minlength=tok.vocab_size))
        assert sum(v[0] for v in by_language.values()) == sum(len(d.encode("utf-8")) for d in docs)
        assert sum(v[1] for v in by_language.values()) == len(want) - len(docs)
        assert by_language["en"][0] >= len(big.encode("utf-8"))


def test_a_one_line_document_is_encoded_in_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory while encoding a long document holds a chunk and a piece, not the document: with chunks of 4 KB
    and pieces of 1,000 characters, a 1 MB document peaks at a small fraction of its size in Python objects.
    (Read whole, it was held as its JSON line and its text: 857 MB of RSS for a 50 MB line.)"""
    from lmforge.data import tokenizing
    from lmforge.tokenizer import fast_encode

    monkeypatch.setattr(tokenizing, "_STREAM_BYTES", 4096, raising=False)  # (raising: so that it runs before the fix)
    monkeypatch.setattr(fast_encode, "LONG_DOCUMENT", 1000)
    monkeypatch.setattr(fast_encode, "PIECE_CHARS", 1000, raising=False)
    big = _one_line_document(1_000_000)
    tok = train_char([shakespeare_text(60_000)])
    ids, _, _, peak = _encode_docs_file(tmp_path, tok, [big], trace=True)
    assert np.array_equal(ids, [*tok.encode(big), tok.eos_id])
    assert peak < 500_000, peak  # bytes


def test_a_char_tokenizer_trains_on_a_long_document_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--tokenizer char` counts the characters of a long document chunk by chunk: the tokenizer of the whole."""
    from lmforge.data import tokenizing

    monkeypatch.setattr(tokenizing, "_STREAM_BYTES", 100)
    docs = [_one_line_document(5000), "short", "天地"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    assert len(list(tokenizing._text_chunks(path))) > 50
    cfg = PrepareConfig(inputs=["x"], out=str(tmp_path / "out"), tokenizer="char")
    tok, kind = tokenizing.make_tokenizer(cfg, None, path, 0, progress=False)
    assert kind == "char" and tok.to_str() == train_char(docs).to_str()


@pytest.mark.parametrize("tokenizer", ["bpe", "wordpiece", "unigram"])
def test_a_long_document_prepares_through_the_cli_as_its_whole_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: str
) -> None:
    """`lmforge prepare` of a one-line document trains its tokenizer on the docs file read in chunks and fed in
    pieces (here chunks of 4 KB and pieces of 300 characters, for a 60 kB line): the tokenizer.json of the
    trainer given the whole cleaned text at once, and the shard ids of encoding it whole. (Before, a long
    document was read whole and fed in pieces of 1M characters: +323 MB of training memory for a 50 MB line.)"""
    from lmforge.cli import main
    from lmforge.data import tokenizing
    from lmforge.data.filters import DocumentCleaner
    from lmforge.tokenizer import fast_encode, train

    line = _one_line_document(60_000)
    write(tmp_path / "one.txt", line + "\n")
    text = DocumentCleaner().one(line).text  # (its control characters removed)
    whole = getattr(train, f"train_{tokenizer}")([text], 600)
    monkeypatch.setattr(tokenizing, "_STREAM_BYTES", 4096)
    monkeypatch.setattr(fast_encode, "PIECE_CHARS", 300)
    pieces: list[str] = []
    trainer = getattr(tokenizing, f"train_{tokenizer}")
    monkeypatch.setattr(tokenizing, f"train_{tokenizer}", lambda texts, *a, **k: trainer(_seen(texts, pieces), *a, **k))
    out = tmp_path / "out"
    argv = ["prepare", str(tmp_path / "one.txt"), "--out", str(out), "--tokenizer", tokenizer, "--vocab-size", "600"]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--val-fraction", "0", "--test-fraction", "0", "--quiet"])
    assert done.value.code == 0
    assert len(pieces) > 100 and max(map(len, pieces)) < 2000  # the trainer got pieces, not the document
    assert (out / "tokenizer.json").read_text(encoding="utf-8") == whole.to_str()
    data = load_data_dir(out)
    ids = np.concatenate([read_shard(path) for path in data.split_shards("train")])
    assert np.array_equal(ids, [*whole.encode(text), whole.eos_id])


def _count_long_documents(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets an item for each long document `prepare` streams (`BlockWorker._long_document`)."""
    from lmforge.data import blocks

    streamed: list[int] = []
    long_document = blocks.BlockWorker._long_document
    monkeypatch.setattr(
        blocks.BlockWorker, "_long_document", lambda self, task: streamed.append(1) or long_document(self, task)
    )
    return streamed


def _stream_from_2000_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """`prepare` streams a document over 2,000 bytes, in chunks of 500, from blocks of 1,000."""
    from lmforge.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "LONG_DOCUMENT_BYTES", 2000)
    monkeypatch.setattr(prepare_module, "BLOCK_BYTES", 1000)
    monkeypatch.setattr(ingest_blocks, "_CHUNK_BYTES", 500)


def _prepared(argv: list[str], out: Path) -> dict[str, bytes]:
    """The files `lmforge prepare ARGV --out OUT` writes, by name; the manifest without its date and out path."""
    from lmforge.cli import main

    with pytest.raises(SystemExit) as done:
        main([*argv, "--out", str(out)])
    assert done.value.code == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    del manifest["created"], manifest["config"]["out"]
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"}
    return {**files, "manifest": json.dumps(manifest).encode()}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_long_document_is_read_and_cleaned_in_chunks_with_the_output_of_the_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Pass 1 streams a text file's document over LONG_DOCUMENT_BYTES (here 2 kB; blocks of 1 kB, chunks of ~500 B) from
    the input through cleaning (NFC across its chunks, control characters, a byte-order mark, CRLF), hashing
    (split, exact dedup: its copy is removed) and the filters into the docs file: the prepared folder is the one
    of reading it whole, byte for byte (manifest counts included), and a document the filters remove (too long,
    Chinese with --languages en) is removed as it was."""
    book = shakespeare_text(120_000).replace("\n", " ")
    long = book[:40_000] + " café e\u0301 \x01 天地玄黄 ." * 30
    text = (
        "\ufeff  " + long + "\r\n" + book[:3000] + "\n\n" + "\n\n".join(book[i : i + 300] for i in range(0, 6000, 300))
    )
    text += (
        "\n\n"
        + long
        + "\r\n"
        + book[:3000]
        + "\n\n"
        + "天地玄黄，宇宙洪荒。" * 500
        + "\n\n"
        + book[50_000:110_000]
        + "\n"
    )
    write(tmp_path / "a.txt", text)
    argv = ["prepare", str(tmp_path / "a.txt"), "--vocab-size", "500", "--quiet", "--no-card"]
    argv += ["--workers", str(workers), "--languages", "en", "--max-chars", "50000"]
    streamed = _count_long_documents(monkeypatch)
    whole = _prepared(argv, tmp_path / "whole")
    assert not streamed
    _stream_from_2000_bytes(monkeypatch)
    assert _prepared(argv, tmp_path / "streamed") == whole
    assert len(streamed) == 4  # the two copies of the long one, the Chinese one, the too-long one
    removed = json.loads(whole["manifest"])["documents"]["removed"]
    assert removed["exact_dup"] == 1 and removed["language"] == 1 and removed["too_long"] == 1


@pytest.mark.parametrize("tokenizer", ["char", "given"])
def test_file_unit_documents_stream_with_the_output_of_the_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: str
) -> None:
    """`--doc-unit file` read each file whole, and with a given tokenizer.json a long document of any unit was held
    whole (its text, cleaned text and ids). Now a file is one block, and a document over LONG_DOCUMENT_BYTES
    streams in chunks (with a given tokenizer, encoded a piece at a time from the spill file into its split's
    shard), blank lines, a BOM, CRLF and an empty file included, with the output of reading it whole."""
    book = shakespeare_text(60_000)
    (tmp_path / "in").mkdir()
    write(
        tmp_path / "in" / "a.txt", ("\ufeff  " + book[:20_000] + "\n\n  \n" + book[20_000:30_000]).replace("\n", "\r\n")
    )
    write(tmp_path / "in" / "b.txt", book[30_000:31_000] + "\n\n\n")
    write(tmp_path / "in" / "c.txt", "")
    write(tmp_path / "in" / "d.txt", "\n" + book[:20_000] + "\n\n  \n" + book[20_000:30_000] + "\n")  # a's text
    if tokenizer == "given":
        train_bpe([book], 400).save(tmp_path / "tokenizer.json")
        tokenizer = str(tmp_path / "tokenizer.json")
    argv = ["prepare", str(tmp_path / "in"), "--doc-unit", "file", "--tokenizer", tokenizer, "--quiet", "--no-card"]
    streamed = _count_long_documents(monkeypatch)
    whole = _prepared(argv, tmp_path / "whole")
    assert not streamed
    _stream_from_2000_bytes(monkeypatch)
    assert _prepared(argv, tmp_path / "streamed") == whole
    assert len(streamed) == 2  # a and d
    documents = json.loads(whole["manifest"])["documents"]
    assert documents["in"] == 4 and documents["removed"]["exact_dup"] == 1 and documents["removed"]["empty"] == 1


def _seen(texts: Iterable[str], seen: list[str]) -> Iterator[str]:
    """`texts` as they are read, each noted in `seen`; a new pass over `texts` on each `iter()`, as texts allow."""

    class Seen:
        def __iter__(self) -> Iterator[str]:
            for text in texts:
                seen.append(text)
                yield text

    return Seen()  # type: ignore[return-value]


def test_a_sampled_long_document_is_hashed_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the tokenizer trains on a hash sample of the train split, a long document is kept or left out by
    the sha256 of its whole text (and a Chinese one by its language) as a short one is, though read in chunks:
    the kept documents' text is fed in pieces, read a second time."""
    from lmforge.data import tokenizing
    from lmforge.data.split import bucket, doc_digest
    from lmforge.tokenizer import fast_encode

    monkeypatch.setattr(tokenizing, "_STREAM_BYTES", 256)
    monkeypatch.setattr(fast_encode, "PIECE_CHARS", 100)
    book = shakespeare_text(200_000).replace("\n", " ")
    docs = [book[i : i + 3000 + 37 * i % 2000] for i in range(0, 150_000, 5000)]
    docs += ["天地玄黄，宇宙洪荒。" * (50 + i) + " x y" for i in range(10)] + ["short", "天地"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    for fraction, unspaced in ((0.5, 1.0), (1.0, 0.4), (0.7, 0.3)):
        want = []
        for d in docs:
            keep = unspaced if unspaced < fraction and tokenizing.guess_language(d) == "zh" else fraction
            if keep >= 1 or bucket(doc_digest(d)[8:16]) < keep:
                want.append(d)
        assert 0 < len(want) < len(docs) or fraction == 1.0
        pieces = list(tokenizing._sample_docs(path, fraction, unspaced))
        assert "".join(pieces) == "".join(want)
        assert len(pieces) > len(want) and max(map(len, pieces)) < 1000


def test_tokenizers_that_pieces_would_change_encode_a_long_document_whole(
    bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A given tokenizer.json whose ids depend on where the text is cut (a Prepend normalizer, as Llama-2's adds
    "▁" before the text; a Split regex first, as Llama-3's) encodes a long document whole: in pieces, each
    piece got its own "▁". lmforge's own tokenizers are cut into pieces (the tests above)."""
    from lmforge.tokenizer import fast_encode
    from lmforge.tokenizer.train import train_unigram, with_nfkc

    text = shakespeare_text(20_000)
    config = json.loads(bpe.to_str())
    prepend = Tokenizer.from_str(json.dumps({**config, "normalizer": {"type": "Prepend", "prepend": "_"}}))
    split_first = {"type": "Split", "pattern": {"Regex": "\\w+ \\w+"}, "behavior": "Isolated", "invert": False}
    llama3_like = {
        **config,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split_first, config["pre_tokenizer"]]},
    }
    strip_right = {**config, "added_tokens": [*config["added_tokens"], {**config["added_tokens"][0], "id": 400,
                   "content": "<x>", "special": False, "rstrip": True}]}  # fmt: skip
    for tok in (prepend, Tokenizer.from_str(json.dumps(llama3_like)), Tokenizer.from_str(json.dumps(strip_right))):
        assert not fast_encode.piecewise_exact(tok)
    for tok in (bpe, with_nfkc(bpe), train_char([text]), train_wordpiece([text], 200), train_unigram([text], 400)):
        assert fast_encode.piecewise_exact(tok)
    monkeypatch.setattr(fast_encode, "LONG_DOCUMENT", 50)
    monkeypatch.setattr(fast_encode, "PIECE_CHARS", 50, raising=False)
    long_docs = [text[:3000], " ".join(TRICKY)]
    tokens, counts = DocumentEncoder(prepend, np.uint16).encode(long_docs)
    want, want_counts = reference(prepend, long_docs)
    assert np.array_equal(tokens, want) and counts.tolist() == want_counts


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 64])
def test_long_json_lines_are_read_in_chunks_as_json_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Chunks of a long line end anywhere, inside a UTF-8 character or an escape (\\n, \\", \\\\, \\u001f, a
    \\ud83d\\ude00 pair when the line was written with ensure_ascii): their texts join up to json.loads'."""
    from lmforge.data import tokenizing

    monkeypatch.setattr(tokenizing, "_STREAM_BYTES", size)
    texts = ['a"b\\c\nd\te\x1f\x00 😀 天地 \\\\"\\u" ' * 3, "\\", '"', "😀", "x\n", ""]
    lines = [json.dumps(t, ensure_ascii=ascii) for t in texts for ascii in (False, True)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    got = [d if isinstance(d, str) else "".join(d) for d in tokenizing._streamed_docs(path)]
    assert got == [t for t in texts for _ in (False, True)]


@pytest.mark.parametrize("doc_unit", ["paragraph", "line", "file"])
def test_blocks_parse_like_the_whole_file(tmp_path: Path, doc_unit: str) -> None:
    paragraphs = shakespeare_text(20_000).split("\n\n")
    # line ends of every kind, mixed in one file: Unix "\n", Windows "\r\n", old Mac OS "\r"
    separators = ["\n\n", "\n  \n", "\r\n\r\n", "\n\n\n", "\n \u3000\n", "\r\r", "\r \r", "\r\n\r", "\r\n\n"]
    ends = ["\n", "\r", "\r\n", "\n"]
    body = "".join(
        p.replace("\n", ends[i % len(ends)]) + separators[i % len(separators)] for i, p in enumerate(paragraphs)
    )
    data = ("\ufeff" + body).encode() + b"bad \xff\xfe bytes\n\n" + "\ufeffnot a BOM\nlast line, no newline".encode()
    jsonl = "".join(json.dumps({"text": t}) + "\n" + ("\n" if i % 7 == 0 else "") for i, t in enumerate(TRICKY * 5))
    for path in (write(tmp_path / "a.txt", data), write(tmp_path / "b.jsonl", "\ufeff" + jsonl)):
        want = list(read_documents(path, doc_unit=doc_unit))
        whole = doc_unit == "file" and path.suffix == ".txt"  # (a "file"-unit text file is one block, one document)
        assert len(want) == 1 if whole else len(want) > 20
        for block_bytes in (50, 999, 1 << 20):
            blocks = list(read_blocks(path, doc_unit=doc_unit, block_bytes=block_bytes))
            got = [doc for block in blocks for doc in block_documents(block, path, doc_unit=doc_unit)]
            assert got == want, (path.name, block_bytes)
            assert len(blocks) == 1 if whole else len(blocks) > 3 or block_bytes > 999
    empty = write(tmp_path / "empty.txt", b"")  # one empty document (counted, then removed as empty), or none
    want = list(read_documents(empty, doc_unit=doc_unit))
    assert [
        d for b in read_blocks(empty, doc_unit=doc_unit) for d in block_documents(b, empty, doc_unit=doc_unit)
    ] == want
    if doc_unit == "file":
        return
    # ... and the documents are the paragraphs (lines) written, whatever their line ends
    paragraphs[0] = "\ufeff" + paragraphs[0]
    docs = [d.text for d in read_documents(tmp_path / "a.txt", doc_unit=doc_unit)]
    cleaned = [clean_text(d).text for d in docs]
    if doc_unit == "paragraph":
        assert cleaned[: len(paragraphs)] == [p.strip().removeprefix("\ufeff") for p in paragraphs]
    else:
        lines = [line.strip().removeprefix("\ufeff") for p in paragraphs for line in p.split("\n") if line.strip()]
        assert cleaned[: len(lines)] == lines


@pytest.mark.parametrize("doc_unit", ["paragraph", "line", "file"])
def test_long_documents_stream_as_the_whole_file_parses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doc_unit: str
) -> None:
    """With `long_bytes`, a document that outgrows it comes as a `LongDocument` in chunks (here of ~300 bytes)
    whose texts and invalid UTF-8 counts join up to the document that `read_documents` gives, whatever follows:
    more lines of its paragraph (one long too), a blank line of U+3000, blank lines before it, a byte-order
    mark, bad bytes, old-Mac and Windows line ends, Chinese without spaces, the end of the file. (Read whole, it
    was held as bytes, text and cleaned text: pass 1 added ~190 MB for a 50 MB line.)"""
    from lmforge.data.ingest import LongDocument

    monkeypatch.setattr(ingest_blocks, "_CHUNK_BYTES", 300)
    book = shakespeare_text(40_000).replace("\n", " ")
    long = book[:5000]
    data = (
        (
            "\ufeff"
            + long
            + "\nnext line of it\r\n"
            + book[5000:9000]
            + "\n\u3000\nshort one\n\n\n\r\n"
            + "天地玄黄宇宙洪荒" * 400
            + "\r"
            + "x \xff" * 10
            + "\n\n"
            + long[:200]
            + "\n\n"
            + long
        )
        .encode("utf-8", errors="surrogateescape")
        .replace("\xc3\xbf".encode("latin-1"), b"\xff")
    )
    path = write(tmp_path / "a.txt", data)
    want = list(read_documents(path, doc_unit=doc_unit))
    assert sum(d.invalid_utf8 for d in want) == 10
    for block_bytes in (100, 999):
        got, streamed = [], 0
        for item in read_blocks(path, doc_unit=doc_unit, block_bytes=block_bytes, long_bytes=1000):
            if isinstance(item, LongDocument):
                chunks = list(item.chunks)
                got.append(ingest.RawDocument("".join(t for t, _ in chunks), sum(n for _, n in chunks)))
                streamed += 1
                assert len(chunks) > 1 and max(len(t) for t, _ in chunks) <= 300
            else:
                got.extend(block_documents(item, path, doc_unit=doc_unit))
        assert got == want, block_bytes
        assert streamed >= (1 if doc_unit == "file" else 3)
    if doc_unit == "file":  # the whole file over --max-line-bytes: refused as when it is read whole, in one line
        for block_bytes in (100, 1 << 20):
            for long_bytes in (1000, None):
                with pytest.raises(DataError, match=r"a\.txt: longer than 5,000 bytes, too big for one document"):
                    for item in read_blocks(
                        path, doc_unit="file", block_bytes=block_bytes, long_bytes=long_bytes, max_line_bytes=5000
                    ):
                        list(item.chunks) if isinstance(item, LongDocument) else None


@pytest.mark.parametrize("piece_bytes", [1, 2, 3, 7, 1 << 16])
def test_line_ends_cut_across_read_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece_bytes: int) -> None:
    """Text is read in pieces: a "\\r\\n" split between two is one line end, a lone "\\r" one too."""
    monkeypatch.setattr(ingest_text, "_PIECE_BYTES", piece_bytes)
    path = write(tmp_path / "a.txt", b"one\r\ntwo\rthree\n\r\n\rfour\r\r\nfive")
    lines = ["one\r\n", "two\r", "three\n", "four\r", "five"]
    assert [d.text for d in read_documents(path, doc_unit="line")] == lines
    assert [d.text for d in read_documents(path)] == ["one\r\ntwo\rthree\n", "four\r", "five"]
    long = write(tmp_path / "b.txt", "short\r\r" * 10 + "x" * 50 + "\r")
    with pytest.raises(DataError, match=r"b\.txt:21: a line longer than 40 bytes"):
        list(read_documents(long, max_line_bytes=40))


def test_block_errors_name_the_right_line(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    lines[30] = '{"text": broken'
    path = write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    blocks = list(read_blocks(path, block_bytes=100))
    with pytest.raises(DataError, match=r"c\.jsonl:31: not valid JSON"):
        for block in blocks:
            list(block_documents(block, path))
    for end in ("\n", "\r\n", "\r"):
        long = write(tmp_path / "d.txt", f"short{end}{end}" * 10 + "x" * 5000)
        with pytest.raises(DataError, match=r"d\.txt:21: a line longer than 1,000 bytes"):
            list(read_blocks(long, block_bytes=256, max_line_bytes=1000))


def test_blocks_search_each_byte_about_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A paragraph-mode file with no blank line is one document: reading it in blocks searches each new
    read for a boundary, not the whole growing document again (which was quadratic: minutes per GB)."""
    searched = []
    real = ingest_blocks._cut
    monkeypatch.setattr(ingest_blocks, "_cut", lambda data, *a: searched.append(len(data)) or real(data, *a))
    text = "a line of one long paragraph \n" * 4000  # 124 KB, read 256 bytes at a time
    path = write(tmp_path / "one.txt", text + "\n" + "tail\n")
    blocks = list(read_blocks(path, block_bytes=256))
    assert [b.data for b in blocks] == [(text + "\n").encode(), b"tail\n"]
    assert sum(searched) < 3 * len(text)
    assert [d for b in blocks for d in block_documents(b, path)] == list(read_documents(path))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory, bpe: Tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    bpe.save(path)
    return path


def test_given_tokenizer_one_pass_is_exact_and_worker_independent(tmp_path: Path, tokenizer_file: Path) -> None:
    text = shakespeare_text(120_000)
    write(tmp_path / "in" / "a.txt", text)
    write(tmp_path / "in" / "b.txt", text[: len(text) // 3])  # exact duplicates across files
    write(tmp_path / "in" / "c.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in TRICKY if t.strip()))
    outs = {}
    for workers in (1, 2):
        cfg = PrepareConfig(
            inputs=[str(tmp_path / "in")], out=str(tmp_path / f"w{workers}"), tokenizer=str(tokenizer_file),
            workers=workers, shard_tokens=5_000, min_alpha_ratio=0.5,
        )  # fmt: skip
        m = prepare(cfg, progress=False)
        del m["created"], m["config"]["out"], m["config"]["workers"]
        outs[workers] = m
    assert outs[1] == outs[2] and outs[1]["documents"]["removed"]["exact_dup"] > 50
    assert len(outs[1]["splits"]["train"]["shards"]) > 3
    for name in sorted(p.name for p in (tmp_path / "w1").iterdir()):
        if name not in ("manifest.json", "card.md"):  # the manifest and card hold the creation time
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    # the shards hold exactly the plain Rust encoding of each kept document, EOS after each
    data = load_data_dir(tmp_path / "w2")
    tok = data.load_tokenizer()
    for split in ("train", "val", "test"):
        tokens = np.concatenate([read_shard(p) for p in data.split_shards(split)] or [np.empty(0, np.uint16)])
        ends = np.flatnonzero(tokens == tok.eos_id)
        assert len(ends) == outs[1]["splits"][split]["documents"]
        docs = [tok.decode(d.tolist()) for d in np.split(tokens, ends + 1)[:-1]]
        docs = [d.removesuffix(Tokenizer.EOS) for d in docs]
        want, _ = reference(tok, docs)
        assert np.array_equal(tokens, want)


def test_worker_errors_reach_the_caller(tmp_path: Path, tokenizer_file: Path) -> None:
    write(tmp_path / "in" / "a.txt", shakespeare_text(20_000))
    write(tmp_path / "in" / "b.jsonl", '{"text": "fine"}\n{"text": broken}\n')
    cfg = PrepareConfig(
        inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"), tokenizer=str(tokenizer_file), workers=2
    )
    with pytest.raises(DataError, match=r"b\.jsonl:2: not valid JSON"):
        prepare(cfg, progress=False)
    assert_nothing_written(tmp_path / "in")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
