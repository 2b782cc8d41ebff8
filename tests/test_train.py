"""The training loop: schedules, accumulation == big batch, clipping, decay groups, L1, early stopping,
time budget, and that a tiny model actually learns real text."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import pytest
import torch

from lmforge.checkpoint import load_checkpoint
from lmforge.config import CheckpointConfig, EvalConfig, OptimConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.log import RunLogger, read_metrics
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.train.loop import train
from lmforge.train.optim import build_optimizer, param_groups
from lmforge.train.precision import pick_precision
from lmforge.train.run import pretrain
from lmforge.train.schedule import lr_at
from lmforge.train.state import TrainState
from tests.conftest import tiny_config


def test_schedules():
    kw = dict(lr=1.0, final_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)  # warmup starts above 0
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)  # half way: mean of peak and floor
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(60, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_at(35, schedule="linear", **kw) == pytest.approx(1.0 - 0.9 * 0.25)
    assert lr_at(100, schedule="constant", **kw) == 1.0
    values = [lr_at(s, schedule="cosine", **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay


def _model(seed: int = 0, **cfg) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, d_model=16, max_seq_len=16, **cfg))
    model.init_weights()
    return model


def _run_loop(
    model,
    batches,
    *,
    batch_size,
    micro,
    optim_cfg=None,
    steps=2,
    lr=1e-2,
    metrics=None,
    console=False,
    eval_every=0,
    save=None,
    early_stop_patience=0,
    early_stop_min_delta=0.0,
    **loop,
):
    """`train` on `batches` with a constant lr and no eval/checkpoints (`eval_every` with an `evaluate` in
    `loop`; `save` gets the state at each save); `metrics`: a metrics.jsonl path (every step logged), else no
    log; `loop`: more `train` arguments (flops_per_token, world, evaluate, ...)."""
    cfg = TrainConfig(
        max_steps=steps, batch_size=batch_size, micro_batch_size=micro, lr=lr, warmup_steps=0, schedule="constant",
        log_every=1, early_stop_patience=early_stop_patience, early_stop_min_delta=early_stop_min_delta,
    )  # fmt: skip
    optim_cfg = optim_cfg or OptimConfig()
    precision = pick_precision(torch.device("cpu"), "float32")
    optimizer = build_optimizer(model, optim_cfg, lr=lr, device=torch.device("cpu"))
    log = RunLogger(metrics, max_steps=steps, start_step=0, console=console, enabled=metrics is not None)
    try:
        return train(
            model,
            optimizer,
            iter(batches),
            cfg=cfg,
            optim_cfg=optim_cfg,
            eval_cfg=EvalConfig(every=eval_every),
            ckpt_cfg=CheckpointConfig(every=0),
            precision=precision,
            state=TrainState(),
            log=log,
            save=save or (lambda st: None),
            **loop,
        )
    finally:
        log.close()


def _random_batches(n_seqs: int, seq: int = 12, seed: int = 1, ignore_frac: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (n_seqs, seq), generator=g)
    y = torch.randint(0, 40, (n_seqs, seq), generator=g)
    # uneven numbers of ignored targets per sequence, so per-micro-batch means would be wrong
    y[torch.rand(n_seqs, seq, generator=g) < ignore_frac] = -100
    y[0, :] = -100
    return x, y


def test_accumulation_equals_big_batch():
    x, y = _random_batches(16)
    big = _model()
    small = _model()
    # SGD: the update is linear in the gradient. (AdamW would blow float noise in the key bias's
    # gradient, which is exactly zero in real arithmetic, up to full-size steps.)
    sgd = OptimConfig(name="sgd", momentum=0.9, weight_decay=0.1, grad_clip=1.0)
    _run_loop(big, [(x[:8], y[:8]), (x[8:], y[8:])], batch_size=8, micro=8, optim_cfg=sgd, lr=0.5)
    small_batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 16, 2)]
    _run_loop(small, small_batches, batch_size=8, micro=2, optim_cfg=sgd, lr=0.5)
    assert any(
        not torch.equal(a, b) for a, b in zip(big.parameters(), _model().parameters(), strict=True)
    )  # it trained
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters(), strict=True):
        # float32 sums in a different order: agreement to ~1e-6 relative, not bitwise
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_float16_run_resumes_with_its_loss_scale():
    """float16's GradScaler started over at 65536 on every resume: the straight run had halved it on its first
    overflows, and the resumed one skipped those steps again, so it was neither exact nor as trained. Its state is
    saved with the train state now. Real float16 autocast and GradScaler on CPU (pretrain takes float16 on GPUs
    only); the loss is weighted 50x, as ELECTRA weighs its detection loss, so that the gradients overflow."""
    import copy

    from lmforge.objectives import CausalLM
    from lmforge.train.precision import Precision

    class Weighted(CausalLM):
        def loss(self, model, batch):
            return 50.0 * super().loss(model, batch)

    batches = [_random_batches(4, seed=i) for i in range(12)]
    saved = []

    def run(model, batches, state, optimizer_state=None):
        cfg = TrainConfig(max_steps=12, batch_size=4, lr=1e-2, warmup_steps=0, schedule="constant", log_every=100)
        optimizer = build_optimizer(model, OptimConfig(), lr=cfg.lr, device=torch.device("cpu"))
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        log = RunLogger(None, max_steps=12, start_step=state.step, enabled=False)

        def save(st):
            saved.append((copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), st.to_dict()))

        return train(
            model, optimizer, iter(batches), cfg=cfg, optim_cfg=OptimConfig(), eval_cfg=EvalConfig(every=0),
            ckpt_cfg=CheckpointConfig(every=8), precision=Precision(torch.device("cpu"), torch.float16),
            state=state, log=log, save=save, objective=Weighted(),
        )  # fmt: skip

    straight = _model()
    skipped = run(straight, batches, TrainState()).skipped_steps
    assert 0 < skipped < 8  # the first steps overflowed, then the scale fitted
    weights, optimizer_state, state = saved[0]
    resumed = _model()
    resumed.load_state_dict(weights)
    assert run(resumed, batches[8:], TrainState.from_dict(state), optimizer_state).skipped_steps == skipped
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_mfu_divides_by_every_devices_peak(tmp_path):
    """tokens_per_s is global under torchrun (target counts are all-reduced), and peak_flops is one device's
    (run.py measures it locally): MFU = achieved / (world_size x peak). It was overstated world_size times.
    A DistInfo with world_size 2 and no process group runs the same code (collectives are identities)."""
    from lmforge.dist import DistInfo

    x, y = _random_batches(8)
    records = {}
    for world_size in (1, 2):
        path = tmp_path / f"metrics-{world_size}.jsonl"
        _run_loop(
            _model(), [(x, y)] * 2, batch_size=8, micro=8, lr=1e-3, metrics=path,
            flops_per_token=1e6, peak_flops=1e12, world=DistInfo(world_size=world_size),
        )  # fmt: skip
        records[world_size] = [r for r in read_metrics(path) if "mfu" in r]
    for world_size, rows in records.items():
        assert rows
        for r in rows:
            assert r["mfu"] == pytest.approx(1e6 * r["tokens_per_s"] / (world_size * 1e12), rel=1e-9)


def test_mfu_never_exceeds_one_when_the_measured_peak_was_low(tmp_path, capsys):
    """The peak is measured once, in 0.1 s: at a busy moment it came out low and MFU was logged as 104.6%. A rate
    above the peak raises the peak to it (said once): each logged MFU is achieved / the highest rate so far."""
    x, y = _random_batches(8)
    path = tmp_path / "metrics.jsonl"
    flops = 1e6  # x 8 x 12 tokens per step: far above a 1 FLOP/s "peak" at any speed
    _run_loop(_model(), [(x, y)] * 4, batch_size=8, micro=8, steps=4, metrics=path, console=True,
              flops_per_token=flops, peak_flops=1.0)  # fmt: skip
    rows = [r for r in read_metrics(path) if "mfu" in r]
    assert len(rows) == 4 and rows[0]["mfu"] == 1.0
    best = 0.0
    for r in rows:
        best = max(best, flops * r["tokens_per_s"])
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / best, rel=1e-9) and r["mfu"] <= 1.0
    assert capsys.readouterr().out.count("above the 0.0 GFLOP/s matmul peak measured at start-up") == 1


def test_gradient_clipping_bounds_the_update():
    x, y = _random_batches(4, ignore_frac=0.0)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = OptimConfig(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip=1e-3)
    state = _run_loop(model, [(x, y)], batch_size=4, micro=4, optim_cfg=opt, steps=1, lr=1.0)
    assert state.step == 1
    with torch.no_grad():
        delta = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    assert float(delta) == pytest.approx(1e-3, rel=1e-3)  # SGD step of lr * clipped grad


def test_decay_groups_exclude_norms_and_biases():
    model = _model()
    decayed, plain = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_l1_penalty_shrinks_weights():
    x, y = _random_batches(4, ignore_frac=0.0)
    opt0 = OptimConfig(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip=0.0)
    opt1 = OptimConfig(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip=0.0, l1=0.5)  # no decay: L1 alone
    a, b = _model(), _model()
    _run_loop(a, [(x, y)], batch_size=4, micro=4, optim_cfg=opt0, steps=1, lr=0.01)
    _run_loop(b, [(x, y)], batch_size=4, micro=4, optim_cfg=opt1, steps=1, lr=0.01)
    # the L1 gradient is l1 * sign(w): each decayed weight moves lr * 0.5 further towards zero
    la = sum(p.detach().abs().sum() for p in a.parameters() if p.dim() >= 2)
    lb = sum(p.detach().abs().sum() for p in b.parameters() if p.dim() >= 2)
    assert float(lb) < float(la)


def test_tiny_model_learns_real_text(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", **{"train.max_steps": 60, "eval.every": 30})
    state = pretrain(cfg, progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    vocab = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))["model"]["vocab_size"]
    assert train_losses[0] == pytest.approx(math.log(vocab), rel=0.15)  # starts near uniform
    assert vals[-1] < train_losses[0] - 0.8  # and really learns
    assert state.step == 60 and state.stop_reason == "max_steps"
    for r in records:
        if "loss" in r:
            assert {"step", "loss", "lr", "tokens_per_s", "mfu", "elapsed_s"} <= r.keys()
        else:
            assert {"step", "val_loss", "val_bpb"} <= r.keys()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_bits_per_byte_counts_the_text_bytes_for_wordpiece(corpus_file, tmp_path):
    """WordPiece tokens leave out the spaces between words: a whole-split evaluation still divides by
    the split's true UTF-8 bytes (the manifest's count), in training's log and in `eval`."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.eval.lm import evaluate_checkpoint

    data = tmp_path / "wp"
    cfg = PrepareConfig(inputs=[str(corpus_file)], out=str(data), tokenizer="wordpiece", vocab_size=400)
    manifest = prepare(cfg, progress=False)
    cfg = tiny_config(data, tmp_path / "run", **{"train.max_steps": 2, "eval.every": 2, "eval.max_batches": 0})
    pretrain(cfg, progress=False)
    m = evaluate_checkpoint(tmp_path / "run", split="val")
    val_bytes = manifest["splits"]["val"]["bytes"]
    assert abs(m["bytes"] - val_bytes) <= 0.002 * val_bytes  # only the split's first target-less token
    logged = [r["val_bpb"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_bpb" in r]
    assert logged[-1] == pytest.approx(m["bpb"], rel=1e-5)
    assert m["bpb"] == pytest.approx(m["loss"] * m["tokens"] / math.log(2) / val_bytes, rel=0.01)


def test_eval_max_batches_counts_batches_of_the_batch_size_not_the_micro_batch(data_dir, tmp_path):
    """eval.max_batches N evaluates the first N x train.batch_size validation sequences whatever the
    accumulation, in training's evaluations and in `lmforge eval`; eval.batch_size, when set, is the batch."""
    from lmforge.eval.lm import evaluate_checkpoint

    seq_len, val_loss = 32, {}
    for micro in (8, 2):  # batch 8 in one forward, or 4 accumulated micro-batches of 2 (the bug: 3 x 2 sequences)
        run = tmp_path / f"micro-{micro}"
        overrides = {"train.micro_batch_size": micro, "train.max_steps": 2, "eval.every": 2, "eval.max_batches": 3}
        pretrain(tiny_config(data_dir, run, **overrides), progress=False)
        record = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]
        assert record["val_tokens"] == 3 * 8 * seq_len  # every target of 24 full windows
        val_loss[micro] = record["val_loss"]
        m = evaluate_checkpoint(str(run), max_batches=3)  # the same sequences as the run's evaluation
        assert m["tokens"] == 3 * 8 * seq_len and m["loss"] == pytest.approx(val_loss[micro], rel=1e-5)
    assert val_loss[2] == pytest.approx(val_loss[8], rel=1e-4)  # accumulation == big batch, same val sequences
    assert evaluate_checkpoint(str(run), batch_size=3, max_batches=2)["tokens"] == 2 * 3 * seq_len
    run = tmp_path / "eval-batch"
    overrides = {"train.micro_batch_size": 2, "train.max_steps": 2, "eval.every": 2, "eval.max_batches": 3}
    pretrain(tiny_config(data_dir, run, **overrides, **{"eval.batch_size": 5}), progress=False)
    assert [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]["val_tokens"] == 3 * 5 * seq_len
    assert evaluate_checkpoint(str(run), max_batches=3)["tokens"] == 3 * 5 * seq_len


def test_early_stopping_without_periodic_evaluation_is_refused(data_dir, tmp_path):
    """eval.every 0 evaluates only after the last step, so a patience never stopped anything, without a word."""
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eval.every 0 runs none before the last step; pass --eval.every N"):
        tiny_config(data_dir, tmp_path / "run", **{"eval.every": 0, "train.early_stop_patience": 2})
    assert not (tmp_path / "run").exists()
    tiny_config(data_dir, tmp_path / "run", **{"eval.every": 0})  # no patience: an evaluation at the end only


def test_early_stopping(data_dir, tmp_path):
    cfg = tiny_config(
        data_dir,
        tmp_path / "run",
        **{
            "train.max_steps": 100,
            "eval.every": 2,
            "train.early_stop_patience": 2,
            "train.early_stop_min_delta": 100.0,  # nothing counts as an improvement after the first eval
        },
    )
    state = pretrain(cfg, progress=False)
    assert state.stop_reason == "early_stop" and state.step == 6
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    lowest = min(evals, key=lambda r: r["val_loss"])  # the best is the lowest loss, whatever min_delta is
    assert (state.best_step, state.best_val_loss) == (lowest["step"], lowest["val_loss"])
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["step"] == 6
    again = pretrain(cfg, progress=False)  # the same command again: nothing to do (it trained 2 more steps)
    assert again.step == 6 and load_checkpoint(tmp_path / "run").meta["step"] == 6


def test_a_nan_evaluation_is_not_the_best_and_does_not_end_patience():
    """A first val loss of NaN became the best: no later loss compares below NaN, so the best stayed NaN and
    early stopping fired while the loss fell."""
    losses = iter([float("nan"), 5.0, 4.0, 3.0])
    batches = [_random_batches(2, seed=i) for i in range(4)]
    state = _run_loop(
        _model(), batches, batch_size=2, micro=2, steps=4, lr=1e-3, eval_every=1, early_stop_patience=2,
        evaluate=lambda: {"loss": next(losses)},
    )  # fmt: skip
    assert state.stop_reason == "max_steps" and state.step == 4
    assert (state.best_val_loss, state.best_step, state.evals_since_best) == (3.0, 4, 0)


def test_min_delta_compares_with_the_last_counted_evaluation_not_the_lowest_loss():
    """Keras' rule, as the help text of train.early_stop_min_delta says (it used to say "the best val loss"):
    4.89 counts against the last counted 5.0 - 0.1, although it does not beat the lowest loss, 4.95, by 0.1."""
    losses = iter([5.0, 4.95, 4.89, 4.88])
    batches = [_random_batches(2, seed=i) for i in range(4)]
    state = _run_loop(
        _model(), batches, batch_size=2, micro=2, steps=4, lr=1e-3, eval_every=1, early_stop_patience=2,
        early_stop_min_delta=0.1, evaluate=lambda: {"loss": next(losses)},
    )  # fmt: skip
    assert state.stop_reason == "max_steps" and state.step == 4
    assert (state.best_val_loss, state.best_step, state.patience_ref, state.evals_since_best) == (4.88, 4, 4.89, 1)


def test_a_signal_during_the_final_evaluation_is_not_lost():
    """Ctrl-C during the last step's evaluation came after the loop's last look at the signal: the run ended as
    finished and a fine-tune went on into minutes of task scoring, exit 0. The run is saved at its last step, and
    the signal reaches the caller (KeyboardInterrupt under the default SIGINT handler)."""
    saved = []
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (whatever an earlier test left; conftest restores it)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def evaluate():
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the final evaluation runs
        return {"loss": 1.0}

    with pytest.raises(KeyboardInterrupt):
        _run_loop(
            _model(), [_random_batches(2, seed=i) for i in range(3)], batch_size=2, micro=2, steps=3, lr=1e-3,
            save=lambda st: saved.append((st.step, st.stop_reason)), evaluate=evaluate,
        )  # fmt: skip
    assert saved == [(3, "max_steps")]  # trained and saved before the signal was passed on


def test_time_budget_stops_and_saves(data_dir, tmp_path):
    cfg = tiny_config(
        data_dir, tmp_path / "run", **{"train.max_steps": 100000, "train.time_budget": 1.0, "train.log_every": 1000}
    )
    state = pretrain(cfg, progress=False)
    assert state.stop_reason == "time_budget" and 0 < state.step < 1000
    # the curve ends at the step it stopped on, although that is no log step (no update ratio there)
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-1]
    assert last["step"] == state.step and math.isfinite(last["loss"]) and "update_ratio" not in last
    assert load_checkpoint(tmp_path / "run").meta["step"] == state.step
    again = pretrain(cfg, progress=False)  # the budget is spent: nothing to do (it took one more step before)
    assert again.step == state.step and load_checkpoint(tmp_path / "run").meta["step"] == state.step


