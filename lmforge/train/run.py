"""`pretrain(cfg)`: set up a run directory, build or resume everything, and call the loop.

Kept apart from `loop.py` so the loop stays a loop: this file owns the run directory rules.

- A new run directory gets `config.json` (resolved config), `env.json`, `tokenizer.json`.
- Re-running the same command on an existing run resumes from its latest complete checkpoint,
  bit-identically on CPU: weights, optimizer, torch RNG, data-loader position, train state, and
  `metrics.jsonl` truncated back to the checkpoint's step.
- A different model config or a different tokenizer on an existing run is a one-line error unless
  `overwrite=True` (which starts the run over).

`--init-from`'s checks live in `train/init_from.py`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from lmforge import dist
from lmforge.atomic import write_json
from lmforge.checkpoint import (
    Checkpoint,
    checkpoint_to_resume,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_aside_later,
    step_dir,
)
from lmforge.config import RunConfig
from lmforge.config_sections import resumed_train
from lmforge.data.datadir import load_data_dir
from lmforge.data.loader import IdCheckedLoader, eval_batches
from lmforge.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    LmforgeError,
    TrainingDiverged,
    hold_interrupts,
    interrupt_held,
    release_interrupts,
    take_held_interrupt,
)
from lmforge.estimate_device import check_batch_fits, check_fits, measure_matmul_flops
from lmforge.eval.lm import evaluate_lm, split_byte_table
from lmforge.fields import saved_train, spelled
from lmforge.log import RunLogger, capture_env, truncate_metrics
from lmforge.models import build_model
from lmforge.objective_config import loss_definition, loss_definition_note
from lmforge.runs import (
    claim,
    discard_aside,
    has_run_markers,
    mark_running,
    mark_stopped,
    release,
    run_contents,
    run_status,
    set_aside,
)
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.trackers import check_packages, open_trackers
from lmforge.train.init_from import init_start, load_init_weights, with_new_defaults
from lmforge.train.loop import nothing_left, train
from lmforge.train.objective_setup import setup_objective
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import cpp_compiler_problem, keep_freed_memory, pick_precision
from lmforge.train.schedule import min_lr_note, schedule_change, warmup_note
from lmforge.train.state import TrainState, set_rng_state


def resolve_run_config(cfg: RunConfig, tokenizer: Tokenizer) -> RunConfig:
    """Fill in what comes from the data (vocab size) and check the model fits the tokenizer."""
    if not cfg.out:
        raise ConfigError("no run directory given; pass --out RUN_DIR")
    from lmforge.train.objective_setup import check_objective, encoder_extra_vocab

    check_objective(cfg.objective.name, cfg.model.family)
    # encoders append [PAD]/[CLS]/[SEP]/[MASK] ids the tokenizer lacks (data/masking.py)
    extra = encoder_extra_vocab(cfg.model.family, tokenizer)
    needed = tokenizer.vocab_size + extra
    vocab = cfg.model.vocab_size or needed
    if vocab < needed:  # an encoder's appended ids failed at the first batch as "a shard is damaged"
        what = f" plus the {extra} special tokens an encoder appends to it" if extra else ""
        raise ConfigError(
            f"model.vocab_size {vocab} is smaller than the tokenizer's {tokenizer.vocab_size}{what}; "
            f"drop --model.vocab_size or set it to at least {needed}"
        )
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    if seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len {seq_len} exceeds model.max_seq_len {cfg.model.max_seq_len}; lower it")
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, vocab_size=vocab),
        data=dataclasses.replace(cfg.data, dir=str(Path(cfg.data.dir).resolve()), seq_len=seq_len),
        out=str(Path(cfg.out)),
    )


def _describe_model_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    changes = [f"{k} {spelled(old.get(k))} -> {spelled(new.get(k))}" for k in new if old.get(k) != new.get(k)]
    return ", ".join(changes[:3])


def _not_a_pretraining_run(run_dir: Path, config: dict[str, Any]) -> str:
    """What else an lmforge output with a config.json is (its resume failed later with a puzzling error: a
    data-loader mismatch, missing weight names, a model config of Nones); "" for a pretraining run."""
    if (run_dir / "quantize.json").is_file():  # (a quantized fine-tune holds a copy of its finetune.json)
        return "a quantized copy, which 'lmforge pretrain' does not resume: train the original run, then quantize it"
    if (run_dir / "finetune.json").is_file():
        return "a fine-tuned run, which 'lmforge pretrain' does not resume: re-run its 'lmforge finetune' command"
    if "model" not in config and ("model_type" in config or "architectures" in config):
        return "a Hugging Face model, not an lmforge run: 'lmforge import' it to use it"
    return ""


def readable_config(path: Path) -> bool:
    """Whether a run's config.json parses to a dict (a nothing-to-do re-run of pretrain or finetune restores
    a broken one from the checkpoint)."""
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def prepare_run_dir(run_dir: Path, cfg: RunConfig, tokenizer: Tokenizer, *, overwrite: bool) -> bool:
    """Create or check the run directory; returns True when an existing run should be resumed.

    The caller has `claim`ed it: no other process trains it (and --overwrite cannot delete a live run)."""
    occupied = bool(run_contents(run_dir))
    if occupied and overwrite:  # kept aside until the new run starts: a refusal during setup puts it back
        set_aside(run_dir)
    elif occupied:
        config_path = run_dir / "config.json"
        old: Any = None
        problem = "is missing"
        if config_path.is_file():
            try:
                old = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                problem = "is damaged"
            if old is not None and not isinstance(old, dict):
                old, problem = None, "is damaged"
        if old is None:
            # Without config.json, --overwrite would delete every checkpoint: never suggest it while there are
            # any. Each checkpoint's state.json holds the run's config (checkpoint.py), so the latest one can
            # stand in (config.json is rewritten below), and the checks that follow still guard the resume.
            from lmforge.checkpoint import STEP_DIR, checkpoints_dir

            ckpts = checkpoints_dir(run_dir)
            has_ckpts = ckpts.is_dir() and any(STEP_DIR.match(p.name) for p in ckpts.iterdir())
            if not has_ckpts:
                if problem == "is damaged":
                    raise ConfigError(f"{config_path} is damaged; pass --overwrite to start the run over")
                if not has_run_markers(run_dir):  # --overwrite would refuse it
                    raise ConfigError(
                        f"{run_dir} exists and is not an lmforge run (no config.json); choose another --out"
                    )
                raise ConfigError(
                    f"{run_dir} exists and is not an lmforge run (no config.json); choose another --out or pass "
                    "--overwrite"
                )
            if (run_dir / "finetune.json").is_file():
                raise ConfigError(
                    f"{config_path} {problem}, and {run_dir} is a fine-tuned run: re-run its 'lmforge finetune' "
                    "command to continue it (that rewrites config.json), or choose another --out"
                )
            latest = latest_checkpoint(run_dir)
            try:
                meta = json.loads((latest / "state.json").read_text(encoding="utf-8")) if latest else None
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                meta = None
            saved = meta.get("config") if isinstance(meta, dict) else None
            if not isinstance(saved, dict):
                raise ConfigError(
                    f"{config_path} {problem} and no checkpoint in {ckpts} holds a readable config (state.json); "
                    "the checkpoints are left as they are: choose another --out"
                )
            import sys

            print(
                f"lmforge: {config_path} {problem}; continuing with the config saved in {latest / 'state.json'}",
                file=sys.stderr,
            )
            old = saved
        other = _not_a_pretraining_run(run_dir, old)
        if other:
            raise ConfigError(f"{run_dir} holds {other}, or choose another --out")
        old_optim, new_optim = old.get("optim", {}).get("name"), cfg.optim.name
        if old_optim and old_optim != new_optim:
            raise ConfigError(
                f"{run_dir} was trained with --optim.name {old_optim}, whose state cannot continue as {new_optim}; "
                f"resume with --optim.name {old_optim}, or use another --out or --overwrite to start over"
            )
        # another objective or curriculum reads the data another way: the loader's resume check blamed an unchanged
        # seed, or the data ("saved with windows_per_epoch=None"), and a changed curriculum_start went unnoticed
        data_order = [("objective", "name", "--objective"), ("objective", "carry_state", "--objective.carry_state")]
        data_order.append(("data", "curriculum", "--data.curriculum"))
        if bool((old.get("data") or {}).get("mix")) != bool(cfg.data.mix):  # (changed weights: the mixture loader says)
            data_order.append(("data", "mix", "--data.mix"))  # dropped, it failed as "saved with seq_len=None"
        if cfg.data.curriculum != "none":  # (without a curriculum its settings are never read)
            data_order += [("data", key, f"--data.{key}") for key in ("curriculum_steps", "curriculum_start")]
        new_dict = cfg.to_dict()
        for section, key, flag in data_order:
            was, now = (old.get(section) or {}).get(key, new_dict[section][key]), new_dict[section][key]
            if was != now:
                was, now = (str(v).lower() if isinstance(v, bool) else v for v in (was, now))
                if not was:  # (a mixture added to a run without one)
                    raise ConfigError(
                        f"{run_dir} was trained without {flag}; resume without it, or use another --out or --overwrite "
                        "to start over"
                    )
                raise ConfigError(
                    f"{run_dir} was trained with {flag} {was}, not {now or 'none'}; resume with {flag} {was}, "
                    "or use another --out or --overwrite to start over"
                )
        # before the model: another tokenizer's vocabulary was refused as "a different model config (vocab_size ...)"
        tok_path = run_dir / "tokenizer.json"
        if tok_path.is_file() and Tokenizer.load(tok_path).fingerprint != tokenizer.fingerprint:
            raise DataError(
                f"the data in {cfg.data.dir} was prepared with another tokenizer than the run in {run_dir}; "
                f"prepare it with --tokenizer {tok_path} or use another --out"
            )
        new_model = new_dict["model"]
        old_model = with_new_defaults(old.get("model"), cfg.model)
        if old_model != new_model:
            change = _describe_model_change(old_model, new_model)
            raise ConfigError(
                f"{run_dir} holds a run with a different model config ({change}); "
                "use another --out, or --overwrite to start over"
            )
        return latest_checkpoint(run_dir) is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


MAX_ROLLBACKS = 3  # more rollbacks than this in one run: it diverges whatever data it sees


def _rank_batch(cfg: RunConfig, world_size: int) -> Any:
    """This rank's train config: its share of the global batch, and its micro-batch."""
    micro = cfg.train.micro_batch_per_rank(world_size)  # (a batch that does not split is a ConfigError there)
    return dataclasses.replace(cfg.train, batch_size=cfg.train.batch_size // world_size, micro_batch_size=micro)


def _schedule_change(saved: Any, cfg: RunConfig, step: int) -> str:
    """A note when a resume changes the learning-rate schedule (see `schedule.schedule_change`)."""
    old = saved_train(saved.get("train"), saved.get("config_version")) if isinstance(saved, dict) else None
    return schedule_change(old, cfg.train, step)


def _changed_since(saved: Any, cfg: RunConfig, keys: list[tuple[str, str]]) -> list[str]:
    """'section.key OLD -> NEW' for each of `keys` ((section, key) pairs) that the checkpoint's config `saved` holds
    with another value than `cfg`; a section or key it does not hold is no change."""
    now = cfg.to_dict()
    changes = []
    for section, key in keys:
        old = saved.get(section) if isinstance(saved, dict) else None
        if isinstance(old, dict) and key in old and old[key] != now[section][key]:
            changes.append(f"{section}.{key} {spelled(old[key])} -> {spelled(now[section][key])}")
    return changes


def _objective_change(saved: Any, cfg: RunConfig, step: int) -> str:
    """A note when a resume changes how the objective masks or weighs (objective.mask_prob, whole_word,
    rtd_weight, ...): they apply from now, silently before, and they change the validation masks and loss
    too, so the val numbers (and the best checkpoint they pick) before and after are not comparable.
    The objective's name and carry_state are refused earlier (`prepare_run_dir`); "" when nothing changed."""
    keys = [("objective", f.name) for f in dataclasses.fields(cfg.objective) if f.name not in ("name", "carry_state")]
    changes = _changed_since(saved, cfg, keys)
    if not changes:
        return ""
    return (
        f"note: objective settings changed since the checkpoint, applied from step {step + 1}: {', '.join(changes)}; "
        "validation numbers before and after it are not comparable"
    )


# Settings a resume may change that change every update from then on, and were taken without a word (the schedule,
# the optimizer's group settings and the objective's have their own notes; the rest of what changes the data order or
# the model is refused in `prepare_run_dir` and by the loader). micro_batch_size only splits the same batch.
TRAINING_KEYS = [("train", "batch_size"), ("train", "dtype"), ("optim", "grad_clip"), ("optim", "l1")]


def _training_change(saved: Any, cfg: RunConfig, step: int) -> str:
    """A note when a resume changes one of `TRAINING_KEYS`; "" when none changed."""
    changes = _changed_since(saved, cfg, TRAINING_KEYS)
    if not changes:
        return ""
    return (
        f"note: training settings changed since the checkpoint, applied from step {step + 1}: {', '.join(changes)}; "
        "the run goes on from there as configured, no longer as the original command would have trained it"
    )


def _on_main(world: dist.DistInfo, fn: Any) -> Any:
    """Run `fn` on rank 0 only and give every rank its result (or its one-line error, which every rank then raises
    alike: rank 0 alone prints it, `cli._quiet_rank`)."""
    outcome: tuple[str, Any] = ("ok", None)
    if world.is_main:
        try:
            outcome = ("ok", fn())
        except LmforgeError as e:
            if not world.enabled:
                raise
            outcome = ("error", e)
    outcome = dist.broadcast_object(outcome)
    if outcome[0] == "error":
        outcome[1].every_rank = True
        raise outcome[1]
    return outcome[1]


def _stop_if_signalled(world: dist.DistInfo, device: torch.device) -> None:
    """A stop signal held in set-up (`errors.hold_interrupts`, from the ranks' join on) stops the run here, every
    rank together: each says whether it holds one (a collective, so a dead peer fails it, as before) and all stop
    if one does. It waited for the end of the first step, so a long set-up (a big checkpoint's load) ran past
    torchrun's 30 s between its signal and its SIGKILL: killed without a line. One process holds none here."""
    if not world.enabled:
        return
    if not dist.all_reduce([float(interrupt_held())], device, op="max")[0]:
        return
    take_held_interrupt()
    raise Interrupted(
        "stopped by a signal while the ranks set up, before any step: nothing was trained; re-run the same "
        "command to go on"
    )


def _checkpoint_to_resume(run_dir: Path, which: str, world: dist.DistInfo, device: torch.device) -> Checkpoint:
    """`checkpoint_to_resume` on every rank. Each rank checks the whole checkpoint's files (their sizes and
    sha256), so a damaged one fails every rank alike: then rank 0 alone prints the line (each rank did), with
    the same exit status. A rank that failed alone (its node's copy) still prints its own."""
    try:
        ckpt, error = checkpoint_to_resume(run_dir, which, log=print if world.is_main else len), None
    except CheckpointError as e:
        ckpt, error = None, e
    if world.enabled:
        failed = dist.all_reduce([float(error is not None)], device)[0]
        if error is not None and failed == world.world_size:
            error.every_rank = True
    if error is not None:
        raise error
    return ckpt


def _mfu_flops_per_token(model: Any, cfg: RunConfig) -> float:
    """Training FLOPs per token for MFU: an encoder's MLM head runs on the masked share of tokens only."""
    if cfg.model.family in ("bert", "electra"):
        return model.flops_per_token(cfg.data.seq_len, predicted=cfg.objective.mask_prob)
    return model.flops_per_token(cfg.data.seq_len)


def pretrain(cfg: RunConfig, *, overwrite: bool = False, progress: bool = True) -> TrainState:
    """Train a causal LM on a prepared data directory into `cfg.out` (resuming if it exists).

    Args:
        cfg: the resolved run config (`config.load_config`); `cfg.data.dir` and `cfg.out` required.
        overwrite: delete an existing run directory first instead of resuming it.
        progress: show the progress bar and log lines.

    Returns:
        The final train state. Raises `Interrupted` after saving when stopped by SIGINT/SIGTERM.
    """
    try:
        state = _pretrain(cfg, overwrite=overwrite, progress=progress)
        if interrupt_held():  # held as the run ended (errors.hold_interrupts): it is trained, saved and recorded
            latest = latest_checkpoint(Path(cfg.out))
            raise Interrupted(
                f"stopped by a signal as the run ended: it trained to step {state.step} "
                f"({state.stop_reason or 'done'}) and saved {latest}; nothing is lost"
            )
        return state
    except Exception as e:  # a peer died or hung in set-up (claim, config check, DDP's first broadcast, resume)
        world = dist.env_info()
        if world.enabled and dist.is_comm_failure(e):  # (the training loop's own failures say so in _pretrain)
            raise dist.CommFailure(dist.describe_comm_failure(e, world, cfg.dist.timeout_s)) from None
        raise
    finally:
        # however the run ended, its group is destroyed now, after _pretrain's objects (dist.shutdown): a gloo group
        # left to the interpreter's exit aborted the process ("terminate called without an active exception", exit
        # 134) or hung it
        dist.shutdown(sys.exc_info()[1])
        release_interrupts()
        if cfg.out:
            release(Path(cfg.out))  # the run folder's claim (held from before it changed until now)


def _refuse_for_world(cfg: RunConfig, world: dist.DistInfo) -> None:
    """Settings that do not work together with several processes (ConfigError)."""
    if world.enabled and cfg.checkpoint.sharded and cfg.dist.strategy == "ddp":
        raise ConfigError(
            "--checkpoint.sharded needs --dist.strategy fsdp: under ddp every rank holds the whole model; drop "
            "--checkpoint.sharded (checkpoints are then consolidated)"
        )
    if world.enabled and cfg.dist.meta_init and cfg.dist.strategy == "ddp":  # DDP's first broadcast reads the weights
        raise ConfigError(
            "--dist.meta_init needs --dist.strategy fsdp: under ddp every rank holds the whole model, so there is "
            "nothing to save; drop --dist.meta_init"
        )
    if world.enabled and cfg.dist.strategy == "fsdp" and cfg.optim.name == "muon":
        raise ConfigError(
            "optim.name muon orthogonalises whole weight matrices, which FSDP2 shards across ranks; "
            "use --dist.strategy ddp (or diloco) with Muon, or --optim.name adamw with FSDP2"
        )


def _pretrain(cfg: RunConfig, *, overwrite: bool, progress: bool) -> TrainState:
    if not cfg.data.dir:
        raise ConfigError("no training data given; pass --data DATA_DIR (made by 'lmforge prepare')")
    data = load_data_dir(cfg.data.dir)
    if cfg.train.early_stop_patience and not data.split_shards("val"):  # (noted, and nothing ever stopped early)
        raise ConfigError(
            f"train.early_stop_patience {cfg.train.early_stop_patience} watches the validation loss, and "
            f"{cfg.data.dir} has no validation split; prepare it with --val-fraction F or --val-input FILE, or drop "
            "--train.early_stop_patience"
        )
    tokenizer = Tokenizer.load(data.tokenizer_path)
    # --init-from starts a run: a folder with checkpoints resumes them instead (a note says so, below)
    starts = cfg.init_from and cfg.out and (overwrite or not latest_checkpoint(Path(cfg.out)))
    init = None
    if cfg.init_from and cfg.out:  # (RUN's other tokenizer gives the model the data's vocab_size on a resume too)
        cfg, init = init_start(cfg, tokenizer, starts=bool(starts))
    cfg = resolve_run_config(cfg, tokenizer)
    run_dir = Path(cfg.out)
    world, device = dist.init(cfg.dist, cfg.train.device)  # one process unless launched by torchrun
    dist.check_same_config(cfg.to_dict(), device)  # ranks started with other flags: one line each, no hang
    try:  # refusals of the settings every rank shares (checked equal just now): printed by rank 0 alone
        _refuse_for_world(cfg, world)
        rank_train = _rank_batch(cfg, world.world_size)
    except ConfigError as e:
        e.every_rank = True
        raise
    problem = cpp_compiler_problem() if cfg.train.compile and device.type == "cpu" else None
    if problem:
        raise ConfigError(
            f"--train.compile on CPU needs a C++ compiler for inductor's kernels ({problem}); "
            "install g++ (or set CXX), or drop --train.compile"
        )
    precision = pick_precision(device, cfg.train.dtype, cfg.train.attention)  # refused before OUT is made
    # a model far too big for the device (any family): refused before it is built
    check_fits(cfg.model, cfg.optim, device, world_size=world.world_size, strategy=cfg.dist.strategy)
    # and a micro-batch whose token ids alone exceed it (--train.batch_size 1e11), as finetune refuses it: it was
    # numpy's out-of-memory in the first step, after the run folder was written and the run marked failed
    check_batch_fits(rank_train.micro_batch, cfg.data.seq_len, device)
    check_packages(cfg.log)  # --log.wandb without wandb: before --overwrite sets the old run aside
    if cfg.data.mix:  # its directories too (manifests only; the loader opens them after the claim)
        from lmforge.data.mixture import mix_sources

        mix_sources(cfg.data.mix, tokenizer.fingerprint)

    def claim_and_prepare() -> bool:  # rank 0 only: no other process trains the folder, then check or make it
        from lmforge.data.mixture import parse_mix
        from lmforge.runs import check_run_out

        mixed = [Path(name) for name, _ in parse_mix(cfg.data.mix)] if cfg.data.mix else []
        starts = [Path(cfg.init_from)] if cfg.init_from else []
        check_run_out(run_dir, starts, data_dirs=[Path(cfg.data.dir), *mixed], overwrite=overwrite)  # before the claim
        claim(run_dir)
        return prepare_run_dir(run_dir, cfg, tokenizer, overwrite=overwrite)

    resume = _on_main(world, claim_and_prepare)
    _stop_if_signalled(world, device)  # (before the model is built and a checkpoint read)

    keep_freed_memory(device)  # CPU: steps reuse their buffers instead of page-faulting them back in
    tokenizer_json = tokenizer.to_str()

    torch.manual_seed(cfg.train.seed)
    if cfg.dist.meta_init:  # no memory yet: parameters are allocated (sharded, under FSDP) after wrapping
        with torch.device("meta"):
            model = build_model(cfg.model)
    else:
        model = build_model(cfg.model).to(device)  # construction leaves the RNG alone: init sees the seed
        model.init_weights()
        if init is not None and not resume:
            load_init_weights(model, init)  # (the RNG as without --init-from: init_weights drew first)
    train_shards = data.split_shards("train")
    if not train_shards:
        raise DataError(f"{cfg.data.dir} has no train shards; re-run 'lmforge prepare' with more input text")
    val_shards = data.split_shards("val")
    setup = setup_objective(  # loader + objective (+ encoder evaluation) for objective.name and model.family
        cfg,
        train_shards,
        val_shards,
        tokenizer,
        precision,
        micro_batch=rank_train.micro_batch,
        accum_steps=rank_train.accum_steps,
        rank=world.rank,
        world_size=world.world_size,
    )
    loader = IdCheckedLoader(setup.loader, cfg.model.vocab_size, cfg.data.dir)
    state = TrainState()
    metrics_path = run_dir / "metrics.jsonl"
    if not resume and cfg.checkpoint.resume_from != "latest":
        raise ConfigError(
            f"checkpoint.resume_from {cfg.checkpoint.resume_from!r}: {run_dir} has no checkpoint to resume from "
            "(this run starts at step 0); drop the flag"
        )
    ckpt = _checkpoint_to_resume(run_dir, cfg.checkpoint.resume_from, world, device) if resume else None
    # which saved state this rank resumes from: a DiLoCo worker its own (0 for everything else)
    worker, resume_note = dist.resume_worker(ckpt, cfg.dist.strategy, world) if ckpt is not None else (0, "")
    saved, min_lr_kept = ckpt.meta.get("config") if ckpt is not None else None, ""
    given_init = cfg.init_from if ckpt is not None else ""
    if isinstance(saved, dict):  # a run saved when min_lr 0 meant lr / 10 keeps that schedule (config.py)
        train_cfg, min_lr_kept = resumed_train(saved.get("train"), saved.get("config_version"), cfg.train)
        # a resume keeps the run's own record of what started it
        cfg = dataclasses.replace(cfg, train=train_cfg, init_from=str(saved.get("init_from") or ""))
        rank_train = _rank_batch(cfg, world.world_size)
    if ckpt is not None and not cfg.dist.meta_init:
        ckpt.load_model(model, worker)  # before sharding: every rank loads the consolidated weights (or its own)
    if cfg.train.activation_checkpointing and not dist.apply_activation_checkpointing(model):
        raise ConfigError(f"train.activation_checkpointing: model family {cfg.model.family!r} has no blocks to wrap")
    train_model = dist.wrap_model(  # plain MLM leaves BERT's NSP head without gradients: DDP must know
        model, cfg.dist.strategy, device, precision.dtype, find_unused=cfg.objective.name == "mlm"
    )
    if cfg.dist.meta_init:
        model.to_empty(device=device)  # each rank allocates only its shards under FSDP
        torch.manual_seed(cfg.train.seed)  # as right after the seed above: the same init as without meta_init
        model.init_weights()
        if ckpt is not None:
            dist.load_model_state(model, ckpt, worker)  # each rank reads only its rows
    optimizer = build_optimizer(model, cfg.optim, lr=cfg.train.lr, device=device)
    optim_changes: list[str] = []
    if ckpt is not None:
        optim_changes = dist.load_optimizer_state(model, optimizer, ckpt, worker)
        loader.load_state_dict(ckpt.meta["loader"])
        setup.load_state_dict(ckpt.meta.get("objective", {}), model)  # e.g. the LSTM's carried state
        state = TrainState.from_dict(ckpt.meta["train_state"])
        set_rng_state(ckpt.meta["rng"])  # (the same on every rank, DiLoCo's workers included)
    diloco = dist.DiLoCo(model, cfg.dist, device) if cfg.dist.strategy == "diloco" else None
    if diloco is not None and ckpt is not None:
        diloco.load_checkpoint(ckpt)  # the outer momentum and the anchor (the weights at the last sync)
    _stop_if_signalled(world, device)  # (loaded; the run folder is not changed yet)
    done = nothing_left(state, cfg.train)  # why a re-run of a finished run has nothing to do
    # Only now, with the checkpoint to resume from loaded and checked, does the run folder change: a resume
    # that fails above leaves config.json (and env.json, metrics) describing the run as it is on disk, and
    # so does a re-run with nothing to do (its config.json said max_steps 10 of a run trained to step 50).
    if world.is_main and done and ckpt is not None and not readable_config(run_dir / "config.json"):
        write_json(run_dir / "config.json", ckpt.meta["config"])  # the config prepare_run_dir stood in with
    if world.is_main and not done:
        discard_aside(run_dir)  # (--overwrite: the old run goes only now that the new one starts)
        if ckpt is not None and (aside := set_aside_later(run_dir, state.step)):  # an earlier step chosen
            print(f"note: resuming from {ckpt.path.name}; the later checkpoints were moved to {aside}", flush=True)
        # env.json (its host) first: from the moment config.json makes the folder a run, `lmforge runs` and
        # `report --watch` can tell it is being trained (the lock speaks for a process on env.json's host), until
        # status.json says so. config.json came first, and capture_env takes seconds on a loaded machine: a
        # `report --watch` begun then said "no run is running; done" and quit, and `runs` said "unknown".
        write_json(
            run_dir / "env.json",
            {**capture_env(str(device)), "world_size": world.world_size, "dist_backend": dist.backend()},
        )
        write_json(run_dir / "config.json", cfg.to_dict())
        if not (run_dir / "tokenizer.json").is_file():
            tokenizer.save(run_dir / "tokenizer.json")
        if init is not None and not resume:
            write_json(run_dir / "init_from.json", init.record())
        if ckpt is not None:
            truncate_metrics(metrics_path, state.step)
        elif metrics_path.exists():
            metrics_path.unlink()

    log = RunLogger(
        metrics_path,
        max_steps=cfg.train.max_steps,
        start_step=state.step,
        enabled=world.is_main,
        console=progress,
        plot_path=run_dir / "loss.png",
        trackers=open_trackers(cfg.log, run_dir, config=cfg.to_dict(), start_step=state.step)
        if world.is_main
        else None,
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"lmforge pretrain: {n_params / 1e6:.2f}M parameters ({model.num_params() / 1e6:.2f}M non-embedding), "
        f"vocab {cfg.model.vocab_size:,}, context {cfg.data.seq_len:,}, batch {cfg.train.batch_size:,} "
        f"({rank_train.micro_batch:,} x {rank_train.accum_steps:,} accumulation"
        + (f" x {world.world_size:,} ranks, {cfg.dist.strategy}" if world.enabled else "")
        + f"), {device} {str(precision.dtype)[6:]}, "
        f"train {loader.windows_per_epoch:,} sequences/epoch"
    )
    if init is not None and not resume:
        log.info(f"starting from the weights of {init.checkpoint.path} (a fresh optimizer and schedule, step 0)")
        if init.summary():
            log.info(init.summary())
    if resume and not done:  # (with nothing to do, no step follows: "resuming", "applied from now" misled)
        log.info(f"resuming {run_dir} from step {state.step}")
        if given_init:
            log.info(
                f"note: --init-from {given_init} is ignored: it starts a run, and {run_dir} resumes its own checkpoint"
            )
        for note in (resume_note, min_lr_kept):
            if note:
                log.info(note)
        if optim_changes:
            log.info(
                f"note: optimizer settings changed since the checkpoint, applied from now: {', '.join(optim_changes)}"
            )
        schedule_note = _schedule_change(ckpt.meta.get("config"), cfg, state.step)
        if schedule_note:
            log.info(schedule_note)
        for note in (
            _objective_change(ckpt.meta.get("config"), cfg, state.step),
            _training_change(ckpt.meta.get("config"), cfg, state.step),
        ):
            if note:
                log.info(note)
        loss_note = loss_definition_note(cfg.objective.name, ckpt.meta.get("loss_definition"), state.step)
        if loss_note:
            log.info(loss_note)

    val_shards = data.split_shards("val")
    token_bytes = split_byte_table(data, "val", tokenizer.token_bytes())
    eval_bs = cfg.eval.forward_batch(cfg.train, world.world_size)

    def evaluate() -> dict[str, Any]:
        if setup.evaluate is not None:  # encoder objectives: mlm_accuracy, nsp_accuracy, rtd_auc, ...
            return setup.evaluate(model)
        batches = eval_batches(  # (their ids were checked against the vocabulary by split_byte_table)
            val_shards, seq_len=cfg.data.seq_len, batch_size=eval_bs, max_sequences=cfg.eval.sequences(cfg.train)
        )
        share = dist.eval_share(cfg.dist.strategy, world.rank, world.world_size)
        metrics = evaluate_lm(model, batches, token_bytes=token_bytes, precision=precision, **share)
        if cfg.eval.sample_tokens:
            from lmforge.generate import generate

            ids = generate(
                model,
                [tokenizer.eos_id],
                max_new_tokens=cfg.eval.sample_tokens,
                temperature=0.8,
                top_k=50,
                seed=0,
                vocab_size=tokenizer.vocab_size,
            )
            metrics["sample"] = tokenizer.decode(ids)
        return metrics

    if not done:
        t = cfg.train
        for note in (
            warmup_note(lr=t.lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps),
            min_lr_note(lr=t.lr, min_lr=t.min_lr, schedule=t.schedule),
        ):
            if note:
                log.info(note)
    if not val_shards:
        log.info("note: the data has no validation split; training runs without evaluation or early stopping")
    if data.manifest.get("tokenizer", {}).get("kind") == "wordpiece" and cfg.model.family not in ("bert", "electra"):
        log.info(
            "note: the data uses WordPiece, BERT's tokenizer: text decoded from it has spaces between words and "
            "Chinese characters and no line breaks, so generated text will too; prepare with --tokenizer bpe for "
            "a model that generates"
        )

    def save(st: TrainState) -> Path:
        meta = {
            "train_state": st.to_dict(),
            "loader": loader.state_dict(),
            "config": cfg.to_dict(),
            "objective": setup.state_dict(),
            "loss_definition": loss_definition(cfg.objective.name),  # (a resume under another one says so)
        }
        if cfg.checkpoint.sharded or diloco is not None:  # every rank writes its own shards (DiLoCo: its state)
            dist.save_sharded_checkpoint(run_dir, st.step, model, optimizer, meta, tokenizer_json, diloco)
        else:
            weights, optimizer_state = dist.checkpoint_states(model, optimizer)  # a collective under FSDP
            if world.is_main:
                save_checkpoint(
                    run_dir,
                    step=st.step,
                    model=model,
                    optimizer=optimizer_state,
                    state=meta,
                    tokenizer_json=tokenizer_json,
                    model_state=weights,
                )
        if world.is_main:
            prune_checkpoints(
                run_dir, keep=cfg.checkpoint.keep, best_step=st.best_step if cfg.checkpoint.keep_best else None
            )
        dist.barrier()  # nobody runs ahead of (or exits before) the checkpoint
        return step_dir(run_dir, st.step)

    if done:
        if world.is_main and run_status(run_dir) != "finished":  # it died after its last checkpoint (a peer's
            mark_stopped(run_dir, "finished", stop_reason=state.stop_reason)  # SIGKILL): `runs` said re-run it
        log.info(f"{run_dir} is already {done}; nothing to do")
        log.close()
        return state

    def rollback(st: TrainState) -> None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise TrainingDiverged(
                f"loss or gradients were NaN/inf for {cfg.train.rollback_after} steps in a row at step {st.step + 1} "
                "and there is no checkpoint to roll back to; lower --train.lr or raise --train.warmup_steps"
            )
        back = load_checkpoint(path)
        restored = TrainState.from_dict(back.meta["train_state"])
        if st.rollbacks >= MAX_ROLLBACKS:
            raise TrainingDiverged(
                f"training diverged again after {st.rollbacks} rollbacks (latest to step {restored.step}); "
                "lower --train.lr, raise --train.warmup_steps or --optim.grad_clip"
            )
        worker = dist.resume_worker(back, cfg.dist.strategy, world)[0]
        dist.load_model_state(model, back, worker)
        dist.load_optimizer_state(model, optimizer, back, worker)
        if diloco is not None:
            diloco.load_checkpoint(back)
        set_rng_state(back.meta["rng"])
        # An LSTM/GRU's carried state starts over: it may be what went non-finite (it was kept, so one NaN in it
        # made every later step NaN, and the run ended "diverged again after 3 rollbacks"), and the checkpoint's
        # belongs to text the loader has moved past.
        setup.load_state_dict({}, model)
        restored.skipped_steps, restored.rollbacks = st.skipped_steps, st.rollbacks + 1
        restored.elapsed_s = st.elapsed_s
        st.__dict__.update(restored.__dict__)  # in place: the loop holds this object
        log.rewind(st.step)

    def evaluate_rank0() -> dict[str, Any]:
        """DiLoCo's workers evaluate their own weights; all take rank 0's metrics (the logged ones), so that
        they stop early at the same step (the last step syncs) and save the same best checkpoints."""
        return dist.broadcast_object(evaluate())

    first_step = state.step
    forward_model = torch.compile(train_model, mode=cfg.train.compile_mode) if cfg.train.compile else train_model
    # From here a signal is held and acted on by the loop, or once status.json says how the run ended (a Ctrl-C
    # while loss.png was drawn after the final checkpoint printed "interrupted" and left the status "running")
    hold_interrupts()
    if world.is_main:
        mark_running(run_dir)  # status.json, read by `lmforge runs`
    try:
        state = train(
            forward_model,
            optimizer,
            loader,
            cfg=rank_train,
            optim_cfg=cfg.optim,
            eval_cfg=cfg.eval,
            ckpt_cfg=cfg.checkpoint,
            precision=precision,
            state=state,
            log=log,
            save=save,
            evaluate=(evaluate_rank0 if diloco else evaluate) if val_shards else None,
            objective=setup.objective,
            flops_per_token=_mfu_flops_per_token(model, cfg),
            peak_flops=measure_matmul_flops(device.type, precision.dtype, seconds=0.1),  # 0.1 s: start-up cost
            world=world,
            rollback=rollback,
            after_step=diloco.after_step if diloco else None,
            local_grads=diloco is not None,
        )
        if diloco:
            log.info(diloco.comm_report(world.world_size, state.step - first_step))
            if state.stop_reason == "time_budget" and diloco.synced_at != state.step:  # (see dist.DiLoCo)
                log.info(
                    f"note: the time budget stopped the workers between outer syncs, so step-{state.step:06d} "
                    "gives eval, generate and export worker 0's weights; raise train.time_budget to train on "
                    "(as one longer run): the step that reaches train.max_steps syncs them into the final model"
                )
        if cfg.data.mix:  # MixtureLoader: the share of sequences drawn from each directory
            log.info("data mix achieved: " + ", ".join(f"{k}={v:.4f}" for k, v in loader.achieved().items()))
    except BaseException as e:
        stopped = isinstance(e, KeyboardInterrupt)
        # status first, and the clean-up under the failure's own line: torchrun SIGTERMs every rank as soon as one
        # dies, and a survivor whose collective had failed got it while closing its log (plotting loss.png), before
        # the CommFailure existed; it printed "lmforge: interrupted" (exit 130) and left status.json "running"
        if world.is_main:
            mark_stopped(run_dir, "interrupted" if stopped else "failed", error=f"{type(e).__name__}: {e}"[:500])
        if world.enabled and dist.is_comm_failure(e):
            try:
                raise dist.CommFailure(dist.describe_comm_failure(e, world, cfg.dist.timeout_s)) from None
            finally:  # (a signal here is a KeyboardInterrupt over the CommFailure, whose line cli prints)
                log.close(failing=True)
        log.close(failing=True)
        raise
    finally:
        log.close()
    if world.is_main:
        mark_stopped(
            run_dir, "interrupted" if state.stop_reason == "interrupted" else "finished", stop_reason=state.stop_reason
        )
    latest = latest_checkpoint(run_dir)
    if state.stop_reason == "interrupted":
        raise Interrupted(f"interrupted at step {state.step}; saved {latest}; re-run the same command to resume")
    return state
