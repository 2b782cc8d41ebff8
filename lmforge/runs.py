"""`lmforge runs [DIR]`: the runs under a folder and what state each is in; plus the run status file.

`pretrain` keeps `RUN_DIR/status.json`: `{"status": "running", "pid", "pid_start", "host", "started"}` when
training starts, rewritten to `finished`, `interrupted` or `failed` (with the stop reason or the
error) when it ends. A process that dies without a word (SIGKILL, the OOM killer, a power cut)
leaves "running" behind, so a reader decides in this order:

1. `status.json` says running: the run is *running* if its process is alive on this host (its pid is alive
   and started at `pid_start`: after a crash or a reboot the pid may be an unrelated process's;
   `atomic.process_alive`), on another host if `metrics.jsonl` was written in the last `STALE_S`
   seconds; else it *failed*.
2. `status.json` says finished / interrupted / failed: that.
3. No `status.json` (a run set up but killed before its loop began, a fine-tune killed in the evaluation
   before its training, runs from before status.json, imported models): *running* while a process on this
   host holds the run's `.lock` (the `claim`, taken before anything is written; env.json's `host` says the
   run is this host's); else the latest checkpoint's `stop_reason` (max_steps/time_budget/early_stop =
   finished, interrupted); else, with no checkpoint, *stopped* (before training began) when the lock is
   this host's to judge, and `unknown` when it is not (another host, no `.lock` or no `host`: no guess).

Besides *stopped* and *unknown*, the statuses are the four the table has always shown: a process that
ended without a word is *failed* like one that recorded an exception (status.json's `error`), though
nothing may be wrong with its settings; either resumes from its last complete checkpoint (a checkpoint
folder is complete or absent, never half-written). So under the table each failed, interrupted or stopped
run gets a line saying whether re-running its command resumes it (and from which checkpoint) or starts
it over, and, for a process that died without a word, that it did (killed: SIGKILL, the OOM killer, a power cut).

`finetune` keeps the same file. Everything else in the table comes from files the run already
has: `config.json` (preset, max_steps; for a fine-tuned run the settings in `finetune.json`, see
`run_config`), `metrics.jsonl` (steps, tokens, best validation loss) and `checkpoints/latest`. Those
files may be hand-edited or damaged: values of the wrong type read as missing, and a folder that
cannot be read at all is listed as *unreadable* with the reason under the table, so one bad run
never hides the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.atomic import FILE_LOCKS, process_alive, this_process, try_lock, write_json
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.fields import saved_config, saved_train
from lmforge.log import display_width, format_duration, read_metrics

STATUS_FILE = "status.json"
STALE_S = 600.0  # a run on another host that has not logged for this long is taken as dead
FINISHED_REASONS = ("max_steps", "time_budget", "early_stop")


def _latest_checkpoint(run_dir: Path) -> Path | None:
    from lmforge.checkpoint import latest_checkpoint  # imports torch (~1.5 s): only when a run needs it

    return latest_checkpoint(run_dir)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


LOCK_FILE = ".lock"
_claims: dict[Path, Any] = {}  # run folder -> its open lock file, held until this process ends


# what `pretrain` and `finetune` write into a run folder early on: a folder holding one of these is a run
RUN_MARKERS = ("checkpoints", STATUS_FILE, "env.json", "metrics.jsonl", "finetune.json")


def run_contents(folder: Path) -> list[Path]:
    """What a run folder holds besides its lock file ([]: no folder, or one holding the lock alone)."""
    folder = Path(folder)
    return [p for p in folder.iterdir() if p.name != LOCK_FILE] if folder.is_dir() else []


def has_run_markers(folder: Path) -> bool:
    """Whether `folder` holds something only `pretrain`/`finetune` write (RUN_MARKERS): a run (or one that
    started), which --overwrite may replace."""
    return any((Path(folder) / name).exists() for name in RUN_MARKERS)


def _remove(path: Path, *, ignore_errors: bool = False) -> None:
    """Delete a file, link or folder (`ignore_errors`: what of a folder cannot go stays, as `shutil.rmtree`)."""
    shutil.rmtree(path, ignore_errors=ignore_errors) if path.is_dir() and not path.is_symlink() else path.unlink()


def check_run_out(
    out: Path, read: list[Path], *, overwrite: bool, read_files: list[Path] = (), data_dirs: list[Path] = ()
) -> None:
    """`pretrain`/`finetune --out` before anything in it changes: never what the command reads, and
    --overwrite deletes only a run.

    `out` may not be or hold a folder in `read` or `data_dirs` (the data, the base run or checkpoint, a teacher):
    training writes into it, and --overwrite would delete it. Nor may it be inside one of `data_dirs` (prepared
    data): `prepare --out D --overwrite`, which the error for an existing D suggests, replaces D whole and deleted
    a run in D/run with it, checkpoints and all. With --overwrite it may not hold a file
    in `read_files` (the task files) either, and a non-empty folder that is not an lmforge run (no
    checkpoints/, status.json, ...) is refused instead of deleted, as `prepare` refuses one that is not
    prepared data. Nor may `out` lie inside a run (`check_not_in_run`), or --overwrite replace one holding another
    run (`check_holds_no_run`).

    Raises:
        ConfigError: a one-line error that says which --out to choose instead.
    """
    out = Path(out)
    where = out.resolve()
    # a file on the way (--out notes.txt, --out notes.txt/run) said "[Errno 20] Not a directory: .../.lock"
    blocker = next((p for p in [out, *out.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        what = "is a file" if blocker == out else f"cannot be made: {blocker} is a file"
        raise ConfigError(f"--out {out} {what}, not a folder; choose another --out")
    for data in data_dirs:
        if Path(data).resolve() in where.parents:
            raise ConfigError(
                f"--out {out} is inside the prepared data {data}, which 'lmforge prepare --out {data} --overwrite' "
                f"replaces whole, this run with it; choose an --out outside it (e.g. runs/{where.name})"
            )
    for source in [*read, *data_dirs, *(read_files if overwrite else [])]:
        src = Path(source).resolve()
        if where == src or where in src.parents:
            what = "is" if where == src else "holds"
            raise ConfigError(
                f"--out {out} {what} {source}, which this command reads (training writes into --out, and "
                "--overwrite deletes it); choose another --out"
            )
    check_not_in_run(out)
    if overwrite and run_contents(out) and not has_run_markers(out):
        raise ConfigError(
            f"refusing to overwrite {out}: it is not an lmforge run (no checkpoints/ or status.json), and "
            "--overwrite would delete everything in it; choose another --out"
        )
    if overwrite:
        check_holds_no_run(out)


def _beside(folder: Path, inner: Path) -> Path:
    """Where `inner`, inside `folder`, goes instead: beside `folder`, named after both (runs/base/sft: base-sft)."""
    return folder.parent / "-".join([folder.name, *inner.relative_to(folder).parts])


def check_not_in_run(out: Path, *, error: type[LmforgeError] = ConfigError) -> None:
    """An --out that a command makes (a run, a model or data folder) may not lie inside a run folder.

    `lmforge finetune runs/base --out runs/base/sft` trained into the base run: `pretrain`/`finetune --overwrite`
    of runs/base (or `import`/`quantize --overwrite` into it) then deleted the fine-tune with it (`lmforge runs`
    lists such a run, made before this check, as base/sft: `_runs_in_run`). Files a command writes about a run
    (`report`, `generate --out`, a .gguf) may sit in it; they are not checked here.
    """
    out = Path(out)
    where = out.resolve()
    typed = {p.resolve(): p for p in out.parents}  # (the run as the user wrote it, where they did)
    run = next((p for p in where.parents if is_run_dir(p)), None)
    if run is None:
        return
    shown = typed.get(run, run)
    shown = shown if shown.name not in ("", "..") else run  # (--out sft run in runs/base: not "-sft")
    beside = _beside(shown, shown / where.relative_to(run))
    fix = (
        f"move it beside it (mv {out} {beside})" if run_contents(out) else f"choose an --out beside it (e.g. {beside})"
    )
    raise error(f"--out {out} is inside the run {shown}, which '--overwrite' of {shown} would delete with it; {fix}")


def runs_inside(folder: Path) -> list[Path]:
    """Runs in `folder` below itself (`find_runs` of each sub-folder: up to 3 levels down), sorted by path; not a
    fine-tune's own `base/`, the HF base it imported (`adapt.load.load_base`), which is part of it."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    own_base = _own_base(folder)
    return [
        r
        for p in sorted(folder.iterdir())
        if p.is_dir() and not p.name.startswith(".") and p != own_base
        for r in find_runs(p, max_depth=2)
    ]


