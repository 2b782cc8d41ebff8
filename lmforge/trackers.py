"""Optional experiment trackers: TensorBoard, Weights & Biases (offline by default), MLflow (local).

Off by default and never required: `--log.tensorboard`, `--log.wandb`, `--log.mlflow`. Each one is
fed by `RunLogger.metrics`, i.e. exactly the records written to `metrics.jsonl`, so the numbers are
the same everywhere: numbers become scalars under their metrics.jsonl key (`loss`, `val_bpb`, ...;
booleans as 0/1), the eval sample becomes text. The package is imported when the tracker opens; a
missing one is a one-line `ConfigError` with the install command, raised by `check_packages` before the
run folder changes (it used to come when the trackers opened, after `--overwrite` had deleted the old run).

- TensorBoard: event files in `RUN_DIR/tensorboard/`. On resume, and on a rollback to the latest checkpoint
  during the run (`rewind`), the writer purges events after the checkpoint's step (`purge_step`), so the curves
  match `metrics.jsonl`, which is truncated too (a rollback's dropped steps used to stay in TensorBoard beside
  the rewritten ones: three values at a step that metrics.jsonl holds once).
- W&B and MLflow keep what they were sent: after a rollback the dropped steps stay in their history beside the
  rewritten ones. W&B charts use the logged `step` as their x axis (`define_metric`); its own `_step` only goes
  up, and when records were logged at `_step` = training step, W&B dropped the rewritten steps.
- W&B: `WANDB_MODE` decides; unset means offline (files under `RUN_DIR/wandb/`, upload later with
  `wandb sync`), so nothing needs an account or the network.
- MLflow: `MLFLOW_TRACKING_URI` decides; unset means a file store in `RUN_DIR/mlruns/`
  (`mlflow ui --backend-store-uri RUN_DIR/mlruns`).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any, Protocol

from lmforge.config import LogConfig
from lmforge.errors import ConfigError
from lmforge.fields import flatten


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def rewind(self, step: int) -> None: ...  # a rollback: the records after `step` are dropped

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record (without `step`), booleans as 0/1."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


# the module each tracker imports when it opens, by its --log flag (which is also the pip package's name)
TRACKER_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow.tracking"}


def check_packages(cfg: LogConfig) -> None:
    """Raise the one-line install hint for a tracker whose package is missing. Call it before the run folder
    is claimed or changed: a flag problem must leave an existing run (and `--overwrite`'s old one) as it was."""
    for flag, module in TRACKER_MODULES.items():
        if getattr(cfg, flag):
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(
                    f"--log.{flag} needs the {flag} package: pip install {flag} (or drop --log.{flag})"
                ) from None


class TensorBoardTracker:
    def __init__(self, log_dir: Path, *, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events a crashed session logged after its checkpoint, and a
        # run starting from step 0 (killed before its first checkpoint) those of step 1 on, as metrics.jsonl
        self.log_dir = log_dir
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        if record.get("sample"):
            self.writer.add_text("sample", record["sample"], step)
        if "val_loss" in record:
            self.writer.flush()

    def rewind(self, step: int) -> None:
        """A new event file whose purge marker drops the events after `step`, as at a resume."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, *, project: str, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )
        # the training step is a logged metric that every chart uses as its x axis, not W&B's own `_step`, which
        # only goes up: logged as `step=`, the steps a rollback rewrote were dropped ("less than the current step")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, record: dict[str, Any]) -> None:
        data: dict[str, Any] = {"step": int(record["step"]), **scalars(record)}
        if record.get("sample"):
            data["sample"] = record["sample"]
        self.run.log(data)

    def rewind(self, step: int) -> None:  # W&B keeps every value it was sent (module docstring)
        pass

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    def __init__(self, run_dir: Path, *, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store: no server, no database package (MLflow 3.x asks to opt in to it)
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("lmforge")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("lmforge")
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record["step"])
        metrics = [Metric(k, v, now, step) for k, v in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def rewind(self, step: int) -> None:  # MLflow keeps every value it was sent (module docstring)
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(cfg: LogConfig, run_dir: Path, *, config: dict[str, Any], start_step: int) -> list[Tracker]:
    """The trackers `cfg` turns on, opened (an empty list by default)."""
    check_packages(cfg)  # (pretrain and finetune checked already, before they changed the run folder)
    trackers: list[Tracker] = []
    try:
        if cfg.tensorboard:
            trackers.append(TensorBoardTracker(run_dir / "tensorboard", start_step=start_step))
        if cfg.wandb:
            trackers.append(WandbTracker(run_dir, project=cfg.wandb_project, config=config))
        if cfg.mlflow:
            trackers.append(MLflowTracker(run_dir, config=config))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers
