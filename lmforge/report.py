"""Run reports: `loss.png` during training, and `lmforge report RUN_DIR...` comparing runs.

`render_report` reads only files a run already has (config.json or finetune.json, metrics.jsonl, checkpoints,
status.json, and the data directory's manifest.json / card.json) and writes one page:

- HTML (default): self-contained, opens from disk with no network and no JavaScript. Plots are
  PNGs embedded as base64 `data:` URIs; CSS is inline. Every number in a table also sits in a
  `data-value` attribute at full precision, so tests (and scripts) compare it with metrics.jsonl.
- Markdown (`--format md`): the same sections as pipe tables, plots as PNG files in
  `<stem>_files/` next to it, for a README or a pull request.

Sections: summary (status, steps, tokens, best/final validation numbers, loss spikes, skipped
steps, peak memory), config differences, plots (loss against steps, tokens and wall-clock,
learning rate, gradient norm, tokens/s, MFU, update ratio, memory), evaluation table, the final task
metrics of fine-tuned runs (their eval.json: accuracy, macro-F1, BLEU, chrF, EM, F1, ...), data card,
and the generated sample of every evaluation. `watch` re-renders every N seconds with an HTML
`<meta http-equiv="refresh">` until the runs stop, so a browser tab follows a live run.

matplotlib is imported inside the functions (it costs ~0.5 s) with the Agg backend, so plotting
works without a display; every file is written to a temp name and renamed.

The two renderers (`render_html`, `render_markdown` and their helpers) live in `report_render.py`; both read
the tables built here (`summary_table`, `eval_table`, `task_table`), so one change to a table reaches both.
"""

from __future__ import annotations

import datetime
import io
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.atomic import (
    TMP_MARKER,
    atomic_write_text,
    check_out_file_kind,
    discard_tmp_dir,
    fresh_tmp_dir,
    naming,
    publish_dir,
    replacing,
    tmp_beside,
)
from lmforge.errors import CheckpointError, ConfigError
from lmforge.eval.classify import MAX_ANNOTATED  # (as finetune's printed report: past it the matrix is eval.json's)
from lmforge.fields import flatten, spelled
from lmforge.log import format_duration, read_metrics
from lmforge.runs import (
    TOKEN_LOSS,
    RunSummary,
    is_run_dir,
    loss_unit,
    read_json_object,
    run_config,
    summarize,
    with_unit,
)


def plot_loss(metrics_path: Path, out_png: Path, *, title: str = "") -> Path:
    """Draw train loss and validation loss against steps into `out_png`."""
    from lmforge.plotting import pyplot, use_cjk_font

    plt = pyplot()
    title = title or metrics_path.parent.name
    use_cjk_font([title], out_png.name)  # e.g. a run named 红楼梦

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="val loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({loss_unit(metrics_path.parent)})")  # a fine-tune's task loss: per example, ...
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with replacing(out_png) as tmp:  # (a full disk: no `.loss.png.tmp` left, and the error names loss.png)
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out_png


# --------------------------------------------------------------------------------------------
# Reading runs


@dataclass
class Run:
    path: Path
    name: str
    config: dict[str, Any]
    train: list[dict[str, Any]]  # metrics.jsonl records with "loss"
    evals: list[dict[str, Any]]  # metrics.jsonl records with "val_loss"
    summary: RunSummary
    data_card: dict[str, Any] = field(default_factory=dict)
    task_eval: dict[str, Any] = field(default_factory=dict)  # a fine-tune's eval.json (its final task metrics)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) or {}


