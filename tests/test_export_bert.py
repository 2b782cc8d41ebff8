"""BERT/ELECTRA HF export and BERT import: our tiny encoders vs `transformers` loading the exported
directories (MLM/NSP logits, ELECTRA discriminator scores, AutoTokenizer encodings, fill-mask),
export -> import -> export round trips, BERT directories written by `transformers` itself, errors.

Tiny random models (n_layer 2, d_model 32, n_head 4) with every 1-D parameter perturbed, so a
swapped norm or bias mapping moves the logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import save_checkpoint
from lmforge.config import RunConfig
from lmforge.data.masking import special_ids
from lmforge.errors import LmforgeError
from lmforge.export.bert import encoder_tokenizer_json
from lmforge.export.hf import export_hf, verify_hf
from lmforge.export.hf_import import import_hf
from lmforge.models.bert import Bert, BertConfig, Electra
from lmforge.objective_config import ObjectiveConfig
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe, train_char
from lmforge.train.state import TrainState
from lmforge.trained import load_trained

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog, twice.",
    "Emoji: 🦊🐶 and café naïve — 敏捷的棕色狐狸。",
    "the lazy dog sleeps",
]
CONTEXT = 24
# Float32 on both sides, different kernels: our fused qkv + SDPA vs HF's separate q/k/v + eager softmax.
# Measured max |diff| here (torch 2.13, transformers 5.x, 1 thread): ~5e-7 on logits of size ~3.
# The mapping mistakes tried while writing this (q/k swapped, norm1/norm2 swapped, a dropped MLM
# bias) moved logits by > 1e-2.
TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe([f"{t} {i}" for i in range(20) for t in TEXTS], vocab_size=300)


def make_encoder_run(root: Path, tokenizer: Tokenizer, family: str = "bert", seed: int = 0) -> Path:
    """A run directory with one checkpoint of a seeded random, perturbed BERT or ELECTRA."""
    vocab = tokenizer.vocab_size + special_ids(tokenizer).added  # as pretraining sizes it
    electra = {"generator_ratio": 0.5} if family == "electra" else {}
    model_cfg = BertConfig(family=family, vocab_size=vocab, max_seq_len=CONTEXT, n_layer=2, n_head=4, d_model=32,
                           d_ff=64, dropout=0.0, **electra)  # fmt: skip
    objective = ObjectiveConfig(name="electra" if family == "electra" else "mlm+nsp")
    cfg = RunConfig(out=str(root), model=model_cfg, objective=objective)
    torch.manual_seed(seed)
    model = (Electra if family == "electra" else Bert)(model_cfg)
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    state = TrainState(step=5, tokens=5 * 4 * CONTEXT)
    save_checkpoint(root, step=5, model=model, optimizer=None,
                    state={"train_state": state.to_dict(), "config": cfg.to_dict()},
                    tokenizer_json=tokenizer.to_str())  # fmt: skip
    (root / "config.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")  # as pretrain writes it
    return root


def inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (3, 20), generator=g)
    segments = (torch.arange(20) >= 9).long().expand(3, 20)
    pad = torch.ones(3, 20, dtype=torch.bool)
    pad[1, 14:] = False
    return idx, segments, pad


def test_bert_export_matches_transformers(bpe: Tokenizer, tmp_path: Path) -> None:
    run = make_encoder_run(tmp_path / "run", bpe)
    record = {"step": 5, "val_loss": 5.5, "val_mlm_accuracy": 0.125, "val_nsp_accuracy": 0.5}  # as the loop logs
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    out = export_hf(run, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    assert "cls.predictions.decoder.weight" not in load_file(str(out / "model.safetensors"))  # tied: stored once
    ours = load_trained(run, torch.device("cpu")).model
    mlm_model, info = transformers.AutoModelForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    assert type(mlm_model).__name__ == "BertForMaskedLM" and not info["missing_keys"]
    pre = transformers.AutoModelForPreTraining.from_pretrained(str(out)).eval()
    assert type(pre).__name__ == "BertForPreTraining"
    idx, segments, pad = inputs(ours.cfg.vocab_size)
    with torch.no_grad():
        hidden = ours(idx, segments, pad)
        kwargs = dict(input_ids=idx, token_type_ids=segments, attention_mask=pad.long())
        torch.testing.assert_close(mlm_model.eval()(**kwargs).logits[pad], ours.mlm_logits(hidden)[pad], **TOL)
        ref = pre(**kwargs)
        torch.testing.assert_close(ref.prediction_logits[pad], ours.mlm_logits(hidden)[pad], **TOL)
        torch.testing.assert_close(ref.seq_relationship_logits, ours.nsp_logits(hidden), **TOL)
    assert verify_hf(run, out) <= 2e-5
    card = (out / "README.md").read_text(encoding="utf-8")
    assert (
        "pipeline_tag: fill-mask" in card and "| steps | 5 |" in card and f"| tokens seen | {5 * 4 * CONTEXT} |" in card
    )
    assert "| last validation mlm accuracy | 0.1250 (step 5) |" in card and "last validation nsp accuracy" in card
    assert "| last validation loss | 5.5000 MLM nats/masked token + NSP nats/pair (step 5) |" in card  # not per token
    n = bpe.vocab_size  # a BPE lmforge trained: the encoder's special tokens were appended after its vocabulary
    assert (
        f"| vocabulary | {n + 4} ({n} tokens in the tokenizer, [PAD], [CLS], [SEP], [MASK] appended after them) |"
        in card
    )


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_autotokenizer_frames_like_our_loader_and_fill_mask_runs(kind: str, bpe: Tokenizer, tmp_path: Path) -> None:
    tok = bpe if kind == "bpe" else train_char(TEXTS)
    run = make_encoder_run(tmp_path / "run", tok)
    out = export_hf(run, tmp_path / "hf")
    ids = special_ids(tok)
    assert ids.added == 4  # neither tokenizer has [PAD]/[CLS]/[SEP]/[MASK]: the export must add all four
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (hf_tok.pad_token_id, hf_tok.cls_token_id, hf_tok.sep_token_id, hf_tok.mask_token_id) == ids.all
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == [ids.cls, *tok.encode(text), ids.sep]  # MLMLoader's framing
    pair = hf_tok(TEXTS[0], TEXTS[2])
    a, b = tok.encode(TEXTS[0]), tok.encode(TEXTS[2])
    assert pair["input_ids"] == [ids.cls, *a, ids.sep, *b, ids.sep]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    masked = hf_tok("the lazy [MASK] sleeps")["input_ids"]
    assert masked.count(ids.mask) == 1
    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=hf_tok, top_k=3)
    ours = load_trained(run, torch.device("cpu")).model
    with torch.no_grad():
        logits = ours.mlm_logits(ours(torch.tensor([masked])))[0, masked.index(ids.mask)]
    expected = logits.softmax(-1).topk(3)
    got = fill("the lazy [MASK] sleeps")
    assert [r["token"] for r in got] == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor([r["score"] for r in got]), expected.values, atol=1e-5, rtol=1e-4)


def test_electra_discriminator_exports_as_electra_for_pretraining(bpe: Tokenizer, tmp_path: Path) -> None:
    run = make_encoder_run(tmp_path / "run", bpe, family="electra")
    out = export_hf(run, tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    assert not any("generator" in k for k in tensors)  # the generator stays behind (model card says so)
    theirs, info = transformers.ElectraForPreTraining.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = load_trained(run, torch.device("cpu")).model
    idx, segments, pad = inputs(ours.cfg.vocab_size)
    with torch.no_grad():
        ref = theirs.eval()(input_ids=idx, token_type_ids=segments, attention_mask=pad.long()).logits
        torch.testing.assert_close(ref[pad], ours(idx, segments, pad)[pad], **TOL)
    assert verify_hf(run, out) <= 2e-5
    assert "generator is not exported" in (out / "README.md").read_text(encoding="utf-8")


def test_import_export_round_trip_is_identity(bpe: Tokenizer, tmp_path: Path) -> None:
    run = make_encoder_run(tmp_path / "run", bpe)
    first = export_hf(run, tmp_path / "hf1")
    imported = import_hf(first, tmp_path / "imported")
    original = load_trained(run, torch.device("cpu"))
    again = load_trained(imported, torch.device("cpu"))  # what eval / finetune load
    assert again.config.model == original.config.model and again.config.objective.name == "mlm+nsp"
    a, b = original.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the imported tokenizer has the specials in its vocabulary now, at the ids training used
    assert special_ids(again.tokenizer).all == special_ids(original.tokenizer).all
    assert again.tokenizer.encode(TEXTS[1]) == original.tokenizer.encode(TEXTS[1])
    second = export_hf(imported, tmp_path / "hf2")
    t1, t2 = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_import_of_a_transformers_bert_for_masked_lm(bpe: Tokenizer, tmp_path: Path, capsys) -> None:
    # a BERT written by transformers itself (no pooler / NSP head), with an exported tokenizer next to it
    tok_dir = export_hf(make_encoder_run(tmp_path / "run", bpe), tmp_path / "tok")
    vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
    hf_cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=CONTEXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(3)
    theirs = transformers.BertForMaskedLM(hf_cfg).eval()
    src = tmp_path / "src"
    theirs.save_pretrained(str(src))
    transformers.AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(src))
    capsys.readouterr()  # transformers' own progress bars
    run = import_hf(src, tmp_path / "imported")
    # one "note:" line on stderr (a UserWarning printed the file and line, then the source line)
    assert capsys.readouterr().err == f"note: {src} has no nsp_head, pooler weights; they start freshly initialised\n"
    ours = load_trained(run, torch.device("cpu"))
    assert ours.config.objective.name == "mlm"
    idx, segments, pad = inputs(vocab)
    with torch.no_grad():
        ref = theirs(input_ids=idx, token_type_ids=segments, attention_mask=pad.long()).logits
        got = ours.model.mlm_logits(ours.model(idx, segments, pad))
    torch.testing.assert_close(got[pad], ref[pad], **TOL)


def test_a_bf16_bert_exports_as_bf16_with_its_values(bpe: Tokenizer, tmp_path: Path) -> None:
    # an imported bf16 encoder exported float32: the same values at twice the size
    tok_dir = export_hf(make_encoder_run(tmp_path / "run", bpe), tmp_path / "tok")
    vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
    hf_cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=CONTEXT,
    )  # fmt: skip
    torch.manual_seed(3)
    src = tmp_path / "src"
    transformers.BertForPreTraining(hf_cfg).to(torch.bfloat16).save_pretrained(str(src))
    transformers.AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(src))
    original = load_file(str(src / "model.safetensors"))
    out = export_hf(import_hf(src, tmp_path / "imported"), tmp_path / "out")
    exported = load_file(str(out / "model.safetensors"))
    for key, t in exported.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, original[key]), key
    assert verify_hf(tmp_path / "imported", out) <= 2e-5  # (float32 on both sides; kernels differ: 1.5e-7)


def test_import_of_a_sequence_classifier_names_its_head_and_what_to_do(bpe: Tokenizer, tmp_path: Path) -> None:
    """A BertForSequenceClassification folder stores its head as `classifier.*` (not under `bert.`): the error
    names those keys as stored, and the fix it gives (the encoder saved alone) imports."""
    tok_dir = export_hf(make_encoder_run(tmp_path / "run", bpe), tmp_path / "tok")
    vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
    hf_cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=CONTEXT, num_labels=3,
    )  # fmt: skip
    theirs = transformers.BertForSequenceClassification(hf_cfg)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    theirs.save_pretrained(str(tmp_path / "cls"))
    tokenizer.save_pretrained(str(tmp_path / "cls"))
    with pytest.raises(LmforgeError) as e:
        import_hf(tmp_path / "cls", tmp_path / "out")
    message = str(e.value)
    assert "classifier.weight" in message and "bert.classifier" not in message, message
    assert "BertForSequenceClassification" in message and "model.bert.save_pretrained" in message
    assert not (tmp_path / "out").exists()
    theirs.bert.save_pretrained(str(tmp_path / "encoder"))  # what the message says to do
    tokenizer.save_pretrained(str(tmp_path / "encoder"))
    encoder = load_trained(import_hf(tmp_path / "encoder", tmp_path / "out"), torch.device("cpu")).model
    torch.testing.assert_close(
        encoder.state_dict()["embed.tok_emb.weight"], theirs.bert.embeddings.word_embeddings.weight
    )


def test_bad_bert_directories_are_one_line_errors(bpe: Tokenizer, tmp_path: Path) -> None:
    src = export_hf(make_encoder_run(tmp_path / "run", bpe), tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())

    bad_act = tmp_path / "bad_act"
    bad_act.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (bad_act / name).write_bytes((src / name).read_bytes())
    (bad_act / "config.json").write_text(json.dumps(cfg | {"hidden_act": "gelu_new"}))
    with pytest.raises(LmforgeError, match="hidden_act 'gelu_new'"):
        import_hf(bad_act, tmp_path / "out1")

    extra = tmp_path / "extra"
    extra.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (extra / name).write_bytes((src / name).read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    word = tensors["bert.embeddings.word_embeddings.weight"]
    untied = dict(tensors, **{"cls.predictions.decoder.weight": torch.zeros_like(word)})
    save_file(untied, str(extra / "model.safetensors"))
    with pytest.raises(LmforgeError, match="not tied"):
        import_hf(extra, tmp_path / "out2")
    save_file(
        dict(tensors, **{"bert.encoder.layer.0.adapter.weight": torch.zeros(2)}), str(extra / "model.safetensors")
    )
    with pytest.raises(LmforgeError, match="adapter.weight"):
        import_hf(extra, tmp_path / "out3")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()  # nothing half-written


def test_reimport_keeps_a_tokenizer_that_already_had_the_specials(tmp_path: Path) -> None:
    """WordPiece reserves the encoder's specials, so the export only adds its [CLS] A [SEP] framing; the
    import drops that framing (lmforge frames input itself), so data prepared for the original run is
    accepted by the re-imported one (it was "prepared with another tokenizer", for identical ids)."""
    from lmforge.tokenizer.train import train_wordpiece

    wordpiece = train_wordpiece(iter([f"{t} {i}" for i in range(30) for t in TEXTS]), 300)
    run = make_encoder_run(tmp_path / "run", wordpiece)
    imported = import_hf(export_hf(run, tmp_path / "hf"), tmp_path / "imported")
    again = load_trained(imported, torch.device("cpu")).tokenizer
    assert again.fingerprint == wordpiece.fingerprint


def test_imported_bert_run_evaluates(bpe: Tokenizer, tmp_path: Path) -> None:
    from lmforge.data.prepare import PrepareConfig, prepare
    from tests.conftest import run_cli, shakespeare_text

    imported = import_hf(export_hf(make_encoder_run(tmp_path / "run", bpe), tmp_path / "hf"), tmp_path / "imported")
    docs = tmp_path / "docs.jsonl"
    paragraphs = [p for p in shakespeare_text(20_000).split("\n\n") if p.strip()]
    docs.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    data = tmp_path / "data"
    prepare(PrepareConfig(inputs=[str(docs)], out=str(data), tokenizer=str(imported / "tokenizer.json"),
                          val_fraction=0.2, test_fraction=0.0), progress=False)  # fmt: skip
    r = run_cli("eval", str(imported), "--data", str(data), "--max-batches", "2", "--batch-size", "4", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["objective"] == "mlm+nsp" and 0.0 <= metrics["mlm_accuracy"] <= 1.0
    assert 0.0 <= metrics["nsp_accuracy"] <= 1.0 and metrics["mlm_ppl"] > 1.0


def test_imported_bert_run_evaluates_on_its_original_data_and_refuses_other_tokenizers(
    bpe: Tokenizer, tmp_path: Path
) -> None:
    """export -> import gave the run's tokenizer [PAD]/[CLS]/[SEP]/[MASK] as added tokens after its ids (where
    training had appended them), and `eval IMPORTED --data ORIGINAL_DATA` refused the data as "prepared with
    another tokenizer" although every id reads the same; now it scores it as the original run does. Data
    prepared with a really different tokenizer is still refused in one line."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from tests.conftest import run_cli, shakespeare_text

    run = make_encoder_run(tmp_path / "run", bpe)
    imported = import_hf(export_hf(run, tmp_path / "hf"), tmp_path / "imported")
    assert load_trained(imported, torch.device("cpu")).tokenizer.fingerprint != bpe.fingerprint  # the specials
    bpe.save(tmp_path / "tokenizer.json")
    docs = tmp_path / "docs.jsonl"
    paragraphs = [p for p in shakespeare_text(20_000).split("\n\n") if p.strip()]
    docs.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    for name, tokenizer in (("data", str(tmp_path / "tokenizer.json")), ("char", "char")):
        prepare(PrepareConfig(inputs=[str(docs)], out=str(tmp_path / name), tokenizer=tokenizer,
                              val_fraction=0.2, test_fraction=0.0), progress=False)  # fmt: skip
    flags = ("--data", str(tmp_path / "data"), "--max-batches", "2", "--batch-size", "4", "--json")
    original, again = run_cli("eval", str(run), *flags), run_cli("eval", str(imported), *flags)
    assert original.returncode == 0 and again.returncode == 0, again.stderr
    want, got = json.loads(original.stdout), json.loads(again.stdout)
    keys = ("loss", "mlm_accuracy", "mlm_ppl", "nsp_accuracy", "tokens")
    assert [got[k] for k in keys] == [want[k] for k in keys]  # the same masks, ids and model: the same numbers
    r = run_cli("eval", str(imported), "--data", str(tmp_path / "char"), "--max-batches", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "was prepared with another tokenizer than" in r.stderr and "--tokenizer" in r.stderr


def test_a_tokenizer_reads_the_ids_of_one_it_only_extends(bpe: Tokenizer) -> None:
    from tokenizers import AddedToken

    exported = Tokenizer.from_str(encoder_tokenizer_json(bpe)[0])
    hf = Tokenizer.from_str(bpe.to_str())._hf
    hf.add_special_tokens([AddedToken("[PAD]", special=True, normalized=False)])
    extended = Tokenizer(hf)
    assert bpe.reads_ids_of(bpe) and extended.reads_ids_of(bpe)
    assert not bpe.reads_ids_of(extended)  # ids the run's tokenizer lacks
    assert not exported.reads_ids_of(bpe)  # the export's [CLS] A [SEP] framing changes encoding: import drops it
    other = train_bpe([f"{t} {i}" for i in range(20) for t in reversed(TEXTS)], vocab_size=280)
    assert not other.reads_ids_of(bpe) and not bpe.reads_ids_of(other)


def test_the_readmes_name_the_special_tokens_a_bert_export_really_has(bpe: Tokenizer, tmp_path: Path) -> None:
    # README said every BERT export gets [PAD]/[CLS]/[SEP]/[MASK]; an lmforge WordPiece tokenizer's are <|pad|>, ...
    from lmforge.tokenizer.train import train_wordpiece

    repo = Path(__file__).resolve().parent.parent
    readmes = [(repo / name).read_text(encoding="utf-8") for name in ("README.md", "README.zh-CN.md")]
    english = readmes[0].split("**Encoders.**", 1)[1].split("\n\n", 1)[0]  # (its export paragraph)
    for kind, tokenizer in (("wordpiece", train_wordpiece(TEXTS * 20, vocab_size=120)), ("bpe", bpe)):
        out = export_hf(make_encoder_run(tmp_path / kind, tokenizer), tmp_path / f"hf-{kind}")
        specials = json.loads((out / "special_tokens_map.json").read_text(encoding="utf-8"))
        names = "/".join(f"`{specials[f'{k}_token']}`" for k in ("pad", "cls", "sep", "mask"))
        for text in (english, readmes[1]):
            assert names in text, names