def _own_base(run_dir: Path) -> Path | None:
    """A fine-tune's `base/`: the HF model it imported (`adapt.load.load_base`), part of it, not a run of its own."""
    return run_dir / "base" if (run_dir / "finetune.json").is_file() else None


def check_holds_no_run(out: Path, *, error: type[LmforgeError] = ConfigError) -> None:
    """`--overwrite` replaces `out` whole: refused while another run lies inside it (`prepare --out D` holding
    `pretrain --out D/run`, a run holding a fine-tune trained into it), which would go with it, checkpoints and all.
    """
    runs = runs_inside(out)
    if runs:
        more = f" (and {len(runs) - 1} more)" if len(runs) > 1 else ""
        raise error(
            f"refusing to overwrite {out}: it holds the training run {runs[0]}{more}, which --overwrite would delete; "
            f"move it out of {out} first (e.g. mv {runs[0]} {_beside(Path(out), runs[0])}), or choose another --out"
        )


@dataclass
class _Claim:
    handle: Any  # the open RUN/.lock, flock-ed
    made: Path | None  # the topmost folder the claim created (RUN itself or a parent); None: RUN existed
    made_lock: bool  # the claim created RUN/.lock
    aside: Path | None = None  # where --overwrite moved the old run until the new one starts (set_aside)