def test_a_rerun_with_nothing_to_do_leaves_the_run_as_it_was(data_dir, tmp_path, capsys):
    """Re-running a run trained to step 8 with max_steps 4 trains nothing, so it must not rewrite config.json
    (which said max_steps 4 afterwards: `lmforge runs` showed 8/4) nor announce a new lr schedule."""
    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 8, "checkpoint.every": 4}), progress=False)
    before = {name: (run / name).read_bytes() for name in ("config.json", "env.json", "metrics.jsonl")}
    capsys.readouterr()
    again = pretrain(
        tiny_config(data_dir, run, **{"train.max_steps": 4, "train.lr": 1e-3, "optim.weight_decay": 0.3}),
        progress=True,
    )
    assert again.step == 8
    assert {name: (run / name).read_bytes() for name in before} == before
    out = capsys.readouterr().out
    assert "nothing to do" in out and "schedule changed" not in out
    assert "resuming" not in out and "applied from now" not in out  # (no step follows)
    (run / "config.json").unlink()  # lost: the re-run stands in with the checkpoint's config and restores it
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 4}), progress=False)
    assert (run / "config.json").read_bytes() == before["config.json"]


def test_warmup_covering_the_whole_run_is_said(data_dir, tmp_path, capsys):
    """--train.max_steps 6 under 20 warmup steps trained at 30% of train.lr at most, with no word of it."""
    pretrain(tiny_config(data_dir, tmp_path / "a", **{"train.max_steps": 6, "train.warmup_steps": 20}))
    assert (
        "train.warmup_steps 20 >= train.max_steps 6: the lr only warms up, to 0.0009 (30% of" in capsys.readouterr().out
    )
    pretrain(tiny_config(data_dir, tmp_path / "b", **{"train.max_steps": 6, "train.warmup_steps": 2}))
    assert "only warms up" not in capsys.readouterr().out


