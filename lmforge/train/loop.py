"""The one training loop, used by pretraining and (later) every fine-tuning mode.

Read top to bottom, one optimizer step per iteration (nanoGPT's order):

    set lr from schedule.lr_at(step)
    fetch the accumulation window's micro-batches, count their valid targets
    forward + backward each, loss divided by the window's valid-target count
    (L1 penalty) -> unscale -> clip -> optimizer step -> zero grads
    log every `log_every` steps; evaluate every `eval.every`; checkpoint every `checkpoint.every`
    stop on max_steps, time budget, early stopping or SIGINT/SIGTERM (after a checkpoint)

Dividing by the valid targets of the *whole window* (not each micro-batch's mean) makes
`accum_steps x micro_batch` give the same gradient as one big batch even when micro-batches have
different numbers of valid targets. Differences between training modes live in what is passed in
(model, objective, loader, evaluate, save), never in copies of this function.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.config import CheckpointConfig, EvalConfig, OptimConfig, TrainConfig
from lmforge.log import RunLogger
from lmforge.objectives import CausalLM, Objective, to_device
from lmforge.train.optim import l1_penalty
from lmforge.train.precision import Precision
from lmforge.train.schedule import lr_at
from lmforge.train.state import TrainState


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterator[Any],
    *,
    cfg: TrainConfig,
    optim_cfg: OptimConfig,
    eval_cfg: EvalConfig,
    ckpt_cfg: CheckpointConfig,
    precision: Precision,
    state: TrainState,
    log: RunLogger,
    save: Callable[[TrainState], Path],
    evaluate: Callable[[], dict[str, Any]] | None = None,
    objective: Objective | None = None,
    flops_per_token: float = 0.0,
    peak_flops: float = 0.0,
) -> TrainState:
    """Train until `cfg.max_steps`, the time budget, early stopping or a stop signal.

    Args:
        model: module to train (may be compiled); returns logits for inputs.
        optimizer: built over the trainable parameters.
        loader: infinite iterator of micro-batches, already positioned (resume); the objective reads them.
        cfg, optim_cfg, eval_cfg, ckpt_cfg: the run's config sections.
        precision: device and autocast dtype.
        state: progress so far (fresh or loaded from a checkpoint); updated in place and returned.
        log: progress bar, console lines and metrics.jsonl.
        save: writes a checkpoint of the current state and returns its path.
        evaluate: validation metrics {"loss", "bpb", ...}; None = no evaluation.
        objective: count(batch) -> targets, loss(model, batch) -> summed loss (see objectives.py);
            None = causal LM on (inputs, targets).
        flops_per_token: training FLOPs per token, for MFU.
        peak_flops: the device's measured peak FLOP/s, for MFU.

    Returns:
        The final `TrainState`; `stop_reason` says why training ended.
    """
    device = precision.device
    objective = objective or CausalLM()
    scaler = precision.grad_scaler()
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    session_start = time.perf_counter()
    elapsed_before = state.elapsed_s
    interval_start, interval_tokens, interval_steps = time.perf_counter(), 0, 0
    last_saved_step = state.step
    state.stop_reason = ""  # a resumed or continued run starts unstopped
    model.train()

    with StopSignal() as stop:
        while state.step < cfg.max_steps:
            lr = lr_at(
                state.step,
                lr=cfg.lr,
                final_lr=cfg.final_lr,
                warmup_steps=cfg.warmup_steps,
                max_steps=cfg.max_steps,
                schedule=cfg.schedule,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr

            window = [next(loader) for _ in range(cfg.accum_steps)]
            n_targets = sum(objective.count(batch) for batch in window)
            step_loss = torch.zeros((), device=device)
            for batch in window:
                with precision.autocast():
                    loss = objective.loss(model, to_device(batch, device)) / max(n_targets, 1)
                step_loss += loss.detach()
                (scaler.scale(loss) if scaler else loss).backward()
            if optim_cfg.l1 > 0:
                penalty = optim_cfg.l1 * l1_penalty(optimizer)
                (scaler.scale(penalty) if scaler else penalty).backward()
            if scaler:
                scaler.unscale_(optimizer)
            if optim_cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, optim_cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.tokens += n_targets
            interval_tokens += n_targets
            interval_steps += 1
            state.elapsed_s = elapsed_before + time.perf_counter() - session_start
            log.advance()

            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                dt = time.perf_counter() - interval_start
                tokens_per_s = interval_tokens / dt if dt > 0 else 0.0
                eta = (cfg.max_steps - state.step) * dt / interval_steps
                if cfg.time_budget:
                    eta = min(eta, max(0.0, cfg.time_budget - state.elapsed_s))
                loss_value = step_loss.item()
                log.metrics(
                    {
                        "step": state.step,
                        "loss": loss_value,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens": state.tokens,
                        "tokens_per_s": tokens_per_s,
                        "mfu": flops_per_token * tokens_per_s / peak_flops if peak_flops else 0.0,
                        "elapsed_s": state.elapsed_s,
                        "eta_s": eta,
                    }
                )
                if not math.isfinite(loss_value):
                    log.info(f"warning: loss is {loss_value} at step {state.step}; lower --train.lr?")
                interval_start, interval_tokens, interval_steps = time.perf_counter(), 0, 0

            # Decide whether this is the last step before evaluating, so the final eval always runs.
            if stop.received is not None:
                state.stop_reason = "interrupted"
            elif state.step >= cfg.max_steps:
                state.stop_reason = "max_steps"
            elif cfg.time_budget and state.elapsed_s >= cfg.time_budget:
                state.stop_reason = "time_budget"

            evaluated = False
            want_eval = (eval_cfg.every and state.step % eval_cfg.every == 0) or state.stop_reason in (
                "max_steps",
                "time_budget",
            )
            if evaluate is not None and want_eval:
                metrics = evaluate()
                evaluated = True
                state.elapsed_s = elapsed_before + time.perf_counter() - session_start
                record = {"step": state.step, "val_loss": metrics["loss"], "val_bpb": metrics["bpb"]}
                record.update({f"val_{k}": v for k, v in metrics.items() if k not in ("loss", "bpb", "sample")})
                record["elapsed_s"] = state.elapsed_s
                log.metrics(record)
                if metrics.get("sample"):
                    log.info(f"sample @ step {state.step}: {metrics['sample']!r}")
                if state.best_val_loss is None or metrics["loss"] < state.best_val_loss - cfg.early_stop_min_delta:
                    state.best_val_loss, state.best_step, state.evals_since_best = metrics["loss"], state.step, 0
                else:
                    state.evals_since_best += 1
                    if cfg.early_stop_patience and state.evals_since_best >= cfg.early_stop_patience:
                        state.stop_reason = state.stop_reason or "early_stop"
                        log.info(
                            f"early stopping at step {state.step}: no val-loss improvement in "
                            f"{state.evals_since_best} evaluations (best {state.best_val_loss:.4f} at step "
                            f"{state.best_step})"
                        )

            periodic = ckpt_cfg.every and state.step % ckpt_cfg.every == 0
            if periodic or state.stop_reason or (evaluated and state.best_step == state.step and ckpt_cfg.keep_best):
                if state.step != last_saved_step:
                    save(state)
                    last_saved_step = state.step
            if evaluated or periodic:  # don't bill eval/checkpoint time to throughput
                interval_start = time.perf_counter()
                interval_tokens, interval_steps = 0, 0
            if state.stop_reason:
                break
    return state