def claim(run_dir: Path) -> None:
    """Refuse to train `run_dir` while another live process trains it; then hold it for this process.

    Two trainings in one folder would write each other's checkpoints and metrics. The check is an
    exclusive `flock` on RUN/.lock, which the OS releases however the holder ends (killed included), so
    no stale lock is ever left (a status.json left "running" by a killed run is no obstacle); where
    `fcntl` is missing (Windows), a running status.json whose process is alive on this host is the check.
    Call it before anything in the folder changes (--overwrite too). The lock file may be removed by
    `release` (a run that never started) or `--overwrite`, so a lock taken on a file that is no longer
    RUN/.lock is let go and taken again on the new one: two processes never hold different files.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _claims:
        return
    busy = ConfigError(
        f"{run_dir} is being trained by another process right now ({_holder(run_dir)}); wait for it to end or "
        "stop it, or pass another --out"
    )
    if not FILE_LOCKS:  # (Windows) a live process in status.json (one that is not this one) is the sign
        if run_status(run_dir) == "running" and not _is_this_process(read_json_object(run_dir / STATUS_FILE) or {}):
            raise busy
        return
    lock = run_dir / LOCK_FILE
    for _ in range(100):  # each retry means another process's `release` removed the folder or its lock just now
        try:
            made = _make_dirs(run_dir)
            handle, made_lock = _open_lock(lock)
        except FileNotFoundError:  # a folder on the way went between our mkdir calls and open
            continue
        if not try_lock(handle):
            handle.close()
            raise busy
        try:
            current = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock))
        except FileNotFoundError:
            current = False
        if current:
            _claims[run_dir] = _Claim(handle, made, made_lock)
            return
        handle.close()
    raise busy


def being_trained(run_dir: Path) -> bool:
    """Whether a live process trains `run_dir` now (holds the `claim` lock on RUN/.lock); nothing is taken.

    `export`, `import` and `quantize --overwrite` ask it: they replaced a run folder that a live `pretrain`
    was writing, which then went on writing checkpoints into the export."""
    lock = Path(run_dir) / LOCK_FILE
    if not lock.is_file():
        return False
    if not FILE_LOCKS:  # (Windows) a running status.json is the sign, as in `claim`
        return run_status(Path(run_dir)) == "running"
    with open(lock, "a+", encoding="utf-8") as handle:  # (closing it lets go of the lock a probe took)
        return not try_lock(handle)


def _make_dirs(path: Path) -> Path | None:
    """`mkdir -p path`; the topmost folder it created under which every folder is its own (None: none)."""
    made: Path | None = None
    for folder in reversed([path, *path.parents]):
        if folder.is_dir():  # there already (below one made here: another process made it just now)
            made = None
            continue
        try:
            folder.mkdir()
            made = made or folder
        except FileExistsError:  # another process made it just now: it and what holds it are not ours alone
            made = None
    return made


def _open_lock(lock: Path) -> tuple[Any, bool]:
    """RUN/.lock opened for flock, and whether this call created it."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        made = True
    except FileExistsError:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        made = False
    return os.fdopen(fd, "a+"), made