def test_min_lr_above_lr_is_said(data_dir, tmp_path, capsys):
    """A preset's min_lr under a lowered --train.lr made the cosine "decay" raise the lr, with no word of it."""
    pretrain(tiny_config(data_dir, tmp_path / "a", **{"train.max_steps": 8, "train.lr": 1e-4, "train.min_lr": 3e-4}))
    out = capsys.readouterr().out
    assert "train.min_lr 0.0003 is above train.lr 0.0001, so the lr rises toward it" in out
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs[-1] > lrs[-2]  # what the note warns of
    pretrain(tiny_config(data_dir, tmp_path / "b", **{"train.max_steps": 3, "train.min_lr": 1e-4}))
    assert "is above train.lr" not in capsys.readouterr().out


def test_the_start_line_counts_with_thousands_separators(data_dir, tmp_path, capsys):
    """pretrain's start line printed "train 1477 sequences/epoch" (and "vocab 4096") while finetune's says
    "29,155 train": its counts now have separators too."""
    pretrain(tiny_config(data_dir, tmp_path / "a", **{"train.max_steps": 1, "eval.every": 0}))
    start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lmforge pretrain: "))
    assert re.search(r", train \d{1,3}(,\d{3})+ sequences/epoch$", start), start


def test_a_run_without_a_val_split_still_draws_loss_png(corpus_file, tmp_path):
    """loss.png was drawn only at evaluations, so a run on data without a validation split had none."""
    from lmforge.data.prepare import PrepareConfig, prepare

    data = tmp_path / "data"
    prepare(
        PrepareConfig(inputs=[str(corpus_file)], out=str(data), tokenizer="char", val_fraction=0, card=False),
        progress=False,
    )
    pretrain(tiny_config(data, tmp_path / "run", **{"train.max_steps": 3, "checkpoint.every": 0}), progress=False)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_early_stopping_on_data_without_a_val_split_is_refused(corpus_file, tmp_path, capsys):
    """pretrain only noted that early stopping would not run (finetune refused it): refused alike, in one line,
    before the run folder is made."""
    from lmforge.data.prepare import PrepareConfig, prepare

    data = tmp_path / "data"
    prepare(PrepareConfig(inputs=[str(corpus_file)], out=str(data), tokenizer="char", val_fraction=0, card=False))
    with pytest.raises(
        ConfigError,
        match=r"^train.early_stop_patience 1 watches the validation loss, and .* has no "
        r"validation split; prepare it with --val-fraction F .*or drop --train.early_stop_patience$",
    ):
        pretrain(tiny_config(data, tmp_path / "run", **{"train.early_stop_patience": 1}), progress=False)
    assert not (tmp_path / "run").exists()


