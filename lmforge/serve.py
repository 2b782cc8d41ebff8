"""`lmforge serve RUN_DIR`: an OpenAI-compatible HTTP API for local apps, on the standard library alone.

Endpoints (the subset of the OpenAI API that local clients use; checked with the official `openai` client):
    GET  /v1/models[/NAME]        the one model served (named after the run directory)
    POST /v1/completions          {"prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                                   "stream_options"}
    POST /v1/chat/completions     {"messages": [{"role", "content"}], same options, "max_completion_tokens"};
                                  the run's chat template ("developer" = "system"; text content parts joined)
    GET  /health                  {"status": "ok"}
With `"stream": true` the reply is Server-Sent Events: `data: {chunk}` lines (completion text or chat
`delta`s) and a final `data: [DONE]`, as the OpenAI client libraries expect; `"stream_options":
{"include_usage": true}` adds a last chunk with no choices and the token counts. `model` and `user` are
accepted and not checked (any name gets the one model, so an app written for OpenAI runs unchanged).
`n` > 1, `logprobs`, `echo`, `suffix`, `best_of`, penalties, `logit_bias`, tools and `response_format`
are refused with a 400 rather than ignored: each would change what a client gets back.

Safety defaults: binds 127.0.0.1 (pass --host 0.0.0.0 deliberately to expose it), rejects bodies over
`max_body_bytes` (413) and `max_tokens` over the limit or prompts longer than the context (400), all
with OpenAI-style `{"error": {"message", "type", "code"}}` bodies. Requests run one at a time (one model,
one lock) on a `ThreadingHTTPServer`, so a slow client never blocks the accept loop. With `compile`
(`--compile`) the decode step is compiled by a short warm-up generation before the server answers, so
no request waits for it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, DataError, LmforgeError


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 1_000_000
    max_tokens: int = 512  # upper bound a request may ask for
    default_max_tokens: int = 128

    def __post_init__(self) -> None:  # a zero or negative limit would refuse every request
        for flag, value in (
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-tokens", self.max_tokens),
            ("default_max_tokens", self.default_max_tokens),
        ):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")


# OpenAI request fields this server does not implement, with the values that mean "off" (accepted)
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


class _StopGeneration(Exception):
    """Raised from the token callback when a stop string appears."""


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param  # param: the request field at fault


class LMServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], ft: Any, name: str, limits: ServeLimits, compile: bool) -> None:  # noqa: A002
        from lmforge.generate import run_stops

        self.stops = run_stops(ft)  # eos and the run's stop ids
        super().__init__(address, _Handler)
        self.ft, self.model_name, self.limits, self.compile = ft, name, limits, compile
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(
    run: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    device: str = "auto",
    compile: bool = False,  # noqa: A002 - the CLI flag's name
) -> LMServer:
    """Load the run and bind the server (port 0 = any free port); call `serve_forever()` to run it."""
    from lmforge.adapt.load import load_finetuned
    from lmforge.generate import generate, require_text_generator
    from lmforge.train.precision import pick_device

    if not 0 <= port <= 65535:  # before loading the model, which takes a while
        raise ConfigError(f"--port must be 0-65535 (0 = any free port), got {port}")
    ft = load_finetuned(run, pick_device(device))
    require_text_generator(run, ft)
    try:
        server = LMServer((host, port), ft, Path(run).resolve().name, limits or ServeLimits(), compile)
    except OSError as e:
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:  # the host, not the port
            advice = "--host must name this machine (127.0.0.1: this machine only, 0.0.0.0: all its addresses)"
        else:
            advice = "pick another --port"
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); {advice}") from None
    if compile and ft.use_cache:  # one eager prefill and one compiled decode step: compiles it now
        generate(ft.model, [ft.tokenizer.eos_id_or_none or 0], max_new_tokens=2, temperature=0.0, compile=True)
    return server


def serve(server: LMServer) -> None:
    """`lmforge serve`: answer requests on a `make_server` server until Ctrl-C."""
    print(f"serving {server.model_name} at {server.url}/v1 (completions, chat/completions); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise RequestError(400, f"'{key}' must be a number in [{lo}, {hi}], got {value!r}", param=key)
    return value


def _openai_messages(messages: Any) -> Any:
    """OpenAI's newer message forms as the chat template's {role, content} strings: a "developer" turn is
    the system prompt (OpenAI renamed it for its o-series models), and content sent as a list of text parts
    (what the current client types and many frameworks send) is their texts joined by newlines, as vLLM does.
    Anything else (images, audio, tool turns) is left for the template's check to refuse."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and (m.get("role") == "developer" or isinstance(m.get("content"), list)):
            m = {**m, "role": "system" if m.get("role") == "developer" else m.get("role")}
            if isinstance(m.get("content"), list):
                parts = m["content"]
                if not all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts
                ):
                    raise RequestError(
                        400, "only text content parts ({'type': 'text', 'text': ...}) are supported", param="messages"
                    )
                m["content"] = "\n".join(p["text"] for p in parts)
        out.append(m)
    return out


