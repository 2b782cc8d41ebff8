"""Fine-tuning BERT encoders for classification: a few-step MLM run from `lmforge pretrain`, then
full / head-only / LoRA fine-tuning with the pooled-[CLS] head, `eval --task classify`, the HF BERT
directory path, and the one-line refusals of what an encoder cannot do."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from lmforge.adapt.load import load_finetuned
from lmforge.checkpoint import load_checkpoint
from lmforge.errors import ConfigError, LmforgeError
from lmforge.finetune import FinetuneConfig, finetune
from tests.conftest import pretrain_tiny_encoder, run_cli

DATA = Path(__file__).parent / "data"
FAST = {"train": {"max_steps": 4, "batch_size": 8, "log_every": 2, "warmup_steps": 1}, "eval": {"every": 2}}


@pytest.fixture(scope="module")
def bert_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bert-tiny shrunk, pretrained with MLM for a few steps on the shared test corpus."""
    return pretrain_tiny_encoder(
        "bert-tiny", data_dir, tmp_path_factory.mktemp("bert") / "mlm", objective={"name": "mlm"}
    )


def test_head_only_bert_keeps_the_encoder_bit_identical(bert_run: Path, tmp_path: Path):
    out = tmp_path / "head"
    cfg = FinetuneConfig(task="classify", adapt="head")
    result = finetune(
        bert_run,
        train_file=DATA / "sentiment_train.csv",
        val_file=DATA / "sentiment_val.jsonl",
        out=out,
        cfg=cfg,
        overrides=FAST,
        progress=False,
    )
    assert result["trainable_params"] == 32 * 2 + 2  # Linear(d_model, 2 labels)
    assert 0.0 <= result["val"]["accuracy"] <= 1.0 and result["val"]["n"] > 0
    saved = load_checkpoint(out).model_state()
    assert sorted(saved) == ["head.bias", "head.weight"]
    ft = load_finetuned(out, torch.device("cpu"))
    assert ft.model.body.__class__.__name__ == "Bert"
    before = load_checkpoint(bert_run).model_state()
    for name, value in ft.model.body.state_dict().items():
        assert torch.equal(value, before[name]), name
    # the head moved, and eval --task classify on the saved run reproduces the end-of-training metrics
    r = run_cli("eval", str(out), "--task", "classify", "--data", str(DATA / "sentiment_val.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["accuracy"] == pytest.approx(result["val"]["accuracy"])
    assert metrics["macro_f1"] == pytest.approx(result["val"]["macro_f1"])


def test_cls_pooling_ignores_padding(bert_run: Path, tmp_path: Path):
    """A row scores the same alone and padded in a batch with a longer one: the key-padding mask works."""
    from lmforge.adapt.heads import Adapted
    from lmforge.data.formats import classify_batch, classify_frame

    t = load_finetuned(bert_run, torch.device("cpu"))
    torch.manual_seed(0)
    model = Adapted(t.model, n_labels=3).eval()
    before, after, pad = classify_frame(t.tokenizer, "bert")
    short = before + t.tokenizer.encode("good") + after
    long = before + t.tokenizer.encode("not good at all, really") + after
    with torch.no_grad():
        ids, lengths, _ = classify_batch([(short, 0)], pad)
        alone = model.classify(ids, lengths)
        ids, lengths, _ = classify_batch([(short, 0), (long, 1)], pad)
        batched = model.classify(ids, lengths)
    assert ids[0, len(short)] == pad and short[0] != pad
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-6)  # fp32 summation order only


@pytest.mark.parametrize("adapt", ["lora", "full"])
def test_lora_and_full_bert_classifiers(bert_run: Path, tmp_path: Path, adapt: str):
    out = tmp_path / adapt
    lora = {"lora_rank": 2, "lora_targets": ["qkv", "attn.proj", "mlp.fc", "mlp.proj"]} if adapt == "lora" else {}
    cfg = FinetuneConfig(task="classify", adapt=adapt, **lora)
    result = finetune(
        bert_run, train_file=DATA / "sentiment_train.csv", out=out, cfg=cfg, overrides=FAST, progress=False
    )
    saved = load_checkpoint(out).model_state()
    if adapt == "lora":
        # rank 2 on 4 linears of the one layer: qkv (32 -> 96), attn.proj, fc (32 -> 64), proj (64 -> 32)
        lora = 2 * (32 + 96) + 2 * (32 + 32) + 2 * (32 + 64) + 2 * (64 + 32)
        assert result["trainable_params"] == lora + 32 * 2 + 2
        names = sorted(k for k in saved if "lora" in k)
        assert names == sorted(
            f"body.encoder.layers.0.{m}.{ab}"
            for m in ("attn.qkv", "attn.proj", "fc", "proj")
            for ab in ("lora_A", "lora_B")
        )
    else:
        assert "body.encoder.layers.0.attn.qkv.weight" in saved and "head.weight" in saved
    ft = load_finetuned(out, torch.device("cpu"))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert ft.model.classify(ids, torch.tensor([4])).shape == (1, 2)


def test_encoder_refuses_generation_tasks(bert_run: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="BERT encoder.*--task classify"):
        finetune(bert_run, train_file=DATA / "alpaca.jsonl", out=tmp_path / "x", cfg=FinetuneConfig(task="sft"))
    assert not (tmp_path / "x").exists()  # nothing half-written
    r = run_cli(
        "finetune",
        str(bert_run),
        "--task",
        "classify",
        "--adapt",
        "prompt",
        "--train",
        str(DATA / "sentiment_train.csv"),
        "--out",
        str(tmp_path / "y"),
    )
    assert r.returncode == 2 and "BERT encoder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    from lmforge.eval.tasks import evaluate_task

    with pytest.raises(ConfigError, match="is an encoder; fine-tune it"):  # a bare MLM run has no head to score
        evaluate_task(bert_run, task="classify", data=DATA / "sentiment_val.jsonl", device="cpu")
    # generate, chat and serve all refuse an encoder (chat and serve answered with garbage)
    from lmforge.chat import chat
    from lmforge.serve import make_server

    for call in (
        lambda: chat(bert_run, stdin=io.StringIO("hello\n/exit\n"), stdout=io.StringIO()),
        lambda: make_server(bert_run, port=0),
    ):
        with pytest.raises(LmforgeError, match="holds an encoder.*does not generate text"):
            call()
    r = run_cli("generate", str(bert_run), "--prompt", "hi")
    assert r.returncode == 2 and "holds an encoder" in r.stderr


def test_hf_bert_directory_as_base(bert_run: Path, tmp_path: Path):
    """A local HF BERT directory (here: our run exported by `lmforge export`) is imported and fine-tuned."""
    pytest.importorskip("transformers")
    from lmforge.export.hf import export_hf

    hf_dir = export_hf(bert_run, tmp_path / "hf")
    out = tmp_path / "from_hf"
    cfg = FinetuneConfig(task="classify", adapt="head")
    finetune(hf_dir, train_file=DATA / "sentiment_train.csv", out=out, cfg=cfg, overrides=FAST, progress=False)
    ft = load_finetuned(out, torch.device("cpu"))
    imported = load_checkpoint(out / "base").model_state()
    original = load_checkpoint(bert_run).model_state()
    for name, value in ft.model.body.state_dict().items():  # the encoder arrived unchanged and stayed frozen
        assert torch.equal(value, imported[name]), name
        assert torch.equal(value, original[name]), name


def test_a_bert_classifier_exports_as_bert_for_sequence_classification(bert_run: Path, tmp_path: Path):
    """`export` of a BERT classifier was refused; it now writes BertForSequenceClassification (the body's pooler
    under `bert.pooler`, our head as `classifier`, the MLM and NSP heads left behind) with the same scores."""
    out = tmp_path / "cls"
    cfg = FinetuneConfig(task="classify", adapt="head")
    finetune(bert_run, train_file=DATA / "sentiment_train.csv", out=out, cfg=cfg, overrides=FAST, progress=False)
    r = run_cli("export", str(out), "--to", "hf", "--out", str(tmp_path / "hf"), "--verify")
    assert r.returncode == 0, r.stderr
    transformers = pytest.importorskip("transformers")
    theirs, loading = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True
    )
    assert type(theirs).__name__ == "BertForSequenceClassification" and not any(loading.values()), loading
    ft = load_finetuned(out, torch.device("cpu"))
    assert [theirs.config.id2label[i] for i in range(len(ft.info["labels"]))] == ft.info["labels"]
    texts = ["a fine film", "dull and far too long, sadly", "ok"]
    batch = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = ft.model.classify(batch["input_ids"], batch["attention_mask"].sum(1))
        torch.testing.assert_close(got, theirs.eval()(**batch).logits, atol=1e-5, rtol=1e-4)
