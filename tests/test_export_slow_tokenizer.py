"""`lmforge import` of HF directories that ship only slow tokenizer files (export/slow_tokenizer.py):
GPT-2's vocab.json + merges.txt and BERT's vocab.txt, against references that do not share our code.

References: for GPT-2, the BPE of OpenAI's encoder.py written out below (transformers 5 no longer has a
Python GPT-2 tokenizer) and transformers' GPT2Tokenizer loading the same files; for BERT, transformers'
Python `BertTokenizerLegacy` and its `BertTokenizer`. transformers 5's save_pretrained writes tokenizer.json
only, so the slow files are written as older transformers wrote them: vocab.json/merges.txt/vocab.txt by
`tokenizers`' model.save (the same format), the JSON side files by hand. No network; tiny random models.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import torch
from tokenizers import models, normalizers, pre_tokenizers, trainers

from lmforge.data.masking import special_ids
from lmforge.errors import CheckpointError
from lmforge.export.hf import export_hf
from lmforge.export.hf_import import import_hf, read_hf_tokenizer
from lmforge.generate import generate, generate_from_checkpoint
from lmforge.tokenizer.tokenizer import bytes_to_unicode
from lmforge.trained import load_trained
from tests.conftest import run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")  # transformers' own dependency; GPT-2's split pattern needs \p{L}

TEXTS = [
    "The quick brown fox jumps over the lazy dog, twice.",
    "敏捷的棕色狐狸跳过了懒狗。你好，世界！",
    "Café naïve façade, ÀÉÎÕÜ and Ünïcödé; emoji 🦊🎉.",
    "  leading, inner   runs\tof\t\twhitespace\n\nand trailing   ",
    "it's we'll they've 12345 3.14 $5!",
]
SPECIAL_TEXT = "one<|endoftext|>two <|pad|> three"
CONTEXT = 32
# Both sides float32 on the same CPU; test_export.py measured 0.0 for GPT-2 and test_export_bert.py ~5e-7 for BERT.
TOL = dict(atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# GPT-2: vocab.json + merges.txt


GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def openai_bpe(text: str, vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str]) -> list[int]:
    """GPT-2's encoder.py (Radford et al. 2019) as the slow GPT2Tokenizer ported it: added tokens cut out
    first, then each regex piece's bytes as table characters, merging the lowest-ranked pair everywhere."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    table = bytes_to_unicode()
    ids: list[int] = []
    pattern = "(" + "|".join(regex.escape(s) for s in specials) + ")"
    for part in regex.split(pattern, text):
        if part in specials:
            ids.append(vocab[part])
            continue
        for piece in GPT2_SPLIT.findall(part):
            word = [table[b] for b in piece.encode("utf-8")]
            while len(word) > 1:
                best = min(zip(word, word[1:], strict=False), key=lambda pair: ranks.get(pair, math.inf))
                if best not in ranks:
                    break
                merged, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            ids += [vocab[token] for token in word]
    return ids


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2's layout, small: the 256 byte tokens and merges, then `<|endoftext|>` as the last vocab.json id."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator([f"{t} {i}" for i in range(30) for t in TEXTS], trainer=trainer)
    root = tmp_path_factory.mktemp("gpt2-files")
    hf.model.save(str(root))  # vocab.json and merges.txt (with its "#version: 0.2" line), as GPT-2 ships them
    vocab = json.loads((root / "vocab.json").read_text(encoding="utf-8"))
    vocab["<|endoftext|>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    assert (root / "merges.txt").read_text(encoding="utf-8").startswith("#version")
    return root


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def gpt2_dir(files: Path, root: Path, **tokenizer_config: Any) -> tuple[Path, Any]:
    """A GPT-2 fine-tune as older transformers saved it: a tiny GPT2LMHeadModel, the slow files, a pad token
    added after the vocabulary (added_tokens.json), and the special-token files (eos as AddedToken's dict)."""
    hf_dir = root / "hf"
    hf_dir.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(files / name, hf_dir / name)
    eot = len(json.loads((files / "vocab.json").read_text(encoding="utf-8"))) - 1
    write_json(hf_dir / "added_tokens.json", {"<|pad|>": eot + 1})
    write_json(
        hf_dir / "special_tokens_map.json",
        {
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|pad|>",
        },
    )
    eos = {
        "__type": "AddedToken",
        "content": "<|endoftext|>",
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
        "single_word": False,
    }
    write_json(
        hf_dir / "tokenizer_config.json",
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": CONTEXT, "eos_token": eos} | tokenizer_config,
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=eot + 2,
        n_positions=CONTEXT,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function="gelu",
        bos_token_id=eot,
        eos_token_id=eot,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases away from 0, so the import keeps them (an all-zero set means bias-free)
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(hf_dir)
    assert not (hf_dir / "tokenizer.json").exists()
    return hf_dir, model


def with_tokenizer_json(hf_dir: Path, out: Path) -> Path:
    """The same directory with the tokenizer.json transformers' fast tokenizer writes from the slow files."""
    shutil.copytree(hf_dir, out)
    transformers.AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(out))
    assert (out / "tokenizer.json").is_file()
    return out


def test_gpt2_slow_files_import_like_transformers(gpt2_files: Path, tmp_path: Path) -> None:
    hf_dir, model = gpt2_dir(gpt2_files, tmp_path)
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (hf_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]]
    eot, pad = vocab["<|endoftext|>"], len(vocab)
    theirs = transformers.GPT2Tokenizer.from_pretrained(str(hf_dir))
    run = import_hf(hf_dir, tmp_path / "run")
    ours = load_trained(run, torch.device("cpu"))
    tok = ours.tokenizer
    assert (tok.eos_id, tok.vocab_size, tok.hf.token_to_id("<|pad|>")) == (eot, len(vocab) + 1, pad)
    assert tok.prompt_prefix == []  # no add_bos_token
    for text in [*TEXTS, SPECIAL_TEXT]:
        reference = openai_bpe(text, vocab | {"<|pad|>": pad}, merges, ["<|endoftext|>", "<|pad|>"])
        assert tok.encode_markup(text).ids == reference == theirs(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(TEXTS[0]) == openai_bpe(TEXTS[0], vocab, merges, ["<|endoftext|>"])
    assert eot not in tok.encode(SPECIAL_TEXT)  # lmforge's encode reads special-token strings as text
    assert tok.decode([*tok.encode("a b"), eot, pad], skip_special_tokens=True) == "a b"

    # the same directory with a tokenizer.json imports to the same ids and the same model
    fast = import_hf(with_tokenizer_json(hf_dir, tmp_path / "hf-fast"), tmp_path / "run-fast")
    again = load_trained(fast, torch.device("cpu"))
    assert all(again.tokenizer.encode_markup(t).ids == tok.encode_markup(t).ids for t in [*TEXTS, SPECIAL_TEXT])
    assert again.tokenizer.eos_id == eot
    idx = torch.randint(0, len(vocab) + 1, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours.model(idx)
        assert torch.equal(logits, again.model(idx))
        torch.testing.assert_close(logits, model(idx).logits, **TOL)

    # generate: greedy continuation equals transformers'; export writes a tokenizer.json that transformers reads
    prompt = "The quick"
    ids = theirs(prompt)["input_ids"]
    assert tok.encode(prompt) == ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, pad_token_id=pad)[0, len(ids) :]
    assert generate(ours.model, ids, max_new_tokens=8, temperature=0) == out.tolist()
    text = generate_from_checkpoint(run, prompt=prompt, max_new_tokens=8, temperature=0, stop_at_eos=False)
    # (the text holds back a last character whose bytes are not all there, as streamed output does)
    assert text and theirs.decode(out.tolist()).startswith(text)
    exported = export_hf(run, tmp_path / "export")
    assert (exported / "tokenizer.json").is_file()
    reread = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert all(reread(t)["input_ids"] == theirs(t)["input_ids"] for t in TEXTS)  # (it sets split_special_tokens)


def test_gpt2_prefix_space_and_bos_from_tokenizer_config(gpt2_files: Path, tmp_path: Path) -> None:
    """tokenizer_config.json's add_prefix_space and add_bos_token change the tokenizer as in transformers;
    lmforge's prompts then start with the bos id (`Tokenizer.prompt_prefix`)."""
    hf_dir, _ = gpt2_dir(gpt2_files, tmp_path, add_prefix_space=True, add_bos_token=True)
    theirs = transformers.GPT2Tokenizer.from_pretrained(str(hf_dir))
    tok, path = read_hf_tokenizer(hf_dir)
    assert path == hf_dir / "vocab.json"
    framed = tokenizers.Tokenizer.from_str(tok.to_str())  # a plain copy: encodes as transformers does
    for text in TEXTS:
        assert framed.encode(text).ids == theirs(text)["input_ids"], text
    assert tok.encode("fox")[0] == tok.hf.token_to_id("Ġfox")  # the prefix space
    assert tok.prompt_prefix == [tok.eos_id]  # <|endoftext|> is GPT-2's bos too


def test_added_tokens_decoder_and_additional_special_tokens(gpt2_files: Path, tmp_path: Path) -> None:
    """transformers >= 4.34 lists added tokens in tokenizer_config.json `added_tokens_decoder`, with their
    own `special` flag: a non-special one (a chat marker) is matched in text even by lmforge's `encode`;
    `additional_special_tokens` the vocabulary lacks are appended after the added ones, as transformers does."""
    hf_dir, _ = gpt2_dir(gpt2_files, tmp_path)
    pad = len(json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8")))
    config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "normalized": False}
    decoder = {  # as transformers >= 4.34 saves it: every added token, the vocabulary's own included
        str(pad - 1): {"content": "<|endoftext|>", "special": True, **flags},
        str(pad): {"content": "<|pad|>", "special": True, **flags},
        str(pad + 1): {"content": "<|user|>", "special": False, **flags},
    }
    config |= {"added_tokens_decoder": decoder, "additional_special_tokens": ["<|system|>"]}
    write_json(hf_dir / "tokenizer_config.json", config)
    theirs = transformers.GPT2Tokenizer.from_pretrained(str(hf_dir))
    tok, _ = read_hf_tokenizer(hf_dir)
    assert [tok.hf.token_to_id(t) for t in ("<|pad|>", "<|user|>", "<|system|>")] == [pad, pad + 1, pad + 2]
    assert len(theirs) == tok.vocab_size == pad + 3
    text = "<|system|>be brief<|user|>hello<|endoftext|>"
    assert tok.encode_markup(text).ids == theirs(text)["input_ids"]
    assert pad + 1 in tok.encode(text) and pad + 2 not in tok.encode(text)  # only the special one is read as text
    assert tok.decode(tok.encode_markup(text).ids, skip_special_tokens=True) == "be brief<|user|>hello"


def test_finetune_starts_from_a_slow_gpt2_directory(gpt2_files: Path, tmp_path: Path) -> None:
    from lmforge.finetune import FinetuneConfig, finetune

    hf_dir, _ = gpt2_dir(gpt2_files, tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4), encoding="utf-8")
    overrides = {"train": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0, "log_every": 1}, "eval": {"every": 0}}
    out = tmp_path / "ft"
    finetune(hf_dir, train_file=data, out=out, cfg=FinetuneConfig(task="clm"), overrides=overrides, progress=False)
    base, tuned = (load_trained(run, torch.device("cpu")) for run in (out / "base", out))
    assert tuned.tokenizer.fingerprint == base.tokenizer.fingerprint and tuned.tokenizer.eos_id == base.tokenizer.eos_id
    before, after = base.model.state_dict(), tuned.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


