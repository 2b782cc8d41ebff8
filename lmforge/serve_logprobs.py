"""Token log-probabilities for `lmforge serve`: `logprobs` of /v1/completions (with `echo`, the prompt's
tokens too: how lm-evaluation-harness's `local-completions` model scores answer choices) and `logprobs` /
`top_logprobs` of /v1/chat/completions, in the OpenAI API's shapes.

The numbers are the model's own next-token distribution, the log-softmax of its logits before temperature
or top-p (what sampling then reshapes; vLLM's default too), from one forward pass over prompt + completion
after the generation: the same logits the KV-cached decode used, up to float summation order. A stream
(`"stream": true`) carries each chunk's tokens' numbers in that chunk, as OpenAI's does, taken from the decode
step's logits as the tokens are chosen (`StreamedLogprobs`): the same numbers, up to that summation order.

A token's name is the text it adds (its UTF-8 bytes), or `bytes:\\xe4\\xbd` for a byte-level piece of a
character that is not whole on its own, as OpenAI writes them; a special token (`<|endoftext|>`) is its name.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch

from lmforge.detokenize import REPLACEMENT_CHAR, continuation_decoder, echo_text

MAX_TOP_LOGPROBS = 20  # OpenAI's chat API allows 0-20 alternatives per token (its legacy completions, 5)


class TokenNames:
    """Each id's display name and bytes, read once from the tokenizer (`Tokenizer.token_utf8`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.utf8 = tokenizer.token_utf8()

    def name(self, token_id: int) -> str:
        raw = self.utf8[token_id] if 0 <= token_id < len(self.utf8) else b""
        if not raw:  # a special token (it adds no text) or an id past the tokenizer's (a padded vocabulary)
            return self.tokenizer.id_to_token(token_id) or ""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def bytes_of(self, token_id: int) -> list[int]:
        raw = self.utf8[token_id] if 0 <= token_id < len(self.utf8) else b""
        return list(raw or self.name(token_id).encode("utf-8"))


@torch.no_grad()
def score(
    model: Any, ids: list[int], start: int, top: int, vocab_size: int | None = None
) -> list[tuple[float | None, list[tuple[int, float]]]]:
    """For each position t in start..len(ids)-1: (log p(ids[t] | ids[:t]), the `top` likeliest ids at t with
    their log-probabilities, likeliest first). Position 0 has no context: (None, []). `vocab_size`: the
    distribution is over the ids below it, the tokenizer's, as generation samples them: a model padded past its
    tokenizer (`--model.vocab_size 50304`) has untrained rows that took a share of the probability (and could
    be named as alternatives with no text)."""
    out: list[tuple[float | None, list[tuple[int, float]]]] = []
    if start == 0 and ids:
        out.append((None, []))
        start = 1
    if start >= len(ids):
        return out
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device))[0, start - 1 : len(ids) - 1, :vocab_size]
    return out + scored_rows(logits, ids[start:], top)