def set_aside(run_dir: Path) -> None:
    """--overwrite: move what a claimed RUN holds (but its lock) into a hidden sibling folder, not delete it.

    The new run may still be refused during its setup (a resume flag, a data or model problem): `release`
    then puts the old run back as it was. Once the new run writes its first files, `discard_aside`
    deletes it. (A process killed in between leaves it in `.RUN.lmforge-old-*` beside RUN, not lost.)
    Where no lock could be taken (no `fcntl`), the old run is deleted at once, as before.
    """
    run_dir = Path(run_dir).resolve()
    held = _claims.get(run_dir)
    children = run_contents(run_dir)
    if held is None:
        for child in children:
            _remove(child)
        return
    aside = run_dir.parent / f".{run_dir.name}.lmforge-old-{os.getpid()}-{time.monotonic_ns()}"
    aside.mkdir()
    for child in children:
        os.rename(child, aside / child.name)  # a sibling: the same filesystem, each move atomic
    held.aside = aside


def discard_aside(run_dir: Path) -> None:
    """The new run has started in RUN: delete the old one `set_aside` kept."""
    held = _claims.get(Path(run_dir).resolve())
    if held is not None and held.aside is not None:
        shutil.rmtree(held.aside, ignore_errors=True)
        held.aside = None


def _restore_aside(run_dir: Path, aside: Path) -> None:
    """Put back the old run `set_aside` moved out, removing what the refused new run left in RUN."""
    for child in run_contents(run_dir):
        _remove(child, ignore_errors=True)
    for child in aside.iterdir():
        os.rename(child, run_dir / child.name)
    aside.rmdir()


def release(run_dir: Path) -> None:
    """Let go of a `claim` (the process ending does the same).

    A run that never started, whose folder holds none of RUN_MARKERS (it failed or was refused before
    writing anything), leaves nothing the claim made: the folder, when the claim created it (with what
    the run put there, e.g. fine-tuning's imported base/), and the empty parents it created; else the
    .lock file, when the claim created it. Nothing that was there before the claim is touched. A run
    that --overwrite was to replace (`set_aside`) and that never started gets the old run back.
    """
    run_dir = Path(run_dir).resolve()
    held = _claims.pop(run_dir, None)
    if held is None:
        return
    try:  # (still holding the lock: no other process may start in the folder while it goes)
        if held.aside is not None:  # --overwrite, and the new run never started: the old one comes back
            _restore_aside(run_dir, held.aside)
        elif not has_run_markers(run_dir):
            if held.made is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
                for folder in [run_dir, *run_dir.parents]:  # the parents the claim made, if nothing else is there
                    if folder.is_dir():
                        try:
                            folder.rmdir()
                        except OSError:
                            break
                    if folder == held.made:
                        break
            elif held.made_lock:
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
    finally:
        held.handle.close()


def _holder(run_dir: Path) -> str:
    info = read_json_object(run_dir / STATUS_FILE) or {}
    return f"pid {info['pid']} on {info.get('host', '?')}" if "pid" in info else "see its status.json"


def _is_this_process(info: dict[str, Any]) -> bool:
    """Whether status.json names this process (a file without `pid_start`: by its pid alone)."""
    me = this_process()
    return info.get("pid") == me["pid"] and info.get("pid_start", me.get("pid_start")) == me.get("pid_start")


