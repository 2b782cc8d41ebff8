"""`lmforge serve RUN_DIR`: an OpenAI-compatible HTTP API for local apps, on the standard library alone.

Endpoints (the subset of the OpenAI API that local clients use; checked with the official `openai` client):
    GET  /v1/models[/NAME]        the one model served (named after the run directory, or --served-model-name)
    POST /v1/completions          {"prompt", "max_tokens", "temperature", "top_p", "min_p", "top_k", "stop", "seed",
                                   "n", "stream", "stream_options", "echo", "logprobs"}; "prompt" is a string, a list
                                   of strings, a list of token ids or a list of such lists: `n` choices per
                                   prompt, prompt i's at `index` i*n .. i*n+n-1; "echo" puts the prompt before
                                   the text (with "max_tokens": 0 the prompt is only scored) and "logprobs": K
                                   gives each token's log-probability and its K likeliest alternatives
                                   (`serve_logprobs.py`)
    POST /v1/chat/completions     {"messages": [{"role", "content"}], same options but "echo",
                                  "max_completion_tokens", "logprobs": true, "top_logprobs"}; the run's chat
                                  template ("developer" = "system"; text content parts joined)
    GET  /health                  {"status": "ok"}
    GET  /tokenizer_info, POST /tokenize, POST /detokenize    vLLM's tokenizer endpoints (`serve_request.py`)
With `"stream": true` the reply is Server-Sent Events: `data: {chunk}` lines (completion text or chat
`delta`s, each choice's carrying its `index`) and a final `data: [DONE]`, as the OpenAI client libraries
expect; `"stream_options": {"include_usage": true}` adds a last chunk with no choices and the token counts
(summed over the prompts). `model` and `user` are accepted and not checked (any name gets the one model, so
an app written for OpenAI runs unchanged), unless names are given (`--served-model-name`, as vLLM's): then the
model is known by those (replies carry the first) and a request for another gets OpenAI's 404
`model_not_found`, so a client pointed at the wrong server finds out instead of getting this model's text.
`presence_penalty`, `frequency_penalty` and `repetition_penalty`
(vLLM's extension) and `logit_bias` are `sampling.Penalties`. A completion's `best_of` draws that many per
prompt and returns the `n` with the highest log-probability per token. Streamed with `logprobs`, each chunk
carries its tokens' logprobs, as OpenAI's do (`serve_logprobs.StreamedLogprobs`). `best_of` with `stream`,
`suffix`, tools and `response_format` are refused with a 400 rather than ignored: each would change
what a client gets back. With a `seed`, choice (or draw) j of a prompt samples with seed + j.

HTTP/1.1 with keep-alive, as the `openai` client (httpx) and browsers use it: one connection carries many
requests. Every reply that is not streamed has a Content-Length; a stream is sent chunked (ending with the
zero-length chunk), so the connection stays usable after it (an HTTP/1.0 client gets the stream ended by
closing the connection instead). A request body the server does not read (a refusal before it is parsed)
is read and dropped so the next request starts where it should; one too large to drop (or of unknown
length) gets its error with `Connection: close`. A connection idle for `idle_timeout_s` is closed.

Safety defaults: binds 127.0.0.1 (pass --host 0.0.0.0 deliberately to expose it), rejects bodies over
`max_body_bytes` (413) and `max_tokens` over the limit, prompts longer than the context or more than
`max_prompts` of them (400), all with OpenAI-style `{"error": {"message", "type", "param", "code"}}` bodies,
malformed HTTP and unknown methods included. Generations run one at a time (one model, one lock) on a
`ThreadingHTTPServer`: each connection has its own thread, so a slow or idle kept-alive client never blocks
the accept loop or another client's requests, and a stream is written by its connection's thread outside the
lock (the model hands it the text), so a client that stops reading its stream holds up no one else. A
client that leaves (closes or resets its connection) ends its generation at the next token, streamed or
not; one that only shuts down its sending side (`nc -N`) looks the same and gets no reply. With
`compile` (`--compile`) the decode step is compiled by a short warm-up generation before the server answers,
so no request waits for it.

Request bodies are checked and converted (prompts, messages, numbers) in `serve_request.py`, logprobs are
`serve_logprobs.py`'s; the HTTP/1.1 handling and the one request path left here run a little over 800 lines.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import queue
import re
import select
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.generate import prompt_text_ids
from lmforge.serve_logprobs import StreamedLogprobs, choice_logprobs, mean_logprob, shown_prompt
from lmforge.serve_request import (
    UNSUPPORTED,
    RequestError,
    choice_counts,
    completion_prompts,
    detokenize_reply,
    number,
    openai_messages,
    sampling_penalties,
    scoring_options,
    stop_strings,
    stream_options,
    tokenize_reply,
    tokenizer_info,
    top_k_of,
)


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 1_000_000
    max_tokens: int = 512  # upper bound a request may ask for (per prompt)
    default_max_tokens: int = 128
    # prompts in one completion request's list: each is generated in turn, so without a bound one request of
    # 100,000 one-token prompts (600 kB) kept the model busy for 3 minutes, and at max_tokens for hours
    max_prompts: int = 64
    # a kept-alive connection idle this long is closed (its thread ends); also bounds a stalled body read
    # or a client that stops reading a stream. httpx drops idle pooled connections after 5 s, browsers ~1 min
    idle_timeout_s: float = 60.0

    def __post_init__(self) -> None:  # a zero or negative limit would refuse every request
        for flag, value in (
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-tokens", self.max_tokens),
            ("--max-prompts", self.max_prompts),
            ("default_max_tokens", self.default_max_tokens),
        ):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if not (self.idle_timeout_s > 0 and math.isfinite(self.idle_timeout_s)):
            raise ConfigError(f"--idle-timeout must be > 0 seconds, got {self.idle_timeout_s:g}")


class _StopGeneration(Exception):
    """Raised from the token callback when a stop string appears."""


class _ClientLeft(ConnectionError):
    """The client of a reply that is not streamed closed its connection while it waited: nothing to send."""


class _ServerStopping(ConnectionError):
    """The server is shutting down (Ctrl-C, SIGTERM): a generation still running ends, unanswered."""


class LMServer(ThreadingHTTPServer):
    daemon_threads = True
    # listen's backlog: with socketserver's 5, the async openai client's bursts (24-32 requests at once) got
    # "Connection error"s in most runs; with 128, none in 10
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        ft: Any,
        name: str,
        limits: ServeLimits,
        compile: bool,  # noqa: A002
        cors_origins: tuple[str, ...] = (),
        served_names: tuple[str, ...] = (),
    ) -> None:
        from lmforge.generate import run_stops

        self.stops = run_stops(ft)  # eos and the run's stop ids
        if ":" in address[0]:  # an IPv6 address (--host ::1, or :: for every address): socketserver binds IPv4 only
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.ft, self.model_name, self.limits, self.compile = ft, name, limits, compile
        self.cors_origins = cors_origins  # web pages allowed to call the API from a browser ("*": any)
        self.served_names = served_names  # --served-model-name: the only "model" names answered (none: any)
        self.lock = threading.Lock()
        self.stopping = False  # set by `stop_generations`: a running generation ends at its next token
        self._names: Any = None

    def token_names(self) -> Any:
        """The tokenizer's token names for `logprobs` (read on first use: a walk over the vocabulary)."""
        from lmforge.serve_logprobs import TokenNames

        with self.lock:
            if self._names is None:
                self._names = TokenNames(self.ft.tokenizer)
            return self._names

    def stop_generations(self) -> None:
        """End the generation in progress at its next token and keep the model lock, so that no other starts.
        A generation runs on a connection's daemon thread: left running when Ctrl-C or SIGTERM ended the
        server, it was inside torch when the interpreter exited, which aborted the process (C++ `terminate`,
        exit -6, a core dump) instead of ending it."""
        self.stopping = True
        self.lock.acquire()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(
    run: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    device: str = "auto",
    compile: bool = False,  # noqa: A002 - the CLI flag's name
    cors_origins: tuple[str, ...] = (),
    served_model_names: tuple[str, ...] = (),
) -> LMServer:
    """Load the run and bind the server (port 0 = any free port); call `serve_forever()` to run it.

    `cors_origins`: web pages (`scheme://host[:port]`, or "*" for any) whose scripts may call the API from a
    browser (CORS); none by default, so a page the user visits cannot use the model. `served_model_names`: the
    names the model answers to (vLLM's `--served-model-name`; replies carry the first), a request naming another
    is a 404; none: it is named after the run directory and answers to any name."""
    from lmforge.generate import generate, load_generator

    if not 0 <= port <= 65535:  # before loading the model, which takes a while
        raise ConfigError(f"--port must be 0-65535 (0 = any free port), got {port}")
    for origin in cors_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f"--cors-origin {origin!r}: give a page's origin, scheme://host[:port] with no path (e.g. "
                "http://localhost:3000), or '*' for any"
            )
    for served in served_model_names:
        if not served.strip():
            raise ConfigError("--served-model-name must not be empty; give the name clients send as 'model'")
    ft = load_generator(run, device, compile=compile)
    try:
        names = tuple(dict.fromkeys(served_model_names))
        name = names[0] if names else Path(run).resolve().name
        server = LMServer((host, port), ft, name, limits or ServeLimits(), compile, tuple(cors_origins), names)
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
        server.stop_generations()


