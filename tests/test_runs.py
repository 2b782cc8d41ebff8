"""`lmforge runs`: status of real runs (running, interrupted by SIGINT, killed by SIGKILL, failed,
finished), the table and --json; and the training-time signals in metrics.jsonl (update ratio against
checkpoint weights, grad norm before clipping, memory, skipped NaN steps)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import CheckpointConfig, EvalConfig, OptimConfig, TrainConfig
from lmforge.log import RunLogger, read_metrics, rerun_command
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.objectives import CausalLM
from lmforge.runs import RunSummary, format_runs, list_runs, mark_running, mark_stopped, run_status
from lmforge.train.loop import train
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import pick_precision
from lmforge.train.run import pretrain
from lmforge.train.state import TrainState
from tests.conftest import REPO, run_cli, start_cli, tiny_config


def _start_args(data_dir, run, checkpoint_every=1000):
    return [
        "pretrain", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--model.n_layer", "2",
        "--model.d_model", "32", "--model.max_seq_len", "32", "--train.batch_size", "8", "--train.max_steps", "100000",
        "--train.log_every", "1", "--eval.every", "0", "--checkpoint.every", str(checkpoint_every), "--quiet",
    ]  # fmt: skip


def _start(data_dir, run, checkpoint_every=1000):
    return start_cli(*_start_args(data_dir, run, checkpoint_every))


def _wait_for_steps(run, n, proc, timeout=60):
    deadline = time.time() + timeout
    while len([r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]) < n:
        assert proc.poll() is None and time.time() < deadline, "training did not get going"
        time.sleep(0.05)


@pytest.mark.slow
def test_status_running_interrupted_failed_finished(data_dir, tmp_path):
    """Three CLI processes (~12 s): SIGINT gives "interrupted", SIGKILL "failed" like a run that recorded an
    exception, each with a line under the table saying how it ended and that a re-run resumes it from its
    last checkpoint."""
    root = tmp_path / "runs"
    stopped, killed, done = root / "stopped", root / "group" / "killed", root / "done"
    crashed = root / "crashed"

    proc = _start(data_dir, stopped)
    _wait_for_steps(stopped, 3, proc)
    assert run_status(stopped) == "running"
    # a second training of the same folder, or an --overwrite of it, is refused while the first runs
    for extra in ([], ["--overwrite"]):
        second = run_cli("pretrain", "--data", str(data_dir), "--out", str(stopped), "--preset", "tiny", *extra)
        assert second.returncode == 2 and "is being trained by another process" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    assert proc.poll() is None and (stopped / "config.json").is_file()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert run_status(stopped) == "interrupted"

    proc = _start(data_dir, killed, checkpoint_every=2)
    _wait_for_steps(killed, 3, proc)
    running = {r.name: r for r in list_runs(root)}
    assert running["group/killed"].status == "running" and running["group/killed"].step >= 3
    proc.kill()
    proc.wait(timeout=30)
    assert json.loads((killed / "status.json").read_text(encoding="utf-8"))["status"] == "running"
    assert run_status(killed) == "failed"  # status.json still says running, but its pid is gone
    shutil.copytree(stopped, crashed)  # a run that recorded an exception (as `pretrain` does on one) stays "failed"
    mark_stopped(crashed, "failed", error="RuntimeError: boom")
    assert run_status(crashed) == "failed"

    pretrain(tiny_config(data_dir, done), progress=False)
    result = run_cli("runs", str(root), "--json")
    assert result.returncode == 0, result.stderr
    runs = {r["name"]: r for r in json.loads(result.stdout)}
    assert {k: r["status"] for k, r in runs.items()} == {
        "crashed": "failed",
        "done": "finished",
        "group/killed": "failed",
        "stopped": "interrupted",
    }
    metrics = read_metrics(done / "metrics.jsonl")
    assert runs["done"]["step"] == 12 and runs["done"]["max_steps"] == 12 and runs["done"]["preset"] == "tiny"
    assert runs["done"]["tokens"] == [r for r in metrics if "loss" in r][-1]["tokens"]
    assert runs["done"]["best_val_loss"] == min(r["val_loss"] for r in metrics if "val_loss" in r)
    assert runs["done"]["last_checkpoint"] == "step-000012"
    assert runs["stopped"]["last_checkpoint"] == f"step-{runs['stopped']['step']:06d}"  # saved where it stopped
    assert {k: r["failure"] for k, r in runs.items()} == {
        "crashed": "RuntimeError: boom",
        "done": "",
        "group/killed": "killed",
        "stopped": "",
    }

    killed_at, stopped_at = runs["group/killed"]["last_checkpoint"], runs["stopped"]["last_checkpoint"]
    assert killed_at and (killed / "checkpoints" / killed_at / "state.json").is_file()
    table = run_cli("runs", str(root))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["run", "kind", "preset", "status"] and len(lines) == 8
    assert lines[2].split()[:5] == ["done", "pretrain", "tiny", "finished", "12/12"]
    assert lines[3].split()[:4] == ["group/killed", "pretrain", "tiny", "failed"]
    # the line names the command to re-run as typed (`python -m lmforge`'s argv[0] is lmforge/__main__.py)
    commands = {r: json.loads((r / "env.json").read_text(encoding="utf-8"))["command"] for r in (stopped, killed)}
    assert commands[killed] == shlex.join(["lmforge", *_start_args(data_dir, killed, checkpoint_every=2)])
    assert runs["group/killed"]["command"] == commands[killed] and runs["group/killed"]["cwd"] == str(REPO)
    resume = {r: f"re-run `{commands[r]}` in {REPO} to resume from" for r in (stopped, killed)}
    assert lines[5:] == [  # how each run that did not finish ended, and what a re-run does
        f"crashed: failed: RuntimeError: boom; {resume[stopped]} {stopped_at}",  # (a copy of stopped)
        f"group/killed: failed: its process died without a word (killed: SIGKILL, the OOM killer, a power cut); "
        f"{resume[killed]} {killed_at}",
        f"stopped: interrupted; {resume[stopped]} {stopped_at}",
    ]


def test_a_new_run_reads_as_running_from_its_first_config_json(data_dir, tmp_path, monkeypatch):
    """config.json was written before env.json, whose capture took seconds on a loaded machine: in between, a run
    folder without status.json read as "unknown" (the lock is trusted for env.json's host only), and a
    `report --watch` begun then said "no run is running; done" and quit."""
    import lmforge.train.run as run_module

    run, seen = tmp_path / "run", []
    write_json = run_module.write_json

    def checking_write_json(path, data):
        write_json(path, data)
        if Path(path) == run / "config.json" and not (run / "status.json").exists():
            seen.append(run_status(run))

    monkeypatch.setattr(run_module, "write_json", checking_write_json)
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 1}), progress=False)
    assert seen == ["running"]
    assert run_status(run) == "finished"


def test_rerun_of_a_run_that_died_after_its_last_checkpoint_marks_it_finished(data_dir, tmp_path):
    """A run killed after writing its final checkpoint (under torchrun: a peer's SIGKILL while the last step's
    collectives ran) is "failed", and `runs` says to re-run it; the re-run has nothing to train and used to
    leave it "failed" for good. It now records the run as finished."""
    run = tmp_path / "run"
    cfg = tiny_config(data_dir, run, **{"train.max_steps": 2, "checkpoint.every": 2, "eval.every": 0})
    pretrain(cfg, progress=False)
    mark_running(run)  # what a SIGKILL leaves: status.json says running, its pid is gone
    (run / "status.json").write_text(
        json.dumps({**json.loads((run / "status.json").read_text(encoding="utf-8")), "pid": 2**22 + 1})
    )
    assert run_status(run) == "failed"
    assert pretrain(cfg, progress=False).step == 2  # nothing to do
    assert run_status(run) == "finished"


def test_runs_table_is_formatted_from_the_summaries_alone(tmp_path):
    """How a failed run ended is decided with its status, once, into its summary (`failure`, a key of --json):
    `format_runs` read status.json a second time, so its line could disagree with the row above it."""
    root = tmp_path / "runs"
    for name in ("crashed", "killed", "stopped"):
        (root / name).mkdir(parents=True)
        config = {"preset": "tiny", "train": {"max_steps": 10}}
        (root / name / "config.json").write_text(json.dumps(config), encoding="utf-8")
        (root / name / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 3.0}) + "\n", encoding="utf-8")
    mark_running(root / "crashed")
    mark_stopped(root / "crashed", "failed", error="RuntimeError: boom\nTraceback (most recent call last): ...")
    mark_running(root / "stopped")
    mark_stopped(root / "stopped", "interrupted", stop_reason="interrupted")
    killed = f"from lmforge.runs import mark_running; mark_running({str(root / 'killed')!r})"
    subprocess.run([sys.executable, "-c", killed], cwd=REPO, check=True)  # said "running", ended without a word
    runs = list_runs(root)
    assert {r.name: (r.status, r.failure) for r in runs} == {
        "crashed": ("failed", "RuntimeError: boom"),
        "killed": ("failed", "killed"),
        "stopped": ("interrupted", ""),
    }
    assert list(runs[0].to_dict()) == [
        "name", "path", "preset", "status", "step", "max_steps", "tokens", "best_val_loss", "elapsed_s",
        "last_checkpoint", "error", "failure", "command", "cwd", "kind", "loss_unit",
    ]  # fmt: skip
    table = format_runs(runs)
    over = "it saved no checkpoint, so re-running its command (argv in its env.json) starts it over"
    assert table.splitlines()[4:] == [
        f"crashed: failed: RuntimeError: boom; {over}",
        f"killed: failed: its process died without a word (killed: SIGKILL, the OOM killer, a power cut); {over}",
        f"stopped: interrupted; {over}",
    ]
    for name in ("crashed", "killed"):  # the files change after the summary: the table is still the summary's
        (root / name / "status.json").unlink()
    assert format_runs(runs) == table


def test_runs_table_lines_up_with_chinese_run_names():
    """A CJK character takes two terminal columns: the columns after a run named 红楼梦 start where the header's do."""
    from lmforge.log import display_width

    row = dict(path="", preset="tiny", status="finished", step=2, max_steps=2, tokens=4096, best_val_loss=8.0)
    runs = [RunSummary(name=name, elapsed_s=1.0, last_checkpoint="step-000002", **row) for name in ("红楼梦", "en")]
    lines = format_runs(runs).splitlines()
    starts = {display_width(line[: line.index("tiny")]) for line in lines[1:]}
    assert starts == {display_width(lines[0][: lines[0].index("preset")])}


def test_a_nan_val_loss_is_not_the_best(tmp_path):
    """`lmforge runs` and the report's "best val loss" showed NaN when the first evaluation was NaN (min keeps it)."""
    from lmforge.runs import summarize

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"preset": "tiny", "train": {"max_steps": 4}}', encoding="utf-8")
    records = [{"step": 2, "val_loss": float("nan")}, {"step": 4, "val_loss": 3.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert summarize(run).best_val_loss == 3.5


def test_files_saved_with_a_bom_and_crlf_are_read(tmp_path):
    """A config.json or metrics.jsonl saved by a Windows editor (BOM, CRLF): `pretrain` reads such a config, but
    `runs` and `report` lost it (preset "-", no target step) and the first metrics record (the step's loss)."""
    from lmforge.report import load_run
    from lmforge.runs import summarize

    run = tmp_path / "run"
    run.mkdir()
    bom = "\ufeff"
    (run / "config.json").write_text(bom + '{"preset": "tiny", "train": {"max_steps": 4}}', encoding="utf-8")
    (run / "status.json").write_text(bom + '{"status": "finished"}', encoding="utf-8")
    records = [{"step": 2, "loss": 4.25, "tokens": 64}, {"step": 2, "val_loss": 4.5}]
    lines = bom + "".join(json.dumps(r) + "\r\n" for r in records)
    (run / "metrics.jsonl").write_bytes(lines.encode("utf-8"))
    summary = summarize(run)
    assert (summary.preset, summary.status, summary.step, summary.max_steps) == ("tiny", "finished", 2, 4)
    assert summary.tokens == 64 and summary.best_val_loss == 4.5
    assert load_run(run).train == records[:1]


def test_runs_json_help_names_every_field():
    """`runs --help` listed the --json fields but not `command` and `cwd`, which the README documents."""
    import dataclasses

    from lmforge.cli import _subparser, build_parser

    text = " ".join(_subparser(build_parser(), "runs").format_help().split())
    for field in dataclasses.fields(RunSummary):
        assert re.search(rf"\b{field.name}\b", text), field.name


def test_runs_bad_dir_is_one_line_error(tmp_path):
    result = run_cli("runs", str(tmp_path / "nope"))
    assert result.returncode == 2 and "is not a folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list_runs(tmp_path) == []


def test_signals_in_metrics(data_dir, tmp_path):
    """update_ratio equals ||w_k - w_(k-1)|| / ||w_k|| from the saved weights; grad_norm is pre-clipping."""
    run = tmp_path / "run"
    pretrain(
        tiny_config(data_dir, run, **{"optim.grad_clip": 0.05, "checkpoint.every": 1, "checkpoint.keep": 20}),
        progress=False,
    )
    train_records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(train_records) == 12
    for record in train_records:
        assert record["grad_norm"] > 0.05  # logged before clipping to 0.05
        assert record["skipped_steps"] == 0 and record["loss_spike"] is False
        assert 10 < record["mem_mib"] < 100_000  # RSS of this process, in MiB
    for step in (2, 7, 12):
        old = load_file(str(run / "checkpoints" / f"step-{step - 1:06d}" / "model.safetensors"))
        new = load_file(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))
        delta = math.sqrt(sum(float(((new[k].double() - old[k].double()) ** 2).sum()) for k in new))
        norm = math.sqrt(sum(float((new[k].double() ** 2).sum()) for k in new))
        # float32 norms in the loop vs float64 here: agree to ~1e-6 relative
        assert train_records[step - 1]["update_ratio"] == pytest.approx(delta / norm, rel=1e-4)


class NaNOnStep(CausalLM):
    """Causal LM whose loss is NaN on one step: what an overflow looks like to the loop."""

    def __init__(self, bad_step: int) -> None:
        self.calls, self.bad_step = 0, bad_step

    def loss(self, model, batch):
        self.calls += 1
        loss = super().loss(model, batch)
        return loss * float("nan") if self.calls == self.bad_step else loss


def test_nan_gradient_step_is_skipped_and_counted(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, d_model=16, max_seq_len=16))
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    batches = [(x[:, :-1], x[:, 1:]) for x in (torch.randint(0, 40, (4, 13), generator=g) for _ in range(4))]
    cfg = TrainConfig(max_steps=4, batch_size=4, lr=1e-2, warmup_steps=0, schedule="constant", log_every=1)
    optim_cfg = OptimConfig()
    log = RunLogger(tmp_path / "metrics.jsonl", max_steps=4, start_step=0, console=False)
    state = train(
        model,
        build_optimizer(model, optim_cfg, lr=1e-2, device=torch.device("cpu")),
        iter(batches),
        cfg=cfg,
        optim_cfg=optim_cfg,
        eval_cfg=EvalConfig(every=0),
        ckpt_cfg=CheckpointConfig(every=0),
        precision=pick_precision(torch.device("cpu"), "float32"),
        state=TrainState(),
        log=log,
        save=lambda st: None,
        objective=NaNOnStep(bad_step=2),
    )
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1] and state.skipped_steps == 1
    assert records[1]["update_ratio"] == 0.0 and not math.isfinite(records[1]["grad_norm"])
    assert records[2]["update_ratio"] > 0 and math.isfinite(records[3]["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights


def test_torn_utf8_line_is_skipped_by_resume_runs_and_report(data_dir, tmp_path):
    """A kill mid-write can cut a multi-byte character: only that line is lost, nothing crashes."""
    from lmforge.report import render_report

    root = tmp_path / "runs"
    run = root / "u8"
    pretrain(tiny_config(data_dir, run), progress=False)
    before = read_metrics(run / "metrics.jsonl")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write('{"step": 13, "sample": "红'.encode()[:-1])  # the last byte of 红 never made it
    assert read_metrics(run / "metrics.jsonl") == before
    assert list_runs(root)[0].step == 12
    result = run_cli("runs", str(root))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert render_report([run], tmp_path / "r.html").is_file()

    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 14}), progress=False)  # resume
    lines = (run / "metrics.jsonl").read_bytes().splitlines()
    assert [json.loads(line.decode("utf-8"))["step"] for line in lines][-1] == 14  # every line is valid now


