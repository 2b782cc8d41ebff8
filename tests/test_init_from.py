"""`lmforge pretrain --init-from RUN`: continued pretraining from any run's weights (an imported HF BERT, a
pretrained decoder) with a fresh optimizer and schedule: the first step's loss is the loss of RUN's weights on that
batch, the model must be RUN's (one-line refusals), data of another tokenizer keeps RUN's rows of the tokens both
vocabularies have, and a killed run resumes its own checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.config import config_from_json
from lmforge.data.datadir import load_data_dir
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.export.hf_import import import_hf
from lmforge.log import read_metrics
from lmforge.models import build_model
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.train.init_from import init_start, load_init_weights, vocab_dims
from lmforge.train.loop import window_counts, window_loss
from lmforge.train.objective_setup import setup_objective
from lmforge.train.precision import pick_precision
from lmforge.train.run import pretrain, resolve_run_config
from lmforge.trained import load_trained
from tests.conftest import pretrain_tiny_encoder, run_cli, tiny_config
from tests.test_resume import _assert_same_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

WORDS = "the a cat dog sat ran on mat red blue sun moon and is was big small".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
STEPS = ("--train.batch_size", "4", "--train.warmup_steps", "0", "--train.log_every", "1", "--eval.every", "0")


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random transformers BertForMaskedLM imported with `lmforge import`, and text prepared with its
    tokenizer (sentences of a 17-word vocabulary, so a few MLM steps learn the word frequencies)."""
    root = tmp_path_factory.mktemp("init_from")
    hf_cfg = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForMaskedLM(hf_cfg).save_pretrained(str(root / "hf"))
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.save_pretrained(str(root / "hf"))
    run = import_hf(root / "hf", root / "bert")
    rng = random.Random(0)
    docs = root / "docs.jsonl"
    weights = [1 + 5 * (i % 4 == 0) for i in range(len(WORDS))]  # a skewed unigram distribution to learn
    lines = [" ".join(rng.choices(WORDS, weights, k=rng.randint(8, 20))) for _ in range(400)]
    docs.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
    data = root / "data"
    prepare(PrepareConfig(inputs=[str(docs)], out=str(data), tokenizer=str(run / "tokenizer.json"),
                          val_fraction=0.0, test_fraction=0.0), progress=False)  # fmt: skip
    return run, data