class _Handler(BaseHTTPRequestHandler):
    server: LMServer
    # Keep-alive (one connection, many requests: httpx, which the openai client uses, pools connections).
    # Streams are sent with Transfer-Encoding: chunked rather than ended by closing the connection: it is what
    # OpenAI's own API sends, so every client written for it reads it (httpx/h11, requests, curl, browsers'
    # fetch and EventSource), and the connection is reused for the next request instead of each stream
    # costing a new one. Measured with openai 3.57: the async client sends streams and plain requests over
    # one connection; the sync one closes a stream's response at `data: [DONE]` without reading the last
    # chunk, so it reconnects after each stream (as it would after every stream ended by a close). A request
    # made with HTTP/1.0, which has no chunked coding, gets the stream ended by the close (_start_stream).
    protocol_version = "HTTP/1.1"
    # per request (reset by _dispatch): a streamed reply's 200 is out / it is sent in chunks / the body was read
    streaming = chunked = body_read = False
    linger = False  # close gently: drain what the client still sends (finish)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        pass

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout_s  # StreamRequestHandler sets it on the socket
        super().setup()

    # ---------------------------------------------------------------- plumbing

    def end_headers(self) -> None:
        """Every reply (JSON, streams, errors) carries CORS's allow header for an allowed page's request."""
        headers = getattr(self, "headers", None)  # (none yet when the request line itself was malformed)
        origin = headers.get("Origin") if headers else None
        allowed = self.server.cors_origins
        if origin and ("*" in allowed or origin in allowed):
            self.send_header("Access-Control-Allow-Origin", "*" if "*" in allowed else origin)
            if "*" not in allowed:
                self.send_header("Vary", "Origin")
        super().end_headers()

    def _preflight(self, allowed: tuple[str, ...]) -> None:
        """OPTIONS: a browser asking whether a page may call this path (CORS), or a plain query of the methods."""
        origin = self.headers.get("Origin")
        if origin and "*" not in self.server.cors_origins and origin not in self.server.cors_origins:
            raise RequestError(
                403,
                f"requests from the web page {origin} are not allowed; start lmforge serve with --cors-origin "
                f"{origin} to let it call the API",
                "cors_not_allowed",
            )
        self._settle_body()
        self.send_response(204)
        self.send_header("Allow", ", ".join((*allowed, "OPTIONS")))
        if origin:
            self.send_header("Access-Control-Allow-Methods", ", ".join((*allowed, "OPTIONS")))
            asked = self.headers.get("Access-Control-Request-Headers")
            self.send_header("Access-Control-Allow-Headers", asked or "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        """A whole JSON reply, with its Content-Length (a HEAD request gets the headers alone)."""
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._settle_body()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, e: RequestError) -> None:
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        error = {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}}
        if self.streaming:  # the 200 and some events are out: the error becomes the last event
            self._event(error)
            self._end_stream()
        else:
            self._send_json(e.status, error, e.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or headers, an unknown method) as the same
        one-line JSON error as ours, not its HTML page; the connection closes after it, as where the next
        request would start is unknown."""
        self.close_connection = self.linger = True
        self.body_read = True  # not read: closing instead
        if self.request_version == "HTTP/0.9":  # no version could be read: http.server would send the body alone
            self.request_version = self.protocol_version
        reason = message or self.responses.get(code, ("error",))[0]
        error = {"error": {"message": reason, "type": "invalid_request_error", "param": None, "code": "bad_request"}}
        with contextlib.suppress(OSError):
            self._send_json(code, error)

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue` (curl sends it for bodies over 1 kB): the client waits for a "100 Continue"
        before sending the body. Invite only a body that will be read; one over `max_body_bytes` (or of unknown
        size) gets its refusal at once, so the client does not upload megabytes to be dropped."""
        length = self._content_length()
        if length is None or length > self.server.limits.max_body_bytes:
            return True  # no 100: the request goes on to its 413/411, which closes the connection
        return super().handle_expect_100()

    def _settle_body(self) -> None:
        """Before a reply: read and drop a request body that was not read (a refusal before parsing it), so
        the next request on this connection starts at its first byte; one too large to read, or of unknown
        size, closes the connection after the reply instead."""
        if self.body_read:
            return
        self.body_read = True
        length = self._content_length()
        if length is not None and length <= self.server.limits.max_body_bytes:
            self.rfile.read(length)
        else:
            self.close_connection = self.linger = True

    def _content_length(self) -> int | None:
        """The request body's size; None when unknown (a chunked body, a malformed header)."""
        if self.headers.get("Transfer-Encoding"):
            return None
        value = self.headers.get("Content-Length", "0").strip()
        return int(value) if value.isascii() and value.isdigit() else None  # int() also takes "+5", "1_0"

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except ConnectionError:  # reset while waiting for its next request (a pooled connection of a client that
            self.close_connection = True  # exited): it left; socketserver printed a traceback for each one

    def finish(self) -> None:
        super().finish()
        if self.linger:
            # closing a socket with unread data resets the connection, which can destroy the error reply
            # before the client reads it (RFC 9112, 9.6): end our side, then drain the rest of its body, briefly
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(1.0)
                deadline, left = time.monotonic() + 2.0, 16 * 2**20
                while left > 0 and time.monotonic() < deadline and (data := self.connection.recv(65536)):
                    left -= len(data)

    def _client_left(self) -> bool:
        """Whether the client closed (or reset) its connection: the socket reads as ended. A client that sent
        its next request already (pipelining) has data waiting instead, and is still there."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):  # reset, or closed on our side
            return True

    def _start_stream(self) -> None:
        """The 200 of a Server-Sent Events reply; its events follow as chunks (HTTP/1.1) or until the close."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.chunked = self.request_version != "HTTP/1.0"
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if not self.chunked or self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.streaming = True

    def _write_stream(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def _event(self, payload: dict[str, Any]) -> None:
        """One Server-Sent Event of a streamed reply."""
        self._write_stream(b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def _end_stream(self) -> None:
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")  # the last chunk: the reply ends, the connection stays
        self.streaming = False

    def _read_body(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(
                411, "chunked request bodies are not supported; send the JSON with a Content-Length", "length_required"
            )
        length = self._content_length()
        if length is None:
            raise RequestError(400, "bad Content-Length header: it must be the body's size in bytes")
        if length > (limit := self.server.limits.max_body_bytes):
            raise RequestError(
                413,
                # (it said the two numbers alone: nothing told the user which flag raises the limit)
                f"request body is {length:,} bytes and this server takes at most {limit:,}; send less, or start "
                "lmforge serve with a larger --max-body-bytes",
                "request_too_large",
            )
        self.body_read = True
        try:
            # utf-8-sig: RFC 8259 lets a parser ignore a BOM (a Notepad file sent with `curl -d @request.json`)
            body = json.loads(self.rfile.read(length).decode("utf-8-sig") or "null")
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

    # ---------------------------------------------------------------- routing

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET  # wrong methods: a 405, not a 501
    # (OPTIONS: CORS preflight, `_preflight`)

    def _dispatch(self) -> None:
        self.streaming = self.chunked = self.body_read = False
        try:
            try:
                self._route(urllib.parse.urlsplit(self.path).path.rstrip("/"))
            except RequestError as e:
                self._error(e)
        except (ConnectionError, TimeoutError):  # the client left, or stalled past idle_timeout_s
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug must still answer, and not kill the request thread silently
            message = f"internal error ({type(e).__name__}: {e})"
            print(f"lmforge serve: {self.command} {self.path}: {message}", file=sys.stderr, flush=True)
            self.close_connection = True  # the reply may be half out
            with contextlib.suppress(OSError):
                self._error(RequestError(500, message, "server_error"))

    def _route(self, path: str) -> None:
        if path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            allowed = ("POST",)
        elif path in ("/v1/models", "/health", "/tokenizer_info") or path.startswith("/v1/models/"):
            allowed = ("GET", "HEAD")
        else:
            # (it said "unknown path /v1/responses" alone: nothing told an app what to call instead)
            message = (
                f"unknown path {self.path}; lmforge serve answers /v1/chat/completions, /v1/completions and /v1/models"
            )
            if path == "/v1/responses":  # OpenAI's newer API, which the current client and SDK examples call
                message += " (the Responses API is not served: call client.chat.completions.create)"
            raise RequestError(404, message, "not_found")
        if self.command == "OPTIONS":
            self._preflight(allowed)
            return
        if self.command not in allowed:
            message = f"{self.command} is not allowed on {path}; use {' or '.join(allowed)}"
            raise RequestError(405, message, "method_not_allowed", headers={"Allow": ", ".join(allowed)})
        from lmforge.generate import context_length

        context = context_length(self.server.ft.model)
        if path == "/tokenize":
            self._send_json(200, tokenize_reply(self.server.ft, self._read_body(), context))
            return
        if path == "/detokenize":
            self._send_json(200, detokenize_reply(self.server.ft, self._read_body()))
            return
        if path == "/tokenizer_info":
            self._send_json(200, tokenizer_info(self.server.ft, context))
            return
        if self.command == "POST":
            self._complete(self._read_body(), chat=path.endswith("chat/completions"))
            return
        names = self.server.served_names or (self.server.model_name,)
        models = [{"id": name, "object": "model", "created": 0, "owned_by": "lmforge"} for name in names]
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": models})
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        else:  # client.models.retrieve(name)
            name = urllib.parse.unquote(path.removeprefix("/v1/models/"))
            if name not in names:
                raise self._unknown_model(name)
            self._send_json(200, models[names.index(name)])

    def _unknown_model(self, name: object) -> RequestError:
        names = self.server.served_names or (self.server.model_name,)
        served = ", ".join(f"'{n}'" for n in names)
        message = f"The model '{name}' does not exist; this server serves {served}"
        return RequestError(404, message, "model_not_found", param="model")

    # ---------------------------------------------------------------- the work

    def _prompts(self, body: dict[str, Any], chat: bool) -> list[list[int]]:
        """The request's prompts as token ids, in order (chat: one, the conversation); the context is checked
        by the caller."""
        ft = self.server.ft
        if chat:
            from lmforge.chat import ChatTemplate

            template = ft.template or ChatTemplate()
            try:  # the whole conversation: one longer than the context is refused, not cut behind the client's back
                ids, _ = template.prompt_ids(ft.tokenizer, body.get("messages"), budget=sys.maxsize)
            except DataError as e:  # (the field at fault, as OpenAI names it and as /tokenize's messages say)
                raise RequestError(400, str(e), param="messages") from None
            return [ids]
        prompts = completion_prompts(body.get("prompt", ""), ft.tokenizer.vocab_size)
        if len(prompts) > self.server.limits.max_prompts:
            message = (
                f"'prompt' holds {len(prompts)} prompts; this server takes at most "
                f"{self.server.limits.max_prompts} per request (--max-prompts): send them in several requests"
            )
            raise RequestError(400, message, param="prompt")
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, list):  # token ids go to the model as sent (no BOS added), as OpenAI's API does
                out.append(prompt)
                continue
            # as /tokenize reads it: a prompt the client rendered with the chat template from /tokenizer_info
            # is then the ids the model was trained on (its <|endoftext|> as characters, it was not)
            ids = ft.tokenizer.prompt_prefix + prompt_text_ids(ft, prompt)  # (BOS: generate.py)
            if not ids:  # a new document, after an end-of-text token
                eos = ft.tokenizer.eos_id_or_none
                if eos is None:
                    name = "'prompt'" if len(prompts) == 1 else f"'prompt[{i}]'"
                    raise RequestError(
                        400,
                        f"{name} is empty and this model's tokenizer has no end-of-text token "
                        "to start a new document after; send some text to continue",
                        param="prompt",
                    )
                ids = [eos]
            out.append(ids)
        return out

    def _complete(self, body: dict[str, Any], *, chat: bool) -> None:
        from lmforge.generate import context_length, prompt_too_long

        limits, ft = self.server.limits, self.server.ft
        model = body.get("model")  # (vLLM too: none given is the served model)
        if self.server.served_names and model is not None and model not in self.server.served_names:
            raise self._unknown_model(model)
        if chat:
            body = {**body, "messages": openai_messages(body.get("messages"))}
        # the chat API renamed max_tokens to max_completion_tokens (the client marks max_tokens deprecated)
        limit_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if limit_key == "max_completion_tokens" and body.get("max_tokens") not in (None, body[limit_key]):
            raise RequestError(400, "give 'max_tokens' or 'max_completion_tokens', not both", param="max_tokens")
        asked = body.get(limit_key) is not None
        default = min(limits.default_max_tokens, limits.max_tokens)
        echo, logprobs, top = scoring_options(body, chat)
        if body.get(limit_key) == 0 and not echo:
            message = f"'{limit_key}' 0 generates nothing; ask for at least 1 token" + (
                "" if chat else ' (0 is for "echo": true, to score the prompt)'
            )
            raise RequestError(400, message, param=limit_key)
        max_tokens = number(body, limit_key, default, 0 if echo else 1, limits.max_tokens)  # 0: score the prompt
        if isinstance(max_tokens, float) and max_tokens.is_integer():
            max_tokens = int(max_tokens)
        if not isinstance(max_tokens, int):
            raise RequestError(400, f"'{limit_key}' must be a whole number, got {max_tokens!r}", param=limit_key)
        n, best_of = choice_counts(body, chat)
        temperature = number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = number(body, "top_p", 1.0, 0.0, 1.0)
        min_p = number(body, "min_p", 0.0, 0.0, 1.0)  # vLLM's (`sampling.sampling_probs`); was ignored
        top_k = top_k_of(body)  # vLLM's too: it was ignored the same way
        penalties = sampling_penalties(body, ft.tokenizer.vocab_size)
        settings = {"temperature": temperature, "top_p": top_p, "min_p": min_p, "top_k": top_k, "penalties": penalties}
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise RequestError(400, f"'seed' must be an integer in [0, 2**63), got {seed!r}", param="seed")
        stop = [ft.tokenizer.in_unicode_form(s) for s in stop_strings(body)]  # (NFKC: stop_strings)
        stream, include_usage = stream_options(body)
        if stream and best_of > n:
            raise RequestError(400, "'best_of' picks among whole completions, so it cannot stream", param="best_of")
        for key, neutral in UNSUPPORTED.items():  # accepted and ignored, they would silently change nothing
            if body.get(key) not in neutral:
                raise RequestError(400, f"'{key}' is not supported by lmforge serve; leave it out", param=key)
        prompts = self._prompts(body, chat)
        if len(prompts) * best_of > limits.max_prompts:  # each choice (or best_of draw) is a generation of its own
            what = "'best_of'" if best_of > n else "'n'"
            message = (
                f"{len(prompts)} prompt(s) x {what} {best_of} = {len(prompts) * best_of} generations; this server "
                f"makes at most {limits.max_prompts} per request (--max-prompts): ask for fewer"
            )
            raise RequestError(400, message, param="best_of" if best_of > n else "n")
        context = context_length(ft.model)  # a recurrent model's has no limit
        budgets = []
        for i, ids in enumerate(prompts):
            # no max_tokens given: whatever the context leaves, up to the default
            budget = max_tokens if asked else max(min(1, max_tokens), min(max_tokens, context - len(ids)))
            if len(ids) + budget > context:
                what = "the messages are" if chat else "the prompt is" if len(prompts) == 1 else f"'prompt[{i}]' is"
                it = "them" if chat else "it"
                # (without max_tokens, only a prompt that fills the context: the budget takes what it leaves)
                flag = f"'{limit_key}'" if asked else ""
                message = prompt_too_long(what, len(ids), context, max_new_tokens=budget, flag=flag, it=it)
                raise RequestError(400, message, "context_length_exceeded", param="messages" if chat else "prompt")
            budgets.append(budget)

        kind = "chat.completion" if chat else "text_completion"  # streamed: "chat.completion.chunk", "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())

        def chunk(
            index: int, piece: str, finish_reason: str | None, first: int | None = None, scores: Any = None
        ) -> dict[str, Any]:
            if chat:
                if first is not None:  # as OpenAI's first chunk: {"role": "assistant", "content": ""}
                    delta = {"role": "assistant", "content": piece}
                else:  # a piece of the reply, or {} in the last chunk (its finish_reason)
                    delta = {"content": piece} if piece else {}
                choice = {"index": index, "delta": delta, "logprobs": scores, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": piece, "logprobs": scores, "finish_reason": finish_reason}
            out = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created}
            out |= {"model": self.server.model_name, "choices": [choice]}
            return out | ({"usage": None} if include_usage else {})  # OpenAI: null on all but the usage chunk

        def send_piece(index: int, scores: StreamedLogprobs | None, piece: str, steps: list) -> None:
            """A chunk of a streamed choice: its text, and with logprobs those of its tokens (`steps`)."""
            numbers = scores.chunk(steps) if scores is not None else None
            if piece or numbers is not None:
                self._event(chunk(index, piece, None, scores=numbers))

        if stream:
            self._start_stream()
            if chat:  # the assistant's role comes first, as from OpenAI; completions start with text
                for index in range(n):
                    self._event(chunk(index, "", None, first=index))
        choices = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        raw = body.get("prompt") if not chat else None
        decode = functools.partial(ft.tokenizer.decode, skip_special_tokens=True)
        # choices in order: prompt i's n choices at i*n .. i*n + n-1, as OpenAI numbers them; with a seed,
        # choice j of each prompt samples with seed + j (n different samples, the same again on a repeat)
        for i, (ids, budget) in enumerate(zip(prompts, budgets, strict=True)):
            usage["prompt_tokens"] += len(ids)  # (counted once per prompt, as OpenAI counts it)
            # a completion's prompt string as sent (None: token ids, or chat)
            sent = raw if isinstance(raw, str) else raw[i] if isinstance(raw, list) else None
            sent = sent if isinstance(sent, str) else None
            # with echo the prompt's text first (`shown_prompt`: as sent, or the whole characters token ids decode
            # to), the completion's text going on after it
            shown, continued = shown_prompt(decode, ids, sent, echo)
            head = shown if echo else ""
            drawn = []
            for j in range(best_of):
                index = i * n + j
                sampling = settings | {"seed": None if seed is None else (seed + j) % 2**63}
                streamed = StreamedLogprobs(self.server, ids, top, chat, sent, echo) if stream and logprobs else None
                emit = functools.partial(send_piece, index, streamed) if stream else None
                scored = emit is not None and echo and logprobs  # (the prompt's logprobs, scored as unstreamed)
                echoed = choice_logprobs(self.server, ids, [], echo, top, chat, sent) if scored else None
                if emit is not None and (head or echoed):
                    self._event(chunk(index, head, None, scores=echoed))
                text, finish, new, generated = self._generate(
                    ids, budget, sampling, stop, chat, emit, streamed, continued
                )
                usage["completion_tokens"] += generated  # (a stop string's tokens too: they were generated)
                if stream:
                    self._event(chunk(index, "", finish))
                    continue
                drawn.append((text, finish, new))
            if best_of > n:  # the n with the highest log-probability per token, best first (OpenAI's best_of)
                drawn = sorted(drawn, key=lambda d: -mean_logprob(self.server, ids, d[2]))[:n]
            for j, (text, finish, new) in enumerate(drawn):
                index = i * n + j
                scores = choice_logprobs(self.server, ids, new, echo, top, chat, sent) if logprobs else None
                if chat:
                    message = {"role": "assistant", "content": text}
                    choices.append({"index": index, "message": message, "logprobs": scores, "finish_reason": finish})
                else:
                    choices.append({"index": index, "text": head + text, "logprobs": scores, "finish_reason": finish})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if stream:
            if include_usage:  # one more chunk, with no choices, as OpenAI sends it
                self._event(chunk(0, "", None) | {"choices": [], "usage": usage})
            self._write_stream(b"data: [DONE]\n\n")
            self._end_stream()
            return
        reply = {"id": rid, "object": kind, "created": created, "model": self.server.model_name, "choices": choices}
        self._send_json(200, reply | {"usage": usage})

    def _generate(
        self,
        ids: list[int],
        max_tokens: int,
        sampling: dict[str, Any],
        stop: list[str],
        chat: bool,
        emit: Callable[[str, list], None] | None,
        scores: StreamedLogprobs | None = None,
        continued: Callable[[list[int]], str] | None = None,
    ) -> tuple[str, str, list[int], int]:
        """One choice: (its text, finish_reason, the ids of that text, how many ids were generated). The ids
        leave out the tokens of a stop string that ended it (the text does), so its `logprobs` describe the
        text returned: vLLM's and OpenAI's list tokens past the text's end, and summing them scored text the
        client never got. With `emit` (streaming), its text is passed on as soon as no stop string can still
        cut it, with (`scores`: logprobs asked for) the `StreamedLogprobs.step`s of the tokens that begin in it.

        Streaming, the model runs on a worker thread under the model lock and hands the text over a queue to
        this (the connection's) thread, which writes it. A client that stops reading then stalls only its own
        writes (until `idle_timeout_s`), never the lock every other request waits for: writing under the lock,
        one such client held up all the others. A client that leaves stops its generation at the next token."""
        if max_tokens == 0:  # `echo` with max_tokens 0: the prompt is only scored
            return "", "length", [], 0
        if emit is None:
            return self._generate_locked(
                ids, max_tokens, sampling, stop, chat, None, self._client_left, None, continued
            )
        pieces: queue.SimpleQueue[tuple[str, list] | None] = queue.SimpleQueue()  # None: the generation is over
        client_gone = threading.Event()
        outcome: list[Any] = []  # the result, or the exception to raise here

        def work() -> None:
            try:
                outcome.append(
                    self._generate_locked(
                        ids,
                        max_tokens,
                        sampling,
                        stop,
                        chat,
                        lambda *piece: pieces.put(piece),
                        client_gone.is_set,
                        scores,
                        continued,
                    )
                )
            except BaseException as e:  # noqa: BLE001 - raised again on the connection's thread
                outcome.append(e)
            finally:
                pieces.put(None)

        threading.Thread(target=work, name="lmforge-generate", daemon=True).start()
        try:
            while (piece := pieces.get()) is not None:
                emit(*piece)
        except BaseException:
            client_gone.set()
            raise
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _generate_locked(
        self,
        ids: list[int],
        max_tokens: int,
        sampling: dict[str, Any],
        stop: list[str],
        chat: bool,
        emit: Callable[[str, list], None] | None = None,
        client_left: Callable[[], bool] | None = None,
        scores: StreamedLogprobs | None = None,
        continued: Callable[[list[int]], str] | None = None,
    ) -> tuple[str, str, list[int], int]:
        """`_generate` under the model lock, on the calling thread; `emit` must not block (no socket writes).
        `continued`: a completion's text after its prompt's (`shown_prompt`; None: `continuation_decoder`'s).

        `client_left` is asked before the generation and after each token: streamed, whether the connection's
        thread failed to write (the generation then just ends); not streamed, whether the client closed its
        socket (`_ClientLeft`, no reply: nobody reads it). A reply that is not streamed is written only at
        the end, so without this a client that gave up (a timeout, Ctrl-C on curl) held the model for every
        token it had asked for, with every other request waiting behind it."""
        from lmforge.detokenize import StopStrings, StreamDecoder, continuation_decoder
        from lmforge.generate import generate
        from lmforge.serve_logprobs import TextOffsets

        ft = self.server.ft
        plain = functools.partial(ft.tokenizer.decode, skip_special_tokens=True)
        # completions continue text
        continued = continued or continuation_decoder(plain, ids)
        decoder = StreamDecoder(plain, ft.tokenizer) if chat else StreamDecoder(continued, ft.tokenizer, ids)
        cut = StopStrings(stop)  # the text, ended before a stop string; what is safe to stream
        finish = "length"
        # where each token's text begins (only stop strings need it): a token that begins past the text's end (in
        # the stop string) is not the text's; with `scores`, one that begins in held-back text waits with it
        offsets = TextOffsets(decoder.decode) if stop else None
        starts: list[int] = []
        steps: list = []  # with `scores`: (start, logprobs) of the tokens not emitted yet (they go with a piece)
        logits_of_step: list = []

        def steps_before(end: int) -> list:
            """The logprobs of the tokens not emitted yet that begin before character `end`, taken out."""
            ready = [step for start, step in steps if start < end]
            steps[:] = [(start, step) for start, step in steps if start >= end]
            return ready

        def on_token(t: int) -> None:
            nonlocal finish
            if self.server.stopping:
                raise _ServerStopping
            if client_left is not None and client_left():
                raise _StopGeneration if emit is not None else _ClientLeft
            if t in self.server.stops:  # (the last token: no stop string can follow it)
                if scores is not None:
                    steps.append((-1, scores.step(logits_of_step.pop(), t)))
                finish = "stop"
                return
            if offsets is not None:
                starts.append(offsets.feed([t])[0])
            if scores is not None:
                steps.append((starts[-1] if offsets is not None else -1, scores.step(logits_of_step.pop(), t)))
            ready = cut.feed(decoder.feed(t))
            if cut.stopped:
                finish = "stop"
            if emit is not None and ready:
                emit(ready, steps_before(cut.sent))
            if cut.stopped:
                raise _StopGeneration

        with self.server.lock:
            if emit is None and client_left is not None and client_left():  # left while it waited for the lock
                raise _ClientLeft
            try:
                new = generate(
                    ft.model,
                    ids,
                    max_new_tokens=max_tokens,
                    **sampling,
                    use_cache=ft.use_cache,
                    eos_id=ft.tokenizer.eos_id_or_none,
                    stop_ids=self.server.stops,
                    on_token=on_token,
                    compile=self.server.compile,
                    vocab_size=ft.tokenizer.vocab_size,
                    on_logits=logits_of_step.append if scores is not None else None,
                )
                if finish != "stop":
                    cut.feed(decoder.flush())
            except _StopGeneration:
                new = decoder.ids
            except LmforgeError as e:
                raise RequestError(400, str(e)) from None
        generated = len(new)
        if cut.stopped:  # the tokens that begin in the text (the one a stop string starts in, too)
            new = new[: sum(start < len(cut.text) for start in starts)]
        rest = cut.flush()  # (held back while it could still have become a stop string)
        steps[:] = [(start, step) for start, step in steps if not cut.stopped or start < len(cut.text)]
        if emit is not None and (rest or steps):
            emit(rest, steps_before(math.inf))
        return cut.text, finish, new, generated
