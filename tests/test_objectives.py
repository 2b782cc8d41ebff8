"""Encoder objectives: masking rates (statistically), ignored labels, whole-word masking, NSP/SOP pair
balance, ELECTRA labels, losses that fall when overfitting one batch, metrics, resume, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import load_config
from lmforge.data.masking import MLMLoader, SpecialIds, mask_tokens, mlm_eval_batches, special_ids, word_starts
from lmforge.data.prepare import PrepareConfig, load_data_dir, prepare
from lmforge.data.shards import ShardWriter
from lmforge.errors import ConfigError, DataError
from lmforge.eval.objectives import roc_auc
from lmforge.models.bert import Bert, BertConfig, Electra
from lmforge.objective_config import ObjectiveConfig
from lmforge.objectives import (
    IGNORE_INDEX,
    MaskedLM,
    ReplacedTokenDetection,
    electra_corrupt,
    window_counts,
    window_loss,
)
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.train.objective_setup import check_objective, encoder_loader_kwargs
from lmforge.train.run import pretrain
from tests.conftest import run_cli
from tests.test_resume import _assert_same_run

SP = SpecialIds(pad=100, cls=101, sep=102, mask=103, added=4)


def _within(observed: float, p: float, n: int) -> bool:
    """|observed - p| within 5 binomial standard deviations (false alarm rate ~6e-7)."""
    return abs(observed - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_masking_rates_and_ignored_labels():
    rng = np.random.default_rng(0)
    T = 200_000
    ids = rng.integers(0, 100, T)
    eligible = np.ones(T, dtype=bool)
    eligible[:1000] = False  # e.g. [CLS]/[SEP]/[PAD] positions: never selected
    inputs, labels = mask_tokens(ids, eligible, rng, ObjectiveConfig(), mask_id=SP.mask, random_ids=np.arange(100))
    selected = labels != IGNORE_INDEX
    n = int(eligible.sum())
    assert not selected[:1000].any()
    assert _within(selected.sum() / n, 0.15, n)
    assert (labels[selected] == ids[selected]).all()  # labels: the original ids, -100 elsewhere
    assert (inputs[~selected] == ids[~selected]).all()  # unselected positions are untouched
    k = int(selected.sum())
    became_mask = (inputs[selected] == SP.mask).mean()
    unchanged = (inputs[selected] == ids[selected]).mean()
    assert _within(became_mask, 0.8, k)
    # 10% random (a random token equals the original 1 time in 100) + 10% kept
    assert _within(unchanged, 0.1 + 0.1 * 0.01, k)
    assert (inputs[selected] < 100).mean() == pytest.approx(0.2, abs=5 * math.sqrt(0.16 / k))


def test_whole_word_masking_selects_every_token_of_a_word():
    rng = np.random.default_rng(1)
    T = 60_000
    ids = rng.integers(0, 100, T)
    word_start = rng.random(T) < 0.3  # words of ~3.3 tokens
    word_start[0] = True
    cfg = ObjectiveConfig(name="mlm", whole_word=True)
    _, labels = mask_tokens(
        ids, np.ones(T, dtype=bool), rng, cfg, mask_id=SP.mask, random_ids=np.arange(100), word_start=word_start
    )
    selected = labels != IGNORE_INDEX
    word = np.cumsum(word_start) - 1
    per_word = np.bincount(word, weights=selected) / np.bincount(word)
    assert set(np.unique(per_word)) <= {0.0, 1.0}  # all or nothing per word
    n_words = int(word[-1]) + 1
    assert _within((per_word == 1).mean(), 0.15, n_words)


def test_whole_word_masking_on_real_text_keeps_words_together(data_dir):
    loader, sp, tok = _loader(data_dir, "mlm", whole_word=True)
    batch = next(loader)
    n_selected = 0
    for row in range(16):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        orig = torch.where(labels >= 0, labels, ids).tolist()
        chars = [tok.decode([t]) if t < tok.vocab_size and t != tok.eos_id else " " for t in orig]  # specials: gaps
        selected = (labels != IGNORE_INDEX).tolist()
        n_selected += sum(selected)
        for i in range(1, len(chars)):  # neighbouring letters of one word: both selected or neither
            if chars[i].strip() and chars[i - 1].strip():
                assert selected[i] == selected[i - 1], (row, i, "".join(chars))
    assert n_selected > 0


HLM = Path(__file__).parent / "data" / "hongloumeng_ch1.txt"  # Hong Lou Meng, chapter 1 (tests/data/README.md)
CJK = re.compile(r"[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef]")  # CJK punctuation, kana, Han, fullwidth forms


@pytest.mark.parametrize(("kind", "vocab"), [("char", 0), ("bpe", 500), ("unigram", 1500), ("wordpiece", 1500)])
def test_whole_word_masking_on_chinese_makes_each_character_a_word(tmp_path, kind, vocab):
    # Chinese has no spaces: before the fix a whole paragraph was one "word", masked all or nothing
    # (3 in 4 examples without a masked token). bpe 500 leaves many characters split over 2-3 tokens.
    out = tmp_path / kind
    prepare(PrepareConfig(inputs=[str(HLM)], out=str(out), tokenizer=kind, vocab_size=vocab or 4096), progress=False)
    data = load_data_dir(out)
    cfg = load_config(
        preset="bert-tiny", overrides={"data": {"dir": str(out)}, "objective": {"name": "mlm", "whole_word": True}}
    )
    tok = Tokenizer.load(data.tokenizer_path)
    kwargs = encoder_loader_kwargs(cfg, data.split_shards("train"), tok, batch_size=64, seed=5)
    batch = next(MLMLoader(**{**kwargs, "seq_len": 64}))
    selected = (batch["labels"] != IGNORE_INDEX).numpy()
    orig = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"]).numpy()
    text = batch["pad_mask"].numpy() & ~np.isin(orig, [*kwargs["specials"].all, tok.eos_id])
    long = text.sum(1) >= 30  # most windows: 62 text tokens; a few hold only a short document
    rate = selected[long].sum(1) / text[long].sum(1)  # per example
    assert long.sum() > 40 and abs(rate.mean() - 0.15) < 0.03 and rate.std() < 0.1, rate  # bug: 0 or ~1 each
    assert (rate == 0).mean() < 0.1 and rate.max() < 0.5, rate

    utf8 = tok.token_utf8()
    n_cjk_starts = n_rest = 0
    for row in range(len(orig)):
        starts = word_starts(orig[row], text[row], kwargs["word_tables"])
        word = np.cumsum(starts) - 1
        assert all(len(set(selected[row][word == w])) == 1 for w in set(word)), row  # the loader masks these words
        pieces = [utf8[t] if ok else b"" for t, ok in zip(orig[row], text[row], strict=True)]
        for i in range(1, len(pieces)):
            if not (pieces[i] and pieces[i - 1]):
                continue
            if 0x80 <= pieces[i][0] < 0xC0:  # the rest of a character begun before: never a word of its own
                assert not starts[i], (row, i, pieces[i - 1 : i + 1])
                n_rest += 1
                continue
            before = b"".join(pieces[:i]).decode("utf-8", errors="ignore")[-1:]
            after = b"".join(pieces[i:]).decode("utf-8", errors="ignore")[:1]
            if CJK.match(before) or CJK.match(after):  # no word spans two characters of which one is CJK
                assert starts[i], (row, i, before, after)
                n_cjk_starts += 1
    assert n_cjk_starts > 20 * len(orig) and (n_rest > 50 or kind != "bpe")


def test_mlm_eval_stops_after_max_sequences_whatever_the_batch_size(data_dir):
    """The encoders' evaluation covers the first eval.max_batches x batch examples, in forward passes of
    any size: an example's masks and pair depend on its position alone."""
    data = load_data_dir(data_dir)
    cfg = load_config(preset="bert-tiny", overrides={"data": {"dir": str(data_dir)}, "objective": {"name": "mlm+nsp"}})
    tok = Tokenizer.load(data.tokenizer_path)
    want = None
    for batch_size in (2, 3, 7, 16):
        kwargs = encoder_loader_kwargs(cfg, data.split_shards("val"), tok, batch_size=batch_size, seed=0)
        batches = list(mlm_eval_batches({**kwargs, "seq_len": 48}, max_sequences=7))
        got = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        assert len(got["input_ids"]) == 7 and len(got["pair_labels"]) == 7
        want = want or got
        assert all(torch.equal(got[key], want[key]) for key in want), batch_size


