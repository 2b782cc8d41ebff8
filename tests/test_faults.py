"""Fault handling in the training loop: non-finite steps are skipped, repeated ones roll back to the
latest checkpoint (keeping the data moving), a run that keeps diverging stops with a one-line error,
and a failing disk while saving leaves the previous checkpoint intact.

Faults are injected into the real objective (NaN losses at chosen steps), not simulated.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import CheckpointError, TrainingDiverged
from lmforge.objectives import CausalLM
from lmforge.train.run import pretrain
from tests.conftest import run_cli, tiny_config


def inject_nan(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> None:
    """Make the causal-LM loss NaN on the given calls (one call per micro-batch, counted from 0)."""
    real = CausalLM.loss
    calls = {"n": 0}

    def loss(self, model, batch):
        value = real(self, model, batch)
        calls["n"] += 1
        return value * float("nan") if calls["n"] - 1 in bad_calls else value

    monkeypatch.setattr(CausalLM, "loss", loss)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_nan_steps_are_skipped_then_rolled_back(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    # One micro-batch per step, so call i is step i + 1. Steps 6 and 7 are NaN: skipped, 2 in a row, no
    # rollback. Step 8 is fine and checkpointed. Steps 9, 10, 11 are NaN: the 3rd in a row rolls back to
    # step 8, and training goes on with the next batches to step 12.
    inject_nan(monkeypatch, {5, 6, 8, 9, 10})
    cfg = tiny_config(data_dir, tmp_path / "run", **{"checkpoint.every": 4, "train.rollback_after": 3, "eval.every": 0})
    state = pretrain(cfg, progress=False)
    assert state.step == cfg.train.max_steps and state.rollbacks == 1
    assert state.skipped_steps == 5
    steps = [r["step"] for r in records(tmp_path / "run") if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == cfg.train.max_steps  # metrics truncated on rollback
    final = load_file(str(tmp_path / "run" / "checkpoints" / "step-000012" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())
    logged = [r for r in records(tmp_path / "run") if "skipped_steps" in r]
    assert logged[-1]["skipped_steps"] == 5
    assert not any(math.isnan(r["loss"]) for r in logged if r["step"] <= 5)


def test_diverging_without_checkpoint_is_one_clear_error(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    inject_nan(monkeypatch, set(range(100)))
    cfg = tiny_config(data_dir, tmp_path / "run", **{"train.rollback_after": 3})
    with pytest.raises(TrainingDiverged, match="no checkpoint to roll back to; lower --train.lr"):
        pretrain(cfg, progress=False)


def test_repeated_rollbacks_give_up(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    inject_nan(monkeypatch, set(range(2, 100)))  # from step 3 on, every step is NaN
    cfg = tiny_config(data_dir, tmp_path / "run", **{"checkpoint.every": 2, "train.rollback_after": 2})
    with pytest.raises(TrainingDiverged, match="diverged again after 3 rollbacks"):
        pretrain(cfg, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "state.json").is_file()


def test_a_rollback_starts_a_recurrent_models_carried_state_over(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """An LSTM's carried state that went NaN (as an fp16 overflow makes it) was kept through the rollback, which
    restores weights, optimizer and RNG: every later step was NaN again, and the run ended "diverged again after
    3 rollbacks; lower --train.lr". The rollback now starts the state over from zeros, and the run trains on."""
    import dataclasses

    from lmforge.objectives import CarriedStateLM
    from tests.test_rnn import _cfg

    real, calls = CarriedStateLM.loss, {"n": 0}

    def loss(self, model, batch):
        value = real(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 6:  # step 6 (one micro-batch a step): the state it carries on is NaN from here
            self.state.h.fill_(float("nan"))
        return value

    monkeypatch.setattr(CarriedStateLM, "loss", loss)
    cfg = _cfg(data_dir, tmp_path / "run")
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, micro_batch_size=8, max_steps=8, rollback_after=2),
        eval=dataclasses.replace(cfg.eval, every=0),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=4),
    )
    state = pretrain(cfg, progress=False)  # steps 7 and 8 NaN: back to step 4, then 5 to 8 train
    assert (state.step, state.rollbacks, state.skipped_steps) == (8, 1, 2)
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path / "run") if "loss" in r)


