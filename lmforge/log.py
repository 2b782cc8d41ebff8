"""Console logging, the metrics.jsonl writer, and env.json capture.

One fixed-format line per interval (`step 120/2000 | loss 3.2104 | lr 3.0e-04 | 11.8k tok/s |
mfu 0.4% | eta 0:05:12`) goes to stdout through tqdm (so it does not break the progress bar on
stderr), and the same numbers go to `metrics.jsonl`, one JSON object per line, flushed at once so a
killed run keeps everything it logged.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmforge.atomic import atomic_write_text, naming


def json_text(value: Any) -> str:
    """`value` as strict JSON for a command's `--json` output: a NaN or infinite float (an MLM evaluation with no
    masked token, a diverged loss) becomes null, which jq and JavaScript read; Python's NaN/Infinity they do not."""

    def strict(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [strict(x) for x in v]
        return v

    return json.dumps(strict(value), ensure_ascii=False, allow_nan=False)


def display_width(text: str) -> int:
    """Terminal columns of `text`: wide and fullwidth characters (CJK) take two, so tables pad by this."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def format_duration(seconds: float) -> str:
    """H:MM:SS ("3 days, 4:05:06"); beyond timedelta's 999,999,999 days (an eta of --train.max_steps 1e23, which
    raised OverflowError mid-run) in years, and "?" for a non-finite one."""
    if not math.isfinite(seconds):
        return "?"
    if seconds >= 8.6e13:
        return f"{seconds / 31_557_600:.3g} years"
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def format_rate(tokens_per_s: float) -> str:
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s:.0f}"


def format_record(record: dict[str, Any], max_steps: int) -> str:
    """The console line for a metrics record."""
    parts = [f"step {record['step']}/{max_steps}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "val_loss" in record:
        parts.append(f"val_loss {record['val_loss']:.4f}")
        # encoders, classifiers and DPO have no bpb
        for key in (
            "val_bpb",
            "val_mlm_accuracy",
            "val_nsp_accuracy",
            "val_rtd_auc",
            "val_accuracy",
            "val_reward_accuracy",
        ):
            if key in record:
                parts.append(f"{key} {record[key]:.4f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.1e}")
    if "tokens_per_s" in record:
        parts.append(f"{format_rate(record['tokens_per_s'])} tok/s")
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if "eta_s" in record:
        parts.append(f"eta {format_duration(record['eta_s'])}")
    return " | ".join(parts)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (killed mid-write) is skipped.

    Lines are decoded one at a time from bytes: a write cut inside a multi-byte character (a sample
    in Chinese, say) leaves invalid UTF-8, which must cost only that line, not the whole file.

    The file is also read by `runs`, `report` and resume, which do arithmetic on what it holds, and
    it can be edited by hand or by other tools. So every record returned is a JSON object with a
    finite numeric `step` (other lines are skipped), and a value of the wrong type (a null or string
    loss, a non-string sample) is dropped as if it had never been logged (see `clean_record`).
    """
    records = []
    if not path.is_file():
        return records
    with open(path, "rb") as f:
        for line in f:
            try:
                record = clean_record(json.loads(line.decode("utf-8-sig")))  # (a BOM cost the first record)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if record is not None:
                records.append(record)
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def clean_record(record: Any) -> dict[str, Any] | None:
    """`record` with only well-typed values, or None when it is not a metrics record at all.

    What the logger writes: numbers (NaN and infinities included), `loss_spike` and `interrupted` as bools and
    the evaluation `sample` as a string. Anything else under a key is dropped.
    """
    if not isinstance(record, dict) or not _is_number(record.get("step")) or not math.isfinite(record["step"]):
        return None
    out = {}
    for key, value in record.items():
        if key == "sample":
            ok = isinstance(value, str)
        elif key in ("loss_spike", "interrupted"):
            ok = isinstance(value, bool)
        else:
            ok = _is_number(value)
        if ok:
            out[key] = value
    return out


def truncate_metrics(path: Path, max_step: int) -> None:
    """Keep only records up to `max_step` (used on resume, so the file matches a straight run), and none that a
    run stopped early (Ctrl-C, SIGTERM, its time budget) logged at the step it stopped on, off the log or eval
    interval (marked `interrupted`)."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= max_step and not r.get("interrupted")]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


# loss.png is redrawn at an evaluation at most this often (and always at the end): a draw costs 0.3-1 s of
# matplotlib on a 2-core CPU, which a short run evaluating every few seconds paid at each evaluation
PLOT_EVERY_S = 30.0


def say(message: str) -> None:
    """Print a training run's console line on stdout (above the progress bar), surviving a reader that left."""
    try:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # `lmforge pretrain ... | head`: the reader left, the run goes on
        stdout_left()


