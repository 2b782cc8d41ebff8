"""`lmforge report`: a page rendered from two tiny real runs holds every plot, the config differences,
evaluation numbers equal to metrics.jsonl, the data card and the samples; Markdown + PNGs; bad input is a
one-line error; `--watch` follows a live run; and a real headless Chromium (when installed) shows the
page with zero console errors and no network request, saving a screenshot to tests/artifacts/."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.parse
from html.parser import HTMLParser

import pytest

from lmforge.errors import CheckpointError, ConfigError
from lmforge.log import read_metrics
from lmforge.report import PLOTS, eval_table, load_runs, render_report, task_table, watch
from lmforge.report_render import render_html
from lmforge.runs import run_status
from lmforge.train.run import pretrain
from tests.cdp import Browser, find_chromium
from tests.conftest import REPO, run_cli, start_cli, tiny_config

ARTIFACTS = REPO / "tests" / "artifacts"  # gitignored
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """The parts of a report page the tests look at."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.plots: list[str] = []
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self.samples: list[str] = []
        self.tags: set[str] = set()
        self.urls: list[str] = []
        self.refresh: str | None = None
        self._table: str | None = None
        self._cell: list | None = None
        self._pre = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.urls += [a[k] for k in ("src", "href") if k in a]
        if tag == "img" and a.get("class") == "plot":
            self.plots.append(a["src"])
        elif tag == "meta" and a.get("http-equiv") == "refresh":
            self.refresh = a["content"]
        elif tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ["", a.get("data-value")]
        elif tag == "pre" and a.get("class") == "sample":
            self._pre = True
            self.samples.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append((self._cell[0], self._cell[1]))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "pre":
            self._pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        if self._pre:
            self.samples[-1] += data

    def rows(self, table: str) -> list[dict[str, tuple[str, str | None]]]:
        header = [text for text, _ in self.tables[table][0]]
        return [dict(zip(header, row, strict=True)) for row in self.tables[table][1:]]


@pytest.fixture(scope="module")
def two_runs(data_dir, tmp_path_factory):
    """Two tiny real runs (12 steps, evals at 4, 8, 12 with samples) that differ in lr and grad_clip."""
    root = tmp_path_factory.mktemp("report") / "runs"
    fast, slow = root / "fast", root / "slow"
    pretrain(tiny_config(data_dir, fast, **{"eval.sample_tokens": 24}), progress=False)
    pretrain(
        tiny_config(data_dir, slow, **{"train.lr": 1e-3, "optim.grad_clip": 0.05, "eval.sample_tokens": 24}),
        progress=False,
    )
    return fast, slow


def test_html_report_content_matches_metrics(two_runs, data_dir, tmp_path):
    out = render_report(list(two_runs), tmp_path / "report.html")
    page = Page(out.read_text(encoding="utf-8"))

    # Self-contained: no script, no external URL; every plot an embedded PNG.
    assert "script" not in page.tags and page.refresh is None
    assert all(u.startswith("data:image/png;base64,") for u in page.urls), page.urls
    assert len(page.plots) == len(PLOTS) == 9
    for src in page.plots:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)

    metrics = {run.name: read_metrics(run / "metrics.jsonl") for run in two_runs}
    evals = {name: [r for r in recs if "val_loss" in r] for name, recs in metrics.items()}

    summary = page.rows("summary")
    assert [r["run"][0] for r in summary] == ["fast", "slow"]
    for row in summary:
        name = row["run"][0]
        assert row["status"][0] == "finished" and row["steps"][0] == "12/12"
        assert float(row["best val loss"][1]) == min(r["val_loss"] for r in evals[name])
        assert float(row["final val bpb"][1]) == evals[name][-1]["val_bpb"]
        assert int(row["tokens"][1]) == [r for r in metrics[name] if "loss" in r][-1]["tokens"]
        assert row["skipped steps"][0] == "0"

    rows = page.rows("evals")
    assert len(rows) == sum(len(v) for v in evals.values()) == 6  # evals at steps 4, 8, 12 of each run
    for row in rows:
        record = next(r for r in evals[row["run"][0]] if r["step"] == int(row["step"][0]))
        for key in ("val_loss", "val_ppl", "val_bpb"):
            assert float(row[key][1]) == record[key], (key, row[key], record[key])  # exact: repr round trip

    config = {r["setting"][0]: (r["fast"][0], r["slow"][0]) for r in page.rows("config")}
    assert config == {"train.lr": ("0.003", "0.001"), "optim.grad_clip": ("1.0", "0.05")}

    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    card = {r[""][0]: r["value"] for r in page.rows("data-1")}
    assert card["tokenizer"][0].startswith("char")
    assert int(card["train tokens"][1]) == manifest["splits"]["train"]["tokens"]

    samples = [
        r["sample"] for step in (4, 8, 12) for name in ("fast", "slow") for r in evals[name] if r["step"] == step
    ]
    assert page.samples == samples and len(samples) == 6 and all(samples)  # row per eval step, column per run
    assert [int(r["step"][1]) for r in page.rows("samples")] == [4, 8, 12]


