"""The `lmforge report` page as markup: one self-contained HTML page (`render_html`), or Markdown whose plots
are PNG files beside it (`render_markdown`); what each holds is in `report.py`'s docstring.

Both show the same sections from the same tables and plots, which `report.py` builds (`summary_table`,
`eval_table`, `task_table`, `config_differences`, `data_cards`, `render_plot`), so they differ only in markup.
Split out of `report.py` (which loads the runs, builds those tables and plots, and writes the files) because
the markup changes on its own: a new section or style touches only this file.
"""

from __future__ import annotations

import base64
import datetime
import html
import re
import urllib.parse
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_bytes
from lmforge.report import (
    Cell,
    Run,
    available_plots,
    config_differences,
    confusion_tables,
    data_cards,
    eval_table,
    num_cell,
    render_plot,
    short_text,
    summary_table,
    task_table,
)
from lmforge.runs import is_finetune_kind

# --------------------------------------------------------------------------------------------
# HTML

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1320px;
       padding: 0 16px; color: #1d2430; background: #fff; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #dde;
padding-bottom: 4px; } .meta { color: #667; font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #d8dbe2; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f4f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 10px; }
.plots figure { margin: 0; border: 1px solid #e3e6ec; padding: 4px; } .plots img { width: 100%; height: auto; }
pre.sample { background: #f7f7f9; border: 1px solid #e3e6ec; padding: 6px; margin: 0 0 2px; white-space: pre-wrap;
             max-height: 14em; overflow: auto; font-size: 12px; }
#samples { width: 100%; table-layout: fixed; } #samples th:first-child { width: 4em; }
.status-running { color: #0a6; font-weight: 600; } .status-failed { color: #c22; font-weight: 600; }
.status-interrupted { color: #b70; font-weight: 600; }
"""


def _html_table(table_id: str, header: list[str], rows: list[list[Cell]]) -> str:
    out = [f'<table id="{table_id}"><thead><tr>']
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for text, value in row:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append(f'<td class="num" data-value="{value!r}">{html.escape(text)}</td>')
            else:
                cls = f' class="status-{html.escape(text)}"' if text in ("running", "failed", "interrupted") else ""
                out.append(f"<td{cls}>{html.escape(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _not_logged(runs: list[Run]) -> list[str]:
    """A line for each run with no metrics yet, saying when it will have some."""
    notes = []
    for run in runs:
        if run.train or run.evals:
            continue
        kind = run.summary.kind
        if ", int" in kind or kind.endswith(", quantized"):  # (quantize writes no metrics.jsonl: none will come)
            notes.append(f"{run.name}: a quantized copy; its training metrics are its original's (quantize.json "
                         "holds the before/after comparison)")  # fmt: skip
            continue
        if kind == "imported":
            notes.append(f"{run.name}: an imported model, trained elsewhere; it has no training metrics")
            continue
        train = run.config.get("train")
        every = train.get("log_every") if isinstance(train, dict) else None
        known = isinstance(every, int) and not isinstance(every, bool)
        when = f"a line every {every} steps (train.log_every)" if known else "a line per log interval"
        notes.append(f"{run.name}: no steps logged yet ({run.summary.status}; its metrics.jsonl gets {when})")
    return notes


def _no_samples_hint(runs: list[Run]) -> str:
    """What would give these runs samples, by kind: only a pretraining run of a decoder takes
    --eval.sample_tokens (finetune refuses it; an encoder generates no text)."""
    hints = []
    if any(_kind(run) == "pretrain" for run in runs):
        hints.append("pretrain with <code>--eval.sample_tokens 200</code> to log one per evaluation")
    if any(_kind(run) == "finetune" for run in runs):
        hints.append("a fine-tune logs none (its --val answers are scored at the end: Task metrics)")
    if any(_kind(run) == "encoder" for run in runs):
        hints.append("an encoder (bert, electra) generates no text")
    return "; ".join(hints)


def _kind(run: Run) -> str:
    """What the samples hint needs: "finetune" (`runs.run_kind` says so), else "encoder" or "pretrain"."""
    if is_finetune_kind(run.summary.kind):
        return "finetune"
    model = run.config.get("model")
    return "encoder" if isinstance(model, dict) and model.get("family") in ("bert", "electra") else "pretrain"


def render_html(runs: list[Run], *, refresh_s: float | None = None) -> str:
    """The whole report as one self-contained HTML page."""
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    title = "lmforge report: " + ", ".join(r.name for r in runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
    ]
    if refresh_s:
        parts.append(f'<meta http-equiv="refresh" content="{max(1, round(refresh_s))}">')
    parts += [f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    live = f" · live: re-rendered every {refresh_s:.0f} s" if refresh_s else ""
    parts.append(f'<p class="meta">generated {now} by lmforge report{live}</p>')

    parts.append("<h2>Summary</h2>")
    parts.append(_html_table("summary", *summary_table(runs)))
    parts += [f'<p class="meta">{html.escape(note)}</p>' for note in _not_logged(runs)]

    diffs = config_differences(runs)
    parts.append("<h2>Config differences</h2>" if len(runs) > 1 else "<h2>Config</h2>")
    if diffs:
        rows = [[(key, key), *[(short_text(v), None) for v in vals]] for key, vals in diffs]
        parts.append(_html_table("config", ["setting", *[r.name for r in runs]], rows))
    else:
        parts.append("<p>The runs have the same config (apart from the run directory).</p>")

    parts.append('<h2>Plots</h2><div class="plots">')
    for spec in available_plots(runs):
        data = base64.b64encode(render_plot(spec, runs)).decode("ascii")
        parts.append(
            f'<figure id="plot-{spec.slug}"><img class="plot" alt="{html.escape(spec.title)}" '
            f'src="data:image/png;base64,{data}"></figure>'
        )
    parts.append("</div>")

    parts.append("<h2>Evaluations</h2>")
    header, rows = eval_table(runs)
    parts.append(_html_table("evals", header, rows) if rows else "<p>No evaluations logged yet.</p>")
    header, rows = task_table(runs)
    if rows:
        parts.append("<h2>Task metrics</h2>")
        parts.append(_html_table("task", header, rows))
    for i, (name, header, rows) in enumerate(confusion_tables(runs), 1):
        parts.append(f"<h3>Confusion matrix: {html.escape(name)}</h3>")
        parts.append(_html_table(f"confusion-{i}", header, rows))

    cards = data_cards(runs)
    if cards:
        parts.append("<h2>Data</h2>")
        shown = 0
        for name, card, same_as in cards:
            if same_as:
                parts.append(f"<p>{html.escape(name)}: same data as {html.escape(same_as)}.</p>")
                continue
            shown += 1
            rows = [
                [(k, k), num_cell(v, "{}") if isinstance(v, (int, float)) else (short_text(v), None)]
                for k, v in card.items()
            ]
            parts.append(f"<h3>{html.escape(name)}</h3>" + _html_table(f"data-{shown}", ["", "value"], rows))

    # Samples side by side: one row per evaluation step, one column per run.
    by_step: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        for record in run.evals:
            if record.get("sample"):
                by_step.setdefault(record["step"], {})[run.name] = record
    parts.append("<h2>Samples</h2>")
    if not by_step:
        parts.append(f"<p>No samples: {_no_samples_hint(runs)}.</p>")
    else:
        parts.append('<table id="samples"><thead><tr><th>step</th>')
        parts += [f"<th>{html.escape(run.name)}</th>" for run in runs]
        parts.append("</tr></thead><tbody>")
        for step in sorted(by_step):
            parts.append(f'<tr><td class="num" data-value="{step}">{step}</td>')
            for run in runs:
                record = by_step[step].get(run.name)
                if record is None:
                    parts.append("<td>-</td>")
                else:
                    parts.append(
                        f'<td><pre class="sample">{html.escape(record["sample"])}</pre>'
                        f'<span class="meta">val loss {record["val_loss"]:.4f}</span></td>'
                    )
            parts.append("</tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Markdown


# Characters that Markdown (GitHub's: HTML tags, entities, emphasis, links, code spans, strikethrough, $math$,
# table cells) would read as markup; each is backslash-escaped, so a run named `x<b>` or `a|b` shows as written.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>&|~!$#])")


def _md_escape(text: str) -> str:
    """`text` as literal Markdown inline text, on one line (a table cell, a heading, bold)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


def _md_code_block(text: str) -> list[str]:
    """`text` as a fenced block whose tilde fence is longer than any run of tildes in it, so no line of the
    text (```, ~~~~) can close it early."""
    longest = max((len(run) for run in re.findall(r"~+", text)), default=0)
    fence = "~" * max(4, longest + 1)
    return [fence + "text", text, fence]


def _md_table(header: list[str], rows: list[list[Cell]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_md_escape(text) for text, _ in row) + " |" for row in rows]
    return "\n".join(lines)


def assets_dir(out: Path) -> Path:
    """Where a Markdown report's PNGs go: `<out stem>_files/` beside it."""
    return out.with_name(out.stem + "_files")


def render_markdown(runs: list[Run], out: Path, plots_dir: Path) -> str:
    """The report as Markdown for `out`; its plots are written as PNGs to `plots_dir`, the folder that becomes
    `<out stem>_files/` (`render_report` builds it beside and swaps it in with the page)."""
    assets = assets_dir(out)
    parts = [
        f"# lmforge report: {', '.join(_md_escape(r.name) for r in runs)}",
        "",
        "## Summary",
        "",
        _md_table(*summary_table(runs)),
    ]
    parts += [line for note in _not_logged(runs) for line in ("", _md_escape(note))]
    diffs = config_differences(runs)
    parts += ["", "## Config differences" if len(runs) > 1 else "## Config", ""]
    if diffs:
        rows = [[(key, key), *[(short_text(v), None) for v in vals]] for key, vals in diffs]
        parts.append(_md_table(["setting", *[r.name for r in runs]], rows))
    else:
        parts.append("The runs have the same config (apart from the run directory).")
    parts += ["", "## Plots", ""]
    plots = available_plots(runs)
    for spec in plots:
        atomic_write_bytes(plots_dir / f"{spec.slug}.png", render_plot(spec, runs))
        parts.append(f"![{_md_escape(spec.title)}]({urllib.parse.quote(assets.name)}/{spec.slug}.png)")
    header, rows = eval_table(runs)
    parts += ["", "## Evaluations", "", _md_table(header, rows) if rows else "No evaluations logged yet."]
    header, rows = task_table(runs)
    if rows:
        parts += ["", "## Task metrics", "", _md_table(header, rows)]
    for name, header, rows in confusion_tables(runs):
        parts += ["", f"### Confusion matrix: {_md_escape(name)}", "", _md_table(header, rows)]
    for name, card, same_as in data_cards(runs):
        if same_as:
            parts += ["", f"{_md_escape(name)}: same data as {_md_escape(same_as)}."]
            continue
        rows = [[(k, k), (short_text(v), None)] for k, v in card.items()]
        parts += ["", f"## Data: {_md_escape(name)}", "", _md_table(["", "value"], rows)]
    samples = [(run, r) for run in runs for r in run.evals if r.get("sample")]
    if samples:
        parts += ["", "## Samples"]
        for run, record in samples:
            parts += ["", f"**{_md_escape(run.name)} @ step {record['step']}**", "", *_md_code_block(record["sample"])]
    return "\n".join(parts) + "\n"
