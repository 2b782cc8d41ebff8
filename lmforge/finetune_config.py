"""`lmforge finetune`'s settings: `FinetuneConfig`, which flag applies to which task and mode, the default lr per
mode, and the train/optim/eval/checkpoint/log sections it takes (`finetune_sections`).

Why apart from finetune.py: the CLI's parser reads these to build `lmforge finetune --help` (and `estimate --adapt`'s
defaults), and refuses bad flags with them, before any model loads; finetune.py imports torch (1.8 s) and the
model code. This module imports neither. finetune.py re-exports its public names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.data.qa import DOC_STRIDE
from lmforge.errors import ConfigError
from lmforge.fields import changed_fields, check, opt

# Default peak lr per mode: full updates move every weight, so they get the smallest; a soft prompt is a
# few vectors far from the data and needs large steps (Lester et al. 2021 use 0.3 with Adafactor).
# Distillation trains every weight like full, usually of a small, briefly pretrained student: 1e-3.
ADAPT_LR = {"full": 3e-4, "head": 1e-3, "lora": 1e-3, "prompt": 1e-2, "distill": 1e-3}
CHAT_TASKS = ("sft", "qa", "dpo")


@dataclass(kw_only=True)
class FinetuneConfig:
    task: Literal["classify", "sft", "translate", "qa", "dpo", "clm"] = opt("sft", "what to train for")
    adapt: Literal["full", "head", "lora", "prompt", "distill"] = opt(
        "full", "which parameters train (distill: all, on a --teacher's soft targets + the data)"
    )
    lora_rank: int = opt(8, "LoRA rank r")
    lora_alpha: float = opt(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    lora_targets: list[str] = field(
        default_factory=lambda: ["qkv", "attn.proj"],
        metadata={
            "help": "linear layers that get adapters (name suffixes: qkv, attn.proj, mlp.fc, mlp.proj; GPT, BERT, "
            "ELECTRA; pooler: BERT's; several in one flag: qkv,mlp.fc)"
        },
    )
    prompt_tokens: int = opt(16, "soft-prompt length for --adapt prompt")
    max_len: int = opt(0, "tokens per example; 0 = the model's context")
    augment: int = opt(0, "classification: augmented copies of each training text (word delete/swap/insert)")
    dpo_beta: float = opt(0.1, "DPO beta (strength of the pull towards the reference)")
    dpo_reference: Literal["precomputed", "live"] = opt(
        "precomputed",
        "DPO reference: log-probs computed once before training (one model in memory) or a live frozen copy",
    )
    merge: bool = opt(False, "LoRA: save weights with the adapters merged in, instead of adapters only")
    pack: bool = opt(False, "sft/qa/translate: pack short examples into shared rows (attention kept per example)")
    eval_samples: int = opt(200, "val examples scored with task metrics at the end (generation tasks)")
    max_new_tokens: int = opt(
        0, "generation tasks: answer length limit when scoring (0: 48, or half the context where 48 does not fit)"
    )
    doc_stride: int = opt(
        DOC_STRIDE,
        "qa: a context too long for the model is scored in overlapping windows sharing this many tokens (at most "
        "half a window)",
    )
    replay: str = opt("", "clm: old-domain text file mixed into training (replay against forgetting)")
    replay_fraction: float = opt(0.0, "clm: replay windows as a fraction of the new training windows")
    old_val: str = opt("", "clm: old-domain validation text; loss before/after shows forgetting")
    schedule: Literal["fresh", "continue"] = opt(
        "fresh",
        "clm: learning rates from --train.* (fresh) or the base pretraining run's schedule from its step (continue)",
    )
    field: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "rename a task field: NAME=COLUMN, e.g. text=sentence (a dotted COLUMN reaches into nested JSON: "
            "output=instances.output, one example per item of a list)"
        },
    )
    teacher: str = opt("", "--adapt distill: the teacher run or checkpoint (same tokenizer as BASE)")
    distill_temperature: float = opt(2.0, "--adapt distill: softmax temperature T of the soft targets")
    distill_alpha: float = opt(0.5, "--adapt distill: weight of the soft (KL * T^2) term; 1 - alpha on the data loss")

    def __post_init__(self) -> None:
        # `--lora-targets qkv,mlp.fc` is those two, as `estimate` reads it (finetune refused it: "matches no layer")
        self.lora_targets = [t.strip() for value in self.lora_targets for t in value.split(",") if t.strip()]
        check(self.lora_rank > 0, f"--lora-rank must be > 0, got {self.lora_rank}")
        # (nan and inf trained: the update, scaled by alpha / r, made every loss NaN, and the run was still written)
        check(0 < self.lora_alpha < float("inf"), f"--lora-alpha must be a number > 0, got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        check(self.prompt_tokens > 0, f"--prompt-tokens must be > 0, got {self.prompt_tokens}")
        check(self.max_len >= 0 and self.augment >= 0, "--max-len and --augment must be >= 0")
        check(0 < self.dpo_beta < float("inf"), f"--dpo-beta must be a number > 0, got {self.dpo_beta}")
        check(self.eval_samples >= 1, f"--eval-samples must be >= 1, got {self.eval_samples}")
        check(
            self.max_new_tokens >= 0,
            f"--max-new-tokens must be >= 1 (or 0: 48 where it fits), got {self.max_new_tokens}",
        )
        check(self.doc_stride >= 0, f"--doc-stride must be a number of tokens >= 0, got {self.doc_stride}")
        check(0 <= self.replay_fraction <= 10, f"--replay-fraction must be in [0, 10], got {self.replay_fraction}")
        check(self.adapt != "head" or self.task != "dpo", "DPO with --adapt head is not supported; use full or lora")
        if self.adapt == "distill":
            check(bool(self.teacher), "--adapt distill needs --teacher RUN_DIR (the model to learn from)")
            check(
                self.task in ("clm", "sft", "qa", "translate") and not self.pack,
                "--adapt distill works for --task clm, sft, qa or translate, without --pack",
            )
        # (finite: inf passed, and T^2 * KL = inf * 0 made every step's loss NaN, skipped, with the run still written)
        check(
            0 < self.distill_temperature < float("inf"),
            f"--distill-temperature must be a number > 0, got {self.distill_temperature}",
        )
        check(0 <= self.distill_alpha <= 1, f"--distill-alpha must be in [0, 1], got {self.distill_alpha}")
        check(
            not self.pack or (self.task in ("sft", "qa", "translate") and self.adapt != "prompt"),
            "--pack works for --task sft, qa or translate, without --adapt prompt",
        )
        check(
            bool(self.replay) == (self.replay_fraction > 0),
            "--replay OLD_TEXT and --replay-fraction F (> 0, replay windows per new window) go together",
        )
        check_applies(self, changed_fields(self))  # a setting the run would not use is an error, not ignored


def check_applies(cfg: FinetuneConfig, names: set[str]) -> None:
    """Refuse each setting in `names` that `cfg`'s task and adaptation mode would not use. The config
    checks the settings off their defaults; the CLI also those written at their default value."""
    for name in [f.name for f in dataclasses.fields(cfg) if f.name in names]:
        applies = _APPLIES_TO.get(name)
        check(
            applies is None or applies[0](cfg),
            f"--{name.replace('_', '-')} is for {applies and applies[1]}; drop it (this run: --task {cfg.task} "
            f"--adapt {cfg.adapt})",
        )


_GENERATION_TASKS = ("sft", "qa", "translate")
# settings that only some tasks / adaptation modes use: (applies to this config?, what it is for)
_APPLIES_TO: dict[str, tuple[Any, str]] = {
    **{k: (lambda c: c.adapt == "lora", "--adapt lora") for k in ("lora_rank", "lora_alpha", "lora_dropout")},
    "lora_targets": (lambda c: c.adapt == "lora", "--adapt lora"),
    "merge": (lambda c: c.adapt == "lora", "--adapt lora"),
    "prompt_tokens": (lambda c: c.adapt == "prompt", "--adapt prompt"),
    **{
        k: (lambda c: c.adapt == "distill", "--adapt distill")
        for k in ("teacher", "distill_temperature", "distill_alpha")
    },
    "augment": (lambda c: c.task == "classify", "--task classify"),
    **{k: (lambda c: c.task == "dpo", "--task dpo") for k in ("dpo_beta", "dpo_reference")},
    "doc_stride": (lambda c: c.task == "qa", "--task qa (windows of a context too long for the model)"),
    **{
        k: (lambda c: c.task in _GENERATION_TASKS, "--task sft, qa or translate (scoring generated answers)")
        for k in ("eval_samples", "max_new_tokens")
    },
    **{k: (lambda c: c.task == "clm", "--task clm") for k in ("replay", "replay_fraction", "old_val", "schedule")},
}


FINETUNE_SECTIONS = ("train", "optim", "eval", "checkpoint", "log")  # the --SECTION.key settings finetune takes
# settings of those sections that only pretrain applies: fine-tuning refuses them rather than ignore them
PRETRAIN_ONLY = {
    "train.compile": "fine-tuning runs the model uncompiled",
    "train.compile_mode": "fine-tuning runs the model uncompiled",
    "train.activation_checkpointing": "fine-tuning keeps every activation",
    "train.rollback_after": "fine-tuning skips a non-finite step without rolling back",
    "checkpoint.sharded": "fine-tuning runs in one process and saves whole checkpoints",
    "eval.sample_tokens": "a fine-tune's evaluation prints --eval-samples answers of its --val file instead "
    "(sft, qa, translate)",
}
# where fine-tuning takes what pretrain's other sections set (`--data.dir x` was told "the model comes from BASE")
_OTHER_SECTIONS = {
    "model": "the model comes from BASE",
    "data": "the data comes from --train FILE (and --val FILE)",
    "objective": "--task says what it trains for",
    "dist": "fine-tuning runs in one process",
}


def finetune_sections(adapt: str, overrides: dict[str, Any] | None) -> tuple[Any, Any, Any, Any, Any]:
    """Train/optim/eval/checkpoint/log sections: fine-tuning defaults < dotted overrides (`--train.lr 1e-3`)."""
    from lmforge.config import (
        CheckpointConfig,
        EvalConfig,
        LogConfig,
        OptimConfig,
        TrainConfig,
        check_early_stopping,
        from_dict,
        merge,
    )

    defaults = {
        "train": {"max_steps": 200, "batch_size": 16, "lr": ADAPT_LR[adapt], "warmup_steps": 10, "log_every": 10},
        "optim": {"weight_decay": 0.0},  # decay would pull pretrained weights towards 0, not towards the base
        "eval": {"every": 50},
        "checkpoint": {"every": 0, "keep": 1},
        "log": {},  # trackers, off as in pretrain
    }
    merged = merge(defaults, overrides or {})
    extra = sorted(set(merged) - set(FINETUNE_SECTIONS))
    if extra:
        *others, last = (f"--{name}.*" for name in FINETUNE_SECTIONS)
        raise ConfigError(
            f"fine-tuning takes {', '.join(others)} and {last} settings, not --{extra[0]}.*; "
            + _OTHER_SECTIONS.get(extra[0], "drop it")
        )
    for section, values in (overrides or {}).items():
        for key in values if isinstance(values, dict) else ():
            if f"{section}.{key}" in PRETRAIN_ONLY:
                raise ConfigError(f"--{section}.{key} is pretrain's: {PRETRAIN_ONLY[f'{section}.{key}']}; drop it")
    where = "finetune settings"
    optim = from_dict(OptimConfig, merged["optim"], prefix="optim.", where=where)
    optim.refuse_unused(changed_fields(optim) | set((overrides or {}).get("optim") or {}))  # --optim.momentum, adamw
    train, eval_cfg = (from_dict(TrainConfig, merged["train"], prefix="train.", where=where),
                       from_dict(EvalConfig, merged["eval"], prefix="eval.", where=where))  # fmt: skip
    check_early_stopping(train, eval_cfg)
    train.refuse_unused(set((overrides or {}).get("train") or {}))  # --train.min_lr with a constant schedule, ...
    log = from_dict(LogConfig, merged["log"], prefix="log.", where=where)
    log.refuse_unused(set((overrides or {}).get("log") or {}))  # --log.wandb_project without --log.wandb
    return (
        train,
        optim,
        eval_cfg,
        from_dict(CheckpointConfig, merged["checkpoint"], prefix="checkpoint.", where=where),
        log,
    )
