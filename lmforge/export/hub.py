"""Models named on the Hugging Face Hub: `hf:ORG/NAME[@REVISION]` wherever a local HF directory is taken
(`lmforge import`, `finetune`'s BASE, `--teacher`), as `prepare` takes `hf:NAME` for hub datasets.

`hub_model_dir(spec)` downloads what import reads, and nothing else, with `huggingface_hub.snapshot_download`
(into its cache, `HF_HOME` / `HF_HUB_CACHE`; a second use reads the cache, and `HF_HUB_OFFLINE=1` uses the
cache alone), and returns the snapshot folder, which is then imported like any local directory:
- config.json and generation_config.json;
- the weights as safetensors (single or sharded with their index); only a repository without them gets
  its `pytorch_model*.bin` (loaded with `weights_only=True`), so a repo that holds both (gpt2 also holds
  TensorFlow, Flax, ONNX and Rust copies) costs one download of the weights, not six;
- the tokenizer files of either kind (tokenizer.json; vocab.json + merges.txt; vocab.txt), its config,
  special tokens and chat template (`chat_template.jinja`).
A hub download needs `huggingface_hub` (which transformers installs: `pip install 'lmforge[hf]'`) and
the network; a gated model needs `hf auth login` (or `HF_TOKEN`) first. Every failure is one
line that says what to do, including the way around it: download elsewhere and pass the folder, with the
commands of the installed huggingface_hub (`hf`, or `huggingface-cli` before 0.34; 1.0 removed that name).

Without network it must fail fast: huggingface_hub asks the Hub before it looks in its cache, with no
timeout on that request (a Hub that accepts the connection and never answers, or a firewall that drops it,
hung `lmforge import hf:...` for good; an address answering 404 took 22 s of retries). So the cache comes first
(`local_files_only=True`: a model cached once, as `hf download` or an earlier import left it, loads with no
network and no request at all; `@REVISION` or `hf download` fetch a newer one), HF_HUB_OFFLINE stops there,
and only then is the Hub asked, once, with a `HUB_TIMEOUT_S` limit (LMFORGE_HUB_TIMEOUT overrides it), before
the download.

A Hub that answers that check and then stalls is the same hang one step later: huggingface_hub and `datasets`
give their own requests limits of 10 to 100 s and retry a timed-out one up to 5 times (measured: `prepare
hf:NAME` against a stand-in Hub that answered the check and then nothing was still waiting after minutes, on
README.md's HEAD). So after the check, within `stall_limit` (the download, the dataset's read), every wait of
huggingface_hub's sessions' requests is capped at `HUB_STALL_S` (LMFORGE_HUB_STALL_SECONDS, read once per block; no
byte for that long: a stall; a slow download that moves is no stall), the first stall fails every later request
at once (`HubStalled`, which nothing retries), and whatever error reaches the block is then said as that stall, in
one line. Both kinds of session keep it: huggingface_hub 1.0's shared httpx client, and an older one's requests
session per thread (what transformers 4 installs).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import CheckpointError, LmforgeError, first_line

PREFIX = "hf:"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # NAME or ORG/NAME, as the hub allows
_COMMON = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",  # read by nothing, but import then says what to do about it
    "chat_template.jinja",
]
_SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
_PICKLED = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


def is_hub_spec(source: str | Path) -> bool:
    return str(source).startswith(PREFIX)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """`hf:ORG/NAME[@REVISION]` -> (repo id, revision or None)."""
    name = spec.removeprefix(PREFIX)
    repo, at, revision = name.partition("@")
    if not _REPO_ID.fullmatch(repo) or (at and not revision):
        raise CheckpointError(
            f"{spec!r} is not a Hugging Face model name; write hf:ORG/NAME (e.g. hf:Qwen/Qwen2.5-0.5B), "
            "optionally @REVISION (a branch, tag or commit)"
        )
    return repo, revision or None


HUB_TIMEOUT_S = 5.0  # the Hub's first answer (model info, a few kB): ~0.3 s on a working connection
# the longest wait for the Hub's next byte once it has answered (huggingface_hub's own download limit is 10 s,
# datasets waits up to 100 s for a dataset's info); $LMFORGE_HUB_STALL_SECONDS overrides it
HUB_STALL_S = 30.0


def hub_timeout_s(error: type[LmforgeError] = CheckpointError) -> float:
    """Seconds the Hub gets to answer: LMFORGE_HUB_TIMEOUT when set (a slow link; the tests' stand-in Hub that never
    answers), else `HUB_TIMEOUT_S`."""
    return _env_seconds("LMFORGE_HUB_TIMEOUT", HUB_TIMEOUT_S, error)


def _env_seconds(name: str, default: float, error: type[LmforgeError]) -> float:
    """Environment variable `name` as seconds > 0, `default` when unset; anything else is one line (`error`)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise error(f"{name}={text!r} is not a number of seconds > 0; set it to e.g. 10, or unset it")
    return seconds


