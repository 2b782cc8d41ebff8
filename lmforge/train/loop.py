"""The one training loop, used by pretraining and (later) every fine-tuning mode.

Read top to bottom, one optimizer step per iteration (nanoGPT's order):

    set lr from schedule.lr_at(step)
    fetch the accumulation window's micro-batches, count their valid targets
    forward + backward each, loss divided by the window's valid-target count (a loss term over other
      units, NSP's sentence pairs say, by the window's count of those: objectives.window_loss)
    (L1 penalty) -> unscale -> clip -> optimizer step (skipped if the gradient is NaN/inf) -> zero grads
      (on CUDA with fused Adam(W) the skip is decided on the GPU and counted one step later: `_Verdict`)
    log every `log_every` steps (+ update ratio, loss-spike flag, skipped steps, memory)
    evaluate every `eval.every`; checkpoint every `checkpoint.every`
    stop on max_steps, time budget, early stopping or SIGINT/SIGTERM (after a checkpoint)

Dividing by the valid targets of the *whole window* (not each micro-batch's mean) makes
`accum_steps x micro_batch` give the same gradient as one big batch even when micro-batches have
different numbers of valid targets. Differences between training modes live in what is passed in
(model, objective, loader, evaluate, save), never in copies of this function.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge import dist
from lmforge.config import CheckpointConfig, EvalConfig, OptimConfig, TrainConfig
from lmforge.dist import DistInfo
from lmforge.errors import TrainingDiverged, take_held_interrupt
from lmforge.log import RunLogger
from lmforge.objectives import CausalLM, Objective, to_device, window_counts, window_loss
from lmforge.train.optim import l1_penalty
from lmforge.train.precision import Precision
from lmforge.train.schedule import lr_at
from lmforge.train.state import TrainState


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (main thread only). One the CLI held
    before the loop (`errors.hold_interrupts`) is taken over as received."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if take_held_interrupt():
            self.received = signal.SIGINT
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


# A logged train loss above SPIKE_FACTOR x the running mean of earlier logged losses is flagged as a spike.
SPIKE_FACTOR, SPIKE_EMA = 1.5, 0.9


def _norm(t: torch.Tensor) -> torch.Tensor:
    n = torch.linalg.vector_norm(t.float())
    return n.full_tensor() if hasattr(n, "full_tensor") else n  # FSDP2 shards: reduce to the global norm


def _update_ratio(before: list[torch.Tensor], params: list[torch.Tensor]) -> float:
    """||theta_new - theta_old|| / ||theta_new|| over all trainable parameters (healthy runs: ~1e-3)."""
    delta = torch.stack([_norm(p.detach() - b) for p, b in zip(params, before, strict=True)])
    norm = torch.stack([_norm(p.detach()) for p in params])
    return float(delta.norm() / norm.norm().clamp_min(1e-12))


def _memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; the process's resident memory (RSS) elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:  # Linux: current RSS, in pages
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # macOS/Windows: peak RSS (bytes on macOS)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# Whether a step's finite check may be read one step late (see `_Verdict`): None = on CUDA (where it saves
# the GPU's idle time), True = wherever the optimizer allows it (tests run it on CPU), False = never.
DEFER_FINITE_CHECK: bool | None = None


class _Verdict:
    """Whether a step was skipped for a NaN/inf, on its way to the host without stalling the GPU.

    Asking at once (`bool(torch.isfinite(grad_norm))`) makes the host wait for the whole backward pass, then
    the GPU waits while Python launches the optimizer and the next forward: 10 ms of a 133 ms GPT-2 124M
    step on an H200 had no kernel running. Fused Adam(W) takes the verdict as a tensor (`found_inf`, as
    GradScaler passes it) and skips the update and its step count on the device, so the update needs no
    answer on the host. The loop reads it after the next step's backward has been queued, when the copy
    has long landed, and counts the skip (and rolls back) then. Steps that log, evaluate, save or end the
    run are decided at once, so everything written reflects every step before it.
    """

    def __init__(self, bad: torch.Tensor) -> None:
        self.host = torch.empty((), dtype=bad.dtype, pin_memory=bad.is_cuda)
        self.host.copy_(bad, non_blocking=True)
        self.event = torch.cuda.Event() if bad.is_cuda else None
        if self.event is not None:
            self.event.record()

    def bad(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


def _can_defer(optimizer: torch.optim.Optimizer, device: torch.device, world_size: int, scaler: Any) -> bool:
    """One process, no fp16 loss scaling, and an optimizer that can skip an update on a device flag."""
    if DEFER_FINITE_CHECK is False or world_size > 1 or scaler is not None:
        return False
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return False
    if not all(group.get("fused") for group in optimizer.param_groups):
        return False
    return bool(DEFER_FINITE_CHECK) or device.type == "cuda"


def _step_is_finite(
    grad_norm: torch.Tensor, loss: torch.Tensor, world_size: int, local_grads: bool, device: torch.device
) -> bool:
    """Whether to take this optimizer step, decided the same on every rank. Under DDP/FSDP the gradient
    norm is of the all-reduced gradient (each rank's own loss may differ); a rank's own gradients
    (`local_grads`) are checked with its loss and the verdict all-reduced."""
    if world_size == 1:
        return bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss))
    if not local_grads:
        return bool(torch.isfinite(grad_norm))
    bad = not (bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss)))
    return dist.all_reduce([float(bad)], device, "max")[0] == 0


def _weights_finite(params: list[torch.Tensor], world_size: int, device: torch.device) -> bool:
    """Whether every trained weight is finite on every rank (FSDP2 shards: each rank checks its own)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    bad = any(not bool(torch.isfinite(t.detach()).all()) for t in local if t.numel())
    if world_size > 1:
        bad = dist.all_reduce([float(bad)], device, "max")[0] > 0
    return not bad


def nothing_left(state: TrainState, cfg: TrainConfig) -> str:
    """Why a run resumed at `state` has no step left to train under `cfg` ("" when it has): the reason a re-run
    of a finished run (pretrain or finetune) says "nothing to do" and leaves the run's files as they are."""
    budget, patience = cfg.time_budget, cfg.early_stop_patience
    if state.step >= cfg.max_steps:
        return f"trained to step {state.step} (train.max_steps {cfg.max_steps})"
    if state.stop_reason == "early_stop" and patience and state.evals_since_best >= patience:
        return (
            f"stopped early at step {state.step} (no val-loss improvement in {state.evals_since_best} "
            "evaluations; raise train.early_stop_patience to train on)"
        )
    if budget and state.elapsed_s >= budget:
        return f"trained for {state.elapsed_s:.0f} s (train.time_budget {budget:g} s; raise it to train on)"
    return ""


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
    world: DistInfo | None = None,
    rollback: Callable[[TrainState], None] | None = None,
    after_step: Callable[[int, bool], None] | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    local_grads: bool = False,
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
        objective: count(batch) -> targets, loss(model, batch) -> summed loss (or summed terms, each
            over its own unit: objectives.window_loss);
            None = causal LM on (inputs, targets).
        flops_per_token: training FLOPs per token, for MFU.
        peak_flops: one device's measured peak FLOP/s, for MFU. Under torchrun tokens_per_s is global
            (all ranks), so MFU divides by world_size such devices: achieved / (world_size x peak). A log
            interval that achieves more raises it to what it achieved (said once), so MFU never exceeds 1.
        world: rank and world size under torchrun (see dist.py); None = one process. `model` is then
            wrapped (DDP/FSDP2), `cfg.batch_size` is this rank's share of the global batch, target
            counts and stop decisions are all-reduced, and logged numbers are global.
        rollback: restores model, optimizer, RNG and `state` (in place) from the latest checkpoint,
            keeping the data position; called after `cfg.rollback_after` non-finite steps in a row.
        after_step: called with the new step number and whether the run finishes there (max_steps; not a
            stop signal or the time budget, after which a resume continues), after each optimizer step
            (DiLoCo's outer sync, which also syncs the last step); when an evaluation stops the run early,
            called again with True. The same on every rank (stop decisions are all-reduced).
        lr_schedule: lr for a step, replacing `schedule.lr_at` over `cfg` (continued pretraining follows
            its base run's schedule from the base's step).
        local_grads: each rank's gradients are its own (DiLoCo's workers, not all-reduced as under DDP), so
            whether a step is finite is all-reduced: every rank skips and rolls back together (one rank
            rolling back alone would leave the others waiting in the next collective).

    Returns:
        The final `TrainState`; `stop_reason` says why training ended.
    """
    device = precision.device
    world_size = world.world_size if world else 1
    bad_in_row = 0  # consecutive steps skipped for non-finite loss/gradients
    objective = objective or CausalLM()
    scaler = precision.grad_scaler()
    if scaler is not None and state.grad_scaler:  # (a resume started it over at 65536: every resume of an fp16 run
        scaler.load_state_dict(state.grad_scaler)  # skipped steps to overflows the straight run had learned to avoid)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    defer = _can_defer(optimizer, device, world_size, scaler) and not local_grads
    pending: _Verdict | None = None  # the last step's verdict, when it was deferred
    peak_raised = False  # whether training beat the measured peak_flops (MFU's denominator), which was then raised

    def skip_step(at: int) -> bool:
        """Count step `at` as skipped; after `cfg.rollback_after` in a row, roll back (True)."""
        nonlocal bad_in_row
        state.skipped_steps += 1
        bad_in_row += 1
        if rollback is None or not cfg.rollback_after or bad_in_row < cfg.rollback_after:
            return False
        optimizer.zero_grad(set_to_none=True)
        rollback(state)  # weights, optimizer, RNG, state <- latest checkpoint; data moves on
        bad_in_row = 0
        log.info(
            f"warning: {cfg.rollback_after} non-finite steps in a row at step {at}; rolled back to step "
            f"{state.step} and skipped the batches in between (rollback {state.rollbacks})"
        )
        return True

    session_start = time.perf_counter()
    elapsed_before = state.elapsed_s
    interval_start, interval_tokens, interval_steps = time.perf_counter(), 0, 0
    last_saved_step = state.step
    state.stop_reason = ""  # a resumed or continued run starts unstopped
    model.train()

    with StopSignal() as stop:
        while state.step < cfg.max_steps:
            if lr_schedule is not None:
                lr = lr_schedule(state.step)
            else:
                lr = lr_at(
                    state.step,
                    lr=cfg.lr,
                    final_lr=cfg.final_lr,
                    warmup_steps=cfg.warmup_steps,
                    max_steps=cfg.max_steps,
                    schedule=cfg.schedule,
                    decay_fraction=cfg.decay_fraction,
                )
            for group in optimizer.param_groups:
                group["lr"] = lr

            window = [next(loader) for _ in range(cfg.accum_steps)]
            counts = window_counts(objective, window)  # targets, tokens read, other loss units (NSP pairs, ...)
            if world_size > 1:  # normalise by the global window; DDP/FSDP average gradients, so undo that
                totals = dist.all_reduce(list(counts.values()), device)
                counts = {unit: int(n) for unit, n in zip(counts, totals, strict=True)}
            n_tokens = counts["tokens"]
            step_loss = torch.zeros((), device=device)
            for i, batch in enumerate(window):
                with dist.no_grad_sync(model, sync=i == len(window) - 1):  # all-reduce after the last only
                    with precision.autocast():
                        loss = window_loss(objective.loss(model, to_device(batch, device)), counts)
                    step_loss += loss.detach()
                    loss = loss * world_size if world_size > 1 else loss
                    (scaler.scale(loss) if scaler else loss).backward()
            penalty = l1_penalty(optimizer) if optim_cfg.l1 > 0 else None
            if penalty is not None:
                penalty = optim_cfg.l1 * penalty
                (scaler.scale(penalty) if scaler else penalty).backward()
            if scaler:
                scaler.unscale_(optimizer)
            if optim_cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, optim_cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards
                grad_norm = grad_norm.full_tensor()
            log_now = (state.step + 1) % cfg.log_every == 0 or state.step + 1 == cfg.max_steps
            before = [p.detach().clone() for p in trainable] if log_now else []  # for the update ratio
            if pending is not None:  # the last step's verdict: its copy landed while this step ran
                last_bad, pending = pending.bad(), None
                if not last_bad:
                    bad_in_row = 0
                elif skip_step(at=state.step):
                    continue
            # (decided at once when this step logs, evaluates, saves or ends the run, or hands over)
            plain_step = not (
                log_now
                or state.step + 1 >= cfg.max_steps
                or after_step is not None
                or (eval_cfg.every and (state.step + 1) % eval_cfg.every == 0)
                or (ckpt_cfg.every and (state.step + 1) % ckpt_cfg.every == 0)
            )
            if scaler:
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skips the update itself when fp16 gradients overflowed
                scaler.update()
                state.skipped_steps += int(scaler.get_scale() < scale)
            elif defer and plain_step:  # fused Adam(W) skips on the device flag; counted next step
                bad = (~(torch.isfinite(grad_norm) & torch.isfinite(step_loss))).to(torch.float32)
                optimizer.found_inf = bad
                try:
                    optimizer.step()
                finally:
                    del optimizer.found_inf
                pending = _Verdict(bad)
            elif _step_is_finite(grad_norm, step_loss, world_size, local_grads, device):  # the same on every rank
                optimizer.step()
                bad_in_row = 0
            elif skip_step(at=state.step + 1):  # one NaN/inf gradient would poison every weight: skip this update
                continue
            update_ratio = _update_ratio(before, trainable) if log_now else 0.0
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.tokens += n_tokens
            interval_tokens += n_tokens
            interval_steps += 1
            state.elapsed_s = elapsed_before + time.perf_counter() - session_start
            log.advance()

            # Decide whether this is the last step before evaluating, so the final eval always runs.
            interrupted = stop.received is not None
            over_budget = bool(cfg.time_budget and state.elapsed_s >= cfg.time_budget)
            if world_size > 1:  # all ranks stop at the same step, or the next collective hangs
                interrupted, over_budget = (v > 0 for v in dist.all_reduce([interrupted, over_budget], device, "max"))
            if interrupted:
                state.stop_reason = "interrupted"
            elif state.step >= cfg.max_steps:
                state.stop_reason = "max_steps"
            elif over_budget:
                state.stop_reason = "time_budget"
                log.info(
                    f"stopping at step {state.step} of {cfg.max_steps}: the time budget of {cfg.time_budget:g} s "
                    "(train.time_budget) is spent"
                )
            if pending is not None and state.stop_reason:  # stopping on a deferred step: count it now
                if pending.bad():
                    state.skipped_steps += 1
                pending = None
            # a run stopped by a signal or its time budget is not finished: a resume (with a larger budget) goes on as
            # if it had never stopped, so it must not do what the longer run would not (DiLoCo's sync, see dist.DiLoCo)
            if after_step is not None:
                after_step(state.step, state.stop_reason == "max_steps")

            # a run stopped early (Ctrl-C, time budget) logs its last step too, so its curve ends where it stopped.
            # Such a record is marked: the straight run has none, so a resume (after a time budget: with the budget
            # raised) drops it (`truncate_metrics`) and it leaves the loss mean alone, and metrics.jsonl ends as the
            # straight run's. (Before, a time-budget stop's record stayed and fed the mean.)
            final_record = not log_now and state.stop_reason in ("interrupted", "time_budget")
            interrupted_record = final_record
            if log_now or final_record:
                dt = time.perf_counter() - interval_start
                tokens_per_s = interval_tokens / dt if dt > 0 else 0.0
                eta = (cfg.max_steps - state.step) * dt / interval_steps
                if cfg.time_budget:
                    eta = min(eta, max(0.0, cfg.time_budget - state.elapsed_s))
                # One device's FLOP/s. The peak is measured once, in 0.1 s at start-up: at a loaded moment on a shared
                # CPU it came out low, and the logged MFU reached 104.6%. A device that did more than its "peak" shows
                # the true peak is at least that: raise it (said once) rather than log more than 100%.
                achieved = flops_per_token * tokens_per_s / world_size
                if flops_per_token and peak_flops and achieved > peak_flops:
                    if not peak_raised:
                        log.info(
                            f"note: training reached {achieved / 1e9:.1f} GFLOP/s, above the {peak_flops / 1e9:.1f} "
                            "GFLOP/s matmul peak measured at start-up (a busy moment); MFU is now against the highest "
                            "rate reached"
                        )
                    peak_flops, peak_raised = achieved, True
                loss_value = step_loss.item()
                if world_size > 1:  # each rank holds its share of the global mean
                    loss_value = dist.all_reduce([loss_value], device)[0]
                ema = state.loss_ema
                spike = ema is not None and loss_value > SPIKE_FACTOR * ema
                if math.isfinite(loss_value) and not interrupted_record:
                    state.loss_ema = loss_value if ema is None else SPIKE_EMA * ema + (1 - SPIKE_EMA) * loss_value
                log.metrics(
                    {
                        "step": state.step,
                        "loss": loss_value,
                        "lr": lr,
                        "grad_norm": float(grad_norm),  # before clipping
                        # (measured on log steps only: it needs the weights from before the update)
                        **({"update_ratio": update_ratio} if log_now else {}),
                        "loss_spike": spike,
                        "skipped_steps": state.skipped_steps,
                        "mem_mib": _memory_mib(device),
                        "tokens": state.tokens,
                        "tokens_per_s": tokens_per_s,
                        # (no FLOPs count, as in fine-tuning, where a "token" may be an example: no MFU)
                        **({"mfu": achieved / peak_flops} if flops_per_token and peak_flops else {}),
                        "elapsed_s": state.elapsed_s,
                        "eta_s": eta,
                        **({"interrupted": True} if interrupted_record else {}),
                    }
                )
                if not math.isfinite(loss_value):
                    log.info(f"warning: loss is {loss_value} at step {state.step}; lower --train.lr?")
                elif spike:
                    log.info(
                        f"warning: loss spike at step {state.step}: {loss_value:.4f} vs running mean "
                        f"{ema:.4f}; lower --train.lr or raise --train.warmup_steps if it repeats"
                    )
                interval_start, interval_tokens, interval_steps = time.perf_counter(), 0, 0

            evaluated = False
            on_interval = bool(eval_cfg.every and state.step % eval_cfg.every == 0)
            want_eval = on_interval or state.stop_reason in ("max_steps", "time_budget")
            # A time-budget stop off the eval interval evaluates for the user (the numbers the run ends with), not
            # for the run: a longer straight run has no evaluation there. Its record is marked as an interruption's
            # (a resume drops it) and it moves neither the best loss nor patience (state.json), so that a resume
            # with the budget raised ends as the straight run does (before, both stayed).
            budget_only = state.stop_reason == "time_budget" and not on_interval
            if evaluate is not None and want_eval:
                metrics = evaluate()
                evaluated = True
                state.elapsed_s = elapsed_before + time.perf_counter() - session_start
                record = {"step": state.step, "val_loss": metrics["loss"], "val_bpb": metrics.get("bpb")}
                if "bpb" not in metrics:  # encoder objectives (MLM, ELECTRA), classify and DPO: no bits per byte
                    del record["val_bpb"]
                record.update({f"val_{k}": v for k, v in metrics.items() if k not in ("loss", "bpb", "sample")})
                record["elapsed_s"] = state.elapsed_s
                if metrics.get("sample"):
                    record["sample"] = metrics["sample"]  # shown by `lmforge report`
                if budget_only:
                    record["interrupted"] = True
                log.metrics(record)
                if metrics.get("sample"):
                    log.info(f"sample @ step {state.step}: {metrics['sample']!r}")
                # patience counts evaluations that do not beat the reference (the last loss that did) by more
                # than min_delta, Keras' rule; the best is the lowest loss whatever min_delta is. With
                # min_delta 0 the two are the same. (Runs from before patience_ref: their best was it.)
                # A NaN loss is no best and no reference: once stored, no loss compares below it, so the best
                # stayed NaN and patience ran out however the later losses fell.
                loss_value = metrics["loss"]
                finite = math.isfinite(loss_value)
                if not budget_only:
                    reference = state.patience_ref if state.patience_ref is not None else state.best_val_loss
                    if finite and (state.best_val_loss is None or loss_value < state.best_val_loss):
                        state.best_val_loss, state.best_step = loss_value, state.step
                    if finite and (reference is None or loss_value < reference - cfg.early_stop_min_delta):
                        state.patience_ref, state.evals_since_best = loss_value, 0
                    else:
                        state.evals_since_best += 1
                        if cfg.early_stop_patience and state.evals_since_best >= cfg.early_stop_patience:
                            state.stop_reason = state.stop_reason or "early_stop"
                            log.info(
                                f"early stopping at step {state.step}: no val loss below "
                                f"{reference - cfg.early_stop_min_delta:.4f} (the reference "
                                f"{reference:.4f} minus min_delta {cfg.early_stop_min_delta:g}) in "
                                f"{state.evals_since_best} evaluations; best {state.best_val_loss:.4f} at step "
                                f"{state.best_step}"
                                if cfg.early_stop_min_delta
                                else f"early stopping at step {state.step}: no val-loss improvement in "
                                f"{state.evals_since_best} evaluations (best {state.best_val_loss:.4f} at step "
                                f"{state.best_step})"
                            )

            if after_step is not None and state.stop_reason == "early_stop":
                after_step(state.step, True)  # before the final checkpoint
            periodic = ckpt_cfg.every and state.step % ckpt_cfg.every == 0
            best_now = evaluated and state.best_step == state.step and ckpt_cfg.keep_best  # (a finite val loss)
            if periodic or state.stop_reason or best_now:
                # A checkpoint becomes `latest`: what a rollback and a resume start from. Weights gone NaN/inf (an
                # update that overflowed) are never saved, and a periodic checkpoint in the middle of a run of
                # skipped NaN/inf steps is left out (a new best validation loss is still saved): with lr 1e6 the
                # weights stayed finite but every loss was NaN, the step-5 checkpoint of those weights became
                # `latest`, each rollback went back to it, and the run ended "diverged again after 3 rollbacks"
                # with it (and 1e39's inf weights) as its latest.
                finite = state.step == last_saved_step or _weights_finite(trainable, world_size, device)
                if not finite and state.stop_reason:
                    raise TrainingDiverged(
                        f"the weights became NaN/inf by step {state.step}, so they are not saved (the run's "
                        "checkpoints are left as they are); lower --train.lr or raise --train.warmup_steps"
                    )
                if state.step != last_saved_step and (state.stop_reason or (finite and (best_now or not bad_in_row))):
                    if scaler is not None:
                        state.grad_scaler = scaler.state_dict()
                    save(state)
                    last_saved_step = state.step
                elif state.step != last_saved_step:
                    why = "the weights are NaN/inf" if not finite else f"its last {bad_in_row} steps were NaN/inf"
                    log.info(f"warning: no checkpoint at step {state.step}: {why}; lower --train.lr?")
            if evaluated or periodic:  # don't bill eval/checkpoint time to throughput
                interval_start = time.perf_counter()
                interval_tokens, interval_steps = 0, 0
            if state.stop_reason:
                break
    if stop.received is not None and state.stop_reason != "interrupted":
        # A signal during the last evaluation or checkpoint came after the loop's last look at it: the run is
        # trained and saved, but its caller must not go on as if no one had asked to stop (a fine-tune's task
        # scoring ran for minutes and exited 0). Delivered again now that the caller's handlers are back: the
        # CLI's raise KeyboardInterrupt (exit 130), and the re-run finds nothing left to train.
        signal.raise_signal(stop.received)
    return state
