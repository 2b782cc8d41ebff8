"""HF ELECTRA directories as a base: tiny `transformers` ELECTRA models (embedding_size below and equal to
hidden_size) saved with `save_pretrained` and a BertTokenizerFast, imported through the CLI, checked against
transformers (discriminator scores, hidden states), fine-tuned for classification, evaluated, exported back
and reloaded; generator and task-head directories are refused in one line.

The models are random with every 1-D parameter perturbed (HF initialises LayerNorms to 1/0 and biases to 0),
so a swapped norm or bias mapping moves the outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.adapt.load import load_finetuned
from lmforge.checkpoint import load_checkpoint
from lmforge.config import RunConfig, config_from_json
from lmforge.errors import ConfigError, LmforgeError
from lmforge.export.hf import export_hf, verify_hf
from lmforge.export.hf_import import import_hf
from lmforge.export.peft import export_peft
from lmforge.finetune import FinetuneConfig, finetune
from lmforge.models.bert import BertConfig, Electra
from lmforge.trained import load_trained
from tests.conftest import run_cli
from tests.test_finetune_electra import _toy_task  # vowels vs consonants: WordPiece reads them letter by letter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers")

# Float32 on both sides, different kernels (our fused qkv + SDPA vs HF's eager attention); measured max
# |diff| (torch 2.13, transformers 5.24): 1.2e-6 on last hidden states (LayerNorm outputs, size ~1), 4e-8 on
# discriminator scores (size ~0.2). Without the embeddings_project mapping the import fails outright.
TOL = dict(atol=1e-5, rtol=1e-4)
WORDS = "the a cat dog sat ran on mat red blue sun moon and is was big small".split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *LETTERS, *(f"##{c}" for c in LETTERS)]


def _tokenizer() -> object:
    """ELECTRA's tokenizer is BERT's WordPiece (uncased), here over a 50-token vocabulary."""
    return transformers.BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=True)


def hf_electra(root: Path, *, embedding_size: int, cls: str = "ElectraForPreTraining", seed: int = 0) -> object:
    """A tiny random ELECTRA of class `cls` saved with its tokenizer at `root` (as save_pretrained writes one)."""
    config = transformers.ElectraConfig(
        vocab_size=len(VOCAB), embedding_size=embedding_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(root))
    _tokenizer().save_pretrained(str(root))
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(VOCAB), (3, 20), generator=g)
    segments = (torch.arange(20) >= 9).long().expand(3, 20)
    pad = torch.ones(3, 20, dtype=torch.bool)
    pad[1, 14:] = False
    return idx, segments, pad


@pytest.mark.parametrize("embedding_size", [16, 32])
def test_cli_import_matches_transformers(embedding_size: int, tmp_path: Path) -> None:
    theirs = hf_electra(tmp_path / "hf", embedding_size=embedding_size)
    r = run_cli("import", str(tmp_path / "hf"), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "no generator weights; they start freshly initialised" in r.stderr
    run = load_trained(tmp_path / "run", torch.device("cpu"))
    cfg = run.config.model
    assert (cfg.family, cfg.d_model, cfg.embed_dim) == ("electra", 32, embedding_size)
    assert cfg.d_embed == (0 if embedding_size == 32 else embedding_size)  # equal widths: an ordinary run
    assert run.config.objective.name == "electra"
    ours = run.model
    assert (ours.discriminator.in_proj is None) == (embedding_size == 32)
    idx, segments, pad = _inputs()
    with torch.no_grad():
        ref = theirs(input_ids=idx, token_type_ids=segments, attention_mask=pad.long(), output_hidden_states=True)
        torch.testing.assert_close(ours(idx, segments, pad)[pad], ref.logits[pad], **TOL)
        hidden = ours.discriminator(ours.embed(idx, segments), pad)
        torch.testing.assert_close(hidden[pad], ref.hidden_states[-1][pad], **TOL)
    # the tokenizer came in without its [CLS]/[SEP] framing, with the ids the model knows
    assert run.tokenizer.encode("the cat sat") == [VOCAB.index(w) for w in ("the", "cat", "sat")]
    # and goes back out as ElectraForPreTraining with the same embedding_size and tensors
    r = run_cli("export", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "back" / "config.json").read_text(encoding="utf-8"))["embedding_size"] == (
        embedding_size
    )
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    exported = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert exported.keys() == {k for k in original if not k.endswith(("position_ids", "token_type_ids"))}
    assert all(torch.equal(exported[k], original[k]) for k in exported)
    assert verify_hf(tmp_path / "run", tmp_path / "back") <= 2e-5
    card = (tmp_path / "back" / "README.md").read_text(encoding="utf-8")
    assert ("| embedding width | 16 " in card) == (embedding_size == 16)
    # VOCAB lists "a" twice (a word and a letter): 73 tokens on ids 0-73, its specials inside (the card said
    # "73 in the tokenizer before specials")
    assert "| vocabulary | 74 (73 tokens in the tokenizer on ids 0-73, [PAD]/[CLS]/[SEP]/[MASK] among them) |" in card


def test_bare_electra_model_imports_with_a_fresh_head(tmp_path: Path) -> None:
    theirs = hf_electra(tmp_path / "hf", embedding_size=16, cls="ElectraModel")
    r = run_cli("import", str(tmp_path / "hf"), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "has no disc_dense, disc_head, generator weights" in r.stderr
    ours = load_trained(tmp_path / "run", torch.device("cpu")).model
    idx, segments, pad = _inputs()
    with torch.no_grad():
        ref = theirs(input_ids=idx, token_type_ids=segments, attention_mask=pad.long()).last_hidden_state
        torch.testing.assert_close(ours.discriminator(ours.embed(idx, segments), pad)[pad], ref[pad], **TOL)


def test_generator_and_classifier_directories_are_refused_in_one_line(tmp_path: Path) -> None:
    hf_electra(tmp_path / "gen", embedding_size=16, cls="ElectraForMaskedLM")
    r = run_cli("import", str(tmp_path / "gen"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ELECTRA generator (ElectraForMaskedLM)" in r.stderr and "discriminator" in r.stderr
    theirs = hf_electra(tmp_path / "cls", embedding_size=16, cls="ElectraForSequenceClassification")
    r = run_cli("import", str(tmp_path / "cls"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "classifier.dense.bias" in r.stderr and "model.electra.save_pretrained" in r.stderr
    assert not (tmp_path / "out").exists()
    theirs.electra.save_pretrained(str(tmp_path / "encoder"))  # what the message says to do
    _tokenizer().save_pretrained(str(tmp_path / "encoder"))
    r = run_cli("import", str(tmp_path / "encoder"), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "encoder" / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "encoder" / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu_new"}), encoding="utf-8")
    with pytest.raises(LmforgeError, match="hidden_act 'gelu_new' is not supported; lmforge's ELECTRA uses exact GELU"):
        import_hf(tmp_path / "encoder", tmp_path / "out2")


def test_d_embed_narrows_electra_embeddings_only() -> None:
    common = dict(vocab_size=50, max_seq_len=16, n_layer=1, n_head=4, d_model=32, generator_ratio=0.5)
    default = Electra(BertConfig(family="electra", **common)).state_dict()
    assert "discriminator.in_proj.weight" not in default  # d_embed 0: the layout every earlier run has
    assert default["embed.tok_emb.weight"].shape == (50, 32)
    narrow = Electra(BertConfig(family="electra", d_embed=8, **common)).state_dict()
    assert narrow.keys() - default.keys() == {"discriminator.in_proj.weight", "discriminator.in_proj.bias"}
    assert narrow["embed.tok_emb.weight"].shape == (50, 8) and narrow["discriminator.in_proj.weight"].shape == (32, 8)
    assert narrow["generator.in_proj.weight"].shape == (16, 8) and narrow["gen_head.dense.weight"].shape == (8, 16)
    with pytest.raises(ConfigError, match="model.d_embed is for family electra"):
        BertConfig(family="bert", d_embed=8, **common)
    # a config.json written before the field existed reads as d_embed 0
    saved = RunConfig(out="run", model=BertConfig(family="electra", **common)).to_dict()
    del saved["model"]["d_embed"]
    assert config_from_json(saved, "config.json").model == BertConfig(family="electra", **common)
    # a pretraining step runs through both projections (generator and discriminator) and trains them
    torch.manual_seed(0)
    model = Electra(BertConfig(family="electra", d_embed=8, **common))
    model.init_weights()
    idx = torch.randint(0, 50, (2, 16))
    select = torch.rand(2, 16) < 0.3
    step = model(idx, select=select, noise=torch.rand(2, 16))
    assert step.gen_logits.shape == (int(select.sum()), 50) and step.disc_logits.shape == (2, 16)
    (step.gen_logits.logsumexp(-1).sum() + step.disc_logits.sum()).backward()
    assert model.generator.in_proj.weight.grad.abs().sum() > 0
    assert model.discriminator.in_proj.weight.grad.abs().sum() > 0


def _same_classifier_logits(run: Path, hf_dir: Path, texts: list[str]) -> object:
    """Our classifier's and transformers' label scores on `texts` (padded batch) are equal; returns theirs."""
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()
    batch = transformers.AutoTokenizer.from_pretrained(str(hf_dir))(texts, padding=True, return_tensors="pt")
    ours = load_finetuned(run, torch.device("cpu")).model
    with torch.no_grad():
        got = ours.classify(batch["input_ids"], batch["attention_mask"].sum(1))
        torch.testing.assert_close(got, theirs(**batch).logits, **TOL)
    return theirs


def test_hf_electra_finetunes_evaluates_and_exports_as_a_sequence_classifier(tmp_path: Path) -> None:
    hf_electra(tmp_path / "hf", embedding_size=16)
    train, val = _toy_task(tmp_path)
    out = tmp_path / "cls"
    cfg = FinetuneConfig(task="classify", adapt="full")
    overrides = {"train": {"max_steps": 20, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2}, "eval": {"every": 0}}
    result = finetune(
        tmp_path / "hf", train_file=train, val_file=val, out=out, cfg=cfg, overrides=overrides, progress=False
    )
    accuracy = result["val"]["accuracy"]
    assert accuracy >= 0.9  # chance is 0.5 (20 of each class); measured 1.0 after 15 and 20 steps, 0.5 after 10
    assert not [n for n in load_checkpoint(out).model_state() if "generator" in n]  # the fresh generator stays out
    r = run_cli("eval", str(out), "--task", "classify", "--data", str(val), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(accuracy)
    export_hf(out, tmp_path / "export")
    assert verify_hf(out, tmp_path / "export") <= 2e-5
    config = json.loads((tmp_path / "export" / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["ElectraForSequenceClassification"] and config["embedding_size"] == 16
    assert config["id2label"] == {"0": "closed", "1": "open"}
    texts = ["aei ou", "tds nr", "a", "oa ie ua eo iu"]
    theirs = _same_classifier_logits(out, tmp_path / "export", texts)
    assert type(theirs).__name__ == "ElectraForSequenceClassification"
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "export"))
    assert [p["label"] for p in pipe(texts[:2])] == ["open", "closed"]
    assert "pipeline_tag: text-classification" in (tmp_path / "export" / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("adapt", ["head", "lora"])
def test_head_and_lora_classifiers_of_an_hf_electra_export_merged(adapt: str, tmp_path: Path) -> None:
    hf_electra(tmp_path / "hf", embedding_size=16)
    train, val = _toy_task(tmp_path)
    out = tmp_path / adapt
    fast = {"train": {"max_steps": 4, "batch_size": 8, "log_every": 2, "warmup_steps": 1}, "eval": {"every": 0}}
    cfg = FinetuneConfig(task="classify", adapt=adapt, **({"lora_rank": 2} if adapt == "lora" else {}))
    finetune(tmp_path / "hf", train_file=train, val_file=val, out=out, cfg=cfg, overrides=fast, progress=False)
    if adapt == "head":  # the imported encoder (embeddings_project included) arrived unchanged and stayed frozen
        imported = load_checkpoint(out / "base").model_state()
        body = load_finetuned(out, torch.device("cpu")).model.body.state_dict()
        assert "discriminator.in_proj.weight" in body
        assert all(torch.equal(value, imported[name]) for name, value in body.items())
    else:  # the adapter merges into the exported weights; PEFT has no classifier adapter to write
        with pytest.raises(LmforgeError, match="export it without --peft"):
            export_peft(out, tmp_path / "peft")
    export_hf(out, tmp_path / "export")
    _same_classifier_logits(out, tmp_path / "export", ["aei ou", "tds nr", "a"])
    assert verify_hf(out, tmp_path / "export") <= 2e-5


def hf_generator(
    root: Path, disc: object, *, hidden: int = 16, heads: int = 2, layers: int = 2, seed: int = 1
) -> object:
    """A tiny random ElectraForMaskedLM beside `disc` (an ElectraForPreTraining), holding its embeddings as an
    ELECTRA generator does (one table trained for both), saved at `root`."""
    config = transformers.ElectraConfig(
        vocab_size=len(VOCAB), embedding_size=disc.config.embedding_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=40, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.ElectraForMaskedLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())  # (the tied decoder too)
    model.save_pretrained(str(root))
    return model


# generator widths: 16 = the 16-wide embeddings (no projection), 16 under 32-wide ones (embeddings_project)
@pytest.mark.parametrize("embedding_size", [16, 32])
def test_cli_import_with_generator_matches_transformers_and_pretrains(embedding_size: int, tmp_path: Path) -> None:
    disc = hf_electra(tmp_path / "disc", embedding_size=embedding_size)
    gen = hf_generator(tmp_path / "gen", disc)
    r = run_cli("import", str(tmp_path / "disc"), "--out", str(tmp_path / "run"), "--generator", str(tmp_path / "gen"))
    assert r.returncode == 0, r.stderr
    assert "generator" not in r.stderr  # no "freshly initialised" note: it was imported
    run = load_trained(tmp_path / "run", torch.device("cpu"))
    assert run.config.model.generator_ratio == 0.5 and run.config.model.generator.d_model == 16
    ours = run.model
    assert (ours.generator.in_proj is None) == (embedding_size == 16)
    idx, segments, pad = _inputs()
    with torch.no_grad():  # measured max |diff| 2.4e-7 (embedding_size 16) and 3.9e-7 (32) on MLM scores of size ~1
        ref = gen(input_ids=idx, token_type_ids=segments, attention_mask=pad.long()).logits
        torch.testing.assert_close(ours.mlm_logits(ours.generator_hidden(idx, segments, pad))[pad], ref[pad], **TOL)
        disc_ref = disc(input_ids=idx, token_type_ids=segments, attention_mask=pad.long()).logits
        torch.testing.assert_close(ours(idx, segments, pad)[pad], disc_ref[pad], **TOL)  # (unchanged by it)
    # a pretraining step starts from the imported generator: its MLM loss is transformers', and it trains
    select = (torch.rand(idx.shape, generator=torch.Generator().manual_seed(2)) < 0.3) & pad
    step = ours.train()(idx, segments, pad, select=select, noise=torch.rand(idx.shape))
    gen_loss = torch.nn.functional.cross_entropy(step.gen_logits, idx[select])
    torch.testing.assert_close(gen_loss, torch.nn.functional.cross_entropy(ref[select], idx[select]), **TOL)
    before = ours.gen_head.dense.weight.detach().clone()
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    (gen_loss + step.disc_logits.sum()).backward()
    optimizer.step()
    assert not torch.equal(ours.gen_head.dense.weight, before)


def test_generators_lmforge_cannot_hold_are_refused_in_one_line(tmp_path: Path) -> None:
    disc = hf_electra(tmp_path / "disc", embedding_size=16)
    cases = {  # generator directory -> what the one line says
        "other": "was not trained with this discriminator",  # its own embeddings, not the discriminator's
        "deeper": "scaled by one ratio",  # 3 layers under a 2-layer discriminator
        "disc2": "is not an ELECTRA generator (no generator_predictions",  # a discriminator given as --generator
    }
    hf_generator(tmp_path / "deeper", disc, layers=3)
    other = hf_generator(tmp_path / "other", disc)
    with torch.no_grad():
        other.electra.embeddings.LayerNorm.bias.add_(0.01)
    other.save_pretrained(str(tmp_path / "other"))
    hf_electra(tmp_path / "disc2", embedding_size=16)
    for name, message in cases.items():
        r = run_cli(
            "import", str(tmp_path / "disc"), "--out", str(tmp_path / "run"), "--generator", str(tmp_path / name)
        )
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert message in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()
    bert = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40,
    )  # fmt: skip
    transformers.BertForMaskedLM(bert).save_pretrained(str(tmp_path / "bert"))
    _tokenizer().save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(LmforgeError, match="--generator is for ELECTRA discriminators"):
        import_hf(tmp_path / "bert", tmp_path / "run", generator=tmp_path / "deeper")
