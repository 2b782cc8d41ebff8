"""`lmforge finetune`: adapt a pretrained model to a task, through the one training loop.

    finetune(BASE, task, adapt, train/val files) ─► RUN_DIR/
        config.json          the base model's run config (the architecture)
        finetune.json        task, adapt mode, base (path + sha256), labels, fields, LoRA/prompt settings, and
                             this run's train/optim/eval/checkpoint settings (config.json's are the base's)
        status.json          running / finished / interrupted / failed, as for pretrain (`lmforge runs`)
        tokenizer.json       the base tokenizer; tokenizer_config.json with the chat template (chat tasks)
        metrics.jsonl, loss.png, eval.json (+ confusion.png for classification)
        checkpoints/step-N/  model.safetensors: the whole model (full mode, or `--merge`), else only the
                             trained tensors (LoRA adapters / soft prompt / head) — the base is named,
                             not copied

Design:
- BASE is an lmforge run or checkpoint, another fine-tuned run (LoRA adapters are merged into it
  first), or a local Hugging Face GPT-2/Llama/Qwen2/BERT/ELECTRA directory (imported into RUN_DIR/base/ first).
  BERT and ELECTRA bases (lmforge MLM/ELECTRA runs, HF BERT, HF ELECTRA discriminators) fine-tune for
  classification only (full/head/lora), with a head on the pooled [CLS] state (`adapt/heads.py`).
- Tasks differ only in how rows become batches (`data/formats.py`), which objective scores them
  (`objectives.CausalLM` on -100-masked targets for sft/translate/qa/clm, `adapt.objectives`
  for classify and dpo) and which metrics evaluate them (`finetune_eval.py` during training, `eval/tasks.py`
  at the end); the loop is `train/loop.py train()`, unchanged.
- Modes only set `requires_grad` (`adapt/heads.py set_trainable`), and the optimizer is built over
  the trainable tensors alone, so frozen weights keep their exact bits.
- A full-mode (or merged) run of an LM task is an ordinary lmforge run: `eval`, `generate`, `export`
  and `chat` load it like a pretrained one. `adapt/load.py load_finetuned` loads any run (adapters,
  prompts, heads), and the base, teacher and resumed weights of this command.
- Everything that can fail on user input (base, files, columns, labels) is checked before RUN_DIR
  is created; an error after an HF import removes the directory again.
- Re-running the same command on RUN_DIR resumes it (`finetune_resume.py existing_finetune`): checkpoints carry
  the optimizer, loader position and RNG as pretraining's do, so the result is bit-identical on CPU.
  A finished run's re-run has nothing to do; a `--merge`d LoRA run cannot train on (its adapters are in
  the weights and its last checkpoint has no optimizer state), so more steps are refused (`merged_refusal`).
- Length (~700 lines): `_finetune` reads top to bottom in the order a run happens (check and load, build
  examples, train, score). `FinetuneConfig` and its table of which flag applies to which task/mode are in
  finetune_config.py (torch-free, for the CLI's parser); the validation metrics and DPO reference log-probs in
  `finetune_eval.py`, the checks of a run to resume in `finetune_resume.py`. The task formats, objectives,
  heads and metrics live in their own modules; the next split would be the example building.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.adapt.load import Finetuned, build_adapted, load_base, load_resumed_weights, load_teacher
from lmforge.atomic import write_json
from lmforge.errors import CheckpointError, ConfigError, DataError, Interrupted
from lmforge.finetune_config import (  # noqa: F401 (ADAPT_LR, FINETUNE_SECTIONS, PRETRAIN_ONLY, check_applies: re-exported)
    _GENERATION_TASKS,
    ADAPT_LR,
    CHAT_TASKS,
    FINETUNE_SECTIONS,
    PRETRAIN_ONLY,
    FinetuneConfig,
    check_applies,
    finetune_sections,
)
from lmforge.finetune_resume import base_argument, existing_finetune, merged_refusal


@dataclass
class ContinuedSchedule:
    """lr(step) = the base pretraining run's `lr_at` at base step `start` + step (`--schedule continue`)."""

    start: int
    train: Any  # the base run's TrainConfig

    def __call__(self, step: int) -> float:
        from lmforge.train.schedule import lr_at

        t = self.train
        return lr_at(
            self.start + step,
            lr=t.lr,
            final_lr=t.final_lr,
            warmup_steps=t.warmup_steps,
            max_steps=t.max_steps,
            schedule=t.schedule,
            decay_fraction=t.decay_fraction,
        )