def data_card(data_dir: str) -> dict[str, Any]:
    """A short summary of the prepared data a run trained on (manifest.json, card.json if present)."""
    if not data_dir:
        return {}
    root = Path(data_dir)
    manifest, card = _read_json(root / "manifest.json"), _read_json(root / "card.json")
    if not manifest and not card:
        return {}
    out: dict[str, Any] = {"data dir": str(root)}
    tok = manifest.get("tokenizer", {})
    if tok:
        out["tokenizer"] = f"{tok.get('kind', '?')}, vocab {tok.get('vocab_size', '?')}"
    docs = manifest.get("documents", {})
    if docs:
        out["documents in / kept"] = f"{docs.get('in', '?')} / {docs.get('out', '?')}"
        for reason, n in sorted(docs.get("removed", {}).items()):
            if n:
                out[f"removed: {reason}"] = n
    inputs = manifest.get("inputs")
    if isinstance(inputs, list):
        out["inputs"] = ", ".join(str(i.get("path", i) if isinstance(i, dict) else i) for i in inputs[:5]) + (
            f" (+{len(inputs) - 5} more)" if len(inputs) > 5 else ""
        )
    for split, info in manifest.get("splits", {}).items():
        if isinstance(info, dict):
            out[f"{split} tokens"] = info.get("tokens")
            out[f"{split} documents"] = info.get("documents")
    # card.json (lmforge.data.card): documents/bytes after each pipeline step, languages, bytes per token
    for step, info in card.get("steps", {}).items():
        if isinstance(info, dict):
            out[f"after {step}"] = f"{info.get('documents', 0):,} documents, {info.get('bytes', 0):,} bytes"
    languages = card.get("languages")
    if isinstance(languages, dict) and languages:
        top = sorted(languages.items(), key=lambda kv: -kv[1])[:5]
        out["languages (documents)"] = ", ".join(f"{lang} {n:,}" for lang, n in top)
    bytes_per_token = (card.get("tokenizer") or {}).get("report", {}).get("bytes_per_token", {}).get("all")
    if bytes_per_token:
        out["bytes per token"] = bytes_per_token
    for key, value in card.items():  # any other top-level fact a card carries
        if isinstance(value, (str, int, float, bool)):
            out[f"card: {key}"] = value
    return out


def load_run(path: str | Path) -> Run:
    """Read one run directory (one that has not logged a step yet too); not a run is a one-line `CheckpointError`."""
    p = Path(path)
    if not p.is_dir() or not is_run_dir(p):
        if (p / "config.json").is_file():  # (a model export or a copied config has one too: not taken for a run)
            raise CheckpointError(
                f"{p} has a config.json but none of the files a run writes beside it (env.json, status.json, "
                "metrics.jsonl, checkpoints/); pass a folder made by 'lmforge pretrain' or 'lmforge finetune'"
            )
        raise CheckpointError(
            f"{p} is not an lmforge run directory (no config.json); pass a folder made by 'lmforge pretrain' or "
            "'lmforge finetune'"
        )
    try:
        records = read_metrics(p / "metrics.jsonl")
        summary = summarize(p)
        config = run_config(p)  # a fine-tuned run: its own settings from finetune.json, not its base's
    except (OSError, ValueError) as e:  # permissions, I/O errors, undecodable files: one line, not a traceback
        raise CheckpointError(f"cannot read run {p}: {type(e).__name__}: {e}") from None
    data = config.get("data")
    data_dir = data.get("dir") if isinstance(data, dict) else None  # a hand-edited `"data": null` has none
    return Run(
        path=p,
        name=p.name,
        config=config,
        train=[r for r in records if "loss" in r],  # read_metrics: numeric step and values only
        evals=[r for r in records if "val_loss" in r],
        summary=summary,
        data_card=data_card(data_dir if isinstance(data_dir, str) else ""),
        task_eval=_read_json(p / "eval.json"),
    )