def stdout_left() -> None:
    """The reader of stdout left (`| head`, a pager quit): point stdout at /dev/null and say so once on stderr.

    A training run's console lines are a view of metrics.jsonl, not its result: a BrokenPipeError from one used to
    end the run with exit 141 and no word, its steps since the last checkpoint lost (a finished run its final
    checkpoint). Now it trains on; the lines it would print are in metrics.jsonl."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the buffered line flushes there too)
    print(
        "note: stdout was closed (its reader, e.g. `| head`, left); the run goes on, its log lines in metrics.jsonl",
        file=sys.stderr,
        flush=True,
    )


class RunLogger:
    """Progress bar + console lines + metrics.jsonl for one run (only the main process logs)."""

    def __init__(
        self,
        metrics_path: Path | None,
        *,
        max_steps: int,
        start_step: int,
        enabled: bool = True,
        console: bool = True,
        plot_path: Path | None = None,
        trackers: list[Any] | None = None,
    ) -> None:
        self.enabled = enabled  # False on non-main processes: nothing is written anywhere
        self.console = enabled and console  # False for --quiet: metrics.jsonl and loss.png are still written
        self.max_steps = max_steps
        self.metrics_path = metrics_path
        self.plot_path = plot_path  # loss.png, redrawn at evaluation records (PLOT_EVERY_S) and at the end
        self.unplotted = False  # records written since loss.png was drawn (a run without a val split: all)
        self.plotted_at = time.monotonic()  # a run shorter than PLOT_EVERY_S draws it once, at the end
        self.plot_warned = False  # a failed redraw is said once per run
        self.trackers = trackers or []  # lmforge.trackers: TensorBoard/W&B/MLflow get the same records
        self.file = open(metrics_path, "a", encoding="utf-8") if (enabled and metrics_path) else None  # noqa: SIM115
        self.bar = tqdm(
            total=max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not self.console or None,  # None: off when stderr is not a terminal
            leave=False,
        )

    def info(self, message: str) -> None:
        if self.console:
            say(message)

    def metrics(self, record: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        if self.file:
            with naming(self.metrics_path):
                self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.file.flush()
        for tracker in self.trackers:
            tracker.log(record)
        if echo:
            self.info(format_record(record, self.max_steps))
        if "val_loss" in record and time.monotonic() - self.plotted_at >= PLOT_EVERY_S:
            self.plot()
        else:
            self.unplotted = True

    def plot(self, *, then: str = "training goes on", quiet: bool = False) -> None:
        """Redraw loss.png. A redraw that fails (a full disk, a file-size limit, a folder in its way) is one warning
        on stderr ending in `then`, not the run's error: the run's work is its checkpoints and metrics.jsonl, and a
        run whose final checkpoint was saved exited 2 for the loss.png it could not redraw after it. `quiet`: say
        nothing (the run is failing with its own error line)."""
        if self.enabled and self.plot_path and self.metrics_path:
            from lmforge.report import plot_loss

            try:
                plot_loss(self.metrics_path, self.plot_path)
            except OSError as e:
                if not (quiet or self.plot_warned):
                    self.plot_warned = True
                    reason = e.strerror or str(e)
                    tqdm.write(f"warning: could not redraw {self.plot_path}: {reason}; {then}", file=sys.stderr)
        self.unplotted = False
        self.plotted_at = time.monotonic()

    def advance(self, n: int = 1) -> None:
        if self.console:
            self.bar.update(n)

    def rewind(self, step: int) -> None:
        """Drop metrics.jsonl records after `step` (a rollback) and keep appending to the new file; TensorBoard
        drops its events after `step` too."""
        for tracker in self.trackers:
            tracker.rewind(step)
        if not self.file or self.metrics_path is None:
            return
        self.file.close()
        truncate_metrics(self.metrics_path, step)
        self.file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self.bar.n = step
        self.bar.refresh()

    def close(self, *, failing: bool = False) -> None:
        """Draw the last records, close metrics.jsonl and the trackers (a second call does nothing). `failing`: the
        run is stopping on an error, which a failed write here must not replace: a full disk turned a checkpoint's
        "could not write checkpoint step-000006 ...; re-run the same command to resume from step-000004" into a bare
        "[Errno 28] No space left on device" from redrawing loss.png on the way out."""
        quiet = (lambda: contextlib.suppress(OSError)) if failing else contextlib.nullcontext
        self.bar.close()
        if self.unplotted:  # the last records are not drawn yet (too soon after the last draw, no val split, ...)
            self.plot(then="the checkpoints and metrics.jsonl are saved", quiet=failing)
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            with quiet():
                tracker.close()
        if self.file:
            file, self.file = self.file, None
            with quiet(), naming(self.metrics_path):
                file.close()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def recorded_world_size(run_dir: Path) -> int:
    """How many processes trained the run in `run_dir`, as its env.json says (1 if it says nothing)."""
    try:
        value = json.loads((run_dir / "env.json").read_text(encoding="utf-8")).get("world_size", 1)
    except (OSError, ValueError, AttributeError):
        return 1
    return value if isinstance(value, int) and value >= 1 else 1


def rerun_command(argv: list[str], environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """The shell line that runs `argv` again, as a user types it: `lmforge ...` for the console script and
    `python -m lmforge` (whose argv[0] is lmforge/__main__.py), `torchrun --nproc_per_node N -m lmforge ...`
    under torchrun (`--nnodes` added for several nodes, whose rendezvous flags the user's launcher adds).
    Anything else (a script calling lmforge's functions) is its python command line."""
    first = Path(argv[0]) if argv else Path()
    if not (first.name == "lmforge" or (first.name == "__main__.py" and first.parent.name == "lmforge")):
        return shlex.join([Path(sys.executable).name, *argv])
    world, local = int(environ.get("WORLD_SIZE", "1") or 1), int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if world <= 1:
        return shlex.join(["lmforge", *argv[1:]])
    nodes = [f"--nnodes={world // local}"] if world > local else []
    return shlex.join(["torchrun", *nodes, f"--nproc_per_node={local}", "-m", "lmforge", *argv[1:]])


def capture_env(device: str) -> dict[str, Any]:
    """Command line, versions, device and git commit: what env.json records at the start of a run."""
    import numpy
    import torch

    import lmforge

    info: dict[str, Any] = {
        "argv": sys.argv,
        "command": rerun_command(sys.argv),  # argv[0] of `python -m lmforge` is a path to lmforge/__main__.py
        "cwd": os.getcwd(),
        "host": socket.gethostname(),  # `lmforge runs`: whether RUN/.lock speaks for the run's process (runs._status)
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "lmforge": lmforge.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