@pytest.mark.parametrize("lr", [1e6, 1e39], ids=["nan-loss", "inf-weights"])
def test_a_diverging_run_never_checkpoints_its_broken_weights(data_dir: Path, tmp_path: Path, lr: float) -> None:
    """A real divergence, no injected NaN: after step 1 at lr 1e6 every loss is NaN (the weights stay finite); at
    1e39 the weights overflow to inf. The step-5 checkpoint of those weights became `latest`, the rollbacks went
    back to it, and the run ended "diverged again after 3 rollbacks" leaving it as the run's latest checkpoint."""
    from lmforge.checkpoint import latest_checkpoint

    flags = {"train.lr": lr, "train.warmup_steps": 0, "optim.grad_clip": 0.0, "eval.every": 0}
    cfg = tiny_config(data_dir, tmp_path / "run", **flags, **{"checkpoint.every": 5, "train.rollback_after": 5})
    with pytest.raises(TrainingDiverged, match="no checkpoint to roll back to"):
        pretrain(cfg, progress=False)
    assert latest_checkpoint(tmp_path / "run") is None


def test_weights_gone_inf_at_the_end_of_a_run_are_one_line_and_not_saved(data_dir: Path, tmp_path: Path) -> None:
    """Without rollbacks the run reached max_steps and saved its inf weights as the finished run's checkpoint."""
    flags = {"train.lr": 1e39, "train.warmup_steps": 0, "optim.grad_clip": 0.0, "eval.every": 0}
    cfg = tiny_config(data_dir, tmp_path / "run", **flags, **{"train.max_steps": 3, "train.rollback_after": 0})
    with pytest.raises(TrainingDiverged, match="weights became NaN/inf by step 3, so they are not saved"):
        pretrain(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_failing_disk_while_saving_keeps_the_previous_checkpoint(data_dir: Path, tmp_path: Path, monkeypatch):
    """The writer fails half-way through the second checkpoint (as on a full disk)."""
    import lmforge.checkpoint as ckpt

    run = tmp_path / "run"
    real = ckpt.save_safetensors
    calls = {"n": 0}

    def failing_save_file(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if Path(path).parent.name.startswith("step-000012"):
            Path(path).write_bytes(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(28, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_safetensors", failing_save_file)
    cfg = tiny_config(data_dir, run, **{"train.max_steps": 12, "checkpoint.every": 6, "eval.every": 0})
    with pytest.raises(CheckpointError, match="No space left.*resume from step-000006"):
        pretrain(cfg, progress=False)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000006"
    assert not (run / "checkpoints" / "step-000012.tmp").exists()  # the partial folder gave its space back
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))  # verifies sizes and sha256
    assert loaded.meta["step"] == 6
    monkeypatch.setattr(ckpt, "save_safetensors", real)
    state = pretrain(cfg, progress=False)  # the same command resumes from step 6 and finishes
    assert state.step == 12


def test_failing_disk_while_saving_per_rank_files_keeps_the_previous_checkpoint(
    data_dir: Path, tmp_path: Path, monkeypatch
):
    """The per-rank writer (sharded FSDP2 and DiLoCo checkpoints; DiLoCo runs in one process) fails half-way
    through the second checkpoint: one line naming the checkpoint to resume from, and the partial folder,
    which held the space the next try needs, is gone (it was left, and the error said nothing of resuming)."""
    import lmforge.checkpoint as ckpt

    run = tmp_path / "run"
    real = ckpt.save_safetensors

    def failing_save_file(tensors, path, *args, **kwargs):
        if Path(path).parent.name.startswith("step-000004") and Path(path).name.startswith("optim"):
            Path(path).write_bytes(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(28, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_safetensors", failing_save_file)
    flags = {"train.max_steps": 4, "checkpoint.every": 2, "eval.every": 0, "dist.strategy": "diloco"}
    cfg = tiny_config(data_dir, run, **flags, **{"dist.sync_every": 2})
    with pytest.raises(CheckpointError, match="could not write checkpoint step-000004.*resume from step-000002"):
        pretrain(cfg, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000002"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run)).meta["step"] == 2  # verifies sizes and sha256


SMALL = ["--model.d_model", "32", "--model.max_seq_len", "32", "--train.batch_size", "8", "--eval.every", "0"]
SMALL += ["--train.log_every", "1"]


def _pretrain_cli(data_dir: Path, run: Path) -> list[str]:
    return ["pretrain", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--quiet"]


@pytest.fixture(scope="module")
def four_steps(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLI run of 4 steps that each write-error test resumes (a copy of it)."""
    run = tmp_path_factory.mktemp("four-steps") / "run"
    first = run_cli(*_pretrain_cli(data_dir, run), *SMALL, "--train.max_steps", "4", "--checkpoint.every", "4")
    assert first.returncode == 0, first.stderr
    return run


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="RLIMIT_FSIZE as on Linux")
@pytest.mark.parametrize("fails", ["optim", "all but small files"])
def test_a_real_write_error_while_saving_is_one_line(data_dir: Path, four_steps: Path, tmp_path: Path, fails: str):
    """A real failed write (a file-size limit, as a full disk: safetensors raises its own SafetensorError,
    which was a traceback) is one line naming the checkpoint to resume from; the partial folder is gone, and
    the same command, once there is room, resumes from the previous checkpoint to the uninterrupted run's weights
    and metrics. When loss.png could not be redrawn either (a limit below its size, as a disk that stays full), that
    second failure, on the way out, replaced the line with a bare "[Errno 27] File too large"."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    base, small = _pretrain_cli(data_dir, run), SMALL
    limit = (run / "checkpoints" / "step-000004" / "model.safetensors").stat().st_size + 1000  # < optim's 2x
    if fails != "optim":
        limit = 6_000  # config.json, status.json, metrics.jsonl fit; the weights and loss.png do not
        assert (run / "loss.png").stat().st_size > limit

    def limit_file_size() -> None:  # in the child: writes past `limit` fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    second = run_cli(*base, *small, "--train.max_steps", "8", "--checkpoint.every", "4", preexec_fn=limit_file_size)
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert "could not write checkpoint step-000008" in second.stderr and "resume from step-000004" in second.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000004"]
    if fails == "optim":
        return
    third = run_cli(*base, *small, "--train.max_steps", "8", "--checkpoint.every", "4")
    assert third.returncode == 0, third.stderr
    straight = tmp_path / "straight"
    run_cli(*base[:4], str(straight), *base[5:], *small, "--train.max_steps", "8", "--checkpoint.every", "4")
    final = [load_file(str(r / "checkpoints" / "step-000008" / "model.safetensors")) for r in (run, straight)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])
    assert [{k: r[k] for k in ("step", "loss")} for r in records(run) if "loss" in r] == [
        {k: r[k] for k in ("step", "loss")} for r in records(straight) if "loss" in r
    ]


def test_a_finished_run_that_cannot_redraw_loss_png_warns_and_exits_0(data_dir: Path, tmp_path: Path) -> None:
    """A run whose final checkpoint was saved but whose loss.png could not be redrawn at the end (here a folder of
    the user's in its way; a full disk alike) exited 2 with that error, its status.json left "running": its work
    is saved, so the plot is now one warning line and the run exits 0, finished."""
    run = tmp_path / "run"
    base = ["pretrain", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--quiet", "--eval.every", "0"]
    base += ["--model.d_model", "32", "--model.max_seq_len", "32", "--train.batch_size", "8", "--checkpoint.every", "2"]
    assert run_cli(*base, "--train.max_steps", "2").returncode == 0
    (run / "loss.png").unlink()
    (run / "loss.png").mkdir()
    (run / "loss.png" / "mine.txt").write_text("the user's own file", encoding="utf-8")
    result = run_cli(*base, "--train.max_steps", "4")  # resumed from step 2: the last records are drawn at the end
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"warning: could not redraw {run / 'loss.png'}: Is a directory; the checkpoints and metrics.jsonl are saved\n"
    )
    assert (run / "checkpoints" / "step-000004" / "state.json").is_file()
    assert json.loads((run / "status.json").read_text(encoding="utf-8"))["status"] == "finished"
    assert [p.name for p in (run / "loss.png").iterdir()] == ["mine.txt"] and not list(run.glob(".loss.png*"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="POSIX permissions, which root ignores")
def test_write_permission_lost_mid_run_names_the_checkpoint_to_resume_from(data_dir: Path, tmp_path: Path) -> None:
    """checkpoints/ made read-only between two saves (a permission lost mid-run): the save's error says which
    checkpoint the same command resumes from (it was a bare "[Errno 13] Permission denied: '.../step-000012.tmp'"),
    and once the permission is back it does, to the end."""
    run = tmp_path / "run"
    flags = {"train.max_steps": 6, "checkpoint.every": 6, "eval.every": 0}
    pretrain(tiny_config(data_dir, run, **flags), progress=False)
    (run / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match=r"step-000012 .*Permission denied.*resume from step-000006"):
            pretrain(tiny_config(data_dir, run, **{**flags, "train.max_steps": 12}), progress=False)
    finally:
        (run / "checkpoints").chmod(0o755)
    assert pretrain(tiny_config(data_dir, run, **{**flags, "train.max_steps": 12}), progress=False).step == 12


def test_damaged_latest_checkpoint_names_the_file_and_previous_falls_back(data_dir: Path, tmp_path: Path) -> None:
    from lmforge.errors import CheckpointError

    run = tmp_path / "run"
    flags = {"train.max_steps": 12, "checkpoint.every": 6, "eval.every": 0}
    pretrain(tiny_config(data_dir, run, **flags), progress=False)
    damaged = run / "checkpoints" / "step-000012" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit: same size, wrong sha256
    damaged.write_bytes(bytes(data))

    longer = {**flags, "train.max_steps": 18}
    with pytest.raises(CheckpointError, match=r"model\.safetensors fails its sha256 check.*resume_from previous"):
        pretrain(tiny_config(data_dir, run, **longer), progress=False)
    state = pretrain(tiny_config(data_dir, run, **longer, **{"checkpoint.resume_from": "previous"}), progress=False)
    assert state.step == 18
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert steps == list(range(1, 19))  # resumed from step 6: records 7-12 were rewritten, not duplicated

    with pytest.raises(CheckpointError, match="is not a complete checkpoint.*step-000006"):
        pretrain(tiny_config(data_dir, run, **{**longer, "checkpoint.resume_from": "step-000007"}), progress=False)


def test_resuming_from_an_earlier_step_sets_the_later_checkpoints_aside(data_dir: Path, tmp_path: Path) -> None:
    """The later checkpoints belong to the timeline being abandoned: left in place, pruning (which keeps the
    highest steps) deleted the new run's checkpoints and `previous` resumed the abandoned step 20."""
    from lmforge.checkpoint import list_checkpoints
    from lmforge.errors import ConfigError

    run = tmp_path / "run"
    flags = {"train.max_steps": 20, "checkpoint.every": 5, "eval.every": 0, "checkpoint.keep": 10}
    pretrain(tiny_config(data_dir, run, **flags), progress=False)
    again = {**flags, "train.max_steps": 12, "checkpoint.keep": 2, "checkpoint.resume_from": "step-000005"}
    pretrain(tiny_config(data_dir, run, **again), progress=False)
    assert [p.name for p in list_checkpoints(run)] == ["step-000010", "step-000012"]
    (aside,) = (run / "checkpoints").glob("abandoned-after-step-000005-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-000010", "step-000015", "step-000020"]  # kept
    state = pretrain(
        tiny_config(data_dir, run, **{**again, "train.max_steps": 14, "checkpoint.resume_from": "previous"}),
        progress=False,
    )
    assert state.step == 14 and [r["step"] for r in records(run) if "loss" in r] == list(range(1, 15))
    with pytest.raises(ConfigError, match="has no checkpoint to resume from"):
        pretrain(tiny_config(data_dir, tmp_path / "new", **again), progress=False)
    assert not (tmp_path / "new").exists() or not list_checkpoints(tmp_path / "new")


def test_failed_resume_writes_nothing_into_the_run(data_dir: Path, tmp_path: Path) -> None:
    """A resume that cannot load its checkpoint leaves config.json, env.json, metrics and status as they were
    (config.json used to claim the new train.max_steps of a resume that never happened)."""
    from lmforge.errors import CheckpointError

    run = tmp_path / "run"
    flags = {"train.max_steps": 12, "checkpoint.every": 6, "eval.every": 0}
    pretrain(tiny_config(data_dir, run, **flags), progress=False)
    (run / "checkpoints" / "step-000012" / "state.json").write_text('{"step": 12', encoding="utf-8")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert {"config.json", "env.json", "metrics.jsonl", "status.json"} <= before.keys()
    with pytest.raises(CheckpointError, match=r"state\.json"):
        pretrain(tiny_config(data_dir, run, **{**flags, "train.max_steps": 14, "train.lr": 1e-4}), progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("nan_calls", [set(), {5, 6}])
def test_deferred_finite_check_changes_nothing(data_dir: Path, tmp_path: Path, monkeypatch, nan_calls) -> None:
    """On CUDA a step's NaN check is read one step late (fused AdamW skips on the device flag): the weights,
    optimizer state and skip count are exactly those of the check made at once. Run here on CPU's fused
    AdamW, which takes the same flag; log_every 100 so most steps take the deferred path."""
    import lmforge.train.loop as loop

    inject_nan(monkeypatch, nan_calls)
    flags = {"checkpoint.every": 4, "train.rollback_after": 3, "eval.every": 0, "train.log_every": 100}
    results = {}
    for defer in (False, True):
        monkeypatch.setattr(loop, "DEFER_FINITE_CHECK", defer)
        run = tmp_path / f"defer-{defer}"
        state = pretrain(tiny_config(data_dir, run, **flags), progress=False)
        ckpt = run / "checkpoints" / "step-000012"
        results[defer] = (state.skipped_steps, load_file(str(ckpt / "model.safetensors")), ckpt)
        inject_nan(monkeypatch, nan_calls)  # count calls from 0 again
    assert results[False][0] == results[True][0] == len(nan_calls)
    for name, tensor in results[False][1].items():
        assert torch.equal(tensor, results[True][1][name]), name
    optim = [sorted(p.name for p in results[d][2].iterdir() if "optim" in p.name) for d in (False, True)]
    assert optim[0] and optim[0] == optim[1]
    for name in optim[0]:
        a, b = (load_file(str(results[d][2] / name)) for d in (False, True))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_deferred_finite_check_rolls_back(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Three NaN steps in a row on plain (deferred) steps still roll back, one batch later, and the run ends
    with finite weights and every skip counted."""
    import lmforge.train.loop as loop

    monkeypatch.setattr(loop, "DEFER_FINITE_CHECK", True)
    inject_nan(monkeypatch, {5, 6, 8, 9, 10})  # steps 6, 7 skipped; 9, 10, 11 skipped -> back to step 8
    flags = {"checkpoint.every": 4, "train.rollback_after": 3, "eval.every": 0, "train.log_every": 100}
    state = pretrain(tiny_config(data_dir, tmp_path / "run", **flags), progress=False)
    assert state.step == 12 and state.rollbacks == 1 and state.skipped_steps == 5
    final = load_file(str(tmp_path / "run" / "checkpoints" / "step-000012" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line `lmforge ARGV`, run in this process, exits 2 with."""
    from lmforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as on Linux")
@pytest.mark.parametrize("limit", [1, 2_000, 30_000])  # the build folder's marker, a split's texts, the shards
def test_prepare_onto_a_full_disk_is_one_line_naming_out_and_keeps_the_old_one(
    corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], limit: int
) -> None:
    """`prepare --overwrite` whose writes fail (a real EFBIG from a file-size limit, as a full disk) says which --out
    and what to do in one line ("[Errno 27] File too large", no file named, it was), leaves the data directory it
    was replacing as it was, and no build folder."""
    from tests.conftest import file_size_limit

    out = tmp_path / "data"
    argv = ["prepare", str(corpus_file), "--out", str(out), "--tokenizer", "char", "--quiet"]
    from lmforge.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with file_size_limit(limit):
        err = cli_error([*argv, "--overwrite", "--dedup", "none"], capsys)
    assert err.startswith(f"lmforge: error: cannot write {out}") and "file too large" in err, err
    assert "choose another --out" in err and ".lmforge-tmp" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as on Linux")
@pytest.mark.parametrize("limit", [1, 500, 20_000])  # the marker, config.json, model.safetensors
def test_export_onto_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], limit: int
) -> None:
    """`export --overwrite` whose writes fail (a real EFBIG) names the file as it would be in --out (not the hidden
    build folder's, nor no file at all: "[Errno 27] File too large") and what to do, in one line; the earlier export
    is as it was and no build folder is left."""
    from lmforge.tokenizer.train import train_char
    from tests.conftest import file_size_limit, shakespeare_text
    from tests.test_export import make_run

    run = make_run(tmp_path / "run", train_char([shakespeare_text(5_000)]))
    out = tmp_path / "hf"
    from lmforge.cli import main

    with pytest.raises(SystemExit):
        main(["export", str(run), "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with file_size_limit(limit):
        err = cli_error(["export", str(run), "--out", str(out), "--overwrite"], capsys)
    assert err.startswith(f"lmforge: error: cannot write {out}") and "file too large" in err, err
    assert ".lmforge-tmp" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as on Linux")
def test_quantize_onto_a_full_disk_names_out_not_its_build_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`quantize --overwrite` whose checkpoint write fails (a real EFBIG) names --out's checkpoints, not the hidden
    `.q.lmforge-tmp-<random>/checkpoints/...` it is built in, and the earlier quantized run stays as it was."""
    from lmforge.cli import main
    from lmforge.tokenizer.train import train_char
    from tests.conftest import file_size_limit, shakespeare_text
    from tests.test_export import make_run

    run = make_run(tmp_path / "run", train_char([shakespeare_text(5_000)]))
    out = tmp_path / "q"
    with pytest.raises(SystemExit):
        main(["quantize", str(run), "--out", str(out), "--no-compare"])
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with file_size_limit(2_000):
        err = cli_error(["quantize", str(run), "--out", str(out), "--no-compare", "--overwrite"], capsys)
    assert f"could not write checkpoint step-000007 in {out / 'checkpoints'} (" in err, err
    assert ".lmforge-tmp" not in err and "File too large" in err
    assert {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "run"]
