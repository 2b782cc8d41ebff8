"""`prepare` end to end on generated files: formats, cleaning counts, dedup, split, atomicity, errors."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.clean import clean_text, decode_utf8, legacy_encoding, length_verdict, looks_binary
from lmforge.data.ingest import resolve_inputs
from lmforge.data.prepare import REMOVED_KEYS, PrepareConfig, load_data_dir, prepare
from lmforge.data.shards import read_shard
from lmforge.data.split import assign_split, bucket, doc_digest
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.tokenizer.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
CHINESE = "满纸荒唐言，一把辛酸泪！都云作者痴，谁解其中味？"


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for i in range(n)]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = text.encode("utf-8") if isinstance(text, str) else text
        path.write_bytes(gzip.compress(data, mtime=0))
    elif isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def run(tmp_path: Path, inputs: list[Path | str], out: str = "out", **kwargs: object) -> dict:
    kwargs.setdefault("vocab_size", 300)
    cfg = PrepareConfig(inputs=[str(p) for p in inputs], out=str(tmp_path / out), **kwargs)
    return prepare(cfg, progress=False)


def docs_by_split(out: Path) -> dict[str, list[str]]:
    """Decode each split's shards back into documents (cut at EOS)."""
    data = load_data_dir(out)
    tok = data.load_tokenizer()
    result = {}
    for split in ("train", "val", "test"):
        tokens = np.concatenate([read_shard(p) for p in data.split_shards(split)] or [np.zeros(0, np.uint16)])
        assert len(tokens) == 0 or tokens[-1] == tok.eos_id
        cuts = np.flatnonzero(tokens == tok.eos_id)
        starts = np.concatenate([[0], cuts[:-1] + 1])[: len(cuts)]
        result[split] = [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, cuts, strict=True)]
    return result


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder with every format: paragraphs, markdown, nested folders, JSONL, gzip, a skipped file."""
    root = tmp_path / "corpus"
    paras = sentences(60, seed=1)
    write(root / "a.txt", "\n\n".join(paras[:30]) + "\n")
    write(root / "notes.md", "# Title\n\n" + "\n\n".join(paras[30:40]))
    write(root / "sub" / "deeper" / "b.txt.gz", "\n\n".join(paras[40:50]))
    lines = [json.dumps({"body": p, "id": i}, ensure_ascii=False) for i, p in enumerate(paras[50:60])]
    write(root / "sub" / "c.jsonl", "\n".join(lines) + "\n")
    write(root / "sub" / "d.jsonl.gz", json.dumps({"body": CHINESE}, ensure_ascii=False) + "\n")
    write(root / "ignored.log", "a,b\n1,2\n")
    write(root / ".hidden" / "e.txt", "hidden folders are not searched")
    return root


def test_reads_every_format(tmp_path: Path, corpus: Path) -> None:
    m = run(tmp_path, [corpus], text_field="body", val_fraction=0.0, test_fraction=0.0)
    # 30 + (1 title + 10) + 10 paragraphs, 10 + 1 JSONL records
    assert m["documents"] == {
        "in": 62,
        "out": 62,
        "removed": {key: 0 for key in REMOVED_KEYS},
    }
    assert list(m["documents"]["removed"])[:2] == ["exact_dup", "near_dup"]
    # sorted by path string: "sub/d.jsonl.gz" < "sub/deeper/b.txt.gz"
    assert [Path(i["path"]).name for i in m["inputs"]] == ["a.txt", "notes.md", "c.jsonl", "d.jsonl.gz", "b.txt.gz"]
    assert [i["documents"] for i in m["inputs"]] == [30, 11, 10, 1, 10]
    assert all(i["bytes"] == Path(i["path"]).stat().st_size for i in m["inputs"])
    assert m["skipped_files"] == [str(corpus / "ignored.log")]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "card.json", "card.md", "length_hist.png", "manifest.json", "tokenizer.json", "train-00000.bin"
    ]  # fmt: skip
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == m
    train = docs_by_split(out)["train"]
    assert CHINESE in train and "# Title" in train and sentences(60, seed=1)[45] in train


def test_manifest_layout(tmp_path: Path, corpus: Path) -> None:
    m = run(tmp_path, [corpus], text_field="body", val_fraction=0.2, test_fraction=0.2)
    assert m["format_version"] == 1 and m["lmforge_version"] and m["created"]
    assert m["config"]["text_field"] == "body" and m["config"]["vocab_size"] == 300
    assert m["tokenizer"]["kind"] == "bpe" and m["tokenizer"]["vocab_size"] == 300 and m["tokenizer"]["eos_id"] == 0
    assert m["tokenizer"]["sha256"] == Tokenizer.load(tmp_path / "out" / "tokenizer.json").fingerprint
    assert m["dtype"] == "uint16"
    assert set(m["cleaning"]) == {
        "invalid_utf8_replaced",
        "documents_with_invalid_utf8",
        "control_chars_removed",
        "normalized_documents",
        "whitespace_normalized_documents",
        "boilerplate_lines_removed",
    }
    docs = docs_by_split(tmp_path / "out")
    for split, info in m["splits"].items():
        assert set(info) == {"documents", "tokens", "bytes", "shards"}
        assert info["documents"] == len(docs[split]) > 0
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in docs[split])
        assert info["tokens"] == sum(len(read_shard(tmp_path / "out" / s)) for s in info["shards"])
    assert sum(s["documents"] for s in m["splits"].values()) == m["documents"]["out"]


def test_glob_and_explicit_file(tmp_path: Path, corpus: Path) -> None:
    m = run(tmp_path, [str(corpus / "**" / "*.txt*"), corpus / "ignored.log"], val_fraction=0, test_fraction=0)
    assert [Path(i["path"]).name for i in m["inputs"]] == ["a.txt", "ignored.log", "b.txt.gz"]
    assert m["documents"]["in"] == 30 + 10 + 1  # the explicitly named .log is read as text
    with pytest.raises(DataError, match="matches no files"):
        run(tmp_path, [str(tmp_path / "nothing" / "*.txt")], out="out2")


def test_cleaning_counts(tmp_path: Path) -> None:
    bad = b"first paragraph is fine\n\n" + b"bad \xff\xfe bytes and a real \xef\xbf\xbd here\n\n"
    bad += b"ctrl\x08 chars\x07 and\x1b [esc] and\r\nwindows\r\n\n"  # (a NUL byte would mean binary)
    bad += "cafe\u0301 needs NFC\n\n".encode()  # e + combining accent -> é
    bad += b"x\n\n" + b"  \x01\x02  \n\n" + b"short\n\n"
    path = write(tmp_path / "messy.txt", bad)
    jsonl = write(tmp_path / "messy.jsonl", '{"text": "nul\\u0000 inside JSON and a lone \\ud800 surrogate"}\n')
    m = run(tmp_path, [path, jsonl], min_chars=3, val_fraction=0, test_fraction=0)
    assert m["cleaning"] == {
        "invalid_utf8_replaced": 2 + 1,  # \xff and \xfe (the literal U+FFFD is not counted); the surrogate
        "documents_with_invalid_utf8": 2,
        "control_chars_removed": 3 + 2 + 1,  # \x08 \x07 \x1b, \x01 \x02, JSON's \u0000; \r\n is a newline
        "normalized_documents": 1,
        "whitespace_normalized_documents": 0,
        "boilerplate_lines_removed": 0,
    }
    assert m["documents"]["in"] == 8
    assert m["documents"]["removed"] == {key: int(key in ("empty", "too_short")) for key in REMOVED_KEYS}
    train = docs_by_split(tmp_path / "out")["train"]
    assert "bad \ufffd\ufffd bytes and a real \ufffd here" in train
    assert "ctrl chars and [esc] and\nwindows" in train
    assert "café needs NFC" in train and "short" in train
    assert "nul inside JSON and a lone \ufffd surrogate" in train


def test_dedup(tmp_path: Path) -> None:
    para = sentences(5, seed=2)
    write(tmp_path / "in" / "a.txt", "\n\n".join(para + para[:2]))
    write(tmp_path / "in" / "b.jsonl", "\n".join(json.dumps({"text": p + "  "}) for p in para[:3]))  # dup after strip
    m = run(tmp_path, [tmp_path / "in"], val_fraction=0, test_fraction=0)
    assert m["documents"]["in"] == 10 and m["documents"]["out"] == 5
    assert m["documents"]["removed"]["exact_dup"] == 5
    assert sorted(docs_by_split(tmp_path / "out")["train"]) == sorted(para)
    m = run(tmp_path, [tmp_path / "in"], out="nodedup", dedup="none", val_fraction=0, test_fraction=0)
    assert m["documents"]["out"] == 10 and m["documents"]["removed"]["exact_dup"] == 0


def test_doc_units(tmp_path: Path) -> None:
    path = write(tmp_path / "t.txt", "line one\nline two\n\n\nline three\n")
    assert run(tmp_path, [path], out="p", val_fraction=0, test_fraction=0)["documents"]["in"] == 2
    assert run(tmp_path, [path], out="l", doc_unit="line", val_fraction=0, test_fraction=0)["documents"]["in"] == 3
    assert run(tmp_path, [path], out="f", doc_unit="file", val_fraction=0, test_fraction=0)["documents"]["in"] == 1
    assert docs_by_split(tmp_path / "f")["train"] == ["line one\nline two\n\n\nline three"]


def test_split_is_by_hash(tmp_path: Path) -> None:
    paras = sentences(200, seed=3)
    write(tmp_path / "a.txt", "\n\n".join(paras))
    run(tmp_path, [tmp_path / "a.txt"], val_fraction=0.2, test_fraction=0.1)
    docs = docs_by_split(tmp_path / "out")
    for split, texts in docs.items():
        for text in texts:
            assert assign_split(doc_digest(text), val_fraction=0.2, test_fraction=0.1) == split
    assert 10 < len(docs["test"]) < 35 and 25 < len(docs["val"]) < 60  # ~20 and ~40 of 200
    assert bucket(b"\x00" * 8) == 0.0 and bucket(b"\x80" + bytes(7)) == 0.5


def test_same_input_same_output(tmp_path: Path, corpus: Path) -> None:
    a = run(tmp_path, [corpus], out="a", text_field="body", val_fraction=0.2, test_fraction=0.2)
    b = run(tmp_path, [corpus], out="b", text_field="body", val_fraction=0.2, test_fraction=0.2)
    for m in (a, b):
        del m["created"], m["config"]["out"]
    assert a == b
    for name in ["tokenizer.json"] + [s for info in a["splits"].values() for s in info["shards"]]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_adding_a_file_keeps_old_documents_in_their_split(tmp_path: Path) -> None:
    old = write(tmp_path / "in" / "old.txt", "\n\n".join(sentences(150, seed=4)))
    run(tmp_path, [tmp_path / "in"], out="before", val_fraction=0.2, test_fraction=0.2)
    write(tmp_path / "in" / "new.txt", "\n\n".join(sentences(150, seed=5)))
    run(tmp_path, [tmp_path / "in"], out="after", val_fraction=0.2, test_fraction=0.2)
    before = {d: s for s, docs in docs_by_split(tmp_path / "before").items() for d in docs}
    after = {d: s for s, docs in docs_by_split(tmp_path / "after").items() for d in docs}
    assert len(before) == 150 and len(after) > 150
    assert all(after[d] == s for d, s in before.items())
    assert set(before.values()) == {"train", "val", "test"}
    assert old.exists()


def test_val_and_test_inputs(tmp_path: Path) -> None:
    paras = sentences(100, seed=6)
    write(tmp_path / "train.txt", "\n\n".join(paras))
    write(tmp_path / "val.txt", "\n\n".join(["val only one", paras[0], paras[1]]))  # 2 overlap with train
    write(tmp_path / "test.jsonl", "\n".join(json.dumps({"text": t}) for t in ["test only", paras[2], "val only one"]))
    m = run(
        tmp_path,
        [tmp_path / "train.txt"],
        val_input=[str(tmp_path / "val.txt")],
        test_input=[str(tmp_path / "test.jsonl")],
        val_fraction=0.3,
        test_fraction=0.3,
    )
    docs = docs_by_split(tmp_path / "out")
    assert sorted(docs["val"]) == sorted(["val only one", paras[0], paras[1]])
    assert sorted(docs["test"]) == sorted(["test only", paras[2]])  # "val only one" is a dup of a val doc
    assert sorted(docs["train"]) == sorted(paras[3:])  # no hash split into val/test, no eval leak
    assert m["documents"]["removed"]["overlap_with_eval"] == 3
    assert m["documents"]["removed"]["exact_dup"] == 1
    assert [i["role"] for i in m["inputs"]] == ["val", "test", "auto"]


def test_no_training_data_besides_eval_inputs_says_why(tmp_path: Path) -> None:
    """Both said 'all N documents went to val/test ...; lower --val-fraction/--test-fraction', which no
    fraction fixes: the inputs were the evaluation file itself, or a copy of it."""
    write(tmp_path / "val.txt", "held out\n\nalso held out")
    write(tmp_path / "copy.txt", "held out\r\n\r\nalso held out\r\n")
    with pytest.raises(DataError, match=r"every input is also a --val-input/--test-input file"):
        run(tmp_path, [tmp_path / "val.txt"], val_input=[str(tmp_path / "val.txt")])
    with pytest.raises(DataError, match=r"none to train; 2 more were removed as copies of --val-input"):
        run(tmp_path, [tmp_path / "copy.txt"], val_input=[str(tmp_path / "val.txt")])
    # one file as both eval splits: every document went to val and test silently held none
    with pytest.raises(DataError, match=r"val.txt is given as both --val-input and --test-input; give each"):
        run(tmp_path, [tmp_path / "copy.txt"], val_input=[str(tmp_path / "val.txt")], test_input=[str(tmp_path)])
    assert not (tmp_path / "out").exists()


def test_an_eval_input_that_gives_no_documents_is_one_line(tmp_path: Path) -> None:
    """An empty --val-input (or a --test-input whose every document is a copy of a val one) was prepared with
    no such split, silently: the run then trained without evaluation."""
    write(tmp_path / "train.txt", "\n\n".join(sentences(30, seed=5)))
    write(tmp_path / "empty.txt", "\n\n \n")
    write(tmp_path / "val.txt", "held out")
    with pytest.raises(DataError, match=r"--val-input .*empty.txt gave no val documents \(empty, or every one"):
        run(tmp_path, [tmp_path / "train.txt"], val_input=[str(tmp_path / "empty.txt")])
    write(tmp_path / "copy.txt", "held out\r\n")
    with pytest.raises(DataError, match=r"--test-input .*copy.txt gave no test documents"):
        run(
            tmp_path,
            [tmp_path / "train.txt"],
            val_input=[str(tmp_path / "val.txt")],
            test_input=[str(tmp_path / "copy.txt")],
        )
    assert not (tmp_path / "out").exists()


def test_val_input_only_keeps_hash_test_split(tmp_path: Path) -> None:
    paras = sentences(100, seed=7)
    write(tmp_path / "train.txt", "\n\n".join(paras))
    write(tmp_path / "val.txt", "held out")
    run(tmp_path, [tmp_path / "train.txt"], val_input=[str(tmp_path / "val.txt")], val_fraction=0.3, test_fraction=0.2)
    docs = docs_by_split(tmp_path / "out")
    assert docs["val"] == ["held out"]
    expected_test = [p for p in paras if assign_split(doc_digest(p), val_fraction=0.3, test_fraction=0.2) == "test"]
    assert sorted(docs["test"]) == sorted(expected_test) and expected_test


@pytest.mark.parametrize("tokenizer", ["bpe", "char"])
def test_chinese_round_trips_through_shards(tmp_path: Path, tokenizer: str) -> None:
    texts = [CHINESE, "mixed 中文 English 👩‍💻🎉 and\ttabs", "天下大势，分久必合，合久必分。"] + sentences(20, seed=8)
    write(tmp_path / "zh.txt", "\n\n".join(texts))
    m = run(tmp_path, [tmp_path / "zh.txt"], tokenizer=tokenizer, val_fraction=0, test_fraction=0)
    assert m["tokenizer"]["kind"] == tokenizer
    assert sorted(docs_by_split(tmp_path / "out")["train"]) == sorted(texts)


@pytest.mark.parametrize("tokenizer", ["bpe", "unigram"])
def test_a_long_document_trains_the_tokenizer_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: str
) -> None:
    """HF's trainers held ~120 bytes per character of one document (3.6 GB for a 30 MB one-line file); a
    document is fed in pieces of about PIECE_CHARS characters cut between words: the same tokenizer."""
    from lmforge.data import tokenizing
    from lmforge.tokenizer import fast_encode

    write(tmp_path / "one.txt", " ".join(sentences(300, seed=10)) + "\n\n" + "\n\n".join(sentences(20, seed=11)))
    kwargs = {"val_fraction": 0, "test_fraction": 0, "tokenizer": tokenizer, "vocab_size": 400}
    whole = run(tmp_path, [tmp_path / "one.txt"], out="whole", **kwargs)
    monkeypatch.setattr(fast_encode, "PIECE_CHARS", 500)
    seen: list[str] = []
    name = f"train_{tokenizer}"
    train = getattr(tokenizing, name)
    monkeypatch.setattr(tokenizing, name, lambda texts, *a, **k: train(seen.extend(texts) or seen, *a, **k))
    pieces = run(tmp_path, [tmp_path / "one.txt"], out="pieces", **kwargs)
    assert len(seen) > 20 and max(map(len, seen)) < 1000  # the long document went in pieces
    # (not WordPiece: HF trains it differently from run to run on one input)
    assert (tmp_path / "pieces" / "tokenizer.json").read_text() == (tmp_path / "whole" / "tokenizer.json").read_text()
    assert pieces["splits"] == whole["splits"]


@pytest.mark.parametrize("tokenizer", ["bpe", "unigram"])
def test_tokenizer_trains_on_a_sample_of_the_chinese_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: str
) -> None:
    """Chinese clauses are BPE words of their own, nearly all distinct: HF's trainer held ~50 bytes per byte
    of them (570 MB for 5 MB of Hong Lou Meng, 1 GiB asked ~50 GB; Unigram ~500). Beyond UNSPACED_SAMPLE_BYTES
    of them the trainer gets a hash sample of the Chinese documents; every English one still."""
    from lmforge.data import tokenizing

    rng = random.Random(4)
    han = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳"
    chinese = ["，".join("".join(rng.choice(han) for _ in range(10)) for _ in range(6)) for _ in range(100)]
    english = sentences(100, seed=9)
    write(tmp_path / "a.jsonl", "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chinese + english))
    monkeypatch.setitem(tokenizing.UNSPACED_SAMPLE_BYTES, tokenizer, 6_000)  # of ~19 kB of Chinese
    seen: list[str] = []
    name = f"train_{tokenizer}"
    train = getattr(tokenizing, name)
    monkeypatch.setattr(tokenizing, name, lambda texts, *a, **k: train(seen.extend(texts) or seen, *a, **k))
    m = run(tmp_path, [tmp_path / "a.jsonl"], val_fraction=0, test_fraction=0, tokenizer=tokenizer, vocab_size=400)
    fed = sum(len(t.encode("utf-8")) for t in seen if t in chinese)
    assert 3_000 < fed < 10_000 and sorted(t for t in seen if t not in chinese) == sorted(english)
    assert m["splits"]["train"]["documents"] == 200  # (every document is still encoded)


@pytest.mark.parametrize("tokenizer", ["bpe", "char", "wordpiece", "unigram"])
def test_nfkc_tokenizer_normalizes_later_text_as_the_training_text(tmp_path: Path, tokenizer: str) -> None:
    # NFKC turns the full-width ，！？ of the training text into , ! ?; a Chinese prompt or fine-tuning file
    # typed with ，！？ must be encoded as the model saw them (not as unseen bytes, nor WordPiece's [UNK])
    write(tmp_path / "zh.txt", "\n\n".join([CHINESE, "天下大势，分久必合，合久必分。"] + sentences(20, seed=8)))
    run(tmp_path, [tmp_path / "zh.txt"], tokenizer=tokenizer, normalize="NFKC", vocab_size=700)
    tok = load_data_dir(tmp_path / "out").load_tokenizer()
    assert tok.encode(CHINESE) == tok.encode("满纸荒唐言,一把辛酸泪!都云作者痴,谁解其中味?")
    run(tmp_path, [tmp_path / "zh.txt"], out="nfc", tokenizer=tokenizer, vocab_size=700)
    assert json.loads(load_data_dir(tmp_path / "nfc").load_tokenizer().to_str())["normalizer"] in (None, {}) or (
        tokenizer == "wordpiece"  # (its BertNormalizer spaces out CJK characters)
    )


def test_a_given_nfkc_tokenizer_cleans_the_text_as_it_reads_it(tmp_path: Path) -> None:
    """A part prepared with another part's NFKC tokenizer.json (README: Parts) and the default --normalize NFC:
    the same shards, but its byte counts kept the 3-byte ，！ the tokens hold as 1-byte , !, so one text got
    two bits-per-byte values (and its documents were hashed into splits as other text)."""
    texts = [CHINESE, "天下大势，分久必合，合久必分。"] + [f"第{i}回，宝玉笑道：“好！”" for i in range(30)]
    write(tmp_path / "zh.txt", "\n\n".join(texts))
    first = run(tmp_path, [tmp_path / "zh.txt"], tokenizer="char", normalize="NFKC")
    again = run(tmp_path, [tmp_path / "zh.txt"], out="part", tokenizer=str(tmp_path / "out" / "tokenizer.json"))
    assert again["config"]["normalize"] == "NFKC"
    assert again["splits"] == first["splits"]
    assert again["tokenizer"]["report"] == first["tokenizer"]["report"]


def test_existing_tokenizer_file_and_multiple_shards(tmp_path: Path, corpus: Path) -> None:
    first = run(tmp_path, [corpus], text_field="body", val_fraction=0, test_fraction=0)
    m = run(
        tmp_path,
        [corpus],
        out="again",
        text_field="body",
        tokenizer=str(tmp_path / "out" / "tokenizer.json"),
        shard_tokens=100,
        val_fraction=0,
        test_fraction=0,
    )
    assert m["tokenizer"]["kind"] == "bpe" and m["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
    assert m["splits"]["train"]["tokens"] == first["splits"]["train"]["tokens"]
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 2 and shards[:2] == ["train-00000.bin", "train-00001.bin"]
    assert sorted(docs_by_split(tmp_path / "again")["train"]) == sorted(docs_by_split(tmp_path / "out")["train"])


def test_empty_split_has_no_shards(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "\n\n".join(sentences(10, seed=9)))
    m = run(tmp_path, [tmp_path / "a.txt"], val_fraction=0, test_fraction=0)
    assert m["splits"]["val"] == {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}
    assert load_data_dir(tmp_path / "out").split_shards("val") == []


def assert_nothing_written(tmp_path: Path, out: str = "out") -> None:
    assert not (tmp_path / out).exists()
    assert not (tmp_path / f"{out}.tmp").exists()


def test_binary_file_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "in" / "a.txt", "good text\n\nmore")
    write(tmp_path / "in" / "z.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(DataError, match=r"z\.txt looks like a binary file, not text; remove it from the inputs"):
        run(tmp_path, [tmp_path / "in"])
    assert_nothing_written(tmp_path)
    random_bytes = bytes(random.Random(0).randrange(128, 256) for _ in range(4000))  # invalid UTF-8, no NUL
    write(tmp_path / "in" / "z.txt", random_bytes)
    with pytest.raises(DataError, match="binary"):
        run(tmp_path, [tmp_path / "in"])
    assert_nothing_written(tmp_path)
    # Chinese text in GBK is not binary: the error says which encoding it reads as and how to convert it
    write(tmp_path / "in" / "z.txt", (CHINESE * 20).encode("gbk"))
    with pytest.raises(DataError, match=r"z\.txt is not UTF-8: it reads as GB18030 .* iconv -f GB18030 -t UTF-8"):
        run(tmp_path, [tmp_path / "in"])
    assert_nothing_written(tmp_path)
    # traditional Chinese in Big5 also decodes as GB18030 (as rare ideographs and kana): it is told apart,
    # and the converted file keeps its format's suffix
    (tmp_path / "in" / "z.txt").unlink()
    write(
        tmp_path / "in" / "z.csv",
        ("text\n" + "機器學習很好。今天天氣不錯。我們一起去公園散步吧。\n" * 20).encode("big5"),
    )
    with pytest.raises(DataError, match=r"reads as BIG5 .* iconv -f BIG5 -t UTF-8 '.*z\.csv' > '.*z\.utf8\.csv'"):
        run(tmp_path, [tmp_path / "in"])
    assert_nothing_written(tmp_path)
    (tmp_path / "in" / "z.csv").unlink()
    # Big5 as files and iconv have it holds the ETEN extension (裏 is F9D8), which Python's strict "big5"
    # codec lacks: such a file was named GB18030, and iconv -f GB18030 turned it into mojibake
    write(tmp_path / "in" / "z.txt", ("風吹裏外，歸去來兮。山高水長，明月何時照我還。\n" * 20).encode("cp950"))
    with pytest.raises(DataError, match=r"reads as BIG5 .* iconv -f BIG5 -t UTF-8"):
        run(tmp_path, [tmp_path / "in"])
    assert_nothing_written(tmp_path)
    (tmp_path / "in" / "z.txt").unlink()
    # a compressed one is decompressed into iconv: `iconv ... 'z.txt.gz' > 'z.txt.utf8.gz'` failed on the gzip bytes
    write(tmp_path / "in" / "z.txt.gz", (CHINESE * 20).encode("gbk"))
    with pytest.raises(DataError, match=r"e\.g\. zcat '.*z\.txt\.gz' \| iconv -f GB18030 -t UTF-8 > '.*z\.utf8\.txt'$"):
        run(tmp_path, [tmp_path / "in"])
    assert_nothing_written(tmp_path)
    (tmp_path / "in" / "z.txt.gz").unlink()
    # Japanese in Shift-JIS reads as GB18030 too (its kana as rare ideographs), and iconv -f GB18030 made mojibake
    write(
        tmp_path / "in" / "z.txt",
        ("むかしむかし、あるところにおじいさんとおばあさんが住んでいました。\n" * 20).encode("shift_jis"),
    )
    with pytest.raises(DataError, match=r"reads as SHIFT_JIS .* iconv -f SHIFT_JIS -t UTF-8"):
        run(tmp_path, [tmp_path / "in"])
    (tmp_path / "in" / "z.txt").unlink()
    # UTF-16 (Windows "Unicode" text) is text too: with a byte-order mark, and little-endian without one
    for data, source in [
        ((CHINESE * 20).encode("utf-16"), "UTF-16"),
        ("plain text\n".encode("utf-16-le"), "UTF-16LE"),
        ((CHINESE * 20).encode("utf-16-be"), "UTF-16BE"),  # was "looks like a binary file": Chinese has no NULs
    ]:
        write(tmp_path / "in" / "z.txt", data * 10)
        with pytest.raises(DataError, match=rf"z\.txt is UTF-16 text, not UTF-8; .* iconv -f {source} -t UTF-8"):
            run(tmp_path, [tmp_path / "in"])
        assert_nothing_written(tmp_path)


def test_utf8_text_with_a_nul_byte_is_not_called_utf16(tmp_path: Path) -> None:
    # two ASCII letters read as one UTF-16 code unit are a CJK ideograph (b"te" -> U+6574), so a UTF-8 file
    # with one stray NUL was "UTF-16 text" and the advice (iconv -f UTF-16LE) turned it into Chinese mojibake;
    # then "a binary file"; now the NUL is a control character, deleted and counted
    write(tmp_path / "in" / "z.csv", b"text\nhello\x00world. the quick brown fox jumps\n")
    manifest = run(tmp_path, [tmp_path / "in"], val_fraction=0.0, test_fraction=0.0)
    assert manifest["cleaning"]["control_chars_removed"] == 1 and manifest["documents"]["out"] == 1


def test_a_stray_nul_near_the_start_is_deleted_as_it_is_further_in(tmp_path: Path) -> None:
    """One NUL in the first 8 KB of a text file made it "a binary file, not text; remove it from the inputs",
    while the same NUL further in was deleted and counted as a control character. Now both are deleted and
    counted, and the shards are those of the text without it; a file of many NULs is still binary."""
    text = "\n\n".join(sentences(300, seed=3))  # past the 8 KB looks_binary reads
    write(tmp_path / "clean" / "a.txt", text)
    write(tmp_path / "early" / "a.txt", text[:5] + "\x00" + text[5:])
    write(tmp_path / "late" / "a.txt", text[:-5] + "\x00" + text[-5:])
    shards = {}
    for name in ("clean", "early", "late"):
        manifest = run(tmp_path, [tmp_path / name / "a.txt"], out=f"out-{name}")
        assert manifest["cleaning"]["control_chars_removed"] == (name != "clean"), name
        shards[name] = (tmp_path / f"out-{name}" / "train-00000.bin").read_bytes()
    assert shards["early"] == shards["late"] == shards["clean"]
    write(tmp_path / "many" / "a.txt", "\x00" * 200 + text)  # (a tar archive's header: hundreds)
    with pytest.raises(DataError, match=r"a\.txt looks like a binary file, not text"):
        run(tmp_path, [tmp_path / "many" / "a.txt"], out="out-many")


KOREAN = (
    "오늘은 날씨가 정말 좋습니다. 우리는 공원에 가서 산책을 했습니다.\n한국어로 된 글을 처리하는 것은 재미있습니다.\n"
)


def test_korean_euc_kr_is_named_euc_kr(tmp_path: Path) -> None:
    # GB18030 reads each EUC-KR syllable as a common GB2312 ideograph: Korean was named GB18030, and
    # converting as told made Chinese mojibake
    write(tmp_path / "in" / "z.txt", (KOREAN * 10).encode("euc_kr"))
    with pytest.raises(DataError, match=r"z\.txt is not UTF-8: it reads as EUC-KR .* iconv -f EUC-KR -t UTF-8") as e:
        run(tmp_path, [tmp_path / "in"])
    assert_nothing_written(tmp_path)
    if shutil.which("iconv"):  # the advice works as given (glibc's iconv knows EUC-KR, not EUC_KR)
        source = str(e.value).split("iconv -f ")[1].split()[0]
        converted = subprocess.run(
            ["iconv", "-f", source, "-t", "UTF-8", str(tmp_path / "in" / "z.txt")], capture_output=True
        )
        assert converted.returncode == 0 and converted.stdout.decode() == KOREAN * 10
    hanja = "서울은 大韓民國의 수도입니다. " + KOREAN * 2  # 4 Hanja in 105 letters
    assert legacy_encoding(hanja.encode("euc_kr")) == "EUC-KR"
    # simplified Chinese decodes as EUC-KR too (both are 2-byte EUC), about half its ideographs as Hangul:
    # it stays GB18030, short texts included, even ones that read as Hangul throughout ("对不起，好的。")
    chapter = (Path(__file__).parent / "data" / "hongloumeng_ch1.txt").read_text(encoding="utf-8")
    for chinese in ["今天天气很好。", "中华人民共和国", "对不起，好的。", CHINESE * 20, chapter]:
        assert legacy_encoding(chinese.encode("gb18030")[:8192]) == "GB18030", chinese[:10]


def test_windows_extensions_of_shift_jis_and_euc_kr_are_named_so_iconv_converts_them(tmp_path: Path) -> None:
    """① (NEC row 13) is only in CP932, 똠 only in CP949: Python's strict codecs and iconv's SHIFT_JIS / EUC-KR
    refuse or garble them, so such a file was named GB18030 (mojibake when converted as told)."""
    japanese = "①これは日本語のテキストです。カタカナも含みます。\n" * 5
    korean = "똠방각하. " + KOREAN * 3
    for text, codec, name in [(japanese, "cp932", "CP932"), (korean, "cp949", "CP949")]:
        data = text.encode(codec)
        assert legacy_encoding(data) == name
        if shutil.which("iconv"):
            path = tmp_path / f"{name}.txt"
            path.write_bytes(data)
            converted = subprocess.run(["iconv", "-f", name, "-t", "UTF-8", str(path)], capture_output=True)
            assert converted.returncode == 0 and converted.stdout.decode() == text
    # plain Shift-JIS and EUC-KR keep their names
    assert legacy_encoding(japanese.replace("①", "").encode("shift_jis")) == "SHIFT_JIS"
    assert legacy_encoding((KOREAN * 3).encode("euc_kr")) == "EUC-KR"


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        run(tmp_path, [tmp_path / "nope.txt"])
    assert_nothing_written(tmp_path)


def test_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", '{"text": "ok"}\n\n{"text": "fine"}\n{broken\n')
    with pytest.raises(DataError, match=r"a\.jsonl:4: not valid JSON") as e:
        run(tmp_path, [tmp_path / "a.jsonl"])
    assert "\n" not in str(e.value)
    assert_nothing_written(tmp_path)
    write(
        tmp_path / "a.jsonl", '{"content": "ok"}\n{"content": "x"}\n'
    )  # (one row without it: tests/test_data_formats.py)
    with pytest.raises(
        DataError, match=r"a\.jsonl:1: no field 'text' \(keys: content\), nor has any other row.*--text"
    ):
        run(tmp_path, [tmp_path / "a.jsonl"])
    with pytest.raises(DataError, match=r"a\.jsonl:1: .*--text-field"):
        run(tmp_path, [tmp_path / "a.jsonl"], text_field="id")
    assert_nothing_written(tmp_path)


def test_no_documents(tmp_path: Path) -> None:
    write(tmp_path / "blank.txt", "   \n\n\x00"[:-1])
    write(tmp_path / "ws.jsonl", json.dumps({"text": "  \t "}) + "\n")
    with pytest.raises(DataError, match="no documents"):
        run(tmp_path, [tmp_path / "blank.txt", tmp_path / "ws.jsonl"])
    assert_nothing_written(tmp_path)


def test_existing_output(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "\n\n".join(sentences(10, seed=10)))
    run(tmp_path, [tmp_path / "a.txt"])
    with pytest.raises(DataError, match="--overwrite"):
        run(tmp_path, [tmp_path / "a.txt"])
    write(tmp_path / "a.txt", "\n\n".join(sentences(12, seed=11)))
    m = run(tmp_path, [tmp_path / "a.txt"], overwrite=True)
    assert m["documents"]["in"] == 12 and load_data_dir(tmp_path / "out").manifest == m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]
    # --overwrite never deletes a folder that is not a prepared data directory
    write(tmp_path / "precious" / "thesis.txt", "do not delete")
    with pytest.raises(DataError, match="not a prepared data directory"):
        run(tmp_path, [tmp_path / "a.txt"], out="precious", overwrite=True)
    assert (tmp_path / "precious" / "thesis.txt").exists()
    # an --out below a file: refused before reading (it was "[Errno 17] File exists" after the read)
    with pytest.raises(DataError, match=r"cannot make --out .*a\.txt/sub/out: .*a\.txt is a file, not a folder"):
        run(tmp_path, [tmp_path / "a.txt"], out="a.txt/sub/out")


def test_overwrite_keeps_a_run_inside_the_data(tmp_path: Path) -> None:
    """A run trained into the data folder (`pretrain --data out --out out/run`, from before pretrain refused it) was
    deleted, checkpoints and all, by `prepare --out out --overwrite`; that is refused in one line, and nothing goes."""
    write(tmp_path / "a.txt", "\n\n".join(sentences(10, seed=10)))
    run(tmp_path, [tmp_path / "a.txt"])
    run_dir = tmp_path / "out" / "runs" / "r1"
    write(run_dir / "config.json", "{}")
    write(run_dir / "metrics.jsonl", '{"step": 1, "loss": 3.0}\n')
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(DataError, match=r"holds the training run .*r1, which --overwrite would delete; move it out"):
        run(tmp_path, [tmp_path / "a.txt"], overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before and (run_dir / "metrics.jsonl").is_file()


def test_out_may_not_be_or_hold_an_input(tmp_path: Path) -> None:
    """--overwrite replaces --out: an input that is it or lies inside it would be deleted."""
    write(tmp_path / "a.txt", "hello there\n\ngeneral kenobi")
    run(tmp_path, [tmp_path / "a.txt"])
    extra = write(tmp_path / "out" / "extra.txt", "more text\n\nand more")
    for inputs, what in (([extra], "file"), ([tmp_path / "out"], "directory")):
        with pytest.raises(LmforgeError, match=f"overlaps the {what} being read"):
            run(tmp_path, inputs, overwrite=True)
    assert extra.is_file()
    with pytest.raises(LmforgeError, match="overlaps the file being read"):  # (it said "the directory")
        run(tmp_path, [tmp_path / "a.txt"], out="a.txt", overwrite=True)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "hello there\n\ngeneral kenobi"
    write(tmp_path / "texts" / "b.txt", "hello there\n\ngeneral kenobi")
    run(tmp_path, [tmp_path / "texts"], out="texts/prepared")  # --out inside an input folder is fine
    with pytest.raises(LmforgeError, match="overlaps the directory being read"):  # merging into a part
        run(tmp_path, [tmp_path / "out"], out="out", merge=True, overwrite=True, vocab_size=4096)


def test_folder_walk_follows_links_and_refuses_dangling_ones(tmp_path: Path) -> None:
    """A linked folder inside an input folder is read (os.walk skipped it silently), a link loop is walked
    once, and a link to nothing is a one-line error naming it (it was '[Errno 2] ...' from a stat)."""
    write(tmp_path / "books" / "b.txt", "a book")
    write(tmp_path / "corpus" / "a.txt", "a text")
    (tmp_path / "corpus" / "books").symlink_to(tmp_path / "books", target_is_directory=True)
    (tmp_path / "corpus" / "loop").symlink_to(tmp_path / "corpus", target_is_directory=True)
    files, skipped = resolve_inputs([str(tmp_path / "corpus")])
    assert files == [tmp_path / "corpus" / "a.txt", tmp_path / "corpus" / "books" / "b.txt"] and skipped == []
    (tmp_path / "corpus" / "gone.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(DataError, match=r"gone\.txt is a symbolic link to .*missing\.txt, which does not exist"):
        run(tmp_path, [tmp_path / "corpus"])
    with pytest.raises(DataError, match=r"gone\.txt is a symbolic link"):  # a glob listed it and skipped it
        run(tmp_path, [str(tmp_path / "corpus" / "*.txt")])
    assert not (tmp_path / "out").exists()


def test_a_pipe_or_fifo_input_is_refused_in_one_line(tmp_path: Path) -> None:
    """A named FIFO (given, or found in a folder) made prepare wait forever for a writer, and a shell pipe
    (`prepare <(zcat x.gz)`, a /dev/fd path) failed with '[Errno 29] Illegal seek ... re-create the file';
    both are refused up front, saying to save the text to a file."""
    import os

    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(DataError, match=r"fifo\.txt is a pipe or device, not a file: .* save the text to a file"):
        resolve_inputs([str(tmp_path / "fifo.txt")])
    write(tmp_path / "corpus" / "a.txt", "a text")
    os.mkfifo(tmp_path / "corpus" / "b.txt")
    with pytest.raises(DataError, match=r"b\.txt is a pipe or device"):
        resolve_inputs([str(tmp_path / "corpus")])
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"hello there\n\ngeneral kenobi\n")
        os.close(write_end)
        with pytest.raises(DataError, match=rf"/dev/fd/{read_end} is a pipe or device, not a file"):
            run(tmp_path, [f"/dev/fd/{read_end}"])
    finally:
        os.close(read_end)
    assert not (tmp_path / "out").exists()


def test_stdin_as_input_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prepare -` said "input '-' does not exist; check the path": it says that prepare reads files, not stdin,
    and to save the text to a file first; a file named '-' is still read."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^input '-': prepare reads files, not stdin .*save the text to a file first"):
        resolve_inputs(["-"])
    write(tmp_path / "-", "a text")
    assert [p.name for p in resolve_inputs(["-"])[0]] == ["-"]


def test_out_inside_an_input_folder_is_not_read_back(tmp_path: Path) -> None:
    """A re-run with --out inside the input folder reads the same documents, not the last run's
    card.md (nor anything in lmforge's hidden build/backup folders beside --out)."""
    write(tmp_path / "texts" / "b.txt", "\n\n".join(sentences(40, 1)))
    first = run(tmp_path, [tmp_path / "texts"], out="texts/prepared")
    assert (tmp_path / "texts" / "prepared" / "card.md").is_file()
    write(tmp_path / "texts" / ".prepared.lmforge-old-1234abcd" / "card.md", "# stale backup\n\nold card")
    for inputs in ([tmp_path / "texts"], [str(tmp_path / "texts" / "**" / "*.md"), tmp_path / "texts"]):
        again = run(tmp_path, inputs, out="texts/prepared", overwrite=True)
        assert again["documents"] == first["documents"]
    # another lmforge output inside the input folder (an earlier --out, a run) is not text either
    write(tmp_path / "texts" / "runs" / "r" / "config.json", "{}")
    write(tmp_path / "texts" / "runs" / "r" / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n')
    other = run(tmp_path, [tmp_path / "texts"], out="texts/prepared2")
    assert other["documents"] == first["documents"]
    assert [Path(i["path"]).name for i in other["inputs"]] == ["b.txt"]


def test_under_out_compares_whole_names() -> None:
    """`_under_out` compares path text (a 100,000-file walk spent half its time in Path.parents): a sibling whose
    name merely starts with --out's (`out2`, `.out2.lmforge-tmp-1`) is not inside it."""
    from lmforge.data.ingest import _under_out

    out = Path("/data/out")
    inside = ["/data/out", "/data/out/card.md", "/data/.out.lmforge-tmp-1a/x.txt", "/data/.out.lmforge-old-2b/a/b"]
    outside = ["/data/out2/a.txt", "/data/outer.txt", "/data/.out2.lmforge-tmp-1/x.txt", "/other/.out.lmforge-tmp-1/x"]
    assert all(_under_out(Path(p), out) for p in inside)
    assert not any(_under_out(Path(p), out) for p in outside)
    assert _under_out(Path("/a.txt"), Path("/"))


def test_users_out_tmp_is_not_lmforges(tmp_path: Path) -> None:
    """`out.tmp` may be the user's own folder: prepare neither builds in it nor deletes it."""
    write(tmp_path / "a.txt", "hello there\n\ngeneral kenobi")
    write(tmp_path / "out.tmp" / "notes.txt", "precious")
    run(tmp_path, [tmp_path / "a.txt"])
    run(tmp_path, [tmp_path / "a.txt"], overwrite=True)
    assert (tmp_path / "out.tmp" / "notes.txt").read_text(encoding="utf-8") == "precious"
    assert not (tmp_path / "out" / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".lmforge-" in p.name]  # no build folder left behind


def test_load_data_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"is not a prepared data directory \(no manifest.json\); run 'lmforge prepare"):
        load_data_dir(tmp_path / "nothing")
    # a text file, a run and a folder of text: the advice is not "prepare ... --out THAT_PATH" (it would
    # name a text file or a run as the output)
    write(tmp_path / "raw" / "t.txt", "some text")
    write(tmp_path / "run" / "config.json", "{}")
    for path, said in [("raw/t.txt", "is a file"), ("run", "is a run or model directory"), ("raw", "prepare its text")]:
        with pytest.raises(DataError, match=said) as e:
            load_data_dir(tmp_path / path)
        assert f"--out {tmp_path / path}" not in str(e.value)
    write(tmp_path / "a.txt", "\n\n".join(sentences(40, seed=12)))
    run(tmp_path, [tmp_path / "a.txt"], val_fraction=0.3, test_fraction=0)
    out = tmp_path / "out"
    data = load_data_dir(out)
    assert data.split_shards("train") == [out / "train-00000.bin"] and data.tokenizer_path == out / "tokenizer.json"
    with pytest.raises(DataError, match="no split 'dev'"):
        data.split_shards("dev")

    manifest = (out / "manifest.json").read_text(encoding="utf-8")
    (out / "manifest.json").write_text(manifest.replace('"format_version": 1', '"format_version": 9'), encoding="utf-8")
    with pytest.raises(DataError, match="format_version 9"):
        load_data_dir(out)
    (out / "manifest.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(DataError, match="unreadable"):
        load_data_dir(out)
    (out / "manifest.json").write_text(manifest, encoding="utf-8")
    (out / "val-00000.bin").write_bytes((out / "val-00000.bin").read_bytes()[:-4])
    with pytest.raises(DataError, match="truncated"):
        load_data_dir(out)
    (out / "val-00000.bin").unlink()
    with pytest.raises(DataError, match=r"val-00000\.bin is missing"):
        load_data_dir(out)


def test_config_validation() -> None:
    ok = {"inputs": ["x"], "out": "o"}
    for bad, match in [
        # each message names the flag the user typed (--val-fraction), not the config field (val_fraction)
        ({"val_fraction": 1.0}, r"--val-fraction must be in \[0, 1\)"),
        ({"test_fraction": -0.1}, r"--test-fraction must be in \[0, 1\)"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"--val-fraction \+ --test-fraction must be < 1"),
        ({"vocab_size": 200}, "257"),
        ({"doc_unit": "sentence"}, "--doc-unit must be one of"),
        ({"normalize": "NFD"}, "--normalize must be one of"),
        ({"shard_tokens": 0}, "--shard-tokens must be >= 64"),
        ({"min_chars": -1}, "--min-chars must be >= 0"),
        ({"max_chars": -1}, "--max-chars must be >= 0"),
        ({"workers": 0}, "--workers must be >= 1"),
        ({"max_line_bytes": 0}, "--max-line-bytes must be > 0"),
        ({"max_invalid_utf8": 2.0}, r"--max-invalid-utf8 must be in \[0, 1\]"),
        ({"text_field": ""}, "--text-field must not be empty"),
        ({"tokenizer": ""}, "--tokenizer must be"),
        ({"special_tokens": "some"}, "--special-tokens must be"),
        ({"inputs": []}, "at least one input"),
        ({"out": ""}, "--out"),
    ]:
        with pytest.raises(ConfigError, match=match):
            PrepareConfig(**{**ok, **bad})
    assert PrepareConfig(**ok, tokenizer="char", vocab_size=10).vocab_size == 10  # vocab_size is for bpe only


def test_clean_functions() -> None:
    assert decode_utf8(b"ok \xef\xbf\xbd") == ("ok \ufffd", 0)
    assert decode_utf8(b"\xe4\xb8") == ("\ufffd", 1)  # truncated multi-byte character
    cleaned = clean_text("\ufeff a\r\nb\rc\x85d\x7f\u200de\t ", "NFC")
    assert cleaned.text == "a\nb\nc\nd\u200de"  # ZWJ (Cf) kept; NEL a line break; DEL and the BOM removed
    assert cleaned.control_chars_removed == 2 and not cleaned.normalized
    assert clean_text("ﬁ", "NFKC").text == "fi" and clean_text("ﬁ", "none").text == "ﬁ"
    assert [length_verdict(t, 3) for t in ("", "ab", "abc")] == ["empty", "too_short", "ok"]
    assert looks_binary(b"abc\x00\x00\x00def") and not looks_binary("满纸荒唐言".encode() * 1000)
    assert not looks_binary(b"abc\x00def " + b"text " * 100) and looks_binary(b"abc\x00def" * 1000)  # 1 NUL vs. many
    assert not looks_binary("latin-1 caf\xe9 text is mostly valid".encode("latin-1"))
    assert not looks_binary("满".encode()[:2])  # a character cut at the sniff boundary


def test_line_break_controls_become_newlines(tmp_path: Path) -> None:
    """VT, FF, NEL, U+2028 and U+2029 are line breaks: deleting them (Cc) or keeping them joined words or left odd
    line ends ("foo\x0cbar" was "foobar"). Each is "\n" now, then --normalize-whitespace applies as to any "\n";
    other control characters are still deleted and counted."""
    breaks = ["\x0b", "\x0c", "\x85", "\u2028", "\u2029"]
    for brk in breaks:
        assert clean_text(f"foo{brk}bar").text == "foo\nbar" and clean_text(f"foo{brk}bar").control_chars_removed == 0
    assert clean_text("a\x1cb\x0c\x0c\x0cc").text == "ab\n\n\nc"  # a separator (Cc) is still deleted
    text = "Page one ends here.\x0c  Page two\u2029starts.\x0b\x85\x0c\x0cEnd\x07."
    path = write(tmp_path / "a.txt", text.encode("utf-8"))
    m = run(tmp_path, [path], tokenizer="char", normalize_whitespace=True, val_fraction=0, test_fraction=0)
    assert docs_by_split(tmp_path / "out")["train"] == ["Page one ends here.\nPage two\nstarts.\n\nEnd."]
    assert m["cleaning"]["control_chars_removed"] == 1  # the BEL


def test_a_bom_inside_a_text_file_is_removed(tmp_path: Path) -> None:
    """`cat a.txt b.txt` of two files a Windows editor saved (UTF-8 with a BOM) leaves U+FEFF where b.txt starts:
    it was kept (trained on as an invisible character), and its paragraph was no exact duplicate of the same
    paragraph elsewhere. It is deleted and counted as control characters are; the zero-width joiner is kept."""
    bom = "\ufeff".encode()
    a = bom + b"First paragraph of file a.\n\nA paragraph both files hold.\n\n"
    b = bom + "A paragraph both files hold.\n\nLast one, 👩\u200d💻.\n".encode()
    path = write(tmp_path / "cat.txt", a + b)
    m = run(tmp_path, [path], tokenizer="char", val_fraction=0, test_fraction=0)
    train = docs_by_split(tmp_path / "out")["train"]
    assert train == ["First paragraph of file a.", "A paragraph both files hold.", "Last one, 👩\u200d💻."]
    assert m["documents"]["removed"]["exact_dup"] == 1 and m["cleaning"]["control_chars_removed"] == 1


def test_a_file_name_that_is_not_utf8_is_prepared(tmp_path: Path) -> None:
    """A Latin-1 file name (`caf\\xe9.txt`, as an old zip unpacks it) reaches Python as a lone surrogate, and writing
    it into card.json and manifest.json stopped prepare with a UnicodeEncodeError traceback after all its work.
    The manifest now names it with its byte escaped, and the text is prepared."""
    import os

    folder = tmp_path / "names"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xe9.txt")).write_text("A Latin-1 named file.\n\nIts second paragraph.\n", "utf-8")
    m = run(tmp_path, [folder], tokenizer="char", val_fraction=0, test_fraction=0)
    assert [i["path"] for i in m["inputs"]] == [str(folder / "caf\\xe9.txt")]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk["inputs"][0]["path"].endswith("caf\\xe9.txt") and on_disk["documents"]["out"] == 2


def test_huge_train_split_is_sampled_for_bpe_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.data.tokenizing as tokenizing_module

    write(tmp_path / "a.txt", "\n\n".join(sentences(300, seed=13)))
    full = run(tmp_path, [tmp_path / "a.txt"], out="full", val_fraction=0, test_fraction=0)
    monkeypatch.setattr(tokenizing_module, "TOKENIZER_SAMPLE_BYTES", full["splits"]["train"]["bytes"] // 3)
    a = run(tmp_path, [tmp_path / "a.txt"], out="a", val_fraction=0, test_fraction=0)
    b = run(tmp_path, [tmp_path / "a.txt"], out="b", val_fraction=0, test_fraction=0)
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"] != full["tokenizer"]["sha256"]  # sampled, deterministic
    assert a["splits"]["train"]["documents"] == 300  # sampling is for tokenizer training only
    assert sorted(docs_by_split(tmp_path / "a")["train"]) == sorted(sentences(300, seed=13))


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "a.txt", "some text\n\nmore text")
    prepare(PrepareConfig(inputs=[str(tmp_path / "a.txt")], out=str(tmp_path / "out"), vocab_size=300), progress=True)
    assert capsys.readouterr().out == ""


def test_prepare_says_when_a_folder_skipped_json_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`prepare BOOK.txt POEMS/` read none of POEMS/*.json (a folder walk skips .json, usually metadata), said only
    in manifest.json: stderr now names them and how to read them; a folder without .json files gets no note."""
    from lmforge.cli import main

    write(tmp_path / "book.txt", "\n\n".join(sentences(40, seed=3)))
    write(tmp_path / "poems" / "tang.json", json.dumps([{"paragraphs": ["床前明月光"]}], ensure_ascii=False))
    argv = ["prepare", str(tmp_path / "book.txt"), str(tmp_path / "poems"), "--vocab-size", "300", "--quiet"]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--out", str(tmp_path / "out")])
    assert done.value.code == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "tang.json" in captured.err and "DIR/*.json" in captured.err
    assert captured.out.startswith("prepared ")
    with pytest.raises(SystemExit):
        main(["prepare", str(tmp_path / "book.txt"), "--vocab-size", "300", "--quiet", "--out", str(tmp_path / "o2")])
    assert capsys.readouterr().err == ""


def test_prepare_says_when_a_folder_skipped_bz2_and_xz_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder of .txt and .xz/.bz2 files prepared the .txt files and skipped the others with no word on stderr
    (only manifest.json skipped_files listed them): half the corpus lost silently. Now a note names them."""
    import bz2
    import lzma

    from lmforge.cli import main

    write(tmp_path / "corpus" / "a.txt", "\n\n".join(sentences(40, seed=3)))
    (tmp_path / "corpus" / "b.txt.xz").write_bytes(lzma.compress("\n\n".join(sentences(40, seed=4)).encode()))
    (tmp_path / "corpus" / "c.txt.bz2").write_bytes(bz2.compress("\n\n".join(sentences(40, seed=5)).encode()))
    with pytest.raises(SystemExit) as done:
        main(["prepare", str(tmp_path / "corpus"), "--tokenizer", "char", "--quiet", "--out", str(tmp_path / "out")])
    assert done.value.code == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 compressed files" in err and "b.txt.xz" in err and "gzip" in err


@pytest.mark.parametrize("name", ["t.csv", "t.tsv", "t.parquet"])
def test_a_text_column_named_twice_is_refused(tmp_path: Path, name: str) -> None:
    """A header 'text,text' (CSV, TSV) or two Parquet columns named 'text' read the first column without a word
    (pandas and csv.DictReader read the last): which one is the text is the user's to say."""
    if name.endswith(".parquet"):
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        table = pa.Table.from_arrays([pa.array(["one", "two"]), pa.array(["uno", "dos"])], names=["text", "text"])
        pq.write_table(table, tmp_path / name)
    else:
        sep = "\t" if name.endswith(".tsv") else ","
        write(tmp_path / name, f"text{sep}text\none{sep}uno\ntwo{sep}dos\n")
    with pytest.raises(DataError, match="2 columns are named 'text'.*rename all but one"):
        run(tmp_path, [tmp_path / name], tokenizer="char")
    assert not (tmp_path / "out").exists()


def test_prepare_names_a_file_whose_invalid_utf8_was_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small Latin-1 file (4 accents, under --max-invalid-utf8's 16) prepared to U+FFFD with only a count in
    manifest.json and not a word: stderr now names it and the iconv way out; the manifest counts it per input."""
    from lmforge.cli import main

    (tmp_path / "fr.csv").write_bytes("text\ncafé naïve résumé\n".encode("latin-1"))
    write(tmp_path / "en.txt", "plain text")
    with pytest.raises(SystemExit) as done:
        main(["prepare", str(tmp_path / "en.txt"), str(tmp_path / "fr.csv"), "--tokenizer", "char", "--quiet",
              "--val-fraction", "0", "--test-fraction", "0", "--out", str(tmp_path / "out")])  # fmt: skip
    assert done.value.code == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fr.csv: 4 invalid UTF-8 sequences replaced" in err and "iconv" in err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert [i["invalid_utf8_replaced"] for i in m["inputs"]] == [0, 4]


@pytest.mark.parametrize("workers", [1, 2])
def test_json_lone_surrogates_are_replaced_without_a_mixed_encoding_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    """Scraped posts in JSON Lines often hold an emoji cut in half, escaped as "\\ud83d": valid UTF-8 bytes. 40
    of them were counted as invalid UTF-8 and refused as 'not UTF-8 or mixes encodings; convert it with iconv',
    which changes nothing; they are replaced and counted (and named as what they are), and the run goes on."""
    from lmforge.cli import main

    rows = [json.dumps({"text": f"post {i} cut emoji \ud83d"}) for i in range(40)]  # (ensure_ascii: escaped)
    write(tmp_path / "posts.jsonl", "\n".join(rows) + "\n")
    with pytest.raises(SystemExit) as done:
        main(["prepare", str(tmp_path / "posts.jsonl"), "--tokenizer", "char", "--quiet", "--workers", str(workers),
              "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert done.value.code == 0, err
    assert err.count("\n") == 1 and "40 lone surrogates escaped in JSON strings" in err and "iconv" not in err, err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert m["inputs"][0]["invalid_utf8_replaced"] == m["inputs"][0]["lone_surrogates_replaced"] == 40
    assert m["documents"]["out"] == 40 and "post 7 cut emoji \ufffd" in docs_by_split(tmp_path / "out")["train"]
    (tmp_path / "mixed.jsonl").write_bytes(b"".join(b'{"text": "caf\xe9 %d"}\n' % i for i in range(40)))
    with pytest.raises(SystemExit) as done:  # invalid UTF-8 bytes are still refused
        main(["prepare", str(tmp_path / "mixed.jsonl"), "--quiet", "--out", str(tmp_path / "out2")])
    assert done.value.code == 2 and "mixes encodings" in capsys.readouterr().err


def test_corrupt_gzip(tmp_path: Path) -> None:
    (tmp_path / "plain.txt.gz").write_text("not gzip at all", encoding="utf-8")
    with pytest.raises(DataError, match=r"plain\.txt\.gz: cannot decompress"):
        run(tmp_path, [tmp_path / "plain.txt.gz"])
    whole = gzip.compress(("\n\n".join(sentences(2000, seed=14))).encode("utf-8"))
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.txt\.gz: read failed"):
        run(tmp_path, [tmp_path / "cut.txt.gz"])
    assert_nothing_written(tmp_path)


def test_tokenizer_kind_is_detected_from_a_given_file(tmp_path: Path) -> None:
    """A shared tokenizer.json records its real kind (pretrain's WordPiece note reads it), not "file"."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from lmforge.data.tokenizing import tokenizer_kind
    from lmforge.tokenizer.train import train_bpe, train_char, train_unigram, train_wordpiece

    texts = sentences(200, seed=2)
    made = {
        "bpe": train_bpe(texts, 300), "char": train_char(texts), "wordpiece": train_wordpiece(texts, 200),
        "unigram": train_unigram(texts, 400),
    }  # fmt: skip
    for kind, tok in made.items():
        assert tokenizer_kind(tok) == kind
    word_level = HFTokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    assert tokenizer_kind(Tokenizer(word_level)) == "file"
    write(tmp_path / "a.txt", "\n\n".join(texts))
    made["wordpiece"].save(tmp_path / "wp.json")
    m = run(tmp_path, [tmp_path / "a.txt"], tokenizer=str(tmp_path / "wp.json"))
    assert m["tokenizer"]["kind"] == "wordpiece"


def test_vocab_size_for_a_tokenizer_prepare_does_not_train_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--tokenizer char --vocab-size 10` prepared a char tokenizer of every character, ignoring the size without
    a word (as with a tokenizer.json); it is refused in one line before anything is written."""
    from lmforge.cli import main

    write(tmp_path / "a.txt", "some text\n")
    for tokenizer in ("char", str(tmp_path / "tokenizer.json")):
        with pytest.raises(SystemExit) as done:
            main(["prepare", str(tmp_path / "a.txt"), "--tokenizer", tokenizer, "--vocab-size", "10",
                  "--out", str(tmp_path / "out")])  # fmt: skip
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1 and "drop --vocab-size" in err, err
        assert not (tmp_path / "out").exists()


def test_near_threshold_without_near_dedup_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--near-threshold 0.5` with the default exact dedup (or none, or a --merge) removed no near-duplicate and
    said nothing, so a user believed near dedup had run; it is refused in one line, even at its default value."""
    from lmforge.cli import main

    write(tmp_path / "a.txt", "some text\n\nsome text!\n")
    for extra in ([], ["--dedup", "none"], ["--near-threshold", "0.8"]):
        with pytest.raises(SystemExit) as done:
            main(
                ["prepare", str(tmp_path / "a.txt"), "--near-threshold", "0.5", *extra, "--out", str(tmp_path / "out")]
            )
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1, err
        assert "--near-threshold applies to near-duplicate removal" in err and "add --dedup near" in err, err
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as done:
        main(["prepare", str(tmp_path / "a.txt"), "--near-threshold", "0.5", "--dedup", "near", "--quiet",
              "--tokenizer", "char", "--out", str(tmp_path / "out")])  # fmt: skip
    assert done.value.code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["dedup"]["threshold"] == 0.5


def test_out_inside_a_run_is_refused(tmp_path: Path) -> None:
    """`prepare --out runs/base/data` put the data inside a run, which `pretrain --overwrite` of it deleted whole."""
    write(tmp_path / "a.txt", "\n\n".join(sentences(10, seed=10)))
    run_dir = tmp_path / "runs" / "base"
    write(run_dir / "config.json", "{}")
    write(run_dir / "metrics.jsonl", '{"step": 1, "loss": 3.0}\n')
    with pytest.raises(DataError, match=r"--out .*base/data is inside the run .*base, which '--overwrite' of"):
        run(tmp_path, [tmp_path / "a.txt"], out="runs/base/data")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "metrics.jsonl"]