def test_specials_are_appended_to_a_char_tokenizer(data_dir):
    tok = Tokenizer.load(load_data_dir(data_dir).tokenizer_path)
    sp = special_ids(tok)
    assert sp.added == 4 and sp.all == tuple(range(tok.vocab_size, tok.vocab_size + 4))


@pytest.mark.parametrize("preset", ["bert-tiny", "electra-tiny"])
def test_an_encoder_vocab_size_without_room_for_the_appended_specials_is_refused(data_dir, tmp_path, preset):
    """319 + 1 ids for a char tokenizer of 319 passed, and the first batch's [MASK] id (322) then failed
    as "the training data holds token id 322 ... a shard is damaged", after the run dir was written."""
    vocab = Tokenizer.load(load_data_dir(data_dir).tokenizer_path).vocab_size
    cfg = _cfg(data_dir, tmp_path / "run", preset)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab + 1))
    with pytest.raises(ConfigError, match=f"4 special tokens an encoder appends.*at least {vocab + 4}$"):
        pretrain(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def _loader(data_dir, name, **kw):
    data = load_data_dir(data_dir)
    cfg = load_config(preset="bert-tiny", overrides={"data": {"dir": str(data_dir)}, "objective": {"name": name, **kw}})
    tok = Tokenizer.load(data.tokenizer_path)
    kwargs = encoder_loader_kwargs(cfg, data.split_shards("train"), tok, batch_size=16, seed=3)
    return MLMLoader(**{**kwargs, "seq_len": 48}), kwargs["specials"], tok


@pytest.mark.parametrize("pairs", ["nsp", "sop"])
def test_sentence_pairs_are_balanced_and_well_formed(data_dir, pairs):
    loader, sp, tok = _loader(data_dir, f"mlm+{pairs}")
    labels, n = [], 0
    for _ in range(25):
        batch = next(loader)
        labels += batch["pair_labels"].tolist()
        for row in range(16):
            ids, seg, pad = batch["input_ids"][row], batch["segments"][row], batch["pad_mask"][row]
            orig = torch.where(batch["labels"][row] != IGNORE_INDEX, batch["labels"][row], ids)
            n_real = int(pad.sum())
            seps = (orig[:n_real] == sp.sep).nonzero().flatten().tolist()
            assert orig[0] == sp.cls and len(seps) == 2 and seps[1] == n_real - 1
            assert (seg[: seps[0] + 1] == 0).all() and (seg[seps[0] + 1 : n_real] == 1).all()
            assert (ids[n_real:] == sp.pad).all() and (batch["labels"][row][n_real:] == IGNORE_INDEX).all()
            n += 1
    assert _within(float(np.mean(labels)), 0.5, len(labels))


def _one_document(tmp_path, prefix="train", n=200):
    writer = ShardWriter(tmp_path, prefix, np.uint16, 10_000)
    writer.write([*range(10, 10 + n), 0])  # one document, then EOS (id 0)
    return [tmp_path / name for name in writer.close()]


def test_sop_trains_on_one_document_and_errors_name_the_split(tmp_path):
    """SOP only swaps a document's own two segments, yet one document was refused with NSP's "need at least
    2 documents"; and a split too small for its objective was called "this split", which sent users with
    big train splits looking in the wrong place (it was the val split)."""
    kw = {"seq_len": 16, "batch_size": 4, "seed": 0, "specials": SP, "eos_id": 0, "token_bytes": np.ones(100)}
    batch = next(MLMLoader(_one_document(tmp_path), cfg=ObjectiveConfig(name="mlm+sop"), **kw))
    assert batch["input_ids"].shape == (4, 16) and set(batch["pair_labels"].tolist()) <= {0, 1}
    val = _one_document(tmp_path, "val", n=10)
    with pytest.raises(DataError, match=rf"mlm\+nsp needs at least 2 documents .*'val' split of {tmp_path}.* has 1:"):
        MLMLoader(val, cfg=ObjectiveConfig(name="mlm+nsp"), **kw)
    with pytest.raises(
        DataError, match=r"^the 'val' split of .* has no shard of seq_len-2 = 14 tokens; pass --data.se"
    ):
        MLMLoader(val, cfg=ObjectiveConfig(name="mlm"), **{**kw, "seq_len": 16})
    assert next(MLMLoader(val, cfg=ObjectiveConfig(name="mlm"), **{**kw, "seq_len": 12}))["labels"].shape == (4, 12)
    # a split too small for even the shortest encoder sequence (8): "lower --data.seq_len" could not be followed
    with pytest.raises(DataError, match=r"seq_len-2 = 6 tokens; add text to it$"):
        MLMLoader(_one_document(tmp_path, "test", n=4), cfg=ObjectiveConfig(name="mlm"), **{**kw, "seq_len": 8})


def test_nsp_positives_continue_the_document(data_dir):
    loader, sp, tok = _loader(data_dir, "mlm+nsp", mask_prob=0.01)
    text = tok.decode(np.concatenate([np.asarray(t) for t in loader._tokens]).tolist())
    checked = 0
    for position in range(60):
        ex = loader.example(position)
        orig = np.where(ex["labels"] != IGNORE_INDEX, ex["labels"], ex["input_ids"])[: int(ex["pad_mask"].sum())]
        sep = int(np.flatnonzero(orig == sp.sep)[0])
        a, b = orig[1:sep].tolist(), orig[sep + 1 : -1].tolist()
        if ex["pair_labels"][0] == 0:
            assert tok.decode(a + b) in text  # A then B is a contiguous span of one document
            checked += 1
    assert checked > 10


def test_sentence_pairs_see_whole_documents_across_shard_boundaries(tmp_path):
    """`prepare` cuts a document at a shard's end (--shard-tokens) and goes on in the next shard. Documents
    were found per shard: such a document lost its head (only the tail after the seam was a document) or
    all of it (a tail under 2 tokens). With documents found over the split's stream, each SOP example
    (seq_len above the longest document) holds one whole document, and every document is there once."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 100, n).tolist() for n in (30, 5, 40, 2, 12, 25, 3, 17)]
    writer = ShardWriter(tmp_path, "train", np.uint16, 16)  # 142 tokens in 9 shards: most documents cut
    writer.write([t for doc in docs for t in [*doc, 0]])
    shards = [tmp_path / name for name in writer.close()]
    kw = {"seq_len": 48, "batch_size": 4, "seed": 0, "specials": SP, "eos_id": 0, "token_bytes": np.ones(100)}
    loader = MLMLoader(shards, cfg=ObjectiveConfig(name="mlm+sop"), **kw)
    assert len(shards) == 9 and loader.windows_per_epoch == len(docs)
    seen = []
    for position in range(len(docs)):  # one epoch: each document once
        ex = loader.example(position)
        orig = np.where(ex["labels"] != IGNORE_INDEX, ex["labels"], ex["input_ids"])[: int(ex["pad_mask"].sum())]
        sep = int(np.flatnonzero(orig == SP.sep)[0])
        a, b = orig[1:sep].tolist(), orig[sep + 1 : -1].tolist()
        seen.append(b + a if ex["pair_labels"][0] else a + b)  # SOP label 1: the segments were swapped
    assert sorted(seen) == sorted(docs)


def test_electra_labels_mark_exactly_the_replaced_tokens():
    torch.manual_seed(0)
    cfg = BertConfig(family="electra", vocab_size=20, max_seq_len=16, n_layer=1, n_head=2, d_model=16, dropout=0.0)
    model = Electra(cfg)
    model.init_weights()
    ids = torch.randint(0, 16, (4, 12))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, ::3] = ids[:, ::3]
    masked = torch.where(labels != IGNORE_INDEX, torch.full_like(ids, 19), ids)
    batch = {"input_ids": masked, "segments": torch.zeros_like(ids), "pad_mask": torch.ones_like(ids, dtype=torch.bool),
             "labels": labels}  # fmt: skip
    corrupted, replaced, gen_loss = electra_corrupt(model, batch)
    selected = labels != IGNORE_INDEX
    assert torch.equal(corrupted[~selected], ids[~selected])  # only selected positions are sampled
    assert torch.equal(replaced.bool(), corrupted != ids)  # a sample equal to the original is "original"
    assert not replaced[~selected].any() and replaced[selected].any()
    assert gen_loss > 0


def _overfit(model, objective, batch, steps=60):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        torch.manual_seed(len(losses))  # ELECTRA sampling
        loss = window_loss(objective.loss(model, batch), window_counts(objective, [batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["mlm", "mlm+nsp", "mlm+sop", "electra"])
def test_each_objective_overfits_one_batch(data_dir, name):
    loader, sp, tok = _loader(data_dir, name, mask_prob=0.3)
    batch = next(loader)
    vocab = tok.vocab_size + sp.added
    family = "electra" if name == "electra" else "bert"
    cfg = BertConfig(family=family, vocab_size=vocab, max_seq_len=48, n_layer=2, n_head=2, d_model=32, dropout=0.0,
                     generator_ratio=0.5)  # fmt: skip
    torch.manual_seed(0)
    model = (Electra if name == "electra" else Bert)(cfg)
    model.init_weights()
    objective = ReplacedTokenDetection(50.0) if name == "electra" else MaskedLM()
    losses = _overfit(model, objective, batch, steps=150 if name == "electra" else 60)
    # ELECTRA's loss is noisy (fresh generator samples each step): compare averages of the ends
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-5:])


def test_roc_auc_matches_hand_computed_values():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([1.0, 1.0, 0.0]), np.array([1, 0, 0])) == pytest.approx(0.75)  # a tie counts 1/2
    assert math.isnan(roc_auc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_objective_and_family_must_match():
    check_objective("electra", "electra")
    with pytest.raises(ConfigError, match="needs bert.*bert-tiny"):
        check_objective("mlm", "gpt")
    with pytest.raises(ConfigError, match="electra-tiny"):
        check_objective("electra", "bert")


def test_objective_hints_name_real_presets():
    """The hint said --preset gpt-tiny, which does not exist."""
    from lmforge.presets import PRESETS
    from lmforge.train.objective_setup import _PRESET_HINT

    named = {p for hint in (*_PRESET_HINT.values(), "bert-tiny") for p in re.split(r", | or ", hint)}
    assert named <= set(PRESETS), named - set(PRESETS)
    with pytest.raises(ConfigError, match=r"--preset tiny, llama-tiny"):
        check_objective("clm", "bert")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"data": {"seq_len": 6}}, "data.seq_len 6 is too short for objective 'mlm.nsp'"),
        ({"model": {"max_seq_len": 6}, "objective": {"name": "mlm"}}, r"model.max_seq_len 6 \(data.seq_len is 0\)"),
        ({"model": {"family": "electra", "max_seq_len": 7}, "objective": {"name": "electra"}}, "too short"),
        ({"model": {"n_segments": 1}}, "'mlm.nsp' needs model.n_segments >= 2"),
        ({"model": {"n_segments": 1}, "objective": {"name": "mlm+sop"}}, "'mlm.sop' needs model.n_segments >= 2"),
    ],
)
def test_encoder_settings_the_loader_cannot_run_fail_before_the_run_dir(data_dir, tmp_path, overrides, match):
    """A sequence under 8 tokens (MLMLoader's ValueError) and NSP/SOP with one segment embedding (IndexError
    at the first step) are one-line ConfigErrors when the config is built; pretrain wrote config.json first."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        load_config(preset="bert-tiny", overrides={"out": str(out), "data": {"dir": str(data_dir)}} | overrides)
    r = run_cli("pretrain", "--data", str(data_dir), "--out", str(out), "--preset", "bert-tiny", "--data.seq_len", "6")
    assert r.returncode == 2 and r.stderr.startswith("lmforge: error: data.seq_len 6") and "Traceback" not in r.stderr
    assert not out.exists()
    # the limits themselves are allowed: 8 tokens, and one segment without a sentence-pair task
    load_config(preset="bert-tiny", overrides={"data": {"seq_len": 8}})
    load_config(preset="bert-tiny", overrides={"model": {"n_segments": 1}, "objective": {"name": "mlm"}})


def test_eval_sample_tokens_of_an_encoder_is_refused():
    """An encoder generates no text: --eval.sample_tokens on a BERT/ELECTRA run was ignored without a word."""
    for preset in ("bert-tiny", "electra-tiny"):
        with pytest.raises(
            ConfigError, match=rf"^eval.sample_tokens samples text, which a model.family '{preset[:-5]}'"
        ):
            load_config(preset=preset, overrides={"eval": {"sample_tokens": 8}})
    assert load_config(preset="lstm-tiny", overrides={"eval": {"sample_tokens": 8}}).eval.sample_tokens == 8


def _cfg(data_dir, out, preset, **objective):
    return load_config(
        preset=preset,
        overrides={
            "out": str(out),
            "data": {"dir": str(data_dir)},
            "model": {"n_layer": 1, "d_model": 32, "d_ff": 64, "max_seq_len": 32, "dropout": 0.1},
            "objective": objective,
            "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 8, "warmup_steps": 2, "log_every": 1},
            "eval": {"every": 4, "max_batches": 2},
            "checkpoint": {"every": 4, "keep": 10},
        },
    )


def test_electra_run_resumes_bit_identically(data_dir, tmp_path):
    straight = tmp_path / "straight"
    pretrain(_cfg(data_dir, straight, "electra-tiny"), progress=False)
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000008")
    (crashed / "checkpoints" / "latest").write_text("step-000004\n", encoding="utf-8")
    assert pretrain(_cfg(data_dir, crashed, "electra-tiny"), progress=False).step == 8
    _assert_same_run(straight, crashed)


def test_a_resume_that_changes_the_masking_says_so(data_dir, tmp_path):
    """A resume with another objective.mask_prob (or whole_word, rtd_weight, ...) trained and evaluated with
    it from then on without a word, though it changes the val masks and loss the best checkpoint is picked by."""
    from lmforge.train.run import _objective_change

    cfg = _cfg(data_dir, tmp_path / "r", "electra-tiny", mask_prob=0.3, whole_word=True)
    saved = cfg.to_dict()
    assert _objective_change(saved, cfg, 4) == ""  # nothing changed: no note
    saved["objective"] |= {"mask_prob": 0.15, "rtd_weight": 20.0}
    note = _objective_change(saved, cfg, 4)
    assert note.startswith("note: objective settings changed since the checkpoint, applied from step 5: ")
    assert "objective.mask_prob 0.15 -> 0.3, objective.rtd_weight 20.0 -> 50.0;" in note
    assert "whole_word" not in note and _objective_change(None, cfg, 4) == ""
    saved["objective"]["whole_word"] = False  # a boolean is written as the config and the CLI spell it
    assert "objective.whole_word false -> true" in _objective_change(saved, cfg, 4)
    from lmforge.train.run import _describe_model_change  # (a refused resume of another model: the same spelling)

    change = _describe_model_change({"mlp": "gelu", "bias": True}, {"mlp": "swiglu", "bias": False})
    assert change == "mlp gelu -> swiglu, bias true -> false"


def test_pretrain_and_eval_json_report_each_objectives_metrics(data_dir, tmp_path):
    run = tmp_path / "bert"
    pretrain(_cfg(data_dir, run, "bert-tiny", whole_word=True), progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any("val_nsp_accuracy" in r and "val_mlm_accuracy" in r for r in records)
    # tokens (and tokens/s, MFU) count every real token read, not only the ~15% masked ones: a 32-token
    # window with [CLS] and [SEP]s, 8 per step, of which little is padding
    train = [r for r in records if "loss" in r]
    assert train[-1]["step"] == 8 and 0.8 * 8 * 8 * 32 <= train[-1]["tokens"] <= 8 * 8 * 32
    r = run_cli("eval", str(run), "--json", "--max-batches", "2")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["objective"] == "mlm+nsp" and 0 <= m["mlm_accuracy"] <= 1 and 0 <= m["nsp_accuracy"] <= 1
    assert "bpb" not in m
    r = run_cli("pretrain", "--data", str(data_dir), "--out", str(tmp_path / "bad"), "--preset", "tiny",
                "--objective", "mlm")  # fmt: skip
    assert r.returncode == 2 and "cannot train a model.family 'gpt'" in r.stderr and "Traceback" not in r.stderr


def test_specials_of_a_tokenizer_that_has_them_are_used():
    from lmforge.tokenizer.train import train_bpe

    tok = train_bpe(["to be or not to be"] * 5, vocab_size=280, extra_specials=True)
    sp = special_ids(tok)
    assert sp.added == 0 and tok.id_to_token(sp.mask) == "<|mask|>" and tok.id_to_token(sp.cls) == "<|cls|>"


@pytest.mark.parametrize("name", ["mlm+nsp", "electra"])
def test_train_loss_is_the_validation_loss_and_the_reference_definition(data_dir, name):
    """Training weighted each example's NSP loss by its masked-token count (and its RTD loss by masked / real
    tokens) while validation took plain means, so `loss` and `val_loss` of one batch differed. Now both are
    BERT's MLM mean + NSP mean over pairs, ELECTRA's generator MLM mean + 50 x RTD mean over real tokens."""
    from lmforge.eval.objectives import evaluate_encoder
    from lmforge.train.precision import pick_precision

    loader, sp, tok = _loader(data_dir, name)
    batch = next(loader)
    tail = torch.arange(48) >= 48 - 2 * torch.arange(16)[:, None]  # (16, 48): row i's last 2i tokens made padding
    batch["pad_mask"] &= ~tail
    batch["input_ids"][tail], batch["labels"][tail] = sp.pad, IGNORE_INDEX
    selected = batch["labels"] != IGNORE_INDEX  # rows with different masked and real token counts
    assert len(set(selected.sum(1).tolist())) > 1 and len(set(batch["pad_mask"].sum(1).tolist())) > 1
    electra = name == "electra"
    cfg = BertConfig(family="electra" if electra else "bert", vocab_size=tok.vocab_size + sp.added, max_seq_len=48,
                     n_layer=1, n_head=2, d_model=32, dropout=0.0, generator_ratio=0.5)  # fmt: skip
    torch.manual_seed(0)
    model = (Electra if electra else Bert)(cfg)
    model.init_weights()
    objective = ReplacedTokenDetection(50.0) if electra else MaskedLM()

    model.train()
    train_loss = window_loss(objective.loss(model, batch), window_counts(objective, [batch])).item()
    # the same batch as an accumulation window of two micro-batches: the same loss
    halves = [{k: v[:6] for k, v in batch.items()}, {k: v[6:] for k, v in batch.items()}]
    counts = window_counts(objective, halves)
    assert sum(window_loss(objective.loss(model, half), counts) for half in halves).item() == pytest.approx(
        train_loss, rel=1e-6
    )
    val = evaluate_encoder(model, [batch], precision=pick_precision(torch.device("cpu"), "float32"), electra=electra)
    assert val["loss"] == pytest.approx(train_loss, rel=1e-6)

    # by hand, in float64: each term a mean over its own items
    with torch.no_grad():
        if electra:
            step = model(batch["input_ids"], batch["segments"], batch["pad_mask"], select=selected,
                         noise=batch["sample_noise"])  # fmt: skip
            mlm_logits = step.gen_logits.double()
            original = torch.where(selected, batch["labels"], batch["input_ids"])
            y = (step.corrupted != original).double()[batch["pad_mask"]]
            s = step.disc_logits.double()[batch["pad_mask"]]
            p = torch.sigmoid(s)
            second = 50.0 * float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
        else:
            mlm_logits, nsp_logits = model(batch["input_ids"], batch["segments"], batch["pad_mask"], select=selected,
                                           pairs=True)  # fmt: skip
            nsp_logp = nsp_logits.double().log_softmax(-1)
            second = float(-nsp_logp[torch.arange(len(nsp_logp)), batch["pair_labels"]].mean())
        mlm_logp = mlm_logits.double().log_softmax(-1)
        first = float(-mlm_logp[torch.arange(len(mlm_logp)), batch["labels"][selected]].mean())
    assert train_loss == pytest.approx(first + second, rel=1e-6)


def test_a_resume_across_a_change_of_the_loss_definition_says_so_once(data_dir, tmp_path, capsys):
    """BERT NSP/SOP and ELECTRA's train loss changed definition (to the validation one); a run saved before
    resumed with its train-loss curve jumping and nothing said. Checkpoints now carry the objective's
    "loss_definition", and resuming one saved without it (or under an older one) says once what changed."""
    import json

    from lmforge.checkpoint import state_sha256
    from lmforge.objective_config import loss_definition, loss_definition_note

    run = tmp_path / "bert"
    cfg = _cfg(data_dir, run, "bert-tiny", name="mlm+nsp")
    pretrain(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=4)), progress=False)
    state_file = run / "checkpoints" / "step-000004" / "state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    assert state["loss_definition"] == loss_definition("mlm+nsp") == 2
    del state["loss_definition"]  # as saved by lmforge before the stamp
    state["state_sha256"] = state_sha256(state)
    state_file.write_text(json.dumps(state), encoding="utf-8")
    capsys.readouterr()
    pretrain(cfg)  # (progress: its console lines; the bar only on a terminal)
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "defined differently" in line]
    assert notes == [
        "note: the mlm+nsp train loss is defined differently since the checkpoint was saved, from step 5: train "
        "loss = MLM mean + NSP mean over the sentence pairs, the quantity val_loss reports (before: each pair's NSP "
        "loss weighted by its masked-token count); train loss before and after is not comparable (val_loss is)"
    ], out
    assert loss_definition_note("mlm+nsp", 2, 4) == "" and loss_definition_note("clm", None, 4) == ""
    assert loss_definition_note("electra", 3, 4).startswith("note: the checkpoint was saved by a newer lmforge")


def test_a_family_without_its_objective_says_which_objectives_train_it():
    """`--model.family electra` alone keeps the default objective clm; the line said only what clm needs."""
    from lmforge.errors import ConfigError
    from lmforge.train.objective_setup import check_objective

    with pytest.raises(ConfigError, match=r"; model.family .electra. trains with --objective electra$"):
        check_objective("clm", "electra")
    with pytest.raises(ConfigError, match=r"--objective mlm or --objective mlm\+nsp or --objective mlm\+sop$"):
        check_objective("clm", "bert")
    with pytest.raises(ConfigError, match=r"--objective clm$"):
        check_objective("electra", "lstm")
