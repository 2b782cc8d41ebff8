"""Atomic run checkpoints: safetensors for tensors, JSON for everything else; never pickle.

Layout::

    run_dir/checkpoints/
        step-000120/            a complete checkpoint (has state.json, written last)
            model.safetensors   unwrapped model weights (tied weights stored once)
            optim.safetensors   optimizer tensors, flattened as "<param index>.<name>"
              or, sharded (`checkpoint.sharded` under FSDP2), per rank r of W:
            model-0000r-of-0000W.safetensors, optim-0000r-of-0000W.safetensors: rank r's dim-0 chunks
              or, under DiLoCo, worker r's own whole weights and inner optimizer state in the same files,
            diloco.safetensors  + the outer state shared by the workers (anchor and Nesterov momentum)
            state.json          format version, step, train state, RNG states, loader state,
                                resolved config, optimizer structure, file sizes + sha256, its own sha256,
                                "sharded": world size and the names of the split tensors,
                                "diloco": the number of workers (see dist.DiLoCo)
            tokenizer.json      so that one checkpoint folder is usable on its own
        latest                  text file naming the newest complete checkpoint

Writing goes to `step-000120.tmp/`, files are fsynced, the folder is renamed with `os.replace`,
then `latest` is rewritten atomically; a folder without `state.json` is not a checkpoint
(torchtitan's validity marker), so a SIGKILL at any moment leaves the previous one loadable.
Old checkpoints are deleted only after the new one is complete (keep the last k and the best).
Loading checks sizes and sha256 first, so a truncated or foreign file gives a one-line
`CheckpointError` naming it: every file for a resume, the files holding the weights for a reader of
them (`eval`, `generate`, `export`: `verify="weights"`).

Reading a run that is still training: the trainer writes step N, points `latest` at it, then prunes
older folders, so the folder a reader resolved through `latest` can vanish while it is read. That
checkpoint is not damaged: `reading_latest` re-resolves `latest` and loads the newer one (a few
times), and if it still loses the race it says the training pruned it and to retry.

Rebuilding a whole model from a checkpoint (`Trained`, `load_trained`, `open_trained`, `load_weights`) is in
`lmforge/trained.py`; this module writes, resolves, verifies and opens the checkpoint files themselves.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lmforge.atomic import atomic_write_text, fsync_file, public_path, save_safetensors, write_json
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.fields import spelled
from lmforge.train.state import flatten_optimizer, rng_state, savable, shared_names, unflatten_optimizer

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{6,})$")
PRUNED_RETRIES = 5  # re-resolutions of `latest` when a running training prunes what is being read
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# small file helpers


def read_json(path: Path, what: str) -> Any:
    try:  # utf-8-sig: a config.json saved by a Windows editor starts with a BOM, which json calls invalid
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON (truncated or damaged); {what}") from None


def state_sha256(meta: dict[str, Any]) -> str:
    """sha256 of a state.json's content without its own "state_sha256" entry. JSON that still parses after
    damage or a hand edit (a digit of the loader's cursor, a type) resumed silently wrong or crashed with a
    traceback; the other files are covered by the sizes and sha256 it lists. (Python's json round-trips the
    written text exactly, so the reader's dump of what it loaded is the writer's.)"""
    rest = {k: v for k, v in meta.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(rest, ensure_ascii=False).encode("utf-8")).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# finding checkpoints


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    """`checkpoints/step-NNNNNN`: where the checkpoint of `step` lives once complete."""
    return checkpoints_dir(run_dir) / f"step-{step:06d}"


def tmp_step_dir(run_dir: Path, step: int) -> Path:
    """`checkpoints/step-NNNNNN.tmp`: where it is written until `finish_checkpoint` renames it."""
    final = step_dir(run_dir, step)
    return final.with_name(final.name + ".tmp")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


@functools.cache  # once per pointer, name and fallback in a process: a command looks `latest` up several times
def _note_stale_pointer(pointer: Path, name: str, used: str) -> None:
    note = f"note: {pointer} names {name!r}, which is not a complete checkpoint (deleted or moved?); {used}"
    print(note, file=sys.stderr, flush=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by `checkpoints/latest`, else the newest complete one, else None.

    A `latest` naming a folder that is not a complete checkpoint (deleted by hand, or copied without it) fell back
    without a word; a note on stderr now names the checkpoint used instead (complete: a resume from it is exact,
    it trains the steps after it again)."""
    root = checkpoints_dir(run_dir)
    pointer = root / "latest"
    name = None
    for _ in range(2):  # read twice: a training in run_dir moves `latest` on before it prunes what it named
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8").strip()
            if STEP_DIR.match(name) and (root / name / "state.json").is_file():
                return root / name
    complete = list_checkpoints(run_dir)
    if name is not None:
        _note_stale_pointer(pointer, name, f"using {complete[-1].name}" if complete else "no checkpoint is complete")
    return complete[-1] if complete else None


def checkpoint_to_resume(run_dir: Path, which: str, log: Any = print) -> Checkpoint:
    """The verified checkpoint a re-run continues from.

    which: "latest" (damaged -> one-line error naming the file and suggesting "previous"), "previous"
    (the newest complete checkpoint that passes its size and sha256 checks; damaged newer ones are
    reported through `log` and skipped), or a checkpoint folder name such as "step-000500".
    """
    complete = list_checkpoints(run_dir)
    if which == "latest":
        path = latest_checkpoint(run_dir)
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (re-run with --checkpoint.resume_from previous)") from None
    if which == "previous":
        latest = latest_checkpoint(run_dir)  # (checkpoints after it belong to a run resumed from before them)
        newest = int(STEP_DIR.match(latest.name).group(1)) if latest is not None else None
        for path in reversed(complete):
            if newest is not None and int(STEP_DIR.match(path.name).group(1)) > newest:
                continue
            try:
                return load_checkpoint(path)
            except CheckpointError as e:
                log(f"skipping damaged checkpoint: {e}")
        raise CheckpointError(
            f"no checkpoint in {checkpoints_dir(run_dir)} passes its checks; start over with --overwrite"
        )
    names = [p.name for p in complete]
    if which not in names:
        raise CheckpointError(
            f"checkpoint.resume_from {which!r} is not a complete checkpoint of {run_dir}; "
            f"use latest, previous or one of: {', '.join(names) or '(none)'}"
        )
    return load_checkpoint(checkpoints_dir(run_dir) / which)


def _is_hf_config(path: Path) -> bool:
    """Whether `path` is a transformers config.json (model_type or architectures, no lmforge model section)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model" not in data and ("model_type" in data or "architectures" in data)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory or a checkpoint folder → the checkpoint folder to load (one-line errors)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; pass a run directory (made by 'lmforge pretrain') or a checkpoint")
    if p.is_dir() and (p / "state.json").is_file():
        return p
    if p.is_dir() and ((p / "checkpoints").is_dir() or (p / "config.json").is_file()):
        ckpt = latest_checkpoint(p)
        if ckpt is None and not (p / "checkpoints").is_dir() and _is_hf_config(p / "config.json"):
            raise CheckpointError(
                f"{p} is a Hugging Face model directory, not an lmforge run; import it first "
                f"(lmforge import {p} --out RUN_DIR) and pass RUN_DIR"
            )
        if ckpt is None:
            command = "lmforge finetune" if (p / "finetune.json").is_file() else "lmforge pretrain"
            raise CheckpointError(
                f"run directory {p} has no complete checkpoint yet; train it first ({command}; the same command "
                "again resumes it)"
            )
        return ckpt
    if p.is_dir() and (p / "manifest.json").is_file() and (p / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{p} is a prepared data directory (lmforge prepare), not a run; train a model on it first "
            f"(lmforge pretrain --data {p}) and pass that run directory"
        )
    raise CheckpointError(
        f"{p} is not an lmforge run directory or checkpoint (no state.json / checkpoints/); pass a folder made by "
        "lmforge pretrain, finetune or import"
    )


def _pruned(ckpt_dir: Path, run_dir: Path | None) -> bool:
    """After a failed load: was `ckpt_dir` deleted under the reader (not damaged)? Its state.json is
    gone, or (resolved through `run_dir`'s latest) `latest` has moved on, so pruning is taking it."""
    if not (ckpt_dir / "state.json").is_file():
        return True
    return run_dir is not None and latest_checkpoint(run_dir) != ckpt_dir


def reading_latest(path: str | Path, load: Callable[[Path], T]) -> T:
    """`load(checkpoint folder)` for a run directory or checkpoint folder, safe against a training
    that runs in it (see the module docstring): a run directory's checkpoint pruned mid-load is
    re-resolved and loaded again; a pruned one is never reported as damaged or incomplete."""
    p = Path(path)
    through_latest = not (p / "state.json").is_file()  # a run directory: resolved through `latest`
    for _ in range(PRUNED_RETRIES):
        ckpt_dir = resolve_checkpoint(p)
        try:
            return load(ckpt_dir)
        except (LmforgeError, OSError):
            if not _pruned(ckpt_dir, p if through_latest else None):
                raise
            if not through_latest:
                raise _missing(ckpt_dir / "state.json") from None
    raise CheckpointError(
        f"the training running in {p} pruned each checkpoint before it could be read ({PRUNED_RETRIES} tries); "
        "retry (a larger --checkpoint.keep or --checkpoint.every makes this unlikely)"
    )


# ---------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None,
    state: dict[str, Any],
    tokenizer_json: str | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `checkpoints/step-{step:06d}` atomically and point `latest` at it.

    Args:
        run_dir: the run directory.
        step: optimizer steps taken.
        model: the unwrapped model (no DDP/compile wrapper), so keys carry no prefix.
        optimizer: saved as flattened tensors + JSON structure; None for weights-only checkpoints. May be
            an already consolidated `optimizer.state_dict()`-style dict (FSDP, see dist.py).
        state: JSON-serialisable train state, loader state and resolved config.
        tokenizer_json: tokenizer.json content copied in, so the folder is self-contained.
        model_state: consolidated weights to write instead of `model`'s own (FSDP, see dist.py).
    """
    tmp = begin_checkpoint(run_dir, step)
    try:
        weights_meta = {"format": "pt", "lmforge_step": str(step)}
        if model_state is not None:
            model_state = {k: v.contiguous() for k, v in model_state.items()}
            save_safetensors(model_state, str(tmp / "model.safetensors"), weights_meta)
        else:
            tensors, dropped = savable(model.state_dict())
            save_safetensors(tensors, str(tmp / "model.safetensors"), {**dropped, **weights_meta})
        files = ["model.safetensors"]
        meta: dict[str, Any] = dict(state)
        if optimizer is not None:
            tensors, structure = flatten_optimizer(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
            save_safetensors(tensors, str(tmp / "optim.safetensors"), metadata={"format": "pt"})
            files.append("optim.safetensors")
            meta["optimizer"] = structure
        return finish_checkpoint(tmp, step=step, files=files, meta=meta, tokenizer_json=tokenizer_json)
    except (SafetensorError, OSError) as e:
        raise write_failed(run_dir, step, e) from None


def write_failed(run_dir: Path, step: int, e: BaseException) -> CheckpointError:
    """The error for a checkpoint whose write failed (a full disk or a lost permission mid-write), once its
    half-written folder is removed: it held the space the next try needs. The complete checkpoints before
    it are untouched. (safetensors raises its own error type for this: a traceback before.) Paths are named as the
    user knows them (`atomic.public_path`): quantize builds its run in a hidden `.<out>.lmforge-tmp-<random>`."""
    shutil.rmtree(tmp_step_dir(run_dir, step), ignore_errors=True)
    previous = latest_checkpoint(run_dir)
    resume = f"re-run the same command to resume from {previous.name}" if previous else "re-run the command"
    return CheckpointError(
        public_path(f"could not write checkpoint step-{step:06d} in {checkpoints_dir(run_dir)} ({e}); ")
        + f"free disk space or fix permissions, then {resume}"
    )


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """The empty temporary folder a checkpoint of `step` is written into (see `finish_checkpoint`). A folder that
    cannot be made (the permission to write in checkpoints/ lost mid-run) is `write_failed`'s error, which names
    the checkpoint to resume from: it was a bare "[Errno 13] Permission denied: '.../step-000012.tmp'"."""
    tmp = tmp_step_dir(run_dir, step)
    try:
        checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise write_failed(run_dir, step, e) from None
    return tmp


def finish_checkpoint(
    tmp: Path, *, step: int, files: list[str], meta: dict[str, Any], tokenizer_json: str | None = None
) -> Path:
    """Fsync and checksum `files` in `tmp`, write state.json (the validity marker) last, rename the
    folder to `step-NNNNNN` and point `latest` at it. Returns the final folder."""
    files = list(files)
    meta = {"format_version": FORMAT_VERSION, "step": step, **meta, "rng": rng_state()}
    if tokenizer_json is not None:
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        files.append("tokenizer.json")
    for name in files:
        if not (tmp / name).is_file():
            raise CheckpointError(
                f"{tmp / name} was not written; sharded checkpoints need a filesystem that every rank sees"
            )
        fsync_file(tmp / name)
    meta["files"] = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files}
    meta["state_sha256"] = state_sha256(json.loads(json.dumps(meta)))  # as a reader will load it (str keys)
    write_json(tmp / "state.json", meta)  # the validity marker: written last
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():  # a re-save of the same step (e.g. interrupted right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(final.parent / "latest", final.name + "\n")
    return final


# A sharded checkpoint (`checkpoint.sharded`, FSDP2): rank r of W writes the dim-0 chunks it holds
# (`torch.chunk` order, FSDP2's Shard(0)) of every sharded tensor, and the whole of the others, to
# model-{r:05d}-of-{W:05d}.safetensors and optim-{r:05d}-of-{W:05d}.safetensors; state.json's
# "sharded" entry names the world size and which tensors are split. Reading concatenates the chunks
# in rank order, so any world size (and `eval`, `generate`, `export` in one process) loads it.
# DiLoCo writes the same files with nothing split: each worker's whole weights and inner optimizer
# state, which differ between workers; one process reads rank 0's (`rank` picks another worker's).


DILOCO_FILE = "diloco.safetensors"  # a DiLoCo checkpoint's outer state (dist.DiLoCo.state_dict)


def shard_files(rank: int, world_size: int) -> tuple[str, str]:
    """(model file, optimizer file) names of one rank's shards."""
    tag = f"{rank:05d}-of-{world_size:05d}"
    return f"model-{tag}.safetensors", f"optim-{tag}.safetensors"


def model_files(meta: dict[str, Any]) -> list[str]:
    """The files of a checkpoint (its state.json `meta`) that make up the one model a process loads:
    model.safetensors, every rank's shard when tensors are split (FSDP2), or rank 0's when each rank's
    file is whole (DiLoCo's workers: one model each)."""
    sharded = meta.get("sharded")
    if sharded is None:
        return ["model.safetensors"]
    world = int(sharded["world_size"])
    return [shard_files(r, world)[0] for r in range(world if sharded["model"] else 1)]


def write_shard(
    tmp: Path, rank: int, world_size: int, model: dict[str, torch.Tensor], optim: dict[str, torch.Tensor]
) -> None:
    """Write one rank's local model tensors and flattened optimizer tensors into `tmp`."""
    model_file, optim_file = shard_files(rank, world_size)
    save_safetensors(
        {k: v.detach().contiguous().cpu() for k, v in model.items()}, str(tmp / model_file), {"format": "pt"}
    )
    save_safetensors(
        {k: v.detach().contiguous().cpu() for k, v in optim.items()}, str(tmp / optim_file), {"format": "pt"}
    )


def set_aside_later(run_dir: Path, step: int) -> Path | None:
    """Move the checkpoints after `step` into `checkpoints/abandoned-after-step-NNNNNN-<time>/` and return
    that folder (None if there were none). A run resumed from an earlier checkpoint leaves them behind;
    where they are, pruning (which keeps the highest steps) would delete the new run's checkpoints instead
    and `previous` would resume the abandoned timeline. They are the user's: moved aside, never deleted."""
    later = [p for p in list_checkpoints(run_dir) if int(STEP_DIR.match(p.name).group(1)) > step]
    if not later:
        return None
    aside = checkpoints_dir(run_dir) / f"abandoned-after-step-{step:06d}-{time.strftime('%Y%m%dT%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for p in later:
        os.replace(p, aside / p.name)
    if (step_dir(run_dir, step) / "state.json").is_file():  # `latest` named a checkpoint just moved aside
        atomic_write_text(checkpoints_dir(run_dir) / "latest", step_dir(run_dir, step).name + "\n")
    return aside


def prune_checkpoints(run_dir: Path, *, keep: int, best_step: int | None) -> None:
    """Delete complete checkpoints beyond the newest `keep` (never the best), and stale temp folders."""
    complete = list_checkpoints(run_dir)
    protected = {p.name for p in complete[-keep:]}
    if best_step is not None:
        protected.add(step_dir(run_dir, best_step).name)
    for p in complete:
        if p.name not in protected:
            shutil.rmtree(p, ignore_errors=True)
    root = checkpoints_dir(run_dir)
    for p in root.glob("*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    # A step folder without state.json is what a kill in the middle of an earlier prune's rmtree leaves (a
    # complete folder is renamed into place only with its state.json): not a checkpoint, but it kept whatever
    # files the rmtree had not reached yet (the optimizer state: 2x the model) for the life of the run.
    for p in root.iterdir():
        if STEP_DIR.match(p.name) and p.is_dir() and not (p / "state.json").exists():
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]  # state.json

    def verify(self, weights_only: bool = False) -> None:
        """Check every listed file's size and sha256; one-line CheckpointError naming the damaged file.

        `weights_only`: only the files a reader of the weights opens (`eval`, `generate`, `export`, a
        fine-tune's base), not the optimizer state, DiLoCo's outer state or its other workers' weights,
        which only a resume reads (and checks): they are 2x the model, or 3W x under DiLoCo.
        """
        files = self.meta.get("files", {})
        if weights_only:
            weights = set(model_files(self.meta))
            resume_only = ("model-", "optim", DILOCO_FILE)  # other workers' weights, optimizer, outer state
            files = {n: i for n, i in files.items() if n in weights or not n.startswith(resume_only)}
        for name, info in files.items():
            f = self.path / name
            missing = _missing(f, "use an earlier one")
            try:  # FileNotFoundError: deleted between the checks (pruned, see `reading_latest`)
                if not f.is_file():
                    raise missing
                size = f.stat().st_size
                if size != info["bytes"]:  # (a bigger one, another run's file copied in, was said "truncated?")
                    why = "truncated?" if size < info["bytes"] else "replaced by another file?"
                    raise CheckpointError(
                        f"{f} is {size} bytes, expected {info['bytes']} ({why}); use an earlier checkpoint"
                    )
                if _sha256(f) != info["sha256"]:
                    raise CheckpointError(f"{f} fails its sha256 check (damaged); use an earlier checkpoint")
            except FileNotFoundError:
                raise missing from None

    @property
    def weights_path(self) -> Path:
        """The weights file (a sharded checkpoint: its first shard), for messages."""
        return self.path / model_files(self.meta)[0]

    def weights_file(self, rank: int = 0) -> Path:
        """The file rank `rank`'s copy of the weights comes from (a DiLoCo worker's own, see `model_state`), for
        messages: a worker whose weights do not fit names its own file, not worker 0's."""
        sharded = self.meta.get("sharded")
        if sharded is None or sharded["model"]:  # one file, or chunks of every rank's (FSDP2): the first
            return self.weights_path
        return self.path / shard_files(rank, int(sharded["world_size"]))[0]

    def model_state(self, rank: int = 0) -> dict[str, torch.Tensor]:
        """All weights, whole (a sharded checkpoint's chunks concatenated); `rank`: whose copy of the tensors
        each rank saves whole (a DiLoCo worker's own weights, see `_join_shards`)."""
        if "sharded" in self.meta:
            return self._join_shards(0, self.meta["sharded"]["model"], rank)
        return _load_tensors(self.path / "model.safetensors")

    def read_file(self, name: str) -> dict[str, torch.Tensor]:
        """Every tensor of one of the checkpoint's safetensors files (e.g. DiLoCo's outer state)."""
        return _load_tensors(self.path / name)

    def _join_shards(self, which: int, split: list[str], rank: int = 0) -> dict[str, torch.Tensor]:
        """Whole tensors from the rank files `which` (0 model, 1 optimizer): names in `split` are
        concatenated along dim 0 in rank order, the rest taken from rank `rank`'s file (identical on
        every rank under FSDP2; each worker's own under DiLoCo). Only the files needed are read."""
        world = int(self.meta["sharded"]["world_size"])
        own = _load_tensors(self.path / shard_files(rank, world)[which])
        if not split:
            return own
        parts = [own if r == rank else _load_tensors(self.path / shard_files(r, world)[which]) for r in range(world)]
        split_names = set(split)
        whole = {}
        for name, tensor in own.items():
            if name not in split_names:
                whole[name] = tensor
                continue
            try:
                whole[name] = torch.cat([part[name] for part in parts], dim=0)
            except (KeyError, RuntimeError) as e:
                raise CheckpointError(f"{self.path}: the shards of {name} do not fit together ({e})") from None
        return whole

    def _sources(self, which: int, name: str) -> list[tuple[Path, str]]:
        """(file, stored name) pieces of whole tensor `name` (0 model, 1 optimizer state), in row order:
        one piece, or one per rank for a tensor a sharded checkpoint split. A tied name maps to the
        name it is stored under."""
        sharded = self.meta.get("sharded")
        if sharded is None:
            path = self.path / ("model.safetensors", "optim.safetensors")[which]
            with _open_tensors(path) as f:
                stored = name if name in f.keys() else (f.metadata() or {}).get(name, name)
            return [(path, stored)]
        world = int(sharded["world_size"])
        stored = name if which or name not in sharded["tied"] else sharded["tied"][name]
        if stored in (sharded["optim"] if which else sharded["model"]):
            return [(self.path / shard_files(r, world)[which], stored) for r in range(world)]
        return [(self.path / shard_files(0, world)[which], stored)]

    def _open_pieces(self, which: int, name: str) -> Any:
        """Yield (open safetensors file, stored name) for each piece of whole tensor `name`, in row order."""
        for path, stored in self._sources(which, name):
            with _open_tensors(path) as f:
                if stored not in f.keys():
                    raise CheckpointError(f"{path} has no tensor {stored!r}; was it written for another model?")
                yield f, stored

    def read_rows(self, which: int, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of whole tensor `name` (0 model, 1 optimizer state), reading
        only those rows from disk (safetensors slices): what one FSDP2 rank holds, at any world size."""
        out, offset, empty = [], 0, None
        for f, stored in self._open_pieces(which, name):
            piece = f.get_slice(stored)
            rows = piece.get_shape()[0]
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            if lo < hi:
                out.append(piece[lo:hi])
            elif empty is None:
                empty = piece[0:0]  # an empty chunk (a trailing rank's) still has a shape and dtype
            offset += rows
        if not out:
            return empty
        return out[0] if len(out) == 1 else torch.cat(out, dim=0)

    def whole_shape(self, which: int, name: str) -> tuple[int, ...]:
        """Shape of whole tensor `name` (0 model, 1 optimizer state), from the file headers alone."""
        shapes = [list(f.get_slice(stored).get_shape()) for f, stored in self._open_pieces(which, name)]
        if len(shapes) > 1:
            shapes[0][0] = sum(shape[0] for shape in shapes)
        return tuple(shapes[0])

    def read_whole(self, which: int, name: str) -> torch.Tensor:
        """Whole tensor `name` (0 model, 1 optimizer state)."""
        parts = [f.get_tensor(stored) for f, stored in self._open_pieces(which, name)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def load_model(self, model: nn.Module, rank: int = 0) -> None:
        """Load weights into `model` (tied weights restored through the module's own sharing); `rank`: the
        DiLoCo worker whose weights to load (see `model_state`)."""
        tensors = self.model_state(rank)
        # (the model was built from this checkpoint's config, or a resume's config was checked against the
        # run's: weights that do not fit it were not written for this checkpoint, e.g. a file copied in)
        advice = (
            "was it written for another model config? Use an earlier checkpoint "
            "(to resume from one: --checkpoint.resume_from step-NNNNNN)"
        )
        try:
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except RuntimeError as e:  # shape mismatches
            first = str(e).strip().splitlines()[-1].strip()
            raise CheckpointError(f"{self.weights_file(rank)} does not match the model ({first}); {advice}") from None
        # a tied weight is stored once (savable); the other name is legitimately "missing".
        shared = shared_names(model)
        missing = [k for k in missing if k not in shared]
        if missing or unexpected:
            raise CheckpointError(
                f"{self.weights_file(rank)} does not match the model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); {advice}"
            )

    def load_optimizer(
        self, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor] | None = None, rank: int = 0
    ) -> list[str]:
        """Restore the optimizer state from this checkpoint's tensors (a DiLoCo checkpoint: worker `rank`'s),
        or from `tensors` (flattened name -> tensor: each FSDP2 rank's rows, see `dist.load_optimizer_state`).

        The moments and step counts come from the checkpoint; the settings of each parameter group
        (weight decay, betas, eps, momentum, Muon's lr scale, ...) stay those `optimizer` was built with,
        i.e. the run's current config (torch's `load_state_dict` would bring back the saved ones, so a
        resume with a new --optim.weight_decay trained on with the old one while config.json said
        otherwise). Returns the settings that differ from the checkpoint's, as "name old -> new"."""
        if "optimizer" not in self.meta:  # weights only: `lmforge import` and `quantize` write such checkpoints
            raise CheckpointError(
                f"{self.path} holds weights only (no optimizer state), so it cannot resume training; to train "
                f"these weights further (continued pretraining, encoders too), start a new run from them: lmforge "
                f"pretrain --data DATA --out NEW_RUN --init-from {self.path.parent.parent}"
            )
        if tensors is None and "sharded" in self.meta:
            tensors = self._join_shards(1, self.meta["sharded"]["optim"], rank)
        elif tensors is None:
            tensors = _load_tensors(self.path / "optim.safetensors")
        configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        try:
            optimizer.load_state_dict(unflatten_optimizer(tensors, self.meta["optimizer"]))
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"{self.path} holds optimizer state that does not fit this optimizer ({e}); resume with the "
                "--optim settings it was trained with, or pass --overwrite to start over"
            ) from None
        changed: list[str] = []
        for group, settings in zip(optimizer.param_groups, configured, strict=True):
            for key, value in settings.items():
                old = group.get(key)
                same = list(old) == list(value) if isinstance(value, (list, tuple)) else old == value
                if not same and key not in ("lr", "initial_lr"):  # lr: set by the schedule every step
                    described = f"{key} {spelled(old)} -> {spelled(value)}"
                    if described not in changed:
                        changed.append(described)
                group[key] = value
        return changed


@contextlib.contextmanager
def _open_tensors(path: Path) -> Any:
    """`safe_open(path)` (lazy, sliceable), with a damaged file as a one-line CheckpointError."""
    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except FileNotFoundError:
        raise _missing(path) from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); use an earlier checkpoint") from None


def _missing(path: Path, advice: str = "") -> CheckpointError:
    """A checkpoint file that is not there: the whole folder deleted (pruned by a running training,
    see `reading_latest`) or just this file (an incomplete checkpoint)."""
    if not (path.parent / "state.json").is_file():
        return CheckpointError(
            f"{path.parent} was deleted while it was read (a training running in {path.parent.parent.parent} "
            "prunes old checkpoints); load the run directory or a newer checkpoint"
        )
    return CheckpointError(f"{path} is missing; the checkpoint is incomplete" + (f" — {advice}" if advice else ""))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise _missing(path) from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); use an earlier checkpoint") from None


def load_checkpoint(path: str | Path, *, verify: bool | Literal["weights", "state"] = True) -> Checkpoint:
    """Open a checkpoint folder (or a run directory's latest) and check its files (`"weights"`: only those
    a reader of the weights opens, see `Checkpoint.verify`; `"state"`: state.json alone, the caller verifies the
    files once it reads them)."""
    return reading_latest(path, lambda ckpt_dir: _open_checkpoint(ckpt_dir, verify=verify))


def _open_checkpoint(ckpt_dir: Path, *, verify: bool | Literal["weights", "state"]) -> Checkpoint:
    meta = read_json(ckpt_dir / "state.json", "the checkpoint is damaged; use an earlier one")
    if not isinstance(meta, dict):  # ("has checkpoint format None" sent the user looking for another lmforge)
        raise CheckpointError(
            f"{ckpt_dir / 'state.json'} is not a JSON object (damaged or edited by hand); use an earlier checkpoint"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version")
        raise CheckpointError(
            f"{ckpt_dir / 'state.json'} has checkpoint format {found!r}, this lmforge reads {FORMAT_VERSION}; "
            "use the lmforge version that wrote it"
        )
    if verify and "state_sha256" in meta and meta["state_sha256"] != state_sha256(meta):  # (older ones have none)
        raise CheckpointError(
            f"{ckpt_dir / 'state.json'} fails its checksum (damaged or edited by hand); use an earlier checkpoint"
        )
    _check_meta_types(meta, ckpt_dir / "state.json")
    ckpt = Checkpoint(ckpt_dir, meta)
    if verify and verify != "state":
        ckpt.verify(weights_only=verify == "weights")
    return ckpt


# The JSON type of each state.json entry lmforge reads (checked where present; "a.b" is entry b of entry a). A
# state.json without its checksum (an older one, or one rewritten by hand or by a script) holding another type
# was a traceback deep in a resume or a load ("'int' object has no attribute 'items'", "'>=' not supported
# between instances of 'str' and 'int'") instead of a line naming the file.
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "config": dict,
    "files": dict,
    "train_state": dict,
    "train_state.step": int,
    "train_state.tokens": int,
    "train_state.elapsed_s": (int, float),
    "loader": dict,
    "loader.epoch": int,
    "loader.cursor": int,
    "objective": dict,
    "optimizer": dict,
    "optimizer.state": dict,
    "optimizer.param_groups": list,
    "rng": dict,
    "rng.torch": str,
    "sharded": dict,
    "quantization": dict,
    "diloco": dict,
}
_JSON_TYPE_NAMES = {int: "an integer", dict: "an object", list: "a list", str: "a string"}


def _check_meta_types(meta: dict[str, Any], path: Path) -> None:
    """A one-line CheckpointError for a state.json entry of the wrong JSON type (see `_META_TYPES`)."""

    def wrong(key: str, expected: str, value: Any) -> CheckpointError:
        shown = json.dumps(value, ensure_ascii=False)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return CheckpointError(
            f"{path}: {key!r} should be {expected}, not {shown} (damaged or edited by hand); use an earlier checkpoint"
        )

    for key, types in _META_TYPES.items():
        parent, _, name = key.rpartition(".")
        holder = meta.get(parent) if parent else meta
        if not isinstance(holder, dict) or name not in holder:
            continue
        value = holder[name]
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            expected = "a number" if isinstance(types, tuple) else _JSON_TYPE_NAMES[types]
            raise wrong(key, expected, value)
    for name, info in meta.get("files", {}).items():
        if not (isinstance(info, dict) and type(info.get("bytes")) is int and isinstance(info.get("sha256"), str)):
            raise wrong(f"files.{name}", 'an object {"bytes": integer, "sha256": string}', info)