def mark_running(run_dir: Path) -> None:
    """Record that this process is training `run_dir` (called by `pretrain` before the loop)."""
    write_json(Path(run_dir) / STATUS_FILE, {"status": "running", **this_process(), "started": _now()})


def mark_stopped(run_dir: Path, status: str, *, stop_reason: str = "", error: str = "") -> None:
    """Record how training ended: "finished", "interrupted" or "failed".

    An error while recording "failed" or "interrupted" is dropped: the run is already stopping on an error (a full
    disk's, often), whose line says what to do, and this one replaced it. (`lmforge runs` then tells the dead
    process by its pid.)"""
    path = Path(run_dir) / STATUS_FILE
    info = read_json_object(path) or {}
    info.update(status=status, stop_reason=stop_reason, ended=_now())
    if error:
        info["error"] = error
    with contextlib.nullcontext() if status == "finished" else contextlib.suppress(OSError):
        write_json(path, info)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None where it is missing, unreadable or not an object (`runs`, `report`)."""
    try:  # utf-8-sig: a config.json saved by a Windows editor starts with a BOM (pretrain reads it so too)
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _section(data: dict[str, Any] | None, key: str) -> dict[str, Any]:
    """`data[key]` when it is an object, else {}: a hand-edited `"train": null` reads as no settings."""
    value = (data or {}).get(key)
    return value if isinstance(value, dict) else {}


def _number(value: Any, default: Any = 0.0) -> Any:
    """`value` when it is a finite number (not a bool), else `default`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else default


def run_status(run_dir: Path) -> str:
    """running, finished, interrupted, failed or unknown (see the module docstring for the rules)."""
    return _status(run_dir)[0]


KILLED = "killed"  # RunSummary.failure of a run whose process died without a word


def _status(run_dir: Path) -> tuple[str, str]:
    """`run_status` and, for a failed run, why (`RunSummary.failure`): read once, where the status is decided."""
    run_dir = Path(run_dir)
    info = read_json_object(run_dir / STATUS_FILE)
    if info is not None:
        status = info.get("status", "unknown")
        if not isinstance(status, str) or not status:
            return "unknown", ""
        if status != "running":
            error = info.get("error")
            return status, error.splitlines()[0] if status == "failed" and isinstance(error, str) and error else ""
        if info.get("host") == socket.gethostname():
            alive = process_alive(info)
        else:
            metrics = run_dir / "metrics.jsonl"
            alive = metrics.is_file() and time.time() - metrics.stat().st_mtime < STALE_S
        return ("running", "") if alive else ("failed", KILLED)
    # No status.json: a run set up (config.json, env.json) but killed before its loop began, a fine-tune killed
    # during its evaluation before training, or one from before status.json. The claim lock on RUN/.lock says
    # whether a process holds the run now: it is taken before anything is written and let go however the
    # process ends. It speaks for a process on this host (env.json's `host`); elsewhere, or for a run that
    # recorded no host, what remains is unknown.
    local = (
        FILE_LOCKS
        and (run_dir / LOCK_FILE).is_file()
        and (read_json_object(run_dir / "env.json") or {}).get("host") == socket.gethostname()
    )
    if local and being_trained(run_dir):
        return "running", ""
    ckpt = _latest_checkpoint(run_dir)
    meta = read_json_object(ckpt / "state.json") if ckpt else None
    reason = _section(meta, "train_state").get("stop_reason", "")
    if reason in FINISHED_REASONS:
        return "finished", ""
    if reason == "interrupted":
        return "interrupted", ""
    return ("stopped", "") if local and ckpt is None else ("unknown", "")


def run_kind(run_dir: Path, checkpoint_meta: dict[str, Any] | None) -> str:
    """What made the run, as `lmforge runs` and `report` show it: "pretrain", "imported", "finetune TASK ADAPT"
    or "distill TASK" (finetune.json), then ", int8" / ", int4" for a `quantize` copy (its checkpoint's
    `quantization`). A quantized copy, a fine-tune and its distilled student otherwise read alike: same preset,
    same steps, and a quantized copy the same config as its original."""
    info = read_json_object(Path(run_dir) / "finetune.json")
    meta = checkpoint_meta if isinstance(checkpoint_meta, dict) else {}
    if info is not None:
        task, adapt = info.get("task"), info.get("adapt")
        task = task if isinstance(task, str) else "?"
        kind = (
            f"distill {task}" if adapt == "distill" else f"finetune {task} {adapt if isinstance(adapt, str) else '?'}"
        )
    else:
        kind = "imported" if "imported_from" in meta else "pretrain"
    quant = _section(meta, "quantization")
    bits = quant.get("bits") if quant else None
    if quant:
        kind += f", int{bits}" if isinstance(bits, int) and not isinstance(bits, bool) else ", quantized"
    return kind


