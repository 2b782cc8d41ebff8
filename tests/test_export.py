"""HF export/import: our tiny GPTs vs `transformers` loading the exported directories (logits, greedy
generation, tokenizer), export -> import round trips, models built by `transformers` -> import, errors.

All offline on CPU with tiny random models (n_layer 2, d_model 32-64, n_head 4, vocab ~300). Random
init leaves norm weights at 1 and biases at 0, where a swapped or dropped norm/bias mapping would
go unnoticed, so every 1-D parameter is perturbed before export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import save_checkpoint
from lmforge.config import RunConfig
from lmforge.errors import CheckpointError, DataError, LmforgeError
from lmforge.export.hf import export_hf, verify_hf
from lmforge.export.hf_import import import_hf
from lmforge.generate import generate, generate_batch, generate_from_checkpoint, stop_ids_of
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe, train_char, train_unigram, train_wordpiece
from lmforge.train.state import TrainState
from lmforge.trained import load_trained
from tests.conftest import run_cli, tiny_config

# Local directories only: never let huggingface_hub try the network (there is none, and retries are slow).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
VARIANTS = {
    "gpt2": dict(),  # learned positions, layernorm, gelu, biases, tied head
    "gpt2-nobias-untied": dict(bias=False, tie_embeddings=False),
    # GPT-2's own activation, HF "gelu_new"; init_std 0.3 puts MLP inputs where the two GELUs differ
    "gpt2-gelu-tanh": dict(mlp="gelu_tanh", init_std=0.3),
    "llama": dict(LLAMA),
    "llama-gqa-untied": dict(LLAMA, n_kv_head=2, tie_embeddings=False),
    "llama-bias-d64": dict(LLAMA, bias=True, d_model=64, rope_theta=500.0),
    "qwen2": dict(LLAMA, qkv_bias=True, n_kv_head=2),  # biases on q, k and v alone: Qwen2ForCausalLM
}
TEXTS = [
    "The quick brown fox jumps over the lazy dog, twice.",
    "敏捷的棕色狐狸跳过了懒狗。你好，世界！",
    "Emoji: 🦊🐶🎉 and a family 👨‍👩‍👧 — café naïve.",
]
CONTEXT = 32
# Same float32 math on both sides (HF's Conv1D is addmm on the transposed weight; Llama's separate
# q/k/v and gate/up matmuls compute slices of our fused ones). Measured max |diff| on this CPU
# (torch 2.13, transformers 5.23, 1 and 2 threads): 0.0 for every variant, both directions, logits up
# to ~10 in size. atol/rtol 1e-5 (~100 float32 ulps at 1.0) leave room for BLAS kernels that block the
# fused and split matmuls differently on other CPUs; the mapping mistakes tried while writing this
# (gate/up swapped, a Conv1D transpose dropped, ln_1/ln_2 swapped) moved logits by 3e-3 to 2e-2.
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    corpus = [f"{t} {i}" for i in range(30) for t in TEXTS] + ["the lazy dog " * 20, "你好世界 " * 20]
    return train_bpe(corpus, vocab_size=300)


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Norm weights and biases away from 1 and 0, so their mapping is tested too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def make_run(root: Path, tokenizer: Tokenizer, *, seed: int = 0, edit: Any = None, **overrides: object) -> Path:
    """A run directory holding one weights-only checkpoint of a seeded random GPT (`edit(model)` changes it
    before it is saved)."""
    model_cfg = GPTConfig(
        **{"vocab_size": tokenizer.vocab_size, "max_seq_len": CONTEXT, "n_layer": 2, "n_head": 4, "d_model": 32}
        | overrides
    )
    cfg = RunConfig(out=str(root), model=model_cfg)
    torch.manual_seed(seed)
    model = GPT(model_cfg)
    model.init_weights()
    perturb_(model, seed)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    state = TrainState(step=7, tokens=7 * 8 * CONTEXT)
    save_checkpoint(
        root,
        step=7,
        model=model,
        optimizer=None,
        state={"train_state": state.to_dict(), "config": cfg.to_dict()},
        tokenizer_json=tokenizer.to_str(),
    )
    return root


def hf_model(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


# --------------------------------------------------------------------------------------------
# export -> transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_logits_match_transformers(variant: str, bpe: Tokenizer, tmp_path: Path, capfd) -> None:
    run = make_run(tmp_path / "run", bpe, **VARIANTS[variant])
    out = export_hf(run, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    ours = load_trained(run, torch.device("cpu")).model
    theirs = hf_model(out)
    family = "gpt2" if variant.startswith("gpt2") else "qwen2" if variant == "qwen2" else "llama"
    assert theirs.config.model_type == family
    if family == "gpt2":
        assert theirs.config.activation_function == {"gelu": "gelu", "gelu_tanh": "gelu_new"}[ours.cfg.mlp]
    assert theirs.config.tie_word_embeddings == ours.cfg.tie_embeddings
    tied = theirs.lm_head.weight.data_ptr() == theirs.get_input_embeddings().weight.data_ptr()
    assert tied == ours.cfg.tie_embeddings
    idx = torch.randint(0, bpe.vocab_size, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(idx)
        torch.testing.assert_close(theirs(idx).logits, expected, **TOL)
        # a prefix alone gives the prefix's logits in both (causal attention, same position offsets)
        torch.testing.assert_close(theirs(idx[:, :5]).logits, expected[:, :5], **TOL)
    capfd.readouterr()
    assert verify_hf(run, out) <= 1e-5
    assert "Loading weights" not in capfd.readouterr().err  # (transformers' progress bar, amid export's lines)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa-untied"])
def test_greedy_generation_matches_transformers(variant: str, bpe: Tokenizer, tmp_path: Path) -> None:
    # init_std 0.3 gives peaked logits: an argmax that is not decided by a 1e-7 rounding difference,
    # and a varied continuation rather than one token repeated
    run = make_run(tmp_path / "run", bpe, init_std=0.3, **VARIANTS[variant])
    out = export_hf(run, tmp_path / "hf")
    ours = load_trained(run, torch.device("cpu")).model
    prompt = bpe.encode("The quick")
    n_new = CONTEXT - len(prompt)  # up to the context: HF has no sliding window past it
    new = generate(ours, prompt, max_new_tokens=n_new, temperature=0, eos_id=bpe.eos_id)
    assert len(set(new)) > 3  # not a degenerate repeat
    theirs = hf_model(out)
    ids = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n_new)
    assert ids[0, len(prompt) :].tolist() == new


def padded_rows_most_likely(n_real: int) -> Any:
    """A GPT-2 edit: every position's final hidden state is all ones (final LayerNorm weight 0, bias 1), and the
    head rows past the tokenizer's `n_real` ids are all ones, so those ids score d_model against ~0.1."""

    def edit(model: GPT) -> None:
        model.norm_f.weight.zero_()
        model.norm_f.bias.fill_(1.0)
        model.lm_head.weight[n_real:] = 1.0

    return edit