def test_loss_png_is_redrawn_at_evaluations_at_most_every_plot_every_s(tmp_path, monkeypatch):
    """A short run drew loss.png at each evaluation (0.3-1 s of matplotlib each); now once PLOT_EVERY_S has
    passed since the last draw, and always at the end, so the picture holds every record."""
    from lmforge import log, report

    draws = []

    def plot_loss(metrics_path, out):  # the real drawing, counted
        draws.append(len(read_metrics(metrics_path)))
        real_plot_loss(metrics_path, out)

    real_plot_loss = report.plot_loss
    monkeypatch.setattr(report, "plot_loss", plot_loss)
    records = [
        {"step": 1, "loss": 3.0},
        {"step": 1, "val_loss": 2.9},
        {"step": 2, "loss": 2.5},
        {"step": 2, "val_loss": 2.4},
    ]
    run = tmp_path / "run"
    run.mkdir()
    logger = log.RunLogger(run / "metrics.jsonl", max_steps=2, start_step=0, console=False, plot_path=run / "loss.png")
    for record in records:
        logger.metrics(record)
    assert draws == []  # within PLOT_EVERY_S of the start: no draw at the evaluations
    logger.close()
    assert draws == [4] and (run / "loss.png").stat().st_size > 1000

    monkeypatch.setattr(log, "PLOT_EVERY_S", 0.0)  # a long run: each evaluation redraws it
    draws.clear()
    logger = log.RunLogger(run / "metrics2.jsonl", max_steps=2, start_step=0, console=False, plot_path=run / "2.png")
    for record in records:
        logger.metrics(record)
    logger.close()
    assert draws == [2, 4]  # nothing left undrawn at the end: no third draw


