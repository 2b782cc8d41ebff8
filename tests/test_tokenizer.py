"""Tokenizer training, round trips (CJK, emoji, whitespace), save/load, token_bytes, fingerprint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from lmforge.errors import ConfigError, DataError
from lmforge.eval.lm import text_byte_table
from lmforge.tokenizer.tokenizer import Tokenizer, bytes_to_unicode
from lmforge.tokenizer.train import EXTRA_SPECIALS, train_bpe, train_char, train_unigram, train_wordpiece

WORDS = "the quick brown fox jumps over lazy dog and cat sat on a mat while it rained all day long".split()
CHINESE = "满纸荒唐言，一把辛酸泪！都云作者痴，谁解其中味？"

SAMPLES = [
    "Hello, world! The quick brown fox.",
    "满纸荒唐言，一把辛酸泪",
    "👩‍💻🎉 emoji with ZWJ and flags 🇫🇷",
    "mixed 中文 and English, 日本語 too; Ελληνικά, русский, عربى",
    "  leading spaces\n\n\ttabs\t\tand   runs of   spaces\n\n\n",
    "\r\nwindows newlines\r\n and a lone \r carriage return",
    "literal special token <|endoftext|> inside text <0x41>",
    "",
]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "." for _ in range(n)]
    docs += [CHINESE * 2, "天下大势，分久必合，合久必分。"]
    return docs


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(iter(corpus()), 300)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return train_char(iter(corpus()))


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(request: pytest.FixtureRequest, kind: str, text: str) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.eos_id not in ids  # the literal "<|endoftext|>" in text is text, not the special id


def test_unigram_reads_special_and_byte_piece_strings_as_text() -> None:
    """Its model matched "<|endoftext|>" in a document as the EOS piece (a document boundary in the shards),
    "<|user|>" as the chat-role id and "<0x41>" as the byte piece of "A"."""
    tok = train_unigram(iter(corpus() + ["<tag> [note] x<y"] * 3), 400)
    text = "a<|endoftext|>b <|user|> [UNK] <0x41> <|pad|>"
    ids = tok.encode(text)
    assert min(ids) > len(EXTRA_SPECIALS) + 1  # no special or [UNK] id (byte pieces: "|" is unseen)
    assert tok.decode(ids) == text
    assert (
        tok.decode(tok.encode("  x <tag> [note] x<y 满纸")) == " x <tag> [note] x<y 满纸"
    )  # Metaspace's one lost space


def test_bpe_basics(bpe: Tokenizer) -> None:
    assert bpe.vocab_size == 300
    assert bpe.eos_id == 0
    assert bpe.id_to_token(bpe.eos_id) == Tokenizer.EOS
    # merges were learned: common words take fewer tokens than bytes
    assert len(bpe.encode("the quick brown fox")) < len(b"the quick brown fox")
    assert bpe.decode([*bpe.encode("a"), bpe.eos_id]) == "a" + Tokenizer.EOS
    assert bpe.decode([*bpe.encode("a"), bpe.eos_id], skip_special_tokens=True) == "a"


def test_bpe_vocab_too_small() -> None:
    with pytest.raises(ConfigError, match="257"):
        train_bpe(iter(["x"]), 100)


def test_char_vocab_is_sorted_characters(char: Tokenizer) -> None:
    chars = sorted(set("".join(corpus())))
    assert char.vocab_size == 1 + 256 + len(chars)
    assert char.eos_id == 0
    assert [char.id_to_token(i) for i in range(1, 4)] == ["<0x00>", "<0x01>", "<0x02>"]
    assert [char.id_to_token(257 + i) for i in range(len(chars))] == chars
    # one token per seen character; unseen ones fall back to their UTF-8 bytes
    assert len(char.encode("the cat")) == 7
    assert len(char.encode("€")) == 3
    assert char.decode(char.encode("unseen: €Ωж🙂")) == "unseen: €Ωж🙂"


def test_char_vocab_cap_keeps_most_frequent() -> None:
    tok = train_char(iter(["aaaabbbccd"]), vocab_size=257 + 2)
    assert tok.vocab_size == 259
    assert {tok.id_to_token(257), tok.id_to_token(258)} == {"a", "b"}
    assert tok.decode(tok.encode("abcd")) == "abcd"


def test_same_corpus_same_tokenizer() -> None:
    assert train_bpe(iter(corpus()), 300).fingerprint == train_bpe(iter(corpus()), 300).fingerprint
    assert train_char(iter(corpus())).fingerprint == train_char(iter(corpus())).fingerprint


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_load_identical(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert not (tmp_path / "tokenizer.json.tmp").exists()
    loaded = Tokenizer.load(path)
    assert Tokenizer.load(tmp_path).fingerprint == tok.fingerprint  # a folder holding tokenizer.json works too
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert loaded.fingerprint == tok.fingerprint
    assert Tokenizer.from_str(tok.to_str()).fingerprint == tok.fingerprint
    # the file is a plain HF tokenizer.json
    assert HFTokenizer.from_file(str(path)).get_vocab_size() == tok.vocab_size
    assert json.loads(path.read_text(encoding="utf-8"))["model"]["type"] == "BPE"


def test_fingerprint_differs(bpe: Tokenizer, char: Tokenizer) -> None:
    other = train_bpe(iter(corpus(seed=1) + ["zzz zzz zzz"] * 50), 300)
    assert len({bpe.fingerprint, char.fingerprint, other.fingerprint}) == 3
    assert len(bpe.fingerprint) == 64


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_token_bytes_sum_to_text_bytes(request: pytest.FixtureRequest, kind: str) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    table = tok.token_bytes()
    assert table.dtype == np.int64 and table.shape == (tok.vocab_size,)
    assert table[tok.eos_id] == 0
    for text in SAMPLES + corpus(20, seed=3) + ["unseen €Ωж🙂"]:
        ids = tok.encode(text)
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text
    assert int(table[[*tok.encode("ab"), tok.eos_id]].sum()) == 2


@pytest.mark.parametrize("kind", ["bpe", "char", "wordpiece", "unigram"])
def test_text_byte_table_counts_the_text_bytes(request: pytest.FixtureRequest, kind: str) -> None:
    """bpb's byte table: WordPiece leaves out the spaces between words and Metaspace adds one before each
    document, so `text_byte_table` rescales them to the text's bytes; exact tables keep a scale of 1."""
    if kind in ("bpe", "char"):
        tok: Tokenizer = request.getfixturevalue(kind)
    else:
        tok = (train_wordpiece if kind == "wordpiece" else train_unigram)(iter(corpus()), 400)
    texts = corpus(40, seed=5)
    ids = [np.asarray(tok.encode(t) + [tok.eos_id]) for t in texts]
    true_bytes = sum(len(t.encode("utf-8")) for t in texts)
    raw = sum(int(tok.token_bytes()[i].sum()) for i in ids)
    table = text_byte_table(tok.token_bytes(), ids, true_bytes)
    assert table.dtype == torch.float64 and table[tok.eos_id] == 0
    assert sum(float(table[torch.as_tensor(i)].sum()) for i in ids) == pytest.approx(true_bytes, rel=1e-12)
    if kind in ("bpe", "char"):
        assert raw == true_bytes and torch.equal(table, torch.as_tensor(tok.token_bytes(), dtype=torch.float64))
    else:
        assert abs(raw - true_bytes) > 0.01 * true_bytes  # the table alone was off: the scale matters
    assert torch.equal(text_byte_table(tok.token_bytes(), [], 0), torch.as_tensor(tok.token_bytes()).double())


