"""LoRA: injection is a no-op until trained, merged == unmerged outputs, adapter-only checkpoints that
name their base, `--merge` runs that export, and Hugging Face directories as the base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lmforge.adapt.load import load_finetuned
from lmforge.adapt.lora import LoRALinear, inject_lora, lora_state_dict, merge_lora
from lmforge.checkpoint import load_checkpoint
from lmforge.errors import CheckpointError
from lmforge.eval.lm import evaluate_checkpoint
from lmforge.finetune import FinetuneConfig, finetune
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.trained import load_trained
from tests.conftest import run_cli
from tests.test_finetune import DATA, FAST, make_base

ALL_TARGETS = ["qkv", "attn.proj", "mlp.fc", "mlp.proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("lora"))


@pytest.mark.parametrize(
    "model", [{}, {"pos_emb": "rope", "mlp": "swiglu", "norm": "rmsnorm", "n_kv_head": 1, "bias": False}]
)
def test_merged_equals_unmerged(model: dict):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=16, **model))
    gpt.init_weights()
    base_keys = set(gpt.state_dict())
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = gpt(x)
    names = inject_lora(gpt, targets=ALL_TARGETS, rank=4, alpha=8.0, dropout=0.1)
    assert len(names) == 2 * 4
    gpt.eval()
    with torch.no_grad():
        assert torch.equal(gpt(x), before)  # B = 0: the injected model is the base, exactly
        for m in gpt.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.5)  # as if trained
        unmerged = gpt(x)
    assert not torch.allclose(unmerged, before, atol=1e-3)
    assert set(lora_state_dict(gpt)) == {f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")}
    assert merge_lora(gpt) == 8
    assert not any(isinstance(m, LoRALinear) for m in gpt.modules())
    assert set(gpt.state_dict()) == base_keys  # a merged model is a plain GPT again
    with torch.no_grad():
        merged = gpt(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_adapter_only_run_and_merged_export(base: Path, tmp_path: Path):
    from lmforge.export.hf import export_hf

    cfg = FinetuneConfig(task="sft", adapt="lora", lora_rank=4, lora_targets=["qkv", "mlp.fc"], eval_samples=1)
    adapters = tmp_path / "adapters"
    result = finetune(base, train_file=DATA / "alpaca.jsonl", out=adapters, cfg=cfg, overrides=FAST, progress=False)
    saved = load_checkpoint(adapters).model_state()
    assert all(k.endswith((".lora_A", ".lora_B")) for k in saved) and len(saved) == 2 * 2 * 2
    assert result["trainable_params"] == sum(t.numel() for t in saved.values())
    merged_run = tmp_path / "merged"
    cfg_merge = FinetuneConfig(**{**cfg.__dict__, "merge": True})
    finetune(base, train_file=DATA / "alpaca.jsonl", out=merged_run, cfg=cfg_merge, overrides=FAST, progress=False)

    x = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        unmerged = load_finetuned(adapters, torch.device("cpu")).model(x)
        plain = load_trained(merged_run, torch.device("cpu")).model  # an ordinary run: eval/generate/export load it
        torch.testing.assert_close(plain(x), unmerged, atol=1e-5, rtol=1e-5)
    assert (export_hf(merged_run, tmp_path / "hf") / "model.safetensors").is_file()

    # `lmforge generate` and `eval` open the adapter-only run too (its adapters applied on the named base)
    p = run_cli("generate", str(adapters), "--prompt", "Hi", "--max-new-tokens", "4", "--seed", "0")
    assert p.returncode == 0 and p.stdout.startswith("Hi"), p.stderr
    from lmforge.data.prepare import PrepareConfig, prepare

    data = str(tmp_path / "data")  # text encoded with the base's tokenizer
    tok = str(base / "tokenizer.json")
    prepare(
        PrepareConfig(inputs=[str(DATA / "eng_fra.txt")], out=data, tokenizer=tok, val_fraction=0.3), progress=False
    )
    got = evaluate_checkpoint(adapters, data_dir=data, split="train", max_batches=2)
    assert got["loss"] == pytest.approx(
        evaluate_checkpoint(merged_run, data_dir=data, split="train", max_batches=2)["loss"], rel=1e-5
    )
    assert got["loss"] != pytest.approx(
        evaluate_checkpoint(base, data_dir=data, split="train", max_batches=2)["loss"], rel=1e-6
    )


def test_changed_base_is_refused(base: Path, tmp_path: Path):
    own_base = tmp_path / "base"
    shutil.copytree(base, own_base)
    out = tmp_path / "run"
    finetune(
        own_base, train_file=DATA / "sentiment_train.csv", out=out, progress=False, overrides=FAST,
        cfg=FinetuneConfig(task="classify", adapt="lora", lora_rank=2),
    )  # fmt: skip
    assert load_finetuned(out, torch.device("cpu")).info["adapt"] == "lora"
    p = run_cli("generate", str(out), "--prompt", "x")
    assert p.returncode != 0 and "is a classifier" in p.stderr and "Traceback" not in p.stderr
    shutil.rmtree(own_base)
    shutil.copytree(make_base(tmp_path / "other", seed=1), own_base)  # same place, other weights
    with pytest.raises(CheckpointError, match="changed since"):
        load_finetuned(out, torch.device("cpu"))


def test_hf_directory_as_base(base: Path, tmp_path: Path):
    from lmforge.export.hf import export_hf

    hf_dir = export_hf(base, tmp_path / "hf")
    out = tmp_path / "from-hf"
    cfg = FinetuneConfig(task="classify", adapt="head")
    finetune(hf_dir, train_file=DATA / "sentiment_train.csv", out=out, cfg=cfg, overrides=FAST, progress=False)
    assert (out / "base" / "config.json").is_file()  # imported into the run, then named as its base
    ft = load_finetuned(out, torch.device("cpu"))
    assert ft.info["base"].startswith(str((out / "base").resolve()))
    before = load_checkpoint(base).model_state()
    assert torch.equal(ft.model.body.tok_emb.weight, before["tok_emb.weight"])


def test_lora_on_top_of_a_lora_run(base: Path, tmp_path: Path):
    """SFT with adapters, then DPO with adapters on that run: each base is merged before the next adapters."""
    sft = tmp_path / "sft"
    cfg = FinetuneConfig(task="sft", adapt="lora", lora_rank=2, eval_samples=1, max_new_tokens=2)
    finetune(base, train_file=DATA / "alpaca.jsonl", out=sft, cfg=cfg, overrides=FAST, progress=False)
    dpo = tmp_path / "dpo"
    finetune(
        sft, train_file=DATA / "hh_rlhf.jsonl", out=dpo, overrides=FAST, progress=False,
        cfg=FinetuneConfig(task="dpo", adapt="lora", lora_rank=2),
    )  # fmt: skip
    ft = load_finetuned(dpo, torch.device("cpu"))
    assert ft.info["base"].startswith(str(sft.resolve()))
    assert sum(isinstance(m, LoRALinear) for m in ft.model.modules()) == 2 * 2  # only the DPO adapters
    assert (dpo / "tokenizer_config.json").is_file()


@pytest.mark.parametrize(
    ("adapt", "setting", "value"),
    [("lora", "lora_alpha", v) for v in (float("nan"), float("inf"), 0.0, -1.0)]
    + [("full", "dpo_beta", float("inf")), ("full", "dpo_beta", float("nan"))],
)
def test_a_lora_alpha_or_dpo_beta_that_is_not_a_finite_positive_number_is_refused(adapt, setting, value) -> None:
    """--lora-alpha nan or inf trained (the update, scaled by alpha / r, made every loss NaN) and wrote the run with
    a hint to lower --train.lr; 0 and -1 trained too. --dpo-beta inf passed its > 0 check."""
    from lmforge.errors import ConfigError
    from lmforge.finetune import FinetuneConfig

    flag = "--" + setting.replace("_", "-")
    task = "dpo" if setting == "dpo_beta" else "classify"
    with pytest.raises(ConfigError, match=f"{flag} must be a number > 0, got {value}"):
        FinetuneConfig(task=task, adapt=adapt, **{setting: value})