def _continued_schedule(loaded: Finetuned, base_path: str, base: str | Path) -> ContinuedSchedule:
    """The base's schedule, from the step its checkpoint was written at; BASE must be a pretraining run."""
    from lmforge.checkpoint import load_checkpoint

    step = int(load_checkpoint(base_path, verify=False).meta.get("train_state", {}).get("step", 0))
    if loaded.info is not None or step == 0 or loaded.model.__class__.__name__ != "GPT":
        raise ConfigError(
            f"--schedule continue needs BASE to be an lmforge pretraining run part-way through its schedule; "
            f"{base} is {'a fine-tuned run' if loaded.info is not None else f'at step {step}'}; use --schedule fresh"
        )
    schedule = ContinuedSchedule(start=step, train=loaded.config.train)
    if step >= loaded.config.train.max_steps:  # lr_at holds the final lr from there on: nothing left to follow
        raise ConfigError(
            f"--schedule continue needs BASE to be part-way through its schedule; {base} finished it (step {step} of "
            f"{loaded.config.train.max_steps}), where its lr stays at {schedule(0):g}; use --schedule fresh "
            "with --train.lr"
        )
    return schedule


def _check_family(family: str, cfg: FinetuneConfig, base: str | Path) -> None:
    """Encoders (BERT, ELECTRA's discriminator) classify; everything generative needs a decoder."""
    if family in ("bert", "electra") and (cfg.task != "classify" or cfg.adapt not in ("full", "head", "lora")):
        article = "an" if family == "electra" else "a"
        raise ConfigError(
            f"{base} is {article} {family.upper()} encoder: it fine-tunes with --task classify and --adapt full, "
            "head or lora "
            f"(not --task {cfg.task} --adapt {cfg.adapt}); use a GPT base for generation tasks"
        )


# ---------------------------------------------------------------------------------------------
# saving