def load_runs(paths: list[str | Path]) -> list[Run]:
    if not paths:
        raise ConfigError("no run directories given; pass one or more RUN_DIRs")
    # A run that has not logged a step (it has just begun, or crashed at start) is a row of the report, with its
    # status, config and a note (`_not_logged`): refusing it refused the whole `lmforge report runs/*`, and a
    # report of a run just started ("nothing to report until the run logs a step") showed nothing of it.
    runs = [load_run(p) for p in paths]
    seen: dict[Path, str] = {}
    for path in paths:  # (the same run twice was two identical rows and config columns under one name)
        where = Path(path).resolve()
        if where in seen:
            raise ConfigError(f"{path} is given twice (as {seen[where]} too); pass each run directory once")
        seen[where] = str(path)
    names = [r.name for r in runs]
    for run in runs:  # two runs/…/a folders: tell them apart by their parent
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.path.name}"
    names = [r.name for r in runs]
    # x/a/run and y/a/run: their parents' names match too, so the path as given
    for run, path in zip(runs, paths, strict=True):
        if names.count(run.name) > 1:
            run.name = str(path)
    return runs


class _Absent:
    """A setting a run does not have (a fine-tune's config has no data or objective section, a pretraining run no
    finetune one): shown as "-", where it read "null" like a setting left unset (train.min_lr null = lr / 10)."""

    def __repr__(self) -> str:
        return "-"


ABSENT = _Absent()


# model settings whose 0 stands for a value derived from others (d_ff 0 = 4 x d_model, or 8/3 x for swiglu; n_kv_head
# 0 = n_head): the model config's property that gives the value the model was built with
RESOLVED = {"model.d_ff": "ff_dim", "model.n_kv_head": "kv_heads"}


def _resolved(config: dict[str, Any], key: str) -> Any:
    """The value `key` of RESOLVED had when the run's model was built, or None where its model section does not
    build (a hand-edited config). (Imports the model configs, and so torch: only for a row that needs it.)"""
    from lmforge.config import from_dict
    from lmforge.errors import LmforgeError
    from lmforge.models import CONFIGS

    model = config.get("model")
    family = model.get("family", "gpt") if isinstance(model, dict) else None
    if family not in CONFIGS:
        return None
    try:
        return getattr(from_dict(CONFIGS[family], model, prefix="model."), RESOLVED[key])
    except (LmforgeError, TypeError, ValueError, AttributeError):
        return None


def _resolve_row(runs: list[Run], key: str, values: list[Any]) -> tuple[list[Any], list[Any]]:
    """(values to show, values to compare) of a RESOLVED row: a 0 shows as "0 (=192)", and compares as 192."""
    if key not in RESOLVED or not any(v == 0 and not isinstance(v, bool) for v in values):
        return values, values
    resolved = [_resolved(run.config, key) if v is not ABSENT else ABSENT for run, v in zip(runs, values, strict=True)]
    compared = [r if r is not None else v for v, r in zip(values, resolved, strict=True)]
    shown = [
        f"{v} (={r})" if r is not None and r is not ABSENT and r != v else v
        for v, r in zip(values, resolved, strict=True)
    ]
    return shown, compared


