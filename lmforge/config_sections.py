"""The run config's own sections (data, train, optim, eval, checkpoint, log): typed dataclasses whose fields carry
their defaults and help (`opt`) and whose `__post_init__` checks them. `config.RunConfig` composes them with the
sections that live with their component (models/configs.py, objective_config.py, dist_config.py); reading them
from TOML files and flags is `config`'s job. None of this imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.errors import ConfigError
from lmforge.fields import check, opt, saved_train


@dataclass(kw_only=True)
class DataConfig:
    dir: str = opt("", "prepared data directory (made by `lmforge prepare`)")
    seq_len: int = opt(0, "training sequence length in tokens; 0 = model.max_seq_len")
    mix: str = opt(
        "",
        "train on a weighted mixture of prepared directories, 'DIR=0.7,DIR2=0.3' (same tokenizer as data.dir, "
        "which still supplies validation); exact proportions, resumable",
    )
    curriculum: Literal["none", "doc_length"] = opt(
        "none", "doc_length: train on windows of short documents first and phase in long ones over curriculum_steps"
    )
    curriculum_steps: int = opt(1000, "steps until every window is eligible (with data.curriculum; > 0)")
    curriculum_start: float = opt(0.1, "share of the easiest windows eligible at step 0 (with data.curriculum)")

    def __post_init__(self) -> None:
        check(self.seq_len >= 0, f"data.seq_len must be >= 0, got {self.seq_len}")
        if self.mix:
            from lmforge.data.mixture import parse_mix

            parse_mix(self.mix)  # ConfigError on a malformed spec, before any work starts
        check(
            self.curriculum in ("none", "doc_length"),
            f"data.curriculum must be 'none' or 'doc_length', got {self.curriculum!r}",
        )
        check(self.curriculum_steps >= 0, f"data.curriculum_steps must be >= 0, got {self.curriculum_steps}")
        check(0 < self.curriculum_start <= 1, f"data.curriculum_start must be in (0, 1], got {self.curriculum_start}")
        check(
            not (self.mix and self.curriculum != "none"),
            "data.mix and data.curriculum cannot be combined yet; drop --data.mix or --data.curriculum",
        )

    def refuse_unused(self, names: set[str]) -> None:
        """Settings in `names` (those the user wrote) that the run would not read, or that would quietly turn the
        curriculum off, are refused: curriculum_steps or curriculum_start without data.curriculum; with
        data.curriculum_steps 0 every window is eligible from step 0, i.e. no curriculum (a saved run's
        config.json is not checked, so such a run still loads)."""
        given = sorted({"curriculum_steps", "curriculum_start"} & names)
        if given and self.curriculum == "none":  # (both were accepted and silently ignored)
            raise ConfigError(
                f"data.{given[0]} is used by data.curriculum doc_length only, and this run has none; drop it, or "
                "pass --data.curriculum doc_length"
            )
        if {"curriculum", "curriculum_steps"} & names and self.curriculum != "none":
            check(
                self.curriculum_steps > 0,
                f"data.curriculum_steps 0 means no curriculum (every window eligible from step 0), yet data.curriculum "
                f"is {self.curriculum}; pass --data.curriculum_steps N > 0, or drop --data.curriculum",
            )


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is at most `at_most` (>= 1), in O(sqrt(n)) steps; past 10**10, one that fits."""
    if n > 10**10:
        return math.gcd(n, at_most)
    best, k = 1, 1
    while k * k <= n:
        if n % k == 0:
            best = max(best, *(d for d in (k, n // k) if d <= at_most))
        k += 1
    return best


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = opt(1000, "optimizer steps to train for")
    time_budget: float = opt(0.0, "stop (and checkpoint) after this many seconds of training; 0 = no limit")
    batch_size: int = opt(32, "global batch: sequences per optimizer step")
    micro_batch_size: int = opt(0, "sequences per forward pass; 0 = batch_size (accumulation is derived)")
    lr: float = opt(3e-4, "peak learning rate")
    min_lr: float | None = opt(None, "learning rate at the end of decay; unset = lr / 10, 0 = decay to zero")
    warmup_steps: int = opt(100, "linear warmup steps from 0 to lr")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = opt(
        "cosine", "learning-rate decay after warmup; wsd = warmup-stable-decay"
    )
    decay_fraction: float = opt(
        0.2,
        "wsd: share of max_steps, at the end, spent decaying linearly toward min_lr (reached at step max_steps, "
        "as for cosine and linear: the last step taken is one step short of it)",
    )
    seed: int = opt(1337, "seed for weights, data order and dropout")
    device: Literal["auto", "cpu", "cuda", "mps"] = opt("auto", "where to train; auto = cuda if available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "autocast precision; auto = bfloat16 on CUDA GPUs that support it, float32 elsewhere"
    )
    compile: bool = opt(False, "torch.compile the model and the causal-LM cross-entropy (GPU: ~1.3x faster)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = opt(
        "default",
        "torch.compile mode with train.compile: reduce-overhead replays each compiled graph as a CUDA graph "
        "(GPU only; no launch gaps: GPT-2 124M 2-3% faster on an H200, the same on an H100); max-autotune also "
        "benchmarks kernels (long compile)",
    )
    attention: Literal["auto", "flash", "cudnn", "efficient"] = opt(
        "auto",
        "CUDA attention kernel SDPA tries first (the others stay as fallbacks); auto = torch's choice "
        "(cuDNN's on an H100 with torch 2.11); only auto elsewhere",
    )
    log_every: int = opt(10, "steps between log lines and metrics.jsonl records")
    early_stop_patience: int = opt(
        0, "stop after this many evaluations in a row that do not count as an improvement (min_delta); 0 = off"
    )
    early_stop_min_delta: float = opt(
        0.0,
        "an eval counts as an improvement when it beats the last eval that counted (not the lowest val loss) by "
        "more than this (Keras' rule)",
    )
    activation_checkpointing: bool = opt(
        False, "recompute each block's activations in backward: much less memory for ~1/3 more compute"
    )
    rollback_after: int = opt(
        5, "non-finite (NaN/inf) steps in a row, each skipped, before rolling back to the latest checkpoint; 0 = never"
    )

    def __post_init__(self) -> None:
        check(self.max_steps > 0, f"train.max_steps must be > 0, got {self.max_steps}")
        check(self.time_budget >= 0, f"train.time_budget must be >= 0 seconds, got {self.time_budget}")
        check(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        mb = self.micro_batch_size or self.batch_size
        if mb > 0 and (mb > self.batch_size or self.batch_size % mb):
            # (the fix named: a preset's micro-batch under a smaller --train.batch_size said only "must divide")
            raise ConfigError(
                f"train.micro_batch_size ({mb}) must divide train.batch_size ({self.batch_size}); pass "
                f"--train.micro_batch_size {_largest_divisor(self.batch_size, mb)} (or 0: the whole batch in one pass)",
            )
        check(mb > 0, f"train.micro_batch_size must be >= 0 (0 = train.batch_size), got {mb}")
        check(0 < self.lr < math.inf, f"train.lr must be a number > 0, got {self.lr}")
        check(0 <= self.seed < 2**63, f"train.seed must be in [0, 2**63), got {self.seed}")
        # (inf made every lr after warmup inf or NaN: 5 NaN steps, then "lower --train.lr")
        check(
            self.min_lr is None or 0 <= self.min_lr < math.inf, f"train.min_lr must be a number >= 0, got {self.min_lr}"
        )
        check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0 <= self.decay_fraction <= 1, f"train.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        check(self.log_every > 0, f"train.log_every must be > 0, got {self.log_every}")
        check(
            self.compile or self.compile_mode == "default",
            f"train.compile_mode {self.compile_mode!r} needs train.compile true (--train.compile true)",
        )
        check(self.early_stop_patience >= 0, "train.early_stop_patience must be >= 0")
        # (a negative min_delta let a worse loss reset the patience; NaN made every evaluation count as no better)
        check(
            0 <= self.early_stop_min_delta < math.inf,
            f"train.early_stop_min_delta must be a number >= 0, got {self.early_stop_min_delta}",
        )
        check(self.rollback_after >= 0, f"train.rollback_after must be >= 0 (0 = never), got {self.rollback_after}")

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size

    def micro_batch_per_rank(self, world_size: int) -> int:
        """Sequences per forward pass on each of `world_size` ranks: micro_batch_size, or (0) the global
        batch split over them. A global batch that does not split into whole micro-batches on every rank
        is a `ConfigError`; training (`train/run.py`) and `lmforge estimate` both ask here, so estimate
        refuses the world sizes training refuses."""
        micro = self.micro_batch_size or max(1, self.batch_size // world_size)
        if self.batch_size % (micro * world_size):
            if self.micro_batch_size:
                raise ConfigError(
                    f"train.batch_size {self.batch_size} (global) must be a multiple of train.micro_batch_size "
                    f"{micro} x {world_size} processes; change one of them"
                )
            raise ConfigError(
                f"train.batch_size {self.batch_size} (global) must be a multiple of the {world_size} processes "
                "sharing it (train.micro_batch_size 0 splits it evenly); change one of them"
            )
        return micro

    @property
    def accum_steps(self) -> int:
        return self.batch_size // self.micro_batch

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def refuse_unused(self, names: set[str]) -> None:
        """A setting in `names` (those the user wrote) that this run never reads is an error, as for optim: each
        of these was accepted and silently ignored."""
        if "min_lr" in names:
            check(
                self.schedule != "constant",
                "train.min_lr is not used by train.schedule constant (the lr stays at train.lr after warmup); drop "
                "it, or pick a decaying --train.schedule (cosine, linear, wsd)",
            )
        if "decay_fraction" in names:
            check(
                self.schedule == "wsd",
                f"train.decay_fraction is used by train.schedule wsd only, and this run's is {self.schedule}; drop "
                "it, or pass --train.schedule wsd",
            )
        if "early_stop_min_delta" in names:
            check(
                self.early_stop_patience > 0,
                "train.early_stop_min_delta is used by early stopping, which is off (train.early_stop_patience 0); "
                "pass --train.early_stop_patience N or drop it",
            )


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["adamw", "sgd", "muon"] = opt(
        "adamw", "optimizer; muon = Muon for hidden matrices, AdamW for embeddings, head, norms and biases"
    )
    weight_decay: float = opt(
        0.1,
        "decoupled weight decay (AdamW) or L2 penalty (SGD) on matrices; not on norms/biases (with muon: on "
        "the AdamW-trained embeddings and head only, the hidden matrices take none)",
    )
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(False, "SGD Nesterov momentum")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value; 0 = off")
    l1: float = opt(0.0, "L1 penalty coefficient on the weight matrices (not norms/biases), added to the loss; 0 = off")
    fused: Literal["auto", "on", "off"] = opt(
        "auto",
        "fused AdamW kernel (one pass instead of ~10 per tensor: 3-4.5x faster optimizer steps on CPU; "
        "rounding differs from off); auto = on for CPU and CUDA",
    )
    muon_lr: float = opt(0.02, "Muon peak learning rate for hidden matrices (follows train.lr's schedule)")
    muon_momentum: float = opt(0.95, "Muon (Nesterov) momentum")
    muon_ns_steps: int = opt(5, "Newton-Schulz iterations per Muon update (fewer = cheaper, less orthogonal)")
    muon_ns_dtype: Literal["float32", "bfloat16"] = opt(
        "float32", "dtype of Muon's Newton-Schulz products; bfloat16 = Muon's GPU default (on CPUs measure first)"
    )

    def __post_init__(self) -> None:
        check(  # (inf: every weight NaN after the first step)
            0 <= self.weight_decay < math.inf, f"optim.weight_decay must be a number >= 0, got {self.weight_decay}"
        )
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
        check(0 < self.eps < math.inf, f"optim.eps must be a number > 0, got {self.eps}")  # inf: no update, silently
        check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        check(0 <= self.l1 < math.inf, f"optim.l1 must be a number >= 0, got {self.l1}")  # inf: every step NaN
        check(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}")
        check(not self.nesterov or self.momentum > 0, "optim.nesterov needs optim.momentum > 0")
        check(0 < self.muon_lr < math.inf, f"optim.muon_lr must be a number > 0, got {self.muon_lr}")  # inf: NaN
        check(0 <= self.muon_momentum < 1, f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        check(self.muon_ns_steps > 0, f"optim.muon_ns_steps must be > 0, got {self.muon_ns_steps}")

    def refuse_unused(self, names: set[str]) -> None:
        """A setting in `names` that the chosen optimizer never reads is an error rather than silently ignored
        (`load_config` and finetune pass the settings off their defaults and those the user wrote; not checked
        here in `__post_init__`, so that a saved run whose preset set such a value still loads)."""
        for name in sorted(names):
            readers = OPTIM_READERS.get(name, (self.name,))
            own = f"muon_{name}" if self.name == "muon" and f"muon_{name}" in OPTIM_READERS else None
            check(
                self.name in readers,
                f"optim.{name} is not used by optim.name {self.name} (only by {' or '.join(readers)}); drop it, "
                + (f"or set --optim.{own}, Muon's own" if own else f"or pass --optim.name {readers[0]}"),
            )


# The optimizers that read each setting that not all of them read (train/optim.py: build_optimizer). Muon trains
# embeddings, head, norms and biases with its own (unfused) AdamW, so it reads the betas and eps but not `fused`.
OPTIM_READERS = {
    **dict.fromkeys(("beta1", "beta2", "eps"), ("adamw", "muon")),
    **dict.fromkeys(("momentum", "nesterov"), ("sgd",)),
    "fused": ("adamw",),
    **dict.fromkeys(("muon_lr", "muon_momentum", "muon_ns_steps", "muon_ns_dtype"), ("muon",)),
}


@dataclass(kw_only=True)
class EvalConfig:
    """How much of the validation split an evaluation covers, and in what pieces.

    An eval batch is `batch_size` sequences, or (0) `train.batch_size`: the batch the user set, not the
    micro-batch, so `max_batches` covers the same first max_batches x batch sequences of the split
    whatever the gradient accumulation and the number of processes; only the size of the forward
    passes that run them follows the training micro-batch on each rank.
    """

    every: int = opt(200, "steps between validation evaluations; 0 = only at the end")
    max_batches: int = opt(
        0,
        "eval batches per evaluation: the first max_batches x eval.batch_size (0: x train.batch_size) "
        "sequences of the validation split, whatever the accumulation and number of processes; 0 = all of it",
    )
    batch_size: int = opt(
        0,
        "sequences per eval batch, one forward pass each; 0 = train.batch_size, run in forward passes of the "
        "training micro-batch on each process",
    )
    sample_tokens: int = opt(0, "tokens to sample into the log at each evaluation; 0 = none")

    def __post_init__(self) -> None:
        check(self.every >= 0, f"eval.every must be >= 0, got {self.every}")
        check(self.max_batches >= 0, f"eval.max_batches must be >= 0, got {self.max_batches}")
        check(self.batch_size >= 0, f"eval.batch_size must be >= 0, got {self.batch_size}")
        check(self.sample_tokens >= 0, f"eval.sample_tokens must be >= 0, got {self.sample_tokens}")

    def sequences(self, train: TrainConfig) -> int:
        """Sequences one evaluation covers: `max_batches` eval batches (class docstring); 0 = the whole split."""
        return self.max_batches * (self.batch_size or train.batch_size)

    def forward_batch(self, train: TrainConfig, world_size: int = 1) -> int:
        """Sequences per evaluation forward pass on each of `world_size` processes: `batch_size`, or the
        training micro-batch per process (what fits a training step fits a forward without gradients)."""
        return self.batch_size or train.micro_batch_per_rank(world_size)


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = opt(
        500,
        "steps between checkpoints; 0 = only at the end and on interruption (with keep_best, an evaluation "
        "that gives a new best val loss also saves one)",
    )
    keep: int = opt(3, "how many recent checkpoints to keep (the best one is kept too)")
    keep_best: bool = opt(True, "also keep the checkpoint with the lowest validation loss")
    resume_from: str = opt(
        "latest",
        "checkpoint a re-run resumes from: latest, previous (newest that passes its checksums) or a step-NNNNNN name",
    )
    sharded: bool = opt(
        False,
        "under FSDP2, each rank writes only its own shards (no gather to rank 0; needs a filesystem every rank "
        "sees); any world size, eval, generate and export read them. DiLoCo always writes one file per worker",
    )

    def __post_init__(self) -> None:
        check(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every}")
        check(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass(kw_only=True)
class LogConfig:
    tensorboard: bool = opt(False, "also write TensorBoard event files to RUN_DIR/tensorboard (needs tensorboard)")
    wandb: bool = opt(False, "also log to Weights & Biases, offline unless WANDB_MODE=online (needs wandb)")
    wandb_project: str = opt("lmforge", "W&B project name")
    mlflow: bool = opt(False, "also log to MLflow: RUN_DIR/mlruns unless MLFLOW_TRACKING_URI is set (needs mlflow)")

    def refuse_unused(self, names: set[str]) -> None:
        """log.wandb_project in `names` (those the user wrote) without log.wandb is refused: it was ignored."""
        check(
            "wandb_project" not in names or self.wandb,
            "log.wandb_project names the Weights & Biases project of log.wandb, which is off; pass --log.wandb or "
            "drop it",
        )


def resumed_train(saved: Any, version: Any, train: TrainConfig) -> tuple[TrainConfig, str]:
    """`train` (the re-run command's settings) for resuming a run whose saved train section is `saved`: a run
    saved before version 2 with min_lr 0 decayed toward lr / 10, and the same min_lr 0 (its command, re-run)
    keeps that schedule rather than switching to a decay to zero part-way. Returns (settings, a note or "")."""
    if train.min_lr == 0 and saved_train(saved, version) is not saved:
        return dataclasses.replace(train, min_lr=None), (
            f"note: this run was started when train.min_lr 0 meant lr / 10; it keeps that schedule (to "
            f"{train.lr / 10:g}); to decay to zero instead, start a new run with --train.min_lr 0"
        )
    return train, ""