class _TensorView(nn.Module):
    """Hands `save_model` a chosen set of tensors under their model names (adapter-only checkpoints)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {k: v.detach().contiguous() for k, v in self.tensors.items()}


def format_trainable(model: nn.Module) -> str:
    from lmforge.adapt.heads import trainable_summary

    trainable, total = trainable_summary(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"


# ---------------------------------------------------------------------------------------------
# the command


def finetune(
    base: str | Path,
    *,
    train_file: str | Path,
    out: str | Path,
    val_file: str | Path | None = None,
    cfg: FinetuneConfig | None = None,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    summary: bool = False,
) -> dict[str, Any]:
    """Fine-tune BASE on a task file into `out`; returns the final task metrics (also in out/eval.json).

    Args:
        base: lmforge run dir / checkpoint, a fine-tuned run, or a local HF model directory.
        train_file, val_file: JSONL/JSON/CSV/TSV/Parquet/TXT task data, read by `data/tables.py`; val is optional.
        out: the run directory to create.
        cfg: task, adapt mode and their settings.
        overrides: nested {"train": {...}, "optim": {...}, "eval": {...}, "checkpoint": {...}, "log": {...}}
            settings (`log`: the trackers, as pretrain's).
        overwrite: replace an existing `out`.
        progress: print the progress bar and log lines.
        summary: end with one line on stdout, also without `progress` (the CLI's): `wrote OUT (N steps, T s)`
            after training, or `OUT is already ...; nothing to do` for a finished run's re-run, which trains
            nothing and returns the same metrics (so a caller cannot tell the two apart from them).
    """
    from lmforge.data.formats import notes_held
    from lmforge.runs import release

    try:
        with notes_held():  # the data's notes (examples cut to fit) wait until the run's checks have passed
            result, nothing_to_do = _finetune(base, train_file, out, val_file, cfg, overrides, overwrite, progress)
    finally:
        release(Path(out))  # the folder's claim (taken in _finetune), however it ended
    if nothing_to_do and (progress or summary):
        print(nothing_to_do, flush=True)
    elif summary:
        steps = f"{result['steps']} step{'s' if result['steps'] != 1 else ''}"
        print(f"wrote {out} ({steps}, {result['train_seconds']:.1f} s)", flush=True)
    return result


def _same_file(a: str | Path | None, b: str | Path) -> bool:
    """`a` and `b` name one file (a link or another spelling of its path too; two pipes never)."""
    try:
        return a is not None and Path(a).samefile(b)
    except OSError:
        return False


def _finetune(
    base: str | Path,
    train_file: str | Path,
    out: str | Path,
    val_file: str | Path | None,
    cfg: FinetuneConfig | None,
    overrides: dict[str, Any] | None,
    overwrite: bool,
    progress: bool,
) -> tuple[dict[str, Any], str]:
    """(the final task metrics, and for a finished run's re-run, which trains nothing, the line saying so)."""
    from lmforge.adapt.heads import set_trainable, trainable_state
    from lmforge.checkpoint import prune_checkpoints, save_checkpoint
    from lmforge.config import CONFIG_VERSION
    from lmforge.config_sections import resumed_train
    from lmforge.data.formats import (
        ExampleLoader,
        augment_text,
        build_examples,
        class_labels,
        classify_batch,
        classify_frame,
        dpo_collate,
        label_name,
        lm_batch,
        notes_dropped,
        print_held_notes,
    )
    from lmforge.data.tables import field_map, read_rows_or_standard, read_task_rows
    from lmforge.dist_config import require_one_process
    from lmforge.estimate_device import check_batch_fits, check_fits
    from lmforge.fields import saved_train
    from lmforge.finetune_eval import reference_logprobs, val_metrics
    from lmforge.log import RunLogger, capture_env
    from lmforge.runs import claim, discard_aside, mark_running, mark_stopped, run_contents, set_aside
    from lmforge.trackers import check_packages
    from lmforge.train.loop import nothing_left, train
    from lmforge.train.optim import build_optimizer
    from lmforge.train.precision import keep_freed_memory, pick_device, pick_precision
    from lmforge.train.state import TrainState

    require_one_process("finetune")  # each rank would fine-tune alone into the same folder
    cfg = cfg or FinetuneConfig()
    if cfg.schedule == "continue":  # the base run's schedule sets every step's learning rate
        # (before finetune_sections: its checks judge these against fine-tuning's own schedule, which is not used;
        # min_lr is the setting behind the schedule's final_lr)
        train_given = (overrides or {}).get("train") or {}
        for key in ("lr", "min_lr", "warmup_steps", "schedule", "decay_fraction"):
            if key in train_given:
                raise ConfigError(
                    f"--train.{key} is not used with --schedule continue (the base run's schedule sets the "
                    "learning rate); drop it, or use --schedule fresh"
                )
    train_cfg, optim_cfg, eval_cfg, ckpt_cfg, log_cfg = finetune_sections(cfg.adapt, overrides)
    out = Path(out)
    from lmforge.runs import check_run_out

    # the base, teacher and task files are never in the folder that --overwrite deletes or training writes to
    check_run_out(
        out,
        [Path(base), *([Path(cfg.teacher)] if cfg.teacher else [])],
        overwrite=overwrite,
        read_files=[Path(f) for f in (train_file, val_file, cfg.replay, cfg.old_val) if f],
    )
    previous = None if overwrite else existing_finetune(out, base, cfg)
    fields = field_map(cfg.task, cfg.field)
    train_rows = read_task_rows(train_file, cfg.task, fields)
    # the rows, not the file's bytes or path: a resumed run must continue on the data it started on
    train_sha = hashlib.sha256(json.dumps(train_rows, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    # (answers scored; a --val file in the task's standard columns is read in those, as `eval --task` reads it)
    val_rows, val_fields = read_rows_or_standard(val_file, cfg.task, fields, scored=True) if val_file else ([], fields)
    if cfg.replay and cfg.task != "clm":
        raise ConfigError("--replay is for --task clm (continued pretraining)")
    device = pick_device(train_cfg.device, "--train.device")
    precision = pick_precision(device, train_cfg.dtype, train_cfg.attention)
    check_packages(log_cfg)  # --log.wandb without wandb: before the claim, and before --overwrite deletes anything
    keep_freed_memory(device)  # as pretrain: CPU steps reuse their buffers instead of page-faulting them in

    # no other process fine-tunes this folder (checked before --overwrite deletes it); a run that fails before
    # it writes its files leaves nothing behind (release, in `finetune`, removes a folder the claim made)
    claim(out)
    out.mkdir(parents=True, exist_ok=True)  # (claim made it, but for where there is no flock)
    if overwrite and run_contents(out):
        set_aside(out)  # the old run is deleted once this one starts (put back if it is refused before)
    teacher: nn.Module | None = None
    loaded, base_path, base_sha = load_base(base, out, device)
    tok, body = loaded.tokenizer, loaded.model
    _check_family(body.cfg.family, cfg, base)
    if cfg.adapt in ("full", "distill"):  # every weight trains: grads + state (any family)
        check_fits(body.cfg, optim_cfg, device)
    check_batch_fits(train_cfg.micro_batch, cfg.max_len or body.cfg.max_seq_len, device)
    frame = classify_frame(tok, body.cfg.family) if cfg.task == "classify" else None
    from lmforge.chat import ChatTemplate

    # chat tasks keep the base's template: an imported instruct model's own (chat.JinjaChatTemplate), else lmforge's
    template = (loaded.template or ChatTemplate()) if cfg.task in CHAT_TASKS else None
    if cfg.adapt == "distill":
        teacher = load_teacher(cfg.teacher, loaded, device, max_len=cfg.max_len)
    need = 9 if cfg.adapt == "prompt" else 8  # (a base this short was told to use "--prompt-tokens -7 or fewer")
    if body.cfg.max_seq_len < need:
        raise ConfigError(
            f"{base}'s context is {body.cfg.max_seq_len} token{'s' if body.cfg.max_seq_len != 1 else ''}; fine-tuning "
            f"needs at least 8 for the text{' and 1 for a soft prompt' if need == 9 else ''}; fine-tune a base "
            f"pretrained with --model.max_seq_len {need} or more"
        )
    context = body.cfg.max_seq_len - (cfg.prompt_tokens if cfg.adapt == "prompt" else 0)
    if context < 8:
        raise ConfigError(
            f"--prompt-tokens {cfg.prompt_tokens} leaves {context} of the model's {body.cfg.max_seq_len} context "
            f"tokens for the text (8 at least); use --prompt-tokens {body.cfg.max_seq_len - 8} or fewer"
        )
    if cfg.max_len > context:
        raise ConfigError(
            f"--max-len {cfg.max_len} is longer than the model's context ({context} tokens"
            f"{' after the soft prompt' if cfg.adapt == 'prompt' else ''}); use at most {context}, "
            "or 0 for all of it"
        )
    max_new_tokens = cfg.max_new_tokens
    if cfg.task in _GENERATION_TASKS:
        from lmforge.eval.tasks import answer_length

        # scored answers need room for their prompt: a --max-new-tokens given that leaves none is refused (also
        # without --val); the default fits itself to the context, with a note where there is something to score
        max_new_tokens = answer_length(cfg.max_new_tokens, context, note=bool(val_rows))
    max_len = cfg.max_len or context
    labels: list[str] = []
    if cfg.task == "classify":
        labels = class_labels((r[fields["label"]] for r in train_rows), train_file)
        if len(labels) < 2:
            raise DataError(f"{train_file} has only the label {labels[0]!r}; classification needs two or more")
        if len(labels) == len(train_rows) >= 20:  # no class seen twice: a text column read as the labels
            raise DataError(
                f"{train_file}: each of its {len(train_rows)} rows has a label of its own (e.g. {labels[0][:60]!r}), "
                f"so no class has two examples to learn from; is the label column '{fields['label']}' right? "
                "pick the column of class names with --field label=COLUMN"
            )
        rng = random.Random(train_cfg.seed)
        extra = [
            {**r, fields["text"]: augment_text(str(r[fields["text"]]), rng)}
            for _ in range(cfg.augment)
            for r in train_rows
        ]
        train_rows = train_rows + extra
    kwargs = {"task": cfg.task, "tok": tok, "fields": fields, "max_len": max_len, "labels": labels, "frame": frame}
    kwargs["template"], kwargs["context"] = template, context
    train_ex = build_examples(train_rows, path=train_file, **kwargs)
    # a --val that is the --train file: its rows' notes (examples cut to fit) were said once, for --train
    with notes_dropped() if _same_file(val_file, train_file) else contextlib.nullcontext():
        val_ex = build_examples(val_rows, path=val_file, **(kwargs | {"fields": val_fields})) if val_rows else []
    if val_rows and cfg.task in ("sft", "translate"):
        from lmforge.eval.tasks import fitting_prompts, prompt_lengths

        # the final scoring skips a prompt too long to answer (a note then); none fitting is refused now, not
        # after training
        scored = val_rows[: cfg.eval_samples]
        lengths = prompt_lengths(tok, template, scored, val_fields, cfg.task)
        fitting_prompts(lengths, context, max_new_tokens, val_file, note=False)
    if train_cfg.early_stop_patience and not val_ex:  # (it was ignored without a word: nothing is evaluated)
        raise ConfigError(
            f"train.early_stop_patience {train_cfg.early_stop_patience} watches the validation loss, and this "
            "fine-tune has no validation examples; pass --val FILE or drop --train.early_stop_patience"
        )
    if cfg.task == "clm" and cfg.replay:
        replay_rows = read_task_rows(cfg.replay, "clm", fields)
        replay_ex = build_examples(replay_rows, path=cfg.replay, **kwargs)
        k = min(len(replay_ex), max(1, round(cfg.replay_fraction * len(train_ex))))  # a fraction > 0 replays
        train_ex += random.Random(train_cfg.seed).sample(replay_ex, k)
    old_val_ex = []
    if cfg.old_val:
        old_val_ex = build_examples(read_task_rows(cfg.old_val, cfg.task, fields), path=cfg.old_val, **kwargs)
    lr_schedule = _continued_schedule(loaded, base_path, base) if cfg.schedule == "continue" else None
    min_lr_kept = ""
    if previous is not None:
        if previous.get("base_sha256") and previous["base_sha256"] != base_sha:
            raise CheckpointError(f"the base {base_path} changed since {out} started; restore it or pass --overwrite")
        if previous.get("train_sha256", train_sha) != train_sha:
            raise DataError(
                f"{train_file} is not the data {out} was trained on so far (its loader position would point "
                "into other rows); resume with the same --train file, or pass --overwrite to start again"
            )
        if previous.get("seed", train_cfg.seed) != train_cfg.seed:  # the loader's order comes from the seed
            raise ConfigError(
                f"{out} was trained with --train.seed {previous['seed']}, not {train_cfg.seed} (its data position "
                f"would point into another shuffle); resume with --train.seed {previous['seed']}, or pass --overwrite"
            )
        old_optim = (previous.get("optim") or {}).get("name")
        if old_optim and old_optim != optim_cfg.name:  # (as pretrain refuses it)
            raise ConfigError(
                f"{out} was trained with --optim.name {old_optim}, whose state cannot continue as {optim_cfg.name}; "
                f"resume with --optim.name {old_optim}, or use another --out or --overwrite to start over"
            )
        if [label_name(name) for name in previous.get("labels", [])] != labels:  # (saved before: "1.0" is "1")
            raise DataError(
                f"{train_file} has the labels {', '.join(labels)}, the run in {out} "
                f"{', '.join(previous.get('labels', []))}; use the same file or pass --overwrite"
            )
        # a run saved when min_lr 0 meant lr / 10 keeps that schedule (config.py)
        train_cfg, min_lr_kept = resumed_train(previous.get("train"), previous.get("config_version"), train_cfg)

    torch.manual_seed(train_cfg.seed)
    info: dict[str, Any] = {
        "format_version": 1,
        "config_version": CONFIG_VERSION,  # of the train section below (config.py)
        "task": cfg.task,
        "adapt": cfg.adapt,
        "base": base_path,
        "base_sha256": base_sha,
        "base_arg": base_argument(base),
        "labels": labels,
        # a decoder's classification head: bias-free as HF's `score` (a run continued from before keeps its bias)
        "head_bias": bool(previous.get("head_bias", True)) if previous is not None else False,
        "fields": fields,
        "train_sha256": train_sha,
        # the validation file its evaluations (metrics.jsonl val_*) scored: `quantize` compares on it
        "val_file": str(Path(val_file).resolve()) if val_file else None,
        "max_len": max_len,
        "lora": {
            "rank": cfg.lora_rank,
            "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout,
            "targets": cfg.lora_targets,
        },
        "prompt_tokens": cfg.prompt_tokens,
        "dpo_beta": cfg.dpo_beta,
        "seed": train_cfg.seed,
        "saved": "model" if cfg.adapt == "distill" else "adapter",
        "lora_merged": False,
        "finetune_config": dataclasses.asdict(cfg),
        # this run's own settings, as config.json holds a pretraining run's (there they are the base's):
        # `lmforge runs` and `report` read them; rewritten on each re-run, so they are the latest
        "train": dataclasses.asdict(train_cfg),
        "optim": dataclasses.asdict(optim_cfg),
        "eval": dataclasses.asdict(eval_cfg),
        "checkpoint": dataclasses.asdict(ckpt_cfg),
    }
    pad_id = frame[2] if frame else tok.eos_id
    reference: nn.Module | None = None  # the frozen reference = the base before any update
    if cfg.task == "dpo" and cfg.dpo_reference == "live":
        import copy

        reference = copy.deepcopy(body).eval().requires_grad_(False)
    elif cfg.task == "dpo":
        reference_logprobs(body, train_ex + val_ex, pad_id, device)
    model = build_adapted(body, info, device)
    set_trainable(model, "full" if cfg.adapt == "distill" else cfg.adapt)
    for p in model.parameters():  # frozen weights carry no autograd state at all
        if not p.requires_grad:
            p.grad = None

    if cfg.task == "classify":
        collate = lambda b: classify_batch(b, pad_id)  # noqa: E731
        from lmforge.adapt.objectives import Classification

        objective: Any = Classification()
    elif cfg.task == "dpo":
        collate = dpo_collate(pad_id)
        from lmforge.adapt.objectives import DPO

        objective = DPO(cfg.dpo_beta, reference=reference)
    else:
        collate = lambda b: lm_batch(b, pad_id)  # noqa: E731
        from lmforge.objectives import CausalLM

        objective = CausalLM()
        if teacher is not None:
            from lmforge.compress.distill import Distill

            info["teacher"] = base_argument(cfg.teacher)
            objective = Distill(teacher, temperature=cfg.distill_temperature, alpha=cfg.distill_alpha)
    train_items, train_collate = train_ex, collate
    if cfg.pack:
        from lmforge.adapt.objectives import PackedCausalLM
        from lmforge.data.formats import pack_examples, packed_batch

        train_items = pack_examples(train_ex, max_len)
        train_collate = lambda rows: packed_batch(rows, pad_id)  # noqa: E731
        objective = PackedCausalLM()
    loader = ExampleLoader(train_items, batch_size=train_cfg.micro_batch, seed=train_cfg.seed, collate=train_collate)
    eval_bs = eval_cfg.forward_batch(train_cfg)
    evaluated = val_ex[: eval_cfg.sequences(train_cfg)] if eval_cfg.max_batches else val_ex
    val_batches = [collate(evaluated[i : i + eval_bs]) for i in range(0, len(evaluated), eval_bs)]
    old_batches = [collate(old_val_ex[i : i + eval_bs]) for i in range(0, len(old_val_ex), eval_bs)]
    token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.int64)

    def evaluate_on(batches: list[Any]) -> dict[str, float]:
        metrics = val_metrics(
            model,
            cfg.task,
            batches,
            beta=cfg.dpo_beta,
            token_bytes=token_bytes,
            precision=precision,
            reference=reference,
        )
        if teacher is not None and batches:  # distillation: how far the student is from the teacher
            from lmforge.compress.distill import kl_to_teacher

            metrics["kl_to_teacher"] = kl_to_teacher(model, teacher, batches, device)
        return metrics

    # resume: the latest checkpoint's weights, optimizer, loader position, train state and RNG (exact on CPU)
    from lmforge.checkpoint import checkpoint_to_resume, latest_checkpoint, read_json
    from lmforge.log import truncate_metrics
    from lmforge.train.state import set_rng_state

    ckpt = None
    if previous is not None and latest_checkpoint(out) is not None:
        ckpt = checkpoint_to_resume(out, ckpt_cfg.resume_from, log=print if progress else len)
    state = TrainState.from_dict(ckpt.meta["train_state"]) if ckpt is not None else TrainState()
    # A re-run of a finished run trains nothing, so it leaves every file as it was: config.json, env.json,
    # finetune.json (whose train settings `lmforge runs` shows: 10/6 after a re-run with max_steps 6), eval.json
    # (scored again with the new command's --eval-samples) and status.json. Without eval.json the run stopped in
    # its final evaluation, which the re-run below completes.
    done = nothing_left(state, train_cfg) if ckpt is not None else ""
    if done and (out / "eval.json").is_file():
        from lmforge.train.run import readable_config

        if not readable_config(out / "config.json"):  # (pretrain sends a run whose config.json broke here)
            write_json(out / "config.json", ckpt.meta["config"])
        return read_json(out / "eval.json", "re-run with --overwrite to fine-tune again"), (
            f"{out} is already {done}; nothing to do"
        )
    if ckpt is not None and ckpt.meta.get("finetune", {}).get("lora_merged"):
        # --merge folded the adapters into the weights: there are no adapters left to train, and the
        # checkpoint holds no optimizer state. A finished run's identical re-run returned above.
        raise ConfigError(merged_refusal(out, state.step, train_cfg.max_steps, done, cfg.task))
    print_held_notes()  # (the checks above refuse in one line; the data's notes come once the run goes on)
    if ckpt is not None:
        load_resumed_weights(model, ckpt, info["saved"] if cfg.adapt not in ("full", "distill") else "model")

    # the run directory: architecture config, tokenizer, chat template, finetune.json
    base_config = dataclasses.replace(loaded.config, out=str(out))
    discard_aside(out)  # (--overwrite: the old run goes only now that this one starts)
    write_json(out / "env.json", capture_env(str(device)))  # first, as pretrain: then `runs` and `report --watch`
    write_json(out / "config.json", base_config.to_dict())  # see a run being trained from its first config.json
    tok.save(out / "tokenizer.json")
    if cfg.task in CHAT_TASKS:
        from lmforge.chat import save_tokenizer_config

        save_tokenizer_config(out, tok, template)
    write_json(out / "finetune.json", info)

    resumed_extra: dict[str, Any] = ckpt.meta.get("finetune_extra", {}) if ckpt is not None else {}
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        truncate_metrics(metrics_path, state.step)
    elif metrics_path.exists():
        metrics_path.unlink()

    from lmforge.trackers import open_trackers

    log = RunLogger(
        metrics_path,
        max_steps=train_cfg.max_steps,
        start_step=state.step,
        console=progress,
        plot_path=out / "loss.png",
        trackers=open_trackers(log_cfg, out, config=info, start_step=state.step),
    )
    if ckpt is not None:
        log.info(
            f"{out} is already {done}; running its final evaluation"
            if done
            else f"resuming {out} from step {state.step}"
        )
    log.info(
        f"lmforge finetune: task {cfg.task}, adapt {cfg.adapt}, {len(train_ex):,} train / {len(val_ex):,} val examples"
        + (f" (packed into {len(train_items):,} rows)" if cfg.pack else "")
        + (f", labels {', '.join(labels)}" if labels else "")
    )
    log.info(format_trainable(model))
    if ckpt is not None and lr_schedule is None and not done:  # a changed --train.lr, max_steps, ...
        from lmforge.train.schedule import schedule_change

        saved = ckpt.meta.get("finetune", {})
        old_train = saved_train(saved.get("train"), saved.get("config_version"))
        for note in (min_lr_kept, schedule_change(old_train, train_cfg, state.step)):
            if note:
                log.info(note)
    if lr_schedule is not None:
        log.info(
            f"learning rate: the base run's schedule from its step {lr_schedule.start} "
            f"({lr_schedule(0):.3g} at the first step)"
        )
    forgetting: dict[str, Any] = {}
    if "forgetting_before" in resumed_extra:  # measured on the base when the run started
        forgetting["before"] = resumed_extra["forgetting_before"]
    elif cfg.task == "clm" and (val_batches or old_batches):
        forgetting["before"] = {
            "new_val_loss": evaluate_on(val_batches)["loss"] if val_batches else None,
            "old_val_loss": evaluate_on(old_batches)["loss"] if old_batches else None,
        }
    from lmforge.compress.distill import kl_to_teacher

    distill: dict[str, float] = {}
    if "kl_before" in resumed_extra:
        distill["kl_before"] = resumed_extra["kl_before"]
    elif teacher is not None and val_batches:
        distill["kl_before"] = kl_to_teacher(model, teacher, val_batches, device)
    extra_state = {"forgetting_before": forgetting.get("before"), "kl_before": distill.get("kl_before")}
    extra_state = {k: v for k, v in extra_state.items() if v is not None}

    optimizer = build_optimizer(model, optim_cfg, lr=train_cfg.lr, device=device)
    if ckpt is not None:
        optim_changes = ckpt.load_optimizer(optimizer)
        if optim_changes:  # (as pretrain says it)
            log.info(
                f"note: optimizer settings changed since the checkpoint, applied from now: {', '.join(optim_changes)}"
            )
        loader.load_state_dict(ckpt.meta["loader"])
        set_rng_state(ckpt.meta["rng"])  # last: nothing after this may draw random numbers before training
    tokenizer_json = tok.to_str()

    def save(st: TrainState) -> Path:
        saved_model: nn.Module = model
        if info["saved"] == "adapter":
            saved_model = _TensorView(trainable_state(model))
        path = save_checkpoint(
            out,
            step=st.step,
            model=saved_model,
            optimizer=None if info["lora_merged"] else optimizer,  # merged weights no longer fit the optimizer
            state={
                "train_state": st.to_dict(),
                "config": base_config.to_dict(),
                "finetune": info,
                "loader": loader.state_dict(),
                "finetune_extra": extra_state,
            },
            tokenizer_json=tokenizer_json,
        )
        prune_checkpoints(out, keep=ckpt_cfg.keep, best_step=st.best_step if ckpt_cfg.keep_best else None)
        return path

    if cfg.adapt in ("full", "distill"):
        info["saved"] = "model"
        write_json(out / "finetune.json", info)
    mark_running(out)  # status.json, as pretrain keeps it: `lmforge runs` shows running / finished / ...
    try:
        try:
            if not done:  # (a finished run whose final evaluation did not complete: only that is left)
                state = train(
                    model,
                    optimizer,
                    loader,
                    cfg=train_cfg,
                    optim_cfg=optim_cfg,
                    eval_cfg=eval_cfg,
                    ckpt_cfg=ckpt_cfg,
                    precision=precision,
                    state=state,
                    log=log,
                    save=save,
                    evaluate=(lambda: evaluate_on(val_batches)) if val_batches else None,
                    objective=objective,
                    lr_schedule=lr_schedule,
                )
        except BaseException:
            log.close(failing=True)
            raise
        log.close()
        if state.stop_reason == "interrupted":
            raise Interrupted(f"interrupted at step {state.step}; the last checkpoint is in {out}/checkpoints")

        if cfg.merge and cfg.adapt == "lora":
            from lmforge.adapt.lora import merge_lora

            merge_lora(model)
            info.update(saved="model", lora_merged=True)
            write_json(out / "finetune.json", info)
            save(state)
            prune_checkpoints(out, keep=1, best_step=None)  # earlier adapter-only checkpoints no longer fit
        if forgetting:
            forgetting["after"] = {
                "new_val_loss": evaluate_on(val_batches)["loss"] if val_batches else None,
                "old_val_loss": evaluate_on(old_batches)["loss"] if old_batches else None,
            }

        from lmforge.adapt.heads import trainable_summary
        from lmforge.eval.tasks import task_metrics

        trainable, total = trainable_summary(model)
        result: dict[str, Any] = {
            "task": cfg.task,
            "adapt": cfg.adapt,
            "steps": state.step,
            # the training time of every session (TrainState.elapsed_s, saved in each checkpoint), not
            # this process's wall-clock: a resumed run would count only its last part, and re-running a
            # finished run (nothing left to train) would overwrite the real time with ~0
            "train_seconds": state.elapsed_s,
            "trainable_params": trainable,
            "total_params": total,
        }
        if distill:
            distill["kl_after"] = kl_to_teacher(model, teacher, val_batches, device)
            result["distill"] = distill
            log.info(f"val KL(teacher || student) per token: {distill['kl_before']:.4f} -> {distill['kl_after']:.4f}")
        if forgetting:
            result["forgetting"] = forgetting
            log.info(
                "loss before -> after: "
                + ", ".join(
                    f"{k.removesuffix('_loss')} {forgetting['before'][k]:.4f} -> {forgetting['after'][k]:.4f}"
                    for k in ("new_val_loss", "old_val_loss")
                    if forgetting["before"][k] is not None
                )
            )
        if val_rows:
            ft = Finetuned(model.eval(), tok, loaded.config, info, None, out)
            ft.template = template
            with notes_dropped():  # (its examples' notes were printed when they were built, before training)
                metrics = task_metrics(
                    ft,
                    val_rows[: cfg.eval_samples] if cfg.task in ("sft", "qa", "translate") else val_rows,
                    path=val_file,
                    fields=val_fields,
                    max_new_tokens=max_new_tokens,
                    out_dir=out,
                    doc_stride=cfg.doc_stride,
                )
            result["val"] = metrics
            if progress:
                from lmforge.eval.tasks import format_metrics
                from lmforge.log import say

                say(format_metrics(metrics))  # (a reader gone, `| head`, no longer loses eval.json)
        write_json(out / "eval.json", result)
    except BaseException as e:
        # Ctrl-C: the loop stops at a step boundary and Interrupted is raised above; a KeyboardInterrupt
        # outside the loop (the final evaluation) is one too. Anything else failed the run.
        stopped = isinstance(e, (Interrupted, KeyboardInterrupt))
        error = "" if isinstance(e, Interrupted) else f"{type(e).__name__}: {e}"[:500]
        mark_stopped(out, "interrupted" if stopped else "failed", stop_reason=state.stop_reason, error=error)
        raise
    mark_stopped(out, "finished", stop_reason=state.stop_reason)  # after eval.json: the run is complete
    return result, ""