def config_differences(runs: list[Run]) -> list[tuple[str, list[Any]]]:
    """(dotted key, value per run; `ABSENT` where a run has no such setting) for every setting that differs (all
    settings for a single run). A setting whose 0 means a derived value (`RESOLVED`: model.d_ff 0 = 4 x d_model)
    is compared by the value the model was built with, and its 0 shown as "0 (=192)": d_ff 0 and 192 of one
    d_model are the same model, and were listed as a difference."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    rows = []
    for key in keys:
        if key == "out":
            continue
        shown, compared = _resolve_row(runs, key, [f.get(key, ABSENT) for f in flat])
        if len(runs) == 1 or any(v != compared[0] for v in compared):
            rows.append((key, shown))
    return rows


# --------------------------------------------------------------------------------------------
# Plots


@dataclass(frozen=True)
class PlotSpec:
    slug: str
    title: str
    x: str  # "step", "tokens" or "elapsed_s"
    keys: tuple[str, ...]  # metrics.jsonl keys drawn (train keys solid, val_* dashed with markers)
    ylabel: str
    log_y: bool = False
    scale: float = 1.0


PLOTS = (
    # (the loss plots' ylabel says what the runs' losses are per: `render_plot`)
    PlotSpec("loss_steps", "Loss vs steps", "step", ("loss", "val_loss"), "loss"),
    PlotSpec("loss_tokens", "Loss vs tokens", "tokens", ("loss", "val_loss"), "loss"),
    PlotSpec("loss_time", "Loss vs wall-clock", "elapsed_s", ("loss", "val_loss"), "loss"),
    PlotSpec("lr", "Learning rate", "step", ("lr",), "learning rate"),
    PlotSpec("grad_norm", "Gradient norm (before clipping)", "step", ("grad_norm",), "global L2 norm", log_y=True),
    PlotSpec("tokens_per_s", "Throughput", "step", ("tokens_per_s",), "tokens/s"),
    PlotSpec("mfu", "Model FLOPs utilization", "step", ("mfu",), "MFU (%)", scale=100.0),
    PlotSpec("update_ratio", "Update ratio ||Δθ|| / ||θ||", "step", ("update_ratio",), "ratio", log_y=True),
    PlotSpec("memory", "Memory in use", "step", ("mem_mib",), "MiB (GPU peak / CPU RSS)"),
)
X_LABELS = {"step": "step", "tokens": "tokens trained on", "elapsed_s": "wall-clock (s)"}


def _x_values(run: Run, records: list[dict[str, Any]], x: str) -> list[float]:
    """x for each record; eval records lack `tokens`, so it is interpolated from the train records.

    Every run starts at step 0 with 0 tokens (a fine-tune, a resumed run too): without that point an eval
    before the first logged step (eval every 5, log every 10) read the tokens of that later step."""
    if x == "tokens":
        import numpy as np

        steps = [r["step"] for r in run.train if "tokens" in r]
        tokens = [r["tokens"] for r in run.train if "tokens" in r]
        if not steps:
            return [float("nan")] * len(records)
        if steps[0] > 0:
            steps, tokens = [0, *steps], [0, *tokens]
        return [float(r["tokens"]) if "tokens" in r else float(np.interp(r["step"], steps, tokens)) for r in records]
    return [float(r.get(x, float("nan"))) for r in records]


def available_plots(runs: list[Run]) -> list[PlotSpec]:
    """The plots some run has numbers for (an old run without update_ratio skips that plot)."""
    have = {k for run in runs for r in run.train + run.evals for k in r}
    return [spec for spec in PLOTS if any(k in have for k in spec.keys) and spec.x in have | {"tokens"}]


def _loss_units(spec: PlotSpec, runs: list[Run]) -> list[str]:
    """What the runs' losses are per, for a loss plot ([] for another): a fine-tune's is its task's."""
    return sorted({_unit(run) for run in runs}) if "loss" in spec.keys else []


