"""The data card (card.md, card.json, length histogram PNG) and the tokenizer report, on real text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmforge.data.filters import guess_language
from lmforge.data.prepare import PrepareConfig, load_data_dir, prepare
from lmforge.data.shards import read_shard
from lmforge.errors import ConfigError
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import EXTRA_SPECIALS, train_unigram, train_wordpiece
from tests.conftest import run_cli, shakespeare_text
from tests.test_data_dedup import ZH
from tests.test_data_prepare import docs_by_split, write


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("card")
    english = shakespeare_text(40_000).split("\n\n")
    chinese = [ZH[i : i + 40] for i in range(0, len(ZH), 40)] * 3  # 3 copies: 2/3 are exact duplicates
    write(root / "in" / "en.txt", "\n\n".join(english))
    write(root / "in" / "zh.jsonl", "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in chinese) + "\n")
    write(root / "in" / "junk.txt", "Accept cookies\n\n" + "spam " * 50)
    cfg = PrepareConfig(
        inputs=[str(root / "in")], out=str(root / "out"), vocab_size=400, val_fraction=0.2, test_fraction=0.1,
        boilerplate=True, max_char_repetition=0.5,
    )  # fmt: skip
    return root / "out", prepare(cfg, progress=False)


def test_card_files_and_numbers(prepared: tuple[Path, dict]) -> None:
    out, m = prepared
    card = json.loads((out / "card.json").read_text(encoding="utf-8"))
    assert (out / "length_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [Path(s["path"]).name for s in card["sources"]] == ["en.txt", "junk.txt", "zh.jsonl"]
    steps = card["steps"]
    assert list(steps) == ["read", "cleaned", "filtered", "deduplicated"]
    assert steps["read"]["documents"] == m["documents"]["in"]
    assert steps["deduplicated"]["documents"] == m["documents"]["out"]
    assert steps["read"]["documents"] - steps["cleaned"]["documents"] == m["documents"]["removed"]["boilerplate"] == 1
    assert steps["cleaned"]["documents"] - steps["filtered"]["documents"] == 1  # the spam line
    assert card["removed"]["char_repetition"]["documents"] == 1
    assert card["removed"]["char_repetition"]["bytes"] == len(("spam " * 50).strip())
    assert card["removed"]["exact_dup"]["documents"] == m["documents"]["removed"]["exact_dup"] > 0
    assert steps["deduplicated"]["bytes"] == sum(s["bytes"] for s in m["splits"].values())
    assert {s: v["tokens"] for s, v in card["splits"].items()} == {s: v["tokens"] for s, v in m["splits"].items()}
    assert sum(card["length_histogram"].values()) == m["documents"]["out"]
    assert card["languages"] == m["languages"] and set(m["languages"]) >= {"en", "zh"}
    # top tokens: counted over the train shards, most frequent first
    train = [t for name in m["splits"]["train"]["shards"] for t in read_shard(out / name).tolist()]
    top = card["top_tokens"]
    assert top[0]["count"] == max(train.count(t) for t in set(train)) and top[0]["count"] == train.count(top[0]["id"])
    assert [t["count"] for t in top] == sorted((t["count"] for t in top), reverse=True)
    assert all(t["token"] for t in top)  # each shows its text (a Unigram "▁" was ''), a special its name
    md = (out / "card.md").read_text(encoding="utf-8")
    for needle in ("## Sources", "| deduplicated |", "| char_repetition | 1 |", "length_hist.png", "| zh |"):
        assert needle in md


def test_manifest_keys_scripts_rely_on(prepared: tuple[Path, dict]) -> None:
    out, m = prepared
    docs = m["documents"]
    assert set(docs) == {"in", "out", "removed"} and {"exact_dup", "near_dup"} <= set(docs["removed"])
    assert docs["in"] - sum(docs["removed"].values()) == docs["out"]
    for split in ("train", "val", "test"):
        assert {"documents", "tokens"} <= set(m["splits"][split])
        assert m["splits"][split]["documents"] > 0
    assert load_data_dir(out).manifest == m


def test_prepare_prints_one_summary_line(prepared: tuple[Path, dict], tmp_path: Path) -> None:
    """`lmforge prepare` printed nothing on success: now one line on stdout (the progress bars stay on stderr)."""
    from lmforge.data.card import summary_line

    out, m = prepared
    line = summary_line(m, "data/x")
    docs, splits = m["documents"], m["splits"]
    assert line.startswith(f"prepared data/x: {docs['out']:,} of {docs['in']:,} documents kept (")
    assert f"{docs['removed']['exact_dup']:,} exact_dup" in line and "1 boilerplate" in line and "removed)" in line
    tokens = " / ".join(f"{s} {splits[s]['tokens']:,}" for s in ("train", "val", "test"))
    assert f"; tokens {tokens}; bpe tokenizer, vocab 400" in line and "\n" not in line
    text = tmp_path / "t.txt"
    text.write_text(shakespeare_text(3000), encoding="utf-8")
    r = run_cli("prepare", str(text), "--out", str(tmp_path / "d"), "--tokenizer", "char", "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout == summary_line(load_data_dir(tmp_path / "d").manifest, str(tmp_path / "d")) + "\n"
    assert "documents kept; tokens train" in r.stdout and "char tokenizer" in r.stdout
    text.write_text("one line\nanother line\n", encoding="utf-8")  # (one document: train gets it, val and test none)
    r = run_cli("prepare", str(text), "--out", str(tmp_path / "tiny"), "--tokenizer", "char", "--quiet")
    assert r.returncode == 0 and r.stdout.count("\n") == 1, r.stdout
    assert "; val and test got no documents: 1 document in all" in r.stdout and "--val-input FILE" in r.stdout
    # a --vocab-size larger than the text can fill (bpe, wordpiece and unigram stop short alike) is said
    r = run_cli("prepare", str(text), "--out", str(tmp_path / "bpe"), "--quiet")
    vocab = load_data_dir(tmp_path / "bpe").manifest["tokenizer"]["vocab_size"]
    assert r.returncode == 0 and f"bpe tokenizer, vocab {vocab:,} (of --vocab-size 4,096: the text" in r.stdout
    assert "(of --vocab-size" not in summary_line(m, "data/x")  # (400 asked, 400 given)


def test_tokenizer_report(prepared: tuple[Path, dict]) -> None:
    out, m = prepared
    report = m["tokenizer"]["report"]
    assert report["split"] == "val"
    tok = load_data_dir(out).load_tokenizer()
    val = docs_by_split(out)["val"]
    by_lang: dict[str, list[int]] = {}
    for doc in val:
        entry = by_lang.setdefault(guess_language(doc), [0, 0])
        entry[0] += len(doc.encode("utf-8"))
        entry[1] += len(tok.encode(doc))
    for lang in ("en", "zh"):
        nbytes, tokens = by_lang[lang]
        assert report["bytes_per_token"][lang] == pytest.approx(nbytes / tokens, abs=1e-4)
    assert report["bytes_per_token"]["en"] > 1.5  # BPE merges English
    assert m["splits"]["val"]["tokens"] == sum(len(tok.encode(d)) + 1 for d in val)


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_wordpiece_and_unigram_through_prepare(tmp_path: Path, kind: str) -> None:
    write(tmp_path / "a.txt", shakespeare_text(20_000) + "\n\n" + ZH)
    m = prepare(
        PrepareConfig(inputs=[str(tmp_path / "a.txt")], out=str(tmp_path / "out"), tokenizer=kind, vocab_size=600),
        progress=False,
    )
    # Unigram stops short of vocab_size when the corpus has no more useful pieces
    assert (
        m["tokenizer"]["kind"] == kind and 500 < m["tokenizer"]["vocab_size"] <= 600 and m["tokenizer"]["eos_id"] == 0
    )
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    assert [tok.hf.token_to_id(t) for t in EXTRA_SPECIALS] == list(range(1, 8))
    docs = docs_by_split(tmp_path / "out")
    assert sum(len(d) for d in docs.values()) == m["documents"]["out"]
    if kind == "unigram":  # byte fallback: exact round trip, Chinese and emoji included
        assert ZH in docs["train"] + docs["val"] + docs["test"]
        text = "To be, or not to be 🎉 满纸荒唐言"
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_trainers_directly() -> None:
    texts = shakespeare_text(20_000).split("\n\n") + [ZH]
    wp = train_wordpiece(iter(texts), 300)
    ids = wp.encode("First Citizen: 天下大势")
    assert wp.decode(ids) == "First Citizen : 天 下 大 势"  # WordPiece: CJK one piece per character
    assert wp.id_to_token(8) == "[UNK]" and wp.token_bytes()[8] == 0  # special: no text bytes
    uni = train_unigram(iter(texts), 600)
    assert uni.decode(uni.encode("Citizen 天下")) == "Citizen 天下"
    assert train_unigram(iter(texts), 600).fingerprint == uni.fingerprint  # deterministic


def test_bpe_with_all_special_tokens(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", shakespeare_text(10_000))
    m = prepare(
        PrepareConfig(
            inputs=[str(tmp_path / "a.txt")], out=str(tmp_path / "out"), vocab_size=300, special_tokens="all"
        ),
        progress=False,
    )
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    assert m["tokenizer"]["eos_id"] == 0 and tok.hf.token_to_id("<|assistant|>") == 7
    assert tok.encode("<|mask|>") != [2]  # specials in text stay text


def test_top_tokens_show_a_unigram_word_start_and_specials():
    import numpy as np

    from lmforge.data.tokenizing import top_tokens
    from lmforge.tokenizer.train import train_unigram

    texts = ["the cat sat on the mat and the dog ran off " * 3] * 40
    tok = train_unigram(iter(texts), 300)
    ids = [i for t in texts for i in [*tok.encode(t), tok.eos_id]]
    shown = {t["id"]: t["token"] for t in top_tokens(tok, np.bincount(ids, minlength=tok.vocab_size))}
    assert shown[tok.eos_id] == "<|endoftext|>" and all(shown.values())
    assert shown[tok.hf.token_to_id("▁")] == " "  # the word-start mark alone (the commonest token): not ''


def test_a_character_only_wordpiece_vocabulary_is_noted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Below the corpus' characters and their ## forms WordPiece is refused (it made 183 ids for 100 asked),
    leaving nothing behind; at exactly that size it learns no longer piece: English then costs ~1 byte per token."""
    write(tmp_path / "a.txt", shakespeare_text(20_000) + "\n\n" + ZH)
    with pytest.raises(ConfigError, match=r"WordPiece --vocab-size 100 is too small for this corpus") as e:
        prepare(
            PrepareConfig(
                inputs=[str(tmp_path / "a.txt")], out=str(tmp_path / "o"), tokenizer="wordpiece", vocab_size=100
            ),
            progress=False,
        )
    assert "\n" not in str(e.value) and [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no output, no temp folder
    least = int(re.search(r"set --vocab-size (\d+) or more", str(e.value)).group(1))
    sizes, errs = {}, {}
    for asked in (least, 600):
        m = prepare(
            PrepareConfig(
                inputs=[str(tmp_path / "a.txt")],
                out=str(tmp_path / f"o{asked}"),
                tokenizer="wordpiece",
                vocab_size=asked,
            ),
            progress=False,
        )
        sizes[asked] = (m["tokenizer"]["vocab_size"], m["tokenizer"]["report"]["bytes_per_token"]["en"])
        errs[asked] = capsys.readouterr().err
        assert ("is all single characters" in errs[asked]) == (asked == least), errs[asked]
    assert sizes[least][0] == least and errs[least].count("\n") == 1
    assert sizes[least][1] < 1.3 < sizes[600][1]  # character-level English vs learned pieces


def test_notes_count_one_in_the_singular() -> None:
    """A file with one replaced byte was noted as '1 invalid UTF-8 sequences'; the count now agrees with its noun."""
    from lmforge.data.card import notes

    def inputs(**counts: int) -> dict:
        return {
            "inputs": [
                {"path": p, "invalid_utf8_replaced": n, "lone_surrogates_replaced": 0} for p, n in counts.items()
            ]
        }

    assert "note: a: 1 invalid UTF-8 sequence replaced with U+FFFD" in notes(inputs(a=1))[0]
    assert "note: a and 1 more file: 3 invalid UTF-8 sequences replaced" in notes(inputs(a=1, b=2))[0]
    one_surrogate = {"inputs": [{"path": "p.jsonl", "invalid_utf8_replaced": 1, "lone_surrogates_replaced": 1}]}
    assert [n[:43] for n in notes(one_surrogate)] == ["note: p.jsonl: 1 lone surrogate escaped in "]


def test_small_shards_are_noted_with_the_context_they_serve() -> None:
    """prepare --shard-tokens 64 was accepted without a word; pretraining at a longer context then found no
    window (a window never crosses a shard). Shards below 1M tokens are now noted, naming the longest context."""
    from lmforge.data.card import notes

    def manifest(shard_tokens: int, n_shards: int) -> dict:
        shards = [f"train-{i:05}.bin" for i in range(n_shards)]
        return {"inputs": [], "config": {"shard_tokens": shard_tokens}, "splits": {"train": {"shards": shards}}}

    (note,) = notes(manifest(64, 3))
    assert note.startswith("note: --shard-tokens 64 cut the train split into 3 shards") and "\n" not in note
    assert "--data.seq_len 63 at most" in note
    assert notes(manifest(64, 1)) == notes(manifest(50_000_000, 3)) == []  # one shard, or large ones: no note