# What metrics.jsonl's loss and val_loss are per: a pretraining run's (and a clm fine-tune's) are the corpus
# cross-entropy per token; a fine-tune of another task logs its task loss on its --val file, which is not that loss
# (a classify run's is per example, over its classes), so one "best val loss" column held numbers of different kinds
TOKEN_LOSS = "nats/token"
TASK_LOSS_UNITS = {
    "sft": "nats/answer token",  # -100 on the prompt: only the answer's tokens are scored
    "qa": "nats/answer token",
    "translate": "nats/answer token",
    "classify": "nats/example",  # cross-entropy over the classes
    "dpo": "DPO loss/pair",
}


# An encoder's pretraining loss is not per token of the corpus either: MLM scores only the selected (masked, ~15%)
# positions, and mlm+nsp/sop and ELECTRA log the sum of two means (objectives.py, eval/objectives.py): MLM per masked
# token + NSP/SOP per sentence pair, or the generator's MLM per masked token + rtd_weight x the discriminator's RTD
# per real token (ELECTRA's 40.49 was 5.99 + 50 x 0.69, labelled nats/token). "{rtd_weight}": the run's weight.
OBJECTIVE_LOSS_UNITS = {
    "mlm": "nats/masked token",
    "mlm+nsp": "MLM nats/masked token + NSP nats/pair",
    "mlm+sop": "MLM nats/masked token + SOP nats/pair",
    "electra": "MLM nats/masked token + {rtd_weight} x RTD nats/token",
}


def loss_unit(run_dir: Path) -> str:
    """What a run's loss and val_loss are per: a fine-tune's TASK_LOSS_UNITS (finetune.json's task), an encoder
    pretraining's OBJECTIVE_LOSS_UNITS (config.json's objective), else TOKEN_LOSS."""
    task = (read_json_object(Path(run_dir) / "finetune.json") or {}).get("task")
    if isinstance(task, str):
        return TASK_LOSS_UNITS.get(task, TOKEN_LOSS)
    objective = _section(read_json_object(Path(run_dir) / "config.json"), "objective")
    name = objective.get("name")
    unit = OBJECTIVE_LOSS_UNITS.get(name, TOKEN_LOSS) if isinstance(name, str) else TOKEN_LOSS
    return unit.format(rtd_weight=f"{_number(objective.get('rtd_weight'), 50.0):g}")  # (ObjectiveConfig's default)


def with_unit(loss: str, unit: str) -> str:
    """A formatted loss as the `runs` table and the report show it: TOKEN_LOSS bare, another unit after it."""
    return loss if unit in ("", TOKEN_LOSS) else f"{loss} ({unit})"


def is_finetune_kind(kind: str) -> bool:
    """Whether a `run_kind` is a fine-tuned run's (one with finetune.json: `finetune ...` or `distill ...`)."""
    return kind.startswith(("finetune ", "distill "))


@dataclass
class RunSummary:
    name: str
    path: str
    preset: str
    status: str
    step: int
    max_steps: int
    tokens: int
    best_val_loss: float | None
    elapsed_s: float
    last_checkpoint: str
    error: str = ""  # why the run could not be read (status "unreadable")
    # a failed run: the first line of the error it recorded, or KILLED (its process died without a word)
    failure: str = ""
    command: str = ""  # env.json's: the shell line that started it, and resumes it (run in `cwd`)
    cwd: str = ""
    kind: str = ""  # run_kind: pretrain, imported, finetune TASK ADAPT, distill TASK; ", int8"/", int4": quantized
    loss_unit: str = ""  # loss_unit: what best_val_loss is per (nats/token; a fine-tune's task loss: nats/example, ...)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# next to config.json: a run (is_run_dir)