def _first_step_loss(new_run: Path, model: torch.nn.Module) -> float:
    """The loss `model` has on the first optimizer step's window of `new_run` (its loader and objective rebuilt
    from its config.json, as `pretrain` builds them)."""
    cfg = config_from_json(json.loads((new_run / "config.json").read_text()), "config.json")
    data = load_data_dir(cfg.data.dir)
    precision = pick_precision(torch.device("cpu"), cfg.train.dtype, cfg.train.attention)
    micro = cfg.train.micro_batch_per_rank(1)
    setup = setup_objective(
        cfg, data.split_shards("train"), data.split_shards("val"), Tokenizer.load(data.tokenizer_path), precision,
        micro_batch=micro, accum_steps=cfg.train.batch_size // micro,
    )  # fmt: skip
    loader = iter(setup.loader)
    window = [next(loader) for _ in range(cfg.train.batch_size // micro)]
    counts = window_counts(setup.objective, window)
    model.train()
    with torch.no_grad():
        return sum(float(window_loss(setup.objective.loss(model, batch), counts)) for batch in window)


def test_imported_bert_continues_mlm_pretraining_from_its_weights(imported, tmp_path: Path) -> None:
    run, data = imported
    new = tmp_path / "new"
    r = run_cli("pretrain", "--data", str(data), "--out", str(new), "--init-from", str(run), "--objective", "mlm",
                "--train.max_steps", "12", "--train.lr", "3e-3", *STEPS)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "starting from the weights of" in r.stdout + r.stderr
    losses = [m["loss"] for m in read_metrics(new / "metrics.jsonl") if "loss" in m]
    want = _first_step_loss(new, load_trained(run, torch.device("cpu")).model)
    assert losses[0] == pytest.approx(want, rel=1e-5)  # the imported weights were loaded: the same loss
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2  # and it trains
    config = json.loads((new / "config.json").read_text())
    assert config["init_from"] == str((run / "checkpoints" / "step-000000").resolve())
    assert config["model"] == json.loads((run / "config.json").read_text())["model"]
    assert (new / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()


def test_mismatches_are_refused_in_one_line_and_weights_only_points_to_init_from(imported, tmp_path: Path) -> None:
    run, data = imported

    def refused(*args: str) -> str:
        r = run_cli("pretrain", "--init-from", str(run), "--out", str(tmp_path / "new"), *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not (tmp_path / "new").exists()
        return r.stderr

    assert "model.n_layer 3 differs from that run's 2" in refused("--data", str(data), "--model.n_layer", "3")
    err = refused("--data", str(data), "--objective", "clm")
    assert "objective 'clm' cannot train its model.family 'bert' model; pass --objective mlm or mlm+nsp" in err
    hf = run.parent / "hf"  # not imported yet
    assert f"import it first (lmforge import {hf} --out RUN_DIR)" in run_cli("pretrain", "--init-from", str(hf)).stderr
    r = run_cli("pretrain", "--data", str(data), "--out", str(run), "--config", str(run))  # resuming an import
    assert r.returncode == 2 and f"--init-from {run}" in r.stderr, r.stderr


def test_decoder_quantized_and_whole_fine_tuned_runs_init_from_load_their_weights(
    data_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    from lmforge.finetune import FinetuneConfig, finetune

    base = tmp_path / "base"
    pretrain(tiny_config(data_dir, base, **{"train.max_steps": 6, "eval.every": 0}), progress=False)
    assert run_cli("quantize", str(base), "--bits", "8", "--out", str(tmp_path / "q8"), "--no-compare").returncode == 0
    text = tmp_path / "text.txt"
    text.write_text(corpus_file.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    fast = {"train": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0}, "eval": {"every": 0}}
    for adapt in ("full", "lora"):
        cfg = FinetuneConfig(task="clm", adapt=adapt)
        finetune(base, train_file=text, out=tmp_path / f"ft_{adapt}", cfg=cfg, overrides=fast, progress=False)
    r = run_cli(
        "pretrain", "--data", str(data_dir), "--out", str(tmp_path / "no"), "--init-from", str(tmp_path / "ft_lora")
    )
    assert r.returncode == 2 and "that fine-tune saved adapter weights for task clm" in r.stderr, r.stderr
    # a quantized run: its int8 weights dequantized, as eval reads them; a whole-model fine-tune: a plain GPT
    for start in (base, tmp_path / "q8", tmp_path / "ft_full"):
        new = tmp_path / f"from_{start.name}"
        r = run_cli("pretrain", "--data", str(data_dir), "--out", str(new), "--init-from", str(start),
                    "--train.max_steps", "3", "--train.lr", "1e-3", *STEPS)  # fmt: skip
        assert r.returncode == 0, r.stderr
        first = read_metrics(new / "metrics.jsonl")[0]
        assert first["step"] == 1  # step 0 again, a fresh schedule
        want = _first_step_loss(new, load_trained(start, torch.device("cpu")).model)
        assert first["loss"] == pytest.approx(want, rel=1e-5)


def _kill_after_step_3_and_rerun(args: list[str], straight: Path) -> tuple[Path, str]:
    """A copy of the 6-step run `straight` as if killed after its step-3 checkpoint, re-run with `args`: it resumes
    and ends as `straight` did (weights bitwise, metrics). Returns the copy and the re-run's output."""
    crashed = straight.parent / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000006")
    (crashed / "checkpoints" / "latest").write_text("step-000003\n", encoding="utf-8")
    r = run_cli(*args, "--out", str(crashed))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout + r.stderr
    _assert_same_run(straight, crashed)
    return crashed, r.stdout + r.stderr


def test_a_killed_init_from_run_resumes_its_own_checkpoint_exactly(imported, tmp_path: Path) -> None:
    run, data = imported
    straight = tmp_path / "straight"
    args = ["pretrain", "--data", str(data), "--init-from", str(run), "--train.max_steps", "6",
            "--checkpoint.every", "3", "--checkpoint.keep", "5", *STEPS]  # fmt: skip
    assert run_cli(*args, "--out", str(straight)).returncode == 0
    crashed, out = _kill_after_step_3_and_rerun(args, straight)
    assert "--init-from" in out  # the note: ignored
    assert json.loads((crashed / "config.json").read_text())["init_from"].endswith("step-000000")


@pytest.fixture(scope="module")
def electra_imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random transformers ELECTRA (discriminator and generator) imported with `lmforge import`, and text
    prepared with its tokenizer."""
    from tests.test_import_electra import VOCAB as ELECTRA_VOCAB
    from tests.test_import_electra import hf_electra, hf_generator

    root = tmp_path_factory.mktemp("init_from_electra")
    hf_generator(root / "gen", hf_electra(root / "disc", embedding_size=16))
    run = root / "electra"
    r = run_cli("import", str(root / "disc"), "--out", str(run), "--generator", str(root / "gen"))
    assert r.returncode == 0, r.stderr
    rng = random.Random(1)
    words = [w for w in WORDS if w in ELECTRA_VOCAB]
    lines = [" ".join(rng.choices(words, k=rng.randint(8, 20))) for _ in range(300)]
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
    data = root / "data"
    prepare(PrepareConfig(inputs=[str(docs)], out=str(data), tokenizer=str(run / "tokenizer.json"),
                          val_fraction=0.0, test_fraction=0.0), progress=False)  # fmt: skip
    return run, data


def test_imported_electra_continues_pretraining_from_its_weights_and_resumes_exactly(
    electra_imported, tmp_path: Path
) -> None:
    """The first step's loss (generator MLM + weighted replaced-token detection; samples from the loader's noise)
    is the loss of RUN's discriminator and generator on that window, and a run killed after a checkpoint resumes
    to the same weights (bitwise) and metrics as one run straight."""
    run, data = electra_imported
    straight = tmp_path / "straight"
    args = ["pretrain", "--data", str(data), "--init-from", str(run), "--objective", "electra",
            "--train.max_steps", "6", "--train.lr", "1e-3", "--checkpoint.every", "3", "--checkpoint.keep", "5",
            *STEPS]  # fmt: skip
    r = run_cli(*args, "--out", str(straight))
    assert r.returncode == 0, r.stderr
    assert "starting from the weights of" in r.stdout + r.stderr
    config = json.loads((straight / "config.json").read_text())
    assert config["model"] == json.loads((run / "config.json").read_text())["model"]
    assert config["objective"]["name"] == "electra"
    first = read_metrics(straight / "metrics.jsonl")[0]
    assert first["step"] == 1
    want = _first_step_loss(straight, load_trained(run, torch.device("cpu")).model)
    assert first["loss"] == want  # exactly: RUN's weights (both networks) were loaded, the same ops ran
    _kill_after_step_3_and_rerun(args, straight)


# Li Bai's "Quiet Night Thought" (public domain): Chinese characters the English base's tokenizer lacks
CHINESE = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"


@pytest.fixture(scope="module")
def retokenized(data_dir: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny GPT with an untied output head trained 40 steps on the char-level data (tokenizer A), and data of
    lower-cased English and Chinese lines prepared with a new char tokenizer B: B lacks A's capitals (so the
    shared characters have other ids) and adds the Chinese characters."""
    root = tmp_path_factory.mktemp("retokenized")
    base = root / "base"
    untied = {"model.tie_embeddings": False, "train.max_steps": 40, "eval.every": 0, "checkpoint.every": 40}
    pretrain(tiny_config(data_dir, base, **untied), progress=False)
    english = corpus_file.read_text(encoding="utf-8")[:20_000].lower().split("\n\n")
    docs = root / "docs.jsonl"
    lines = [*english, *(CHINESE * (1 + i % 3) for i in range(40))]
    docs.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines), encoding="utf-8")
    data = root / "data"
    prepare(PrepareConfig(inputs=[str(docs)], out=str(data), tokenizer="char", val_fraction=0.0, test_fraction=0.0),
            progress=False)  # fmt: skip
    return base, data


def _next_token_loss(model: torch.nn.Module, ids: list[int]) -> float:
    x = torch.tensor([ids])
    model.eval()
    with torch.no_grad():
        logits = model(x[:, :-1])
    return float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:]))