def test_markdown_report_writes_pngs(two_runs, tmp_path):
    out = render_report(list(two_runs), tmp_path / "docs" / "report.md")
    text = out.read_text(encoding="utf-8")
    images = [line for line in text.splitlines() if line.startswith("![")]
    assert len(images) == len(PLOTS)
    for line in images:
        png = out.parent / line.split("](", 1)[1].rstrip(")")
        assert png.read_bytes().startswith(PNG_MAGIC)
    val = read_metrics(two_runs[1] / "metrics.jsonl")[-1]
    assert "| slow | 12 |" in text and f"{val['val_loss']:.4f}" in text
    assert not list(out.parent.rglob("*.tmp"))
    (out.parent / "report.md.tmp").write_text("the user's own file", encoding="utf-8")  # (was overwritten, renamed)
    render_report(list(two_runs), out)
    assert (out.parent / "report.md.tmp").read_text(encoding="utf-8") == "the user's own file"
    # the two runs share their data: its card once, then "same data as" (as the HTML page says it)
    assert text.count("## Data:") == 1 and "## Data: fast" in text and "slow: same data as fast." in text


def test_a_rerendered_markdown_report_drops_plots_it_no_longer_has(two_runs, tmp_path):
    """A Markdown report rendered again to the same --out, of a run without MFU numbers, left the earlier
    render's mfu.png in `_files/` beside the new report; it is removed, and a file of the user's there stays."""
    out = render_report([two_runs[0]], tmp_path / "report.md")
    assets = tmp_path / "report_files"
    assert (assets / "mfu.png").is_file()
    (assets / "mine.png").write_bytes(PNG_MAGIC)
    no_mfu = tmp_path / "no_mfu"
    shutil.copytree(two_runs[0], no_mfu)
    records = [json.loads(line) for line in (no_mfu / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    lines = [json.dumps({k: v for k, v in r.items() if k != "mfu"}) for r in records]
    (no_mfu / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    render_report([no_mfu], out)
    assert "mfu.png" not in out.read_text(encoding="utf-8") and not (assets / "mfu.png").exists()
    assert (assets / "loss_steps.png").is_file() and (assets / "mine.png").is_file()


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE stands in for a full disk")
def test_a_markdown_report_that_fails_to_write_leaves_nothing(two_runs, tmp_path):
    """On a full disk the Markdown report left `report_files/` with a half-written `loss_steps.png.tmp` (and,
    had more fit, some plots) but no report.md, and the error named no file. Now the folder it made is removed
    and the error names the plot."""
    from tests.conftest import file_size_limit

    out = tmp_path / "report.md"
    with file_size_limit(10_000), pytest.raises(OSError, match=r"No space left|too large") as e:
        render_report(list(two_runs), out)
    assert "report_files" in str(e.value) and ".png" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _files_under(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE stands in for a full disk")
def test_a_markdown_report_that_fails_over_an_earlier_one_keeps_the_earlier_page_and_plots(two_runs, tmp_path):
    """`report --out report.md` over an earlier report replaced the plots in `report_files/` one at a time before
    writing report.md, so a full disk part-way left the old page beside some new plots. The new set is now built
    beside and swapped in whole: whichever write fails (the build folder's marker, a plot, the page), the old page,
    its plots and the user's own file there are byte for byte as they were, and nothing else is left."""
    from tests.conftest import file_size_limit

    big = tmp_path / "runs" / "big"  # a long sample makes the page bigger than any plot: the page's write can fail
    shutil.copytree(two_runs[1], big)
    records = read_metrics(big / "metrics.jsonl")
    next(r for r in reversed(records) if "val_loss" in r)["sample"] = "to be or not to be\n" * 10_000
    (big / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    site = tmp_path / "site"
    out = render_report([two_runs[0]], site / "report.md")
    (site / "report_files" / "mine.txt").write_text("the user's own file", encoding="utf-8")
    before = _files_under(site)
    sizes = sorted(len(data) for name, data in before.items() if name.endswith(".png"))
    for limit in (1, sizes[len(sizes) // 2], 150_000):  # the marker, a plot part-way, the page after every plot
        with file_size_limit(limit), pytest.raises(OSError, match="File too large") as e:
            render_report([two_runs[0], big], out)
        assert _files_under(site) == before, limit
        assert sorted(p.name for p in site.iterdir()) == ["report.md", "report_files"], limit
        if limit == 150_000:
            assert e.value.filename == str(out)
    # (with room the new set replaces it: test_a_rerendered_markdown_report_drops_plots_it_no_longer_has)


def test_a_markdown_reports_files_folder_that_is_a_file_is_refused(two_runs, tmp_path):
    """A file named `report_files` where the plots go is the user's: refused in one line, and left as it was (the
    folder swap would have moved it aside and deleted it)."""
    (tmp_path / "report_files").write_text("mine", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"its plots go in .*report_files/, which is a file; move it or choose"):
        render_report([two_runs[0]], tmp_path / "report.md")
    assert [p.name for p in tmp_path.iterdir()] == ["report_files"]
    assert (tmp_path / "report_files").read_text(encoding="utf-8") == "mine"


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE stands in for a full disk")
def test_an_html_report_that_fails_over_an_earlier_one_keeps_it(two_runs, tmp_path):
    """The HTML report is one file (plots embedded): a write that fails leaves the earlier page as it was."""
    from tests.conftest import file_size_limit

    out = render_report([two_runs[0]], tmp_path / "report.html")
    before = out.read_bytes()
    with file_size_limit(len(before)), pytest.raises(OSError, match="File too large"):
        render_report(list(two_runs), out)  # two runs' curves: a bigger page
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_an_eval_before_the_first_logged_step_gets_its_own_tokens(two_runs, tmp_path):
    """With train.log_every 8 and eval.every 4 the eval at step 4 comes before any train record: it read
    the tokens of step 8 (np.interp holds the first value), as if it had seen twice the data."""
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    records = read_metrics(run / "metrics.jsonl")
    kept = [r for r in records if "loss" not in r or r["step"] in (8, 12)]  # what log_every 8 writes
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    per_step = next(r for r in kept if "loss" in r)["tokens"] // 8
    header, rows = eval_table(load_runs([run]))
    step, tokens = header.index("step"), header.index("tokens")
    assert {row[step][1]: row[tokens][1] for row in rows} == {4: 4 * per_step, 8: 8 * per_step, 12: 12 * per_step}


def test_a_diverged_runs_huge_numbers_fit_their_cells(two_runs, tmp_path):
    """A diverged run's val_ppl (capped at e^700 = 1.01e304) filled its table cell with 307 digits."""
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    records = read_metrics(run / "metrics.jsonl")
    last = next(r for r in reversed(records) if "val_loss" in r)
    last.update(val_loss=38552532648.0, val_ppl=math.exp(700.0))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    header, rows = eval_table(load_runs([run]))
    text, value = rows[-1][header.index("val_ppl")]
    assert (text, value) == ("1.014e+304", math.exp(700.0))  # the exact value stays in data-value
    assert rows[-1][header.index("val_loss")][0] == "3.855e+10"
    first = next(r for r in records if "val_ppl" in r)["val_ppl"]
    assert rows[0][header.index("val_ppl")][0] == f"{first:.2f}"  # ordinary numbers as before


def test_bad_input_is_one_line_error(two_runs, tmp_path):
    result = run_cli("report", str(two_runs[0]), str(tmp_path / "missing"), "--out", str(tmp_path / "r.html"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not an lmforge run directory" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(CheckpointError, match="not an lmforge run directory"):
        render_report([tmp_path], tmp_path / "r.html")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((two_runs[0] / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"has a config.json but none of the files a run writes"):
        render_report([empty], tmp_path / "r.html")  # (a model export has a config.json too)
    with pytest.raises(ConfigError, match="is a folder"):
        render_report([two_runs[0]], tmp_path)
    assert not (tmp_path / "r.html").exists()  # nothing half-written

    ok = run_cli("report", *map(str, two_runs), "--out", str(tmp_path / "cli.md"))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli_files" / "loss_steps.png").is_file()


def test_a_run_given_twice_is_refused_and_runs_whose_parents_share_a_name_stay_apart(two_runs, tmp_path):
    fast = two_runs[0]
    again = fast.parent / ".." / fast.parent.name / fast.name  # the same folder, spelt another way
    with pytest.raises(ConfigError, match=r"is given twice .*pass each run directory once"):
        load_runs([fast, two_runs[1], again])  # (was two identical rows and config columns under one name)
    for side in ("x", "y"):  # x/runs/fast and y/runs/fast: their parents' names match too
        shutil.copytree(fast, tmp_path / side / "runs" / "fast")
    paths = [tmp_path / "x" / "runs" / "fast", tmp_path / "y" / "runs" / "fast"]
    assert [run.name for run in load_runs(paths)] == [str(p) for p in paths]


def test_an_out_folder_gets_a_file_name_of_the_format_asked_for(two_runs, tmp_path):
    """`--out DIR --format md` suggested DIR/report.html, which would then write HTML."""
    for fmt, name in (("md", "report.md"), ("html", "report.html"), ("auto", "report.html")):
        with pytest.raises(ConfigError, match=re.escape(f"such as {tmp_path / name}") + "$"):
            render_report([two_runs[0]], tmp_path, fmt=fmt)


def test_a_run_that_crashed_before_its_first_log_is_a_row_of_the_comparison(two_runs, tmp_path):
    """`lmforge report runs/*` with one run that failed at start (config.json, empty metrics.jsonl) was refused
    as a whole; it is now a row with its status and a note, and so is a report of that run alone."""
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "config.json").write_text((two_runs[0] / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    (crashed / "metrics.jsonl").write_text("", encoding="utf-8")
    (crashed / "status.json").write_text('{"status": "failed", "pid": 1, "error": "boom"}', encoding="utf-8")
    result = run_cli("report", str(two_runs[0]), str(crashed), "--out", str(tmp_path / "r.md"))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "| crashed | pretrain | tiny | failed | 0/" in text
    assert "crashed: no steps logged yet (failed; its metrics.jsonl gets a line every" in text
    page = Page(render_report([crashed], tmp_path / "r2.html").read_text(encoding="utf-8"))  # alone too
    assert page.rows("summary")[0]["status"][0] == "failed"


def test_an_out_that_is_a_file_of_a_run_is_refused(two_runs, tmp_path):
    """`--out RUN/config.json --format html` and `--out RUN/checkpoints/latest` (no suffix: HTML) replaced
    the run's own files with the report; a new file or an earlier report in the run folder is fine."""
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for out, fmt in [(run / "config.json", "html"), (run / "checkpoints" / "latest", "auto"), (run / "x.json", "md")]:
        if not out.exists():
            out.write_text("{}", encoding="utf-8")
            before[out] = b"{}"
        with pytest.raises(ConfigError, match="is a file of the run .*; name a new file"):
            render_report([run], out, fmt=fmt)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    render_report([run], run / "report.html")
    render_report([run], run / "report.html")  # re-rendered over itself


def test_an_out_that_is_a_symbolic_link_loop_is_refused_in_one_line(two_runs, tmp_path, capsys):
    """`report --out loop` (`ln -s loop loop`) replaced the link with the report without a word, where every other
    command refuses a link loop in one line; it does too now, and the link stays."""
    from lmforge.cli import main

    loop = tmp_path / "loop.html"
    loop.symlink_to(loop)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(two_runs[0]), "--out", str(loop)])
    said = "is a symbolic link loop (its links lead back to themselves); fix or remove the link"
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"lmforge: error: {loop} {said}\n"
    assert loop.is_symlink() and os.readlink(loop) == str(loop) and sorted(tmp_path.iterdir()) == [loop]


def test_an_out_that_is_not_a_report_takes_overwrite(two_runs, tmp_path):
    """`report --out notes.md` replaced a user's own notes.md (or index.html, or a file with no suffix) without a
    word; it is refused unless --overwrite, and an earlier report is still re-rendered over without the flag."""
    run = tmp_path / "new"  # a run that has logged nothing yet (as --watch reads it): a page without plots, quick
    run.mkdir()
    shutil.copy(two_runs[0] / "config.json", run / "config.json")
    (run / "metrics.jsonl").write_text("", encoding="utf-8")
    for name in ("notes.md", "index.html", "notes"):
        (tmp_path / name).write_text("my own notes\n", encoding="utf-8")
        with pytest.raises(ConfigError, match="is not an lmforge report; .* pass --overwrite"):
            render_report([run], tmp_path / name)
        assert (tmp_path / name).read_text(encoding="utf-8") == "my own notes\n"
    assert not (tmp_path / "notes_files").exists()
    result = run_cli("report", str(two_runs[0]), "--out", str(tmp_path / "index.html"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not an lmforge report" in result.stderr

    for name in ("notes.md", "index.html"):
        out = render_report([run], tmp_path / name, overwrite=True)
        assert "lmforge report: new" in out.read_text(encoding="utf-8")
        render_report([run], out)  # an earlier report: re-rendered without the flag


@pytest.mark.slow
def test_watch_follows_a_live_run(data_dir, tmp_path):
    """A CLI training run in a subprocess (~6 s): the page refreshes itself while it runs, not after."""
    run, out = tmp_path / "live", tmp_path / "live.html"
    args = [
        "pretrain", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--model.n_layer", "2",
        "--model.d_model", "32", "--model.max_seq_len", "32", "--train.batch_size", "8", "--train.max_steps", "200",
        "--train.log_every", "10", "--eval.every", "100", "--eval.max_batches", "2", "--quiet",
    ]  # fmt: skip
    proc = start_cli(*args)  # (forked from the tests' zygote, which has imported torch and matplotlib)
    try:
        deadline = time.time() + 60
        while run_status(run) != "running" or not read_metrics(run / "metrics.jsonl"):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.05)
        assert watch([run], out, every_s=2, max_renders=1, echo=False) == 1
        assert Page(out.read_text(encoding="utf-8")).refresh == "2"  # live: the browser reloads it
        renders = watch([run], out, every_s=0.2, echo=False)  # returns by itself when the run ends
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    page = Page(out.read_text(encoding="utf-8"))
    assert renders >= 1 and page.refresh is None
    assert page.rows("summary")[0]["status"][0] == "finished"
    assert page.rows("summary")[0]["steps"][0] == "200/200"


def test_watch_follows_a_run_before_its_first_log_line(data_dir, tmp_path):
    """What `pretrain` has written before its first `log_every` steps (config.json, status.json running, no
    metrics.jsonl): `report --watch` refused it as "not an lmforge run directory" and `lmforge runs` left it out;
    it is a live, empty row."""
    from lmforge.atomic import write_json
    from lmforge.runs import find_runs, mark_running

    run, out = tmp_path / "starting", tmp_path / "live.html"
    run.mkdir()
    write_json(run / "config.json", tiny_config(data_dir, run).to_dict())
    mark_running(run)  # this process: alive, so the run is running
    assert find_runs(tmp_path) == [run]  # `lmforge runs`
    assert watch([run], out, every_s=2, max_renders=1, echo=False) == 1
    page = Page(out.read_text(encoding="utf-8"))
    assert page.refresh == "2"
    assert page.rows("summary")[0]["status"][0] == "running"
    assert page.rows("summary")[0]["steps"][0] == "0/12"
    # without --watch too: what a user expects right after starting a run (it was "nothing to report until the
    # run logs a step"), with a line saying when there will be more
    text = render_report([run], tmp_path / "report.html").read_text(encoding="utf-8")
    assert Page(text).rows("summary")[0]["status"][0] == "running" and Page(text).refresh is None
    assert "starting: no steps logged yet (running; its metrics.jsonl gets a line every" in text
    (run / "status.json").unlink()  # killed while setting up: config.json and env.json only
    write_json(run / "env.json", {"command": "lmforge pretrain ..."})
    assert "| starting | pretrain | tiny | unknown | 0/12 |" in render_report([run], tmp_path / "r.md").read_text(
        encoding="utf-8"
    )


def test_watch_stopped_by_ctrl_c_says_it_wrote_a_page_that_no_longer_reloads(data_dir, tmp_path, capsys, monkeypatch):
    from lmforge import report
    from lmforge.atomic import write_json
    from lmforge.runs import mark_running

    run, out = tmp_path / "live", tmp_path / "live.html"
    run.mkdir()
    write_json(run / "config.json", tiny_config(data_dir, run).to_dict())
    mark_running(run)  # this process: alive, so the run is running

    def ctrl_c(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(report.time, "sleep", ctrl_c)
    assert watch([run], out, every_s=2) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].endswith(f"wrote {out} (stopped; the page no longer reloads)"), lines
    assert Page(out.read_text(encoding="utf-8")).refresh is None


@pytest.mark.parametrize("every", [math.nan, math.inf, 1e308])
def test_watch_refuses_an_interval_that_is_not_a_usable_number_of_seconds(data_dir, tmp_path, every):
    """--every nan passed the `<= 0` check, inf and 1e308 any `> 0` one; on a live run each then failed with a
    traceback (the page's refresh tag: "cannot convert float NaN to integer"; time.sleep: "timestamp out of
    range"). A one-line error now, before anything is written."""
    from lmforge.atomic import write_json
    from lmforge.runs import mark_running

    run, out = tmp_path / "live", tmp_path / "live.html"
    run.mkdir()
    write_json(run / "config.json", tiny_config(data_dir, run).to_dict())
    mark_running(run)
    with pytest.raises(ConfigError, match=r"--every must be a number of seconds > 0 and at most 86400"):
        watch([run], out, every_s=every, max_renders=2, echo=False)
    assert not out.exists()


def test_every_without_watch_is_refused(tmp_path, capsys):
    """`report RUN --every 5` without --watch rendered once and ignored --every; refused in one line, before any
    run is read (so the runs need not exist here)."""
    from lmforge.cli import main

    out = tmp_path / "r.html"
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "run"), "--out", str(out), "--every", "10"])
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err == "lmforge: error: --every is the seconds between renders with --watch; add --watch or drop it\n"
    )
    assert not out.exists()


@pytest.mark.skipif(find_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_report_in_headless_chromium(two_runs, tmp_path):
    out = render_report(list(two_runs), tmp_path / "report.html")
    with Browser(find_chromium(), width=1280, height=900) as browser:
        result = browser.open(out.resolve().as_uri())
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report-chromium.png").write_bytes(result.screenshot)

    assert result.errors == []  # console errors/warnings, exceptions, failed loads
    assert all(u.startswith(("file:", "data:")) for u in result.requests)  # no network
    images = result.probe["images"]
    assert len(images) == len(PLOTS) and all(done and width > 0 for done, width in images)  # every PNG decoded
    tables = dict(result.probe["tables"])
    assert tables["summary"] == 3 and tables["evals"] == 7  # header + rows, as the browser parsed them
    assert result.screenshot.startswith(PNG_MAGIC) and result.probe["height"] > 2000


def test_markdown_shows_names_and_samples_as_written(two_runs, tmp_path):
    """A run folder named `x<b>|*y*` and a sample holding ``` and ~~~~ lines render literally: no HTML tag, no
    emphasis, no extra table column, and the sample's fence is not closed early."""
    markdown_it = pytest.importorskip("markdown_it")
    name, sample = "x<b>|*y* &amp; $z$", "a\n```\nb\n~~~~\n~~~~~~ c <i>"
    odd = tmp_path / "dir with space" / name
    shutil.copytree(two_runs[0], odd)
    rows = (odd / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.dumps({**json.loads(r), "sample": sample}) if "sample" in r else r for r in rows]
    (odd / "metrics.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = render_report([odd], tmp_path / "my report.md")
    page = markdown_it.MarkdownIt("commonmark").enable("table").render(out.read_text(encoding="utf-8"))
    assert "<b>" not in page and "<i>" not in page and "<em>" not in page
    assert f"<h1>lmforge report: {html.escape(name, quote=False)}</h1>" in page
    assert f"<td>{html.escape(name, quote=False)}</td>" in page  # one cell, not split at the |
    assert page.count(f'<pre><code class="language-text">{html.escape(sample, quote=False)}\n</code></pre>') == 3
    for line in out.read_text(encoding="utf-8").splitlines():
        if line.startswith("!["):
            assert (out.parent / urllib.parse.unquote(line.split("](", 1)[1].rstrip(")"))).is_file()


def test_a_chinese_run_name_that_the_charts_cannot_draw_gets_a_note(two_runs, tmp_path, capsys, monkeypatch):
    """Run names label the report's curves and title loss.png: without a CJK font a run named 红楼梦 shows as
    boxes, which one stderr line says (as confusion.png does for Chinese class names)."""
    import lmforge.plotting
    from lmforge.report import plot_loss

    run = tmp_path / "红楼梦"
    shutil.copytree(two_runs[0], run)
    for draw in (
        lambda: render_report([run], tmp_path / "r.html"),
        lambda: plot_loss(run / "metrics.jsonl", run / "l.png"),
    ):
        monkeypatch.setattr(lmforge.plotting, "_noted", False)
        capsys.readouterr()
        draw()
        assert ("no CJK font is installed" in capsys.readouterr().err) == (lmforge.plotting._cjk_font is None)
    monkeypatch.setattr(lmforge.plotting, "_noted", False)
    render_report(list(two_runs), tmp_path / "plain.html")
    assert "no CJK font" not in capsys.readouterr().err


def test_a_fine_tune_shows_its_final_task_metrics(two_runs, tmp_path):
    """metrics.jsonl holds only val_loss (and val_accuracy) per evaluation; a fine-tune's final accuracy, macro-F1,
    BLEU, chrF, EM/F1 or reward accuracy are in its eval.json, which the report did not show, so two fine-tunes
    could not be compared on their task. The table holds eval.json's numbers; a pretraining run has no row."""
    from lmforge.finetune import FinetuneConfig, finetune
    from tests.test_finetune import DATA, make_base

    two_steps = {"train": {"max_steps": 2, "batch_size": 4, "log_every": 1, "warmup_steps": 0}}

    base = make_base(tmp_path)
    runs = {"classify": tmp_path / "classify", "qa": tmp_path / "qa"}
    finetune(
        base, train_file=DATA / "sentiment_train.csv", val_file=DATA / "sentiment_val.jsonl", out=runs["classify"],
        cfg=FinetuneConfig(task="classify"), overrides=two_steps, progress=False,
    )  # fmt: skip
    qa = FinetuneConfig(task="qa", eval_samples=2, max_new_tokens=4)  # (a .txt: question<TAB>answer)
    pairs = DATA / "eng_fra.txt"
    finetune(base, train_file=pairs, val_file=pairs, out=runs["qa"], cfg=qa, overrides=two_steps, progress=False)
    header, rows = task_table(load_runs([two_runs[0], runs["classify"], runs["qa"]]))
    table = {row[0][0]: dict(zip(header, row, strict=True)) for row in rows}
    assert list(table) == ["classify", "qa"]  # the pretraining run has no task metrics
    for name in ("classify", "qa"):
        val = json.loads((runs[name] / "eval.json").read_text(encoding="utf-8"))["val"]
        keys = ["accuracy", "macro_f1"] if name == "classify" else ["em", "f1"]
        assert {k: table[name][k][1] for k in keys + ["n"]} == {k: val[k] for k in keys + ["n"]}
    assert table["qa"]["accuracy"] == ("-", None) and table["classify"]["task"][0] == "classify"
    # no samples: the hint fits the run kind (finetune refuses --eval.sample_tokens, which the hint used to suggest)
    page = render_html(load_runs([runs["classify"], runs["qa"]]))
    # a classifier's confusion matrix (eval.json's counts; the report showed none of it), one table, names escaped
    val = json.loads((runs["classify"] / "eval.json").read_text(encoding="utf-8"))["val"]
    grid = Page(page).tables["confusion-1"]
    assert [c[0] for c in grid[0]] == ["true \\ predicted", *val["labels"]] and "confusion-2" not in page
    assert [[int(c[1]) for c in row[1:]] for row in grid[1:]] == val["confusion"]
    md = render_report([runs["classify"]], tmp_path / "c.md").read_text(encoding="utf-8")
    assert "### Confusion matrix: classify" in md and f"| {val['labels'][0]} | {val['confusion'][0][0]} |" in md
    assert "No samples: a fine-tune logs none (its --val answers are scored at the end: Task metrics).</p>" in page
    assert "sample_tokens" not in page.split("<h2>Samples</h2>")[1]
    mixed = load_runs([two_runs[0], runs["qa"]])
    mixed[0].evals = [{k: v for k, v in r.items() if k != "sample"} for r in mixed[0].evals]  # a run without any
    assert "No samples: pretrain with <code>--eval.sample_tokens 200</code> to log one per evaluation; a fine-tune" in (
        render_html(mixed)
    )


def test_an_old_config_without_a_version_is_compared_as_training_reads_it(two_runs, tmp_path):
    """A config.json saved before config_version 2 with min_lr 0 decayed to lr / 10, as min_lr unset (None) does
    now: the report listed train.min_lr 0.0 vs None (and config_version absent vs 2) as differences; it compares
    them as training reads them. min_lr 0 in a new config (a decay to zero) still differs from unset."""
    from lmforge.report import config_differences

    saved = json.loads((two_runs[0] / "config.json").read_text(encoding="utf-8"))
    assert saved["config_version"] == 2 and saved["train"]["min_lr"] is None
    runs = {}
    for name, version, min_lr in [("old", None, 0.0), ("new", 2, None), ("to-zero", 2, 0.0)]:
        run = tmp_path / name
        shutil.copytree(two_runs[0], run)
        config = {k: v for k, v in saved.items() if k != "config_version"}
        config["train"] = {**saved["train"], "min_lr": min_lr}
        if version is not None:
            config["config_version"] = version
        (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
        runs[name] = run
    assert config_differences(load_runs([runs["old"], runs["new"]])) == []
    assert config_differences(load_runs([runs["old"], runs["to-zero"]])) == [("train.min_lr", [None, 0.0])]


def test_a_quantized_copy_and_a_fine_tune_read_as_what_they_are(two_runs, tmp_path):
    """Comparing runs of different kinds: a quantized copy read as a pretraining run that had not logged a step
    yet, and a setting a fine-tune has no section for (data.dir) read "null", as a setting left unset does."""
    from lmforge.compress.quantize import quantize_run
    from lmforge.finetune import FinetuneConfig, finetune
    from lmforge.report import ABSENT, config_differences
    from tests.test_finetune import DATA, FAST, make_base

    fast, q8, sft = two_runs[0], tmp_path / "q8", tmp_path / "sft"
    quantize_run(fast, q8, bits=8, compare=False)
    finetune(make_base(tmp_path), train_file=DATA / "chat.jsonl", out=sft, cfg=FinetuneConfig(task="sft"),
             overrides=FAST, progress=False)  # fmt: skip
    runs = load_runs([fast, q8, sft])
    assert [run.summary.kind for run in runs] == ["pretrain", "pretrain, int8", "finetune sft full"]
    dirs = dict(config_differences(runs))["data.dir"]
    assert dirs[0] == dirs[1] == runs[0].config["data"]["dir"] and dirs[2] is ABSENT
    text = render_report([fast, q8, sft], tmp_path / "r.md").read_text(encoding="utf-8")
    assert "q8: a quantized copy; its training metrics are its original's" in text
    assert "no steps logged yet" not in text
    (row,) = [line for line in text.splitlines() if line.startswith("| data.dir |")]
    assert row.endswith(" | - |") and "null" not in row


def test_a_task_loss_says_what_it_is_per(tmp_path):
    """A classify fine-tune logs its val_loss per example (over its classes), an sft one per answer token, a
    pretraining run per token of its corpus: `runs` and the report showed all three as a bare "best val loss" and
    the loss plots' axis said nats/token for each. A task loss now carries its unit, and the axis says it."""
    from lmforge.report import plot_panels, summary_table
    from lmforge.runs import format_runs, list_runs

    for name, task, loss in [("pre", None, 2.5), ("cls", "classify", 0.6931), ("sft", "sft", 1.25)]:
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"preset": "tiny", "train": {"max_steps": 2}}), encoding="utf-8")
        if task:
            (run / "finetune.json").write_text(json.dumps({"task": task, "adapt": "full"}), encoding="utf-8")
        records = [{"step": 2, "loss": loss + 0.1, "tokens": 64}, {"step": 2, "val_loss": loss}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    rows = {line.split()[0]: line for line in format_runs(list_runs(tmp_path / "runs")).splitlines()[1:]}
    assert "  2.5000  " in rows["pre"] and "(" not in rows["pre"]
    assert "  0.6931 (nats/example)  " in rows["cls"] and "  1.2500 (nats/answer token)  " in rows["sft"]
    runs = load_runs([tmp_path / "runs" / name for name in ("pre", "cls", "sft")])
    header, table = summary_table(runs)
    best = header.index("best val loss")
    assert [row[best] for row in table] == [("2.5000", 2.5), ("0.6931 (nats/example)", 0.6931),
                                            ("1.2500 (nats/answer token)", 1.25)]  # fmt: skip
    header, table = eval_table(runs)
    assert [row[header.index("val_loss")][0] for row in table] == [row[best][0] for row in summary_table(runs)[1]]
    loss_plot = PLOTS[0]
    assert [label for label, _ in plot_panels(loss_plot, runs[:1])] == ["loss (nats/token)"]
    assert [label for label, _ in plot_panels(loss_plot, runs[1:2])] == ["loss (nats/example)"]
    assert [label for label, _ in plot_panels(loss_plot, runs)] == [
        "loss (nats/answer token)", "loss (nats/example)", "loss (nats/token)"
    ]  # fmt: skip
    assert [label for label, _ in plot_panels(PLOTS[3], runs)] == ["learning rate"]


def test_losses_in_other_units_get_their_own_panel_and_legends_cover_no_data(tmp_path):
    """An ELECTRA run's loss (~40: MLM + 50 x RTD) shared the y axis of GPT runs' ~3 nats/token, flattening
    their curves to a line at the bottom, and the legend sat on the curves. Each loss unit now has its own panel
    (its own y axis, labelled with the unit), and every legend is outside its axes, on the right."""
    from lmforge.plotting import pyplot
    from lmforge.report import plot_figure

    for name, objective, loss in [("gpt-a", None, 3.0), ("gpt-b", None, 2.5), ("electra", "electra", 40.0)]:
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        config = {"preset": "tiny", "train": {"max_steps": 4}}
        if objective:
            config["objective"] = {"name": objective, "rtd_weight": 50.0}
        (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
        records = [{"step": s, "loss": loss + 1 / s, "tokens": 64 * s} for s in range(1, 5)]
        records.append({"step": 4, "val_loss": loss})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    runs = load_runs([tmp_path / "runs" / name for name in ("gpt-a", "gpt-b", "electra")])
    fig = plot_figure(PLOTS[0], runs)
    try:
        fig.canvas.draw()
        axes = fig.get_axes()
        assert len(axes) == 2
        drawn = [{line.get_label().split()[0] for line in ax.get_lines()} for ax in axes]
        assert drawn == [{"electra"}, {"gpt-a", "gpt-b"}]
        assert axes[0].get_ylabel().replace("\n", " ") == "loss (MLM nats/masked token + 50 x RTD nats/token)"
        assert axes[1].get_ylabel() == "loss (nats/token)"
        assert axes[1].get_ylim()[1] < 5  # the GPT curves fill their own axis
        for ax in axes:
            legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
            assert legend.x0 >= box.x1  # right of the plotting area: on no curve
            assert legend.x1 <= fig.bbox.x1  # and inside the picture
    finally:
        pyplot().close(fig)


def test_config_differences_compare_the_model_as_built_and_show_an_empty_preset_as_a_dash(tmp_path):
    """model.d_ff 0 means 4 x d_model: 0 and 192 of a 48-wide model are one model, yet the table listed them as a
    difference; and an imported run's empty preset was an empty cell. A derived 0 now compares as the value the
    model was built with and shows as "0 (=192)"; an empty preset shows as "-"."""
    from lmforge.report import config_differences

    for name, preset, d_ff in [("zero", "tiny", 0), ("same", "tiny", 192), ("other", "", 100)]:
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        config = {"preset": preset, "model": {"family": "gpt", "d_model": 48, "n_head": 2, "d_ff": d_ff}}
        (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "tokens": 64}) + "\n", encoding="utf-8")
    zero, same, other = load_runs([tmp_path / "runs" / name for name in ("zero", "same", "other")])
    assert config_differences([zero, same]) == []  # the same model
    assert dict(config_differences([zero, other])) == {"model.d_ff": ["0 (=192)", 100], "preset": ["tiny", ""]}
    assert dict(config_differences([zero]))["model.d_ff"] == ["0 (=192)"]
    page = Page(render_html([zero, other]))
    assert {row["setting"][0]: (row["zero"][0], row["other"][0]) for row in page.rows("config")} == {
        "model.d_ff": ("0 (=192)", "100"),
        "preset": ("tiny", "-"),
    }
