"""Decoder classifiers (`finetune --task classify` on GPT-2/Llama/Qwen2-style bases) exported through the CLI as
`*ForSequenceClassification`: transformers' label scores equal ours on padded batches of different lengths
(right padding, and left padding where positions are rotary), the tokenizer frames texts as lmforge's rows
(`text EOS`), the text-classification pipeline names our labels; a head with a bias (runs fine-tuned before
heads lost it) is refused in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmforge.adapt.load import build_adapted, load_finetuned
from lmforge.errors import LmforgeError
from lmforge.export.hf import export_hf, verify_hf
from lmforge.export.hf_classifier import write_hf_classifier
from lmforge.export.peft import export_peft, load_exportable
from lmforge.finetune import FinetuneConfig, finetune
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe
from tests.conftest import run_cli
from tests.test_finetune import DATA, make_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers")

LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
# (base variant, adapt mode, HF class): each family once, each mode once
CASES = {
    "gpt2-full": (dict(), "full", "GPT2ForSequenceClassification"),
    "llama-gqa-untied-lora": (dict(LLAMA, n_kv_head=1, tie_embeddings=False), "lora", "LlamaForSequenceClassification"),
    "qwen2-head": (dict(LLAMA, qkv_bias=True), "head", "Qwen2ForSequenceClassification"),
}
FAST = {"train": {"max_steps": 4, "batch_size": 8, "log_every": 2, "warmup_steps": 1, "lr": 3e-3}, "eval": {"every": 0}}
# (digits: transformers' AutoTokenizer loads a qwen2 directory's tokenizer as Qwen2Tokenizer, whose own pre-tokenizer
# splits them one by one where lmforge's byte-level BPE keeps them together; the card names the class that reads
# tokenizer.json as it is)
TEXTS = ["Loved this place.", "Crust is not good, and the texture was just nasty!", "ok", "Great food; 10/10, 2025."]
# Same float32 math on both sides (our fused qkv/gate-up matmuls and SDPA vs HF's split ones and eager attention);
# measured max |diff| 6e-8 on scores of size ~0.1; a head on the wrong token moves them by 1e-2 or more.
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """Byte-level BPE, as lmforge trains by default, over the sentiment slice."""
    return train_bpe([p.read_text(encoding="utf-8") for p in sorted(DATA.glob("sentiment_*"))] * 3, vocab_size=400)


def with_bos(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with a <s> its post-processor puts before every text, as an imported Llama's."""
    from tokenizers import AddedToken, processors

    hf = Tokenizer.from_str(tokenizer.to_str()).hf
    hf.add_special_tokens([AddedToken("<s>", special=True, normalized=False)])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
    return Tokenizer(hf)