def hub_model_dir(spec: str) -> Path:
    """The local snapshot folder of hub model `spec` (`hf:ORG/NAME[@REVISION]`): the one in the local Hugging Face
    cache, else downloaded, once the Hub has answered within `HUB_TIMEOUT_S`.

    Raises:
        CheckpointError: a malformed name, no huggingface_hub, HF_HUB_OFFLINE set and nothing cached, the Hub
            unreachable, or the download failed (unknown or gated repository); one line with what to do.
    """
    repo, revision = parse_hub_spec(spec)
    try:
        import huggingface_hub  # noqa: F401 - (checked here, used below)
    except ImportError:
        raise CheckpointError(
            f"loading {spec} from the Hugging Face Hub needs huggingface_hub: pip install 'lmforge[hf]' "
            "(or download the model elsewhere and pass its folder)"
        ) from None
    cached = _cached_snapshot(repo, revision)
    if cached is not None:
        return cached
    login, elsewhere = check_hub(spec, repo, revision, offline=None)
    try:
        with stall_limit(spec, elsewhere), download_bars() as bars:
            folder = _snapshot(repo, revision, bars=bars)
    except LmforgeError:  # (a stall)
        raise
    except Exception as e:  # noqa: BLE001 - network, 401/404: huggingface_hub raises many types
        raise _download_failed(spec, e, login, elsewhere) from None
    return folder


