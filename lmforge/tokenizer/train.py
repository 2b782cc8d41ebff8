"""Train tokenizers from a stream of texts: byte-level BPE (GPT-2 style) and character-level.

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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import ConfigError
from lmforge.tokenizer.tokenizer import Tokenizer

SPECIAL_TOKENS = [Tokenizer.EOS]
# The smallest byte-level BPE vocabulary: every byte plus the special tokens, no merges.
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE tokenizer.

    Args:
        texts: training documents (any iterable; consumed once).
        vocab_size: total ids including the 256 byte tokens and `<|endoftext|>`; at least 257.
        show_progress: let the Rust trainer draw its own progress bar.

    Returns:
        The trained `Tokenizer`; `<|endoftext|>` has id 0.

    Raises:
        ConfigError: vocab_size is smaller than 257.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"BPE vocab_size must be >= {MIN_BPE_VOCAB} (256 bytes + special tokens), got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer=trainer)
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