def test_malformed_records_and_config_do_not_break_runs_or_report(data_dir, tmp_path):
    """Hand-edited or foreign lines in metrics.jsonl, and a config.json with null sections, are read
    around: `runs` still lists every run (a folder it cannot read is one "unreadable" row) and
    `report` still renders."""
    from lmforge.report import render_report

    root = tmp_path / "runs"
    good, bad = root / "good", root / "bad"
    pretrain(tiny_config(data_dir, good), progress=False)
    pretrain(tiny_config(data_dir, bad), progress=False)
    before = read_metrics(bad / "metrics.jsonl")
    with open(bad / "metrics.jsonl", "a", encoding="utf-8") as f:
        for line in (
            "[1, 2, 3]",
            '"just a string"',
            '{"step": "41", "loss": 2.0}',
            '{"step": true, "loss": 2.0}',
            '{"loss": 2.0}',
            '{"step": 41.5, "loss": null, "val_loss": 9.25, "sample": 7, "tokens": [1]}',
            '{"step": 42, "val_loss": "x", "elapsed_s": null}',
        ):
            f.write(line + "\n")
    records = read_metrics(bad / "metrics.jsonl")
    assert records == [*before, {"step": 41.5, "val_loss": 9.25}, {"step": 42}]  # wrong-typed values are dropped
    config = json.loads((bad / "config.json").read_text(encoding="utf-8"))
    (bad / "config.json").write_text(json.dumps({**config, "train": None, "data": None}), encoding="utf-8")

    runs = {r.name: r for r in list_runs(root)}
    assert runs["bad"].step == 12 and runs["bad"].max_steps == 0 and runs["bad"].status == "finished"
    assert runs["good"].step == 12 and runs["good"].max_steps == 12
    result = run_cli("runs", str(root))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["run", "bad", "good"]
    report = render_report([bad, good], tmp_path / "r.html")
    assert 'data-value="9.25"' in report.read_text(encoding="utf-8")  # the cleaned evaluation record

    # a folder that cannot be read at all (here a checkpoints/latest pointer that is not UTF-8, which
    # lmforge.checkpoint chokes on): one "unreadable" row and a note, the other runs still listed
    (bad / "checkpoints" / "latest").write_bytes(b"\xffstep-000012")
    result = run_cli("runs", str(root))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:4] == ["bad", "-", "-", "unreadable"]
    assert lines[2].split()[:4] == ["good", "pretrain", "tiny", "finished"]
    assert lines[3].startswith("bad: unreadable (UnicodeDecodeError")
    bad_report = run_cli("report", str(bad), str(good), "--out", str(tmp_path / "r2.html"))
    assert bad_report.returncode == 2 and len(bad_report.stderr.strip().splitlines()) == 1, bad_report.stderr
    assert "cannot read run" in bad_report.stderr


