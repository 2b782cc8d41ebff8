"""Token ids to the text that is shown: as it streams, cut at stop strings, after a context.

- `StreamDecoder`: turns a stream of token ids into text that is safe to print as it comes. Byte-level
  tokens can end in the middle of a UTF-8 character (one Chinese character or emoji is 3–4 byte
  tokens); decoding the whole sequence and withholding a trailing U+FFFD shows every character once,
  complete. A U+FFFD that no byte can complete (a stray byte the model wrote) is not withheld: `may_complete`
  reads the last tokens' bytes. That is the one rule for every text a model wrote that is shown or scored:
  generate, chat (and its history: `StreamDecoder.shown`), serve, and `eval --task`'s answers (`shown_text`);
  `whole_characters` drops a trailing cut character from a text (a token-id prompt's `echo_text`).
- `StopStrings`: OpenAI's `stop` on the decoded text as it comes (across tokens), for `serve` and `generate --stop`.
- `continuation_decoder`: the text that ids add after a context, decoded together with it (after `echo_text`, the
  context's own text shown first, for serve's `echo`).

Split out of `generate.py` (the sampling rules and decode loops, which produce the ids): these rules are about
text and change with the tokenizers' decoders, not with the models.
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Callable, Collection, Sequence
from typing import Any

from lmforge.errors import LmforgeError

REPLACEMENT_CHAR = "\ufffd"  # what a decoder puts where the bytes are not (yet) valid UTF-8


def continuation_decoder(
    decode: Callable[[list[int]], str], context: list[int], *, echoed: bool = False
) -> Callable[[list[int]], str]:
    """`decode` for ids that continue `context`: the text they add after it, decoded together with it.

    Decoding a continuation alone can lose what its first token means after the context: a
    SentencePiece-style (Unigram) decoder drops the word-start marker of the first piece, so "▁con"
    after "I will" decodes as "con", not " con". A context that ends inside a character (a serve prompt given
    as token ids: the first 2 byte-level tokens of a 3-byte Chinese character) decodes to U+FFFD there; the ids
    that complete it continue with the whole character (they printed U+FFFD and lost it, decoded alone). Falls
    back to decoding the ids alone if the context's text is not a prefix of the whole (no decoder here does that).

    `echoed`: the text after `echo_text(decode, context)`, the context's whole characters, which is shown before
    it (serve's `echo` of a token-id prompt): the echo and the continuation then read as whole characters, the
    character the context cuts coming whole after it (or as U+FFFD, if the ids never complete it)."""
    head = decode(context)
    stem = whole_characters(head)  # (the context's text before a character it leaves incomplete)
    if echoed:
        head = stem

    def text(ids: list[int]) -> str:
        whole = decode(context + ids)
        if whole.startswith(head):
            return whole[len(head) :]
        return whole[len(stem) :] if whole.startswith(stem) else decode(ids)

    return text


def echo_text(decode: Callable[[list[int]], str], context: list[int]) -> str:
    """The text shown for `context` (token ids) before its continuation (`continuation_decoder(..., echoed=True)`):
    its whole characters. Its decoding ended in U+FFFD where its last ids cut a character, which the continuation
    then showed whole: serve echoed "\ufffd龘"."""
    return whole_characters(decode(context))


def whole_characters(text: str) -> str:
    """`text` (decoded token ids) without the U+FFFD that a character whose bytes did not all come (generation
    stopped on max tokens halfway through it) decodes to at its end: a reply cut by a length limit ends at its
    last whole character, in the text only (the token ids stay as generated)."""
    return text.rstrip(REPLACEMENT_CHAR)


def may_complete(tokenizer: Any, ids: list[int]) -> bool:
    """Whether the bytes of `ids` (a `Tokenizer`'s, `token_utf8`) end in the start of a UTF-8 character that more
    bytes can complete (e4 bd: 你 without its a0): a trailing U+FFFD in their text may still become a character.
    False when they end in bytes that no continuation makes valid (a stray ff or bd, e0 80, an ended sequence): its
    U+FFFD is final. The longest start is 3 bytes, so the last 4 tokens' bytes tell (none is empty but a special's)."""
    utf8_of = _utf8_reader(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(b"".join(utf8_of(i) for i in ids[-4:]), final=False)
    return bool(decoder.getstate()[0])  # (the bytes it buffers: a valid start of a character, not yet complete)


@functools.lru_cache(maxsize=8)
def _utf8_reader(tokenizer: Any) -> Callable[[int], bytes]:
    # (each id's bytes read once, when a text first ends in U+FFFD near it: `Tokenizer.utf8_reader`)
    return functools.lru_cache(maxsize=None)(tokenizer.utf8_reader())


def shown_text(decode: Callable[[list[int]], str], ids: list[int], tokenizer: Any = None) -> str:
    """The text a `StreamDecoder` shows of `ids` in all, once they have all come: what `eval --task` scores of an
    answer, so that it is the text `generate` shows (a character cut by the token limit dropped, a U+FFFD that a
    stray byte makes kept)."""
    stream = StreamDecoder(decode, tokenizer)
    return "".join(stream.feed(i) for i in ids) + stream.flush()


class StreamDecoder:
    """Incremental detokenizer: feed token ids, get back only text that is complete.

    Every `feed` decodes the whole sequence so far with `decode` and returns the part not returned
    before, holding back a trailing U+FFFD (an incomplete UTF-8 character, e.g. the first byte token
    of an emoji) until the following tokens complete it. Decoding everything each time is quadratic
    in the length but exact for any decoder whose output on a prefix is a prefix of the output on
    the whole (byte-level BPE, characters); it costs well under a millisecond per token at chat lengths.

    With `tokenizer` (the one whose ids are fed), a U+FFFD that can never complete (bytes that are not UTF-8: a
    model's stray ff) comes out with its token (`may_complete`): it was held until the next whole character came,
    which a model writing bytes stalled for many tokens (ff e4 bd a0 showed nothing until 你), and at the end it
    was dropped as if cut by the token limit. Without one, every trailing U+FFFD waits so. `context`: the ids a
    continuation's `decode` goes on from (`continuation_decoder`), whose last bytes may start its first character.

        stream = StreamDecoder(tokenizer.decode, tokenizer)
        generate(model, ids, max_new_tokens=200, on_token=lambda t: print(stream.feed(t), end="", flush=True))
        print(stream.flush())
    """

    def __init__(self, decode: Callable[[list[int]], str], tokenizer: Any = None, context: Sequence[int] = ()) -> None:
        self.decode = decode
        self.tokenizer = tokenizer
        # the ids `decode` continues (`continuation_decoder`): they may hold the start of the first character
        self.context = list(context[-4:])
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned
        self.shown = ""  # the text returned so far (chat keeps it in the history: the reply as printed)

    def _certain(self) -> str:
        """The text of the ids so far without a trailing U+FFFD that more ids could still complete (with the
        tokenizer: only while `may_complete`; a run of U+FFFD before a start that may complete waits with it)."""
        text = self.decode(self.ids)
        ids = self.context + self.ids[-4:]
        if text.endswith(REPLACEMENT_CHAR) and self.tokenizer is not None and not may_complete(self.tokenizer, ids):
            return text
        return whole_characters(text)

    def feed(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        self.ids.append(token_id)
        text = self._certain()
        if len(text) <= self.emitted:
            return ""
        out = text[self.emitted :]
        self.emitted = len(text)
        self.shown += out
        return out

    def flush(self) -> str:
        """Return whatever is left (call once the stream has ended). A character whose bytes never all came
        (generation stopped on max tokens halfway through it) is dropped, not shown as U+FFFD: the text
        stays valid, as a reply cut by a length limit ends at its last whole character."""
        text = self._certain()
        out = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        self.shown += out
        return out


class StopStrings:
    """Stop strings over a completion's text as it comes (OpenAI's `stop`): the text ends just before the
    first of them to appear, which is not part of it; they match across token boundaries, on decoded text.

    `feed` takes each new piece of text (a `StreamDecoder.feed`) and returns the part now safe to show: the
    last `hold` characters (the longest stop string but one) are held back while they could still turn
    into a stop string, and come out with the next pieces or `flush`. `serve` (each choice, streamed or not)
    and `lmforge generate --stop` (one prompt, --num-samples, --prompt-file) use it; a decode loop ends
    when `stopped` turns True (`generate`'s `on_token` returns it).
    """

    def __init__(self, stop: Collection[str]) -> None:
        self.stop = self.check(stop)
        self.hold = max((len(s) - 1 for s in self.stop), default=0)  # a tail that could still become a stop string
        self.text = ""  # the text so far; once `stopped`, all of it (cut before the stop string)
        self.stopped = False
        self.sent = 0  # characters returned so far

    @staticmethod
    def check(stop: Collection[str]) -> list[str]:
        """`stop` as a list, refused when one is empty (it would stop before the first token): `generate --stop`
        checks it so before the model loads.

        Raises:
            LmforgeError: an empty stop string, and what to do.
        """
        if not all(stop):
            raise LmforgeError(
                "a stop string (--stop) must not be empty: it would stop before the first token; drop the empty --stop"
            )
        return list(stop)

    def feed(self, piece: str) -> str:
        """Add `piece`; return the newly safe text (possibly ""). After a stop string nothing more is added."""
        if self.stopped:
            return ""
        # a stop string new in `piece` ends inside it, so it starts at most `hold` characters before it
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        ready = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : ready]
        self.sent = ready
        return out

    def flush(self) -> str:
        """The text not returned yet (call once the completion has ended)."""
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