# --------------------------------------------------------------------------------------------
# BERT: vocab.txt

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uncased BERT vocab.txt: the specials first, then pieces and "##" continuations."""
    hf = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=BERT_SPECIALS, show_progress=False)
    hf.train_from_iterator([f"{t} {i}" for i in range(30) for t in TEXTS], trainer=trainer)
    root = tmp_path_factory.mktemp("bert-vocab")
    hf.model.save(str(root))
    return root / "vocab.txt"


def bert_dir(vocab_txt: Path, hf_dir: Path, tokenizer_config: dict[str, Any] | None) -> Any:
    """An older BERT directory: a tiny BertForMaskedLM, vocab.txt and (when given) tokenizer_config.json."""
    hf_dir.mkdir(parents=True)
    shutil.copy(vocab_txt, hf_dir / "vocab.txt")
    if tokenizer_config is not None:
        write_json(hf_dir / "tokenizer_config.json", tokenizer_config)
    vocab_size = len(vocab_txt.read_text(encoding="utf-8").splitlines())
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=CONTEXT,
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    model.save_pretrained(hf_dir)
    return model


@pytest.mark.parametrize(
    "config",
    [None, {"do_lower_case": False}, {"do_lower_case": True, "strip_accents": False}],
    ids=["uncased-default", "cased", "lower-keep-accents"],
)
def test_bert_vocab_txt_imports_like_transformers(
    config: dict[str, Any] | None, bert_vocab: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    hf_dir = tmp_path / "hf"
    model = bert_dir(bert_vocab, hf_dir, config)
    slow = transformers.BertTokenizerLegacy(str(hf_dir / "vocab.txt"), **(config or {}))
    fast = transformers.BertTokenizer.from_pretrained(str(hf_dir))
    texts = [*TEXTS, "[CLS] a [MASK] fox [SEP]", "Ünïcödé ÀÉÎ"]

    tok, _ = read_hf_tokenizer(hf_dir)  # as converted, with BertTokenizerFast's [CLS] A [SEP] framing
    framed = tokenizers.Tokenizer.from_str(tok.to_str())
    for text in texts:
        assert framed.encode(text).ids == slow(text)["input_ids"] == fast(text)["input_ids"], text
    assert framed.encode("a", "b").ids == slow("a", "b")["input_ids"] == fast("a", "b")["input_ids"]
    assert tok.decode(tok.encode("the lazy dog, twice.")) == "the lazy dog, twice."

    capsys.readouterr()
    run = import_hf(hf_dir, tmp_path / "run")
    assert "no nsp_head, pooler weights" in capsys.readouterr().err  # a BertForMaskedLM, as in test_export_bert
    ours = load_trained(run, torch.device("cpu"))
    ids = [slow.convert_tokens_to_ids(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")]
    assert list(special_ids(ours.tokenizer).all) == ids and special_ids(ours.tokenizer).added == 0
    assert ours.tokenizer.eos_id == slow.sep_token_id
    for text in texts:  # the run frames input itself (import drops the post-processor), so compare without it
        assert ours.tokenizer.encode_markup(text).ids == slow(text, add_special_tokens=False)["input_ids"], text

    # logits: as transformers', and as the import of the same directory with a tokenizer.json
    fast_run = import_hf(with_tokenizer_json(hf_dir, tmp_path / "hf-fast"), tmp_path / "run-fast")
    again = load_trained(fast_run, torch.device("cpu"))
    assert all(again.tokenizer.encode_markup(t).ids == ours.tokenizer.encode_markup(t).ids for t in texts)
    idx = torch.randint(0, ours.model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours.model.mlm_logits(ours.model(idx))
        assert torch.equal(logits, again.model.mlm_logits(again.model(idx)))
        torch.testing.assert_close(logits, model(input_ids=idx).logits, **TOL)

    exported = export_hf(run, tmp_path / "export")  # a tokenizer.json again, framing as BertTokenizerFast
    reread = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert all(reread(t)["input_ids"] == slow(t)["input_ids"] for t in texts)


# --------------------------------------------------------------------------------------------
# refusals: one line, naming the file and what to do


def damage(hf_dir: Path, case: str) -> str:
    """Damage a slow-tokenizer directory in one way; returns what the error must say."""
    vocab_json = hf_dir / "vocab.json"
    if case == "vocab-json-list":
        vocab_json.write_text('["a", "b"]', encoding="utf-8")
        return "vocab.json is not a non-empty JSON object of token strings to integer ids"
    if case == "vocab-json-str-values":
        write_json(vocab_json, {"a": "0"})
        return "vocab.json is not a non-empty JSON object of token strings to integer ids"
    if case == "vocab-json-gap":
        vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        write_json(vocab_json, vocab | {"<|endoftext|>": len(vocab) + 5})
        return f"vocab.json ids are not 0..{len(vocab) - 1}, each once (id {len(vocab) - 1} is missing)"
    if case == "vocab-json-truncated":
        vocab_json.write_text(vocab_json.read_text(encoding="utf-8")[:50], encoding="utf-8")
        return "vocab.json is not valid JSON"
    merges = hf_dir / "merges.txt"
    lines = merges.read_text(encoding="utf-8").splitlines()
    if case == "merges-three-tokens":
        merges.write_text("\n".join([*lines[:3], "Ġ t he", *lines[3:]]) + "\n", encoding="utf-8")
        return "merges.txt line 4 is not two tokens separated by one space ('Ġ t he')"
    if case == "merges-unknown-token":
        merges.write_text("\n".join([*lines, "Ġzz qq"]) + "\n", encoding="utf-8")
        return f"merges.txt line {len(lines) + 1} ('Ġzz qq') needs 'Ġzz', which vocab.json lacks"
    if case == "added-id-conflict":
        write_json(hf_dir / "added_tokens.json", {"<|pad|>": 7})
        return "added token '<|pad|>' has id 7, but the vocabulary puts it at"
    if case == "sentencepiece-only":
        for name in ("vocab.json", "merges.txt", "added_tokens.json"):
            (hf_dir / name).unlink()
        (hf_dir / "tokenizer.model").write_bytes(b"\x0a\x05<unk>")
        return "has no tokenizer.json, only a sentencepiece tokenizer.model, which lmforge does not read"
    if case == "no-tokenizer":
        for name in ("vocab.json", "merges.txt"):
            (hf_dir / name).unlink()
        return "has no tokenizer.json (nor GPT-2's vocab.json + merges.txt, nor BERT's vocab.txt)"
    assert case == "roberta-class"
    config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    write_json(hf_dir / "tokenizer_config.json", config | {"tokenizer_class": "RobertaTokenizer"})
    return "lmforge converts only GPT-2's and BERT's slow tokenizer files, not RobertaTokenizer's"


GPT2_DAMAGE = [
    "vocab-json-list",
    "vocab-json-str-values",
    "vocab-json-gap",
    "vocab-json-truncated",
    "merges-three-tokens",
    "merges-unknown-token",
    "added-id-conflict",
    "sentencepiece-only",
    "no-tokenizer",
    "roberta-class",
]


@pytest.mark.parametrize("case", GPT2_DAMAGE)
def test_bad_gpt2_tokenizer_files_are_one_line_errors(case: str, gpt2_files: Path, tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_files / name, hf_dir / name)
    write_json(hf_dir / "added_tokens.json", {"<|pad|>": len(json.loads((hf_dir / "vocab.json").read_text()))})
    write_json(hf_dir / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer"})
    read_hf_tokenizer(hf_dir)  # fine before the damage
    expected = damage(hf_dir, case)
    with pytest.raises(CheckpointError) as excinfo:
        read_hf_tokenizer(hf_dir)
    message = str(excinfo.value)
    assert "\n" not in message and expected in message, message
    assert message.endswith(
        "save the fast tokenizer there (AutoTokenizer.from_pretrained(...).save_pretrained(dir)) and retry"
    )


@pytest.mark.parametrize("case", ["empty", "blank-lines", "repeated", "no-unk", "no-cls"])
def test_bad_bert_vocab_txt_is_a_one_line_error(case: str, bert_vocab: Path, tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    lines = bert_vocab.read_text(encoding="utf-8").splitlines()
    text, expected = {
        "empty": ("", "vocab.txt is empty"),
        "blank-lines": ("\n\n", "vocab.txt line 2 repeats ''"),
        "repeated": ("\n".join([*lines, lines[7]]) + "\n", f"vocab.txt line {len(lines) + 1} repeats {lines[7]!r}"),
        "no-unk": ("\n".join(t for t in lines if t != "[UNK]") + "\n", "has no unknown token '[UNK]'"),
        "no-cls": ("\n".join(t for t in lines if t != "[CLS]") + "\n", "name no cls_token in the vocabulary"),
    }[case]
    (hf_dir / "vocab.txt").write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError) as excinfo:
        read_hf_tokenizer(hf_dir)
    message = str(excinfo.value)
    assert "\n" not in message and expected in message and str(hf_dir) in message, message
    assert "save_pretrained(dir)) and retry" in message


def test_cli_refuses_a_sentencepiece_only_directory(tmp_path: Path) -> None:
    hf_dir = tmp_path / "llama"
    hf_dir.mkdir()
    write_json(hf_dir / "config.json", {"model_type": "llama"})
    (hf_dir / "tokenizer.model").write_bytes(b"\x0a\x05<unk>")
    result = run_cli("import", str(hf_dir), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"lmforge: error: {hf_dir} has no tokenizer.json, only a sentencepiece tokenizer.model, which lmforge does "
        "not read; save the fast tokenizer there (AutoTokenizer.from_pretrained(...).save_pretrained(dir)) and retry"
    ]
    assert not (tmp_path / "run").exists()