def scored_rows(logits: torch.Tensor, targets: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row of (n, V) logits: (the log-probability of its target, the `top` likeliest ids with theirs,
    likeliest first). `score`'s positions and a stream's decode steps (`StreamedLogprobs.step`) alike."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(targets, device=logp.device).unsqueeze(1)).squeeze(1).tolist()
    best_values, best_ids = logp.topk(min(top, logp.shape[-1]), dim=-1) if top else (logp[:, :0], logp[:, :0])
    rows = zip(chosen, best_values.tolist(), best_ids.long().tolist(), strict=True)
    return [(lp, list(zip(alternatives, values, strict=True))) for lp, values, alternatives in rows]


def shown_prompt(decode: Any, ids: list[int], sent: str | None, echo: bool) -> tuple[str, Any]:
    """(the prompt's text, the `decode` of what a completion's ids add after it): the text a completion's text and
    text offsets go on after. A prompt sent as a string is that string; token ids (`sent` None) are their decoding,
    or with `echo` their whole characters (`echo_text`), the character their last ids cut then coming whole at the
    completion's start (`continuation_decoder(..., echoed=True)`), not as U+FFFD in the echo. The one place of that
    rule for serve's reply text (`_generate_locked`), its logprobs (`completion_logprobs`) and streamed ones."""
    echoed = echo and sent is None
    text = sent if sent is not None else echo_text(decode, ids) if echoed else decode(ids)
    return text, continuation_decoder(decode, ids, echoed=echoed)


def completion_logprobs(
    names: TokenNames,
    decode: Any,
    prompt: list[int],
    new: list[int],
    scored: list[tuple[float | None, list]],
    *,
    echo: bool,
    sent: str | None = None,
    prompt_offsets: list[int] | None = None,
) -> dict[str, Any]:
    """/v1/completions' `logprobs` object for a choice's tokens (the prompt's too with `echo`), scored by
    `score(..., first, top)`: tokens, token_logprobs, top_logprobs ({name: logprob}; null where token_logprobs
    is) and text_offset: where each token's text begins in the prompt's text followed by the completion's, the
    text the reply returns with `echo`. `sent` is the prompt as sent (None: token ids, `shown_prompt`),
    `prompt_offsets` where each prompt token begins in it (a string prompt: its encoding's; None: found by
    decoding, right for a token-id prompt, whose text is that decoding). A special token in a string prompt is
    its whole string there (<|endoftext|>, 13 characters), while decoding drops it: offsets found by decoding
    the prompt put every later token 13 characters early."""
    offsets = []
    if echo:
        offsets = list(prompt_offsets) if prompt_offsets is not None else TextOffsets(decode).feed(prompt)
    prompt_text, continued = shown_prompt(decode, prompt, sent, echo)
    offsets += TextOffsets(continued, len(prompt_text)).feed(new)
    return logprobs_object(names, prompt + new if echo else new, scored, offsets)


def logprobs_object(
    names: TokenNames, ids: list[int], scored: list[tuple[float | None, list]], offsets: list[int]
) -> dict[str, Any]:
    """/v1/completions' `logprobs` object of `ids`, from their scores (`score`) and text offsets."""
    tokens, token_logprobs, top_logprobs = [], [], []
    for token_id, (lp, alternatives) in zip(ids, scored, strict=True):
        tokens.append(names.name(token_id))
        token_logprobs.append(lp)
        top_logprobs.append(None if lp is None else {names.name(t): v for t, v in alternatives})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


class TextOffsets:
    """Where each token of a sequence begins in `decode` of it (plus `start`), fed a few tokens at a time (a
    stream's chunks) or all at once. From the text both with and without the token: a character still cut (a
    trailing U+FFFD that this token continues or completes) is not before it, one that never completes (a stray
    byte, shown as U+FFFD) is. The middle byte of a 3-byte character (界: e7 95 8c, one token each) leaves the
    text as it was, "a\ufffd": it starts where that cut character does, not after it."""

    def __init__(self, decode: Any, start: int = 0) -> None:
        self.decode, self.start = decode, start
        self.ids: list[int] = []
        self.before = decode([])

    def feed(self, ids: list[int]) -> list[int]:
        offsets = []
        for token_id in ids:
            self.ids.append(token_id)
            after = self.decode(self.ids)
            if after == self.before and after.endswith(REPLACEMENT_CHAR):  # it continues the cut character
                offsets.append(self.start + len(after) - 1)
            else:
                offsets.append(self.start + len(os.path.commonprefix([self.before, after])))
            self.before = after
        return offsets


def chat_logprobs(names: TokenNames, ids: list[int], scored: list[tuple[float | None, list]]) -> dict[str, Any]:
    """/v1/chat/completions' `logprobs` object for a reply's ids: {"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}], "refusal": null}."""

    def entry(token_id: int, lp: float) -> dict[str, Any]:
        return {"token": names.name(token_id), "logprob": lp, "bytes": names.bytes_of(token_id)}

    content = [
        entry(t, lp) | {"top_logprobs": [entry(a, v) for a, v in alternatives]}
        for t, (lp, alternatives) in zip(ids, scored, strict=True)
    ]
    return {"content": content, "refusal": None}


def choice_logprobs(
    server: Any, ids: list[int], new: list[int], echo: bool, top: int, chat: bool, sent: str | None = None
) -> dict[str, Any]:
    """A choice's `logprobs` object: its generated tokens' (and with `echo` the prompt's too), scored under the
    server's model lock. `sent`: a completion's prompt string as the client sent it (None: token ids)."""
    ft, names = server.ft, server.token_names()
    first = 0 if echo else len(ids)
    if chat:  # the reply's content: an end-of-turn token that stopped it is not part of it
        new = [t for t in new if t not in server.stops]
    with server.lock:
        scored = score(ft.model, ids + new, first, top, ft.tokenizer.vocab_size)
    if chat:
        return chat_logprobs(names, new, scored)
    decode = functools.partial(ft.tokenizer.decode, skip_special_tokens=True)
    if sent is None:
        return completion_logprobs(names, decode, ids, new, scored, echo=echo)
    from lmforge.generate import prompt_encoding

    starts = [start for start, _ in prompt_encoding(ft, sent).offsets]
    starts = [0] * (len(ids) - len(starts)) + starts  # a prefix (BOS), or an empty prompt's eos: at 0
    return completion_logprobs(names, decode, ids, new, scored, echo=echo, sent=sent, prompt_offsets=starts)


class StreamedLogprobs:
    """The `logprobs` of one streamed choice, a chunk's tokens at a time, in the shapes `choice_logprobs` gives
    unstreamed: the chunks' lists joined are those of the whole choice (text offsets go on from the chunk before;
    a chat reply leaves out the end-of-turn token that stopped it). The numbers are the decode step's (`step`),
    the same log-softmax of the same logits as `score`'s forward pass, up to float summation order."""

    def __init__(self, server: Any, ids: list[int], top: int, chat: bool, sent: str | None, echo: bool = False) -> None:
        self.server, self.names, self.top, self.chat = server, server.token_names(), top, chat
        decode = functools.partial(server.ft.tokenizer.decode, skip_special_tokens=True)
        prompt_text, continued = shown_prompt(decode, ids, sent, echo)
        self.offsets = TextOffsets(continued, len(prompt_text))

    def step(self, logits: torch.Tensor, token_id: int) -> tuple[int, float, list[tuple[int, float]]]:
        """One generated token's (id, logprob, alternatives) from the (1, V) logits it was chosen from."""
        ((logprob, alternatives),) = scored_rows(logits, [token_id], self.top)
        return token_id, logprob, alternatives

    def chunk(self, steps: list[tuple[int, float, list[tuple[int, float]]]]) -> dict[str, Any] | None:
        """A chunk's `logprobs` object for the tokens generated since the chunk before (None: no tokens)."""
        if self.chat:
            steps = [s for s in steps if s[0] not in self.server.stops]
        if not steps:
            return None
        ids, scored = [t for t, _, _ in steps], [(lp, alternatives) for _, lp, alternatives in steps]
        if self.chat:
            return chat_logprobs(self.names, ids, scored)
        return logprobs_object(self.names, ids, scored, self.offsets.feed(ids))


def mean_logprob(server: Any, ids: list[int], new: list[int]) -> float:
    """Log-probability per generated token of one draw (`best_of` ranks draws by it); -inf for none."""
    if not new:
        return -math.inf
    with server.lock:
        scored = score(server.ft.model, ids + new, len(ids), 0, server.ft.tokenizer.vocab_size)
    return sum(lp for lp, _ in scored if lp is not None) / len(new)
