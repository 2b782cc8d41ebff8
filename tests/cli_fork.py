"""`python -m lmforge ARGS` for the tests, without paying for `import torch` in every call.

Each call is still its own process, with its own arguments, environment, working directory, standard
streams and exit status. A zygote interpreter imports torch and lmforge's command line once; then, per
call, it forks a child that runs `python -m lmforge ARGS` as the interpreter would (`runpy`, as
`__main__`). On CI's 2-core machines `import torch` takes 1.5-2.6 s and the suite makes ~300 calls; each
training also imports torch._dynamo (torch.optim does) and matplotlib (loss.png), 2-4 s more, which the
zygote imports too. Tests of several ranks fork each rank from one (tests/test_dist.py: launch_ranks).

The zygote never runs a torch op, so no thread pool or device is set up before a fork. Tests that need
a fresh interpreter (signals during start-up, stdin encodings) start one themselves; LMFORGE_TEST_SPAWN=1
sends every call to a fresh interpreter too.
"""

from __future__ import annotations

import atexit
import json
import locale
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The zygote: imports what every call imports, then serves one request (a JSON line) at a time.
ZYGOTE = r"""
import faulthandler, io, json, os, runpy, signal, sys
import torch
import lmforge.cli
lmforge.cli.build_parser()  # the config dataclasses, prepare, estimate (torch-free: the models are imported below)
import lmforge.checkpoint, lmforge.finetune, lmforge.generate, lmforge.quickstart, lmforge.train.run  # noqa: E401
import lmforge.models.bert, lmforge.models.gpt, lmforge.models.rnn  # noqa: E401  (build_model imports them on use)
import safetensors.torch, tokenizers  # noqa: E401,F401  (not transformers or huggingface_hub: they read env at import)
# every training imports these (torch.optim's first optimizer imports dynamo; loss.png needs pyplot): 2-4 s a call
import torch._dynamo, torch._inductor.config  # noqa: E401
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401

def run(req):
    # Ctrl-C and SIGTERM as a fresh interpreter started from a terminal has them (Python's handler, not blocked),
    # whatever the test process had when it started the zygote: an ignored or blocked SIGINT is inherited, and
    # a `serve` that ignored it never stopped (test order under xdist)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    # inductor's config read $CXX when the zygote imported it: read it again as a fresh interpreter would
    torch._inductor.config.cpp.cxx = (None, os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++"))
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
    # SIGUSR1 dumps every thread's Python stack to stderr (tests/test_dist.py: launch_ranks on a hang)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if req["script"]:  # `python SCRIPT ARGS` (a test's wrapper around lmforge's CLI)
        runpy.run_path(req["script"], run_name="__main__")
    else:
        runpy.run_module("lmforge", run_name="__main__", alter_sys=True)

# the zygote's objects move out of the collector's reach: a child's collections (and the one at its exit)
# walked all of them, writing to each, so every page of the heap it shares with the zygote was copied
# (a tiny pretrain: 2.8 -> 1.4 s)
import gc
gc.freeze()
requests = sys.stdin  # (kept: a dropped sys.stdin would close fd 0)
channel = os.fdopen(os.dup(1), "w")  # replies; fds 0 and 1 become each child's stdin and stdout
channel.write(json.dumps({"ready": True}) + "\n")  # the imports are done (Zygote.start waits longer for this)
channel.flush()
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

STARTUP_TIMEOUT = 240  # seconds a new zygote may take to import torch and lmforge
# when pytest-timeout fails the running test (time.monotonic(); None: never), set by conftest.py for each test here
# (pytest imports conftest.py as `conftest`, and the tests' `from tests.conftest import ...` makes a second copy)
test_deadline: float | None = None


def seconds_left(margin: float) -> float:
    """Seconds until pytest-timeout fails the running test, less `margin` (inf without a timeout): a wait that
    must end first to report what it waited for (tests/test_dist.py: launch_ranks' stacks of hung ranks)."""
    return math.inf if test_deadline is None else test_deadline - time.monotonic() - margin


MAIN = str(Path(__file__).resolve().parent.parent / "lmforge" / "__main__.py")  # sys.argv[0] under -m


class Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.buffer = b""
        self.ready = False  # whether the zygote said it has imported everything

    def start(self, argv: list[str], env: dict[str, str], cwd: str, stdin: str, script: str | None) -> dict:
        """Fork the child: its pid and where its stdout and stderr go (a temporary folder, removed by the caller)."""
        tmp = tempfile.mkdtemp(prefix="lmforge-call-")
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        Path(out).touch()
        Path(err).touch()
        req = {"argv0": script or MAIN, "argv": argv, "env": env, "cwd": cwd, "stdin": stdin, "stdout": out}
        req |= {"stderr": err, "script": script}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        if not self.ready:  # its imports take 5-15 s, and over 60 s on a loaded 2-core machine (the fork, a moment)
            json.loads(self._reply(STARTUP_TIMEOUT))
            self.ready = True
        return {"pid": json.loads(self._reply(60))["pid"], "tmp": tmp, "stdout": out, "stderr": err}

    def returncode(self, timeout: float) -> int:
        """The child's exit status, once it has ended (subprocess.TimeoutExpired if not within `timeout` s)."""
        return json.loads(self._reply(timeout))["returncode"]

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
            try:  # (it exits at end of input, once its imports are done)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # still importing: stopped, so this error does not hide the caller's
                self.proc.kill()
                self.proc.wait()


def _read(path: str) -> str:
    with open(path, encoding=locale.getpreferredencoding(False)) as f:  # as subprocess.run(text=True) decodes
        return f.read()


_idle: list[Zygote] = []
_lock = threading.Lock()


@atexit.register
def _close_all() -> None:
    for z in _idle:
        z.close()


class ForkedProcess:
    """`subprocess.Popen([python, -m, lmforge, *args], ...)` (or `[python, script, *args]`) as a child forked from
    a zygote: a real process, which signals reach by its pid; its stdout and stderr are read once it has ended."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: str | None = None,
        stdin: str = os.devnull,
        script: str | None = None,
    ) -> None:
        with _lock:
            zygote = _idle.pop() if _idle else None
        self.zygote = zygote or Zygote()  # calls from several threads at once: one zygote each
        self.args = [sys.executable, *([script] if script else ["-m", "lmforge"]), *args]
        self.returncode: int | None = None
        self.stdout = self.stderr = ""
        try:
            self.child = self.zygote.start(args, env, cwd or os.getcwd(), stdin, script)
        except BaseException:
            self.zygote.close()
            raise
        self.pid = self.child["pid"]

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; subprocess.TimeoutExpired if the child runs on past `timeout` seconds."""
        if self.returncode is None:
            try:
                self.returncode = self.zygote.returncode(3600 if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                raise
            except BaseException:
                self.zygote.close()
                raise
            self.stdout, self.stderr = _read(self.child["stdout"]), _read(self.child["stderr"])
            shutil.rmtree(self.child["tmp"], ignore_errors=True)
            with _lock:
                _idle.append(self.zygote)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout, self.stderr

    def wait_for_stderr(self, text: str, timeout: float) -> bool:
        """Whether `text` appears in the running child's stderr within `timeout` s; once it has, waits until the
        file stops growing for 0.1 s, so a dump being written (tests/test_dist.py: a hung rank's stacks) is whole."""
        deadline, path = time.monotonic() + timeout, self.child["stderr"]
        while self.poll() is None and time.monotonic() < deadline:  # (once ended, its file is read and removed)
            if text in _read(path):
                size = -1
                while size != (size := os.path.getsize(path)):
                    time.sleep(0.1)
                return True
            time.sleep(0.02)
        return text in self.stderr

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # ended (and reaped by the zygote) since the last poll
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_lmforge(
    args: list[str], env: dict[str, str], timeout: float, input: str | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, lmforge, *args], capture_output=True, text=True, ...)` in a forked child."""
    with tempfile.NamedTemporaryFile("w", encoding=locale.getpreferredencoding(False), suffix=".stdin") as f:
        f.write(input or "")
        f.flush()
        proc = ForkedProcess(args, env, cwd, stdin=f.name if input is not None else os.devnull)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(60)
            raise subprocess.TimeoutExpired(proc.args, timeout, proc.stdout, proc.stderr) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, proc.stderr)
