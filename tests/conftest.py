"""Shared fixtures: real text from the package's built-in corpus, a prepared data dir, tiny configs.

The built-in corpus (tinyshakespeare, public domain) ships with the package, so tests run on real
text without ../shared or the network.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmforge.config import RunConfig, load_config
from lmforge.quickstart import corpus_path
from tests import cli_fork
from tests.cli_fork import ForkedProcess, run_lmforge

REPO = Path(__file__).resolve().parent.parent

# One thread: on a shared 2-core machine, 2 OpenMP threads stall for ms on every op whenever the other
# core is busy (measured: a tiny fwd+bwd took 0.5 s with 2 threads vs 6 ms with 1 under load).
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """The default suite checks CPU numbers (CI's machine): on a GPU machine it hides CUDA from itself
    and its subprocesses, as `device auto` would otherwise pick the GPU, where bf16 autocast and
    `torchrun` with one rank per GPU change what the tests pin. `pytest -m gpu` keeps CUDA visible
    and runs the GPU tests (tests/test_gpu*.py)."""
    marks = config.getoption("markexpr") or ""
    if "gpu" not in marks or "not gpu" in marks:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def expected_length(item: pytest.Item) -> int:
    """0: a test given its own, longer timeout (a cold inductor compile: 30-300 s); 1: marked slow or dist (several
    processes, or seconds of training); 2: the rest."""
    if item.get_closest_marker("timeout"):
        return 0
    return 1 if item.get_closest_marker("slow") or item.get_closest_marker("dist") else 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests start first (by expected_length, each group in collection order, so a module's tests stay
    together). pytest-xdist's worksteal hands each worker a contiguous share of this order and moves tests from the
    end of a queue to an idle worker: a long test left near the end started last and kept one core busy alone while
    the other had nothing left (the compile test of tests/test_speed_features.py was test 1767 of 1883)."""
    order = {id(item): (expected_length(item), i) for i, item in enumerate(items)}
    items.sort(key=lambda item: order[id(item)])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Note when pytest-timeout (its timer starts with the test's set-up) will fail this test
    (tests/cli_fork.py: seconds_left)."""
    marker = item.get_closest_marker("timeout")
    timeout = marker.args[0] if marker and marker.args else item.config.getoption("timeout", None)
    timeout = timeout or os.environ.get("PYTEST_TIMEOUT") or item.config.getini("timeout")
    cli_fork.test_deadline = time.monotonic() + float(timeout) if timeout else None


@pytest.fixture(autouse=True)
def _signal_handlers() -> Iterator[None]:
    """Each test starts with the process's SIGINT/SIGTERM handlers as the last one left them, and puts them back:
    `cli.main` called in process ends by ignoring SIGINT (a Ctrl-C during interpreter shutdown), so a later test
    in the same worker that sends itself SIGINT saw nothing (test_train's final-evaluation signal test failed
    by test order under xdist)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, []) if hasattr(signal, "pthread_sigmask") else None
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if mask is not None:  # (a signal a test left blocked would be blocked for every later test, and the zygote)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def shakespeare_text(n_bytes: int = 60_000) -> str:
    """The first `n_bytes` of the built-in corpus, cut at a paragraph boundary."""
    with gzip.open(corpus_path(), "rt", encoding="utf-8") as f:
        text = f.read(n_bytes)
    return text[: text.rfind("\n\n") + 1]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(shakespeare_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A prepared char-level data directory (~60 kB of Shakespeare)."""
    from lmforge.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(
        PrepareConfig(inputs=[str(corpus_file)], out=str(out), tokenizer="char", val_fraction=0.1, test_fraction=0.1),
        progress=False,
    )
    return out


def tiny_config(data_dir: Path, out: Path, **overrides: object) -> RunConfig:
    """The `tiny` preset shrunk further for unit tests; `overrides` use dotted keys."""
    flat = {
        "model.n_layer": 2,
        "model.n_head": 4,
        "model.d_model": 32,
        "model.max_seq_len": 32,
        "train.batch_size": 8,
        "train.max_steps": 12,
        "train.warmup_steps": 2,
        "train.lr": 3e-3,
        "train.log_every": 1,
        "eval.every": 4,
        "eval.max_batches": 4,
        "checkpoint.every": 6,
        "checkpoint.keep": 10,
        **overrides,
    }
    nested: dict = {"out": str(out), "data": {"dir": str(data_dir)}}
    for key, value in flat.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return load_config(preset="tiny", overrides=nested)


def pretrain_tiny_encoder(preset: str, data_dir: Path, out: Path, **sections: dict) -> Path:
    """An encoder preset (bert-tiny, electra-tiny) shrunk to 1 layer, 32 wide, pretrained for 3 steps on the test
    corpus into `out`; `sections` add settings (e.g. objective={"name": "mlm"})."""
    from lmforge.train.run import pretrain

    cfg = load_config(
        preset=preset,
        overrides={
            "out": str(out),
            "data": {"dir": str(data_dir)},
            "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "d_ff": 64, "max_seq_len": 64},
            **sections,
            "train": {"batch_size": 8, "max_steps": 3, "warmup_steps": 1, "log_every": 1},
            "eval": {"every": 0, "max_batches": 1},
        },
    )
    pretrain(cfg, progress=False)
    return out


def run_cli(
    *args: str, timeout: float = 240, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """`python -m lmforge ARGS` in a subprocess, as a user would run it (`env`: extra environment variables).

    The subprocess is forked from an interpreter that has imported torch already (tests/cli_fork.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if os.environ.get("LMFORGE_TEST_SPAWN") != "1" and set(kwargs) <= {"input", "cwd"}:
        return run_lmforge(list(args), env, timeout, **kwargs)
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )


def start_cli(*args: str, env: dict[str, str] | None = None):
    """`subprocess.Popen([python, -m, lmforge, ARGS], stdout=PIPE, stderr=PIPE, text=True)` started as `run_cli`
    starts its calls (forked from a zygote, or LMFORGE_TEST_SPAWN=1: a fresh interpreter); signals reach it by
    its pid, and `communicate()` gives its output once it has ended."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if os.environ.get("LMFORGE_TEST_SPAWN") != "1":
        return ForkedProcess(list(args), env, cwd=str(REPO))
    cmd = [sys.executable, "-m", "lmforge", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def have_cpp_compiler() -> bool:
    """Whether torch.compile can build CPU kernels here (inductor's C++ compiler: $CXX, else g++)."""
    from lmforge.train.precision import cpp_compiler_problem

    return cpp_compiler_problem() is None


@contextlib.contextmanager
def file_size_limit(n_bytes: int) -> Iterator[None]:
    """In this process, writes past `n_bytes` fail with a real EFBIG, as on a full disk (Linux RLIMIT_FSIZE;
    SIGXFSZ ignored so the write fails instead of killing the process). Restored on exit."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