def test_a_loss_png_that_cannot_be_redrawn_mid_run_is_one_warning(tmp_path, monkeypatch, capsys):
    """A redraw of loss.png at an evaluation that failed (a full disk, a folder in its way) stopped the run there,
    before its next checkpoint; it is one warning for the run, which goes on logging."""
    from lmforge import log

    monkeypatch.setattr(log, "PLOT_EVERY_S", 0.0)  # each evaluation redraws it
    run = tmp_path / "run"
    (run / "loss.png").mkdir(parents=True)
    logger = log.RunLogger(run / "metrics.jsonl", max_steps=2, start_step=0, console=False, plot_path=run / "loss.png")
    for step in (1, 2):
        logger.metrics({"step": step, "loss": 3.0})
        logger.metrics({"step": step, "val_loss": 2.9})
    logger.close()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 1, 2, 2]
    warning = f"warning: could not redraw {run / 'loss.png'}: Is a directory; training goes on"
    assert capsys.readouterr().err.splitlines() == [warning]


def test_json_output_of_commands_is_strict_json():
    """`eval --json` of an MLM split with no masked token printed `NaN`, which jq and JavaScript reject."""
    import json

    from lmforge.log import json_text

    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    value = {"mlm_accuracy": float("nan"), "ppl": float("inf"), "curve": [1.5, float("-inf")], "split": "中文"}
    text = json_text(value)
    assert json.loads(text, parse_constant=refuse) == {
        "mlm_accuracy": None,
        "ppl": None,
        "curve": [1.5, None],
        "split": "中文",
    }