@pytest.mark.parametrize("case", list(CASES))
def test_decoder_classifier_exports_as_a_sequence_classifier(case: str, bpe: Tokenizer, tmp_path: Path) -> None:
    variant, adapt, architecture = CASES[case]
    tok = with_bos(bpe) if adapt == "lora" else bpe  # the Llama's rows are <s> text EOS
    base = make_base(tmp_path, max_seq_len=64, tok=tok, **variant)
    out = tmp_path / "cls"
    cfg = FinetuneConfig(task="classify", adapt=adapt, **({"lora_rank": 2} if adapt == "lora" else {}))
    finetune(base, train_file=DATA / "sentiment_train.csv", out=out, cfg=cfg, overrides=FAST, progress=False)
    if case == "gpt2-full":  # through the CLI once (a subprocess costs seconds), in-process for the others
        r = run_cli("export", str(out), "--to", "hf", "--out", str(tmp_path / "hf"), "--verify")
        assert r.returncode == 0, r.stderr
    else:
        export_hf(out, tmp_path / "hf")
        assert verify_hf(out, tmp_path / "hf") <= 1e-5  # what --verify prints
    config = json.loads((tmp_path / "hf" / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == [architecture]
    assert config["id2label"] == {"0": "negative", "1": "positive"}

    ours = load_finetuned(out, torch.device("cpu"))
    eos = ours.tokenizer.eos_id
    assert config["pad_token_id"] != eos  # HF pools the last non-pad token, which must be our EOS
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(theirs).__name__ == architecture
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    tokenizer_class = "PreTrainedTokenizerFast" if "qwen2" in case else "AutoTokenizer"
    assert (f"tokenizer = {tokenizer_class}.from_pretrained(" in card) == ("qwen2" in case)
    tok = getattr(transformers, tokenizer_class).from_pretrained(str(tmp_path / "hf"))
    prefix = ours.tokenizer.prompt_prefix
    assert len(prefix) == (adapt == "lora")
    for text in TEXTS:  # framed as lmforge's rows: [BOS] text, then the end-of-text token
        assert tok(text)["input_ids"] == prefix + ours.tokenizer.encode(text) + [eos]
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(TEXTS)  # every row a different length
    with torch.no_grad():
        expected = ours.model.classify(batch["input_ids"], lengths)
        torch.testing.assert_close(theirs(**batch).logits, expected, **TOL)
        if variant.get("pos_emb") == "rope":  # rotary positions are relative: left padding gives the same scores
            tok.padding_side = "left"
            torch.testing.assert_close(theirs(**tok(TEXTS, padding=True, return_tensors="pt")).logits, expected, **TOL)
    names = [config["id2label"][str(i)] for i in expected.argmax(-1).tolist()]
    tok.padding_side = "right"
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "hf"), tokenizer=tok)  # as the card
    got = pipe(TEXTS)
    assert [p["label"] for p in got] == names
    probs = expected.softmax(-1).max(-1).values.tolist()
    assert [p["score"] for p in got] == pytest.approx(probs, abs=1e-5)
    assert "pipeline_tag: text-classification" in card and architecture in card
    if adapt == "lora":  # merged; PEFT has no classifier adapter to write
        with pytest.raises(LmforgeError, match="export it without --peft"):
            export_peft(out, tmp_path / "peft")


def test_a_head_with_a_bias_is_refused_in_one_line_and_old_runs_load_with_theirs(tmp_path: Path) -> None:
    base = make_base(tmp_path, max_seq_len=64)
    out = tmp_path / "cls"
    cfg = FinetuneConfig(task="classify", adapt="head")
    finetune(base, train_file=DATA / "sentiment_train.csv", out=out, cfg=cfg, overrides=FAST, progress=False)
    info = json.loads((out / "finetune.json").read_text(encoding="utf-8"))
    assert info["head_bias"] is False
    trained = load_exportable(out)
    assert trained.model.head.bias is None  # bias-free, as HF's score
    # a run fine-tuned before heads lost their bias (finetune.json without head_bias) has one
    del info["head_bias"]
    old = build_adapted(trained.model.body, info, torch.device("cpu"))
    assert old.head.bias is not None
    with torch.no_grad():
        old.head.weight.copy_(trained.model.head.weight)
        old.head.bias.zero_()
    trained.model = old
    write_hf_classifier(trained, tmp_path / "zero")  # an all-zero bias is no bias: same function
    with torch.no_grad():
        old.head.bias.fill_(0.5)
    with pytest.raises(LmforgeError, match="had a bias") as e:
        write_hf_classifier(trained, tmp_path / "biased")
    assert len(str(e.value).splitlines()) == 1 and "fine-tune it again" in str(e.value)
    assert not (tmp_path / "biased").exists()


def test_a_prompt_tuned_classifier_is_refused_in_one_line(bpe: Tokenizer, tmp_path: Path) -> None:
    """Its soft prompt comes before the text; HF's classifier has no place for it (the export dropped it)."""
    base = make_base(tmp_path, max_seq_len=64, tok=bpe)
    out = tmp_path / "cls"
    cfg = FinetuneConfig(task="classify", adapt="prompt", prompt_tokens=4)
    fast = {"train": {"max_steps": 1, "batch_size": 4, "log_every": 1, "warmup_steps": 0}, "eval": {"every": 0}}
    finetune(base, train_file=DATA / "sentiment_train.csv", out=out, cfg=cfg, overrides=fast, progress=False)
    with pytest.raises(LmforgeError, match="prompt-tuned classify run") as e:
        export_hf(out, tmp_path / "hf")
    assert "score it with eval --task classify" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "hf").exists()