def _start_finetune(base, run):
    from tests.test_finetune import DATA

    args = [
        "finetune", str(base), "--task", "classify", "--adapt", "head", "--train", str(DATA / "sentiment_train.csv"),
        "--out", str(run), "--train.batch_size", "4", "--train.max_steps", "100000", "--train.log_every", "1",
        "--eval.every", "0", "--quiet",
    ]  # fmt: skip
    return start_cli(*args)


@pytest.mark.slow
def test_finetuned_runs_show_their_own_settings_and_status(tmp_path):
    """A fine-tuned run's config.json is its base's: `runs` and `report` take max_steps and the other
    settings from finetune.json, and status.json says running / finished / interrupted / failed (~10 s)."""
    from lmforge.finetune import FinetuneConfig, finetune
    from lmforge.report import render_report
    from tests.test_finetune import DATA, make_base
    from tests.test_report import Page

    base = make_base(tmp_path)
    assert json.loads((base / "config.json").read_text(encoding="utf-8"))["train"]["max_steps"] == 1000
    root = tmp_path / "ft"
    done, stopped, killed = root / "done", root / "stopped", root / "killed"
    finetune(
        base,
        train_file=DATA / "sentiment_train.csv",
        val_file=DATA / "sentiment_val.jsonl",
        out=done,
        cfg=FinetuneConfig(task="classify", adapt="head"),
        overrides={"train": {"max_steps": 6, "batch_size": 4, "log_every": 1}, "eval": {"every": 3}},
        progress=False,
    )
    status = json.loads((done / "status.json").read_text(encoding="utf-8"))
    assert status["status"] == "finished" and status["stop_reason"] == "max_steps"
    (summary,) = list_runs(root)
    assert (summary.status, summary.step, summary.max_steps) == ("finished", 6, 6)
    page = Page(render_report([done], tmp_path / "r.html").read_text(encoding="utf-8"))
    settings = {row["setting"][0]: row["done"][0] for row in page.rows("config")}
    assert settings["train.max_steps"] == "6" and settings["train.batch_size"] == "4" and settings["eval.every"] == "3"
    assert settings["finetune.task"] == "classify" and settings["finetune.adapt"] == "head"
    assert settings["model.d_model"] == "32"  # the architecture is the base's
    assert not any(k.startswith(("data.", "objective.")) for k in settings)  # the base's pretraining data, not ours
    assert page.rows("summary")[0]["steps"][0] == "6/6"

    for run, sig, code, after in ((stopped, signal.SIGINT, 130, "interrupted"), (killed, signal.SIGKILL, -9, "failed")):
        proc = _start_finetune(base, run)
        _wait_for_steps(run, 3, proc)
        assert run_status(run) == "running"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code, proc.communicate()[1]
        assert run_status(run) == after
    rows = {r.name: r for r in list_runs(root)}
    assert {k: (r.status, r.max_steps) for k, r in rows.items()} == {
        "done": ("finished", 6),
        "killed": ("failed", 100000),
        "stopped": ("interrupted", 100000),
    }


