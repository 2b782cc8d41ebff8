"""Fine-tuning runs resume exactly, refuse a different command on the same --out, DPO gives the same
loss with a live or a precomputed reference, and continued pretraining can continue the base's schedule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_checkpoint
from lmforge.errors import ConfigError, DataError
from lmforge.finetune import FinetuneConfig, finetune
from tests.conftest import run_cli
from tests.test_finetune import DATA, make_base


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("ftr"), max_seq_len=64)


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r] + [
        (r["step"], r["val_loss"]) for r in rows if "val_loss" in r
    ]


@pytest.mark.parametrize(
    ("task", "adapt", "train_file"),
    [("sft", "lora", "alpaca.jsonl"), ("classify", "full", "sentiment_train.csv")],
)
def test_resume_is_bit_identical(base: Path, tmp_path: Path, task: str, adapt: str, train_file: str):
    overrides = {
        "train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "warmup_steps": 1},
        "eval": {"every": 3, "max_batches": 1},
        "checkpoint": {"every": 3, "keep": 5, "keep_best": False},
    }
    extra = {"lora_rank": 2, "lora_dropout": 0.2} if adapt == "lora" else {}
    extra |= {"eval_samples": 1, "max_new_tokens": 2} if task == "sft" else {}
    cfg = FinetuneConfig(task=task, adapt=adapt, **extra)
    kw = {"train_file": DATA / train_file, "cfg": cfg, "overrides": overrides, "progress": False}
    straight = tmp_path / "straight"
    finetune(base, out=straight, **kw)
    # an interrupted run: the same run cut back to its step-3 checkpoint (as after a kill at step 4 or 5)
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    (cut / "checkpoints" / "latest").write_text("step-000003\n", encoding="utf-8")
    (cut / "eval.json").unlink()
    result = finetune(base, out=cut, **kw)  # the same command again: resumes from step 3
    assert result["steps"] == 6
    a, b = load_checkpoint(straight).model_state(), load_checkpoint(cut).model_state()
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(cut) == _losses(straight)  # metrics.jsonl cut back to step 3, then the same numbers
    # running it once more has nothing left to train and changes nothing
    finetune(base, out=cut, **kw)
    assert load_checkpoint(cut).path.name == "step-000006"


def test_other_command_on_existing_run_is_one_line_error(base: Path, tmp_path: Path):
    out = tmp_path / "run"
    fast = {"train": {"max_steps": 1, "batch_size": 4}}
    train = DATA / "sentiment_train.csv"
    finetune(
        base,
        train_file=train,
        out=out,
        cfg=FinetuneConfig(task="classify", adapt="head"),
        overrides=fast,
        progress=False,
    )
    with pytest.raises(ConfigError, match="holds a --adapt head run, not --adapt lora"):
        finetune(base, train_file=train, out=out, cfg=FinetuneConfig(task="classify", adapt="lora"), overrides=fast)
    fewer = tmp_path / "fewer.csv"  # the same columns and labels, other rows: its loader position means nothing
    fewer.write_text("\n".join(train.read_text(encoding="utf-8").splitlines()[:-3]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="is not the data"):
        finetune(base, train_file=fewer, out=out, cfg=FinetuneConfig(task="classify", adapt="head"), overrides=fast)
    other = make_base(tmp_path / "other", max_seq_len=64, seed=1)
    other_head = ["finetune", str(other), "--task", "classify", "--adapt", "head", "--train", str(train)]
    other_head += ["--out", str(out), "--train.max_steps", "1"]
    r = run_cli(*other_head)
    assert r.returncode == 2 and "was fine-tuned from" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("finetune", str(base), "--task", "sft", "--train", str(DATA / "alpaca.jsonl"), "--out", str(out))
    assert r.returncode == 2 and "holds a --task classify run" in r.stderr
    # --overwrite starts over
    r = run_cli(*other_head, "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "finetune.json").read_text(encoding="utf-8"))["base"].startswith(str(other.resolve()))


def test_a_new_fine_tune_reads_as_running_from_its_first_config_json(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """config.json was written before env.json (see test_runs' pretrain test): in between, the folder read as an
    "unknown" run and `report --watch` quit at once."""
    import lmforge.finetune as finetune_module
    from lmforge.runs import run_status

    out, seen, write_json = tmp_path / "run", [], finetune_module.write_json

    def checking_write_json(path, data):
        write_json(path, data)
        if Path(path) == out / "config.json" and not (out / "status.json").exists():
            seen.append(run_status(out))

    monkeypatch.setattr(finetune_module, "write_json", checking_write_json)
    cfg = FinetuneConfig(task="classify", adapt="head")
    overrides = {"train": {"max_steps": 1, "batch_size": 4}}
    finetune(base, train_file=DATA / "sentiment_train.csv", out=out, cfg=cfg, overrides=overrides, progress=False)
    assert seen == ["running"] and run_status(out) == "finished"


def test_dpo_live_reference_gives_the_precomputed_loss(base: Path, tmp_path: Path):
    overrides = {"train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "warmup_steps": 1}, "eval": {"every": 3}}
    runs = {}
    for mode in ("precomputed", "live"):
        cfg = FinetuneConfig(task="dpo", adapt="lora", lora_rank=2, dpo_reference=mode)
        runs[mode] = finetune(
            base,
            train_file=DATA / "hh_rlhf.jsonl",
            val_file=DATA / "hh_rlhf.jsonl",
            out=tmp_path / mode,
            cfg=cfg,
            overrides=overrides,
            progress=False,
        )
    pre, live = _losses(tmp_path / "precomputed"), _losses(tmp_path / "live")
    assert [s for s, _ in pre] == [s for s, _ in live] and len(pre) == 4
    # the first step's loss is log 2 exactly in both (policy == reference); later ones follow the same
    # updates. Only float summation order differs (reference batches are padded differently): rel 1e-5.
    assert pre[0][1] == pytest.approx(0.693147, abs=1e-5)
    for (_, a), (_, b) in zip(pre, live, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert runs["live"]["val"]["reward_accuracy"] == pytest.approx(runs["precomputed"]["val"]["reward_accuracy"])


def test_continued_pretraining_continues_the_base_schedule(data_dir: Path, tmp_path: Path):
    from lmforge.train.run import pretrain
    from lmforge.train.schedule import lr_at
    from tests.conftest import shakespeare_text, tiny_config

    run = tmp_path / "pre"
    pre_cfg = tiny_config(data_dir, run, **{"train.max_steps": 8, "checkpoint.every": 4, "eval.every": 0})
    pretrain(pre_cfg, progress=False)
    half = run / "checkpoints" / "step-000004"  # the base: the run half-way through its cosine schedule
    text = tmp_path / "new.txt"
    text.write_text(shakespeare_text(6_000), encoding="utf-8")
    overrides = {"train": {"max_steps": 3, "batch_size": 4, "log_every": 1}}
    lrs = {}
    for schedule in ("continue", "fresh"):
        cfg = FinetuneConfig(task="clm", adapt="full", schedule=schedule)
        given = overrides if schedule == "continue" else {"train": {**overrides["train"], "warmup_steps": 1}}
        finetune(half, train_file=text, out=tmp_path / schedule, cfg=cfg, overrides=given, progress=False)
        rows = (tmp_path / schedule / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        lrs[schedule] = [json.loads(r)["lr"] for r in rows if "lr" in json.loads(r)]
    t = pre_cfg.train
    expected = [
        lr_at(4 + s, lr=t.lr, final_lr=t.final_lr, warmup_steps=t.warmup_steps, max_steps=8, schedule=t.schedule)
        for s in range(3)
    ]
    assert lrs["continue"] == pytest.approx(expected, rel=1e-12)
    assert t.final_lr < lrs["continue"][-1] < lrs["continue"][0] < t.lr  # on the way down, not warming up again
    assert lrs["fresh"][0] == pytest.approx(3e-4)  # fresh: the full-mode default peak after 1 warmup step
    with pytest.raises(ConfigError, match="--train.lr is not used with --schedule continue"):  # not ignored
        cfg = FinetuneConfig(task="clm", schedule="continue")
        finetune(half, train_file=text, out=tmp_path / "y", cfg=cfg, overrides={"train": {"lr": 1e-3}})
    assert not (tmp_path / "y").exists()
    with pytest.raises(ConfigError, match="--schedule is for --task clm; drop it"):
        FinetuneConfig(task="sft", schedule="continue")
    base0 = make_base(tmp_path / "b0", max_seq_len=64)  # a step-0 (imported-like) base has no schedule to continue
    with pytest.raises(ConfigError, match="needs BASE to be an lmforge pretraining run"):
        finetune(base0, train_file=text, out=tmp_path / "x", cfg=FinetuneConfig(task="clm", schedule="continue"))
    assert not (tmp_path / "x").exists()
    done = run / "checkpoints" / "step-000008"  # a finished base: its lr stays at final_lr, nothing to follow
    with pytest.raises(ConfigError, match=r"finished it \(step 8 of 8\).*use --schedule fresh"):
        finetune(done, train_file=text, out=tmp_path / "z", cfg=FinetuneConfig(task="clm", schedule="continue"))
    assert not (tmp_path / "z").exists()


def test_train_seconds_add_up_over_sessions(base: Path, tmp_path: Path):
    """eval.json's train_seconds is the run's training time over all sessions (the TrainState the
    checkpoints carry), so a resume adds to it and re-running a finished run leaves it as it was."""
    overrides = {
        "train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "warmup_steps": 1},
        "eval": {"every": 3, "max_batches": 1},
        "checkpoint": {"every": 3, "keep": 5, "keep_best": False},
    }
    cfg = FinetuneConfig(task="classify", adapt="head")
    kw = {"train_file": DATA / "sentiment_train.csv", "cfg": cfg, "overrides": overrides, "progress": False}
    run = tmp_path / "run"
    first = finetune(base, out=run, **kw)["train_seconds"]
    assert first > 0 and first == load_checkpoint(run).meta["train_state"]["elapsed_s"]
    assert finetune(base, out=run, **kw)["train_seconds"] == first  # nothing left to train: unchanged

    shutil.rmtree(run / "checkpoints" / "step-000006")  # as after a kill at step 4 or 5
    (run / "checkpoints" / "latest").write_text("step-000003\n", encoding="utf-8")
    at_3 = load_checkpoint(run).meta["train_state"]["elapsed_s"]
    resumed = finetune(base, out=run, **kw)["train_seconds"]
    assert resumed > at_3 and resumed == load_checkpoint(run).meta["train_state"]["elapsed_s"]
    assert json.loads((run / "eval.json").read_text(encoding="utf-8"))["train_seconds"] == resumed


def test_a_rerun_of_a_finished_finetune_leaves_its_files_as_they_were(base: Path, tmp_path: Path, capsys):
    """Re-running a fine-tune trained to step 4 with max_steps 2 and another lr trains nothing, so it must not
    rewrite config.json, env.json or finetune.json (`lmforge runs` showed 4/2), nor eval.json or status.json."""
    out = tmp_path / "run"
    cfg = FinetuneConfig(task="classify", adapt="head")
    kw = {"train_file": DATA / "sentiment_train.csv", "val_file": DATA / "sentiment_train.csv", "cfg": cfg}
    first = finetune(base, out=out, overrides={"train": {"max_steps": 4, "batch_size": 4}}, progress=False, **kw)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    again = finetune(base, out=out, overrides={"train": {"max_steps": 2, "batch_size": 4, "lr": 0.5}}, **kw)
    assert again == first
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert "already trained to step 4 (train.max_steps 2); nothing to do" in capsys.readouterr().out
    # the CLI's closing line (--quiet too) is that line alone, not also "wrote RUN (4 steps, ...)" as if it trained
    assert (
        finetune(
            base, out=out, overrides={"train": {"max_steps": 4, "batch_size": 4}}, progress=False, summary=True, **kw
        )
        == first
    )
    assert capsys.readouterr().out == f"{out} is already trained to step 4 (train.max_steps 4); nothing to do\n"


def test_a_resume_with_other_train_settings_says_so_or_refuses(base: Path, tmp_path: Path, capsys):
    """A changed lr or weight decay applies from the resumed step with a note (as in pretrain); another seed
    (the loader's shuffle) or optimizer (its state) cannot continue the run and is refused before any file changes."""
    out = tmp_path / "run"
    kw = {"train_file": DATA / "sentiment_train.csv", "cfg": FinetuneConfig(task="classify", adapt="head")}
    finetune(base, out=out, overrides={"train": {"max_steps": 2, "batch_size": 4}}, progress=False, **kw)
    settings = (out / "finetune.json").read_bytes()
    with pytest.raises(ConfigError, match="trained with --train.seed 1337, not 3"):
        finetune(base, out=out, overrides={"train": {"max_steps": 4, "batch_size": 4, "seed": 3}}, **kw)
    with pytest.raises(ConfigError, match="trained with --optim.name adamw, whose state cannot continue as sgd"):
        finetune(base, out=out, overrides={"train": {"max_steps": 4, "batch_size": 4}, "optim": {"name": "sgd"}}, **kw)
    assert (out / "finetune.json").read_bytes() == settings
    capsys.readouterr()
    changed = {"train": {"max_steps": 4, "batch_size": 4, "lr": 0.01}, "optim": {"weight_decay": 0.1}}
    assert finetune(base, out=out, overrides=changed, **kw)["steps"] == 4
    printed = capsys.readouterr().out
    assert "schedule changed since the checkpoint (train.max_steps 2 -> 4, train.lr 0.001 -> 0.01)" in printed
    assert "optimizer settings changed since the checkpoint, applied from now: weight_decay 0.0 -> 0.1" in printed


def test_a_rerun_of_a_finished_merged_lora_run_is_finished_and_more_steps_are_refused(base: Path, tmp_path: Path):
    """`--merge` folds the adapters into the weights at the end, so an identical re-run has nothing to do (exit 0,
    files untouched) like any finished run, while more steps cannot continue LoRA training: one-line refusal that
    says what to do instead (a classifier cannot be a base, so only --overwrite / another --out is offered)."""
    out = tmp_path / "merged"
    cmd = ["finetune", str(base), "--task", "classify", "--adapt", "lora", "--merge", "--lora-rank", "2"]
    cmd += ["--train", str(DATA / "sentiment_train.csv"), "--out", str(out), "--train.batch_size", "4"]
    finetune(
        base,
        train_file=DATA / "sentiment_train.csv",
        out=out,
        cfg=FinetuneConfig(task="classify", adapt="lora", lora_rank=2, merge=True),
        overrides={"train": {"max_steps": 2, "batch_size": 4}},
        progress=False,
    )
    assert json.loads((out / "finetune.json").read_text(encoding="utf-8"))["lora_merged"] is True
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    r = run_cli(*cmd, "--train.max_steps", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{out} is already trained to step 2 (train.max_steps 2); nothing to do\n"  # no "wrote ..."
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    r = run_cli(*cmd, "--train.max_steps", "4")
    # one line: the data's note (examples cut to fit) waits until the run's checks pass, so a refusal is alone
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "merged into the weights (--merge), so LoRA training cannot continue to train.max_steps 4" in r.stderr
    assert "pass --overwrite (or another --out)" in r.stderr and "as a new base" not in r.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


@pytest.mark.parametrize(
    ("given", "flag"),
    [
        # judged against fine-tuning's own (unused) cosine schedule, this was told to pass --train.schedule wsd,
        # which --schedule continue refuses in turn
        ({"decay_fraction": 0.3}, "--train.decay_fraction"),
        ({"min_lr": 1e-5}, "--train.min_lr"),  # the base's schedule sets the final lr: it was silently ignored
        ({"schedule": "constant", "min_lr": 1e-5}, "--train.min_lr"),
    ],
)
def test_continue_refuses_its_schedule_settings_as_such(tmp_path: Path, given: dict, flag: str):
    cfg = FinetuneConfig(task="clm", schedule="continue")
    with pytest.raises(ConfigError, match=f"^{flag} is not used with --schedule continue"):
        finetune(tmp_path / "base", train_file=tmp_path / "t.txt", out=tmp_path / "x", cfg=cfg,
                 overrides={"train": given})  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_a_run_saved_when_min_lr_0_meant_lr_over_10_resumes_with_that_schedule(base: Path, tmp_path: Path):
    """A fine-tune saved before config_version 2 with --train.min_lr 0 (then lr / 10), re-run with its command,
    keeps decaying toward lr / 10 (bit-identical to a straight run so); it switched to a decay to zero."""
    from lmforge.checkpoint import state_sha256

    overrides = {
        "train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "warmup_steps": 1},
        "eval": {"every": 3, "max_batches": 1},
        "checkpoint": {"every": 3, "keep": 5, "keep_best": False},
    }
    kw = {"train_file": DATA / "sentiment_train.csv", "cfg": FinetuneConfig(task="classify", adapt="full")}
    straight = tmp_path / "straight"
    finetune(base, out=straight, overrides=overrides, progress=False, **kw)
    old = tmp_path / "old"
    shutil.copytree(straight, old)
    shutil.rmtree(old / "checkpoints" / "step-000006")
    (old / "checkpoints" / "latest").write_text("step-000003\n", encoding="utf-8")
    (old / "eval.json").unlink()
    for path in [old / "finetune.json", old / "checkpoints" / "step-000003" / "state.json"]:
        saved = json.loads(path.read_text(encoding="utf-8"))
        info = saved.get("finetune", saved)
        del info["config_version"]
        info["train"]["min_lr"] = 0.0  # as the old lmforge wrote --train.min_lr 0 (lr / 10)
        if "state_sha256" in saved:
            saved["state_sha256"] = state_sha256(saved)
        path.write_text(json.dumps(saved), encoding="utf-8")
    again = {**overrides, "train": {**overrides["train"], "min_lr": 0}}
    assert finetune(base, out=old, overrides=again, progress=False, **kw)["steps"] == 6
    a, b = load_checkpoint(straight).model_state(), load_checkpoint(old).model_state()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert _losses(old) == _losses(straight)