def test_another_tokenizer_keeps_rows_by_token_string_and_starts_new_tokens_at_the_mean(
    retokenized, corpus_file: Path, tmp_path: Path
) -> None:
    base, data = retokenized
    base_tok, new_tok = Tokenizer.load(base / "tokenizer.json"), Tokenizer.load(data / "tokenizer.json")
    cfg = tiny_config(data, tmp_path / "new", **{"model.tie_embeddings": False})
    cfg, init = init_start(dataclasses.replace(cfg, init_from=str(base)), new_tok, starts=True)
    cfg = resolve_run_config(cfg, new_tok)
    assert cfg.model.vocab_size == new_tok.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights()
    load_init_weights(model, init)
    trained = load_trained(base, torch.device("cpu")).model
    old, new = trained.state_dict(), model.state_dict()

    old_ids, new_ids = base_tok.hf.get_vocab(with_added_tokens=True), new_tok.hf.get_vocab(with_added_tokens=True)
    shared = [(new_ids[s], old_ids[s]) for s in new_ids if s in old_ids]
    added = [i for s, i in new_ids.items() if s not in old_ids]
    assert any(i != j for i, j in shared)  # the ids moved: rows go by token string, not by id
    assert len(added) == len(set(CHINESE)) and len(shared) < base_tok.vocab_size  # capitals dropped
    assert set(vocab_dims(cfg.model)) == {"tok_emb.weight", "lm_head.weight"}
    for name in ("tok_emb.weight", "lm_head.weight"):
        for i, j in shared:
            assert torch.equal(new[name][i], old[name][j])  # bit-equal
        mean = old[name][: base_tok.vocab_size].mean(dim=0)
        for i in added:
            assert torch.equal(new[name][i], mean)
    for name in old.keys() - {"tok_emb.weight", "lm_head.weight"}:
        assert torch.equal(new[name], old[name]), name
    summary = f"init-from: {len(shared)} of {new_tok.vocab_size} tokens kept from {base}, {len(added)} new"
    assert init.summary() == summary

    # Text of shared tokens (lower-case English) scores as it did with the base: the same rows, only the softmax
    # over another vocabulary (19 logits more at the mean, the capitals' gone). Measured: 3.325 -> 3.267 nats,
    # where the random init the rows replaced scores 5.3 (about ln of the vocabulary size).
    text = corpus_file.read_text(encoding="utf-8")[30_000:31_000].lower()
    before = _next_token_loss(trained, base_tok.encode(text)[:32])
    after = _next_token_loss(model, new_tok.encode(text)[:32])
    assert after == pytest.approx(before, rel=0.05), (before, after)
    fresh = build_model(cfg.model)
    fresh.init_weights()
    assert _next_token_loss(fresh, new_tok.encode(text)[:32]) > before + 1.5


