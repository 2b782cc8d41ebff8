"""OpenAI request bodies for `serve.py`: the checks and conversions of their fields, each failure a
`RequestError` (an HTTP status and OpenAI's error `code` and `param`) that the server sends as JSON."""

from __future__ import annotations

import json
from typing import Any

# stop strings per request: each is searched for in the text's tail after every token, so a 1 MB body of them
# would slow every token of the reply; OpenAI's API takes 4
MAX_STOP_STRINGS = 16

# OpenAI request fields this server does not implement, with the values that mean "off" (accepted)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


class RequestError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str = "invalid_request",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param  # param: the request field at fault
        self.headers = headers or {}  # e.g. a 405's Allow


def number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise RequestError(400, f"'{key}' must be a number in [{lo}, {hi}], got {value!r}", param=key)
    return value


def top_k_of(body: dict[str, Any]) -> int:
    """vLLM's `top_k`: sample among the k most likely tokens; -1 or 0 (and null) = off, as for `generate --top-k`
    and `chat --top-k` (`sampling.check_sampling`)."""
    value = body.get("top_k")
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise RequestError(
            400, f"'top_k' must be a whole number >= 1, or -1 or 0 for off; got {value!r}", param="top_k"
        )
    return max(value, 0)


def logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` ({"token id": bias, ...}, bias -100..100) as `sampling.Penalties.bias`."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RequestError(
            400, f"'logit_bias' must be an object of token id -> bias, got {short_json(value)}", param="logit_bias"
        )
    out = []
    for key, bias in value.items():
        # ASCII digits only: str.isdigit() is also true of "²" (int() fails: a 500) and "١" (int() reads it as 1)
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else -1
        if not 0 <= token < vocab_size:
            message = f"'logit_bias' key {key!r} is not a token id of this model (0 to {vocab_size - 1})"
            raise RequestError(400, message, param="logit_bias")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not -100 <= bias <= 100:
            message = f"'logit_bias' of token {key} must be a number in [-100, 100], got {short_json(bias)}"
            raise RequestError(400, message, param="logit_bias")
        out.append((token, float(bias)))
    return tuple(out)


def openai_messages(messages: Any) -> Any:
    """`chat.openai_text_messages` of a request's messages (OpenAI's "developer" role and text content parts), a
    content part of another type refused with a 400."""
    from lmforge.chat import openai_text_messages
    from lmforge.errors import DataError

    try:
        return openai_text_messages(messages)
    except DataError as e:
        raise RequestError(400, str(e), param="messages") from None


_PROMPT_FORMS = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def completion_prompts(prompt: Any, vocab_size: int) -> list[str | list[int]]:
    """A completion request's prompts, in order, in OpenAI's four forms: a string, a list of strings, a list
    of token ids (one prompt) or a list of lists of token ids. Token ids are checked against the vocabulary
    here: one past it would fail inside the model (or decode as nothing) instead of being refused."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        got = "an empty list" if prompt == [] else short_json(prompt)
        raise RequestError(400, f"'prompt' must be {_PROMPT_FORMS}; got {got}", param="prompt")
    if isinstance(prompt[0], str):
        for i, p in enumerate(prompt):
            if not isinstance(p, str):
                raise RequestError(
                    400, f"'prompt[{i}]' is {short_json(p)}; a list of prompts holds strings", param="prompt"
                )
        return list(prompt)
    if _is_token_id(prompt[0]):
        return [_token_ids(prompt, "'prompt'", vocab_size)]
    if isinstance(prompt[0], list):
        return [_token_ids(p, f"'prompt[{i}]'", vocab_size) for i, p in enumerate(prompt)]
    raise RequestError(400, f"'prompt' must be {_PROMPT_FORMS}; got a list of {short_json(prompt[0])}", param="prompt")


def _token_ids(ids: Any, name: str, vocab_size: int) -> list[int]:
    if not isinstance(ids, list):
        raise RequestError(400, f"{name} must be a list of token ids, got {short_json(ids)}", param="prompt")
    if not ids:
        raise RequestError(400, f"{name} is an empty list of token ids; give at least one", param="prompt")
    for t in ids:
        if not _is_token_id(t):
            raise RequestError(400, f"{name} must hold token ids (integers), got {short_json(t)}", param="prompt")
        if not 0 <= t < vocab_size:
            message = f"{name} holds token id {t}, outside this model's vocabulary (ids 0 to {vocab_size - 1})"
            raise RequestError(400, message, param="prompt")
    return ids


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false arrive as bools


def short_json(value: Any) -> str:
    """A request value as the client wrote it, cut short for a one-line error."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def stop_strings(body: dict[str, Any]) -> list[str]:
    """`stop`: a string or a list of them (none: []). The server looks for them in the model's text after
    putting them in its tokenizer's Unicode form: with NFKC (prepare --normalize NFKC) a stop string "，" is
    looked for as the "," the model writes, or it never matched. An empty string is refused alone or in a list
    (as vLLM refuses both): it would stop before the first token, and `"stop": ""` was silently no stop at all."""
    stop = body.get("stop")
    stop = [] if stop is None else stop
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        got = short_json(body.get("stop"))  # ([""]: a list of strings, but one that would stop at once)
        message = f"'stop' must be a non-empty string or a list of non-empty strings, got {got}"
        raise RequestError(400, message, param="stop")
    if len(stop) > MAX_STOP_STRINGS:  # each is searched for after every token
        message = f"'stop' holds {len(stop)} strings; at most {MAX_STOP_STRINGS} (OpenAI's API takes 4)"
        raise RequestError(400, message, param="stop")
    return stop


def stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(`stream`, `stream_options.include_usage`)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    stream = bool(stream)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        message = '\'stream_options\' needs "stream": true and an object such as {"include_usage": true}'
        raise RequestError(400, message, param="stream_options")
    include_usage = (options or {}).get("include_usage") or False
    if not isinstance(include_usage, bool):
        message = f"'stream_options.include_usage' must be true or false, got {include_usage!r}"
        raise RequestError(400, message, param="stream_options")
    return stream, include_usage


def choice_counts(body: dict[str, Any], chat: bool) -> tuple[int, int]:
    """(`n`, `best_of`): choices per prompt, and completions' draws per prompt that the n best are picked from."""
    n = body.get("n")
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise RequestError(400, f"'n' must be a whole number >= 1 (choices per prompt), got {n!r}", param="n")
    best_of = body.get("best_of")
    if chat and best_of not in (None, 1):
        raise RequestError(400, "'best_of' is for /v1/completions; leave it out of a chat request", param="best_of")
    best_of = n if best_of is None or chat else best_of
    if not isinstance(best_of, int) or isinstance(best_of, bool) or best_of < n:
        message = f"'best_of' must be a whole number >= 'n' ({n}), got {short_json(best_of)}"
        raise RequestError(400, message, param="best_of")
    return n, best_of


def scoring_options(body: dict[str, Any], chat: bool) -> tuple[bool, bool, int]:
    """(echo, logprobs, top alternatives per token) asked for: completions' `echo` and `logprobs` (an
    integer, the alternatives), chat's `logprobs` (true/false) and `top_logprobs`."""
    from lmforge.serve_logprobs import MAX_TOP_LOGPROBS

    echo = body.get("echo")
    # the "off" values (echo false, top_logprobs 0 without logprobs) are what some clients send by default, and
    # vLLM takes them; they were refused with a 400
    if chat and echo not in (None, False):
        raise RequestError(400, "'echo' is for /v1/completions; leave it out of a chat request", param="echo")
    if echo is not None and not isinstance(echo, bool):
        raise RequestError(400, f"'echo' must be true or false, got {echo!r}", param="echo")
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    in_range = f"a whole number 0-{MAX_TOP_LOGPROBS}"
    if chat:
        if wanted is not None and not isinstance(wanted, bool):
            raise RequestError(400, f"'logprobs' must be true or false, got {wanted!r}", param="logprobs")
        if top not in (None, 0) and not wanted:
            raise RequestError(400, "'top_logprobs' needs \"logprobs\": true", param="top_logprobs")
    else:
        if top is not None:
            message = "'top_logprobs' is for chat; /v1/completions takes the count as 'logprobs'"
            raise RequestError(400, message, param="top_logprobs")
        top, wanted = wanted, wanted is not None
    top = 0 if top is None else top
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
        key = "top_logprobs" if chat else "logprobs"
        raise RequestError(400, f"'{key}' must be {in_range}, got {top!r}", param=key)
    return bool(echo), bool(wanted), top


def sampling_penalties(body: dict[str, Any], vocab_size: int) -> Any:
    """OpenAI's presence/frequency penalties and the `repetition_penalty` extension (vLLM's, transformers')."""
    from lmforge.sampling import Penalties

    presence = number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    repetition = number(body, "repetition_penalty", 1.0, 0.0, 10.0)
    if repetition == 0:
        message = "'repetition_penalty' must be > 0 (1 = off; 1.1-1.3 is typical), got 0"
        raise RequestError(400, message, param="repetition_penalty")
    return Penalties(presence, frequency, repetition, logit_bias(body.get("logit_bias"), vocab_size))


# ------------------------------------------------------------------------------------------------
# vLLM's tokenizer endpoints (GET /tokenizer_info, POST /tokenize, POST /detokenize): clients count tokens
# with them, and lm-evaluation-harness tokenizes through them (its "remote" tokenizer) when they answer


def tokenizer_info(ft: Any, context: int) -> dict[str, Any]:
    """GET /tokenizer_info: the special tokens, the chat template serve renders and the context length."""
    from lmforge.chat import ChatTemplate, JinjaChatTemplate

    tok = ft.tokenizer
    eos = tok.eos_id_or_none
    bos = tok.prompt_prefix[0] if tok.prompt_prefix else None
    eos_token = None if eos is None else tok.id_to_token(eos)
    bos_token = None if bos is None else tok.id_to_token(bos)
    if isinstance(ft.template, JinjaChatTemplate):  # the strings its chat_template renders (and its HF export names)
        eos_token, bos_token = ft.template.eos_token or None, ft.template.bos_token or None
    return {
        "eos_token": eos_token,
        "bos_token": bos_token,
        "pad_token": None,
        "chat_template": (ft.template or ChatTemplate()).jinja_for(tok),
        "model_max_length": context,
        "vocab_size": tok.vocab_size,
        "tokenizer_class": "lmforge",
    }


def tokenize_reply(ft: Any, body: dict[str, Any], context: int) -> dict[str, Any]:
    """POST /tokenize: {"prompt": text, "add_special_tokens": true} (special-token strings such as
    <|endoftext|> become their ids, as a transformers tokenizer reads them; add_special_tokens puts the
    tokenizer's own prefix first, a BOS where it has one, as serve does to a prompt) or {"messages": [...],
    "add_generation_prompt": true} (the chat template's prompt; false: the conversation as rendered, replies or
    none, as transformers' apply_chat_template(..., add_generation_prompt=False)) -> {"tokens", "count",
    "max_model_len"}."""
    from lmforge.chat import ChatTemplate
    from lmforge.errors import DataError

    if "messages" in body:
        ask = body.get("add_generation_prompt", True)
        if not isinstance(ask, bool):
            raise RequestError(400, f"'add_generation_prompt' must be true or false, got {short_json(ask)}")
        template = ft.template or ChatTemplate()
        try:
            messages = openai_messages(body["messages"])  # (a conversation with no reply is tokenized too)
            segments = template.segments(ft.tokenizer, messages, add_generation_prompt=ask, training=False)
        except DataError as e:
            raise RequestError(400, str(e), param="messages") from None
        ids = [i for piece, _ in segments for i in piece]
    else:
        prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(prompt, str):
            raise RequestError(400, f"'prompt' must be a string, got {short_json(prompt)}", param="prompt")
        if not isinstance(special, bool):
            message = f"'add_special_tokens' must be true or false, got {short_json(special)}"
            raise RequestError(400, message, param="add_special_tokens")
        from lmforge.generate import prompt_text_ids

        ids = (ft.tokenizer.prompt_prefix if special else []) + prompt_text_ids(ft, prompt)
    return {"tokens": ids, "count": len(ids), "max_model_len": context}


def detokenize_reply(ft: Any, body: dict[str, Any]) -> dict[str, Any]:
    """POST /detokenize: {"tokens": [ids]} -> {"prompt": text} (special tokens written out, as vLLM does)."""
    if body.get("tokens") == []:
        return {"prompt": ""}
    ids = _token_ids(body.get("tokens"), "'tokens'", ft.tokenizer.vocab_size)
    return {"prompt": ft.tokenizer.decode(ids, skip_special_tokens=False)}