def plot_panels(spec: PlotSpec, runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """(y-axis label, the runs drawn on it) for each panel of `spec`'s chart, top to bottom.

    Losses in different units do not share an axis: an ELECTRA run's ~40 (MLM + 50 x RTD) on the axis of a GPT's
    ~3 nats/token flattened every other curve to a line at the bottom. A loss plot gets one panel per unit, each
    with its own y axis; any other plot is one panel."""
    units = _loss_units(spec, runs)
    if not units:
        return [(spec.ylabel, runs)]
    return [(f"loss ({unit})", [run for run in runs if _unit(run) == unit]) for unit in units]


def plot_figure(spec: PlotSpec, runs: list[Run]) -> Any:
    """The matplotlib figure of `spec`: every run's curves, one color per run (the same in every panel), one panel
    per loss unit (`plot_panels`), each panel's legend outside its axes on the right, where it covers no data.
    The caller closes it (`render_plot`)."""
    import textwrap

    from lmforge.plotting import pyplot, use_cjk_font

    plt = pyplot()
    use_cjk_font([run.name for run in runs], "the report's charts")  # run names label the curves

    panels = plot_panels(spec, runs)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7.6, 0.8 + 2.8 * len(panels)), dpi=100, sharex=True, squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (ylabel, panel_runs) in zip(axes[:, 0], panels, strict=True):
        for run in panel_runs:
            color = colors[runs.index(run) % len(colors)]
            for key in spec.keys:
                records = [r for r in (run.evals if key.startswith("val_") else run.train) if key in r]
                if not records:
                    continue
                xs = _x_values(run, records, spec.x)
                ys = [float(r[key]) * spec.scale for r in records]
                label = f"{run.name} {key}" if len(spec.keys) > 1 else run.name
                if key.startswith("val_"):
                    ax.plot(xs, ys, "o--", color=color, label=label, linewidth=1.4, markersize=3)
                else:
                    ax.plot(xs, ys, "-", color=color, label=label, linewidth=1.1, alpha=0.9)
                if key == "loss":
                    spikes = [(x, y) for x, y, r in zip(xs, ys, records, strict=True) if r.get("loss_spike")]
                    if spikes:
                        ax.plot(*zip(*spikes, strict=True), "x", color="red", markersize=7)
        if spec.log_y:
            ax.set_yscale("log")
        ax.set_ylabel("\n".join(textwrap.wrap(ylabel, 30)))  # (an ELECTRA unit is 50 characters)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    axes[0, 0].set_title(spec.title)
    axes[-1, 0].set_xlabel(X_LABELS[spec.x])
    fig.tight_layout()
    return fig


def render_plot(spec: PlotSpec, runs: list[Run]) -> bytes:
    """One PNG of `plot_figure`."""
    from lmforge.plotting import pyplot

    fig = plot_figure(spec, runs)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        pyplot().close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Tables (shared by HTML and Markdown): each cell is (text, raw value or None)

Cell = tuple[str, Any]


