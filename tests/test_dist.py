"""Data parallelism with 2 gloo processes under torchrun, against 1 process with the whole batch.

The global batch (8 sequences) is split as 2 ranks x micro-batch 2 x accumulation 2; the sequence of
global batches and the loss normalisation do not depend on the split, so loss curves and final weights
equal the 1-process run's to float tolerance (only the summation order of the all-reduce differs).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.distributed import TCPStore

from lmforge.checkpoint import load_checkpoint, model_files
from tests.cli_fork import ForkedProcess
from tests.conftest import REPO, run_cli, tiny_config

pytestmark = pytest.mark.dist

STEPS = 6
FLAGS = {
    "model.n_layer": 2,
    "model.n_head": 4,
    "model.d_model": 32,
    "model.max_seq_len": 32,
    "train.batch_size": 8,
    "train.max_steps": STEPS,
    "train.warmup_steps": 2,
    "train.lr": 3e-3,
    "train.log_every": 1,
    "eval.every": 3,
    "eval.batch_size": 2,
    "eval.max_batches": 3,  # odd: 2 ranks split it 2 + 1 (the other rank pads its last forward)
    "checkpoint.every": 3,
    "checkpoint.keep": 10,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_args(data_dir: Path, out: Path, *extra: str, **flags: object) -> list[str]:
    """`pretrain` of the tiny preset on `data_dir` into `out` with the test flags (FLAGS, then `flags`)."""
    args = [f"--{k}={v}" for k, v in {**FLAGS, **flags}.items()]
    return ["pretrain", "--preset=tiny", f"--data={data_dir}", f"--out={out}", *args, *extra]


def torchrun_command(
    data_dir: Path, out: Path, *extra: str, nproc: int = 2, entry: tuple[str, ...] = ("-m", "lmforge"), **flags: object
) -> list[str]:
    """torchrun running `entry` (default: lmforge's CLI) with `pretrain` and the test flags."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    launcher += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return [*launcher, *entry, *pretrain_args(data_dir, out, *extra, **flags)]


def torchrun(
    data_dir: Path, out: Path, *extra: str, nproc: int = 2, entry: tuple[str, ...] = ("-m", "lmforge"), **flags: object
) -> subprocess.CompletedProcess:
    cmd = torchrun_command(data_dir, out, *extra, nproc=nproc, entry=entry, **flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def forked_ranks(
    data_dir: Path,
    out: Path,
    *extra: str,
    nproc: int = 2,
    entry: tuple[str, ...] = ("-m", "lmforge"),
    stop_others: bool = True,
    **flags: object,
) -> subprocess.CompletedProcess:
    """`torchrun(...)` for the tests whose subject is not the launcher (see `launch_ranks`)."""
    args = pretrain_args(data_dir, out, *extra, **flags)
    script = None if entry == ("-m", "lmforge") else entry[0]
    argv = args if script is None else [*entry[1:], *args]
    return launch_ranks(argv, nproc=nproc, script=script, stop_others=stop_others)


def launch_ranks(
    args: list[str], nproc: int = 2, script: str | None = None, timeout: float = 300, stop_others: bool = True
) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node NPROC -m lmforge ARGS` (or `SCRIPT ARGS`) without the launcher: the ranks it
    starts, with its environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; this process hosts the store),
    each forked from a test zygote that imported torch already (tests/cli_fork.py), not three fresh
    interpreters. As torchrun does, the first rank to fail gets the others stopped (SIGTERM, then SIGKILL
    30 s later; `stop_others=False` for a script that sends the launcher's SIGTERM itself, at a chosen point, where
    a second one would stop it at once) and its status is the run's; stdout and stderr are the ranks', in rank
    order; `exit_s`: when each rank exited, in seconds from the start (None: still running when killed). Ranks still
    running after `timeout` s, or close to pytest's own timeout of the test, fail it with every rank's stacks."""
    import time

    from tests.cli_fork import seconds_left

    store, ranks = start_ranks(args, nproc=nproc, script=script, timeout=timeout)
    kill_at, code, hung = None, 0, False
    start = time.monotonic()
    exit_s: list[float | None] = [None] * nproc

    def note_exits() -> None:
        for i, r in enumerate(ranks):
            if exit_s[i] is None and r.returncode is not None:
                exit_s[i] = time.monotonic() - start

    try:
        # ends before pytest-timeout fails the test, which would leave no clue (a test that trained in process
        # first, or started cold zygotes, has less than its 300 s left)
        limit = min(timeout, seconds_left(margin=20))
        deadline = time.monotonic() + limit
        while any([r.poll() is None for r in ranks]):  # (every rank polled: a generator stopped at rank 0)
            note_exits()
            failed = [r.returncode for r in ranks if r.returncode]
            if failed and kill_at is None:
                kill_at, code = time.monotonic() + 30, failed[0]
                for r in ranks if stop_others else ():
                    r.send_signal(signal.SIGTERM)
            if time.monotonic() > min(deadline, kill_at or deadline):
                break
            time.sleep(0.05)
        note_exits()
        hung = not code and time.monotonic() > deadline
        if hung:  # each rank's Python stacks, to stderr (tests/cli_fork.py registers SIGUSR1 with faulthandler)
            for r in ranks:
                r.send_signal(signal.SIGUSR1)
            for r in ranks:  # until each has written its dump (faulthandler writes it in the signal handler)
                r.wait_for_stderr("(most recent call first)", timeout=10)
    finally:
        for r in ranks:
            r.kill()
            r.wait(60)
        del store
    if hung:
        stacks = "\n".join(f"--- rank {i} stderr ---\n{r.stderr}" for i, r in enumerate(ranks))
        pytest.fail(f"{nproc} ranks still running after {limit:.0f} s: {' '.join(args)}\n{stacks}")
    stdout, stderr = "".join(r.stdout for r in ranks), "".join(r.stderr for r in ranks)
    done = subprocess.CompletedProcess(
        ranks[0].args, code or next((r.returncode for r in ranks if r.returncode), 0), stdout, stderr
    )
    done.exit_s = exit_s
    return done


def start_ranks(
    args: list[str], nproc: int = 2, script: str | None = None, timeout: float = 300
) -> tuple[TCPStore, list[ForkedProcess]]:
    """The ranks of `launch_ranks`, started, and the rendezvous store this process hosts for them (held while they
    run); a test that acts on the ranks while they run (tests a hung one) waits for them itself."""
    # the launcher hosts the rendezvous store, as torchrun's agent does (TORCHELASTIC_USE_AGENT_STORE): bound to a
    # port the OS picks and held for the whole run, where a port found free and then bound by rank 0 could be taken
    # in between by another test's process
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    ranks: list[ForkedProcess] = []
    try:
        for rank in range(nproc):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1"}
            env |= {"MASTER_PORT": str(store.port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
            env |= {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0"}
            env |= {"TORCHELASTIC_USE_AGENT_STORE": "True"}
            ranks.append(ForkedProcess(args, env, cwd=str(REPO), script=script))
    except BaseException:  # a rank that failed to start has the ones started before it stopped, not left waiting
        for r in ranks:
            r.kill()
            r.wait(60)
        raise
    return store, ranks


def warm_zygotes(n: int, tmp_path: Path) -> None:
    """`n` test zygotes that have imported torch, ready for `n` ranks to start at once: a cold one takes 5-60 s,
    and a rank forked from it would join that much later than the others."""
    idle = tmp_path / "idle.py"
    idle.write_text("", encoding="utf-8")
    warm = [ForkedProcess([], dict(os.environ), script=str(idle)) for _ in range(n)]
    assert [p.wait(240) for p in warm] == [0] * n


def train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def val_metrics(run: Path) -> list[tuple[float, float, int]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["val_loss"], r["val_bpb"], r["val_tokens"]) for r in records if "val_loss" in r]


def weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """The whole weights of a checkpoint, consolidated or sharded."""
    return load_checkpoint(run / "checkpoints" / f"step-{step:06d}").model_state()


@pytest.fixture(scope="module")
def single(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.train.run import pretrain

    out = tmp_path_factory.mktemp("single") / "run"
    pretrain(tiny_config(data_dir, out, **FLAGS), progress=False)
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    assert train_losses(run) == pytest.approx(train_losses(reference), rel=1e-5, abs=1e-6)
    # evaluation is sharded across ranks (batch i on rank i % world) and all-reduced: same numbers
    assert len(val_metrics(run)) == STEPS // 3
    for got_val, want_val in zip(val_metrics(run), val_metrics(reference), strict=True):
        assert got_val == pytest.approx(want_val, rel=1e-5)
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_the_whole_batch(strategy: str, data_dir: Path, single: Path, tmp_path: Path):
    out = tmp_path / "run"
    launch = torchrun if strategy == "ddp" else forked_ranks  # (the launcher itself: once is enough)
    p = launch(data_dir, out, **{"train.micro_batch_size": 2, "dist.strategy": strategy})
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(out, single)
    # only rank 0 writes: one metrics line per step and eval, one config, checkpoints as in 1 process
    assert len(train_losses(out)) == STEPS
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000003", "step-000006"]
    env = json.loads((out / "env.json").read_text(encoding="utf-8"))
    assert (env["world_size"], env["dist_backend"]) == (2, "gloo")
    state = json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text(encoding="utf-8"))
    assert (
        state["train_state"]["tokens"]
        == json.loads((single / "checkpoints" / "step-000006" / "state.json").read_text(encoding="utf-8"))[
            "train_state"
        ]["tokens"]
    )


def test_two_ranks_evaluate_max_batches_of_the_global_batch(data_dir: Path, tmp_path: Path) -> None:
    """With eval.batch_size 0, eval.max_batches counts batches of train.batch_size, run in forward passes
    of each rank's micro-batch: 2 ranks x micro-batch 2 (accumulation 2) evaluate the same 3 x 8
    sequences as 1 process with the whole batch (before, 3 x 2)."""
    from lmforge.train.run import pretrain

    flags = {"train.max_steps": 3, "eval.batch_size": 0, "checkpoint.every": 3}
    single = tmp_path / "single"
    pretrain(tiny_config(data_dir, single, **{**FLAGS, **flags}), progress=False)
    out = tmp_path / "two"
    p = forked_ranks(data_dir, out, **{**flags, "train.micro_batch_size": 2})
    assert p.returncode == 0, p.stderr[-3000:]
    want = val_metrics(single)
    assert want and all(tokens == 3 * 8 * FLAGS["model.max_seq_len"] for _, _, tokens in want)
    for got_val, want_val in zip(val_metrics(out), want, strict=True):
        assert got_val == pytest.approx(want_val, rel=1e-5)


def test_world_size_change_resumes(data_dir: Path, single: Path, tmp_path: Path) -> None:
    """Stop a 2-rank run at step 3, resume it in 1 process (and the other way round): same result."""
    from lmforge.train.run import pretrain

    out = tmp_path / "two-then-one"
    p = forked_ranks(data_dir, out, **{"train.micro_batch_size": 2, "train.max_steps": 3})
    assert p.returncode == 0, p.stderr[-3000:]
    pretrain(tiny_config(data_dir, out, **FLAGS), progress=False)
    assert_same_run(out, single)

    out = tmp_path / "one-then-two"
    pretrain(tiny_config(data_dir, out, **{**FLAGS, "train.max_steps": 3}), progress=False)
    p = forked_ranks(data_dir, out, **{"train.micro_batch_size": 4, "dist.strategy": "fsdp"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(out, single)


def test_hung_ranks_fail_the_test_with_their_stacks_before_pytests_timeout(tmp_path: Path, monkeypatch) -> None:
    """Ranks that never end fail their test with each rank's Python stack while the test has time left: launch_ranks
    waited its own 300 s, so a test that had trained in process first was failed by pytest-timeout, stackless."""
    import time

    from tests import cli_fork

    assert 200 < cli_fork.seconds_left(margin=0) <= 300  # pytest-timeout's limit of each test (pyproject.toml)
    warm_zygotes(2, tmp_path)  # their imports take 5-60 s, which the 25 s below is not about
    monkeypatch.setattr(cli_fork, "test_deadline", time.monotonic() + 25)  # as if the test had 25 s left
    script = tmp_path / "hang.py"
    script.write_text("import time\nwhile True:\n    time.sleep(0.1)  # the hang\n", encoding="utf-8")
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="2 ranks still running after") as failed:
        launch_ranks([], script=str(script))
    assert time.monotonic() - started < 25
    stacks = str(failed.value)
    assert "--- rank 1 stderr ---" in stacks
    assert stacks.count(f'File "{script}", line 3') == 2, stacks  # faulthandler's dump of each rank


def test_the_longest_tests_start_first(request: pytest.FixtureRequest) -> None:
    """The suite runs the compile tests first, then the tests of several processes (this module) and the ones
    marked slow, then the rest, each group in collection order (tests/conftest.py: pytest_collection_modifyitems);
    before, the compile test of tests/test_speed_features.py was test 1767 of 1883, at the end of a worker's queue."""
    from tests.conftest import expected_length, pytest_collection_modifyitems

    items = list(request.session.items)
    assert [expected_length(i) for i in items] == sorted(expected_length(i) for i in items)
    backwards = items[::-1]
    pytest_collection_modifyitems(backwards)
    assert [(expected_length(i), i.nodeid) for i in backwards] == sorted(
        ((expected_length(i), i.nodeid) for i in items[::-1]), key=lambda pair: pair[0]
    )  # sorted by expected length alone: stable within each group


def test_batch_that_does_not_split_is_one_line_error(data_dir: Path, tmp_path: Path) -> None:
    p = torchrun(data_dir, tmp_path / "run", **{"train.batch_size": 9, "train.micro_batch_size": 3})
    assert p.returncode != 0
    assert "train.batch_size 9 (global) must be a multiple of train.micro_batch_size 3 x 2 processes" in p.stderr
    assert "lmforge: error: train.batch_size 9" in p.stderr
    # torchrun prints its own launcher traceback; no frame of lmforge's code may appear in it
    assert not re.search(r'File ".*[/\\]lmforge[/\\]', p.stderr), p.stderr


def test_muon_under_fsdp_is_a_one_line_error(data_dir: Path, tmp_path: Path) -> None:
    # Muon orthogonalises whole matrices; FSDP2 hands each rank a shard, so the pair is refused up front
    p = forked_ranks(data_dir, tmp_path / "run", **{"optim.name": "muon", "dist.strategy": "fsdp"})
    assert p.returncode != 0
    assert "lmforge: error: optim.name muon orthogonalises whole weight matrices" in p.stderr
    assert not re.search(r'File ".*[/\\]lmforge[/\\]', p.stderr), p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_model_too_big_for_memory_is_one_line_from_rank_0(data_dir: Path, tmp_path: Path) -> None:
    """The up-front memory check (estimate_device.check_fits) refused on every rank, and each printed the same line: two
    lines under 2 ranks. Every rank checks the same model alike, so rank 0 alone prints it; the run fails (2)."""
    p = forked_ranks(data_dir, tmp_path / "run", **{"model.n_layer": 99999999999999999999})
    lines = [line for line in p.stderr.splitlines() if line.startswith("lmforge")]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("lmforge: error: the gpt model (") and "of this machine's RAM" in lines[0]
    assert not (tmp_path / "run").exists()


def test_sharded_checkpoints_hold_each_ranks_chunks_and_resume_at_any_world_size(
    data_dir: Path, single: Path, tmp_path: Path
) -> None:
    """`--checkpoint.sharded`: each FSDP2 rank writes only its own chunks (nothing is gathered), and the
    checkpoints resume at 2 ranks or in 1 process, and load in one process for `eval`."""
    import shutil

    from lmforge.eval.lm import evaluate_checkpoint
    from lmforge.train.run import pretrain

    sharded = {"train.micro_batch_size": 2, "dist.strategy": "fsdp", "checkpoint.sharded": True}
    out = tmp_path / "sharded"
    p = forked_ranks(data_dir, out, **sharded)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(out, single)
    step = out / "checkpoints" / f"step-{STEPS:06d}"
    shards = [f"{kind}-{r:05d}-of-00002.safetensors" for kind in ("model", "optim") for r in range(2)]
    assert sorted(f.name for f in step.iterdir()) == sorted([*shards, "state.json", "tokenizer.json"])
    whole = weights(out)["blocks.0.mlp.fc.weight"]
    with safe_open(str(step / shards[0]), "pt") as f:  # rank 0 holds the first half of the rows
        torch.testing.assert_close(f.get_tensor("blocks.0.mlp.fc.weight"), whole[: len(whole) // 2])
    assert 0 < evaluate_checkpoint(out, split="val", max_batches=2)["loss"] < 10

    out = tmp_path / "two-sharded-then-one"  # world size 2 -> 1
    p = forked_ranks(data_dir, out, **{**sharded, "train.max_steps": 3})
    assert p.returncode == 0, p.stderr[-3000:]
    shutil.copytree(out, tmp_path / "two-sharded-then-two")  # (the same 3 steps: resumed at 2 ranks below)
    pretrain(tiny_config(data_dir, out, **FLAGS), progress=False)
    assert_same_run(out, single)

    # Resumes under FSDP2 with meta init: each rank reads only its rows of each tensor, never the whole
    out = tmp_path / "one-sharded-then-two"  # 1 -> 2, from a 1-process sharded checkpoint (one shard)
    pretrain(tiny_config(data_dir, out, **{**FLAGS, "train.max_steps": 3, "checkpoint.sharded": True}), progress=False)
    p = forked_ranks(data_dir, out, **sharded, **{"dist.meta_init": True})
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(out, single)

    out = tmp_path / "two-sharded-then-two"  # 2 -> 2: each rank reads its own file
    p = forked_ranks(data_dir, out, **sharded, **{"dist.meta_init": True})
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(out, single)


def test_sharded_checkpoints_under_ddp_are_a_one_line_error(data_dir: Path, tmp_path: Path) -> None:
    p = forked_ranks(data_dir, tmp_path / "run", **{"checkpoint.sharded": True})  # strategy ddp
    assert p.returncode != 0
    assert "lmforge: error: --checkpoint.sharded needs --dist.strategy fsdp" in p.stderr
    assert not re.search(r'File ".*[/\\]lmforge[/\\]', p.stderr), p.stderr


def test_meta_init_under_ddp_is_a_one_line_error(data_dir: Path, tmp_path: Path) -> None:
    # before: DDP broadcast the meta-device weights, a "Tensor.item() cannot be called on meta tensors" traceback
    p = forked_ranks(data_dir, tmp_path / "run", **{"dist.meta_init": True})  # strategy ddp
    assert p.returncode != 0
    assert "lmforge: error: --dist.meta_init needs --dist.strategy fsdp" in p.stderr, p.stderr[-2000:]
    assert not re.search(r'File ".*[/\\]lmforge[/\\]', p.stderr), p.stderr


def test_sigkilled_two_rank_run_resumes_exactly(data_dir: Path, tmp_path: Path) -> None:
    """SIGKILL torchrun and both ranks mid-run (as a dead node would), re-run: same as never killed."""
    import time

    from lmforge.train.run import pretrain

    steps = 16
    reference = tmp_path / "reference"
    pretrain(tiny_config(data_dir, reference, **{**FLAGS, "train.max_steps": steps}), progress=False)

    out = tmp_path / "killed"
    cmd = torchrun_command(data_dir, out, **{"train.micro_batch_size": 2, "train.max_steps": steps})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if (out / "checkpoints" / "step-000003").is_dir():
            break
        time.sleep(0.005)
    # torchrun starts each rank in its own session: kill every process of this run by its unique --out
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"--out={out}".encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    p.wait(timeout=60)
    from lmforge.checkpoint import latest_checkpoint

    killed_at = latest_checkpoint(out)  # the `latest` pointer may not be written yet: that is allowed
    assert killed_at is not None and killed_at.name != f"step-{steps:06d}", "the run finished before the kill"

    p = forked_ranks(data_dir, out, **{"train.micro_batch_size": 2, "train.max_steps": steps})
    assert p.returncode == 0, p.stderr[-3000:]
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=1e-5, abs=1e-6)
    got, want = weights(out, steps), weights(reference, steps)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4)


def test_diloco_one_worker_at_outer_lr_1_is_plain_training(data_dir: Path, single: Path, tmp_path: Path) -> None:
    from lmforge.train.run import pretrain

    out = tmp_path / "diloco1"
    flags = {"dist.strategy": "diloco", "dist.sync_every": 2, "dist.outer_lr": 1.0, "dist.outer_momentum": 0.0}
    pretrain(tiny_config(data_dir, out, **FLAGS, **flags), progress=False)
    assert_same_run(out, single)


def test_diloco_two_workers_sync_rarely_and_learn(data_dir: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "diloco2"
    flags = {"train.micro_batch_size": 4, "dist.strategy": "diloco", "dist.sync_every": 3}
    p = forked_ranks(data_dir, out, **flags)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sync every 3 steps" in p.stdout and "(3x less)" in p.stdout
    losses = train_losses(out)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    # not DDP in disguise: the workers' separate AdamW steps give other weights than the global-batch run
    got, want = weights(out), weights(single)
    assert any(not torch.allclose(got[n], want[n], atol=1e-4) for n in want)


# lmforge's CLI, then each rank's live weights (DiLoCo's parameters) saved to OUT/rank-R.pt
KEEP_RANK_WEIGHTS = """
import os, sys
import torch
from lmforge import cli, dist

models = []
init = dist.DiLoCo.__init__
def keep(self, model, *args):
    init(self, model, *args)
    models.append(model)
dist.DiLoCo.__init__ = keep
try:
    cli.main(sys.argv[1:])
finally:
    out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--out="))
    weights = {n: p.detach() for n, p in models[0].named_parameters()}
    torch.save(weights, os.path.join(out, f"rank-{os.environ['RANK']}.pt"))
"""


@pytest.mark.parametrize(
    "stop",
    [
        {"train.max_steps": 5},  # not a multiple of sync_every
        {"eval.every": 1, "train.early_stop_patience": 1, "train.early_stop_min_delta": 100.0},  # stops at step 2
    ],
    ids=["max_steps", "early_stop"],
)
def test_diloco_last_step_is_an_outer_sync(stop: dict, data_dir: Path, tmp_path: Path) -> None:
    """Whatever ends the run, its last step syncs: every rank ends with the same weights, and the final
    checkpoint holds them (not rank 0's local progress since the last sync)."""
    script = tmp_path / "keep_rank_weights.py"
    script.write_text(KEEP_RANK_WEIGHTS, encoding="utf-8")
    out = tmp_path / "run"
    flags = {"train.micro_batch_size": 4, "dist.strategy": "diloco", "dist.sync_every": 3, **stop}
    p = forked_ranks(data_dir, out, entry=(str(script),), **flags)
    assert p.returncode == 0, p.stderr[-3000:]
    last = 5 if "train.max_steps" in stop else 2
    assert len(train_losses(out)) == last
    rank0, rank1 = (torch.load(out / f"rank-{r}.pt", weights_only=True) for r in (0, 1))
    saved = weights(out, last)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(saved[name], rank0[name]), name
    # 2 syncs (step 3 and the last) for 5 steps: 2.5x less traffic than DDP; 1 sync for 2 steps: 2x
    assert ("(2.5x less)" if last == 5 else "(2x less)") in p.stdout, p.stdout[-2000:]


def test_diloco_traffic_report_uses_the_syncs_made() -> None:
    from lmforge.dist import DiLoCo, DistConfig

    diloco = DiLoCo(
        torch.nn.Linear(256, 256, bias=False), DistConfig(strategy="diloco", sync_every=4), torch.device("cpu")
    )
    report = diloco.comm_report(2, 2)  # e.g. a 2-step resume that made no sync: no ratio
    assert report.endswith("0.0 MiB for 2 steps vs 1.0 MiB with DDP"), report
    diloco.after_step(2, last=True)
    diloco.after_step(2, last=True)  # (an early stop calls it again at the same step: one sync)
    assert diloco.comm_report(2, 2).endswith("0.5 MiB for 2 steps vs 1.0 MiB with DDP (2x less)")


def test_diloco_resync_after_rolling_back_past_a_sync(tmp_path: Path) -> None:
    """Rolled back (or resumed) to a checkpoint before the last outer sync, the steps after it are trained
    again and so are their syncs: the sync at step 4 happens again after a rollback from step 5 to step 3.
    (Before, the worker remembered having synced at step 4 and skipped it, training on alone until step 6.)"""
    from lmforge.dist import DiLoCo, DistConfig, save_sharded_checkpoint

    model = torch.nn.Linear(4, 4, bias=False)
    diloco = DiLoCo(
        model, DistConfig(strategy="diloco", sync_every=2, outer_lr=0.5, outer_momentum=0), torch.device("cpu")
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"train_state": {}, "config": {}}
    ckpt = load_checkpoint(save_sharded_checkpoint(tmp_path, 3, model, optimizer, state, "{}", diloco))
    with torch.no_grad():
        model.weight.add_(1.0)  # steps 4 and 5 of the worker alone
    diloco.after_step(4)
    diloco.load_checkpoint(ckpt)  # rollback to step 3
    ckpt.load_model(model)
    with torch.no_grad():
        model.weight.add_(1.0)  # step 4 again
    diloco.after_step(4)
    assert diloco.syncs == 2
    torch.testing.assert_close(model.weight, ckpt.model_state()["weight"] + 0.5, rtol=0, atol=1e-6)  # synced


def test_a_refused_run_closes_its_process_group(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A ConfigError after the group started (here --checkpoint.sharded under ddp) left it open, and gloo's
    threads then sometimes aborted the process at exit ("terminate called without an active exception", exit
    134 instead of 2). A 1-rank gloo group stands in for torchrun's (init keeps a group that exists)."""
    import torch.distributed as tdist

    from lmforge.errors import ConfigError
    from lmforge.train.run import pretrain

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="--checkpoint.sharded needs --dist.strategy fsdp"):
            pretrain(tiny_config(data_dir, tmp_path / "r", **{"checkpoint.sharded": True}), progress=False)
        assert not tdist.is_initialized()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def gloo_threads() -> int:
    """How many of this process's threads are gloo's (torch names them pt_gloo_*)."""
    tasks = Path("/proc/self/task")
    return sum((t / "comm").read_text().startswith("pt_gloo") for t in tasks.iterdir())


@pytest.mark.skipif(sys.platform != "linux", reason="threads are listed from /proc")
def test_a_run_stopped_after_wrapping_its_model_destroys_its_group_before_it_raises(
    data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The group was destroyed while DDP's reducer, kept alive by the stop's traceback, still held it: freed later,
    the reducer ran the group's destructor holding the GIL, and a rank hung at exit, joining a gloo thread that
    waited for the GIL (test_a_signal_in_set_up_stops_every_rank_...). The group, its threads ended, is now gone
    when pretrain raises. A 1-rank gloo group stands in for torchrun's; the signal is held as the model is built."""
    import torch._dynamo  # noqa: F401  (before the group: imported after it, it keeps the group alive, dist.shutdown)
    import torch.distributed as tdist

    from lmforge import errors
    from lmforge.train import run

    build_model = run.build_model

    def build(*args, **kwargs):
        errors.hold_interrupt()  # (a SIGTERM held since the ranks joined: errors.hold_interrupts)
        return build_model(*args, **kwargs)

    monkeypatch.setattr(run, "build_model", build)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(run.Interrupted, match="stopped by a signal while the ranks set up"):
            run.pretrain(tiny_config(data_dir, tmp_path / "r"), progress=False)
        assert not tdist.is_initialized() and gloo_threads() == 0
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def test_resume_notes_name_the_run_as_it_is() -> None:
    """A one-process run (strategy "ddp" by default) resuming a DiLoCo checkpoint is not called a ddp run."""
    from lmforge.checkpoint import Checkpoint
    from lmforge.dist import DiLoCo, DistConfig, DistInfo, resume_worker

    ckpt = Checkpoint(Path("run/checkpoints/step-000005"), {"diloco": {"workers": 2}})
    assert resume_worker(ckpt, "ddp", DistInfo()) == (
        0,
        "note: step-000005 is a DiLoCo checkpoint: this one-process run resumes from worker 0's weights and "
        "optimizer state, without the outer momentum",
    )
    assert "this ddp run resumes" in resume_worker(ckpt, "ddp", DistInfo(rank=1, local_rank=1, world_size=2))[1]
    diloco = DiLoCo(torch.nn.Linear(4, 4), DistConfig(strategy="diloco"), torch.device("cpu"))
    assert diloco.comm_report(1, 2).startswith("diloco: 1 worker syncs every 50 steps;")


def test_meta_init_gives_the_same_model_in_one_process(data_dir: Path, single: Path, tmp_path: Path) -> None:
    from lmforge.train.run import pretrain

    out = tmp_path / "meta"
    pretrain(tiny_config(data_dir, out, **FLAGS, **{"dist.meta_init": True}), progress=False)
    assert_same_run(out, single)


def test_fsdp_with_meta_init_trains_and_its_checkpoint_loads_in_one_process(data_dir: Path, tmp_path: Path) -> None:
    from lmforge.eval.lm import evaluate_checkpoint

    out = tmp_path / "fsdp-meta"
    p = forked_ranks(data_dir, out, **{"train.micro_batch_size": 2, "dist.strategy": "fsdp", "dist.meta_init": True})
    assert p.returncode == 0, p.stderr[-3000:]
    losses = train_losses(out)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    metrics = evaluate_checkpoint(out, split="val", max_batches=2)
    assert 0 < metrics["loss"] < losses[0]


RANK1_DIES_THEN_RANK0_IS_SIGNALLED_WHILE_CLOSING = """
import os, signal, sys
from lmforge import cli, log
from lmforge.train import loop

lr_at = loop.lr_at
def dying_lr_at(step, *args, **kwargs):  # rank 1 dies at its third step, as a SIGKILLed rank would
    if step == 2 and os.environ["RANK"] == "1":
        os._exit(1)
    return lr_at(step, *args, **kwargs)
loop.lr_at = dying_lr_at

close = log.RunLogger.close
def signalled_close(self, *, failing=False):  # the launcher's SIGTERM arrives while rank 0 closes its log
    if failing and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGTERM)
    close(self, failing=failing)
log.RunLogger.close = signalled_close
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_peer_death_then_the_launchers_signal_keeps_the_failures_line(data_dir: Path, tmp_path: Path) -> None:
    """torchrun SIGTERMs every rank once one dies. Rank 0, whose collective had failed, got it while closing its log
    (loss.png), before the failure was turned into its line: it printed 'lmforge: interrupted' (exit 130, which
    says nothing of the lost peer or of resuming) and left status.json 'running' with its dead pid. Now the
    failure's line is printed (exit 2) and the status says failed."""
    script = tmp_path / "peer_dies.py"
    script.write_text(RANK1_DIES_THEN_RANK0_IS_SIGNALLED_WHILE_CLOSING, encoding="utf-8")
    out = tmp_path / "r"
    # (the script sends the launcher's one SIGTERM itself, in the window; the launcher's own, racing it on a loaded
    # machine, made two, and a second signal stops at once: 'interrupted')
    p = forked_ranks(
        data_dir, out, entry=(str(script),), stop_others=False, **{"train.max_steps": 6, "dist.timeout_s": 60}
    )
    rank0 = [line for line in p.stderr.splitlines() if line.startswith("lmforge")]
    assert rank0 and rank0[0].startswith("lmforge: error: rank 0: a collective with the other 1 process(es) failed")
    assert "re-run the same command to resume" in rank0[0] and "interrupted" not in p.stderr, p.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["status"] == "failed"


# lmforge's CLI where rank 1 dies at a point of its run (SIGNAL_AT: "setup", as it wraps its model, after the ranks
# joined; "end", as it closes its log after the final checkpoint) and rank 0 meanwhile does work of its own, no
# collective, until the launcher's SIGTERM reaches it (forked_ranks stops the others once one fails, as torchrun does)
RANK1_DIES_WHILE_RANK0_WORKS_ALONE = """
import os, sys, time
from lmforge import cli, dist, errors, log

at, rank = os.environ["SIGNAL_AT"], os.environ["RANK"]
signalled = getattr(errors, "interrupt_held", errors.interrupt_seen)  # (a raised interrupt leaves the loop anyway)
def until_signalled():  # local work (building the model, drawing loss.png) that the SIGTERM lands in
    deadline = time.monotonic() + 60
    while not signalled() and time.monotonic() < deadline:
        time.sleep(0.01)

wrap_model = dist.wrap_model
def wrap(*args, **kwargs):
    if at == "setup":
        if rank == "1":
            os._exit(1)
        until_signalled()
    return wrap_model(*args, **kwargs)
dist.wrap_model = wrap

close, closed = log.RunLogger.close, []
def closing(self, *, failing=False):
    if at == "end" and not failing and not closed:
        closed.append(True)
        if rank == "1":
            os._exit(1)
        until_signalled()
    close(self, failing=failing)
log.RunLogger.close = closing
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_peer_death_in_set_up_keeps_the_failures_line(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """torchrun SIGTERMs every rank once one dies. Rank 0, building its model (no collective) when rank 1 died after
    the ranks joined, printed 'lmforge: interrupted' (exit 130): 2 of 6 real kills in start-up. The signal is now
    held until the ranks meet (DDP's first broadcast), where the dead peer is found: the failure's line. It was
    the second line, under the stop signal's note (which the ranks' meeting made moot within milliseconds); it is
    the only one now, and names the rank that exited (rank 1 itself exits without a word here)."""
    script = tmp_path / "peer_dies.py"
    script.write_text(RANK1_DIES_WHILE_RANK0_WORKS_ALONE, encoding="utf-8")
    monkeypatch.setenv("SIGNAL_AT", "setup")
    p = forked_ranks(data_dir, tmp_path / "r", entry=(str(script),), **{"train.max_steps": 2, "dist.timeout_s": 60})
    said = p.stderr.strip().splitlines()
    assert len(said) == 1, p.stderr[-3000:]
    assert said[0].startswith("lmforge: error: rank 0: a collective with the other 1 process(es) failed")
    assert "); rank 1 exited (its own output says why). The latest checkpoint is intact" in said[0], said[0]


# lmforge's CLI where rank 0 gets a stop signal (as torchrun passes on a scheduler's SIGTERM) while it builds its
# model, local work of its own in set-up; rank 1 gets none. As pretrain returns or raises, each rank says how many
# of the process group's gloo threads still run (torch names them pt_gloo_*; Linux lists them in /proc).
RANK0_SIGNALLED_IN_SET_UP = """
import os, signal, sys, time
from lmforge import cli, errors, train

build_model = train.run.build_model
def build(*args, **kwargs):
    if os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(errors.NOTE_AFTER_S + 1)  # (a set-up that goes on after the signal: the note says it will stop)
    return build_model(*args, **kwargs)
train.run.build_model = build

pretrain = train.run.pretrain
def counted(*args, **kwargs):
    try:
        return pretrain(*args, **kwargs)
    finally:
        names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
        print(f"gloo threads left: {sum(n.startswith('pt_gloo') for n in names)}", file=sys.stderr, flush=True)
train.run.pretrain = counted
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_signal_in_set_up_stops_every_rank_before_the_first_step_and_says_so_at_once(data_dir: Path, tmp_path):
    """A stop signal held in set-up (from the ranks' join on) was acted on at the end of the first step: a set-up
    longer than torchrun's 30 s between its signal and its SIGKILL (a big checkpoint's load) was killed without a
    line. Rank 0 now says that it will stop (once the set-up has gone on for errors.NOTE_AFTER_S, 2 s, after the
    signal: here it does), and every rank stops together at the next point all reach (rank 1, never signalled, too):
    exit 130, one line, no step trained.

    Rank 1 then hung at exit (until the launcher's SIGKILL 30 s later; 1 run in 4 on 2 loaded cores): the group was
    destroyed while DDP's reducer, held by the stop's traceback, still held it, and freed with that, the reducer ran
    the group's destructor holding the GIL, which a gloo thread waited for. The group is now destroyed, its threads
    ended, before pretrain returns or raises, on every rank, and both exit at once."""
    script = tmp_path / "signalled.py"
    script.write_text(RANK0_SIGNALLED_IN_SET_UP, encoding="utf-8")
    out = tmp_path / "r"
    p = forked_ranks(data_dir, out, entry=(str(script),), stop_others=False, **{"train.max_steps": 2})
    if sys.platform == "linux":
        assert p.stderr.count("gloo threads left: 0") == 2, p.stderr[-3000:]
    assert None not in p.exit_s and abs(p.exit_s[1] - p.exit_s[0]) < 10, p.exit_s  # (the launcher kills at 30 s)
    lines = [line for line in p.stderr.splitlines() if line.startswith(("lmforge", "note: a stop signal"))]
    assert p.returncode == 130 and lines == [
        "note: a stop signal arrived while the ranks set up; they stop together at the next point all of them "
        "reach (a second signal stops this one at once)",
        "lmforge: stopped by a signal while the ranks set up, before any step: nothing was trained; re-run the "
        "same command to go on",
    ], p.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoints/step-*"))


def test_a_peer_death_after_the_final_checkpoint_is_no_interruption(data_dir: Path, tmp_path: Path, monkeypatch):
    """Rank 1 died after the final checkpoint while rank 0 drew loss.png: rank 0 printed 'lmforge: interrupted' and
    left status.json 'running' (3 of 6 real kills). The run is trained and saved: the signal is held until its
    status says finished and loss.png is drawn, then stops the command (exit 130) with a line that says so."""
    script = tmp_path / "peer_dies.py"
    script.write_text(RANK1_DIES_WHILE_RANK0_WORKS_ALONE, encoding="utf-8")
    monkeypatch.setenv("SIGNAL_AT", "end")
    out = tmp_path / "r"
    p = forked_ranks(data_dir, out, entry=(str(script),), **{"train.max_steps": 3, "eval.every": 0})
    said = [line for line in p.stderr.splitlines() if line.startswith("lmforge")]
    assert said == [
        "lmforge: stopped by a signal as the run ended: it trained to step 3 (max_steps) and saved "
        f"{out / 'checkpoints' / 'step-000003'}; nothing is lost"
    ], p.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    assert (out / "loss.png").is_file()


def test_hung_peer_times_out_with_a_one_line_error(data_dir: Path, tmp_path: Path) -> None:
    """SIGSTOP rank 1 mid-run: rank 0 gives up after dist.timeout_s with a clear error, not a hang. (The ranks
    are forked ones, as launch_ranks starts them: the subject is rank 0's timeout, not the launcher.)"""
    import time

    out = tmp_path / "hung"
    args = pretrain_args(data_dir, out, **{"train.max_steps": 100000, "dist.timeout_s": 5, "checkpoint.every": 5})
    warm_zygotes(2, tmp_path)  # (both ranks join within the 5 s)
    store, ranks = start_ranks(args)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "checkpoints" / "step-000005").is_dir():
            assert ranks[0].poll() is None and ranks[1].poll() is None, ranks[0].stderr[-3000:]
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:  # rank 0 gives up after dist.timeout_s and exits
            ranks[0].wait(90)
        except subprocess.TimeoutExpired:
            pass
        waited = time.monotonic() - stopped_at
    finally:
        for r in ranks:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                r.send_signal(sig)
            r.wait(60)
        del store
    assert waited < 90  # gave up after the 5 s collective timeout, not after the test's own limit
    assert ranks[0].returncode == 2, ranks[0].stderr[-3000:]
    line = next(line for line in ranks[0].stderr.splitlines() if line.startswith("lmforge: error: rank 0"))
    assert "a peer died or hung (dist.timeout_s=5)" in line and line.endswith(
        "re-run the same command to resume (torchrun --max-restarts does it automatically)"
    )
    assert (out / "checkpoints" / "step-000005" / "state.json").is_file()


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_comm_failure_names_max_restarts(backend: str, monkeypatch) -> None:
    """torchrun --max-restarts restarts the workers, which resume by themselves: on gloo too (torch 2.13, where an
    earlier torch could not re-form the group and the line left the hint out there)."""
    from lmforge import dist

    monkeypatch.setattr(dist, "backend", lambda: backend)
    line = dist.describe_comm_failure(RuntimeError("Connection closed by peer"), dist.DistInfo(0, 0, 2), 5)
    assert line.endswith("re-run the same command to resume (torchrun --max-restarts does it automatically)"), line


def test_unreachable_rendezvous_is_a_one_line_error(data_dir: Path, tmp_path: Path) -> None:
    """A rank that cannot reach the others (a dead master, a wrong MASTER_PORT) says so in one line
    after dist.timeout_s, before the run directory is made, instead of a torch traceback."""
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = [f"--{k}={v}" for k, v in FLAGS.items()]
    r = run_cli("pretrain", "--data", str(data_dir), "--out", str(tmp_path / "r"), *args, "--dist.timeout_s=2", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lmforge: error: rank 1: cannot connect to the other 1 process(es)"), last
    assert not (tmp_path / "r").exists()


def test_ranks_started_with_other_flags_are_a_one_line_error(data_dir: Path, tmp_path: Path) -> None:
    """Two ranks launched by hand with different settings: before, another d_model was a DDP traceback wall on
    both ranks (another batch size or lr would hang or train apart); now each says which setting differs."""
    from tests.cli_fork import ForkedProcess

    port = str(free_port())
    procs = []
    for rank, d_model in ((0, 32), (1, 64)):  # (each forked from a test zygote that imported torch already)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        args = [f"--{k}={v}" for k, v in {**FLAGS, "model.d_model": d_model, "dist.timeout_s": 60}.items()]
        procs.append(ForkedProcess(["pretrain", f"--data={data_dir}", f"--out={tmp_path / 'r'}", *args], env))
    for p in procs:
        err = p.communicate(timeout=120)[1]
        assert p.returncode == 2, err[-2000:]
        assert err.strip() == (
            "lmforge: error: rank 1 was started with other settings than rank 0 (model.d_model 64 vs 32); "
            "start every rank with the same command and flags"
        ), err[-2000:]
    assert not (tmp_path / "r").exists()


def test_finetune_under_torchrun_is_a_one_line_refusal(tmp_path: Path) -> None:
    """finetune is single-process: under torchrun each rank fine-tuned alone into the same folder, and the
    second said the folder was "being trained by another process" (the first rank)."""
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    train = tmp_path / "train.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    r = run_cli(
        "finetune", str(tmp_path / "base"), "--task=sft", f"--train={train}", f"--out={tmp_path / 'ft'}", env=env
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == (
        "lmforge: error: finetune runs in one process, not under torchrun (2 processes); "
        "run it as 'lmforge finetune ...' (or torchrun --nproc-per-node 1)"
    )
    assert not (tmp_path / "ft").exists()


# lmforge's CLI under torchrun --max-restarts: attempt 0 trains, then rank 1 fails, so torchrun restarts both; in
# attempt 1 rank 0 joins late, so rank 1 looks up rank 0's address before rank 0 has written its new one: rank 0 waits
# until rank 1 is in its join (a file in argv[1]), then until rank 1's join has ended (a wrong address: refused at
# once) or 2 s have passed (the right one: rank 1 waits for rank 0). Before, a fixed 5 s before the CLI, which a rank
# 1 slower to import torch than that (a loaded machine) did not outlast.
RESTARTED_WITH_A_LATE_RANK_0 = """
import os, sys, time
import torch.distributed
from lmforge import cli

rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
marks = sys.argv.pop(1)
joining, joined = os.path.join(marks, "rank1-joining"), os.path.join(marks, "rank1-joined")

def wait_for(path, seconds):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)

init_process_group = torch.distributed.init_process_group
def late_rank_0(*args, **kwargs):
    if attempt == "1" and rank == "1":
        open(joining, "w").close()
        try:
            return init_process_group(*args, **kwargs)
        finally:
            open(joined, "w").close()
    if attempt == "1" and rank == "0":
        wait_for(joining, 120)
        wait_for(joined, 2)
    return init_process_group(*args, **kwargs)
torch.distributed.init_process_group = late_rank_0
try:
    cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
else:
    code = 0
sys.exit(3 if attempt == "0" and rank == "1" else code)
"""


def test_max_restarts_of_the_static_rendezvous_form_a_new_group(data_dir: Path, tmp_path: Path) -> None:
    """torchrun --master-port --max-restarts keeps one store for every attempt: the restarted rank 1 took rank 0's
    address from attempt 0 and every restart failed ('Gloo connectFullMesh failed ... Connection refused')."""
    script = tmp_path / "restarted.py"
    script.write_text(RESTARTED_WITH_A_LATE_RANK_0, encoding="utf-8")
    cmd = torchrun_command(data_dir, tmp_path / "r", entry=(str(script), str(tmp_path)), **{"train.max_steps": 2})
    cmd.insert(3, "--max-restarts=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert "connectFullMesh" not in p.stderr, p.stderr[-3000:]
    assert p.returncode == 0, p.stderr[-3000:]
    assert "is already trained to step 2" in p.stdout  # attempt 1 joined the group and found the run finished
    assert (tmp_path / "rank1-joining").is_file()  # (the restart's rank 1 did look up rank 0 first)


# lmforge's CLI, with rank 1 killed at the first broadcast of set-up (rank 0's claim of the run folder)
RANK1_DIES_IN_SETUP = """
import os, signal, sys
from lmforge import cli, dist

broadcast_object = dist.broadcast_object
def die(obj):
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return broadcast_object(obj)
dist.broadcast_object = die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_peer_dying_in_set_up_is_a_one_line_error(data_dir: Path, tmp_path: Path) -> None:
    """A peer lost between the process group's start and the training loop (claim, config check, DDP's first
    broadcast, resume) left the survivor a gloo traceback wall; now it is the training loop's one line."""
    script = tmp_path / "die.py"
    script.write_text(RANK1_DIES_IN_SETUP, encoding="utf-8")
    from tests.cli_fork import ForkedProcess

    port = str(free_port())
    procs = []
    for rank in (0, 1):  # (each forked from a test zygote that imported torch already)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": str(REPO)}
        args = [f"--{k}={v}" for k, v in {**FLAGS, "dist.timeout_s": 30}.items()]
        cmd = ["pretrain", f"--data={data_dir}", f"--out={tmp_path / 'r'}", *args]
        procs.append(ForkedProcess(cmd, env, cwd=str(REPO), script=str(script)))
    err = procs[0].communicate(timeout=120)[1]
    procs[1].communicate(timeout=120)
    assert procs[0].returncode == 2, err[-2000:]
    assert err.strip().startswith("lmforge: error: rank 0: a collective with the other 1 process(es) failed"), err
    assert len(err.strip().splitlines()) == 1, err[-2000:]


# lmforge's CLI, with rank 0 sending itself SIGINT after step $SIGINT_AFTER (as Ctrl-C or a preemption would):
# the run stops, saves and exits 130 at the end of the next step, which is not an outer sync
SIGINT_AFTER_STEP = """
import os, signal, sys
from lmforge import cli, dist

after_step = dist.DiLoCo.after_step
def interrupt(self, step, last=False):
    after_step(self, step, last)
    if step == int(os.environ["SIGINT_AFTER"]) and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGINT)
dist.DiLoCo.after_step = interrupt
sys.exit(cli.main(sys.argv[1:]))
"""


DILOCO_STEPS = 8
DILOCO_RESUME = {  # 2 workers with outer momentum and dropout, stopped between two syncs and resumed
    "train.micro_batch_size": 4,
    "train.max_steps": DILOCO_STEPS,
    "model.dropout": 0.1,  # the torch RNG matters
    "dist.strategy": "diloco",
    "dist.sync_every": 3,  # syncs at 3, 6 and the last step, 8
    "dist.outer_momentum": 0.9,
}


@pytest.fixture(scope="module")
def diloco_straight(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DILOCO_RESUME run, straight through (checkpoints at steps 3, 6 and 8)."""
    out = tmp_path_factory.mktemp("diloco") / "straight"
    p = forked_ranks(data_dir, out, **DILOCO_RESUME)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_diloco_resume_is_exact(
    data_dir: Path, diloco_straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-worker run with outer momentum, interrupted between two syncs and resumed, ends bitwise where the
    straight run does: each worker gets back its own weights and AdamW moments, and the outer momentum and
    anchor come back too. Resumed by 1 worker instead, it runs on from worker 0's state, with a note."""
    import shutil

    steps, flags, straight = DILOCO_STEPS, DILOCO_RESUME, diloco_straight
    script = tmp_path / "sigint_after_step.py"
    script.write_text(SIGINT_AFTER_STEP, encoding="utf-8")
    out = tmp_path / "interrupted"
    monkeypatch.setenv("SIGINT_AFTER", "4")
    p = forked_ranks(data_dir, out, entry=(str(script),), **flags)
    assert p.returncode != 0 and "interrupted at step 5" in p.stderr, p.stderr[-3000:]
    ckpt = load_checkpoint(out)
    assert ckpt.meta["step"] == 5  # between the syncs at 3 and 6: the workers' weights differ
    files = [f"{kind}-{r:05d}-of-00002.safetensors" for r in range(2) for kind in ("model", "optim")]
    assert list(ckpt.meta["files"]) == [*files, "diloco.safetensors", "tokenizer.json"]
    assert model_files(ckpt.meta) == [files[0]]  # one model (worker 0's) for eval, quantize's sizes, ...
    one_worker = tmp_path / "one-worker"
    shutil.copytree(out, one_worker)

    p = forked_ranks(data_dir, out, **flags)
    assert p.returncode == 0, p.stderr[-3000:]
    assert train_losses(out) == train_losses(straight)
    got, want = weights(out, steps), weights(straight, steps)
    for name in want:
        assert torch.equal(got[name], want[name]), (name, (got[name] - want[name]).abs().max())

    p = forked_ranks(data_dir, one_worker, nproc=1, **flags)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (
        "note: step-000005 holds 2 DiLoCo workers' states and this run has 1: each worker resumes from worker 0's "
        "weights and inner optimizer state, so the resume is not exact" in p.stdout
    ), p.stdout[-3000:]
    assert len(train_losses(one_worker)) == steps


# lmforge's CLI with the training loop's clock made of steps: after step s it reads s seconds, so the
# time budget is found spent at the first step that begins after it (3.5 s: step 5), on any machine
BUDGET_IN_STEPS = """
import sys
from lmforge import cli, dist
from lmforge.train import loop

clock = [0.0]
class StepClock:
    perf_counter = staticmethod(lambda: clock[0])
loop.time = StepClock
after_step = dist.DiLoCo.after_step
def tick(self, step, last=False):
    after_step(self, step, last)
    clock[0] = float(step)
dist.DiLoCo.after_step = tick
sys.exit(cli.main(sys.argv[1:]))
"""


def test_diloco_time_budget_stop_resumes_exactly(data_dir: Path, diloco_straight: Path, tmp_path: Path) -> None:
    """A time budget that stops the workers between two syncs does not sync them (before, it did, so raising
    the budget and training on was not the straight run): the budget raised, the run ends bitwise where the
    straight run does. The stopped checkpoint holds each worker's own weights; readers get worker 0's."""
    script = tmp_path / "budget_in_steps.py"
    script.write_text(BUDGET_IN_STEPS, encoding="utf-8")
    out = tmp_path / "run"
    p = forked_ranks(data_dir, out, entry=(str(script),), **{**DILOCO_RESUME, "train.time_budget": 3.5})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "stopping at step 5 of 8: the time budget of 3.5 s" in p.stdout, p.stdout[-3000:]
    assert "(5x less)" in p.stdout  # 1 sync (step 3) in 5 steps: none at the stop
    assert "note: the time budget stopped the workers between outer syncs, so step-000005 gives" in p.stdout
    ckpt = load_checkpoint(out)
    assert ckpt.meta["step"] == 5 and ckpt.meta["train_state"]["stop_reason"] == "time_budget"
    worker0, worker1 = ckpt.model_state(0), ckpt.model_state(1)
    assert any(not torch.equal(worker0[n], worker1[n]) for n in worker0)  # unsynced: each worker's own
    assert all(torch.equal(t, worker0[n]) for n, t in load_checkpoint(out, verify="weights").model_state().items())

    p = forked_ranks(data_dir, out, **{**DILOCO_RESUME, "train.time_budget": 1000.0})
    assert p.returncode == 0, p.stderr[-3000:]
    assert train_losses(out) == train_losses(diloco_straight)
    got, want = weights(out, DILOCO_STEPS), weights(diloco_straight, DILOCO_STEPS)
    for name in want:
        assert torch.equal(got[name], want[name]), (name, (got[name] - want[name]).abs().max())


def test_diloco_worker_whose_weights_do_not_fit_is_named(data_dir: Path, diloco_straight: Path, tmp_path: Path):
    """Worker 1's weights that pass their checksum but do not fit the model: the one-line error of the resume
    names worker 1's file (before, rank 1 named worker 0's, which fits) and says what to do."""
    import hashlib
    import shutil

    from safetensors.torch import load_file, save_file

    from lmforge.checkpoint import state_sha256

    out = tmp_path / "run"
    shutil.copytree(diloco_straight, out)
    ckpt = out / "checkpoints" / "step-000008"
    damaged = ckpt / "model-00001-of-00002.safetensors"
    tensors = load_file(str(damaged))
    tensors[sorted(tensors)[0]] = torch.zeros(3, 3)
    save_file(tensors, str(damaged), {"format": "pt"})  # e.g. copied in from another run
    meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    meta["files"][damaged.name] = {
        "bytes": damaged.stat().st_size,
        "sha256": hashlib.sha256(damaged.read_bytes()).hexdigest(),
    }
    meta["state_sha256"] = state_sha256(meta)  # a forged, consistent state.json: only the weights do not fit
    (ckpt / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    p = forked_ranks(data_dir, out, **{**DILOCO_RESUME, "train.max_steps": 10})
    assert p.returncode != 0
    # (rank 0, whose weights load, is stopped by torchrun, or finds its peer gone: its line names no file)
    errors = [line for line in p.stderr.splitlines() if line.startswith(f"lmforge: error: {damaged} ")]
    assert len(errors) == 1 and "model-00000-of-00002" not in p.stderr, p.stderr[-3000:]
    assert errors[0].startswith(f"lmforge: error: {damaged} does not match the model (size mismatch for "), errors
    assert errors[0].endswith("Use an earlier checkpoint (to resume from one: --checkpoint.resume_from step-NNNNNN)")


def test_diloco_checkpoint_names_the_file_that_does_not_fit(tmp_path: Path) -> None:
    """Each worker's weights load from its own file, and a file that does not fit is the one named (before,
    worker 0's always was); so is a damaged or missing worker file, and outer state of another shape
    (before: a traceback from copy_, or a silent broadcast of a smaller tensor into the anchor)."""
    from safetensors.torch import save_file

    from lmforge.checkpoint import DILOCO_FILE, begin_checkpoint, finish_checkpoint, shard_files, write_shard
    from lmforge.dist import DiLoCo, DistConfig
    from lmforge.errors import CheckpointError

    model = torch.nn.Linear(4, 4)
    workers = [model.state_dict(), {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}, {"weight": torch.zeros(4, 4)}]
    tmp = begin_checkpoint(tmp_path, 5)
    for rank, weights_of_rank in enumerate(workers):
        write_shard(tmp, rank, 3, weights_of_rank, {})
    diloco = DiLoCo(model, DistConfig(strategy="diloco"), torch.device("cpu"))
    save_file({**diloco.state_dict(), "momentum.bias": torch.zeros(1)}, str(tmp / DILOCO_FILE))
    meta = {"sharded": {"world_size": 3, "model": [], "optim": [], "tied": {}}, "diloco": {"workers": 3}}
    files = [name for rank in range(3) for name in shard_files(rank, 3)] + [DILOCO_FILE]
    path = finish_checkpoint(tmp, step=5, files=files, meta=meta)
    ckpt = load_checkpoint(path)
    ckpt.load_model(model, 0)  # worker 0's fit
    with pytest.raises(
        CheckpointError, match=r"model-00001-of-00003\.safetensors does not match the model \(size mismatch for weight"
    ) as e:
        ckpt.load_model(model, 1)
    assert "\n" not in str(e.value)
    with pytest.raises(
        CheckpointError, match=r"model-00002-of-00003\.safetensors does not match the model \(missing \['bias'\]"
    ):
        ckpt.load_model(model, 2)
    with pytest.raises(
        CheckpointError, match=r"diloco\.safetensors has no momentum\.bias of shape \[4\]; was it written"
    ):
        diloco.load_checkpoint(ckpt)
    (path / shard_files(2, 3)[0]).write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors is 7 bytes"):
        load_checkpoint(path)
    (path / shard_files(2, 3)[0]).unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors is missing"):
        load_checkpoint(path)


# lmforge's CLI with the causal-LM loss NaN on rank 1 only, for the micro-batch calls listed in argv[1]
NAN_ON_RANK_1 = """
import os, sys
from lmforge import cli
from lmforge.objectives import CausalLM

bad = {int(c) for c in sys.argv.pop(1).split(",")}
real, calls = CausalLM.loss, [0]
def loss(self, model, batch):
    value = real(self, model, batch)
    calls[0] += 1
    return value * float("nan") if os.environ["RANK"] == "1" and calls[0] - 1 in bad else value
CausalLM.loss = loss
cli.main(sys.argv[1:])
"""


def test_diloco_workers_skip_and_roll_back_together(data_dir: Path, tmp_path: Path) -> None:
    """DiLoCo's workers do not share gradients, so a NaN on one worker is that worker's alone: whether a
    step is finite is all-reduced, every worker skips it and they roll back together. (Before, rank 1
    rolled back alone and the two ranks' collectives no longer matched: hung until dist.timeout_s.)"""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1, encoding="utf-8")
    out = tmp_path / "run"
    # micro-batch 4 of a global batch 8 on 2 ranks: one loss call per step, so calls 3 and 4 are steps 4 and 5
    flags = {"train.micro_batch_size": 4, "dist.strategy": "diloco", "dist.sync_every": 2}
    flags |= {"train.rollback_after": 2, "dist.timeout_s": 60}
    p = forked_ranks(data_dir, out, entry=(str(script), "3,4"), **flags)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "non-finite steps in a row at step 5; rolled back to step 3" in p.stdout + p.stderr
    assert "(1.5x less)" in p.stdout, p.stdout[-2000:]  # 4 syncs in 6 steps: 2, 4, 4 again after the rollback, 6
    losses = train_losses(out)
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
