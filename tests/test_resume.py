"""Exact resume: a run interrupted and resumed ends bit-identical (weights and logged numbers) to a
straight run; SIGINT saves and exits 130; SIGKILL at any moment leaves a loadable checkpoint."""

from __future__ import annotations

import re
import shutil
import signal
import time

import pytest
from safetensors.torch import load_file

from lmforge.checkpoint import latest_checkpoint, load_checkpoint
from lmforge.log import read_metrics
from lmforge.train.run import pretrain
from tests.conftest import REPO, run_cli, start_cli, tiny_config

# Numbers that depend on the run's history, not on wall-clock.
DETERMINISTIC = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss", "val_bpb", "val_ppl")


def _numbers(run):
    return [{k: r[k] for k in DETERMINISTIC if k in r} for r in read_metrics(run / "metrics.jsonl")]


def _final_weights(run):
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def _assert_same_run(a, b):
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), f"{k} differs"  # bitwise, not approximately
    assert _numbers(a) == _numbers(b)


def test_resume_from_checkpoint_is_bit_identical(data_dir, tmp_path):
    overrides = {"model.dropout": 0.1, "train.micro_batch_size": 4}  # dropout + accumulation: RNG and loader matter
    _crash_after_step_6_and_resume(data_dir, tmp_path, overrides)


def _crash_after_step_6_and_resume(data_dir, tmp_path, overrides):
    """A straight 12-step run vs a crash right after the step-6 checkpoint (later ones dropped), re-run."""
    straight = tmp_path / "straight"
    pretrain(tiny_config(data_dir, straight, **overrides), progress=False)
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000012")
    (crashed / "checkpoints" / "latest").write_text("step-000006\n", encoding="utf-8")
    state = pretrain(tiny_config(data_dir, crashed, **overrides), progress=False)
    assert state.step == 12
    _assert_same_run(straight, crashed)


def test_different_model_config_on_existing_run_is_an_error(data_dir, tmp_path):
    from lmforge.errors import ConfigError

    pretrain(tiny_config(data_dir, tmp_path / "run", **{"train.max_steps": 2}), progress=False)
    with pytest.raises(ConfigError, match="different model config.*--overwrite"):
        pretrain(tiny_config(data_dir, tmp_path / "run", **{"model.n_layer": 3}), progress=False)
    state = pretrain(tiny_config(data_dir, tmp_path / "run", **{"model.n_layer": 3}), overwrite=True, progress=False)
    assert state.step == 12


def test_a_run_from_an_older_lmforge_without_newer_model_settings_resumes(data_dir, tmp_path):
    """A run written before model.qkv_bias / model.qk_norm existed has no such keys in its config.json and
    checkpoints: it resumes with them at their defaults (it was refused as "a different model config
    (qkv_bias None -> False)"), and a real change is still refused."""
    import json

    from lmforge.checkpoint import state_sha256
    from lmforge.errors import ConfigError

    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 2}), progress=False)
    for path in [run / "config.json", *(run / "checkpoints").glob("step-*/state.json")]:
        saved = json.loads(path.read_text(encoding="utf-8"))
        config = saved.get("config", saved)
        del config["model"]["qkv_bias"], config["model"]["qk_norm"]
        if "state_sha256" in saved:
            saved["state_sha256"] = state_sha256(saved)
        path.write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"different model config \(n_layer 2 -> 3\)"):
        pretrain(tiny_config(data_dir, run, **{"train.max_steps": 3, "model.n_layer": 3}), progress=False)
    assert pretrain(tiny_config(data_dir, run, **{"train.max_steps": 3}), progress=False).step == 3