def test_byte_table_is_a_bijection() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256


def test_load_foreign_hf_tokenizer(tmp_path: Path) -> None:
    # a WordLevel tokenizer with an </s> token: loads, and eos falls back to </s>
    hf = HFTokenizer(models.WordLevel({"hello": 0, "world": 1, "</s>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "foreign.json"
    hf.save(str(path))
    tok = Tokenizer.load(path)
    assert tok.encode("hello world") == [0, 1]
    assert tok.eos_id == 2
    assert tok.token_bytes().tolist() == [5, 5, 4, 5]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a valid tokenizer.json") as e:
        Tokenizer.load(bad)
    assert "\n" not in str(e.value)


def test_wordpiece_too_small_names_the_smallest_size_that_fits():
    """The WordPiece trainer keeps every character and the ## form of each one seen inside a word: below that
    it silently returned more ids than asked. It is a one-line error naming the smallest --vocab-size that
    fits, counted here from the tokenizer's own normalizer and pre-tokenizer: that size trains, one less does not."""
    from tests.conftest import shakespeare_text

    texts = shakespeare_text(20_000).split("\n\n") + ["满纸荒唐言，一把辛酸泪！都云作者痴，谁解其中味？"]
    hf = train_wordpiece(iter(["x"]), 64).hf  # only for its normalizer and pre-tokenizer
    words = [w for t in texts for w, _ in hf.pre_tokenizer.pre_tokenize_str(hf.normalizer.normalize_str(t))]
    chars = {c for w in words for c in w}
    continued = {c for w in words for c in w[1:]}
    need = 1 + len(EXTRA_SPECIALS) + 1 + len(chars) + len(continued)  # <|endoftext|>, specials, [UNK], alphabet
    with pytest.raises(ConfigError, match=r"WordPiece --vocab-size 100 is too small") as e:
        train_wordpiece(iter(texts), vocab_size=100)
    assert "\n" not in str(e.value) and f"needs at least {need} (9 special tokens + {len(chars)} distinct " in str(
        e.value
    )
    assert f"set --vocab-size {need} or more" in str(e.value)
    assert train_wordpiece(iter(texts), vocab_size=need).vocab_size == need
    with pytest.raises(ConfigError, match=f"needs at least {need} "):
        train_wordpiece(iter(texts), vocab_size=need - 1)


def test_wordpiece_training_is_the_same_every_time():
    """HF's trainer numbered the "##x" forms in hash-map order, which changes with every map, and took merges of
    equal count in id order: 4 trainings on the same 20 kB gave 4 different tokenizer.json files (and other shards).
    The forms are now handed to it in code-point order as special tokens, then made ordinary pieces again."""
    from tests.conftest import shakespeare_text

    texts = shakespeare_text(20_000).split("\n\n") + [CHINESE]
    first = train_wordpiece(texts, 300)
    assert all(train_wordpiece(iter(texts), 300).to_str() == first.to_str() for _ in range(3))
    added = {t.content for t in first.hf.get_added_tokens_decoder().values()}
    assert added == {"<|endoftext|>", *EXTRA_SPECIALS, "[UNK]"}  # a "##e" in the text is no special token
    assert "##e" in first.hf.get_vocab() and first.hf.encode("##e").tokens[-1] == "e"  # not one "##e" token


@pytest.mark.parametrize("corpus", ["chinese", "shakespeare", "no-repeats", "no-repeats-small"])
def test_unigram_too_small_names_the_smallest_size_that_fits(corpus: str):
    """The HF trainer keeps every distinct character: it fails when they alone overflow the size (Chinese
    text has thousands), and silently returns more than asked when the specials and byte pieces on top do
    (281 asked, 581 made on Shakespeare). Both are one-line errors naming the smallest --vocab-size that
    fits: that size trains, one less does not. It needs one piece beyond the characters, except for a corpus
    in which no two characters repeat together, where it has none (the error named one more than fits)."""
    from tests.conftest import shakespeare_text

    if corpus == "chinese":
        rng = random.Random(0)
        chars = [chr(0x4E00 + i) for i in range(600)]  # 600 distinct CJK characters, and spaces and tabs
        texts = [" ".join("".join(rng.choice(chars) for _ in range(20)) for _ in range(10)) + "\t" for _ in range(50)]
        small = 400  # fewer than the characters: the trainer's own error
    elif corpus == "shakespeare":
        texts = shakespeare_text(100_000).split("\n\n")
        small = 281  # the smallest size allowed at all, where the trainer returns more
    else:  # each CJK character once, in words of 7 (and a repeated document: the trainer counts words once)
        chars = [chr(0x4E00 + i) for i in range(700 if corpus == "no-repeats" else 300)]
        texts = [" ".join("".join(chars[i : i + 7]) for i in range(0, len(chars), 7))] * 2
        small = 400 if corpus == "no-repeats" else 281  # the trainer's error, its overflow
    meta = pre_tokenizers.Metaspace()  # the trainer's words: "▁" for each space and before each text
    n_chars = len({c for text in texts for word, _ in meta.pre_tokenize_str(text) for c in word})
    piece = corpus in ("chinese", "shakespeare")
    need = 1 + len(EXTRA_SPECIALS) + 1 + 256 + n_chars + piece  # <|endoftext|>, specials, [UNK], bytes, chars, piece
    with pytest.raises(ConfigError, match=rf"--vocab-size {small} is too small") as e:
        train_unigram(iter(texts), vocab_size=small)
    assert "\n" not in str(e.value) and f"needs at least {need} " in str(e.value)
    assert f"{n_chars} distinct characters{' + 1 piece' if piece else ';'}" in str(
        e.value
    ) and f"set --vocab-size {need} or more" in str(e.value)
    assert train_unigram(iter(texts), vocab_size=need).vocab_size == need
    with pytest.raises(ConfigError, match=f"needs at least {need} "):
        train_unigram(iter(texts), vocab_size=need - 1)
    with pytest.raises(ConfigError, match=r"must be >= 281 \(.*\), got 280$"):  # below any corpus's need
        train_unigram(iter(texts), vocab_size=280)


def test_vocab_size_is_the_ids_a_model_needs_when_an_imported_vocabulary_has_a_hole(tmp_path: Path) -> None:
    """transformers builds a WordPiece from a vocabulary that lists "a" twice (a word and a letter, as real vocab.txt
    files sometimes do) with the later id: 73 tokens on ids 0-73. Sized by the token count, a model refused the data
    prepared with it ("holds token id 73, beyond the tokenizer's 73 ids"), and an encoder's appended [PAD] took id 73
    of a real token."""
    transformers = pytest.importorskip("transformers")
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.train.run import pretrain
    from tests.conftest import tiny_config

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = "the a cat dog sat ran on mat red blue sun moon and is was big small".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *(f"##{c}" for c in letters)]
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(str(tmp_path / "hf"))
    tok = Tokenizer.load(tmp_path / "hf" / "tokenizer.json")
    assert len(tok.hf.get_vocab(with_added_tokens=True)) == 73 and tok.vocab_size == 74
    assert tok.encode("quiz") == [vocab.index(t) for t in ("q", "##u", "##i", "##z")]  # ##z: id 73
    rng = random.Random(0)
    lines = [" ".join(rng.choices([*words, "quiz", "xyz"], k=12)) for _ in range(200)]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
    data = tmp_path / "data"
    prepare(PrepareConfig(inputs=[str(docs)], out=str(data), tokenizer=str(tmp_path / "hf" / "tokenizer.json")),
            progress=False)  # fmt: skip
    state = pretrain(tiny_config(data, tmp_path / "run", **{"train.max_steps": 2, "eval.every": 0}), progress=False)
    assert state.step == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert config["model"]["vocab_size"] == 74


_TRAIN_UNTIL_INTERRUPTED = """
import random, sys
from lmforge.tokenizer.train import train_unigram
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
texts = [" ".join(rng.choices(words, k=100)) for _ in range(2000)]
def feed():
    yield from texts
    print("fed", flush=True)  # the trainer has every text: from here on it computes in Rust (~6 s here)
try:
    train_unigram(feed(), 4000)
except KeyboardInterrupt:
    sys.exit(130)
print("trained", flush=True)
"""


def test_ctrl_c_stops_tokenizer_training_at_once() -> None:
    """Python runs a signal handler only in the main thread, between bytecodes, and the HF trainer held the main
    thread in Rust once it had read its texts: a Ctrl-C 14 s into `prepare --tokenizer unigram` on 21 MB exited
    270 s later. The trainer now runs in a thread while the main one waits, so Ctrl-C ends it at once.
    (A subprocess: the interrupted trainer thread runs on until its process ends.)"""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", _TRAIN_UNTIL_INTERRUPTED], stdout=subprocess.PIPE, text=True, encoding="utf-8"
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "fed\n"
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert time.monotonic() - start < 2.5 and proc.stdout.read() == ""  # it stopped before training ended
    finally:
        proc.kill()
        proc.wait()
