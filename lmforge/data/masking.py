"""Encoder pretraining batches: BERT masking (80/10/10, whole-word option) and NSP/SOP sentence pairs.

Both are built from the same prepared token shards as causal LM training; documents are the spans
between end-of-text (EOS) tokens, which `lmforge prepare` writes after every document, in the split's
whole token stream: a document `prepare` cut at a shard's end (`--shard-tokens`) is one document.

Special tokens. Encoders need [PAD], [CLS], [SEP] and [MASK]. `special_ids(tokenizer)` takes each
from the tokenizer when it has it (BERT's names, lmforge's <|pad|>/<|cls|>/<|sep|>/<|mask|> extra
specials, or RoBERTa's <pad>/<s>/</s>/<mask>) and otherwise
*appends* it after the tokenizer's vocabulary: ids vocab_size, vocab_size + 1, ... in the order
[PAD], [CLS], [SEP], [MASK]. Appending changes no existing id, so data prepared for GPT training
(e.g. with the char or byte-level BPE tokenizer) trains an encoder as it is; the model's
vocab_size grows by the number appended, and the tokenizer file stays unchanged (these ids are
never decoded to text). `SpecialIds.added` records how many were appended.

Examples (`seq_len` = T tokens each, a pure function of the loader position, so resume is exact):
- no pairs (MLM, ELECTRA): [CLS] + T-2 consecutive stream tokens + [SEP]; windows at stride T-2
  over each shard, shuffled per epoch like `TokenLoader`; EOS tokens stay inside as separators.
- pairs (NSP/SOP): one document per example (shuffled per epoch), a random span of at most T-3 of
  its tokens cut at a random point into A and B. NSP: with probability 1/2 B is replaced by a
  span of a random *other* document (label 1 = not next). SOP (ALBERT): with probability 1/2 A and
  B swap places (label 1 = swapped). Input: [CLS] A [SEP] B [SEP] [PAD]..., segments 0 then 1.

Masking (`mask_tokens`): each real non-special token is selected with probability `mask_prob`
(whole-word: each *word* is, and all its tokens with it); a selected token becomes [MASK] with
probability `mask_token_frac`, a random ordinary token with `random_token_frac`, else stays.
Labels hold the original id at selected positions and -100 elsewhere (BERT, Devlin et al. 2019).

Word boundaries (`word_start_tables`) come from the UTF-8 bytes each token holds. A word starts at
a token that begins with whitespace (byte-level BPE's leading space, Unigram's "▁"), and at a token
that begins a new character right after whitespace. Scripts written without spaces (CJK: Han
ideographs, kana, CJK and fullwidth punctuation; `NO_SPACE_RANGES`) have no such boundaries, so
there every character is a word of its own: a token that begins such a character starts a word, and
so does a token that begins a character right after one. This is the per-character fallback of
Chinese whole-word masking (Chinese BERT-wwm, Cui et al. 2019, masks segmenter words; without a
segmenter a character is the word). A byte-level or byte-fallback token that holds only the last
bytes of a character never starts a word: it belongs to the character the tokens before it began.
A token holding only the first bytes of a character counts as that script when every character
those bytes can begin does. Tokens are never split, so a token holding several characters is one
word. WordPiece tokens without the "##" prefix start a word (BERT's pre-tokenizer already makes
every CJK character a word). Thai, Lao, Khmer and Myanmar, also written without spaces, are not
split: a character there is not a word.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import read_shard
from lmforge.errors import DataError
from lmforge.objective_config import ENCODER_MIN_SEQ_LEN, IGNORE_INDEX, ObjectiveConfig

_STATE_VERSION = 1
_NAMES = {
    "pad": ("[PAD]", "<|pad|>", "<pad>"),
    "cls": ("[CLS]", "<|cls|>", "<s>"),
    "sep": ("[SEP]", "<|sep|>", "</s>"),
    "mask": ("[MASK]", "<|mask|>", "<mask>"),
}


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int
    sep: int
    mask: int
    added: int  # how many of them were appended after the tokenizer's vocabulary

    @property
    def all(self) -> tuple[int, int, int, int]:
        return (self.pad, self.cls, self.sep, self.mask)


def special_ids(tokenizer: Any) -> SpecialIds:
    """The [PAD]/[CLS]/[SEP]/[MASK] ids for `tokenizer`, appending the missing ones (module docstring)."""
    ids: dict[str, int] = {}
    next_id = tokenizer.vocab_size
    for key, names in _NAMES.items():
        found = next((tokenizer.hf.token_to_id(n) for n in names if tokenizer.hf.token_to_id(n) is not None), None)
        if found is None:
            found, next_id = next_id, next_id + 1
        ids[key] = found
    return SpecialIds(**ids, added=next_id - tokenizer.vocab_size)


# Code point ranges of scripts written without spaces between words; each character is a word.
NO_SPACE_RANGES = (
    (0x2E80, 0x9FFF),  # CJK radicals, CJK symbols and punctuation (、。「」), kana, bopomofo, Ext A, ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFE10, 0xFE1F),  # vertical forms
    (0xFE30, 0xFE6F),  # CJK compatibility forms, small form variants
    (0xFF00, 0xFFEF),  # halfwidth and fullwidth forms (，！？（）)
    (0x1B000, 0x1B16F),  # kana supplement and extensions
    (0x20000, 0x3FFFF),  # ideographs, extensions B-H and compatibility supplement
)


@dataclass(frozen=True)
class WordTables:
    """Per token id, what whole-word masking needs to know about its bytes (module docstring).

    starts: begins a word by itself (whitespace first, or a no-space-script character first).
    breaks_after: the last character it begins is whitespace or of a no-space script, so the next
        character begun (in this token's successors) starts a word.
    begins_char: its first byte begins a character (is not a UTF-8 continuation byte).
    has_char_start: it begins at least one character (False for continuation bytes only).
    """

    starts: np.ndarray
    breaks_after: np.ndarray
    begins_char: np.ndarray
    has_char_start: np.ndarray


def _char_kind(chunk: bytes) -> tuple[bool, bool]:
    """(whitespace, no-space script) for the character `chunk` begins (it may hold only its first bytes)."""
    lead = chunk[0]
    if lead >= 0xF8:  # not UTF-8
        return False, False
    n = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    lo = hi = lead & (0x7F, 0x1F, 0x0F, 0x07)[n - 1]
    known = 0
    for byte in chunk[1:n]:
        if not 0x80 <= byte < 0xC0:
            break
        lo, hi, known = lo << 6 | byte & 0x3F, hi << 6 | byte & 0x3F, known + 1
    for _ in range(n - 1 - known):  # bytes in later tokens: every character they may complete
        lo, hi = lo << 6, hi << 6 | 0x3F
    complete = known == n - 1
    no_space = any(a <= lo and hi <= b for a, b in NO_SPACE_RANGES)
    return complete and lo < 0x110000 and chr(lo).isspace(), no_space


def word_start_tables(tokenizer: Any) -> WordTables:
    """Word-boundary tables over the vocabulary, for whole-word masking (module docstring)."""
    n = tokenizer.vocab_size
    model_type = json.loads(tokenizer.to_str()).get("model", {}).get("type", "")
    starts, breaks_after = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    begins_char, has_char_start = np.ones(n, dtype=bool), np.ones(n, dtype=bool)
    for i, raw_bytes in enumerate(tokenizer.token_utf8()):
        raw = tokenizer.id_to_token(i) or ""
        if model_type == "WordPiece":
            starts[i] = not raw.startswith("##")
            continue
        char_starts = [j for j, byte in enumerate(raw_bytes) if not 0x80 <= byte < 0xC0]
        if not char_starts:  # continuation bytes only (or a special token: no text)
            begins_char[i], has_char_start[i] = not raw_bytes, False
            continue
        first_space, first_no_space = _char_kind(raw_bytes)
        begins_char[i] = char_starts[0] == 0
        starts[i] = begins_char[i] and (first_space or first_no_space) or raw[:1] in ("Ġ", "▁")
        # Metaspace's "▁" (a space byte here) belongs to the word after it: a lone "▁" ends no word
        if raw[:1] != "▁" or len(char_starts) > 1:
            last_space, last_no_space = _char_kind(raw_bytes[char_starts[-1] :])
            breaks_after[i] = last_space or last_no_space
    return WordTables(starts, breaks_after, begins_char, has_char_start)


def word_starts(ids: np.ndarray, text: np.ndarray, tables: WordTables) -> np.ndarray:
    """(T,) True where a word starts in a sequence of `ids`; `text` is False at specials (words of their own)."""
    T = len(ids)
    safe = np.where(text, ids, 0)
    # the token holding the start of the character that ends right before each token: the last one
    # before it that begins a character (a special counts, and breaks)
    anchor = np.where(tables.has_char_start[safe] | ~text, np.arange(T), -1)
    before = np.concatenate([[-1], np.maximum.accumulate(anchor)[:-1]])
    breaks = tables.breaks_after[safe] | ~text
    after_break = np.where(before >= 0, breaks[np.maximum(before, 0)], True)
    after_special = np.concatenate([[True], ~text[:-1]])
    return ~text | after_special | tables.starts[safe] | (tables.begins_char[safe] & after_break)


def mask_tokens(
    ids: np.ndarray,
    eligible: np.ndarray,
    rng: np.random.Generator,
    cfg: ObjectiveConfig,
    *,
    mask_id: int,
    random_ids: np.ndarray,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one sequence.

    Args:
        ids: (T,) original token ids.
        eligible: (T,) True where a token may be selected (real text, not [CLS]/[SEP]/[PAD]/EOS).
        rng: the example's generator.
        cfg: mask_prob, mask_token_frac, random_token_frac.
        mask_id: the [MASK] id.
        random_ids: ids a selected token may be replaced with (ordinary tokens).
        word_start: (T,) True where a word starts; given = whole-word masking.

    Returns:
        (inputs, labels), both (T,) int64; labels are the original ids at selected positions, -100 elsewhere.
    """
    T = len(ids)
    if word_start is None:
        selected = (rng.random(T) < cfg.mask_prob) & eligible
    else:
        word = np.cumsum(word_start | (np.arange(T) == 0)) - 1  # (T,) word index of each token
        selected = (rng.random(int(word[-1]) + 1) < cfg.mask_prob)[word] & eligible
    r = rng.random(T)
    to_mask = selected & (r < cfg.mask_token_frac)
    to_random = selected & (r >= cfg.mask_token_frac) & (r < cfg.mask_token_frac + cfg.random_token_frac)
    inputs = ids.astype(np.int64, copy=True)
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids[rng.integers(0, len(random_ids), size=int(to_random.sum()))]
    labels = np.where(selected, ids, IGNORE_INDEX).astype(np.int64)
    return inputs, labels


class MLMLoader:
    """Infinite (or, with `shuffle=False`, one-pass) resumable batches for MLM / NSP / SOP / ELECTRA.

    Yields dicts: input_ids, segments, labels (B, T) int64; pad_mask (B, T) bool (True = real token);
    pair_labels (B,) int64 when `pairs` is "nsp" or "sop"; sample_noise (B, T) float32 uniforms for
    ELECTRA's generator samples (objective electra).
    """

    def __init__(
        self,
        shards: list[Path],
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        cfg: ObjectiveConfig,
        specials: SpecialIds,
        eos_id: int,
        token_bytes: np.ndarray,
        word_tables: WordTables | None = None,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if seq_len < ENCODER_MIN_SEQ_LEN or batch_size <= 0:  # run configs are refused earlier (check_encoder)
            raise ValueError(
                f"seq_len must be >= {ENCODER_MIN_SEQ_LEN} and batch_size > 0, got {seq_len} and {batch_size}"
            )
        if not shards:
            raise DataError("no token shards for this split; run 'lmforge prepare' or add data to the split")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.cfg, self.specials, self.eos_id = cfg, specials, eos_id
        self.pairs, self.shuffle, self.rank, self.world_size = cfg.pairs, shuffle, rank, world_size
        self.word_tables = word_tables if cfg.whole_word else None
        self._random_ids = np.flatnonzero(np.asarray(token_bytes) > 0)  # ordinary (text) tokens
        self._tokens = [read_shard(p) for p in shards]
        # "train-00000.bin": the errors below name the split (a small val split failed as "this split")
        split = f"the {shards[0].name.split('-')[0]!r} split of {shards[0].parent}"
        # where each shard starts in the split's token stream (a document may go on into the next shard)
        self._offsets = np.concatenate([[0], np.cumsum([len(t) for t in self._tokens])]).astype(np.int64)
        if self.pairs:
            # documents: spans between EOS tokens of the whole split, at least 2 tokens (A and B each need one).
            # Found per shard, a document `prepare` cut at a shard's end lost its head (a 64-token shard kept
            # 1,499 of 3,404 tokens for pairs; its whole text when its tail held under 2 tokens).
            ends = np.concatenate(
                [np.flatnonzero(np.asarray(t) == eos_id) + o for t, o in zip(self._tokens, self._offsets, strict=False)]
            ).astype(np.int64)
            starts = np.concatenate([[0], ends + 1])[: len(ends)]
            keep = ends - starts >= 2
            need = 2 if self.pairs == "nsp" else 1  # NSP's B may come from another document; SOP swaps A and B
            if keep.sum() < need:
                raise DataError(
                    f"{cfg.name} needs at least {need} document{'s' * (need > 1)} of 2+ tokens; {split} has "
                    f"{keep.sum()}: add text to it or use --objective mlm"
                )
            self._docs = np.stack([starts[keep], (ends - starts)[keep]], axis=1)  # (n_docs, 2): start, length
            self._n_examples = len(self._docs)
        else:
            n = seq_len - 2
            counts = np.array([len(t) // n for t in self._tokens], dtype=np.int64)
            if counts.sum() == 0:
                # "lower --data.seq_len" alone sent a user at the shortest encoder sequence in a circle
                fits = max(len(t) for t in self._tokens) + 2  # the longest seq_len its biggest shard can fill
                lower = f"pass --data.seq_len {fits} or lower, or " if fits >= ENCODER_MIN_SEQ_LEN else ""
                raise DataError(f"{split} has no shard of seq_len-2 = {n} tokens; {lower}add text to it")
            self._first = np.concatenate([[0], np.cumsum(counts)])
            self._n_examples = int(self._first[-1])
        self._position = 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def windows_per_epoch(self) -> int:
        return self._n_examples

    def __iter__(self) -> MLMLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.shuffle and self._position >= self._n_examples:
            raise StopIteration
        B = self.batch_size
        positions = self._position + self.rank + self.world_size * np.arange(B)
        if not self.shuffle:
            positions = positions[positions < self._n_examples]
        examples = [self.example(int(p)) for p in positions]
        self._position += B * self.world_size
        batch = {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}
        if "pair_labels" in batch:
            batch["pair_labels"] = batch["pair_labels"].reshape(-1)
        return batch

    def _index(self, position: int) -> int:
        epoch, index = divmod(position, self._n_examples)
        if not self.shuffle:
            return index
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self._n_examples)
            self._perm_epoch = epoch
        return int(self._perm[index])

    def example(self, position: int) -> dict[str, np.ndarray]:
        """The example at stream `position` (deterministic given seed and data)."""
        rng = np.random.default_rng([self.seed, 7919, position])
        sp, T = self.specials, self.seq_len
        index = self._index(position)
        pair_label = None
        if self.pairs:
            seq, segments, pair_label = self._pair(index, rng)
        else:
            shard = int(np.searchsorted(self._first, index, side="right")) - 1
            start = (index - int(self._first[shard])) * (T - 2)
            body = np.asarray(self._tokens[shard][start : start + T - 2], dtype=np.int64)
            seq = np.concatenate([[sp.cls], body, [sp.sep]])
            segments = np.zeros(T, dtype=np.int64)
        n = len(seq)
        ids = np.full(T, sp.pad, dtype=np.int64)
        ids[:n] = seq
        pad_mask = np.arange(T) < n
        eligible = pad_mask & ~np.isin(ids, [*sp.all, self.eos_id])
        word_start = None if self.word_tables is None else word_starts(ids, eligible, self.word_tables)
        inputs, labels = mask_tokens(
            ids, eligible, rng, self.cfg, mask_id=sp.mask, random_ids=self._random_ids, word_start=word_start
        )
        out = {"input_ids": inputs, "segments": segments, "pad_mask": pad_mask, "labels": labels}
        if self.cfg.name == "electra":  # the generator's sampling noise, a function of the position like the masks
            out["sample_noise"] = rng.random(T, dtype=np.float32)
        if pair_label is not None:
            out["pair_labels"] = np.array([pair_label], dtype=np.int64)
        return out

    def _doc_tokens(self, doc: int, rng: np.random.Generator, length: int) -> np.ndarray:
        start, n = (int(v) for v in self._docs[doc])
        length = min(length, n)
        offset = int(rng.integers(0, n - length + 1))
        return self._stream(start + offset, length)

    def _stream(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream, read across shard boundaries."""
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pieces = []
        while length > 0:
            local = start - int(self._offsets[shard])
            piece = self._tokens[shard][local : local + length]
            pieces.append(np.asarray(piece, dtype=np.int64))
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def _pair(self, doc: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        sp = self.specials
        span = self._doc_tokens(doc, rng, self.seq_len - 3)
        cut = int(rng.integers(1, len(span)))  # A = span[:cut], B = span[cut:], both non-empty
        a, b = span[:cut], span[cut:]
        label = int(rng.random() < 0.5)
        if label and self.pairs == "nsp":
            other = int(rng.integers(0, len(self._docs) - 1))
            other += other >= doc  # any document but this one
            b = self._doc_tokens(other, rng, len(b))
        elif label:  # sop: same two segments, swapped
            a, b = b, a
        seq = np.concatenate([[sp.cls], a, [sp.sep], b, [sp.sep]])
        segments = np.zeros(self.seq_len, dtype=np.int64)
        segments[len(a) + 2 : len(seq)] = 1
        return seq, segments, label

    def state_dict(self) -> dict[str, Any]:
        epoch, cursor = divmod(self._position, self._n_examples)
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "cursor": cursor,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "pairs": self.pairs,
            "windows_per_epoch": self._n_examples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("seq_len", self.seq_len), ("seed", self.seed), ("pairs", self.pairs)):
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the data loader: it was saved with {key}={state.get(key)!r}, now {mine!r}; "
                    "resume with the same settings as the original run"
                )
        if state.get("windows_per_epoch") != self._n_examples:
            raise DataError("cannot resume the data loader: the data changed since the run started; use the same data")
        self._position = int(state["epoch"]) * self._n_examples + int(state["cursor"])


def mlm_eval_batches(loader_kwargs: dict[str, Any], max_sequences: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """One in-order pass of `MLMLoader(**loader_kwargs, shuffle=False)` with fixed masks (seed in kwargs),
    cut after `max_sequences` examples (0 = all). An example's masks depend on its position alone, so
    the batch size does not change what is evaluated."""
    left = max_sequences or math.inf
    for batch in MLMLoader(**loader_kwargs, shuffle=False):
        if left <= 0:
            return
        if left < len(batch["input_ids"]):
            batch = {key: value[: int(left)] for key, value in batch.items()}
        left -= len(batch["input_ids"])
        yield batch
