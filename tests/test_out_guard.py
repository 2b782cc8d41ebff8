"""`pretrain`/`finetune --out`: never what the command reads, and --overwrite deletes only a run.

Before: `pretrain --data D --out D --overwrite` deleted the prepared data, `finetune BASE --out BASE
--overwrite` the base run, a --train file inside --out went with --overwrite, and --overwrite deleted
any folder at all (the error for a non-run folder even suggested it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmforge.errors import ConfigError, DataError
from lmforge.finetune import FinetuneConfig, finetune
from lmforge.train.run import pretrain
from tests.conftest import tiny_config
from tests.test_finetune import DATA, FAST, make_base


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_pretrain_out_is_the_data_dir(data_dir: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    before = _files(data)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="which this command reads"):
            pretrain(tiny_config(data, data, **{"train.max_steps": 2}), overwrite=overwrite, progress=False)
        assert _files(data) == before  # nothing deleted, nothing (not even a lock file) added


def test_pretrain_out_holds_the_data_dir(data_dir: Path, tmp_path: Path):
    data = tmp_path / "project" / "data"
    shutil.copytree(data_dir, data)
    with pytest.raises(ConfigError, match="holds"):
        pretrain(tiny_config(data, tmp_path / "project", **{"train.max_steps": 2}), overwrite=True, progress=False)
    assert (data / "manifest.json").is_file()


def test_pretrain_out_inside_the_data_dir(data_dir: Path, tmp_path: Path):
    """`pretrain --data D --out D/run` was accepted, and `prepare --out D --overwrite` (re-preparing D, as the error
    for an existing D suggests) then replaced D whole: the run went with it, checkpoints and all. Refused in one
    line before anything is written."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    before = _files(data)
    for out in (data / "run", data / "runs" / "a"):
        with pytest.raises(ConfigError, match=r"is inside the prepared data .*; choose an --out outside it") as e:
            pretrain(tiny_config(data, out, **{"train.max_steps": 2}), progress=False)
        assert f"(e.g. runs/{out.name})" in str(e.value) and "\n" not in str(e.value)
        assert _files(data) == before  # no run folder, no lock file


def test_pretrain_overwrite_refuses_a_folder_that_is_not_a_run(data_dir: Path, tmp_path: Path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(ConfigError, match="not an lmforge run") as e:
        pretrain(tiny_config(data_dir, folder, **{"train.max_steps": 2}), overwrite=True, progress=False)
    assert "--overwrite would delete" in str(e.value)
    assert (folder / "thesis.txt").read_text(encoding="utf-8") == "precious"
    # without --overwrite the error no longer suggests it
    with pytest.raises(ConfigError, match="not an lmforge run") as e:
        pretrain(tiny_config(data_dir, folder, **{"train.max_steps": 2}), progress=False)
    assert "--overwrite" not in str(e.value)


def test_pretrain_overwrite_still_replaces_a_run(data_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 2}), progress=False)
    state = pretrain(tiny_config(data_dir, run, **{"train.max_steps": 3}), overwrite=True, progress=False)
    assert state.step == 3


def test_finetune_out_is_the_base(tmp_path: Path):
    base = make_base(tmp_path)
    before = _files(base)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="which this command reads"):
            finetune(
                base, train_file=DATA / "alpaca.jsonl", out=base, overrides=FAST, overwrite=overwrite, progress=False
            )
        assert _files(base) == before


def test_finetune_overwrite_keeps_a_train_file_inside_out(tmp_path: Path):
    base = make_base(tmp_path)
    out = tmp_path / "ft"
    out.mkdir()
    train = out / "train.jsonl"
    shutil.copy(DATA / "alpaca.jsonl", train)
    with pytest.raises(ConfigError, match="holds"):
        finetune(
            base,
            train_file=train,
            out=out,
            cfg=FinetuneConfig(task="sft"),
            overrides=FAST,
            overwrite=True,
            progress=False,
        )
    assert train.is_file()


def test_finetune_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path: Path):
    base = make_base(tmp_path)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(ConfigError, match="not an lmforge run"):
        finetune(base, train_file=DATA / "alpaca.jsonl", out=folder, overrides=FAST, overwrite=True, progress=False)
    assert (folder / "thesis.txt").read_text(encoding="utf-8") == "precious"
    with pytest.raises(ConfigError, match="not a fine-tuning run") as e:
        finetune(base, train_file=DATA / "alpaca.jsonl", out=folder, overrides=FAST, progress=False)
    assert "--overwrite" not in str(e.value)