def check_hub(
    spec: str,
    repo: str,
    revision: str | None,
    *,
    offline: bool | None,
    repo_type: str = "model",
    error: type[LmforgeError] = CheckpointError,
) -> tuple[str, str]:
    """The rule before the Hub is used for `spec` (a model here, a dataset in `data/columnar.py`), once the local
    cache has not held it: HF_HUB_OFFLINE (`offline`; None: huggingface_hub's own setting) stops here, and the Hub
    is asked once, with a `hub_timeout_s()` limit; each failure is one line (`error`) with what to do.
    Returns the (login, download elsewhere) advice for a later failure."""
    from huggingface_hub import HfApi, constants

    login, download = hub_commands()
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    elsewhere = f"download it where there is network ('{download} {repo}{kind} --local-dir DIR') and pass DIR"
    where = f"the local Hugging Face cache {constants.HF_HUB_CACHE}"
    if offline is None:
        offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)()
    if offline:
        raise error(
            f"cannot get {spec} from the Hugging Face Hub: HF_HUB_OFFLINE is set and {where} does not hold it; "
            f"unset HF_HUB_OFFLINE to download it, or {elsewhere}"
        )
    timeout = hub_timeout_s(error)
    try:  # one request with a time limit: huggingface_hub's own first request has none
        HfApi().repo_info(repo, revision=revision, repo_type=repo_type, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - requests/httpx connection errors and timeouts, 401/404: many types
        if not _is_http_error(e):
            raise error(
                f"cannot get {spec}: the Hugging Face Hub cannot be reached ({type(e).__name__}: {first_line(e)}; "
                f"lmforge waits {timeout:g} s for it) and {where} does not hold it; {elsewhere}"
            ) from None
        raise _download_failed(spec, e, login, elsewhere, error) from None
    return login, elsewhere


class HubStalled(Exception):
    """A Hub request that got no byte for `HUB_STALL_S`, or any request after one did. Not an httpx error, so
    huggingface_hub and `datasets` do not retry it."""


_stalls: list[str] = []  # the request that stalled (one is enough: every later request fails at once)
# the stall limit of each `stall_limit` block open, read once, as the outermost block began (its requests used to
# read LMFORGE_HUB_STALL_SECONDS again, each); none open: the session is as it was (transformers' own downloads)
_limits: list[float] = []


def hub_stall_seconds(error: type[LmforgeError] = CheckpointError) -> float:
    """The longest wait for the Hub's next byte: LMFORGE_HUB_STALL_SECONDS when set, else `HUB_STALL_S`."""
    return _env_seconds("LMFORGE_HUB_STALL_SECONDS", HUB_STALL_S, error)


@contextlib.contextmanager
def stall_limit(spec: str, elsewhere: str, error: type[LmforgeError] = CheckpointError) -> Iterator[None]:
    """Within: each wait of the requests of huggingface_hub's sessions (`get_session()`, which `datasets` uses too)
    is capped at `hub_stall_seconds()`, read once here, and the first stall ends them all (`HubStalled`); an error
    that leaves the block after one is said as the stall (`error`: one line, with `elsewhere`, the way around the
    Hub)."""
    # (a bad LMFORGE_HUB_STALL_SECONDS is one line here, not an error inside a request)
    seconds = _limits[0] if _limits else hub_stall_seconds(error)
    _limit_sessions()
    if not _limits:
        _stalls.clear()
    _limits.append(seconds)
    try:
        yield
    except Exception:
        if _stalls:  # (whatever the library made of it: HubStalled, or a fallback's own error)
            raise error(
                f"cannot get {spec}: the Hugging Face Hub answered, then sent nothing for {seconds:g} s "
                f"({_stalls[0]}); try again later, or {elsewhere}"
            ) from None
        raise
    finally:
        _limits.pop()
        if not _limits:
            _stalls.clear()


def _stalled(where: str, seconds: float) -> HubStalled:
    _stalls.append(where)
    return HubStalled(f"no byte for {seconds:g} s: {where}")


def _limit_sessions() -> None:
    """Make huggingface_hub's sessions keep `stall_limit`'s rule while one is open, once per process: from 1.0 its
    one shared httpx client (`_limit_httpx`); before, the requests session it makes for each thread
    (`_limit_requests`), where the rule was not kept (a stalled download took 65 s of its 10 s waits and 5 retries,
    with a warning line each, where LMFORGE_HUB_STALL_SECONDS said 1)."""
    import importlib

    import huggingface_hub

    session = huggingface_hub.get_session()
    library = type(session).__module__.split(".")[0]  # (httpx; httpx2 from huggingface_hub 2; requests before 1.0)
    if library == "requests":
        _limit_requests()
    elif hasattr(httpx := importlib.import_module(library), "SyncByteStream"):  # (else a session of the user's)
        _limit_httpx(session, httpx)


def _limit_httpx(session: Any, httpx: Any) -> None:
    send = session.send
    if getattr(send, "_lmforge_stall_limit", False):
        return

    class Watched(httpx.SyncByteStream):
        """A streamed body (a file download) whose read timeout is a stall too."""

        def __init__(self, inner: Any, where: str, seconds: float) -> None:
            self._inner, self._where, self._seconds = inner, where, seconds

        def __iter__(self) -> Iterator[bytes]:
            try:
                yield from self._inner
            except httpx.TimeoutException:
                raise _stalled(self._where, self._seconds) from None

        def close(self) -> None:
            self._inner.close()

    def capped_send(request: Any, kwargs: dict[str, Any], seconds: float, where: str) -> Any:
        timeouts = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            key: seconds if timeouts.get(key) is None else min(timeouts[key], seconds)
            for key in ("connect", "read", "write", "pool")
        }
        try:
            response = send(request, **kwargs)
        except httpx.TimeoutException:
            raise _stalled(where, seconds) from None
        if kwargs.get("stream"):  # (else its body has been read)
            response.stream = Watched(response.stream, where, seconds)
        return response

    session.send = _limited(send, capped_send)


def _limit_requests() -> None:
    """huggingface_hub before 1.0: each thread's requests session (a download's files come in threads) made by the
    factory `configure_http_backend` sets, wrapped by `limited_requests_session` (a user's own factory too)."""
    from huggingface_hub import configure_http_backend
    from huggingface_hub.utils import _http

    factory = getattr(_http, "_GLOBAL_BACKEND_FACTORY", None)  # (no public getter)
    if factory is None or getattr(factory, "_lmforge_stall_limit", False):
        return

    def limited_factory() -> Any:
        return limited_requests_session(factory())

    limited_factory._lmforge_stall_limit = True  # type: ignore[attr-defined]
    configure_http_backend(backend_factory=limited_factory)  # (and drops the sessions made before)