def test_resume_applies_changed_optimizer_settings_and_refuses_another_optimizer(data_dir, tmp_path):
    """torch's load_state_dict brings back the saved group settings: a resume with a new weight decay
    trained with the old one while config.json said the new one. The config wins now; another optimizer
    is a one-line error (it was a KeyError traceback from inside SGD)."""
    from lmforge.errors import ConfigError

    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 4, "checkpoint.every": 4}), progress=False)
    changed = {"train.max_steps": 6, "checkpoint.every": 2, "optim.weight_decay": 0.0, "optim.beta2": 0.5}
    pretrain(tiny_config(data_dir, run, **changed), progress=False)
    groups = load_checkpoint(run).meta["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0} and {tuple(g["betas"]) for g in groups} == {(0.9, 0.5)}
    with pytest.raises(ConfigError, match="trained with --optim.name adamw.*resume with --optim.name adamw"):
        sgd = {k: v for k, v in changed.items() if k != "optim.beta2"}  # (SGD reads no beta2: refused by name)
        pretrain(tiny_config(data_dir, run, **{**sgd, "train.max_steps": 8, "optim.name": "sgd"}), progress=False)


def _pretrain_args(data_dir, out, steps, every):
    return [
        "pretrain", "--data", str(data_dir), "--out", str(out), "--preset", "tiny",
        "--model.n_layer", "2", "--model.d_model", "32", "--model.max_seq_len", "32",
        "--train.batch_size", "8", "--train.max_steps", str(steps), "--train.log_every", "1",
        "--eval.every", "50", "--eval.max_batches", "2", "--checkpoint.every", str(every), "--checkpoint.keep", "2",
    ]  # fmt: skip


def _wait_for_steps(run, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return
        if len([r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]) >= n:
            return
        time.sleep(0.05)


SIGNAL_STEPS = 120


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """The run the signal tests interrupt, straight through."""
    straight = tmp_path_factory.mktemp("straight") / "run"
    assert run_cli(*_pretrain_args(data_dir, straight, SIGNAL_STEPS, 80), "--quiet").returncode == 0
    return straight


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_exits_130_and_resume_matches_straight_run(data_dir, straight_run, tmp_path, signum):
    """An interrupted run and its resumption (two processes) end as the straight run does."""
    interrupted, steps = tmp_path / "interrupted", SIGNAL_STEPS
    proc = start_cli(*_pretrain_args(data_dir, interrupted, steps, 80))
    _wait_for_steps(interrupted, 20, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "re-run the same command to resume" in err and "Traceback" not in err
    step = load_checkpoint(interrupted).meta["step"]
    assert 20 <= step < steps  # saved where it stopped, not at a periodic checkpoint

    resumed = run_cli(*_pretrain_args(data_dir, interrupted, steps, 80), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(straight_run, interrupted)


@pytest.mark.slow
def test_an_interruption_off_the_log_interval_leaves_metrics_as_a_straight_run(data_dir, tmp_path):
    """An interrupted run logs the step it stopped on, so its curve ends there; with --train.log_every > 1 that
    record stayed after the resume (a line the straight run does not have) and its loss moved the running mean
    that flags spikes (state.json's loss_ema). The resume drops it, and the loss mean never saw it."""
    import json

    args = lambda run: [*_pretrain_args(data_dir, run, 40, 10), "--train.log_every", "1000"]  # noqa: E731
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_cli(*args(straight), "--quiet").returncode == 0
    proc = start_cli(*args(interrupted))
    deadline = time.time() + 120
    while latest_checkpoint(interrupted) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    stopped = load_checkpoint(interrupted).meta["step"]
    assert 10 <= stopped < 40 and [r["step"] for r in _numbers(interrupted) if "loss" in r] == [stopped]
    resumed = run_cli(*args(interrupted), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(straight, interrupted)
    state = [json.loads((latest_checkpoint(run) / "state.json").read_text()) for run in (straight, interrupted)]
    assert state[0]["train_state"]["loss_ema"] == state[1]["train_state"]["loss_ema"] is not None


@pytest.mark.slow
def test_sigkill_leaves_a_loadable_checkpoint(data_dir, tmp_path):
    """Checkpoint every step and SIGKILL at an arbitrary moment, several times (~15 s)."""
    run = tmp_path / "run"
    for target in (5, 12, 20):
        proc = start_cli(*_pretrain_args(data_dir, run, 100000, 1))
        _wait_for_steps(run, target, proc)
        time.sleep(0.01 * target)  # land somewhere inside a step or a save
        proc.kill()
        proc.wait(timeout=30)
        ckpt = load_checkpoint(run)  # verifies sizes and sha256 of every file
        assert ckpt.meta["step"] >= 1
    result = run_cli("eval", str(run), "--json", "--max-batches", "2")
    assert result.returncode == 0, result.stderr


def test_muon_run_resumes_bit_identically(data_dir, tmp_path):
    # Muon is a plain class with torch.optim's state_dict format: its momentum and AdamW moments must
    # survive a checkpoint exactly like AdamW's do
    overrides = {"optim.name": "muon", "model.qk_norm": True, "model.mlp": "relu2", "model.tie_embeddings": False}
    _crash_after_step_6_and_resume(data_dir, tmp_path, overrides)


def test_missing_config_json_continues_from_the_checkpoint_config(data_dir, tmp_path):
    """Without config.json, --overwrite would delete every checkpoint: the config saved in the latest
    checkpoint stands in, and where none is readable the error does not suggest --overwrite."""
    from lmforge.errors import ConfigError

    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run), progress=False)
    (run / "config.json").unlink()
    with pytest.raises(ConfigError, match="different model config"):  # the checks still hold
        pretrain(tiny_config(data_dir, run, **{"model.n_layer": 3}), progress=False)
    state = pretrain(tiny_config(data_dir, run, **{"train.max_steps": 14}), progress=False)
    assert state.step == 14 and (run / "config.json").is_file()  # resumed from step 12, config.json written again

    (run / "config.json").unlink()
    kept = sorted((run / "checkpoints").glob("step-*"))
    for path in (run / "checkpoints").glob("step-*/state.json"):
        path.write_text("damaged", encoding="utf-8")
    result = run_cli("pretrain", "--data", str(data_dir), "--out", str(run), "--preset", "tiny")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "config.json is missing and no checkpoint" in result.stderr and "--overwrite" not in result.stderr
    assert sorted((run / "checkpoints").glob("step-*")) == kept  # nothing was deleted


def test_a_resume_that_changes_the_schedule_says_so(data_dir, tmp_path):
    from lmforge.train.run import _schedule_change

    cfg = tiny_config(data_dir, tmp_path / "r", **{"train.max_steps": 30, "train.warmup_steps": 5})
    saved = cfg.to_dict()
    assert _schedule_change(saved, cfg, 20) == ""  # nothing changed: no note
    saved["train"]["max_steps"] = 20
    note = _schedule_change(saved, cfg, 20)
    assert "train.max_steps 20 -> 30" in note and "from step 21" in note
    assert _schedule_change(None, cfg, 20) == ""  # a checkpoint without its config
    saved["train"].update(max_steps=30, min_lr=0.0)  # (min_lr was not compared: the note looked for final_lr)
    assert "train.min_lr 0.0 -> unset (lr / 10)" in _schedule_change(saved, cfg, 20)


def test_a_resume_that_changes_the_batch_or_clipping_says_so(data_dir, tmp_path, capsys):
    """A resume with another global batch, dtype, clipping or L1 trained on without a word (the optimizer's and the
    schedule's changes had their notes); a micro-batch change (the same batch, split) needs none."""
    run = tmp_path / "r"
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 2, "eval.every": 0}), progress=False)
    flags = {"train.max_steps": 2, "eval.every": 0, "train.micro_batch_size": 4}
    pretrain(tiny_config(data_dir, run, **{**flags, "train.max_steps": 3}), progress=True)
    assert "training settings changed" not in capsys.readouterr().out
    flags.update({"train.max_steps": 4, "train.batch_size": 16, "optim.grad_clip": 0.5})
    pretrain(tiny_config(data_dir, run, **flags), progress=True)
    out = capsys.readouterr().out
    assert "training settings changed since the checkpoint, applied from step 4: train.batch_size 8 -> 16, " in out
    assert "optim.grad_clip 1.0 -> 0.5" in out


