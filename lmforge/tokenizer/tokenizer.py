"""`Tokenizer`: a thin wrapper around a Hugging Face `tokenizers.Tokenizer`.

Key design decisions:
- The on-disk format is the HF `tokenizer.json` (JSON, never pickle), so `export` can copy the file
  next to a model and `transformers` loads it unchanged. `load` accepts any HF tokenizer.json.
- `encode` never adds special tokens and treats text literally: a document that happens to contain
  the string "<|endoftext|>" is encoded as ordinary bytes, not as the EOS id (`encode_special_tokens`,
  a runtime flag that is not written to the JSON). The data pipeline appends EOS ids itself.
- `decode` keeps special tokens by default, so decode(encode(text)) == text and EOS stays visible.
- `token_bytes()` tells how many UTF-8 bytes each id contributes to decoded text (0 for special
  tokens); evaluation divides summed token losses by summed bytes to report bits per byte.
  Exact for our byte-level BPE (GPT-2 byte<->unicode table) and char (byte-fallback) tokenizers;
  for foreign tokenizers it follows their decoder's conventions (Metaspace "▁", WordPiece "##").
- `fingerprint` is the sha256 of the canonical JSON (sorted keys, no whitespace): data prepared with
  one tokenizer can be recognised and refused by a model trained with another. `reads_ids_of` allows
  one difference, tokens added after the data's ids (a BERT export's specials), since ids mean the same.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from lmforge.atomic import atomic_write_text
from lmforge.errors import DataError, first_line

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character table, used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _decoder_types(node: Any) -> set[str]:
    """All decoder `type` names in a (possibly nested `Sequence`) decoder config."""
    if not isinstance(node, dict):
        return set()
    found = {node["type"]} if "type" in node else set()
    for child in node.get("decoders", []) or []:
        found |= _decoder_types(child)
    return found


class Tokenizer:
    """Encode/decode text with an HF `tokenizers.Tokenizer`; save and load as tokenizer.json."""

    EOS = "<|endoftext|>"

    def __init__(self, hf: tokenizers.Tokenizer) -> None:
        self._hf = hf
        # Text is text: special-token strings inside documents are not turned into special ids.
        self._hf.encode_special_tokens = True

    # ---------------------------------------------------------------- load / save

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json (ours or any HF one).

        Raises:
            DataError: the file is missing or is not a valid tokenizer.json.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(
                f"tokenizer file {str(p)!r} not found; pass a tokenizer.json path or bpe, char, wordpiece or "
                "unigram (lower case)"
            )
        try:
            with open(p, encoding="utf-8-sig") as f:  # a BOM (a Windows editor's save) is no JSON
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read tokenizer {p} ({e}); pass a valid UTF-8 tokenizer.json") from None
        try:
            return cls.from_str(text)
        except DataError as e:
            raise DataError(f"{p}: {e}") from None

    @classmethod
    def from_str(cls, json_str: str) -> Tokenizer:
        """Build a tokenizer from the text of a tokenizer.json.

        Raises:
            DataError: the text is not a valid HF tokenizer JSON.
        """
        try:
            return cls(tokenizers.Tokenizer.from_str(json_str))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(
                f"not a valid tokenizer.json ({first_line(e)}); re-create it with 'lmforge prepare'"
            ) from None

    def to_str(self) -> str:
        """The tokenizer.json text (HF format)."""
        return self._hf.to_str()

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (`path.tmp`, then `os.replace`)."""
        atomic_write_text(path, self.to_str())

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_markup(self, text: str) -> tokenizers.Encoding:
        """Ids and character offsets of text a chat template wrote: unlike `encode`, its special-token strings
        (`<|im_start|>`) become their ids, as transformers encodes `apply_chat_template`'s text; none are added."""
        return self._markup.encode(text, add_special_tokens=False)

    @cached_property
    def _markup(self) -> tokenizers.Tokenizer:  # a copy that splits out special tokens (the flag is per object)
        return tokenizers.Tokenizer.from_str(self.to_str())

    @cached_property
    def prompt_prefix(self) -> list[int]:
        """Special ids the tokenizer's own post-processor puts before a text, e.g. Llama's `<s>` (BOS) in an
        imported Hugging Face tokenizer; [] for every tokenizer lmforge trains. Generation puts them
        before a prompt, as transformers does, since the model was trained to see them there."""
        text = "a"
        plain = self._hf.encode(text, add_special_tokens=False).ids
        framed = self._hf.encode(text, add_special_tokens=True).ids
        for start in range(len(framed) - len(plain) + 1):
            if framed[start : start + len(plain)] == plain:
                return framed[:start]
        return []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens (EOS) are kept unless `skip_special_tokens`."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def unicode_forms(self) -> tuple[str, ...]:
        """The Unicode normal forms ("NFC", "NFD", "NFKC", "NFKD") its normalizer applies, in order; () for
        none. `prepare --normalize NFKC` puts NFKC there (`train.with_nfkc`)."""

        def forms(node: Any) -> list[str]:
            if not isinstance(node, dict):
                return []
            if node.get("type") == "Sequence":
                return [form for child in node.get("normalizers") or [] for form in forms(child)]
            return [node["type"]] if node.get("type") in ("NFC", "NFD", "NFKC", "NFKD") else []

        return tuple(forms(json.loads(self.to_str()).get("normalizer")))

    def in_unicode_form(self, text: str) -> str:
        """`text` in the `unicode_forms` that text this tokenizer encodes, and so what a model trained with it
        writes, is in: an NFKC tokenizer's model writes "," where a user types the full-width "，". Only those:
        its other normalizer steps (lower-casing, Metaspace's "▁", spaces around CJK) do not survive decoding."""
        for form in self.unicode_forms:
            text = unicodedata.normalize(form, text)
        return text

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (byte-level tokens look like 'Ġthe')."""
        return self._hf.id_to_token(token_id)

    # ---------------------------------------------------------------- properties

    @property
    def hf(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._hf

    @cached_property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0..vocab_size-1): the size a model's vocabulary needs.

        The largest id + 1, not the number of tokens (`get_vocab_size`), which is smaller when the ids have a hole:
        transformers builds a WordPiece from a vocabulary that lists a token twice (a word and a letter) with the
        later line's id, so 73 tokens span ids 0-73, and a model sized 73 refused its own data as damaged."""
        largest = max(self._hf.get_vocab(with_added_tokens=True).values(), default=-1)
        return max(self._hf.get_vocab_size(with_added_tokens=True), largest + 1)

    @property
    def eos_id(self) -> int:
        """Id of the end-of-text token appended after every document.

        Raises:
            DataError: the tokenizer has no end-of-text token.
        """
        token_id = self.eos_id_or_none
        if token_id is None:
            raise DataError(f"tokenizer has no end-of-text token; add the special token '{self.EOS}' to it")
        return token_id

    @property
    def eos_id_or_none(self) -> int | None:
        """`eos_id`, or None when the tokenizer has none of the end-of-text names lmforge knows.

        Training needs one (documents are joined with it), generation does not: an imported tokenizer
        without one (no end token, or one named e.g. `<|end|>`) generates up to the token limit or to
        one of the run's stop ids (`generate.stop_ids_of`)."""
        for name in (self.EOS, "</s>", "<eos>", "<|end_of_text|>", "[SEP]"):
            token_id = self._hf.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer JSON: same fingerprint == same tokenization."""
        canonical = json.dumps(json.loads(self.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def reads_ids_of(self, prepared: Tokenizer) -> bool:
        """Whether ids encoded with `prepared` mean the same to this tokenizer: the same tokenizer.json, or
        the same with added tokens after `prepared`'s ids. An encoder's HF export adds [PAD]/[CLS]/[SEP]/[MASK]
        (and [UNK]) there, where training had appended them, so its import reads its run's data unchanged."""
        if self.fingerprint == prepared.fingerprint:
            return True
        mine = json.loads(self.to_str())
        n = prepared.vocab_size
        mine["added_tokens"] = [t for t in mine.get("added_tokens") or [] if t["id"] < n]
        return mine == json.loads(prepared.to_str())

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id contributes to decoded text (int64, length vocab_size; 0 for specials)."""
        return np.array([len(b) for b in self.token_utf8()], dtype=np.int64)

    def token_utf8(self) -> list[bytes]:
        """The UTF-8 bytes each id contributes to decoded text (b"" for specials), one entry per id.

        A byte-level or byte-fallback token can hold part of a character (a CJK character is 3 bytes,
        often split over 2 tokens), which `decode([id])` shows as U+FFFD; the bytes keep what it holds.
        """
        utf8_of = self.utf8_reader()
        return [utf8_of(token_id) for token_id in range(self.vocab_size)]

    def utf8_reader(self) -> Callable[[int], bytes]:
        """`token_utf8` one id at a time (b"" for an id past the vocabulary): a stream that looks at a few ids
        (`detokenize.may_complete`) neither walks the vocabulary nor parses the tokenizer's JSON (its decoder's
        alone is read: 0.1 ms, where the whole table took 48 ms for 4,420 ids, growing with the vocabulary)."""
        decoder = json.loads(self._hf.decoder.__getstate__()) if self._hf.decoder is not None else None
        decoder_types = _decoder_types(decoder)
        byte_level = "ByteLevel" in decoder_types
        byte_fallback = "ByteFallback" in decoder_types
        metaspace = "Metaspace" in decoder_types
        wordpiece_prefix = (decoder or {}).get("prefix", "##") if "WordPiece" in decoder_types else ""
        unicode_to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
        added = self._hf.get_added_tokens_decoder()  # {id: AddedToken}
        vocab_size = self.vocab_size

        def utf8_of(token_id: int) -> bytes:
            if not 0 <= token_id < vocab_size:
                return b""
            if token_id in added:
                spec = added[token_id]
                return b"" if spec.special else spec.content.encode("utf-8")
            token = self._hf.id_to_token(token_id)
            if token is None:
                return b""
            if byte_fallback and (match := _BYTE_TOKEN.match(token)):
                return bytes([int(match.group(1), 16)])
            if byte_level and all(ch in unicode_to_byte for ch in token):
                return bytes(unicode_to_byte[ch] for ch in token)  # one table character per byte
            if wordpiece_prefix and token.startswith(wordpiece_prefix):
                token = token[len(wordpiece_prefix) :]
            if metaspace:
                token = token.replace("▁", " ")
            return token.encode("utf-8")

        return utf8_of

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"
