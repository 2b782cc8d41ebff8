"""Optional trackers: TensorBoard event files from a tiny real run, read back with TensorBoard's own
reader, hold the same numbers as metrics.jsonl (also after a resume), and so does MLflow's local store
(when mlflow is installed); a tracker whose package is missing is a one-line error with the install
command, before anything is trained."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from lmforge.config import LogConfig, load_config
from lmforge.errors import ConfigError
from lmforge.log import read_metrics
from lmforge.trackers import open_trackers, scalars
from lmforge.train.run import pretrain
from tests.conftest import run_cli, tiny_config


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})  # 0 = keep every event
    acc.Reload()
    return acc


def _expected(run) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard stores it: per key, (step, value as float32)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run / "metrics.jsonl"):
        for key, value in scalars(record).items():
            out.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return out


def _assert_same(acc, run):
    expected = _expected(run)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(key)] == points, key


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_holds_the_metrics_jsonl_numbers(data_dir, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"log.tensorboard": True, "eval.sample_tokens": 16}), progress=False)
    acc = _events(run / "tensorboard")
    _assert_same(acc, run)
    assert {"loss", "val_loss", "val_bpb", "grad_norm", "update_ratio", "mem_mib"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("loss")) == 12 and len(acc.Scalars("val_loss")) == 3
    assert "sample/text_summary" in acc.Tags()["tensors"]

    # A crash after the step-6 checkpoint, then resume: the events of steps 7-12 are purged and rewritten.
    shutil.rmtree(run / "checkpoints" / "step-000012")
    (run / "checkpoints" / "latest").write_text("step-000006\n", encoding="utf-8")
    pretrain(tiny_config(data_dir, run, **{"log.tensorboard": True, "eval.sample_tokens": 16}), progress=False)
    acc = _events(run / "tensorboard")
    _assert_same(acc, run)
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 13))

    # Killed before its first checkpoint, then started again from step 0: no stale events either.
    shutil.rmtree(run / "checkpoints")
    pretrain(tiny_config(data_dir, run, **{"log.tensorboard": True, "eval.sample_tokens": 16}), progress=False)
    acc = _events(run / "tensorboard")
    _assert_same(acc, run)
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 13))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_drops_the_steps_a_rollback_drops(data_dir, tmp_path, monkeypatch):
    """Steps 9-11 NaN: the third rolls back to the step-8 checkpoint and metrics.jsonl drops steps 9-11, then
    logs 9-12 again. TensorBoard kept the dropped records beside the new ones (two values at steps 9-11, the
    skipped_steps curve going 1, 2, 3 then 3 again); it now holds what metrics.jsonl holds."""
    from tests.test_faults import inject_nan

    inject_nan(monkeypatch, {8, 9, 10})  # one micro-batch a step: call i is step i + 1
    run = tmp_path / "run"
    flags = {"log.tensorboard": True, "checkpoint.every": 4, "train.rollback_after": 3, "eval.every": 0}
    state = pretrain(tiny_config(data_dir, run, **flags), progress=False)
    assert state.rollbacks == 1 and state.step == 12
    acc = _events(run / "tensorboard")
    _assert_same(acc, run)
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 13))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_a_fine_tune_logs_to_tensorboard_too(tmp_path):
    """`finetune --log.tensorboard`: its metrics.jsonl numbers in RUN/tensorboard (fine-tunes refused --log.*)."""
    from lmforge.finetune import FinetuneConfig, finetune
    from tests.test_finetune import DATA, make_base

    base, run = make_base(tmp_path), tmp_path / "ft"
    overrides = {"train": {"max_steps": 4, "batch_size": 4, "log_every": 2, "warmup_steps": 1}, "eval": {"every": 2}}
    cfg = FinetuneConfig(task="classify", adapt="lora")
    data = DATA / "sentiment_train.csv"
    finetune(
        base, train_file=data, val_file=data, out=run, cfg=cfg, overrides=overrides | {"log": {"tensorboard": True}}
    )
    acc = _events(run / "tensorboard")
    _assert_same(acc, run)
    assert len(acc.Scalars("loss")) == 2 and len(acc.Scalars("val_loss")) == 2


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_mlflow_holds_the_metrics_jsonl_numbers(data_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"log.mlflow": True}), progress=False)
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert found.info.status == "FINISHED" and found.data.params["train.lr"] == "0.003"
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run / "metrics.jsonl"):
        for key, value in scalars(record).items():
            expected.setdefault(key, []).append((record["step"], value))
    assert set(found.data.metrics) == set(expected)
    for key, points in expected.items():
        history = client.get_metric_history(found.info.run_id, key)
        assert sorted((m.step, m.value) for m in history) == points, key  # doubles: exact


def test_bare_flag_turns_a_tracker_on():
    assert load_config(overrides=["--log.tensorboard", "--train.lr", "1e-3"]).log.tensorboard is True
    assert load_config(overrides=["--log.tensorboard", "false"]).log.tensorboard is False
    assert load_config().log == LogConfig()  # all off by default


@pytest.mark.parametrize("flag", ["wandb", "mlflow"])
def test_missing_tracker_package_is_one_line_error(flag, data_dir, tmp_path):
    if importlib.util.find_spec(flag) is not None:
        pytest.skip(f"{flag} is installed here")
    with pytest.raises(ConfigError, match=f"needs the {flag} package: pip install {flag}"):
        open_trackers(LogConfig(**{flag: True}), tmp_path, config={}, start_step=0)
    if flag != next(f for f in ("wandb", "mlflow") if importlib.util.find_spec(f) is None):
        return  # the command line is checked with the first missing package only (a CLI run costs ~4 s)
    result = run_cli(
        "pretrain", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "tiny",
        "--train.max_steps", "2", f"--log.{flag}",
    )  # fmt: skip
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"pip install {flag}" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before training started


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run_holds_the_metrics_jsonl_numbers(data_dir, tmp_path, monkeypatch):
    """W&B offline mode (no account, no network): the run file holds every logged value.

    The .wandb file is W&B's own record log; its history items carry each value as JSON text, so every
    number of metrics.jsonl must appear in it verbatim (this wandb has no public reader for the file).
    """
    import json

    monkeypatch.delenv("WANDB_MODE", raising=False)  # unset = offline for lmforge
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    flags = {"train.max_steps": 6, "train.log_every": 2, "eval.every": 3, "log.wandb": True}
    pretrain(tiny_config(data_dir, run, **flags), progress=False)
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    records = read_metrics(run / "metrics.jsonl")
    values = [(k, r[k]) for r in records for k in ("loss", "grad_norm", "val_loss", "val_bpb") if k in r]
    assert len(values) >= 8
    for key, value in values:
        assert json.dumps(value).encode() in data, (key, value)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_keeps_the_steps_a_rollback_rewrites(data_dir, tmp_path, monkeypatch):
    """Steps 9-11 NaN: the third rolls back to step 8 and steps 9-12 are trained again. Logged with W&B's
    `step=`, which only goes up, the rewritten step 9 was dropped ("less than the current step"); the step is
    now a logged metric, so every metrics.jsonl value is in the offline run file (read as in the test above)."""
    import json

    from tests.test_faults import inject_nan

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    inject_nan(monkeypatch, {8, 9, 10})  # one micro-batch a step: call i is step i + 1
    run = tmp_path / "run"
    flags = {"log.wandb": True, "checkpoint.every": 4, "train.rollback_after": 3, "eval.every": 0}
    assert pretrain(tiny_config(data_dir, run, **flags), progress=False).rollbacks == 1
    data = next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    losses = [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [step for step, _ in losses] == list(range(1, 13))
    assert [step for step, value in losses if json.dumps(value).encode() not in data] == []


def test_missing_tracker_package_leaves_the_run_folder_as_it_was(data_dir, tmp_path):
    """The package check comes before the run folder changes: `--overwrite --log.wandb` without wandb deleted the
    old run (checkpoints, metrics) and left config.json/env.json stubs; a new --out was left behind half-made."""
    flag = next((f for f in ("wandb", "mlflow") if importlib.util.find_spec(f) is None), None)
    if flag is None:
        pytest.skip("wandb and mlflow are both installed here")
    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 1, "eval.max_batches": 1}), progress=False)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=f"pip install {flag}"):
        pretrain(tiny_config(data_dir, run, **{f"log.{flag}": True}), overwrite=True, progress=False)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "metrics.jsonl").read_bytes() == metrics

    new = tmp_path / "new"
    with pytest.raises(ConfigError, match=f"pip install {flag}"):
        pretrain(tiny_config(data_dir, new, **{f"log.{flag}": True}), progress=False)
    assert not new.exists()