def test_an_imported_model_shows_its_step_without_a_target(tmp_path):
    """An imported model's config holds the default max_steps it was never trained towards: it read 0/1000."""
    from lmforge.config import RunConfig
    from lmforge.export.hf_import import write_imported_run
    from lmforge.tokenizer.train import train_char

    tok = train_char(["abc def"])
    cfg = RunConfig(out=str(tmp_path / "runs" / "imp"), model=GPTConfig(vocab_size=tok.vocab_size, max_seq_len=16))
    model = GPT(cfg.model)
    model.init_weights()
    write_imported_run(tmp_path / "runs" / "imp", cfg, model, tok, tmp_path, "gpt2", "float32")
    (summary,) = list_runs(tmp_path / "runs")
    assert (summary.status, summary.step, summary.max_steps) == ("unknown", 0, 0)
    assert " 0/" not in format_runs([summary])


def test_the_rerun_command_is_the_line_a_user_types():
    """env.json's `command` (shown by `lmforge runs` for a run to resume): `python -m lmforge`'s argv[0] is a path
    to lmforge/__main__.py, and under torchrun each rank's is too; the line is the one the user typed."""
    main = str(REPO / "lmforge" / "__main__.py")
    args = ["pretrain", "--out", "runs/a b", "--train.lr", "1e-3"]
    assert rerun_command([main, *args], {}) == "lmforge pretrain --out 'runs/a b' --train.lr 1e-3"
    assert rerun_command(["/venv/bin/lmforge", *args], {"WORLD_SIZE": "1"}) == rerun_command([main, *args], {})
    two = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert rerun_command([main, *args], two) == "torchrun --nproc_per_node=2 -m lmforge " + shlex.join(args)
    nodes = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    assert rerun_command([main, *args], nodes).startswith("torchrun --nnodes=2 --nproc_per_node=8 -m lmforge pretrain")
    script = rerun_command(["train.py", "--x"], {})
    assert script == f"{Path(sys.executable).name} train.py --x"


