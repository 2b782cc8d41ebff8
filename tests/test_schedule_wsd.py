"""The warmup-stable-decay schedule: exact values at each phase boundary, resume safety, config
validation, and that the real training loop follows it step by step."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import CheckpointConfig, EvalConfig, OptimConfig, TrainConfig, load_config
from lmforge.errors import ConfigError
from lmforge.log import RunLogger, read_metrics
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.train.loop import train
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import pick_precision
from lmforge.train.schedule import lr_at
from lmforge.train.state import TrainState

# 10 warmup steps, 100 steps in all, the last 20 (decay_fraction 0.2) decaying from 1.0 to 0.1
KW = dict(lr=1.0, final_lr=0.1, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.2)


def test_wsd_exact_values():
    assert lr_at(0, **KW) == pytest.approx(0.1)  # warmup as for every schedule: lr/warmup at step 0
    assert lr_at(9, **KW) == pytest.approx(1.0)  # warmup end
    assert lr_at(10, **KW) == 1.0  # first stable step
    assert lr_at(45, **KW) == 1.0  # mid-stable
    assert lr_at(79, **KW) == 1.0  # last stable step
    assert lr_at(80, **KW) == 1.0  # decay start: progress 0
    assert lr_at(90, **KW) == pytest.approx(0.55)  # half way through the decay
    assert lr_at(99, **KW) == pytest.approx(1.0 - 0.9 * 19 / 20)  # last step taken
    assert lr_at(100, **KW) == pytest.approx(0.1)  # reaches final_lr at max_steps
    assert lr_at(150, **KW) == pytest.approx(0.1)  # never below final_lr
    values = [lr_at(s, **KW) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_decay_fraction_edges():
    # decay_fraction 0: warmup then constant; 1: decay starts right after warmup (like "linear")
    assert lr_at(99, **{**KW, "decay_fraction": 0.0}) == 1.0
    for step in (10, 35, 60, 99):
        linear = lr_at(step, **{**KW, "schedule": "linear"})
        assert lr_at(step, **{**KW, "decay_fraction": 1.0}) == pytest.approx(linear)
    # a decay longer than what is left after warmup starts at the end of warmup, not inside it
    short = dict(KW, warmup_steps=90, decay_fraction=0.5)
    assert lr_at(89, **short) == pytest.approx(1.0)
    assert lr_at(95, **short) == pytest.approx(0.55)


def test_wsd_is_resume_safe():
    """A pure function: values don't depend on call order, so a resumed run sees the straight run's lrs."""
    straight = [lr_at(s, **KW) for s in range(100)]
    resumed = [lr_at(s, **KW) for s in range(37, 100)]
    assert straight[37:] == resumed
    assert [lr_at(s, **KW) for s in reversed(range(100))][::-1] == straight


def test_wsd_config():
    cfg = load_config(preset="tiny", overrides={"train": {"schedule": "wsd", "decay_fraction": 0.3}})
    assert (cfg.train.schedule, cfg.train.decay_fraction) == ("wsd", 0.3)
    assert TrainConfig().decay_fraction == 0.2
    with pytest.raises(ConfigError, match="decay_fraction"):
        TrainConfig(decay_fraction=1.5)
    with pytest.raises(ConfigError, match="schedule"):
        load_config(preset="tiny", overrides={"train": {"schedule": "wsdd"}})


def test_training_loop_follows_wsd(tmp_path):
    steps = 10
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=2,
        lr=0.01,
        min_lr=0.001,
        warmup_steps=2,
        schedule="wsd",
        decay_fraction=0.4,
        log_every=1,
    )
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, max_seq_len=8))
    model.init_weights()
    optim_cfg = OptimConfig()
    optimizer = build_optimizer(model, optim_cfg, lr=cfg.lr, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    batches = iter([(torch.randint(0, 40, (2, 8), generator=g), torch.randint(0, 40, (2, 8), generator=g))] * steps)
    metrics = tmp_path / "metrics.jsonl"
    log = RunLogger(metrics, max_steps=steps, start_step=0, console=False)
    train(
        model,
        optimizer,
        batches,
        cfg=cfg,
        optim_cfg=optim_cfg,
        eval_cfg=EvalConfig(every=0),
        ckpt_cfg=CheckpointConfig(every=0),
        precision=pick_precision(torch.device("cpu"), "float32"),
        state=TrainState(),
        log=log,
        save=lambda st: None,
    )
    log.close()
    lrs = [r["lr"] for r in read_metrics(metrics) if "lr" in r]
    # steps 0-1 warm up, 2-5 stable, 6-9 decay linearly from 0.01 towards 0.001 at step 10
    expected = [0.005, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.00775, 0.0055, 0.00325]
    assert lrs == pytest.approx(expected)
