"""Encoder objectives (MLM, MLM+NSP, ELECTRA) under torchrun: 2 gloo ranks = 1 process, like CLM.

The heads (and ELECTRA's generator -> sample -> discriminator step) run inside the model's forward, so
the DDP wrapper's forward is what runs and gradients are synchronised; ELECTRA samples from the
batch's per-example noise, so the samples do not depend on how the global batch is split. With
dropout 0, 2 ranks x micro-batch 2 x accumulation 2 give the loss curve, validation metrics and
final weights of 1 process with the whole batch of 8.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_checkpoint
from lmforge.config import load_config
from tests.test_dist import launch_ranks

pytestmark = pytest.mark.dist

STEPS = 4
FLAGS = {
    "model.n_layer": 1,
    "model.d_model": 32,
    "model.d_ff": 64,
    "model.max_seq_len": 32,
    "model.dropout": 0.0,  # dropout masks come from each rank's RNG: only dropout-free runs match exactly
    "train.batch_size": 8,
    "train.max_steps": STEPS,
    "train.warmup_steps": 2,
    "train.lr": 3e-3,
    "train.log_every": 1,
    "eval.every": 2,
    "eval.batch_size": 2,
    "eval.max_batches": 3,  # odd: split 2 + 1 over 2 ranks
    "checkpoint.every": STEPS,
}
PRESET = {"mlm": "bert-tiny", "mlm+nsp": "bert-tiny", "electra": "electra-tiny"}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def one_process(data_dir: Path, out: Path, objective: str) -> None:
    from lmforge.train.run import pretrain

    nested: dict = {"out": str(out), "data": {"dir": str(data_dir)}, "objective": {"name": objective}}
    for key, value in FLAGS.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    pretrain(load_config(preset=PRESET[objective], overrides=nested), progress=False)


def two_ranks(data_dir: Path, out: Path, objective: str, *extra: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m lmforge pretrain ...`, its ranks forked from a test zygote."""
    args = [
        "pretrain", f"--preset={PRESET[objective]}", f"--data={data_dir}", f"--out={out}",
        f"--objective={objective}", "--train.micro_batch_size=2", *(f"--{k}={v}" for k, v in FLAGS.items()), *extra,
    ]  # fmt: skip
    return launch_ranks(args)


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = records(run), records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        keys = {k for k in w if k == "loss" or k.startswith("val_")}
        assert keys and keys == {k for k in g if k == "loss" or k.startswith("val_")}
        for k in keys:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (g["step"], k)
    ckpt = f"checkpoints/step-{STEPS:06d}"  # consolidated or sharded
    got_w, want_w = load_checkpoint(run / ckpt).model_state(), load_checkpoint(reference / ckpt).model_state()
    assert got_w.keys() == want_w.keys()
    for name in want_w:
        torch.testing.assert_close(got_w[name], want_w[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def one_process_runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The one-process run of an objective, trained once for the module (two strategies compare against it)."""
    runs: dict[str, Path] = {}

    def run(objective: str) -> Path:
        if objective not in runs:
            runs[objective] = tmp_path_factory.mktemp("one") / objective
            one_process(data_dir, runs[objective], objective)
        return runs[objective]

    return run


@pytest.mark.parametrize(
    "objective, strategy",
    [("mlm", "ddp"), ("mlm", "fsdp"), ("mlm+nsp", "ddp"), ("electra", "ddp"), ("electra", "fsdp+sharded")],
)
def test_encoder_objective_on_two_ranks_equals_one_process(
    objective: str, strategy: str, data_dir: Path, one_process_runs: Callable[[str], Path], tmp_path: Path
):
    reference = one_process_runs(objective)
    out = tmp_path / "two"
    flags = ["--dist.strategy=fsdp", "--checkpoint.sharded=true"] if strategy == "fsdp+sharded" else []
    p = two_ranks(data_dir, out, objective, *(flags or [f"--dist.strategy={strategy}"]))
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(out, reference)
    evals = [r for r in records(out) if "val_loss" in r]
    assert len(evals) == STEPS // 2 and evals[0]["val_tokens"] > 0
    key = {"mlm": "val_mlm_accuracy", "mlm+nsp": "val_nsp_accuracy", "electra": "val_rtd_auc"}[objective]
    assert all(0 <= r[key] <= 1 for r in evals)


def test_carried_state_rnn_is_refused_under_torchrun_with_what_to_do(data_dir: Path, tmp_path: Path):
    from lmforge.data.datadir import load_data_dir
    from lmforge.errors import ConfigError
    from lmforge.tokenizer.tokenizer import Tokenizer
    from lmforge.train.objective_setup import setup_objective
    from lmforge.train.precision import pick_precision

    cfg = load_config(preset="lstm-tiny", overrides={"out": str(tmp_path), "data": {"dir": str(data_dir)}})
    data = load_data_dir(data_dir)
    tok, shards = Tokenizer.load(data.tokenizer_path), data.split_shards("train")
    precision = pick_precision(torch.device("cpu"), "float32")
    with pytest.raises(ConfigError, match="state belongs to each rank's rows.*--objective.carry_state false"):
        setup_objective(cfg, shards, [], tok, precision, micro_batch=2, rank=0, world_size=2)
    assert setup_objective(cfg, shards, [], tok, precision, micro_batch=2).loader is not None  # 1 process: fine