def test_pretrain_on_a_finetuned_quantized_or_hf_folder_says_what_it_is(data_dir: Path, tmp_path: Path):
    """Before: a data-loader 'seq_len=None' error, missing weight names, or a model config of Nones."""
    from lmforge.compress.quantize import quantize_run
    from lmforge.export.hf import export_hf

    run = tmp_path / "run"
    cfg = tiny_config(data_dir, run, **{"train.max_steps": 2})
    pretrain(cfg, progress=False)
    quantize_run(run, tmp_path / "q8", bits=8, compare=False)
    export_hf(run, tmp_path / "hf")
    base = make_base(tmp_path / "b")
    finetune(base, train_file=DATA / "alpaca.jsonl", out=tmp_path / "ft", overrides=FAST, progress=False)
    for out, said in [("q8", "a quantized copy"), ("hf", "a Hugging Face model"), ("ft", "a fine-tuned run")]:
        with pytest.raises(ConfigError, match=said):
            pretrain(tiny_config(data_dir, tmp_path / out, **{"train.max_steps": 2}), progress=False)


def test_a_failed_pretrain_leaves_only_what_was_there(data_dir: Path, tmp_path: Path):
    """Before: a run refused after it claimed its folder (here: a checkpoint to resume from that a new run lacks;
    in the wild: a train split shorter than one sequence) left a folder holding only .lock, and dropped a .lock
    into a user's folder it refused."""
    failing = {"train.max_steps": 2, "checkpoint.resume_from": "step-000001"}
    new = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        pretrain(tiny_config(data_dir, new, **failing), progress=False)
    assert not (tmp_path / "new").exists()  # nor the parent it made
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        pretrain(tiny_config(data_dir, empty, **failing), progress=False)
    assert empty.is_dir() and _files(empty) == set()  # the user's folder stays, without a .lock
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(ConfigError, match="not an lmforge run"):
        pretrain(tiny_config(data_dir, notes, **{"train.max_steps": 2}), progress=False)
    assert _files(notes) == {"thesis.txt"}
    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 2}), progress=False)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert run / ".lock" in before
    with pytest.raises(ConfigError, match="different model config"):
        pretrain(tiny_config(data_dir, run, **{"train.max_steps": 2, "model.d_model": 64}), progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # a run keeps all it had
    assert pretrain(tiny_config(data_dir, new, **{"train.max_steps": 2}), progress=False).step == 2


def test_a_failed_finetune_leaves_only_what_was_there(tmp_path: Path):
    """Before: an error after the folder was claimed (a LoRA target that matches nothing) left it holding .lock."""
    base = make_base(tmp_path)
    lora = FinetuneConfig(task="sft", adapt="lora", lora_targets="foo")
    kw = {"train_file": DATA / "alpaca.jsonl", "overrides": FAST, "progress": False}
    with pytest.raises(ConfigError, match="matches no linear layer"):
        finetune(base, out=tmp_path / "new" / "ft", cfg=lora, **kw)
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="matches no linear layer"):
        finetune(base, out=empty, cfg=lora, **kw)
    assert empty.is_dir() and _files(empty) == set()
    run = tmp_path / "ft"
    finetune(base, out=run, cfg=FinetuneConfig(task="sft"), **kw)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = tmp_path / "other.jsonl"
    other.write_text("".join((DATA / "alpaca.jsonl").read_text(encoding="utf-8").splitlines(True)[1:]), "utf-8")
    with pytest.raises(DataError, match="is not the data"):  # a resume refused after the claim
        finetune(base, out=run, cfg=FinetuneConfig(task="sft"), **{**kw, "train_file": other})
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_overwrite_refused_during_setup_keeps_the_old_run(data_dir: Path, tmp_path: Path):
    """--overwrite used to delete the old run before the new one's setup was checked: a flag refused a moment
    later (here --checkpoint.resume_from on what is now a fresh run, or a LoRA target that matches nothing)
    lost it. Now the old run is set aside and comes back byte for byte; once the new run starts it is gone,
    with nothing left beside the run folder."""
    run = tmp_path / "run"
    pretrain(tiny_config(data_dir, run, **{"train.max_steps": 2}), progress=False)
    before = _contents(run)
    refused = tiny_config(data_dir, run, **{"train.max_steps": 3, "checkpoint.resume_from": "step-000002"})
    with pytest.raises(ConfigError, match="has no checkpoint to resume from"):
        pretrain(refused, overwrite=True, progress=False)
    assert _contents(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    state = pretrain(tiny_config(data_dir, run, **{"train.max_steps": 3}), overwrite=True, progress=False)
    assert state.step == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not (run / "checkpoints" / "step-000002").exists()  # the old run's checkpoint went with it

    base = make_base(tmp_path / "b")
    kw = {"train_file": DATA / "alpaca.jsonl", "overrides": FAST, "progress": False}
    ft = tmp_path / "ft"
    finetune(base, out=ft, cfg=FinetuneConfig(task="sft"), **kw)
    before = _contents(ft)
    with pytest.raises(ConfigError, match="matches no linear layer"):
        finetune(base, out=ft, cfg=FinetuneConfig(task="sft", adapt="lora", lora_targets="foo"), overwrite=True, **kw)
    assert _contents(ft) == before
    finetune(base, out=ft, cfg=FinetuneConfig(task="sft", adapt="lora"), overwrite=True, **kw)
    assert (ft / "finetune.json").read_text(encoding="utf-8") != before["finetune.json"].decode()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing set aside is left


def test_pretrain_out_that_is_or_sits_in_a_file_says_so(data_dir: Path, tmp_path: Path):
    # it said "[Errno 20] Not a directory: '.../notes.txt/.lock'; check the path, free space and permissions"
    notes = tmp_path / "notes.txt"
    notes.write_text("precious", encoding="utf-8")
    for out, said in ((notes, "is a file, not a folder"), (notes / "run", f"{notes} is a file, not a folder")):
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match="choose another --out") as e:
                pretrain(tiny_config(data_dir, out, **{"train.max_steps": 2}), overwrite=overwrite, progress=False)
            assert said in str(e.value)
    assert notes.read_text(encoding="utf-8") == "precious"