def num_cell(value: Any, fmt: str = "{:.4f}") -> Cell:
    if value is None:
        return ("-", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (str(value), value)
    if isinstance(value, int):  # counts (val_tokens, val_bytes, ...) read best with separators
        return (f"{value:,}", value)
    if abs(value) >= 1e9 and value != float("inf"):  # a diverged run's perplexity (up to e^700) in 4 digits,
        return (f"{value:.4g}", value)  # not "10142320547350044927...480.00", 300 characters in one cell
    return (fmt.format(value), value)


def _loss_cell(value: Any, unit: str) -> Cell:
    """A validation loss with what it is per where that is not TOKEN_LOSS (a fine-tune's task loss)."""
    text, raw = num_cell(value)
    return (with_unit(text, unit) if raw is not None else text, raw)


def _unit(run: Run) -> str:
    return run.summary.loss_unit or TOKEN_LOSS


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else format_duration(seconds)


def summary_table(runs: list[Run]) -> tuple[list[str], list[list[Cell]]]:
    header = [
        "run", "kind", "preset", "status", "steps", "tokens", "best val loss", "final val ppl", "final val bpb",
        "wall-clock", "loss spikes", "skipped steps", "peak memory (MiB)", "last checkpoint",
    ]  # fmt: skip
    rows = []
    for run in runs:
        s, last_eval = run.summary, run.evals[-1] if run.evals else {}
        mem = [r["mem_mib"] for r in run.train if "mem_mib" in r]
        rows.append(
            [
                (run.name, run.name),
                (s.kind or "-", s.kind),
                (s.preset or "-", s.preset),
                (s.status, s.status),
                (f"{s.step}/{s.max_steps}" if s.max_steps else str(s.step), s.step),
                (f"{s.tokens:,}", s.tokens),
                _loss_cell(s.best_val_loss, s.loss_unit),
                num_cell(last_eval.get("val_ppl"), "{:.2f}"),
                num_cell(last_eval.get("val_bpb")),
                (_duration(s.elapsed_s), s.elapsed_s),
                num_cell(sum(bool(r.get("loss_spike")) for r in run.train), "{}"),
                num_cell(run.train[-1].get("skipped_steps") if run.train else None, "{}"),
                num_cell(max(mem) if mem else None, "{:.0f}"),
                (s.last_checkpoint or "-", s.last_checkpoint),
            ]
        )
    return header, rows


def eval_table(runs: list[Run]) -> tuple[list[str], list[list[Cell]]]:
    keys = ["val_loss", "val_ppl", "val_bpb"]
    extra = sorted({k for run in runs for r in run.evals for k in r if k.startswith("val_") and k not in keys})
    header = ["run", "step", "tokens", *keys, *extra, "elapsed"]
    rows = []
    for run in runs:
        tokens = _x_values(run, run.evals, "tokens")
        for record, tok in zip(run.evals, tokens, strict=True):
            rows.append(
                [
                    (run.name, run.name),
                    (str(record["step"]), record["step"]),
                    (f"{tok:,.0f}" if tok == tok else "-", tok if tok == tok else None),
                    _loss_cell(record.get("val_loss"), run.summary.loss_unit),
                    *[num_cell(record.get(k), "{:.2f}" if k == "val_ppl" else "{:.4f}") for k in keys[1:] + extra],
                    (_duration(record.get("elapsed_s", 0.0)), record.get("elapsed_s")),
                ]
            )
    return header, rows


def task_table(runs: list[Run]) -> tuple[list[str], list[list[Cell]]]:
    """The final task metrics of fine-tuned runs (eval.json: accuracy, macro_f1, bleu, chrf, em, f1, reward
    accuracy, ... on the --val file, and a distilled run's KL to its teacher before and after), which
    metrics.jsonl does not hold; no rows without a fine-tune."""
    scored = [run for run in runs if isinstance(run.task_eval.get("val"), dict)]

    def numbers(run: Run) -> dict[str, Any]:
        forgetting = run.task_eval.get("forgetting") or {}
        out = {k: v for k, v in run.task_eval["val"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        distill = run.task_eval.get("distill") or {}
        for when in ("before", "after"):  # continued pretraining: loss on the new and old text, before and after
            for key, value in (forgetting.get(when) or {}).items():
                if isinstance(value, (int, float)):
                    out[f"{key} {when}"] = value
            if isinstance(distill.get(f"kl_{when}"), (int, float)):  # --adapt distill: KL to the teacher
                out[f"kl_to_teacher {when}"] = distill[f"kl_{when}"]
        return out

    keys = list(dict.fromkeys(k for run in scored for k in numbers(run)))
    header = ["run", "task", "adapt", "trainable params", *keys]
    rows = []
    for run in scored:
        values = numbers(run)
        rows.append(
            [
                (run.name, run.name),
                (str(run.task_eval.get("task", "-")), None),
                (str(run.task_eval.get("adapt", "-")), None),
                num_cell(run.task_eval.get("trainable_params"), "{}"),
                *[num_cell(values.get(k), "{:,}" if isinstance(values.get(k), int) else "{:.4f}") for k in keys],
            ]
        )
    return header, rows


def confusion_tables(runs: list[Run]) -> list[tuple[str, list[str], list[list[Cell]]]]:
    """(run name, header, rows) of each classify fine-tune's confusion matrix on its --val file (eval.json: a row
    per true label, a column per predicted one), up to MAX_ANNOTATED classes; a hand-edited one that is
    not a square of counts with a label each is left out."""
    out = []
    for run in runs:
        val = run.task_eval.get("val")
        if not isinstance(val, dict):
            continue
        matrix, labels = val.get("confusion"), val.get("labels")
        if not (isinstance(matrix, list) and isinstance(labels, list) and 0 < len(labels) <= MAX_ANNOTATED):
            continue
        square = len(matrix) == len(labels) and all(isinstance(r, list) and len(r) == len(labels) for r in matrix)
        if not square or not all(isinstance(n, int) and not isinstance(n, bool) for r in matrix for n in r):
            continue
        names = [str(label) for label in labels]
        rows = [[(name, name), *[num_cell(n) for n in row]] for name, row in zip(names, matrix, strict=True)]
        out.append((run.name, ["true \\ predicted", *names], rows))
    return out


def data_cards(runs: list[Run]) -> list[tuple[str, dict[str, Any], str]]:
    """(run name, data card, the earlier run with the same data dir or "") for each run with a card: both
    renderers show a data set's card once and say "same data as" for the runs that share it."""
    first: dict[str, str] = {}  # data dir -> the first run that has it
    out = []
    for run in runs:
        if run.data_card:
            out.append((run.name, run.data_card, first.get(run.data_card["data dir"], "")))
            first.setdefault(run.data_card["data dir"], run.name)
    return out


def short_text(value: Any) -> str:
    if value is ABSENT or value == "":  # (an imported run has no preset: "", shown as "-" like a missing one)
        return "-"
    text = spelled(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------
# Entry points


def _resolve_format(out: Path, fmt: str) -> Literal["html", "md"]:
    if fmt == "auto":
        suffix = out.suffix.lower()
        if suffix not in ("", ".md", ".markdown", ".html", ".htm"):
            raise ConfigError(
                f"--out {out.name}: a report is HTML or Markdown; name it .html or .md (or give --format html|md)"
            )
        return "md" if suffix in (".md", ".markdown") else "html"
    if fmt not in ("html", "md"):
        raise ConfigError(f"unknown report format {fmt!r}; use html or md")
    return fmt  # type: ignore[return-value]


def _refuse_run_file(out: Path, run_dirs: list[Path]) -> None:
    """`--out RUN/config.json --format html` (or RUN/checkpoints/latest, which needs no flag: no suffix means
    HTML) replaced the run's own file with the report. In a run folder only a new file or an earlier report
    (.html/.md) may be written."""
    if not out.exists() or out.suffix.lower() in (".md", ".markdown", ".html", ".htm"):
        return
    target = out.resolve()
    for run_dir in run_dirs:
        if run_dir.resolve() in target.parents:
            raise ConfigError(
                f"--out {out} is a file of the run {run_dir}, which the report would replace; "
                "name a new file, e.g. report.html"
            )


def _is_report(path: Path) -> bool:
    """Whether `path` starts as a page `render_html` or `render_markdown` writes (title or first heading)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(1024)
    except OSError:
        return False
    return head.startswith("# lmforge report: ") or (
        head.startswith("<!DOCTYPE html>") and "<title>lmforge report: " in head
    )


def _refuse_foreign_file(out: Path, *, overwrite: bool) -> None:
    """An existing `--out` that is not an earlier report (someone's notes.md, index.html) was replaced without a
    word; it now takes `--overwrite`, as the other commands' outputs do. Re-rendering a report needs no flag."""
    if out.is_file() and not overwrite and not _is_report(out):
        raise ConfigError(
            f"--out {out} already exists and is not an lmforge report; choose another --out or pass --overwrite "
            "to replace it"
        )


def render_report(
    run_dirs: list[str | Path],
    out: str | Path = "report.html",
    *,
    fmt: str = "auto",
    refresh_s: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the report comparing `run_dirs` to `out` (HTML or Markdown + PNGs) and return its path.

    Args:
        run_dirs: run directories made by `lmforge pretrain`.
        out: the output file; `.md` means Markdown unless `fmt` says otherwise.
        fmt: "auto", "html" or "md".
        refresh_s: add a meta refresh of this many seconds (live view).
        overwrite: replace an existing `out` that is not an earlier report (an earlier report is always replaced).
    """
    out = Path(out)
    kind = _resolve_format(out, fmt)
    runs = load_runs(list(run_dirs))
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; pass a file name such as {out / ('report.' + kind)}")
    check_out_file_kind(out)
    _refuse_run_file(out, [run.path for run in runs])
    _refuse_foreign_file(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "html":  # one self-contained file: all of it, or the earlier page as it was
        from lmforge.report_render import render_html

        atomic_write_text(out, render_html(runs, refresh_s=refresh_s))
    else:
        _write_markdown(runs, out)
    return out


def _write_markdown(runs: list[Run], out: Path) -> None:
    """Write the Markdown report `out` and its `_files/` plots as one set: an earlier report and its plots stay as
    they were unless both are replaced.

    The plots were replaced one at a time in `_files/` before the page was written, so a full disk part-way left
    the old page beside some new plots (and a new `_files/` with a few PNGs and no page). Now the new plots (with
    the user's own files of the old folder, `_carry_over`) are built in a hidden folder beside and the page is
    written to its temporary first; only then are both renamed in (`atomic.publish_dir`), the old folder put back
    if the page's rename fails. A kill between the two renames is the one moment that can mix them."""
    from lmforge.report_render import assets_dir, render_markdown

    assets = assets_dir(out)
    if assets.is_symlink() or (assets.exists() and not assets.is_dir()):
        what = "a link" if assets.is_symlink() else "a file"
        raise ConfigError(f"--out {out}: its plots go in {assets}/, which is {what}; move it or choose another --out")
    build = fresh_tmp_dir(assets)
    page = tmp_beside(out)
    try:
        text = render_markdown(runs, out, build)
        _carry_over(assets, build)
        with naming(out), open(page, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish_dir(build, assets, then=lambda: os.replace(page, out))
    except BaseException:
        page.unlink(missing_ok=True)
        discard_tmp_dir(build)
        raise


def _carry_over(old: Path, new: Path) -> None:
    """The user's own files in an earlier report's `_files/` (anything but the plots lmforge writes there) go into
    the new folder too, as hard links (copies where the file system has none): they stayed when plots were
    replaced in place. An earlier render's plot this one has no numbers for (mfu.png of other runs) is dropped."""
    if not old.is_dir():
        return
    ours = {f"{spec.slug}.png" for spec in PLOTS} | {f".{spec.slug}.png.tmp" for spec in PLOTS} | {TMP_MARKER}
    for entry in sorted(old.iterdir()):
        if entry.name in ours:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def watch(
    run_dirs: list[str | Path],
    out: str | Path = "report.html",
    *,
    fmt: str = "auto",
    every_s: float = 10.0,
    max_renders: int = 0,
    echo: bool = True,
    overwrite: bool = False,
) -> int:
    """Re-render the report every `every_s` seconds until no run is running (or Ctrl-C).

    The page carries a meta refresh while a run is going and none in the final render, so an open
    browser tab follows the run and then stays put. Returns the number of renders.
    """
    from lmforge.runs import run_status

    # (NaN passed `<= 0` and inf or 1e308 a `> 0`, then failed with a traceback in the page's refresh tag or
    # in time.sleep; a day is far beyond any useful interval and well inside what sleep accepts)
    if not 0 < every_s <= 86_400:
        raise ConfigError(f"--every must be a number of seconds > 0 and at most 86400 (a day), got {every_s}")

    def said(path: Path, note: str) -> None:
        if echo:
            print(f"{datetime.datetime.now().strftime('%H:%M:%S')} wrote {path}{note}", flush=True)

    renders = 0
    try:
        while True:
            live = any(run_status(Path(p)) == "running" for p in run_dirs)
            path = render_report(run_dirs, out, fmt=fmt, refresh_s=every_s if live else None, overwrite=overwrite)
            renders += 1
            said(path, "" if live else " (no run is running; done)")
            if not live or (max_renders and renders >= max_renders):
                return renders
            time.sleep(every_s)
    except KeyboardInterrupt:
        # the last page does not keep reloading; said, as the final render takes seconds after the Ctrl-C (it was
        # silent, so the user could not tell whether the page on disk still reloads itself)
        said(render_report(run_dirs, out, fmt=fmt, overwrite=overwrite), " (stopped; the page no longer reloads)")
        return renders + 1
