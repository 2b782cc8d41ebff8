"""`python -m lmforge ARGS` for the tests, without paying for `import torch` in every call.

Each call is still its own process, with its own arguments, environment, working directory, standard
streams and exit status. A zygote interpreter imports torch and lmforge's command line once; then, per
call, it forks a child that runs `python -m lmforge ARGS` as the interpreter would (`runpy`, as
`__main__`). On CI's 2-core machines `import torch` takes 1.5-2.6 s and the suite makes ~300 calls.

The zygote never runs a torch op, so no thread pool or device is set up before a fork. Tests that need
a fresh interpreter (signals during start-up, stdin encodings) start one themselves; LMFORGE_TEST_SPAWN=1
sends every call to a fresh interpreter too.
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# The zygote: imports what every call imports, then serves one request (a JSON line) at a time.
ZYGOTE = r"""
import io, json, os, runpy, sys
import torch  # noqa: F401
import lmforge.cli
lmforge.cli.build_parser()  # the config dataclasses, models, objectives, prepare
import lmforge.checkpoint, lmforge.finetune, lmforge.generate, lmforge.quickstart, lmforge.train.run  # noqa: E401
import safetensors.torch, tokenizers  # noqa: E401,F401  (not transformers or huggingface_hub: they read env at import)

def run(req):
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    streams = ((0, req["stdin"], os.O_RDONLY), (1, req["stdout"], os.O_WRONLY), (2, req["stderr"], os.O_WRONLY))
    for fd, path, flags in streams:
        new = os.open(path, flags)
        os.dup2(new, fd)
        os.close(new)
    # a fresh sys.stdin, as an interpreter starts with (chat reconfigures it; the zygote's has been read)
    raw = open(0, "rb", closefd=False)
    fresh = io.TextIOWrapper(raw, encoding=requests.encoding, errors=requests.errors, newline="\n")
    sys.stdin = sys.__stdin__ = fresh
    sys.argv = [req["argv0"], *req["argv"]]
    runpy.run_module("lmforge", run_name="__main__", alter_sys=True)

requests = sys.stdin  # (kept: a dropped sys.stdin would close fd 0)
channel = os.fdopen(os.dup(1), "w")  # replies; fds 0 and 1 become each child's stdin and stdout
for line in requests:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        channel.close()
        run(req)
        sys.exit(0)  # (leaves the loop: the child ends as `python -m lmforge` would)
    channel.write(json.dumps({"pid": pid}) + "\n")
    channel.flush()
    _, status = os.waitpid(pid, 0)
    channel.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
    channel.flush()
"""

MAIN = str(Path(__file__).resolve().parent.parent / "lmforge" / "__main__.py")  # sys.argv[0] under -m


class Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.buffer = b""

    def call(self, argv: list[str], env: dict[str, str], cwd: str, stdin: str, timeout: float) -> tuple[int, str, str]:
        with tempfile.TemporaryDirectory(prefix="lmforge-call-") as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            Path(out).touch()
            Path(err).touch()
            req = {"argv0": MAIN, "argv": argv, "env": env, "cwd": cwd, "stdin": stdin, "stdout": out, "stderr": err}
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self._reply(60))["pid"]
            try:
                returncode = json.loads(self._reply(timeout))["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self._reply(60)
                raise subprocess.TimeoutExpired(["lmforge", *argv], timeout, _read(out), _read(err)) from None
            return returncode, _read(out), _read(err)

    def _reply(self, timeout: float) -> str:
        """The zygote's next line; its own buffer, as a buffered reader could hold a line `select` cannot see."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired("lmforge zygote", timeout)
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the test zygote exited with {self.proc.wait()}; run with LMFORGE_TEST_SPAWN=1")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(30)


def _read(path: str) -> str:
    with open(path, encoding=locale.getpreferredencoding(False)) as f:  # as subprocess.run(text=True) decodes
        return f.read()


_idle: list[Zygote] = []
_lock = threading.Lock()


@atexit.register
def _close_all() -> None:
    for z in _idle:
        z.close()


def run_lmforge(
    args: list[str], env: dict[str, str], timeout: float, input: str | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, lmforge, *args], capture_output=True, text=True, ...)` in a forked child."""
    with _lock:
        zygote = _idle.pop() if _idle else None
    zygote = zygote or Zygote()  # calls from several threads at once: one zygote each
    try:
        with tempfile.NamedTemporaryFile("w", encoding=locale.getpreferredencoding(False), suffix=".stdin") as f:
            f.write(input or "")
            f.flush()
            stdin = f.name if input is not None else os.devnull
            code, out, err = zygote.call(args, env, cwd or os.getcwd(), stdin, timeout)
    except BaseException:
        zygote.close()
        raise
    with _lock:
        _idle.append(zygote)
    return subprocess.CompletedProcess([sys.executable, "-m", "lmforge", *args], code, out, err)