def test_a_live_pid_that_started_at_another_time_is_not_the_run(tmp_path):
    """After a crash or a reboot the pid in status.json may be an unrelated live process's: that run read
    "running" for good (and `report --watch` rendered it forever). The process's start is recorded beside
    its pid, and a live pid that started at another time is not the run; a file without it (written before
    the start was recorded) keeps trusting a live pid."""
    from lmforge.atomic import process_start
    from lmforge.report import watch

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "tiny"}), encoding="utf-8")
    mark_running(run)  # this (live) process trains it
    info = json.loads((run / "status.json").read_text(encoding="utf-8"))
    assert info["pid_start"] == process_start(os.getpid()) and run_status(run) == "running"
    # the same live pid, but a process that started at another time (the pid's earlier owner, before a reboot)
    (run / "status.json").write_text(json.dumps({**info, "pid_start": info["pid_start"] + "0"}), encoding="utf-8")
    assert run_status(run) == "failed" and list_runs(tmp_path)[0].failure == "killed"
    assert watch([run], tmp_path / "report.html", every_s=0.01, echo=False, max_renders=5) == 1  # no run is running
    for pid in (0, -1, True, 2**70):  # hand-edited pids os.kill reads as a process group or pid 1, or refuses
        (run / "status.json").write_text(json.dumps({**info, "pid": pid}), encoding="utf-8")
        assert run_status(run) == "failed", pid
    info.pop("pid_start")  # a status.json from before the start was recorded: a live pid is the run, as before
    (run / "status.json").write_text(json.dumps(info), encoding="utf-8")
    assert run_status(run) == "running"