def test_the_console_line_of_a_run_whose_eta_is_beyond_timedelta_is_written():
    """--train.max_steps 1e23 trained until the first log line, whose eta (~1e18 s) overflowed
    datetime.timedelta: an OverflowError traceback mid-run. It reads in years now (and "?" when not finite)."""
    from lmforge.log import format_duration, format_record

    line = format_record({"step": 10, "loss": 2.5, "eta_s": 1e18}, max_steps=10**23)
    assert line.endswith("eta 3.17e+10 years"), line
    assert format_duration(math.inf) == format_duration(math.nan) == "?"
    assert format_duration(90061.7) == "1 day, 1:01:01"


def test_eval_seq_len_scores_an_imported_export_as_its_run(data_dir, tmp_path):
    """A run trained on windows shorter than its context, exported and imported back, knows only the context:
    `eval` scored it at the context (another loss); `--seq-len` scores both at one length, to the same numbers."""
    from lmforge.errors import ConfigError
    from lmforge.eval.lm import evaluate_checkpoint
    from lmforge.export.hf import export_hf
    from lmforge.export.hf_import import import_hf

    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 2, "data.seq_len": 16}), progress=False)
    imported = import_hf(export_hf(run, tmp_path / "hf"), tmp_path / "imported")
    mine = evaluate_checkpoint(str(run))
    assert mine["seq_len"] == 16
    assert evaluate_checkpoint(str(imported), data_dir=str(data_dir))["seq_len"] == 32  # the context
    theirs = evaluate_checkpoint(str(imported), data_dir=str(data_dir), seq_len=16)
    assert theirs["tokens"] == mine["tokens"] and theirs["loss"] == pytest.approx(mine["loss"], rel=1e-6)
    at_context = evaluate_checkpoint(str(run), seq_len=32)
    assert at_context["seq_len"] == 32 and at_context["loss"] != pytest.approx(mine["loss"], rel=1e-6)
    with pytest.raises(ConfigError, match="--seq-len 33 is longer than the model's context of 32 tokens"):
        evaluate_checkpoint(str(run), seq_len=33)


def test_a_reader_that_leaves_stdout_does_not_stop_the_run(data_dir, tmp_path):
    """`lmforge pretrain ... | head -1` ended the run at its next log line (BrokenPipeError: exit 141, no word),
    its steps since the last checkpoint lost: here all of them. Now stdout goes to /dev/null with one note on
    stderr, and the run trains to its end and saves."""
    import subprocess
    import sys

    run = tmp_path / "run"
    args = ["pretrain", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--model.max_seq_len", "32"]
    args += ["--train.batch_size", "4", "--train.max_steps", "20", "--train.log_every", "1", "--eval.every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().startswith("lmforge pretrain: ")
    proc.stdout.close()  # as `head -1` exits
    err = proc.stderr.read()
    assert proc.wait(timeout=240) == 0, err
    assert "note: stdout was closed (its reader, e.g. `| head`, left); the run goes on" in err
    assert load_checkpoint(run).meta["step"] == 20
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r) == 20