def test_export_and_prepare_out_that_overwrite_cannot_replace_do_not_suggest_it(tmp_path: Path):
    # `export --out FILE` and `prepare --out NOTES_DIR` said "pass --overwrite", which then refused them
    from lmforge.atomic import check_out_dir
    from lmforge.data.prepare import check_out
    from lmforge.errors import LmforgeError

    file, notes, model = tmp_path / "afile", tmp_path / "notes", tmp_path / "model"
    file.write_text("x", encoding="utf-8")
    notes.mkdir()
    (notes / "thesis.txt").write_text("precious", encoding="utf-8")
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    for out, what in [(file, "is a file"), (notes, "is not a model folder")]:
        with pytest.raises(LmforgeError, match=f"already exists and {what}; choose another --out$"):
            check_out_dir(out, overwrite=False)
    with pytest.raises(LmforgeError, match="or pass --overwrite to replace it"):  # a model folder: it can
        check_out_dir(model, overwrite=False)
    for out, what in [(file, "is a file"), (notes, "is not a prepared data directory")]:
        with pytest.raises(DataError, match=f"already exists and {what}; choose another --out$"):
            check_out(out, overwrite=False)
    (notes / "manifest.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="pass --overwrite to replace it"):
        check_out(notes, overwrite=False)


def _nest(run: Path, inner: Path) -> Path:
    """`inner` (a run) moved into `run`, as `finetune RUN --out RUN/sft` made it before that was refused."""
    return Path(shutil.move(inner, run / inner.name))


def test_finetune_or_pretrain_out_inside_a_run(data_dir: Path, tmp_path: Path):
    """`lmforge finetune runs/base --out runs/base/sft` trained into the base run: `pretrain --overwrite` of the
    base then deleted the fine-tune with it, and `lmforge runs runs/` did not list it. Refused in one line, before
    anything is written, inside the base run or any other (a checkpoint of it given as the base too)."""
    from tests.conftest import run_cli

    base = make_base(tmp_path / "runs")
    before = _files(base)
    cases = [(base, base / "sft", "base-sft"), (base / "checkpoints" / "step-000000", base / "a" / "b", "base-a-b")]
    for src, out, beside in cases:
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=rf"--out {out} is inside the run {base}, which '--overwrite'") as e:
                finetune(src, train_file=DATA / "alpaca.jsonl", out=out, overrides=FAST, overwrite=overwrite)
            assert str(e.value).endswith(f"choose an --out beside it (e.g. {base.parent / beside})")
            with pytest.raises(ConfigError, match=f"is inside the run {base}"):
                pretrain(tiny_config(data_dir, out, **{"train.max_steps": 2}), overwrite=overwrite, progress=False)
    assert _files(base) == before  # no folder, no lock file
    # the real command, as typed: a one-line error naming the paths as given, exit 2
    r = run_cli(
        "finetune", "runs/base", "--train", str(DATA / "alpaca.jsonl"), "--out", "runs/base/sft", cwd=str(tmp_path)
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--out runs/base/sft is inside the run runs/base" in r.stderr and "(e.g. runs/base-sft)" in r.stderr
    # a run already inside (made before the check): resuming it says how to move it out
    ft = _nest(base, make_base(tmp_path / "old"))
    with pytest.raises(ConfigError, match=rf"; move it beside it \(mv {ft} {base.parent / 'base-base'}\)$"):
        finetune(base, train_file=DATA / "alpaca.jsonl", out=ft, overrides=FAST)


def test_overwrite_refuses_a_run_that_holds_another(data_dir: Path, tmp_path: Path):
    """--overwrite of a run replaced it whole, a fine-tune trained into it (`--out runs/base/sft`, before that was
    refused) with it, checkpoints and all: `pretrain`, `finetune`, `import` and `quantize --overwrite` refuse it
    in one line saying to move the inner run out first, as `prepare --overwrite` does for a run in its data."""
    from lmforge.compress.quantize import quantize_run
    from lmforge.errors import LmforgeError
    from lmforge.export.hf import export_hf
    from lmforge.export.hf_import import import_hf

    base = make_base(tmp_path / "runs")
    other = make_base(tmp_path / "other")
    hf = export_hf(other, tmp_path / "hf")
    inner = _nest(base, make_base(tmp_path / "sft"))
    before = _files(base)
    said = rf"refusing to overwrite {base}: it holds the training run {inner}, which --overwrite would delete; move"
    with pytest.raises(ConfigError, match=said):
        pretrain(tiny_config(data_dir, base, **{"train.max_steps": 2}), overwrite=True, progress=False)
    with pytest.raises(ConfigError, match=said):
        finetune(other, train_file=DATA / "alpaca.jsonl", out=base, overrides=FAST, overwrite=True)
    with pytest.raises(LmforgeError, match=said):
        quantize_run(other, base, bits=8, compare=False, overwrite=True)
    with pytest.raises(LmforgeError, match=said) as e:
        import_hf(hf, base, overwrite=True)
    assert f"(e.g. mv {inner} {tmp_path / 'runs' / 'base-base'})" in str(e.value)
    assert _files(base) == before
    # and none of them writes into a run either
    for make in (lambda out: quantize_run(other, out, bits=8, compare=False), lambda out: import_hf(hf, out)):
        with pytest.raises(LmforgeError, match=f"--out {base / 'q'} is inside the run {base}"):
            make(base / "q")
    with pytest.raises(LmforgeError, match=f"--out {base / 'q'} is inside the run {base}"):
        export_hf(other, base / "q")
    assert _files(base) == before
    # a fine-tune's own base/, the HF base it imported, is no other run: --overwrite starts it over
    kw = {"train_file": DATA / "alpaca.jsonl", "out": tmp_path / "ft", "overrides": FAST, "progress": False}
    finetune(hf, **kw)
    assert (tmp_path / "ft" / "base" / "config.json").is_file()
    finetune(hf, **kw, overwrite=True)


def test_out_under_a_file_says_the_file_is_in_the_way(tmp_path: Path):
    # export/quantize said "[Errno 17] File exists: '.../notes.txt'" (os.makedirs of --out's parent, a file) and
    # "[Errno 20] Not a directory: '.../notes.txt/x'"; check the path, free space and permissions
    from lmforge.tokenizer.train import train_char
    from tests.conftest import run_cli
    from tests.test_export import LLAMA, make_run

    run = make_run(tmp_path / "run", train_char(["the quick brown fox jumps over the lazy dog"]), **LLAMA)
    notes = tmp_path / "notes.txt"
    notes.write_text("precious", encoding="utf-8")
    for command, out, target in [
        (["export"], notes / "x", f"the folder {notes}"),
        (["export", "--to", "gguf"], notes / "x.gguf", f"the folder {notes}"),
        (["quantize"], notes / "x", f"the folder {notes}"),
        (["export"], notes / "x" / "y", f"{notes / 'x'}"),
    ]:
        result = run_cli(command[0], str(run), *command[1:], "--out", str(out))
        assert result.returncode == 2, result.stderr
        expected = f"lmforge: error: cannot create {target}: {notes} is a file, not a folder; choose another --out\n"
        assert result.stderr == expected
    assert notes.read_text(encoding="utf-8") == "precious"