class _Handler(BaseHTTPRequestHandler):
    server: LMServer
    protocol_version = "HTTP/1.0"  # streamed replies end when the connection closes
    streaming = False  # a POST sets it once its streamed reply's 200 is out

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        pass

    # ---------------------------------------------------------------- plumbing

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError) -> None:
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        error = {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}}
        if self.streaming:  # the 200 and some events are out: the error becomes the last event
            self._event(error)
        else:
            self._send_json(e.status, error)

    def _event(self, payload: dict[str, Any]) -> None:
        """One Server-Sent Event of a streamed reply."""
        self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()

    def _read_body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            raise RequestError(400, "bad Content-Length header: it must be the body's size in bytes")
        if length > self.server.limits.max_body_bytes:
            raise RequestError(
                413,
                f"request body is {length} bytes; the limit is {self.server.limits.max_body_bytes}",
                "request_too_large",
            )
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8") or "null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        try:  # JSON may escape a lone UTF-16 surrogate ("\ud83d"), which no tokenizer can encode
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(
                400, "the request body holds an unpaired surrogate escape (e.g. \\ud83d); send valid Unicode"
            ) from None
        return body

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.rstrip("/")
        model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "lmforge"}
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [model]})
        elif path.startswith("/v1/models/"):  # client.models.retrieve(name)
            name = urllib.parse.unquote(path.removeprefix("/v1/models/"))
            if name == self.server.model_name:
                self._send_json(200, model)
            else:
                message = f"model '{name}' not found; this server serves '{self.server.model_name}'"
                self._error(RequestError(404, message, "model_not_found", param="model"))
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._error(RequestError(404, f"unknown path {self.path}", "not_found"))

    def do_POST(self) -> None:  # noqa: N802
        self.streaming = False
        try:
            path = self.path.rstrip("/")
            if path not in ("/v1/completions", "/v1/chat/completions"):
                raise RequestError(404, f"unknown path {self.path}", "not_found")
            body = self._read_body()
            self._complete(body, chat=path.endswith("chat/completions"))
        except RequestError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 - a bug must still answer, and not kill the request thread silently
            message = f"internal error ({type(e).__name__}: {e})"
            print(f"lmforge serve: {self.command} {self.path}: {message}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                self._error(RequestError(500, message, "server_error"))

    # ---------------------------------------------------------------- the work

    def _prompt_len(self, body: dict[str, Any], chat: bool) -> int:
        try:
            return len(self._prompt_ids(body, chat, 0))
        except RequestError:
            return 0  # reported properly by the real call

    def _prompt_ids(self, body: dict[str, Any], chat: bool, max_tokens: int) -> list[int]:
        ft = self.server.ft
        context = ft.model.cfg.max_seq_len
        if chat:
            from lmforge.chat import ChatTemplate

            messages = body.get("messages")
            try:
                template = ft.template or ChatTemplate()
                ids, _ = template.prompt_ids(ft.tokenizer, messages, budget=context)
            except DataError as e:
                raise RequestError(400, str(e)) from None
            full = sum(len(s) for s, _ in template.segments(ft.tokenizer, messages, add_generation_prompt=True))
            if full != len(ids) or len(ids) + max_tokens > context:
                raise RequestError(
                    400,
                    f"the messages need {full} tokens + {max_tokens} to generate; the context is {context}",
                    "context_length_exceeded",
                )
            return ids
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "'prompt' must be a string (one prompt per request)")
        ids = ft.tokenizer.prompt_prefix + ft.tokenizer.encode(prompt)  # (BOS: generate.py)
        if not ids:  # a new document, after an end-of-text token
            eos = ft.tokenizer.eos_id_or_none
            if eos is None:
                raise RequestError(
                    400,
                    "'prompt' is empty and this model's tokenizer has no end-of-text token "
                    "to start a new document after; send some text to continue",
                )
            ids = [eos]
        if len(ids) + max_tokens > context:
            raise RequestError(
                400,
                f"the prompt is {len(ids)} tokens + {max_tokens} to generate; the context is {context}",
                "context_length_exceeded",
            )
        return ids

    def _complete(self, body: dict[str, Any], *, chat: bool) -> None:
        from lmforge.generate import StreamDecoder, continuation_decoder, generate

        limits, ft = self.server.limits, self.server.ft
        if chat:
            body = {**body, "messages": _openai_messages(body.get("messages"))}
        # the chat API renamed max_tokens to max_completion_tokens (the client marks max_tokens deprecated)
        limit_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if limit_key == "max_completion_tokens" and body.get("max_tokens") not in (None, body[limit_key]):
            raise RequestError(400, "give 'max_tokens' or 'max_completion_tokens', not both", param="max_tokens")
        asked = body.get(limit_key) is not None
        default = min(limits.default_max_tokens, limits.max_tokens)
        max_tokens = _number(body, limit_key, default, 1, limits.max_tokens)
        if isinstance(max_tokens, float) and max_tokens.is_integer():
            max_tokens = int(max_tokens)
        if not isinstance(max_tokens, int):
            raise RequestError(400, f"'{limit_key}' must be a whole number, got {max_tokens!r}", param=limit_key)
        if body.get("n", 1) not in (1, None):
            raise RequestError(400, f"'n' must be 1 (one choice per request), got {body['n']!r}", param="n")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise RequestError(400, f"'seed' must be an integer in [0, 2**63), got {seed!r}", param="seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(400, "'stop' must be a string or a list of strings", param="stop")
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
        for key, neutral in _UNSUPPORTED.items():  # accepted and ignored, they would silently change nothing
            if body.get(key) not in neutral:
                raise RequestError(400, f"'{key}' is not supported by lmforge serve; leave it out", param=key)
        context = ft.model.cfg.max_seq_len
        if not asked:  # no max_tokens given: whatever the context leaves, up to the default
            max_tokens = max(1, min(max_tokens, context - self._prompt_len(body, chat)))
        ids = self._prompt_ids(body, chat, max_tokens)

        tok = ft.tokenizer
        plain = functools.partial(tok.decode, skip_special_tokens=True)
        decoder = StreamDecoder(plain if chat else continuation_decoder(plain, ids))  # completions continue text
        kind = "chat.completion" if chat else "text_completion"  # streamed: "chat.completion.chunk", "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        text = ""
        finish = "length"
        sent = 0

        def chunk(piece: str, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish_reason}
            out = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created}
            out |= {"model": self.server.model_name, "choices": [choice]}
            return out | ({"usage": None} if include_usage else {})  # OpenAI: null on all but the usage chunk

        if stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.streaming = True
            if chat:  # the assistant's role comes first, as from OpenAI; completions start with text
                self._event(chunk("", None, first=True))

        def on_token(t: int) -> None:
            nonlocal text, finish, sent
            if t in self.server.stops:
                finish = "stop"
                return
            text += decoder.feed(t)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            # hold back a tail that could still become a stop string
            hold = max((len(s) - 1 for s in stop), default=0)
            ready = len(text) if finish == "stop" else max(sent, len(text) - hold)
            if stream and ready > sent:
                self._event(chunk(text[sent:ready], None))
                sent = ready
            if cut >= 0:
                raise _StopGeneration

        with self.server.lock:
            try:
                new = generate(
                    ft.model,
                    ids,
                    max_new_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                    use_cache=ft.use_cache,
                    eos_id=tok.eos_id_or_none,
                    stop_ids=self.server.stops,
                    on_token=on_token,
                    compile=self.server.compile,
                )
                n_new = len(new)
                if finish != "stop":
                    text += decoder.flush()
            except _StopGeneration:
                n_new = len(decoder.ids)
            except LmforgeError as e:
                raise RequestError(400, str(e)) from None
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_new, "total_tokens": len(ids) + n_new}
        if stream:
            if len(text) > sent:
                self._event(chunk(text[sent:], None))
            self._event(chunk("", finish))
            if include_usage:  # one more chunk, with no choices, as OpenAI sends it
                self._event(chunk("", None) | {"choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            return
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        self._send_json(
            200,
            {
                "id": rid,
                "object": kind,
                "created": created,
                "model": self.server.model_name,
                "choices": [choice],
                "usage": usage,
            },
        )
