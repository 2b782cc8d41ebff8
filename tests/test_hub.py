"""`hf:ORG/NAME` models (export/hub.py), read through huggingface_hub's real cache with HF_HUB_OFFLINE=1:
the folder layout `snapshot_download` fills in (`models--ORG--NAME/refs/main` naming a snapshot), built
here from a model transformers saved. There is no network here; the download itself is that library's."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmforge.export.hf_import import import_hf
from lmforge.tokenizer.train import train_bpe
from lmforge.trained import load_trained
from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")


def _saved_gpt2(folder: Path, *, pickled: bool = False) -> Path:
    """A small random HF GPT-2 with its tokenizer, as `save_pretrained` writes it (or as an older repo: .bin)."""
    texts = ["The quick brown fox jumps over the lazy dog.", "你好，世界。", "Some more words to learn."] * 20
    tok = train_bpe(texts, vocab_size=300)
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    if pickled:
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    (folder / "flax_model.msgpack").write_bytes(b"not read")  # what the hub repos hold besides
    return folder


def _cache(root: Path, repo: str, source: Path, revision: str = "main") -> Path:
    """huggingface_hub's cache holding `source` as `repo`'s snapshot at `revision`."""
    cache = root / "hub-cache"
    entry = cache / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, snapshot)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / revision).write_text(snapshot.name)
    return cache


def _offline(cache: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "pytorch_model.bin"])
def test_import_of_a_hub_name_equals_the_import_of_its_folder(pickled: bool, tmp_path: Path) -> None:
    local = _saved_gpt2(tmp_path / "local", pickled=pickled)
    cache = _cache(tmp_path, "some-org/tiny-gpt2", local)
    result = run_cli("import", "hf:some-org/tiny-gpt2", "--out", str(tmp_path / "from-hub"), env=_offline(cache))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'from-hub'}"
    import_hf(local, tmp_path / "from-folder")
    a = load_trained(tmp_path / "from-hub", torch.device("cpu")).model.state_dict()
    b = load_trained(tmp_path / "from-folder", torch.device("cpu")).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if pickled:
        return

    # a revision names its own ref; one the cache lacks is a one-line error that says what to do
    cache = _cache(tmp_path / "other", "some-org/tiny-gpt2", local, revision="v1")
    assert (
        run_cli("import", "hf:some-org/tiny-gpt2@v1", "--out", str(tmp_path / "v1"), env=_offline(cache)).returncode
        == 0
    )
    for spec, needle in [
        ("hf:some-org/tiny-gpt2@v2", "cannot get hf:some-org/tiny-gpt2@v2 from the Hugging Face Hub"),
        ("hf:some-org/absent", " download some-org/absent --local-dir DIR"),
        ("hf:not a/name", "is not a Hugging Face model name; write hf:ORG/NAME"),
        ("hf:org/name@", "is not a Hugging Face model name"),
    ]:
        result = run_cli("import", spec, "--out", str(tmp_path / "x"), env=_offline(cache))
        assert result.returncode == 2 and needle in result.stderr, (spec, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    # an --out that exists is refused before anything is fetched
    result = run_cli("import", "hf:some-org/absent", "--out", str(tmp_path / "v1"), env=_offline(cache))
    assert result.returncode == 2 and "already exists" in result.stderr, result.stderr


def test_finetune_from_a_hub_name_resumes_without_the_hub(tmp_path: Path) -> None:
    """The base is imported into RUN/base once: a re-run (resume, or nothing to do) needs no hub, no cache."""
    cache = _cache(tmp_path, "some-org/tiny-gpt2", _saved_gpt2(tmp_path / "local"))
    rows = [{"text": f"The quick brown fox {i} jumps over the lazy dog."} for i in range(40)]
    data = tmp_path / "clm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = ["finetune", "hf:some-org/tiny-gpt2", "--task", "clm", "--train", str(data), "--out", str(tmp_path / "ft")]
    args += ["--train.max_steps", "3", "--train.batch_size", "4", "--max-len", "32"]
    first = run_cli(*args, env=_offline(cache))
    assert first.returncode == 0, first.stderr
    info = json.loads((tmp_path / "ft" / "finetune.json").read_text(encoding="utf-8"))
    assert info["base_arg"] == "hf:some-org/tiny-gpt2" and (tmp_path / "ft" / "base" / "config.json").is_file()
    shutil.rmtree(cache)
    again = run_cli(*args, env=_offline(cache))
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr


def test_a_failed_download_names_commands_that_exist(tmp_path: Path) -> None:
    """The message told users to run 'huggingface-cli download', a command huggingface_hub 1.0 removed (the
    version transformers 5 installs has only `hf`): the commands it names are ones this environment has (the
    login command comes with an answer from the Hub: here a local stand-in's 404)."""
    import re
    import sys

    with _LocalHub(answer=True) as hub:
        result = run_cli("import", "hf:some-org/absent", "--out", str(tmp_path / "x"), env=hub.env(tmp_path / "hf"))
    assert result.returncode == 2, result.stderr
    login, download = re.search(
        r"needs '([^']+)'\), or download it .* \('([^']+) some-org/absent", result.stderr
    ).groups()
    for command in (login, download):
        assert shutil.which(command.split()[0], path=str(Path(sys.executable).parent)), (command, result.stderr)


class _LocalHub:
    """A local stand-in for the Hub's address (HF_ENDPOINT; there is no network here): it records the first line
    of each request and answers 404 (`answer`: an unknown repository) or never (a Hub behind a firewall or proxy
    that accepts the connection and then hangs, where huggingface_hub's first request, without a timeout, hung).
    `info`: it answers a repository's info (/api/...: the check before a download), and for a model its file list
    (config.json) and that file's HEAD, then sends the first bytes of the file and stalls; a dataset's files it
    never answers (a Hub that stalls after the check: in a download, or before one)."""

    def __init__(self, *, answer: bool, info: bool = False) -> None:
        import socket
        import threading

        self.answer, self.info, self.requests, self._open = answer, info, [], []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            self._open.append(conn)
            self.requests.append(conn.recv(65536).split(b"\r\n", 1)[0].decode("latin-1"))
            method, path = self.requests[-1].split()[:2]
            sha, model = "0" * 40, not path.startswith(("/datasets/", "/api/datasets/"))
            size, headers = 100, "Connection: close\r\n"
            if self.info and path.startswith("/api/") and "/tree/" not in path:
                repo = path.split("/", 3)[3].split("/revision/")[0]
                self._send(conn, headers, json.dumps({"id": repo, "sha": sha, "siblings": []}).encode())
            elif self.info and model and "/tree/" in path:
                listing = [{"type": "file", "path": "config.json", "size": size, "oid": "1" * 40}]
                self._send(conn, headers, json.dumps(listing).encode())
            elif self.info and model and method == "HEAD":
                headers += f'X-Repo-Commit: {sha}\r\nETag: "{"1" * 40}"\r\nContent-Length: {size}\r\n'
                conn.sendall(f"HTTP/1.1 200 OK\r\n{headers}\r\n".encode())
            elif self.info and model:  # the file: its first bytes, then nothing
                conn.sendall(f"HTTP/1.1 200 OK\r\n{headers}Content-Length: {size}\r\n\r\n{{".encode())
            elif self.answer:
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                conn.close()

    @staticmethod
    def _send(conn: object, headers: str, body: bytes) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        conn.close()

    def env(self, hf_home: Path, **extra: str) -> dict[str, str]:
        port = self._server.getsockname()[1]
        cache = str(hf_home / "hub")
        return {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(hf_home), "HF_HUB_CACHE": cache,
                "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", **extra}  # fmt: skip

    def __enter__(self) -> _LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()
        for conn in self._open:
            conn.close()


def test_an_unreachable_hub_is_a_one_line_error_within_seconds(tmp_path: Path) -> None:
    """A Hub that cannot be reached and a model not in the cache: `lmforge import hf:...` hung (huggingface_hub's
    first request has no timeout; a failing connection took ~37 s of retries). It is now one line that says what to
    do, once the Hub has had `HUB_TIMEOUT_S` (5 s; here LMFORGE_HUB_TIMEOUT 0.5 s, which the message names) to
    answer; the time beyond a call that needs no Hub at all (HF_HUB_OFFLINE, which also imports huggingface_hub) is
    under 10 s (measured 4.5 s with the 5 s limit)."""
    import time

    args = ["import", "hf:some-org/tiny-gpt2", "--out", str(tmp_path / "x")]

    def timed(**extra: str) -> tuple[subprocess.CompletedProcess, float]:
        start = time.monotonic()
        env = hub.env(tmp_path / "hf", LMFORGE_HUB_TIMEOUT="0.5", **extra)
        return run_cli(*args, env=env, timeout=120), time.monotonic() - start

    with _LocalHub(answer=False) as hub:
        timed(HF_HUB_OFFLINE="1")  # (the first call of a test session starts tests/cli_fork.py's zygote)
        result, seconds = timed()
        offline, baseline = timed(HF_HUB_OFFLINE="1")
    waited = seconds - baseline
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set and the local Hugging Face cache" in offline.stderr
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "the Hugging Face Hub cannot be reached" in result.stderr and "does not hold it" in result.stderr
    assert "lmforge waits 0.5 s for it" in result.stderr, result.stderr
    assert "download some-org/tiny-gpt2 --local-dir DIR') and pass DIR" in result.stderr
    assert any("/api/models/some-org/tiny-gpt2" in r for r in hub.requests), hub.requests  # (it did ask)
    assert waited < 10, (waited, baseline)
    assert not (tmp_path / "x").exists()


def test_the_hub_time_limit_is_5_s_unless_lmforge_hub_timeout_says(monkeypatch, tmp_path: Path) -> None:
    """LMFORGE_HUB_TIMEOUT sets the seconds the Hub gets (a slow link; the tests above, 0.5 s); a value that is not a
    number of seconds > 0 is one line that says what to write, before any request."""
    from lmforge.errors import CheckpointError, DataError
    from lmforge.export.hub import hub_timeout_s

    monkeypatch.delenv("LMFORGE_HUB_TIMEOUT", raising=False)
    assert hub_timeout_s() == 5.0
    monkeypatch.setenv("LMFORGE_HUB_TIMEOUT", " 12.5 ")
    assert hub_timeout_s() == 12.5
    for bad in ("abc", "0", "-1", "inf", "nan"):
        monkeypatch.setenv("LMFORGE_HUB_TIMEOUT", bad)
        with pytest.raises(CheckpointError, match=r"LMFORGE_HUB_TIMEOUT=.* is not a number of seconds > 0; set it"):
            hub_timeout_s()
        with pytest.raises(DataError, match="LMFORGE_HUB_TIMEOUT"):
            hub_timeout_s(DataError)
    # LMFORGE_HUB_STALL_SECONDS is read by the same rule (a bad value silently meant 30 s), before the block runs
    from lmforge.export.hub import stall_limit

    monkeypatch.setenv("LMFORGE_HUB_STALL_SECONDS", "-3")
    with pytest.raises(DataError, match=r"LMFORGE_HUB_STALL_SECONDS='-3' is not a number of seconds > 0"):
        with stall_limit("hf:x", "download it", DataError):
            raise AssertionError("not reached: the bad value is refused on entry")
    with _LocalHub(answer=False) as hub:
        env = hub.env(tmp_path / "hf", LMFORGE_HUB_TIMEOUT="soon")
        result = run_cli("import", "hf:some-org/tiny-gpt2", "--out", str(tmp_path / "x"), env=env, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "LMFORGE_HUB_TIMEOUT='soon' is not a number of seconds > 0" in result.stderr and not hub.requests


def test_a_cached_model_loads_without_asking_the_hub(tmp_path: Path) -> None:
    """With HF_HUB_OFFLINE unset, a model already in the cache was fetched again through the Hub first (a Hub that
    does not answer: a hang); the cache is read first now, and the Hub is not asked for the model at all."""
    cache = _cache(tmp_path, "some-org/tiny-gpt2", _saved_gpt2(tmp_path / "local"))
    with _LocalHub(answer=False) as hub:
        env = hub.env(tmp_path / "hf", HF_HUB_CACHE=str(cache))
        result = run_cli("import", "hf:some-org/tiny-gpt2", "--out", str(tmp_path / "run"), env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not any("/api/models/" in r for r in hub.requests), hub.requests
    a = load_trained(tmp_path / "run", torch.device("cpu")).model.state_dict()
    import_hf(tmp_path / "local", tmp_path / "from-folder")
    b = load_trained(tmp_path / "from-folder", torch.device("cpu")).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unreachable_hub_fails_a_hub_dataset_in_one_line_within_seconds(tmp_path: Path) -> None:
    """`prepare hf:NAME` (a hub dataset, `data/columnar.py`) kept datasets' own path without network: a Hub that
    accepts the connection and never answers hung it for good. It follows the models' rule now (`check_hub`): one
    request with a 5 s limit (here LMFORGE_HUB_TIMEOUT 0.5 s), then one line that says what to do; HF_HUB_OFFLINE
    asks nothing at all."""
    import time

    pytest.importorskip("datasets")
    args = ["prepare", "hf:some-org/tiny-data", "--out", str(tmp_path / "x")]
    with _LocalHub(answer=False) as hub:
        offline = run_cli(*args, env=hub.env(tmp_path / "hf", HF_HUB_OFFLINE="1"), timeout=60)
        asked_offline = list(hub.requests)
        start = time.monotonic()
        result = run_cli(*args, env=hub.env(tmp_path / "hf", LMFORGE_HUB_TIMEOUT="0.5"), timeout=60)
        seconds = time.monotonic() - start
    assert offline.returncode == 2 and len(offline.stderr.strip().splitlines()) == 1, offline.stderr
    assert "HF_HUB_OFFLINE is set and the local Hugging Face cache" in offline.stderr and not asked_offline
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "the Hugging Face Hub cannot be reached" in result.stderr and "waits 0.5 s" in result.stderr, result.stderr
    assert "download some-org/tiny-data --repo-type dataset --local-dir DIR') and pass DIR" in result.stderr
    assert hub.requests == ["GET /api/datasets/some-org/tiny-data HTTP/1.1"], hub.requests
    assert seconds < 30 and not (tmp_path / "x").exists()


def test_a_hub_that_stalls_after_the_check_is_a_one_line_error_within_seconds(tmp_path: Path) -> None:
    """A Hub that answers the 5 s check and then sends nothing: `prepare hf:NAME` hung in datasets' own requests
    (limits of 10 to 100 s, each retried up to 5 times: still waiting on README.md's HEAD after 4 minutes,
    measured), `import hf:...` in huggingface_hub's. The first request without a byte for HUB_STALL_S (here 1 s)
    now ends the read with one line that says what to do; the later ones are not sent, nor retried."""
    import time

    pytest.importorskip("datasets")
    runs = {
        "dataset": ["prepare", "hf:some-org/tiny-data", "--out", str(tmp_path / "x")],
        "model": ["import", "hf:some-org/tiny-gpt2", "--out", str(tmp_path / "x")],
    }
    for kind, args in runs.items():
        with _LocalHub(answer=False, info=True) as hub:
            start = time.monotonic()
            result = run_cli(*args, env=hub.env(tmp_path / kind, LMFORGE_HUB_STALL_SECONDS="1"), timeout=120)
            seconds = time.monotonic() - start
        lines = result.stderr.strip().splitlines()  # (a model's download had huggingface_hub's "Fetching" bar first)
        assert result.returncode == 2 and len(lines) == 1, lines
        name = args[1].removeprefix("hf:")
        assert f"cannot get hf:{name}: the Hugging Face Hub answered, then sent nothing for 1 s" in result.stderr
        repo_type = " --repo-type dataset" if kind == "dataset" else ""
        assert f"download {name}{repo_type} --local-dir DIR') and pass DIR" in result.stderr, result.stderr
        stalled = "HEAD /datasets/some-org/tiny-data/" if kind == "dataset" else "GET /some-org/tiny-gpt2/resolve/"
        assert [r for r in hub.requests if r.startswith(stalled)] == hub.requests[-1:], (kind, hub.requests)
        assert seconds < 30 and not (tmp_path / "x").exists(), (kind, seconds)


def _screen(output: str, rows: int = 24) -> list[str]:
    """The lines a terminal shows after `output` (text, carriage returns, line feeds, cursor up: what tqdm writes),
    without their trailing spaces and the blank ones."""
    import re

    screen, row, col = [""] * rows, 0, 0
    for piece in re.split(r"(\r|\n|\x1b\[A)", output):
        if piece == "\r":
            col = 0
        elif piece == "\n":
            row += 1
        elif piece == "\x1b[A":
            row = max(row - 1, 0)
        elif piece:
            line = screen[row].ljust(col)
            screen[row], col = line[:col] + piece + line[col + len(piece) :], col + len(piece)
    return [line.rstrip() for line in screen if line.strip()]


def test_a_failed_download_leaves_one_line_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, a download that stalled left huggingface_hub's "Fetching 1 files" bar above lmforge's error
    and its "Downloading bytes" and "Reconstructing" bars below it (printed as the process ended): four lines. Its
    bars are cleared now when the download ends, so the screen shows the error line alone."""
    import fcntl
    import os
    import pty
    import struct
    import sys
    import termios

    with _LocalHub(answer=False, info=True) as hub:
        env = {**os.environ, **hub.env(tmp_path / "hf", LMFORGE_HUB_STALL_SECONDS="1")}
        main, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # (a 0-wide one draws no bar)
        args = [sys.executable, "-m", "lmforge", "import", "hf:some-org/tiny-gpt2", "--out", str(tmp_path / "x")]
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env)
        os.close(terminal)
        output = b""
        while chunk := _read_terminal(main):
            output += chunk
        os.close(main)
        assert process.wait(timeout=120) == 2, output
    assert "cannot get hf:some-org/tiny-gpt2: the Hugging Face Hub answered, then sent nothing for 1 s" in str(output)
    shown = _screen(output.decode())
    assert len(shown) == 1 and shown[0].startswith("lmforge: error: cannot get"), shown


def _read_terminal(fd: int) -> bytes:
    """The next output of a pseudo-terminal; b"" once every process writing to it has closed it (EIO on Linux)."""
    import os

    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def test_the_stall_limit_holds_only_inside_its_block(monkeypatch) -> None:
    """`stall_limit` changes huggingface_hub's shared session for the Hub reads lmforge makes (a download, a
    dataset's rows); after them the session is as it was: its requests' own timeouts, retried as the library
    retries them, and a stall inside the block is no reason for a later request outside to fail."""
    import huggingface_hub

    from lmforge.errors import CheckpointError
    from lmforge.export.hub import HubStalled, stall_limit

    monkeypatch.setenv("LMFORGE_HUB_STALL_SECONDS", "0.3")
    session = huggingface_hub.get_session()
    with _LocalHub(answer=False) as hub:
        url = hub.env(Path("unused"))["HF_ENDPOINT"] + "/api/models/some-org/x"
        with pytest.raises(CheckpointError, match=r"answered, then sent nothing for 0.3 s \(GET http"):
            with stall_limit("hf:some-org/x", "pass DIR"):
                # read once, as the block began (each request read it again: here, a refusal inside the request)
                monkeypatch.setenv("LMFORGE_HUB_STALL_SECONDS", "soon")
                session.get(url)  # (no timeout of its own: capped at 0.3 s)
        with pytest.raises(Exception) as outside:
            session.get(url, timeout=0.2)
    assert not isinstance(outside.value, HubStalled) and "Timeout" in type(outside.value).__name__, outside.value


def test_the_stall_limit_holds_for_a_requests_session_as_before_huggingface_hub_1(monkeypatch) -> None:
    """huggingface_hub before 1.0 (which transformers 4 requires) makes a requests session per thread, and the stall
    limit only wrapped 1.0's httpx client: there a download from a Hub that stalled took 65 s (its 10 s waits, resumed
    5 times, a warning line each; measured with huggingface_hub 0.36) where LMFORGE_HUB_STALL_SECONDS said 1. Such a
    session (`export.hub.limited_requests_session`, applied by the factory lmforge gives huggingface_hub) keeps the
    rule now: a request or a streamed body that gets no byte is a stall, one line, and nothing is sent after it."""
    import time

    import requests

    from lmforge.errors import CheckpointError
    from lmforge.export.hub import HubStalled, limited_requests_session, stall_limit

    monkeypatch.setenv("LMFORGE_HUB_STALL_SECONDS", "0.3")
    session = limited_requests_session(requests.Session())
    with _LocalHub(answer=False, info=True) as hub:
        endpoint = hub.env(Path("unused"))["HF_ENDPOINT"]
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=r"answered, then sent nothing for 0.3 s \(GET http.*/config.json\)"):
            with stall_limit("hf:some-org/x", "pass DIR"):
                response = session.get(f"{endpoint}/some-org/x/resolve/main/config.json", stream=True)
                b"".join(response.iter_content(10))  # (its first byte, then nothing)
        with pytest.raises(CheckpointError, match=r"0.3 s \(GET http.*/api/datasets/some-org/y/tree/main\)"):
            with stall_limit("hf:some-org/y", "pass DIR"):
                with pytest.raises(HubStalled):  # (as a library's handler may catch it, and go on)
                    session.get(f"{endpoint}/api/datasets/some-org/y/tree/main")  # (no answer: a stall)
                asked = len(hub.requests)
                with pytest.raises(HubStalled, match="not sent after a stall"):
                    session.get(f"{endpoint}/api/models/some-org/y")
                assert len(hub.requests) == asked
                raise RuntimeError("what the library made of it")
        assert time.monotonic() - start < 5
        with pytest.raises(requests.exceptions.Timeout) as outside:
            session.get(f"{endpoint}/api/datasets/some-org/w/tree/main", timeout=0.2)  # its own limit, as it was
    assert not isinstance(outside.value, HubStalled)