RUN_FILES = ("metrics.jsonl", "checkpoints", STATUS_FILE, "env.json")


def is_run_dir(path: Path) -> bool:
    """A folder with config.json and metrics.jsonl, checkpoints/, status.json or env.json is a run.

    status.json counts: a run in its first `log_every` steps (minutes, for a big model on a CPU) has no
    metrics.jsonl yet, and `lmforge runs` left it out while `report --watch` refused it as "not a run".
    env.json too: pretrain and finetune write it with config.json, before the setup (data, model, compile)
    that may take minutes; a run killed there was no run at all."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / name).exists() for name in RUN_FILES)


def find_runs(root: Path, *, max_depth: int = 3) -> list[Path]:
    """Run directories at or under `root`, sorted by path; inside a run, only its sub-folders that are runs too
    (`_runs_in_run`)."""
    root = Path(root)
    if is_run_dir(root):
        return [root, *_runs_in_run(root)]
    found: list[Path] = []
    if max_depth > 0 and root.is_dir():
        for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found.extend(find_runs(child, max_depth=max_depth - 1))
    return found


def _runs_in_run(run_dir: Path, *, max_depth: int = 3) -> list[Path]:
    """Runs trained into `run_dir`'s own folder (older lmforge took `finetune runs/base --out runs/base/sft`, which
    `lmforge runs` then never listed), and the runs in those, sorted by path. Only a run's direct sub-folders that
    are runs themselves are looked at: its checkpoints/, a data folder, or a fine-tune's own base/ (part of it) are
    never walked. `max_depth` bounds the nesting (a symbolic link back up would otherwise never end)."""
    if max_depth <= 0:
        return []
    skip = {run_dir / "checkpoints", _own_base(run_dir)}
    found: list[Path] = []
    for child in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p not in skip):
        if is_run_dir(child):
            found += [child, *_runs_in_run(child, max_depth=max_depth - 1)]
    return found


FINETUNE_SECTIONS = ("train", "optim", "eval", "checkpoint")


def run_config(run_dir: Path) -> dict[str, Any]:
    """The settings `run_dir` trained with, as a nested dict like config.json.

    A fine-tuned run's config.json is its base's config (it describes the architecture that
    `eval`, `export` and `chat` rebuild), so its train/optim/eval/checkpoint sections, data and
    objective are the base's, not this run's. For such a run (one with finetune.json) the answer is
    the base's preset and model, a `finetune` section (base, task, adapt and their settings), and
    the run's own sections from finetune.json; sections an older finetune.json did not record are
    left out rather than shown with the base's numbers.
    """
    run_dir = Path(run_dir)
    # read by its config_version, as training reads it: a config saved before version 2 with min_lr 0 decayed to
    # lr / 10, as min_lr unset does now (`report` showed the two as a difference); the version itself is no setting
    config = saved_config(read_json_object(run_dir / "config.json") or {})
    info = read_json_object(run_dir / "finetune.json")
    if info is None:
        return config
    out: dict[str, Any] = {k: config[k] for k in ("preset", "model") if k in config}
    out["finetune"] = {"base": info.get("base"), **_section(info, "finetune_config")}
    out.update({k: info[k] for k in FINETUNE_SECTIONS if isinstance(info.get(k), dict)})
    if "train" in out:  # (finetune.json's config_version is its train section's)
        out["train"] = saved_train(out["train"], info.get("config_version"))
    return out


def summarize(run_dir: Path, *, root: Path | None = None) -> RunSummary:
    """One row of `lmforge runs` from the files of one run directory."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")  # only objects with a numeric step and numeric values
    train = [r for r in records if "loss" in r]
    # finite only: min() keeps a NaN that comes first
    vals = [r["val_loss"] for r in records if "val_loss" in r and math.isfinite(r["val_loss"])]
    ckpt = _latest_checkpoint(run_dir)
    meta = read_json_object(ckpt / "state.json") if ckpt else {}
    state = _section(meta, "train_state")
    # an imported model's config holds the default max_steps (1000) it was never trained towards: "0", not "0/1000"
    imported = isinstance(meta, dict) and "imported_from" in meta and not train
    last = train[-1] if train else {}
    name = str(run_dir.relative_to(root)) if root and run_dir != root else run_dir.name
    status, failure = _status(run_dir)
    env = read_json_object(run_dir / "env.json")
    env = env if isinstance(env, dict) else {}
    return RunSummary(
        name=name,
        path=str(run_dir),
        preset=str(config.get("preset") or ""),
        status=status,
        step=int(max(_number(last.get("step")), _number(state.get("step")))),
        max_steps=0 if imported else int(_number(_section(config, "train").get("max_steps"))),
        tokens=int(max(_number(last.get("tokens")), _number(state.get("tokens")))),
        best_val_loss=min(vals) if vals else _number(state.get("best_val_loss"), None),
        elapsed_s=float(
            max(_number(records[-1].get("elapsed_s")) if records else 0.0, _number(state.get("elapsed_s")))
        ),
        last_checkpoint=ckpt.name if ckpt else "",
        failure=failure,
        command=str(env.get("command") or ""),
        cwd=str(env.get("cwd") or ""),
        kind=run_kind(run_dir, meta),
        loss_unit=loss_unit(run_dir),
    )