def test_a_run_saved_when_min_lr_0_meant_lr_over_10_resumes_with_that_schedule(data_dir, tmp_path):
    """Before config_version 2, train.min_lr 0 meant lr / 10; now it decays to zero. A run saved with the old
    meaning (no config_version, min_lr 0.0 in config.json and state.json), re-run with its command (min_lr 0),
    ends bit-identical to a straight run decaying to lr / 10; it would have switched to a decay to zero."""
    import json

    from lmforge.checkpoint import state_sha256

    straight = tmp_path / "straight"
    pretrain(tiny_config(data_dir, straight, **{"train.min_lr": None}), progress=False)
    old = tmp_path / "old"
    shutil.copytree(straight, old)
    shutil.rmtree(old / "checkpoints" / "step-000012")
    (old / "checkpoints" / "latest").write_text("step-000006\n", encoding="utf-8")
    for path in [old / "config.json", old / "checkpoints" / "step-000006" / "state.json"]:
        saved = json.loads(path.read_text(encoding="utf-8"))
        config = saved.get("config", saved)
        del config["config_version"]
        config["train"]["min_lr"] = 0.0  # as the old lmforge wrote its default (lr / 10)
        if "state_sha256" in saved:
            saved["state_sha256"] = state_sha256(saved)
        path.write_text(json.dumps(saved), encoding="utf-8")
    assert pretrain(tiny_config(data_dir, old, **{"train.min_lr": 0}), progress=False).step == 12
    _assert_same_run(straight, old)
    saved = json.loads((old / "config.json").read_text(encoding="utf-8"))  # rewritten in the new format
    assert saved["config_version"] == 2 and saved["train"]["min_lr"] is None