SET_UP_THEN_WAIT = """
import sys, time
from pathlib import Path
from lmforge.atomic import write_json
from lmforge.log import capture_env
from lmforge.runs import claim
run = Path(sys.argv[1])
claim(run)  # what pretrain does first, then config.json and env.json, then minutes of setup (data, model, compile)
write_json(run / "config.json", {"preset": "tiny", "train": {"max_steps": 10}})
write_json(run / "env.json", capture_env("cpu"))
print("set up", flush=True)
time.sleep(120)
"""


def test_a_run_killed_before_its_loop_is_stopped_not_unknown(tmp_path):
    """A run killed during its setup (config.json, env.json and its .lock; no status.json, metrics or checkpoint)
    was left out of `lmforge runs` (and, with an empty metrics.jsonl, shown as "unknown"); while its process lives
    it is running, once it is gone it stopped before training began. Where the lock cannot speak for the process
    (env.json names another host), it stays unknown rather than a guess."""
    run = tmp_path / "runs" / "setup"
    proc = subprocess.Popen(
        [sys.executable, "-c", SET_UP_THEN_WAIT, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "set up"
        (row,) = list_runs(tmp_path / "runs")
        assert (row.name, row.status) == ("setup", "running")
    finally:
        proc.kill()
        proc.wait()
    (row,) = list_runs(tmp_path / "runs")
    assert row.status == "stopped" and row.last_checkpoint == ""
    note = format_runs([row]).splitlines()[-1]
    assert note.startswith("setup: stopped before training began (no status.json, and no process on this host holds")
    assert note.endswith("it saved no checkpoint, so re-running " + f"`{row.command}` in {row.cwd} starts it over")
    env = json.loads((run / "env.json").read_text(encoding="utf-8"))
    (run / "env.json").write_text(json.dumps({**env, "host": "another-machine"}), encoding="utf-8")
    assert run_status(run) == "unknown"


def test_an_encoder_pretraining_loss_says_what_it_is_per(data_dir: Path, tmp_path: Path):
    """BERT/ELECTRA pretraining's val loss is not nats per corpus token, yet `runs` and the report labelled it so:
    MLM's is per masked token, mlm+nsp's the MLM mean plus the NSP mean per pair, ELECTRA's the generator's MLM
    mean plus rtd_weight x the discriminator's mean per real token (40.49 = 5.99 + 50 x 0.69 on a tiny run)."""
    from lmforge.config import load_config
    from lmforge.report import PLOTS, load_runs, plot_panels

    cases = [
        ("bert-tiny", {"name": "mlm"}, "nats/masked token"),
        ("bert-tiny", {"name": "mlm+nsp"}, "MLM nats/masked token + NSP nats/pair"),
        ("electra-tiny", {"rtd_weight": 20.0}, "MLM nats/masked token + 20 x RTD nats/token"),
    ]
    for i, (preset, objective, _) in enumerate(cases):
        model = {"n_layer": 1, "d_model": 32, "n_head": 2, "d_ff": 64, "max_seq_len": 64}
        cfg = load_config(
            preset=preset,
            overrides={
                "out": str(tmp_path / "runs" / f"r{i}"),
                "data": {"dir": str(data_dir)},
                "model": model,
                "objective": objective,
                "train": {"batch_size": 8, "max_steps": 2, "warmup_steps": 1, "log_every": 1},
                "eval": {"every": 2, "max_batches": 1},
            },
        )
        pretrain(cfg, progress=False)
    summaries = list_runs(tmp_path / "runs")
    assert [s.loss_unit for s in summaries] == [unit for _, _, unit in cases]
    rows = format_runs(summaries).splitlines()[1:]
    for row, summary, (_, _, unit) in zip(rows, summaries, cases, strict=True):
        assert f"  {summary.best_val_loss:.4f} ({unit})  " in row
    # MLM alone: the loss is the mean cross-entropy over the masked positions, whose exp is the logged mlm_ppl
    (mlm,) = [r for r in read_metrics(tmp_path / "runs" / "r0" / "metrics.jsonl") if "val_loss" in r]
    assert mlm["val_loss"] == pytest.approx(math.log(mlm["val_mlm_ppl"]), rel=1e-9)
    runs = load_runs([tmp_path / "runs" / "r0"])
    assert [label for label, _ in plot_panels(PLOTS[0], runs)] == ["loss (nats/masked token)"]


def test_a_run_trained_into_another_runs_folder_is_listed_without_walking_the_rest(tmp_path):
    """Older lmforge let `finetune runs/base --out runs/base/sft`; `lmforge runs runs/` never listed the fine-tune
    (it stopped at the run it was in). A run's sub-folders that are runs are listed (as base/sft, and the runs in
    those), and nothing else of a run is walked: a run-like folder in its checkpoints/ or deeper in a data folder is
    not listed, nor a fine-tune's own base/ (the HF model it imported)."""
    from lmforge.atomic import write_json
    from lmforge.config import RunConfig
    from lmforge.runs import find_runs

    def run(path: Path, **extra: dict) -> Path:
        path.mkdir(parents=True)
        write_json(path / "config.json", RunConfig(out=str(path), model=GPTConfig(vocab_size=64)).to_dict())
        (path / "metrics.jsonl").write_text('{"step": 3, "loss": 2.5, "tokens": 96}\n', encoding="utf-8")
        for name, data in extra.items():
            write_json(path / name, data)
        return path

    root = tmp_path / "runs"
    base = run(root / "base")
    sft = run(base / "sft")
    dpo = run(sft / "dpo")
    run(base / "checkpoints" / "step-000003")  # (looks like a run: never looked at)
    run(base / "data" / "shards" / "old")  # (not a direct sub-folder of the run)
    ft = run(root / "ft", **{"finetune.json": {"task": "sft"}})
    run(ft / "base")  # its imported base, part of it
    other = run(root / "group" / "other")
    assert find_runs(root) == [base, sft, dpo, ft, other]
    names = [r.name for r in list_runs(root)]
    assert names == ["base", "base/sft", "base/sft/dpo", "ft", "group/other"]
    assert "base/sft/dpo" in format_runs(list_runs(root))