def limited_requests_session(session: Any) -> Any:
    """`session` (a `requests.Session`) keeping `stall_limit`'s rule while one is open: each wait capped (connect and
    read: a streamed body's reads too), a timeout is a stall (`HubStalled`, which huggingface_hub does not retry,
    where it resumed a download 5 times), and after one no request is sent."""
    import requests
    import urllib3

    send = session.send

    def capped_send(request: Any, kwargs: dict[str, Any], seconds: float, where: str) -> Any:
        given = kwargs.get("timeout")
        kwargs["timeout"] = tuple(
            seconds if t is None else min(t, seconds) for t in (given if isinstance(given, tuple) else (given, given))
        )
        try:
            response = send(request, **kwargs)
        except requests.exceptions.Timeout:
            raise _stalled(where, seconds) from None
        if kwargs.get("stream"):  # (else its body has been read)
            read = response.raw.read

            def watched_read(*args: Any, **kw: Any) -> Any:
                try:
                    return read(*args, **kw)
                except urllib3.exceptions.ReadTimeoutError:
                    raise _stalled(where, seconds) from None

            response.raw.read = watched_read
        return response

    session.send = _limited(send, capped_send)
    return session


def _limited(send: Any, capped_send: Any) -> Any:
    """A session's `send` that is as it was outside `stall_limit` blocks; within one, refuses to send after a stall
    and otherwise sends with `capped_send(request, kwargs, seconds, where)`, the library's own capping."""

    def limited_send(request: Any, **kwargs: Any) -> Any:
        if not _limits:
            return send(request, **kwargs)
        if _stalls:
            raise HubStalled(f"not sent after a stall: {request.method} {request.url}")
        return capped_send(request, kwargs, _limits[0], f"{request.method} {request.url}")

    limited_send._lmforge_stall_limit = True  # type: ignore[attr-defined]
    return limited_send


def _download_failed(
    spec: str, e: Exception, login: str, elsewhere: str, error: type[LmforgeError] = CheckpointError
) -> LmforgeError:
    return error(
        f"cannot get {spec} from the Hugging Face Hub ({type(e).__name__}: {first_line(e)}); check the name "
        f"and the network (a gated repository needs '{login}'), or {elsewhere}"
    )


def _is_http_error(e: Exception) -> bool:
    """Whether the Hub answered (an HTTP error status: unknown, private or gated repository), as opposed to a
    connection that failed or timed out."""
    from huggingface_hub.utils import HfHubHTTPError

    return isinstance(e, HfHubHTTPError)


def _snapshot(repo: str, revision: str | None, *, local_files_only: bool = False, bars: Any = None) -> Path:
    """The snapshot folder holding what import reads: the safetensors weights, or an older repository's pickles
    (`bars`: the progress bar class, `download_bars`; None: huggingface_hub's own)."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo, revision=revision, allow_patterns=_COMMON + _SAFETENSORS,
                                    local_files_only=local_files_only, tqdm_class=bars))  # fmt: skip
    if not any(folder.glob("*.safetensors")):  # an older repository: its PyTorch pickles instead
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=_COMMON + _PICKLED,
                                        local_files_only=local_files_only, tqdm_class=bars))  # fmt: skip
    return folder


@contextlib.contextmanager
def download_bars() -> Iterator[type]:
    """The progress bar class for a download lmforge makes: huggingface_hub's, off where stderr is no terminal
    (its "Fetching N files" bar ignores that, so a failed download wrote it above lmforge's one-line error, in a
    log or a pipe), and on a terminal cleared once it ends, with every bar still open at the end of the block
    (a failed download leaves its byte counters open): what stays on the screen is lmforge's own lines."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    opened: list[Any] = []
    terminal = sys.stderr is not None and sys.stderr.isatty()

    class Bar(hub_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if not terminal:
                kwargs["disable"] = True
            super().__init__(*args, **{**kwargs, "leave": False})
            opened.append(self)

    try:
        yield Bar
    finally:
        for bar in reversed(opened):  # (the first bar's close returns the cursor to the start of its line)
            bar.close()


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot of `repo` at `revision` when the cache holds its weights, without any request."""
    try:
        folder = _snapshot(repo, revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or cached in part (huggingface_hub's own error types)
        return None
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return folder if weights and (folder / "config.json").is_file() else None


def hub_commands() -> tuple[str, str]:
    """(login, download) commands of the installed huggingface_hub: its `hf` CLI from 0.34 on (1.0 removed
    `huggingface-cli`, which the message used to name), `huggingface-cli` before."""
    import huggingface_hub

    major, minor = (int(n) for n in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    return (
        ("hf auth login", "hf download")
        if (major, minor) >= (0, 34)
        else ("huggingface-cli login", "huggingface-cli download")
    )


def local_model_dir(source: str | Path) -> Path:
    """A local HF directory as given, or the snapshot folder of an `hf:` hub name."""
    return hub_model_dir(str(source)) if is_hub_spec(source) else Path(source)