def test_a_time_budget_stop_resumed_with_a_larger_budget_is_the_straight_run(data_dir, tmp_path, monkeypatch):
    """A run stopped by train.time_budget off the log and eval intervals logged a train line and ran an evaluation
    there that the straight run does not have; the evaluation moved the best loss and the patience count in
    state.json. Both records are now marked as an interruption's (dropped by the resume) and the evaluation leaves
    the best/patience state alone: raising the budget and re-running ends as one run with that budget."""
    import json
    from types import SimpleNamespace

    from lmforge.log import RunLogger
    from lmforge.train import loop

    clock = [0.0]  # the loop's clock reads one second per step taken, so the budget stops at a known step
    advance = RunLogger.advance

    def tick(self, *args, **kwargs):
        clock[0] += 1.0
        return advance(self, *args, **kwargs)

    monkeypatch.setattr(RunLogger, "advance", tick)
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    # no evaluation beats the first by min_delta 10: each later one counts toward patience, and the third (step 9)
    # stops the run early; an evaluation at the budget stop (step 7) that counted would leave the count one ahead
    flags = {"train.log_every": 4, "eval.every": 3, "train.early_stop_patience": 2, "train.early_stop_min_delta": 10}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    pretrain(tiny_config(data_dir, straight, **flags, **{"train.time_budget": 1000.0}), progress=False)
    state = pretrain(tiny_config(data_dir, stopped, **flags, **{"train.time_budget": 5.5}), progress=False)
    assert state.stop_reason == "time_budget" and state.step == 7
    said = [r for r in read_metrics(stopped / "metrics.jsonl") if r["step"] == 7]
    assert [sorted(r.keys() & {"loss", "val_loss"}) for r in said] == [["loss"], ["val_loss"]]  # the curve ends at 7
    resumed = pretrain(tiny_config(data_dir, stopped, **flags, **{"train.time_budget": 1000.0}), progress=False)
    assert (resumed.step, resumed.stop_reason) == (9, "early_stop")
    _assert_same_run(straight, stopped)
    meta = [json.loads((latest_checkpoint(run) / "state.json").read_text()) for run in (straight, stopped)]
    assert meta[0]["train_state"] == meta[1]["train_state"] and meta[0]["rng"] == meta[1]["rng"]
    assert meta[0]["loader"] == meta[1]["loader"]


def test_data_of_another_tokenizer_on_an_existing_run_names_the_tokenizer(data_dir, tmp_path):
    """Re-running a run on data prepared with another tokenizer (another vocabulary size) was refused as "a
    different model config (vocab_size 316 -> 396)": it names the tokenizer and how to prepare with the run's."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.errors import DataError

    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 1, "eval.every": 0}), progress=False)
    other = tmp_path / "other"
    prepare(PrepareConfig(inputs=[str(REPO / "README.md")], out=str(other), tokenizer="char"), progress=False)
    said = (
        f"prepared with another tokenizer than the run in {run}; prepare it with --tokenizer {run / 'tokenizer.json'}"
    )
    with pytest.raises(DataError, match=re.escape(said)):
        pretrain(tiny_config(other, run, **{"train.max_steps": 1, "eval.every": 0}), progress=False)