def test_transformers_generate_never_emits_padded_vocabulary_ids(bpe: Tokenizer, tmp_path: Path) -> None:
    n_real = bpe.vocab_size
    run = make_run(
        tmp_path / "run", bpe, vocab_size=n_real + 20, tie_embeddings=False, edit=padded_rows_most_likely(n_real)
    )
    out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "generation_config.json").read_text())["suppress_tokens"] == list(
        range(n_real, n_real + 20)
    )
    theirs = hf_model(out)
    prompt = torch.tensor([bpe.encode("The quick")])
    with torch.no_grad():
        assert int(theirs(prompt).logits[0, -1].argmax()) >= n_real  # the padded rows are the most likely
    greedy = theirs.generate(prompt, do_sample=False, max_new_tokens=8)
    torch.manual_seed(0)
    sampled = theirs.generate(prompt, do_sample=True, top_k=0, max_new_tokens=8, num_return_sequences=4)
    for ids in (greedy, sampled):
        assert int(ids[:, prompt.shape[1] :].max()) < n_real
    ours = load_trained(run, torch.device("cpu")).model  # lmforge's generate picks the same greedy ids
    expected = generate(ours, prompt[0].tolist(), max_new_tokens=8, temperature=0, vocab_size=n_real)
    assert greedy[0, prompt.shape[1] :].tolist() == expected


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_autotokenizer_matches_ours(kind: str, bpe: Tokenizer, tmp_path: Path) -> None:
    # the char vocabulary lacks the emoji and most Chinese characters: those go through byte fallback
    tokenizer = bpe if kind == "bpe" else train_char([TEXTS[0], "敏捷的狐狸"])
    out = export_hf(make_run(tmp_path / "run", tokenizer), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.eos_token == hf_tok.pad_token == "<|endoftext|>" and hf_tok.eos_token_id == tokenizer.eos_id
    assert hf_tok.model_max_length == CONTEXT
    # special-token strings inside text are plain text on both sides (split_special_tokens)
    for text in [*TEXTS, "  leading spaces, trailing . ,  \n\nnew lines", "<|endoftext|>文字 and <|endoftext|>"]:
        ids = tokenizer.encode(text)
        assert hf_tok(text)["input_ids"] == ids  # default call: no special tokens added
        assert hf_tok.decode(ids) == text == tokenizer.decode(ids)


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_autotokenizer_unk_is_the_tokenizers_own(kind: str, tmp_path: Path) -> None:
    # WordPiece and Unigram emit their own unknown token for what they cannot encode; the export named
    # <|endoftext|> as unk_token, so AutoTokenizer's unk_token_id was the EOS id instead
    train = train_wordpiece if kind == "wordpiece" else train_unigram
    tokenizer = train([TEXTS[0]] * 20, 300)
    out = export_hf(make_run(tmp_path / "run", tokenizer), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    unk_ids = set(tokenizer.encode("ß")) - set(
        tokenizer.encode("")
    )  # an unseen character (no byte fallback: WordPiece)
    unk_id = hf_tok.unk_token_id
    assert unk_id != tokenizer.eos_id and tokenizer.id_to_token(unk_id) in ("[UNK]", "<unk>", "<|unk|>")
    if kind == "wordpiece":
        assert unk_ids == {unk_id}


# digits, Chinese, runs of spaces, tabs and newlines: where pre-tokenizers differ
TOKENIZER_TEXTS = [
    "in 2024 there were 12345 foxes\n\n  and 7 dogs",
    "价格是 42 元。\n第二行",
    "  leading  and\ttabs \n",
    *TEXTS,
]


@pytest.fixture(scope="module")
def tokenizer_kinds(bpe: Tokenizer) -> dict[str, Tokenizer]:
    """One tokenizer of each kind lmforge trains, and a byte-level BPE split as Qwen2's own (an imported Qwen2's)."""
    corpus = [f"{t} {i} 12345 2024" for i in range(30) for t in TEXTS] + ["the lazy dog " * 20, "你好世界 " * 20]
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.export.hf import QWEN2_SPLIT

    qwen2_style = json.loads(bpe.to_str())
    split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    qwen2_style["normalizer"] = {"type": "NFC"}
    qwen2_style["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    return {
        "bpe": bpe,
        "char": train_char([TEXTS[0] + " 0123456789\n", "敏捷的狐狸"]),
        "wordpiece": train_wordpiece(corpus, 300),
        "unigram": train_unigram(corpus, 400),
        "qwen2-style-bpe": Tokenizer(HFTokenizer.from_str(json.dumps(qwen2_style))),
    }


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_the_tokenizer_the_card_loads_gives_our_ids(
    family: str, tokenizer_kinds: dict[str, Tokenizer], tmp_path: Path, capfd
) -> None:
    # transformers 5 loads any qwen2 directory as Qwen2Tokenizer (tokenizer_class in tokenizer_config.json is
    # ignored), which rebuilds Qwen2's pre-tokenizer: digits one by one, and char/WordPiece/Unigram vocabularies
    # broken (spaces dropped). The export said nothing and its card loaded AutoTokenizer: other ids than lmforge's.
    for kind, tokenizer in tokenizer_kinds.items():
        out = export_hf(make_run(tmp_path / kind / "run", tokenizer, **VARIANTS[family]), tmp_path / kind / "hf")
        err = capfd.readouterr().err
        auto = transformers.AutoTokenizer.from_pretrained(str(out))
        auto_differs = any(auto(text)["input_ids"] != tokenizer.encode(text) for text in TOKENIZER_TEXTS)
        assert auto_differs == (family == "qwen2" and kind != "qwen2-style-bpe"), kind
        assert ("Qwen2Tokenizer" in err) == auto_differs, (kind, err)  # a one-line note, exactly when needed
        if auto_differs:
            assert len(
                err.strip().splitlines()
            ) == 1 and f"PreTrainedTokenizerFast.from_pretrained({str(out)!r}" in err.replace('"', "'")
        card = (out / "README.md").read_text()
        name = "PreTrainedTokenizerFast" if auto_differs else "AutoTokenizer"
        assert f"tokenizer = {name}.from_pretrained(" in card
        hf_tok = getattr(transformers, name).from_pretrained(str(out))
        for text in TOKENIZER_TEXTS:
            ids = tokenizer.encode(text)
            assert hf_tok(text)["input_ids"] == ids, (kind, text)
            assert hf_tok.decode(ids) == tokenizer.decode(ids), (kind, text)


def test_export_of_a_trained_run_has_a_model_card(data_dir: Path, tmp_path: Path) -> None:
    from lmforge.train.run import pretrain

    overrides = {"train.max_steps": 2, "eval.every": 2, "eval.max_batches": 1, "checkpoint.every": 2}
    cfg = tiny_config(data_dir, tmp_path / "run", **overrides)
    state = pretrain(cfg, progress=False)
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    card = (out / "README.md").read_text(encoding="utf-8")
    val = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open(encoding="utf-8")]
    val = [r for r in val if "val_loss" in r][-1]
    assert str(Path(data_dir).resolve()) in card
    assert f"| steps | {state.step} |" in card and f"| tokens seen | {state.tokens:,} |" in card
    assert f"{val['val_loss']:.4f}" in card and f"{val['val_bpb']:.4f}" in card
    assert '"n_layer": 2' in card  # the lmforge config
    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    # No max_length there (transformers warns when it meets max_new_tokens); the context is in config.json.
    assert "max_length" not in generation and generation["eos_token_id"] == 0
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["n_positions"] == CONTEXT
    assert verify_hf(tmp_path / "run", out) <= 1e-5


def test_model_card_of_an_sft_fine_tune_says_its_val_loss_is_per_answer_token(tmp_path: Path) -> None:
    """The card said "nats/token" after an sft fine-tune's val loss, which scores the answers alone (`lmforge runs`
    says nats/answer token); it now says what `runs` says."""
    from lmforge.finetune import FinetuneConfig, finetune
    from lmforge.log import read_metrics
    from tests.test_finetune import DATA, FAST, make_base

    alpaca = DATA / "alpaca.jsonl"
    cfg = FinetuneConfig(task="sft", max_new_tokens=2)
    finetune(
        make_base(tmp_path),
        train_file=alpaca,
        val_file=alpaca,
        out=tmp_path / "sft",
        cfg=cfg,
        overrides=FAST,
        progress=False,
    )
    (val,) = [r for r in read_metrics(tmp_path / "sft" / "metrics.jsonl") if "val_loss" in r][-1:]
    card = (export_hf(tmp_path / "sft", tmp_path / "hf") / "README.md").read_text(encoding="utf-8")
    assert f"| last validation loss | {val['val_loss']:.4f} nats/answer token (step {val['step']}) |" in card


def test_model_card_speaks_the_language_of_the_training_data(tmp_path: Path) -> None:
    """A model trained on Chinese gets `language: zh` and a Chinese prompt in its card, not "Once upon a time"."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.train.run import pretrain

    text = Path(__file__).parent / "data" / "hongloumeng_ch1.txt"
    prepare(PrepareConfig(inputs=[str(text)], out=str(tmp_path / "data"), tokenizer="char"), progress=False)
    pretrain(tiny_config(tmp_path / "data", tmp_path / "run", **{"train.max_steps": 1}), progress=False)
    card = (export_hf(tmp_path / "run", tmp_path / "hf") / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlanguage:\n- zh\nlibrary_name: transformers\n")
    assert 'tokenizer("从前有座山' in card and "Once upon a time" not in card


def test_a_french_model_card_says_fr(tmp_path: Path) -> None:
    """prepare's language guess names fr/de/es/it/pt/nl now; a French corpus's card got no `language:` line and the
    English prompt, as `data_language` knew only zh/ja/ko/en."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.export.hf import card_language_header, data_language

    pairs = (Path(__file__).parent / "data" / "eng_fra.txt").read_text(encoding="utf-8").splitlines()
    french = [line.split("\t")[1] for line in pairs if "\t" in line]
    text = tmp_path / "fr.txt"
    text.write_text("\n\n".join(" ".join(french[i : i + 5]) for i in range(0, len(french), 5)), encoding="utf-8")
    prepare(PrepareConfig(inputs=[str(text)], out=str(tmp_path / "data"), tokenizer="char"), progress=False)
    assert data_language(str(tmp_path / "data")) == "fr"
    assert card_language_header("fr") == "language:\n- fr\n"


# --------------------------------------------------------------------------------------------
# import


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_import_round_trip_is_bitwise(variant: str, bpe: Tokenizer, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", bpe, **VARIANTS[variant])
    export_hf(run, tmp_path / "hf")
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    a, b = load_trained(run, torch.device("cpu")), load_trained(imported, torch.device("cpu"))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    fields = ("n_layer", "n_head", "kv_heads", "d_model", "ff_dim", "bias", "qkv_bias", "tie_embeddings", "norm_eps")
    for field in fields:
        assert getattr(a.config.model, field) == getattr(b.config.model, field), field
    assert b.config.model.rope_theta == a.config.model.rope_theta or a.config.model.pos_emb == "learned"
    assert b.tokenizer.fingerprint == bpe.fingerprint
    assert json.loads((imported / "config.json").read_text(encoding="utf-8"))["data"]["dir"] == ""
    assert b.checkpoint.meta["train_state"]["step"] == 0 and "optimizer" not in b.checkpoint.meta
    # the imported run is an ordinary run: it generates, and exports again to the same tensors
    text = generate_from_checkpoint(imported, prompt="The quick", max_new_tokens=5, temperature=0, device="cpu")
    assert isinstance(text, str)
    again = export_hf(imported, tmp_path / "hf2")
    from safetensors.torch import load_file

    first, second = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _hf_gpt2(bpe: Tokenizer, **overrides: object) -> torch.nn.Module:
    config = transformers.GPT2Config(
        **{
            "vocab_size": bpe.vocab_size + 3,  # a model vocabulary larger than the tokenizer's, as padded ones are
            "n_positions": CONTEXT,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "activation_function": "gelu",
            "bos_token_id": 0,
            "eos_token_id": 0,
        }
        | overrides
    )
    return transformers.GPT2LMHeadModel(config)


def _hf_llama(bpe: Tokenizer, **overrides: object) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        **{
            "vocab_size": bpe.vocab_size,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": CONTEXT,
            "rope_theta": 1000.0,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }
        | overrides
    )
    return transformers.LlamaForCausalLM(config)


def _hf_qwen2(bpe: Tokenizer) -> torch.nn.Module:
    config = transformers.Qwen2Config(
        vocab_size=bpe.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        rope_theta=1e6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.Qwen2ForCausalLM(config)


@pytest.mark.parametrize(
    "name",
    ["gpt2", "gpt2-untied-bin", "gpt2-gelu-new", "gpt2-gelu-pytorch-tanh", "llama-gqa", "llama-tied-bias", "qwen2"],
)
def test_import_of_a_transformers_model_matches_its_logits(name: str, bpe: Tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if name == "gpt2":
        model = _hf_gpt2(bpe)
    elif name == "gpt2-untied-bin":
        model = _hf_gpt2(bpe, tie_word_embeddings=False)
    elif name.startswith("gpt2-gelu"):  # the tanh GELU: "gelu_new" is OpenAI GPT-2's and HF's default
        model = _hf_gpt2(bpe, activation_function=name.removeprefix("gpt2-").replace("-", "_"))
    elif name == "llama-gqa":
        model = _hf_llama(bpe)
    elif name == "qwen2":  # Qwen2 / Qwen2.5: Llama with biases on q, k and v alone, tied like the small ones
        model = _hf_qwen2(bpe)
    else:
        model = _hf_llama(bpe, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    perturb_(model, seed=3)
    hf_dir = tmp_path / "hf"
    if name.endswith("-bin"):  # the legacy pickle format, read with torch.load(weights_only=True)
        hf_dir.mkdir()
        model.config.save_pretrained(hf_dir)
        torch.save(model.state_dict(), hf_dir / "pytorch_model.bin")
    else:
        model.save_pretrained(hf_dir)
    bpe.save(hf_dir / "tokenizer.json")
    run = import_hf(hf_dir, tmp_path / "run")
    ours = load_trained(run, torch.device("cpu"))
    assert ours.model.cfg.tie_embeddings == model.config.tie_word_embeddings
    assert ours.model.cfg.bias == (name not in ("llama-gqa", "qwen2"))  # perturbed GPT-2 biases: not bias-free
    assert ours.model.cfg.qkv_bias == (name == "qwen2")
    if name.startswith("gpt2"):
        assert ours.model.cfg.mlp == ("gelu_tanh" if name.startswith("gpt2-gelu") else "gelu")
    idx = torch.randint(0, bpe.vocab_size, (2, CONTEXT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(idx), model.eval()(idx).logits, **TOL)


@pytest.mark.parametrize("source", ["bfloat16", "float16"])
def test_export_of_an_imported_half_precision_model_keeps_its_dtype(
    source: str, bpe: Tokenizer, tmp_path: Path, capsys
) -> None:
    torch.manual_seed(0)
    model = _hf_llama(bpe).to(getattr(torch, source))
    model.save_pretrained(tmp_path / "hf")
    bpe.save(tmp_path / "hf" / "tokenizer.json")
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    out = export_hf(run, tmp_path / "out")  # auto: the dtype recorded at import
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    for key, t in original.items():
        assert exported[key].dtype == t.dtype and torch.equal(exported[key], t), key
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["dtype"] == config["torch_dtype"] == source
    assert verify_hf(run, out) == 0.0  # the same values: float32 math on both sides
    # an explicit --dtype chooses: float32 is twice the size, with the same values widened
    assert run_cli("export", str(run), "--out", str(tmp_path / "f32"), "--dtype", "float32").returncode == 0
    wide = load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert all(wide[k].dtype == torch.float32 and torch.equal(wide[k], t.float()) for k, t in original.items())
    size = (out / "model.safetensors").stat().st_size
    assert 1.9 * size < (tmp_path / "f32" / "model.safetensors").stat().st_size < 2.1 * size
    # a run lmforge trained (float32) stays float32 by default, and rounds when asked
    trained = make_run(tmp_path / "trained", bpe)
    wide = load_file(str(export_hf(trained, tmp_path / "t32") / "model.safetensors"))
    assert {t.dtype for t in wide.values()} == {torch.float32}
    half = export_hf(trained, tmp_path / "t16", dtype=source)
    assert {t.dtype for t in load_file(str(half / "model.safetensors")).values()} == {getattr(torch, source)}
    assert 0 < verify_hf(trained, half) < 0.1  # (rounded weights: close, not equal)
    with pytest.raises(LmforgeError, match="not an HF export dtype.*for --to gguf"):
        export_hf(trained, tmp_path / "q", dtype="q8_0")


@pytest.fixture(scope="module")
def bf16_import(bpe: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random bf16 Llama imported with `lmforge import` (the run holds float32, its state.json says bf16), and
    a text file to train it on."""
    root = tmp_path_factory.mktemp("bf16_import")
    torch.manual_seed(0)
    _hf_llama(bpe).to(torch.bfloat16).save_pretrained(root / "hf")
    bpe.save(root / "hf" / "tokenizer.json")
    text = root / "text.txt"
    text.write_text("\n\n".join(TEXTS * 4), encoding="utf-8")
    return import_hf(root / "hf", root / "run"), text


def _exported(path: Path, out: Path, dtype: str = "auto") -> dict[str, torch.Tensor]:
    return load_file(str(export_hf(path, out, dtype=dtype) / "model.safetensors"))


def test_a_fine_tune_of_a_bf16_import_exports_bf16(bf16_import: tuple[Path, Path], tmp_path: Path) -> None:
    """`lmforge import` of a bf16 model, `finetune` on the imported run (full, LoRA adapters, LoRA on that full
    fine-tune), then `export --to hf` wrote float32, twice the size: `--dtype auto` read the dtype import records
    only in the imported run's own state.json. It now follows finetune.json's `base` back to the import: bf16, the
    fine-tuned weights rounded, as `--dtype bfloat16` writes them. (~12 s: three 2-step fine-tunes, ten exports.)"""
    from lmforge.export.peft import export_peft
    from lmforge.finetune import FinetuneConfig, finetune

    run, text = bf16_import
    shutil.copytree(run, tmp_path / "run")  # (deleted at the end)
    fast = {"train": {"max_steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "lr": 1e-2}}

    def tune(base: Path, name: str, adapt: str) -> Path:
        finetune(base, train_file=text, out=tmp_path / name, cfg=FinetuneConfig(task="clm", adapt=adapt),
                 overrides=fast, progress=False)  # fmt: skip
        return tmp_path / name

    full = tune(tmp_path / "run", "full", "full")
    tuned = {"full": full, "lora": tune(tmp_path / "run", "lora", "lora"), "lora-of-full": tune(full, "lora2", "lora")}
    imported = _exported(run, tmp_path / "imported.hf")
    for name, ft in tuned.items():
        exported = _exported(ft, tmp_path / f"{name}.hf")
        assert {t.dtype for t in exported.values()} == {torch.bfloat16}, name
        assert json.loads((tmp_path / f"{name}.hf" / "config.json").read_text(encoding="utf-8"))["dtype"] == "bfloat16"
        rounded = _exported(ft, tmp_path / f"{name}.bf16", "bfloat16")
        assert all(torch.equal(exported[k], rounded[k]) for k in rounded), name  # the fine-tuned weights, rounded
        assert any(not torch.equal(exported[k], imported[k]) for k in imported), name  # (it did fine-tune)
    wide = _exported(full, tmp_path / "full.f32", "float32")  # --dtype float32 still chooses
    assert {t.dtype for t in wide.values()} == {torch.float32}
    peft = export_peft(tuned["lora"], tmp_path / "lora.peft")  # the adapter's base: the import, in its dtype
    assert {t.dtype for t in load_file(str(peft / "base" / "model.safetensors")).values()} == {torch.bfloat16}
    # the imported base deleted after a full fine-tune: the lineage ends there; the weights' own dtype is written
    shutil.rmtree(tmp_path / "run")
    assert {t.dtype for t in _exported(full, tmp_path / "lost.hf").values()} == {torch.float32}


def test_continued_pretraining_of_a_bf16_import_exports_bf16(bf16_import: tuple[Path, Path], tmp_path: Path) -> None:
    """`pretrain --init-from` an imported bf16 model exported float32, as fine-tunes did; its config's `init_from`
    leads back to the import now."""
    from lmforge.config import load_config
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.train.init_from import init_settings
    from lmforge.train.run import pretrain

    run, text = bf16_import
    data = tmp_path / "data"
    prepare(PrepareConfig(inputs=[str(text)], out=str(data), tokenizer=str(run / "tokenizer.json"),
                          val_fraction=0.0, test_fraction=0.0), progress=False)  # fmt: skip
    steps = {"max_steps": 1, "batch_size": 2, "warmup_steps": 0, "log_every": 1}
    flags = {"out": str(tmp_path / "more"), "data": {"dir": str(data)}, "init_from": str(run), "train": steps}
    pretrain(load_config(overrides=flags | {"eval": {"every": 0}}, base=init_settings(run)), progress=False)
    exported = _exported(tmp_path / "more", tmp_path / "more.hf")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert exported.keys() == _exported(run, tmp_path / "imported.hf").keys()


def test_a_quantized_bf16_import_exports_bf16(bf16_import: tuple[Path, Path], tmp_path: Path) -> None:
    """`lmforge quantize` of an imported bf16 model exported float32 by default (twice the size): its state.json
    names the checkpoint it quantized (`quantization.source`), which `--dtype auto` did not follow. It does now: the
    dequantized weights are written in bf16, as `--dtype bfloat16` rounds them."""
    from lmforge.compress.quantize import quantize_run

    run, _ = bf16_import
    quantize_run(run, tmp_path / "q", bits=8, group_size=64, compare=False)
    exported = _exported(tmp_path / "q", tmp_path / "q.hf")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    rounded = _exported(tmp_path / "q", tmp_path / "q.bf16", "bfloat16")
    assert exported.keys() == rounded.keys() and all(torch.equal(exported[k], rounded[k]) for k in rounded)


def test_imported_tokenizer_that_adds_bos_generates_like_transformers(bpe: Tokenizer, tmp_path: Path) -> None:
    """A Llama-2-style tokenizer puts <s> before every text (its post-processor): lmforge's prompts start
    with it too, so greedy continuations equal transformers', and the export names it as BOS."""
    from tokenizers import processors

    torch.manual_seed(0)
    hf_tok = Tokenizer.from_str(bpe.to_str()).hf
    bos = hf_tok.token_to_id("<|endoftext|>")
    hf_tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    model = _hf_llama(bpe, bos_token_id=bos)
    perturb_(model, seed=5)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    hf_tok.save(str(hf_dir / "tokenizer.json"))
    run = import_hf(hf_dir, tmp_path / "run")
    ours = load_trained(run, torch.device("cpu"))
    assert ours.tokenizer.prompt_prefix == [bos] and bpe.prompt_prefix == []  # lmforge's own: no prefix
    prompt = "The quick"
    text = generate_from_checkpoint(run, prompt=prompt, max_new_tokens=10, temperature=0, stop_at_eos=False)
    ids = [bos, *bpe.encode(prompt)]
    with torch.no_grad():
        theirs = model.eval().generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10)[0, len(ids) :]
    assert text == ours.tokenizer.decode(theirs.tolist(), skip_special_tokens=True)


def test_import_of_openai_style_gpt2_is_exact_and_bias_free(bpe: Tokenizer, tmp_path: Path) -> None:
    model = _hf_gpt2(bpe, activation_function="gelu_new")  # OpenAI GPT-2's setting; HF inits biases to 0
    with torch.no_grad():  # MLP inputs of a trained model's size (~1), where the two GELUs differ (~1e-4)
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(30)
            block.mlp.c_proj.weight.mul_(10)
    model.save_pretrained(tmp_path / "hf")
    bpe.save(tmp_path / "hf" / "tokenizer.json")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    ours = load_trained(run, torch.device("cpu")).model
    assert ours.cfg.bias is False and ours.cfg.mlp == "gelu_tanh"
    idx = torch.randint(0, bpe.vocab_size, (2, CONTEXT), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), model.eval()(idx).logits, **TOL)
        ours.cfg.mlp = "gelu"  # the exact GELU instead: the logits move (this is what import used to build)
        exact = GPT(ours.cfg)
        exact.load_state_dict(ours.state_dict())
        assert (exact(idx) - model(idx).logits).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# errors


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_unsupported_variants_are_one_line_errors(bpe: Tokenizer, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", bpe, pos_emb="rope")  # rope + layernorm + gelu
    with pytest.raises(LmforgeError) as excinfo:
        export_hf(run, tmp_path / "hf")
    message = one_line(excinfo)
    assert "only GPT-2-style or Llama-style models export to HF; this one has pos_emb=rope, norm=layernorm" in message
    assert "GPT-2 needs pos_emb=learned" in message and "Llama needs norm=rmsnorm, mlp=swiglu" in message
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()
    gqa = make_run(tmp_path / "gqa", bpe, n_kv_head=2)
    with pytest.raises(LmforgeError, match="GPT-2 has no grouped-query attention") as excinfo:
        export_hf(gqa, tmp_path / "hf")
    one_line(excinfo)


def test_existing_out_needs_overwrite(bpe: Tokenizer, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", bpe)
    out = export_hf(run, tmp_path / "hf")
    (out / "stale.txt").write_text("from an older export", encoding="utf-8")
    with pytest.raises(LmforgeError, match="already exists; choose another --out or pass --overwrite") as excinfo:
        export_hf(run, out)
    one_line(excinfo)
    export_hf(run, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no build / backup folder left behind
    for name in ("hf.tmp", "hf.old"):  # the user's own folders: never built in, never deleted
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("precious", encoding="utf-8")
    export_hf(run, out, overwrite=True)
    export_hf(run, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.old", "hf.tmp", "run"]
    assert all((tmp_path / name / "notes.txt").is_file() for name in ("hf.tmp", "hf.old"))
    for path, inside in [(run, run / "checkpoints"), (run, run / "hf"), (run, run / "config.json"), (run, tmp_path)]:
        with pytest.raises(LmforgeError, match="overlaps the directory being read"):
            export_hf(path, inside, overwrite=True)
    assert (run / "checkpoints" / "step-000007" / "model.safetensors").is_file() and not (run / "hf").exists()
    imported = import_hf(out, tmp_path / "imported")
    with pytest.raises(LmforgeError, match="already exists"):
        import_hf(out, imported)
    import_hf(out, imported, overwrite=True)


def test_resuming_an_imported_run_says_how_to_train_it_further(bpe: Tokenizer, tmp_path: Path) -> None:
    # `pretrain --config IMPORTED --out IMPORTED` reached this with only "it cannot resume training" and no way on; it
    # now names `pretrain --init-from`, which encoders can use too. make_run's checkpoint is weights-only, as
    # import's (and quantize's) are
    imported = make_run(tmp_path / "imported", bpe)
    trained = load_trained(imported, torch.device("cpu"))
    optimizer = torch.optim.AdamW(trained.model.parameters())
    with pytest.raises(CheckpointError) as e:
        trained.checkpoint.load_optimizer(optimizer)
    assert f"lmforge pretrain --data DATA --out NEW_RUN --init-from {imported}" in one_line(e)


def test_overwrite_refuses_a_folder_that_is_not_a_model(bpe: Tokenizer, tmp_path: Path) -> None:
    # export --overwrite deleted any folder named as --out: a user's folder of notes went with it
    run = make_run(tmp_path / "run", bpe)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("precious", encoding="utf-8")
    for out in (mine, tmp_path / "notes.txt"):
        with pytest.raises(LmforgeError, match="refusing to overwrite .* not a model folder") as excinfo:
            export_hf(run, out, overwrite=True)
        one_line(excinfo)
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "precious"
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "precious"


def test_import_errors(bpe: Tokenizer, tmp_path: Path) -> None:
    out = export_hf(make_run(tmp_path / "run", bpe), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="is not a directory"):
        import_hf(tmp_path / "nowhere", tmp_path / "a")
    (out / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="has no tokenizer.json") as excinfo:
        import_hf(out, tmp_path / "a")
    one_line(excinfo)
    (tmp_path / "tokenizer.json").rename(out / "tokenizer.json")
    (out / "model.safetensors").rename(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no model weights") as excinfo:
        import_hf(out, tmp_path / "a")
    one_line(excinfo)
    # a pickle holding more than tensors: refused in one plain line (no colour codes), nothing unpickled
    torch.save({"wte.weight": torch.zeros(2), "extra": Path("x")}, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds pickled objects besides tensors") as excinfo:
        import_hf(out, tmp_path / "a")
    one_line(excinfo)
    assert "\x1b" not in str(excinfo.value)
    (out / "pytorch_model.bin").unlink()
    (tmp_path / "model.safetensors").rename(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    (out / "config.json").write_text(json.dumps(config | {"model_type": "roberta"}), encoding="utf-8")
    with pytest.raises(
        LmforgeError,
        match="model_type 'roberta' is not supported; lmforge imports gpt2, llama, qwen2, bert and electra",
    ):
        import_hf(out, tmp_path / "a")
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.tmp").exists()


def test_import_reads_json_files_saved_with_a_bom(bpe: Tokenizer, tmp_path: Path) -> None:
    # a config.json edited in Windows Notepad starts with a UTF-8 BOM: it was "not valid JSON (truncated or damaged)"
    out = export_hf(make_run(tmp_path / "run", bpe, **VARIANTS["llama"]), tmp_path / "hf")
    for name in ("config.json", "tokenizer_config.json", "generation_config.json", "tokenizer.json"):
        (out / name).write_bytes(b"\xef\xbb\xbf" + (out / name).read_bytes())
    imported = load_trained(import_hf(out, tmp_path / "imported"), torch.device("cpu")).model.state_dict()
    original = load_trained(tmp_path / "run", torch.device("cpu")).model.state_dict()
    assert imported.keys() == original.keys() and all(torch.equal(imported[k], original[k]) for k in original)


@pytest.mark.parametrize("damage", ["index-list", "index-map-int", "shard-outside", "bin-garbage"])
def test_import_of_a_damaged_checkpoint_is_one_line(damage: str, bpe: Tokenizer, tmp_path: Path) -> None:
    """A sharded index that is not {"weight_map": {name: file}}, a shard named outside the directory (an
    absolute path or ../) and a .bin that is not a torch.save file were tracebacks (AttributeError, an
    arbitrary file read with torch.load, KeyError from the unpickler); now one line each."""
    hf_dir = export_hf(make_run(tmp_path / "run", bpe, **LLAMA), tmp_path / "hf")
    state = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    if damage == "bin-garbage":
        (hf_dir / "pytorch_model.bin").write_bytes(b"hello\n")
        match = r"pytorch_model.bin is not a plain tensor checkpoint \(KeyError: .*\); convert it"
    else:
        save_file(state, str(hf_dir / "model-00001-of-00001.safetensors"))
        index = {"weight_map": {name: "model-00001-of-00001.safetensors" for name in state}}
        (tmp_path / "outside.safetensors").write_bytes(b"not here")
        if damage == "index-list":
            index, match = [index], "has no 'weight_map' of tensor names to shard files"
        elif damage == "index-map-int":
            index, match = {"weight_map": 5}, "has no 'weight_map' of tensor names to shard files"
        else:
            index["weight_map"]["model.norm.weight"] = "../outside.safetensors"
            match = r"names shard '../outside.safetensors', which is not a file name in"
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(CheckpointError, match=match) as excinfo:
        import_hf(hf_dir, tmp_path / "a")
    one_line(excinfo)
    assert not (tmp_path / "a").exists()


def test_export_does_not_need_transformers(bpe: Tokenizer, tmp_path: Path) -> None:
    """With transformers made unimportable, export and import work and verify_hf says how to install it."""
    run = make_run(tmp_path / "run", bpe)
    script = (
        "import sys; sys.modules['transformers'] = None\n"
        "from lmforge.errors import LmforgeError\n"
        "from lmforge.export.hf import export_hf, verify_hf\n"
        "from lmforge.export.hf_import import import_hf\n"
        f"out = export_hf({str(run)!r}, {str(tmp_path / 'hf')!r})\n"
        f"import_hf(out, {str(tmp_path / 'back')!r})\n"
        "try:\n    verify_hf(out, out)\nexcept LmforgeError as e:\n    print(e)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "verifying an HF export needs transformers: pip install 'lmforge[hf]'"


def test_import_refuses_rope_scaling_under_either_key(bpe: Tokenizer, tmp_path: Path) -> None:
    """transformers scales rotary positions from `rope_scaling` (4.x) or `rope_parameters` (5.x); lmforge
    has plain rotary only. A default `rope_parameters` hid a linear `rope_scaling` (logits then differed)."""
    out = export_hf(make_run(tmp_path / "run", bpe, **LLAMA), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    for key, value in [
        ("rope_scaling", {"rope_type": "linear", "factor": 4.0}),
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}),
    ]:
        (out / "config.json").write_text(json.dumps({**config, key: value}), encoding="utf-8")
        with pytest.raises(LmforgeError, match="rope scaling '(linear|dynamic|llama3)' is not supported"):
            import_hf(out, tmp_path / "a")
        assert not (tmp_path / "a").exists()


def test_import_refuses_a_qwen2_sliding_window_narrower_than_the_context(bpe: Tokenizer, tmp_path: Path) -> None:
    out = export_hf(make_run(tmp_path / "run", bpe, **VARIANTS["qwen2"]), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    (out / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 8}))
    with pytest.raises(LmforgeError, match="sliding_window=8 < max_position_embeddings=32") as excinfo:
        import_hf(out, tmp_path / "a")
    assert "\n" not in str(excinfo.value) and not (tmp_path / "a").exists()
    # a window as wide as the context is no window at all
    (out / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 32}))
    assert load_trained(import_hf(out, tmp_path / "b"), torch.device("cpu")).model.cfg.qkv_bias


# --------------------------------------------------------------------------------------------
# end-of-turn ids of instruct models


def without_known_eos(tok: Tokenizer) -> Tokenizer:
    """`tok` with its end-of-text token renamed `<|end|>` (Phi-3's name), which lmforge does not know as one."""
    renamed = Tokenizer.from_str(tok.to_str().replace(f'"{Tokenizer.EOS}"', '"<|end|>"'))
    assert renamed.hf.token_to_id("<|end|>") == tok.eos_id
    with pytest.raises(DataError, match="no end-of-text token"):
        renamed.eos_id  # noqa: B018 - what training asks for
    return renamed


def instruct_llama_dir(
    bpe: Tokenizer, hf_dir: Path, prompt_ids: list[int], max_new_tokens: int, *, known_eos: bool = True
) -> tuple[torch.nn.Module, Tokenizer, list[int]]:
    """A Llama-3-Instruct-like HF directory: the tokenizer has `<|eot_id|>` beside its end-of-text token,
    generation_config.json lists both as `eos_token_id`, and `<|eot_id|>`'s output row is set so that
    greedy decoding of `prompt_ids` produces it partway (where a new token first appears in the first half
    of `max_new_tokens`, or before). `known_eos=False`: the end-of-text token is `without_known_eos`'s.

    Returns the transformers model, the tokenizer, and transformers' greedy continuation (ending in it)."""
    hf_tok = Tokenizer.from_str(bpe.to_str()).hf
    hf_tok.add_special_tokens(["<|eot_id|>"])
    tok = Tokenizer.from_str(hf_tok.to_str())
    eos, eot = tok.eos_id, tok.hf.token_to_id("<|eot_id|>")
    tok = tok if known_eos else without_known_eos(tok)
    torch.manual_seed(0)
    model = _hf_llama(tok, eos_token_id=eos).eval()
    perturb_(model, seed=3)
    prompt = torch.tensor([prompt_ids])
    with torch.no_grad():
        free = model.generate(prompt, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None)
        free = free[0, len(prompt_ids) :].tolist()
        k = max(i for i in range(1, max_new_tokens // 2) if free[i] not in free[:i])  # in the first half
        model.lm_head.weight[eot] = 1.02 * model.lm_head.weight[free[k]]  # wins where free[k] would (or before)
        model.generation_config = transformers.GenerationConfig(bos_token_id=eos, eos_token_id=[eos, eot])
        theirs = model.generate(prompt, do_sample=False, max_new_tokens=max_new_tokens)[0, len(prompt_ids) :].tolist()
    assert theirs[-1] == eot and 1 < len(theirs) <= k + 1  # transformers stops at <|eot_id|>, well before the end
    model.save_pretrained(hf_dir)
    tok.save(hf_dir / "tokenizer.json")
    return model, tok, theirs


def test_imported_instruct_model_stops_at_its_end_of_turn_token(bpe: Tokenizer, tmp_path: Path) -> None:
    """generation_config.json's `eos_token_id: [eos, eot]` (Llama-3-Instruct): the imported run stops at
    either, as transformers' generate does, and its HF export lists both again."""
    prompt = "The quick"
    _, tok, theirs = instruct_llama_dir(bpe, tmp_path / "hf", bpe.encode(prompt), max_new_tokens=12)
    eos, eot = tok.eos_id, theirs[-1]
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    assert stop_ids_of(run) == [eos, eot]
    ours = load_trained(run, torch.device("cpu")).model
    ids = tok.encode(prompt)
    assert generate(ours, ids, max_new_tokens=12, temperature=0, eos_id=eos, stop_ids=stop_ids_of(run)) == theirs
    assert generate_batch(ours, [ids], max_new_tokens=12, eos_id=eos, stop_ids=[eot]) == [theirs]
    text = generate_from_checkpoint(run, prompt=prompt, max_new_tokens=12, temperature=0)
    assert text == tok.decode(theirs[:-1]) and "<|eot_id|>" not in text
    longer = generate_from_checkpoint(run, prompt=prompt, max_new_tokens=12, temperature=0, stop_at_eos=False)
    assert longer.startswith(text) and len(longer) > len(text)  # --ignore-eos runs past it
    from lmforge.adapt.load import load_finetuned
    from lmforge.eval.tasks import _answers

    answers = _answers(load_finetuned(run, torch.device("cpu")), [ids], max_new_tokens=12)  # eval --task's answers
    assert answers == [tok.decode(theirs[:-1]).strip()]
    gguf = pytest.importorskip("gguf")
    from lmforge.export.gguf import export_gguf

    fields = gguf.GGUFReader(str(export_gguf(run, tmp_path / "m.gguf"))).fields
    assert fields["tokenizer.ggml.eot_token_id"].contents() == eot  # llama.cpp's end of turn
    assert fields["tokenizer.ggml.eos_token_id"].contents() == eos

    out = export_hf(run, tmp_path / "again")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [eos, eot]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [eos, eot]
    again = import_hf(out, tmp_path / "run2")  # and back: the same stop ids
    assert stop_ids_of(again) == [eos, eot]


def test_imported_run_whose_tokenizer_has_no_known_eos_generates(bpe: Tokenizer, tmp_path: Path) -> None:
    """A tokenizer whose end-of-text token lmforge does not know (`<|end|>`): `lmforge generate` still works,
    stopping at the stop ids the HF directory names (here `<|eot_id|>`), or with --ignore-eos running to
    --max-new-tokens; only an empty prompt, which would start after an end-of-text token, is a one-line
    error. `eval --task` answers and the HF export (its generation_config.json keeps the stop ids) work too,
    and the GGUF export names the HF directory's first stop id as its eos."""
    prompt = "The quick"
    model, tok, theirs = instruct_llama_dir(
        bpe, tmp_path / "hf", bpe.encode(prompt), max_new_tokens=12, known_eos=False
    )
    end, eot = tok.hf.token_to_id("<|end|>"), theirs[-1]
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    assert stop_ids_of(run) == [end, eot]

    r = run_cli("generate", str(run), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0")
    assert r.returncode == 0 and r.stdout == prompt + tok.decode(theirs[:-1]) + "\n", r.stderr
    with torch.no_grad():
        free = model.generate(torch.tensor([tok.encode(prompt)]), do_sample=False, max_new_tokens=12, eos_token_id=None)
    free = free[0, len(tok.encode(prompt)) :].tolist()
    assert eot in free[:-1]  # --ignore-eos goes past it, to --max-new-tokens
    longer = generate_from_checkpoint(run, prompt=prompt, max_new_tokens=12, temperature=0, stop_at_eos=False)
    assert longer == tok.decode(free, skip_special_tokens=True).rstrip("\ufffd")  # (a cut character is dropped)
    r = run_cli("generate", str(run), "--max-new-tokens", "3")  # no prompt: needs an end-of-text token
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "tokenizer has no end-of-text token" in lines[0] and "--prompt" in lines[0]

    from lmforge.adapt.load import load_finetuned
    from lmforge.eval.tasks import _answers

    answers = _answers(load_finetuned(run, torch.device("cpu")), [tok.encode(prompt)], max_new_tokens=12)
    assert answers == [tok.decode(theirs[:-1]).strip()]
    out = export_hf(run, tmp_path / "again")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [end, eot] and generation["pad_token_id"] == end  # (batched generate pads)
    assert generation.get("bos_token_id") == json.loads((out / "config.json").read_text())["bos_token_id"]
    assert stop_ids_of(import_hf(out, tmp_path / "run2")) == [end, eot]
    gguf = pytest.importorskip("gguf")
    from lmforge.export.gguf import export_gguf

    fields = gguf.GGUFReader(str(export_gguf(run, tmp_path / "m.gguf"))).fields  # the HF eos stands in for ours
    assert fields["tokenizer.ggml.eos_token_id"].contents() == end
    assert fields["tokenizer.ggml.eot_token_id"].contents() == eot


@pytest.mark.parametrize("source", ["config", "tokenizer_config", "tokenizer_config_dict", "eos_only"])
def test_import_takes_stop_ids_from_each_hf_file(source: str, bpe: Tokenizer, tmp_path: Path) -> None:
    """config.json `eos_token_id` (an id or a list), tokenizer_config.json `eos_token` (SmolLM2-Instruct's
    `<|im_end|>`, a string or {"content": ...}); ids outside the vocabulary are dropped, and a directory
    naming only the tokenizer's own eos gets no generation.json."""
    hf_tok = Tokenizer.from_str(bpe.to_str()).hf
    hf_tok.add_special_tokens(["<|im_end|>"])
    tok = Tokenizer.from_str(hf_tok.to_str())
    eos, end = tok.eos_id, tok.hf.token_to_id("<|im_end|>")
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    eos_ids = [end, 10**6] if source == "config" else eos
    _hf_llama(tok, eos_token_id=eos_ids).save_pretrained(hf_dir)
    (hf_dir / "generation_config.json").unlink(missing_ok=True)  # config.json alone names them
    tok.save(hf_dir / "tokenizer.json")
    if source.startswith("tokenizer_config"):
        eos_token = {"content": "<|im_end|>", "special": True} if source.endswith("dict") else "<|im_end|>"
        (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos_token}))
    run = import_hf(hf_dir, tmp_path / "run")
    if source == "eos_only":
        assert stop_ids_of(run) == [] and not (run / "generation.json").exists()
    else:
        assert stop_ids_of(run) == ([end] if source == "config" else [eos, end])


# an imported instruct model's own chat template

CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are a lazy dog."},
    {"role": "user", "content": "The quick brown fox?"},
    {"role": "assistant", "content": "jumps over the lazy dog, twice."},
    {"role": "user", "content": "你好，世界！"},
]


def chatml_dir(bpe: Tokenizer, hf_dir: Path, *, template: str | list | None = CHATML, jinja_file: bool = True) -> Any:
    """A ChatML instruct model saved by transformers: `<s>`, `<|im_start|>`, `<|im_end|>` special tokens,
    bos_token `<s>`, eos_token and generation_config eos `<|im_end|>`. `template` as a string is saved the
    way transformers saves it (chat_template.jinja; `jinja_file=False`: in tokenizer_config.json), as a
    list it goes into tokenizer_config.json as is. Returns transformers' tokenizer, loaded from `hf_dir`."""
    raw = Tokenizer.from_str(bpe.to_str()).hf
    raw.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    end = raw.token_to_id("<|im_end|>")
    torch.manual_seed(0)
    model = _hf_llama(Tokenizer.from_str(raw.to_str()), bos_token_id=raw.token_to_id("<s>"), eos_token_id=end)
    model.generation_config = transformers.GenerationConfig(eos_token_id=end)
    model.save_pretrained(hf_dir)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|im_end|>")
    if isinstance(template, str):
        fast.chat_template = template
    fast.save_pretrained(hf_dir)
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(template, list) or (isinstance(template, str) and not jinja_file):
        (hf_dir / "chat_template.jinja").unlink(missing_ok=True)
        config["chat_template"] = template
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.mark.parametrize("where", ["jinja-file", "tokenizer-config", "named-list"])
def test_import_keeps_the_chat_template(where: str, bpe: Tokenizer, tmp_path: Path) -> None:
    """The template lands in the run's tokenizer_config.json, marked as HF Jinja, with the special-token
    strings it references; wherever transformers saved it."""
    template: Any = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    chatml_dir(
        bpe, tmp_path / "hf", template=CHATML if where != "named-list" else template, jinja_file=where == "jinja-file"
    )
    assert (tmp_path / "hf" / "chat_template.jinja").is_file() == (where == "jinja-file")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    config = json.loads((run / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHATML and config["lmforge_chat_template"] == "hf-jinja"
    assert config["bos_token"] == "<s>" and config["eos_token"] == "<|im_end|>"


def test_import_without_a_usable_chat_template(
    bpe: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No template: no tokenizer_config.json, as before. One that does not parse: a one-line note, no template."""
    chatml_dir(bpe, tmp_path / "none", template=None)
    assert not (import_hf(tmp_path / "none", tmp_path / "a") / "tokenizer_config.json").exists()
    chatml_dir(bpe, tmp_path / "bad", template="{% for m in messages %}{{ m['content'] }}", jinja_file=False)
    capsys.readouterr()  # (transformers' progress bars)
    assert not (import_hf(tmp_path / "bad", tmp_path / "b") / "tokenizer_config.json").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chat template does not parse" in err and "imported without it" in err


def test_export_of_an_imported_chat_model_keeps_its_template(bpe: Tokenizer, tmp_path: Path) -> None:
    """import -> export --to hf: transformers renders and encodes conversations as with the original directory
    (the template and its bos/eos strings go out unchanged, no lmforge marker handling); GGUF carries it too."""
    original = chatml_dir(bpe, tmp_path / "hf")
    out = export_hf(import_hf(tmp_path / "hf", tmp_path / "run"), tmp_path / "export")
    exported = transformers.AutoTokenizer.from_pretrained(str(out))
    assert exported.chat_template == CHATML
    for conversation, prompt in (
        (CONVERSATION, True),
        ([*CONVERSATION, {"role": "assistant", "content": "ok"}], False),
    ):
        want = original.apply_chat_template(
            conversation, add_generation_prompt=prompt, tokenize=True, return_dict=False
        )
        got = exported.apply_chat_template(conversation, add_generation_prompt=prompt, tokenize=True, return_dict=False)
        assert got == want
    bos = original.convert_tokens_to_ids("<s>")  # the template writes it, the tokenizer adds none: the BOS id is its
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == exported.bos_token_id == bos
    again = import_hf(out, tmp_path / "again")  # and back: the same template, bos and eos
    assert (again / "tokenizer_config.json").read_text() == (tmp_path / "run" / "tokenizer_config.json").read_text()
    gguf = pytest.importorskip("gguf")
    from lmforge.export.gguf import export_gguf

    fields = gguf.GGUFReader(str(export_gguf(tmp_path / "run", tmp_path / "m.gguf"))).fields
    assert fields["tokenizer.chat_template"].contents() == CHATML
    # llama.cpp renders {{ bos_token }} as the BOS id's text; the template writes it, so it is not added again
    assert fields["tokenizer.ggml.bos_token_id"].contents() == bos
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False


def test_export_of_an_imported_qwen_chat_model_keeps_its_config_eos(bpe: Tokenizer, tmp_path: Path) -> None:
    """Qwen2.5-Instruct's config.json names `<|im_end|>` as eos_token_id (transformers' default stop), while its
    tokenizer's end-of-text token, lmforge's eos, is `<|endoftext|>`: import -> export --to hf writes the
    original config.json's eos_token_id again (it wrote `<|endoftext|>`'s), generation_config.json both; a
    quantized copy and a second round trip keep it."""
    from lmforge.compress.quantize import quantize_run

    raw = Tokenizer.from_str(bpe.to_str()).hf
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = Tokenizer.from_str(raw.to_str())
    text_end, im_end = tok.eos_id, raw.token_to_id("<|im_end|>")
    assert text_end != im_end
    torch.manual_seed(0)
    model = _hf_qwen2(tok)
    model.config.bos_token_id, model.config.eos_token_id = text_end, im_end
    model.generation_config = transformers.GenerationConfig(bos_token_id=text_end, eos_token_id=[im_end, text_end])
    model.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    original = json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"]
    assert original == im_end  # (what transformers wrote)

    run = import_hf(tmp_path / "hf", tmp_path / "run")
    out = export_hf(run, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == original
    assert transformers.AutoConfig.from_pretrained(str(out)).eos_token_id == im_end
    assert sorted(transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id) == sorted([im_end, text_end])
    quantized = quantize_run(run, tmp_path / "int8", bits=8, compare=False)["out"]
    again = export_hf(import_hf(out, tmp_path / "run2"), tmp_path / "export2")
    for folder in (export_hf(quantized, tmp_path / "export-int8"), again):
        assert json.loads((folder / "config.json").read_text())["eos_token_id"] == im_end


def card_snippet(hf_dir: Path) -> str:
    """The Python usage example of the model card (README.md) that export wrote into `hf_dir`."""
    card = (hf_dir / "README.md").read_text(encoding="utf-8")
    return card.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("family", ["gpt", "bert", "electra"])
def test_the_model_cards_usage_example_runs_as_written(family: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """The card's example loaded `from_pretrained("<the export's last folder name>")`, which transformers looked
    up on the Hub (an OSError offline) unless one stood in the export's parent folder. It now names the folder as
    exported to (`--out exports/tiny-en`), and runs as written from where export ran."""
    from tests.test_export_bert import make_encoder_run
    from tests.test_finetune import make_base

    if family == "gpt":
        run = make_base(tmp_path, max_seq_len=64)
    else:
        run = make_encoder_run(tmp_path / "enc", train_wordpiece(TEXTS * 20, vocab_size=120), family)
    monkeypatch.chdir(tmp_path)
    export_hf(run, "exports/tiny-en")  # (as `lmforge export RUN --out exports/tiny-en` passes it)
    snippet = card_snippet(tmp_path / "exports" / "tiny-en")
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # (what a reader pastes)
    assert '"exports/tiny-en"' in snippet
    out = capsys.readouterr().out
    if family == "electra":  # (a mask of the tokens that look replaced)
        assert scope["replaced"].dtype == torch.bool and not out
    else:
        assert out.startswith("Once upon a time" if family == "gpt" else "[{'score'"), out
