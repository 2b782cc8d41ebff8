"""Train tokenizers from a stream of texts: byte-level BPE (GPT-2 style), character-level,
WordPiece (BERT-style, for encoders) and Unigram (SentencePiece-style).

Key design decisions:
- Byte-level BPE (`train_bpe`): HF `tokenizers` BPE with the ByteLevel pre-tokenizer
  (add_prefix_space=False, GPT-2 split regex) and decoder, and all 256 bytes in the initial alphabet,
  so any UTF-8 text - Chinese, emoji, control bytes - encodes without an unknown token and decodes
  back exactly. One special token, `<|endoftext|>` (id 0), separates documents. Training streams
  the texts (`train_from_iterator`); memory grows with the number of distinct pre-tokenized words,
  not with the corpus.
- Character level (`train_char`): one token per character (code point) seen in the training text,
  sorted by code point so the vocabulary is deterministic, after `<|endoftext|>` (id 0) and the 256
  byte tokens `<0x00>`..`<0xFF>` (ids 1..256). It is an HF BPE model with no merges and
  `byte_fallback=True`, no normalizer and no pre-tokenizer: a character never seen in training is
  encoded as its UTF-8 bytes and decoded back by the ByteFallback+Fuse decoders, so text round-trips.
  Being an ordinary HF BPE tokenizer.json, it loads in `transformers` too.
- WordPiece (`train_wordpiece`): BERT's recipe without lower-casing or accent stripping (cased, so
  nothing is lost), with the BertNormalizer putting spaces around CJK characters so Chinese is one
  piece per character, BertPreTokenizer (whitespace + punctuation) and "##" continuation pieces.
  Unknown characters become `[UNK]`; decoding joins pieces with spaces, so it does not round-trip
  text exactly (it is meant for encoders). The "##" forms are given to the HF trainer up front, in
  code-point order (`_continuation_forms`): it numbered them in hash-map order, so each run chose other pieces.
- Unigram (`train_unigram`): the SentencePiece algorithm (Kudo 2018, https://arxiv.org/abs/1804.10959)
  with the Metaspace pre-tokenizer ("▁" marks a word start; "<" and "[" are words of their own, so no text
  matches a special or byte piece) and `byte_fallback`, so every character
  encodes (unseen ones as <0xNN> byte pieces) and decode(encode(text)) == text up to whitespace runs.
- Normalization (`with_nfkc`): `prepare --normalize NFKC` rewrites the training text (full-width ，：！ become
  ASCII , : !), so the tokenizer it trains gets an NFKC normalizer in front of its own: text encoded
  later (fine-tuning files, prompts, task eval, the HF export) is changed the same way. Without it a
  Chinese review's ， was three byte tokens the BPE model never saw, and WordPiece's [UNK] (12% of the
  tokens of 600 food-delivery reviews; 3% once normalized). NFC, the default, adds nothing: it only
  changes how a character is encoded, not which one it is, and the word cache of `fast_encode` (several
  times faster) needs a BPE without a normalizer; an NFKC BPE encodes through `encode_batch`.
- Special tokens: `<|endoftext|>` is always id 0. WordPiece and Unigram always add `EXTRA_SPECIALS`
  (padding, mask, separator, classifier and chat-role markers) right after it, for the MLM, pair and
  chat tasks; BPE adds them only with `specials="all"`, so existing BPE vocabularies keep their ids.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import ConfigError
from lmforge.tokenizer.tokenizer import Tokenizer

SPECIAL_TOKENS = [Tokenizer.EOS]
EXTRA_SPECIALS = ["<|pad|>", "<|mask|>", "<|sep|>", "<|cls|>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK = "[UNK]"
# The smallest byte-level BPE vocabulary: every byte plus the special tokens, no merges.
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_from_iterator(hf: HFTokenizer, texts: Iterable[str], trainer: Any) -> None:
    """`hf.train_from_iterator(texts, trainer=trainer)`, run in a thread while this one waits, so Ctrl-C and
    SIGTERM stop `prepare` at once: Python runs a signal handler only in the main thread and only between
    bytecodes, and the HF trainer holds the main thread in Rust once it has read the texts (a Ctrl-C 14 s
    into training a Unigram vocabulary on 21 MB exited 270 s later, when the trainer was done). The trainer
    releases the GIL (it takes it back only to pull the next text), so the wait costs nothing; on an
    interrupt the thread (a daemon) is left to end with the process. Its exceptions are raised here."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            hf.train_from_iterator(texts, trainer=trainer)
        except BaseException as e:  # noqa: BLE001 - raised again in the calling thread
            failed.append(e)

    thread = threading.Thread(target=run, name="lmforge-tokenizer-trainer", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.25)
    if failed:
        raise failed[0]


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, show_progress: bool = False, extra_specials: bool = False
) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE tokenizer.

    Args:
        texts: training documents (any iterable; consumed once).
        vocab_size: total ids including the 256 byte tokens and `<|endoftext|>`; at least 257.
        show_progress: let the Rust trainer draw its own progress bar.
        extra_specials: also reserve `EXTRA_SPECIALS` (ids 1..7).

    Returns:
        The trained `Tokenizer`; `<|endoftext|>` has id 0.

    Raises:
        ConfigError: vocab_size is smaller than 257.
    """
    specials = SPECIAL_TOKENS + (EXTRA_SPECIALS if extra_specials else [])
    if vocab_size < 256 + len(specials):
        raise ConfigError(
            f"BPE vocab_size must be >= {256 + len(specials)} (256 bytes + special tokens), got {vocab_size}"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    train_from_iterator(hf, texts, trainer)
    return Tokenizer(hf)


def train_char(texts: Iterable[str], *, vocab_size: int = 0) -> Tokenizer:
    """Train a character-level tokenizer with byte fallback.

    Args:
        texts: training documents (any iterable; consumed once).
        vocab_size: 0 = keep every character seen; otherwise keep the most frequent characters so
            the total (specials + 256 bytes + characters) is at most this; the rest use byte fallback.

    Returns:
        The `Tokenizer`: `<|endoftext|>` = 0, `<0x00>`..`<0xFF>` = 1..256, then characters by code point.

    Raises:
        ConfigError: vocab_size is positive but smaller than 257.
    """
    if vocab_size and vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"char vocab_size must be 0 or >= {MIN_BPE_VOCAB} (256 bytes + specials), got {vocab_size}")
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    if vocab_size:
        keep = vocab_size - MIN_BPE_VOCAB
        # most_common breaks ties by first occurrence; sort by (-count, char) for determinism instead
        chars = sorted(sorted(counts, key=lambda c: (-counts[c], c))[:keep])
    else:
        chars = sorted(counts)

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)] + chars:
        vocab.setdefault(token, len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return Tokenizer(hf)


def train_wordpiece(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
    """Train a cased BERT-style WordPiece tokenizer (see the module docstring).

    `texts` is read twice (see `_continuation_forms`): pass a list or another iterable that starts over on each
    `iter()`, as `prepare` does; a one-shot iterator is read into a list first.

    Returns:
        The `Tokenizer`: `<|endoftext|>` = 0, `EXTRA_SPECIALS` = 1..7, `[UNK]` = 8, then pieces.

    Raises:
        ConfigError: vocab_size leaves no room for pieces (< 64), or is smaller than the specials plus every
            distinct character of the texts and its "##" form (the HF trainer keeps them all); it names the size
            that fits.
    """
    if vocab_size < 64:
        raise ConfigError(f"WordPiece vocab_size must be >= 64, got {vocab_size}")
    if iter(texts) is texts:  # a generator: it would be empty the second time
        texts = list(texts)
    specials = SPECIAL_TOKENS + EXTRA_SPECIALS + [UNK]
    hf = _wordpiece_tokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=specials + _continuation_forms(texts),
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    train_from_iterator(hf, texts, trainer)
    config = json.loads(hf.to_str())  # the "##" forms are ordinary pieces, not special tokens that match text
    config["added_tokens"] = [t for t in config["added_tokens"] if t["content"] in specials]
    hf = HFTokenizer.from_str(json.dumps(config, ensure_ascii=False))
    # The trainer starts from the specials, every character and the "##" form of each one seen inside a word,
    # and merges until vocab_size: below that start it silently returned the start (100 asked, 1,579 made on
    # 20 kB of Shakespeare + 30 kB of Hong Lou Meng), a character-level tokenizer of another size than asked.
    # Then the vocabulary is exactly that start, so its size is the smallest --vocab-size that fits.
    if hf.get_vocab_size() > vocab_size:
        pieces = [piece for piece in hf.get_vocab() if piece not in specials]
        n_continued = sum(piece.startswith("##") for piece in pieces)
        need = hf.get_vocab_size()
        raise ConfigError(
            f"WordPiece --vocab-size {vocab_size} is too small for this corpus: it needs at least {need} "
            f"({len(specials)} special tokens + {len(pieces) - n_continued} distinct characters + {n_continued} "
            f"'##' continuation forms; Chinese text has thousands of characters); set --vocab-size {need} or more "
            "(more to learn words and subwords), or use --tokenizer bpe (byte-level: any text fits)"
        )
    return Tokenizer(hf)


def _wordpiece_tokenizer() -> HFTokenizer:
    """An untrained BERT-style WordPiece: cased BertNormalizer (CJK characters spaced apart), BertPreTokenizer."""
    hf = HFTokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    return hf


def _continuation_forms(texts: Iterable[str]) -> list[str]:
    """The "##x" form of every character x that follows another inside a word of `texts`, in code-point order.

    HF's WordPiece trainer numbers these forms as it meets them in its hash map of words, whose order changes
    from process to process, and takes merges of equal count in id order: the same texts gave other pieces on
    each run (tinyshakespeare + Hong Lou Meng, 3.6 MB at vocab 8,000: 3 runs of `prepare`, 3 different
    tokenizer.json files and shards). Handed to it first, as special tokens in this order, the forms keep fixed
    ids and the training is the same every time.

    Whether the normalizer and pre-tokenizer end a word at a character depends on that character alone
    (whitespace and punctuation split, CJK characters stand alone), so each distinct character is asked once, in
    "a{x}a"; the text, with every such character made a space, then loses each word's first character and what
    is left is the continuations. ~0.7 s for those 3.6 MB, next to ~4.5 s of training (a pass of the trainer
    itself with no room for merges found the same forms in ~2.5 s).
    """
    hf = _wordpiece_tokenizer()
    seen: set[str] = set()
    apart: dict[int, str] = {}  # str.translate table: every character that ends a word -> " "
    first = re.compile("(?:^| +)[^ ]?")  # a word's first character, with the spaces before it
    continued: set[str] = set()
    for text in texts:
        for c in set(text) - seen:
            seen.add(c)
            if len(hf.pre_tokenizer.pre_tokenize_str(hf.normalizer.normalize_str(f"a{c}a"))) != 1:
                apart[ord(c)] = " "
        continued.update(first.sub("", text.translate(apart)))
    return sorted("##" + c for c in continued)


def with_nfkc(tok: Tokenizer) -> Tokenizer:
    """`tok` with Unicode NFKC applied before its own normalizer (module docstring), for text that
    `prepare --normalize NFKC` trained it on; special tokens are matched before normalizing, as before."""
    hf = tok.hf
    hf.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([hf.normalizer] if hf.normalizer else []))
    return Tokenizer(hf)


def train_unigram(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
    """Train a SentencePiece-style Unigram tokenizer with byte fallback (see the module docstring).

    Returns:
        The `Tokenizer`: `<|endoftext|>` = 0, `EXTRA_SPECIALS` = 1..7, `[UNK]` = 8, `<0x00>`..`<0xFF>`, pieces.

    Raises:
        ConfigError: vocab_size leaves no room for pieces beyond the specials and 256 bytes, or for every
            distinct character of the texts (the HF trainer keeps them all); it names the size that fits.
    """
    fixed = SPECIAL_TOKENS + EXTRA_SPECIALS + [UNK] + [f"<0x{b:02X}>" for b in range(256)]
    if vocab_size < len(fixed) + 16:
        raise ConfigError(
            f"Unigram vocab_size must be >= {len(fixed) + 16} (specials + 256 bytes + pieces), got {vocab_size}"
        )
    hf = HFTokenizer(models.Unigram())
    hf.pre_tokenizer = _unigram_pre_tokenizer()
    # "▁" -> " " per piece (the first piece loses its prepended space), then bytes -> characters, join
    hf.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=fixed,
        unk_token=UNK,
        show_progress=show_progress,
    )

    chars: set[str] = set()  # every character of the texts, for `too_small` (~20 ms per million characters)
    words: set[str] = set()  # the trainer's distinct words and their adjacent character pairs, kept only
    pairs: set[str] = set()  # until one pair repeats (at once in any real text), see `too_small`
    repeats = False
    words_of = _unigram_pre_tokenizer().pre_tokenize_str  # not hf's own: the trainer holds its lock while reading

    def counted(texts: Iterable[str]) -> Iterable[str]:
        nonlocal repeats
        for text in texts:
            chars.update(text)
            for word, _ in [] if repeats else words_of(text):
                if word in words:
                    continue
                words.add(word)
                for i in range(len(word) - 1):
                    if word[i : i + 2] in pairs:
                        repeats = True
                        break
                    pairs.add(word[i : i + 2])
            if repeats:
                words.clear()
                pairs.clear()
            yield text

    def too_small(has_piece: bool) -> ConfigError:
        # What the trainer keeps: the fixed tokens, every character of its words (Metaspace turns each
        # space into "▁" and puts one before every text), then pieces until the total is exactly
        # vocab_size, checked only after adding one, so one more when it has any piece of 2+ characters
        # (tokenizers 0.23, measured: 408 characters fail at 265 + 408 and fit at 265 + 408 + 1). Its seed
        # pieces are substrings found twice in its distinct words, so with no character pair repeating
        # there it has none, and 265 + the characters fit (was +1 always: one above the smallest size that
        # fits for such a corpus). The floor above is the other bound.
        n_chars = len(chars - {" "} | ({"▁"} if chars else set()))
        need = max(len(fixed) + 16, len(fixed) + n_chars + int(has_piece))
        plus_piece = " + 1 piece" if has_piece else ""
        return ConfigError(
            f"Unigram --vocab-size {vocab_size} is too small for this corpus: it needs at least {need} ({len(fixed)} "
            f"special and byte tokens + {n_chars} distinct characters{plus_piece}; Chinese text has thousands of "
            f"characters); set --vocab-size {need} or more, or use --tokenizer bpe (byte-level: any text fits)"
        )

    try:
        train_from_iterator(hf, counted(texts), trainer)
    except Exception as e:  # noqa: BLE001 - the HF trainer raises a bare Exception
        if "not large enough to contain all chars" not in str(e):
            raise
        raise too_small(repeats) from None
    # The trainer keeps the byte pieces as specials; byte_fallback makes the model use them for unseen characters.
    config = json.loads(hf.to_str())
    # The HF trainer only raises when the characters alone overflow the size; with the specials and
    # byte pieces on top it silently returns more (281 asked, 581 made): refuse that too.
    if len(config["model"]["vocab"]) > vocab_size:  # it trained: whether it kept a longer piece is known
        raise too_small(any(len(piece) > 1 for piece, _ in config["model"]["vocab"][len(fixed) :]))
    config["model"]["byte_fallback"] = True
    vocab = config["model"]["vocab"]
    config["model"]["vocab"] = vocab[: len(fixed)] + _canonical_pieces(vocab[len(fixed) :])
    config["added_tokens"] = [t for t in config["added_tokens"] if not t["content"].startswith("<0x")]
    return Tokenizer(HFTokenizer.from_str(json.dumps(config, ensure_ascii=False)))


def _unigram_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Metaspace ("▁" before each word), then every "<" and "[" as a word of its own.

    The Unigram model matches text against all of its pieces, the specials and byte pieces included
    (score 0, the best there is), so a document holding "<|endoftext|>" got the EOS id in the middle of
    its tokens (a document boundary in the shards), "<|user|>" the chat-role id, and "<0x41>" the byte
    piece of "A" (decoded as "A"). Every such piece starts with "<" or "[", which now never begins a
    longer word, so no piece of the text can be one of them."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Split(Regex(r"[<\[]"), behavior="isolated")]
    )


def _canonical_pieces(pieces: list[list[Any]]) -> list[list[Any]]:
    """Unigram pieces in a run-independent order.

    Two sources of run-to-run variation in the HF trainer (measured: two runs on the same texts gave
    different tokenizer.json files): its parallel EM sums floats in varying order (scores differ in
    the last bits, ~1e-15), and characters that never became pieces are appended in hash-map order
    with scores stepping down by 1e-4 (then equal). Scores are rounded to 1e-6 and sorted; the
    trailing run with steps <= 1e-4 (found from the scores alone, so the same run every time) is
    re-assigned in code-point order; everything is then sorted by (score, piece).
    """
    rounded = sorted(([piece, round(score, 6)] for piece, score in pieces), key=lambda p: (-p[1], p[0]))
    start = len(rounded) - 1
    while start > 0:
        step = rounded[start - 1][1] - rounded[start][1]
        if step > 1e-4 + 2e-6:
            break
        start -= 1
    if len(rounded) - start > 1:
        scores = [score for _, score in rounded[start:]]
        rounded[start:] = [[piece, score] for (piece, _), score in zip(sorted(rounded[start:]), scores, strict=True)]
    return sorted(rounded, key=lambda p: (-p[1], p[0]))