def list_runs(root: str | Path = "runs") -> list[RunSummary]:
    """Summaries of every run at or under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass the folder that holds your run directories (e.g. runs/)")
    return [_summarize_or_unreadable(p, root) for p in find_runs(root)]


def _summarize_or_unreadable(run_dir: Path, root: Path) -> RunSummary:
    """`summarize`, or an "unreadable" row saying why: one damaged folder must not hide the others."""
    try:
        return summarize(run_dir, root=root)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
        return RunSummary(
            name=name,
            path=str(run_dir),
            preset="",
            status="unreadable",
            step=0,
            max_steps=0,
            tokens=0,
            best_val_loss=None,
            elapsed_s=0.0,
            last_checkpoint="",
            error=f"{type(e).__name__}: {e}"[:200],
        )


def format_runs(runs: list[RunSummary]) -> str:
    """A plain-text table, one run per line, then a line for each unreadable, failed or interrupted run; from
    the summaries alone (no files read)."""
    header = ["run", "kind", "preset", "status", "steps", "tokens", "best val loss", "time", "last checkpoint"]
    rows = [
        [
            r.name,
            r.kind or "-",
            r.preset or "-",
            r.status,
            f"{r.step}/{r.max_steps}" if r.max_steps else str(r.step),
            f"{r.tokens:,}",
            with_unit(f"{r.best_val_loss:.4f}", r.loss_unit) if r.best_val_loss is not None else "-",
            format_duration(r.elapsed_s),
            r.last_checkpoint or "-",
        ]
        for r in runs
    ]
    widths = [max(display_width(row[i]) for row in [header, *rows]) for i in range(len(header))]  # 运行: 4 columns
    lines = [
        "  ".join(cell + " " * (w - display_width(cell)) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines += [f"{r.name}: unreadable ({r.error})" for r in runs if r.error]
    lines += [f"{r.name}: {_stop_note(r)}" for r in runs if r.status in ("failed", "interrupted", "stopped")]
    return "\n".join(lines)


def _stop_note(run: RunSummary) -> str:
    """How a failed or interrupted run ended, and what re-running its command does: the question a user
    has about it."""
    how = run.status
    if run.status == "stopped":
        how = "stopped before training began (no status.json, and no process on this host holds its .lock)"
    elif run.failure == KILLED:
        how = "failed: its process died without a word (killed: SIGKILL, the OOM killer, a power cut)"
    elif run.failure:
        how = f"failed: {run.failure}"
    # env.json of a run before 'command' was recorded has only argv, whose argv[0] may be lmforge/__main__.py
    command = f"`{run.command}` in {run.cwd}" if run.command else "its command (argv in its env.json)"
    if run.last_checkpoint:
        return f"{how}; re-run {command} to resume from {run.last_checkpoint}"
    return f"{how}; it saved no checkpoint, so re-running {command} starts it over"
