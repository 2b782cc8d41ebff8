"""A torchrun run ends with one final line, rank 0's, not one per rank (cli._quiet_rank).

The ranks are forked as torchrun starts them (tests/test_dist.py: launch_ranks, with TORCHELASTIC_RUN_ID set as
torchrun sets it); stderr is every rank's, in rank order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_dist import SIGINT_AFTER_STEP, forked_ranks

pytestmark = pytest.mark.dist

# rank 1 fails alone after the ranks joined (a file of its own, say), as a rank-local error would
RANK1_FAILS_ALONE = """
import os, sys
from lmforge import cli, dist
from lmforge.errors import CheckpointError

check_same_config = dist.check_same_config
def fail(*args):
    check_same_config(*args)
    if os.environ["RANK"] == "1":
        raise CheckpointError("rank 1's own failure; fix it")
dist.check_same_config = fail
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lmforge:")]


def test_a_refusal_is_printed_once(data_dir: Path, tmp_path: Path) -> None:
    """Before the ranks join (a setting refused by load_config) and after (a refusal of the settings they share,
    checked equal): each rank printed the line; now rank 0 alone does, and the run's status is its 2."""
    p = forked_ranks(data_dir, tmp_path / "r", **{"dist.sync_every": 5})
    assert p.returncode == 2 and errors(p.stderr) == [
        "lmforge: error: dist.sync_every is read only by --dist.strategy diloco (local SGD), not by ddp; drop it, "
        "or pass --dist.strategy diloco"
    ], p.stderr[-2000:]
    p = forked_ranks(data_dir, tmp_path / "r", **{"checkpoint.sharded": True})
    assert p.returncode == 2 and errors(p.stderr) == [
        "lmforge: error: --checkpoint.sharded needs --dist.strategy fsdp: under ddp every rank holds the whole "
        "model; drop --checkpoint.sharded (checkpoints are then consolidated)"
    ], p.stderr[-2000:]


def test_a_rank_local_failure_still_prints(data_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "rank1_fails.py"
    script.write_text(RANK1_FAILS_ALONE, encoding="utf-8")
    p = forked_ranks(data_dir, tmp_path / "r", entry=(str(script),), **{"dist.timeout_s": 20})
    assert p.returncode == 2 and "lmforge: error: rank 1's own failure; fix it" in errors(p.stderr), p.stderr[-2000:]


def test_an_interrupted_run_says_so_once(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT on rank 0 after step 1: every rank stops at step 2 and saves; the line saying where and how to resume
    came once per rank, and rank 0's could be cut off by the launcher stopping it when rank 1 exited first."""
    script = tmp_path / "sigint_after_step.py"
    script.write_text(SIGINT_AFTER_STEP, encoding="utf-8")
    monkeypatch.setenv("SIGINT_AFTER", "1")
    flags = {"dist.strategy": "diloco", "dist.sync_every": 4, "train.max_steps": 4, "eval.every": 0}
    p = forked_ranks(data_dir, tmp_path / "r", entry=(str(script),), **flags)
    said = errors(p.stderr)
    assert p.returncode == 130 and len(said) == 1, p.stderr[-2000:]
    assert said[0].startswith("lmforge: interrupted at step 2; saved ") and "re-run the same command" in said[0]


def test_a_damaged_checkpoint_is_reported_once(data_dir: Path, tmp_path: Path) -> None:
    """Every rank checks the consolidated checkpoint it resumes from and found the same damaged file: each printed
    the line; now rank 0 alone does, and the run's status is still 2."""
    out = tmp_path / "r"
    assert forked_ranks(data_dir, out, nproc=1, **{"train.max_steps": 3, "eval.every": 0}).returncode == 0
    weights = out / "checkpoints" / "step-000003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern: same size, wrong sha256
    weights.write_bytes(bytes(data))
    p = forked_ranks(data_dir, out, **{"train.max_steps": 6, "eval.every": 0})
    assert p.returncode == 2 and errors(p.stderr) == [
        f"lmforge: error: {weights} fails its sha256 check (damaged); use an earlier checkpoint (re-run with "
        "--checkpoint.resume_from previous)"
    ], p.stderr[-2000:]


def test_a_refusal_of_rank_0s_setup_is_printed_once(data_dir: Path, tmp_path: Path) -> None:
    """Rank 0 alone checks --out and claims it (train/run.py: claim_and_prepare) and passes its refusal to the other
    ranks, which raised it too: each printed the line; now rank 0 alone does, and the run's status is still 2."""
    out = data_dir.parent  # holds the data it reads: check_run_out refuses it
    p = forked_ranks(data_dir, out, **{"train.max_steps": 1, "eval.every": 0})
    assert p.returncode == 2 and errors(p.stderr) == [
        f"lmforge: error: --out {out} holds {data_dir}, which this command reads (training writes into --out, and "
        "--overwrite deletes it); choose another --out"
    ], p.stderr[-2000:]
