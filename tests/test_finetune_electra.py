"""Fine-tuning ELECTRA runs for classification: a few-step `lmforge pretrain --preset electra-tiny` run
(shrunk), fine-tuned from its discriminator (the generator dropped) with full / head-only / LoRA and
HF's ElectraClassificationHead; it learns a separable toy task, resumes bit-identically, evaluates
with `eval --task classify`, and refuses what an encoder cannot do in one line."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.adapt.load import load_finetuned
from lmforge.checkpoint import load_checkpoint
from lmforge.errors import ConfigError
from lmforge.finetune import FinetuneConfig, finetune
from tests.conftest import pretrain_tiny_encoder, run_cli

FAST = {"train": {"max_steps": 4, "batch_size": 8, "log_every": 2, "warmup_steps": 1}, "eval": {"every": 2}}


@pytest.fixture(scope="module")
def electra_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """electra-tiny shrunk (1 layer, 32 wide; generator 16 wide), pretrained for a few steps on the test corpus."""
    return pretrain_tiny_encoder("electra-tiny", data_dir, tmp_path_factory.mktemp("electra") / "rtd")


def _toy_task(root: Path) -> tuple[Path, Path]:
    """Rows of vowels ('open') or consonants ('closed'): separable from the characters alone (char tokenizer)."""
    rng = random.Random(0)
    paths = []
    for name, n in (("train", 96), ("val", 40)):
        path = root / f"toy_{name}.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                label = "open" if i % 2 else "closed"
                letters = "aeiou" if label == "open" else "tdnsr"
                w.writerow(["".join(rng.choice(letters + " ") for _ in range(rng.randint(6, 16))), label])
        paths.append(path)
    return paths[0], paths[1]


def _saved_names(out: Path) -> list[str]:
    return sorted(load_checkpoint(out).model_state())


def test_full_finetune_learns_and_leaves_the_generator_out(electra_run: Path, tmp_path: Path):
    train, val = _toy_task(tmp_path)
    out = tmp_path / "full"
    overrides = {"train": {"max_steps": 30, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "log_every": 10}}
    result = finetune(
        electra_run,
        train_file=train,
        val_file=val,
        out=out,
        cfg=FinetuneConfig(task="classify", adapt="full"),
        overrides=overrides | {"eval": {"every": 0}},
        progress=False,
    )
    assert result["val"]["accuracy"] >= 0.9, result["val"]  # chance is 0.5 (20 of each class)
    names = _saved_names(out)
    assert not [n for n in names if "generator" in n or "gen_head" in n or "disc_" in n], names
    assert "body.discriminator.layers.0.attn.qkv.weight" in names and "head.dense.weight" in names
    assert "head.out_proj.weight" in names
    pretrained = load_checkpoint(electra_run).model_state()
    assert any(k.startswith("generator.") for k in pretrained)  # (the base had one to leave out)
    ft = load_finetuned(out, torch.device("cpu"))
    assert ft.model.body.__class__.__name__ == "ElectraDiscriminator"
    assert not any("generator" in n for n, _ in ft.model.named_parameters())
    r = run_cli("eval", str(out), "--task", "classify", "--data", str(val), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(result["val"]["accuracy"])


def test_head_only_keeps_the_discriminator_bit_identical(electra_run: Path, tmp_path: Path):
    out = tmp_path / "head"
    train, val = _toy_task(tmp_path)
    cfg = FinetuneConfig(task="classify", adapt="head")
    result = finetune(electra_run, train_file=train, val_file=val, out=out, cfg=cfg, overrides=FAST, progress=False)
    # ElectraClassificationHead: dense (32 -> 32) and out_proj (32 -> 2 labels), both new and trained
    assert result["trainable_params"] == 32 * 32 + 32 + 32 * 2 + 2
    assert _saved_names(out) == ["head.dense.bias", "head.dense.weight", "head.out_proj.bias", "head.out_proj.weight"]
    ft = load_finetuned(out, torch.device("cpu"))
    pretrained = load_checkpoint(electra_run).model_state()
    for name, value in ft.model.body.state_dict().items():
        assert torch.equal(value, pretrained[name]), name
    # the classifier exports as transformers' ElectraForSequenceClassification (the generator left behind)
    r = run_cli("export", str(out), "--to", "hf", "--out", str(tmp_path / "hf"), "--verify")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["ElectraForSequenceClassification"]
    assert config["id2label"] == {"0": "closed", "1": "open"}


def test_lora_targets_the_discriminator_only(electra_run: Path, tmp_path: Path):
    """The --lora-targets names mean the same layers as on GPT and BERT (`mlp.fc` missed ELECTRA's `fc`)."""
    out = tmp_path / "lora"
    train, _ = _toy_task(tmp_path)
    targets = ["qkv", "attn.proj", "mlp.fc", "mlp.proj"]
    cfg = FinetuneConfig(task="classify", adapt="lora", lora_rank=2, lora_targets=targets)
    result = finetune(electra_run, train_file=train, out=out, cfg=cfg, overrides=FAST, progress=False)
    # rank 2 on the one discriminator layer's qkv (32 -> 96), attn.proj, fc (32 -> 64), proj (64 -> 32)
    lora = 2 * (32 + 96) + 2 * (32 + 32) + 2 * (32 + 64) + 2 * (64 + 32)
    assert result["trainable_params"] == lora + 32 * 32 + 32 + 32 * 2 + 2
    assert sorted(k for k in _saved_names(out) if "lora" in k) == sorted(
        f"body.discriminator.layers.0.{m}.{ab}"
        for m in ("attn.qkv", "attn.proj", "fc", "proj")
        for ab in ("lora_A", "lora_B")
    )
    bad = FinetuneConfig(task="classify", adapt="lora", lora_targets=["pooler"])  # BERT's; ELECTRA has none
    with pytest.raises(
        ConfigError, match=r"'pooler' matches no linear layer; choose from attn.proj, attn.qkv, mlp.fc, mlp.proj$"
    ):
        finetune(electra_run, train_file=train, out=tmp_path / "bad", cfg=bad, overrides=FAST, progress=False)
    ft = load_finetuned(out, torch.device("cpu"))
    assert ft.model.classify(torch.tensor([[1, 2, 3, 4]]), torch.tensor([4])).shape == (1, 2)
    from lmforge.data.formats import classify_frame

    # rows are `[CLS] text [SEP]` padded with [PAD], as the discriminator read in pretraining (not a decoder's text EOS)
    assert classify_frame(ft.tokenizer, "electra") == classify_frame(ft.tokenizer, "bert")


def test_resume_is_bit_identical(electra_run: Path, tmp_path: Path):
    """As BERT/GPT classify: the run cut back to its step-3 checkpoint (a kill at step 4 or 5) ends as the
    straight run, dropout in the encoder and the head included."""
    train, val = _toy_task(tmp_path)
    overrides = {
        "train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "warmup_steps": 1},
        "eval": {"every": 3, "max_batches": 1},
        "checkpoint": {"every": 3, "keep": 5, "keep_best": False},
    }
    kw = {"train_file": train, "val_file": val, "cfg": FinetuneConfig(task="classify", adapt="full")}
    kw |= {"overrides": overrides, "progress": False}
    straight = tmp_path / "straight"
    finetune(electra_run, out=straight, **kw)
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    (cut / "checkpoints" / "latest").write_text("step-000003\n", encoding="utf-8")
    (cut / "eval.json").unlink()
    assert finetune(electra_run, out=cut, **kw)["steps"] == 6
    a, b = load_checkpoint(straight).model_state(), load_checkpoint(cut).model_state()
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_electra_refuses_generation_tasks_in_one_line(electra_run: Path, tmp_path: Path):
    data = Path(__file__).parent / "data"
    with pytest.raises(ConfigError, match="is an ELECTRA encoder: it fine-tunes with --task classify"):
        finetune(electra_run, train_file=data / "alpaca.jsonl", out=tmp_path / "x", cfg=FinetuneConfig(task="sft"))
    assert not (tmp_path / "x").exists()  # nothing half-written
    r = run_cli(
        "finetune",
        str(electra_run),
        "--task",
        "classify",
        "--adapt",
        "prompt",
        "--train",
        str(data / "sentiment_train.csv"),
        "--out",
        str(tmp_path / "y"),
    )
    assert r.returncode == 2 and "ELECTRA encoder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and not (tmp_path / "y").exists()