def test_init_from_with_another_tokenizer_trains_says_so_records_it_and_resumes_exactly(
    retokenized, tmp_path: Path
) -> None:
    base, data = retokenized
    new_tok = Tokenizer.load(data / "tokenizer.json")
    straight = tmp_path / "straight"
    args = ["pretrain", "--data", str(data), "--init-from", str(base), "--train.max_steps", "6",
            "--checkpoint.every", "3", "--checkpoint.keep", "5", *STEPS]  # fmt: skip
    r = run_cli(*args, "--out", str(straight))
    assert r.returncode == 0, r.stderr
    record = json.loads((straight / "init_from.json").read_text(encoding="utf-8"))
    assert record["tokenizer"] == "another" and record["tokens"] == new_tok.vocab_size
    assert record["new"] == len(set(CHINESE)) and record["kept"] == new_tok.vocab_size - record["new"]
    line = f"init-from: {record['kept']} of {new_tok.vocab_size} tokens kept from {base}, {record['new']} new"
    assert line in r.stdout + r.stderr
    config = json.loads((straight / "config.json").read_text(encoding="utf-8"))
    assert config["model"]["vocab_size"] == new_tok.vocab_size
    assert (straight / "tokenizer.json").read_text(encoding="utf-8") == new_tok.to_str()
    # the first step's loss is that of the weights load_init_weights gives (the run loaded them)
    cfg = config_from_json(config, "config.json")
    model = build_model(cfg.model)
    model.init_weights()
    _, init = init_start(dataclasses.replace(cfg, init_from=str(base)), new_tok, starts=True)
    load_init_weights(model, init)
    first = read_metrics(straight / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(_first_step_loss(straight, model), rel=1e-5)
    _kill_after_step_3_and_rerun(args, straight)


def test_an_encoder_with_another_tokenizer_keeps_its_appended_specials_and_mlm_bias_by_token(
    retokenized, data_dir: Path, tmp_path: Path
) -> None:
    """BERT on char data, whose tokenizer lacks [PAD]/[CLS]/[SEP]/[MASK]: the encoder appended them after the
    vocabulary, at other ids with each tokenizer; they keep their rows by role, and the MLM bias goes by token."""
    from lmforge.data.masking import special_ids

    _, data = retokenized
    base = pretrain_tiny_encoder("bert-tiny", data_dir, tmp_path / "bert", objective={"name": "mlm"})
    base_tok, new_tok = Tokenizer.load(base / "tokenizer.json"), Tokenizer.load(data / "tokenizer.json")
    cfg = config_from_json(json.loads((base / "config.json").read_text(encoding="utf-8")), "config.json")
    cfg = dataclasses.replace(cfg, init_from=str(base), data=dataclasses.replace(cfg.data, dir=str(data)))
    cfg, init = init_start(cfg, new_tok, starts=True)
    cfg = resolve_run_config(cfg, new_tok)
    model = build_model(cfg.model)
    model.init_weights()
    load_init_weights(model, init)
    old, new = load_trained(base, torch.device("cpu")).model.state_dict(), model.state_dict()
    old_specials, new_specials = special_ids(base_tok), special_ids(new_tok)
    assert new_specials.added == 4 and new_specials.pad == new_tok.vocab_size != old_specials.pad
    old_ids = base_tok.hf.get_vocab(with_added_tokens=True)
    pairs = [
        (new_ids, old_ids[s]) for s, new_ids in new_tok.hf.get_vocab(with_added_tokens=True).items() if s in old_ids
    ]
    pairs += list(zip(new_specials.all, old_specials.all, strict=True))
    assert init.kept == len(pairs) and cfg.model.vocab_size == new_tok.vocab_size + 4
    for name in ("embed.tok_emb.weight", "mlm_head.bias"):
        for i, j in pairs:
            assert torch.equal(new[name][i], old[name][j])
        mean = old[name][: base_tok.vocab_size + 4].mean(dim=0)
        assert torch.equal(new[name][new_tok.hf.token_to_id(CHINESE[0])], mean)


def test_a_start_hashes_runs_weights_once_and_a_resume_reads_only_its_own_run(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RUN's weights were opened and sha256-checked by the CLI's `init_settings`, again by `init_start`, and twice
    more on every resume of the new run (a 101.7 MB model: 0.72 s of hashing per start, 0.58 s per resume). Now a
    start hashes each of RUN's files once, and a resume takes the model from the new run's own checkpoint and needs
    nothing of RUN (it works with RUN gone). The real sha256 runs; the wrapper only records the files it hashes."""
    import lmforge.checkpoint
    from lmforge.cli import main
    from lmforge.train import init_from

    base = tmp_path / "base"
    pretrain(
        tiny_config(data_dir, base, **{"train.max_steps": 2, "eval.every": 0, "checkpoint.every": 2}), progress=False
    )
    hashed: list[Path] = []
    real = lmforge.checkpoint._sha256
    monkeypatch.setattr(lmforge.checkpoint, "_sha256", lambda path: hashed.append(Path(path)) or real(path))
    new = tmp_path / "new"
    monkeypatch.setenv("HOME", str(tmp_path))  # --out ~/new: the resume finds its run as load_config does
    args = ["pretrain", "--data", str(data_dir), "--out", "~/new", "--init-from", str(base), "--quiet",
            "--train.batch_size", "4", "--eval.every", "0", "--checkpoint.every", "1"]  # fmt: skip

    def run(*more: str) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *more])
        assert exit_info.value.code == 0

    weights = base / "checkpoints" / "step-000002" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # still checked when a run starts: refused, nothing written
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--train.max_steps", "1"])
    assert exit_info.value.code == 2 and not new.exists()
    weights.write_bytes(good)
    hashed.clear()
    run("--train.max_steps", "1")
    of_run = sorted(p.name for p in hashed if base in p.parents)
    assert of_run == ["model.safetensors", "tokenizer.json"]  # each once (was each twice)
    hashed.clear()
    opened: list[str] = []  # (RUN opened at all: a resume that found it gone went on without a word)
    real_open = init_from._open_init_source
    monkeypatch.setattr(init_from, "_open_init_source", lambda source: opened.append(str(source)) or real_open(source))
    shutil.move(base, tmp_path / "moved")  # gone: the resume needs only the new run's own files
    run("--train.max_steps", "2")
    assert [p for p in hashed if new not in p.parents] == [] and opened == []
    assert read_metrics(new / "metrics.jsonl")[-1]["step"] == 2
    assert json.loads((new / "config.json").read_text())["init_from"] == str(base.resolve() / "checkpoints/step-000002")
