"""`prepare --merge`: parts prepared separately with one tokenizer == the union prepared at once."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.prepare import PrepareConfig, load_data_dir, prepare
from lmforge.data.shards import read_shard
from lmforge.errors import DataError, LmforgeError
from tests.conftest import run_cli, shakespeare_text
from tests.test_data_dedup import ZH, perturb
from tests.test_data_prepare import docs_by_split, write


def prep(tmp_path: Path, inputs: list[Path], out: str, **kwargs: object) -> dict:
    cfg = PrepareConfig(inputs=[str(p) for p in inputs], out=str(tmp_path / out), **kwargs)
    return prepare(cfg, progress=False)


def test_merge_equals_preparing_the_union(tmp_path: Path) -> None:
    paras = [p for p in shakespeare_text(60_000).split("\n\n") if p.strip()]
    write(tmp_path / "a.txt", "\n\n".join(paras[:500] + [ZH]))
    write(tmp_path / "b.txt", "\n\n".join(paras[300:] + [ZH]))  # 200 paragraphs + ZH overlap with a.txt
    common = {"val_fraction": 0.1, "test_fraction": 0.1}
    union = prep(tmp_path, [tmp_path / "a.txt", tmp_path / "b.txt"], "union", vocab_size=300, **common)
    tok = str(tmp_path / "union" / "tokenizer.json")
    part_a = prep(tmp_path, [tmp_path / "a.txt"], "part-a", tokenizer=tok, shard_tokens=997, **common)
    part_b = prep(tmp_path, [tmp_path / "b.txt"], "part-b", tokenizer=tok, shard_tokens=1009, **common)
    assert len(part_a["splits"]["train"]["shards"]) > 3  # documents cross shard boundaries
    merged = prep(tmp_path, [tmp_path / "part-a", tmp_path / "part-b"], "merged", merge=True, shard_tokens=100_000)
    assert merged["documents"]["in"] == part_a["documents"]["out"] + part_b["documents"]["out"]
    assert merged["documents"]["out"] == union["documents"]["out"]
    assert merged["documents"]["removed"]["exact_dup"] == merged["documents"]["in"] - union["documents"]["out"]
    for split in ("train", "val", "test"):
        assert merged["splits"][split]["tokens"] == union["splits"][split]["tokens"]
        assert merged["splits"][split]["bytes"] == union["splits"][split]["bytes"]
    got, want = docs_by_split(tmp_path / "merged"), docs_by_split(tmp_path / "union")
    assert {s: sorted(d) for s, d in got.items()} == {s: sorted(d) for s, d in want.items()}
    assert merged["tokenizer"]["sha256"] == union["tokenizer"]["sha256"]
    assert merged["parts"] == [str(tmp_path / "part-a"), str(tmp_path / "part-b")]
    assert load_data_dir(tmp_path / "merged").manifest == merged and (tmp_path / "merged" / "card.md").is_file()


def test_merge_near_dedup_across_parts(tmp_path: Path) -> None:
    paras = [p for p in shakespeare_text(200_000).split("\n\n") if len(p) >= 500][:20]
    rng = random.Random(3)
    write(tmp_path / "a.txt", "\n\n".join(paras))
    write(tmp_path / "b.txt", "\n\n".join(perturb(p, rng) for p in paras[:8]))
    prep(tmp_path, [tmp_path / "a.txt"], "a", tokenizer="char", val_fraction=0, test_fraction=0)
    tok = str(tmp_path / "a" / "tokenizer.json")
    prep(tmp_path, [tmp_path / "b.txt"], "b", tokenizer=tok, val_fraction=0, test_fraction=0)
    report = tmp_path / "pairs.jsonl"
    m = prep(tmp_path, [tmp_path / "a", tmp_path / "b"], "m", merge=True, dedup="near", dedup_report=str(report))
    assert m["documents"]["removed"]["near_dup"] == 8 and m["documents"]["out"] == 20
    assert m["dedup"]["near_dup_clusters"] == 8
    # the kept documents' starts, read back from the snippet file (an unnamed one: nothing is left beside --out)
    pairs = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert [p["kept"] for p in pairs] == [p[:160] for p in paras[:8]]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a", "a.txt", "b", "b.txt", "m", "pairs.jsonl"]


def test_merge_refuses_mixed_tokenizers_and_non_parts(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", shakespeare_text(5_000))
    prep(tmp_path, [tmp_path / "a.txt"], "a", tokenizer="char")
    prep(tmp_path, [tmp_path / "a.txt"], "b", vocab_size=300)
    with pytest.raises(DataError, match="different tokenizers"):
        prep(tmp_path, [tmp_path / "a", tmp_path / "b"], "m", merge=True)
    with pytest.raises(DataError, match="not a prepared data directory"):
        prep(tmp_path, [tmp_path / "a", tmp_path / "a.txt"], "m", merge=True)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.tmp").exists()


def test_merge_keeps_true_bytes_for_wordpiece(tmp_path: Path) -> None:
    """WordPiece decoding is not the cleaned text (spaces added, newlines dropped): the merged split
    bytes (eval's bits-per-byte divides by them) must still be the parts' own, as for the union."""
    paras = [p for p in shakespeare_text(60_000).split("\n\n") if p.strip()]
    write(tmp_path / "a.txt", "\n\n".join(paras[:300]))
    write(tmp_path / "b.txt", "\n\n".join(paras[300:]))
    common = {"val_fraction": 0.1, "test_fraction": 0.1}
    union = prep(tmp_path, [tmp_path / "a.txt", tmp_path / "b.txt"], "union", tokenizer="wordpiece", **common)
    tok = str(tmp_path / "union" / "tokenizer.json")
    prep(tmp_path, [tmp_path / "a.txt"], "part-a", tokenizer=tok, **common)
    prep(tmp_path, [tmp_path / "b.txt"], "part-b", tokenizer=tok, **common)
    merged = prep(tmp_path, [tmp_path / "part-a", tmp_path / "part-b"], "merged", merge=True)
    assert merged["documents"]["out"] == union["documents"]["out"]
    for split in ("train", "val", "test"):
        assert merged["splits"][split]["bytes"] == union["splits"][split]["bytes"]
    report, want = merged["tokenizer"]["report"], union["tokenizer"]["report"]
    assert report["documents_bytes"]["all"] == want["documents_bytes"]["all"]


def test_merge_keeps_a_parts_given_val_set_whole(tmp_path: Path) -> None:
    """A part prepared with --val-input, merged with a part whose train text holds half of that val set:
    as in prepare on the union, the val set stays whole and the train copies go as overlap_with_eval (the
    merge walked train first and dropped those val documents as exact_dup, leaving their text in train)."""
    paras = [p for p in shakespeare_text(30_000).split("\n\n") if p.strip()]
    val = paras[100:120]
    write(tmp_path / "t1.txt", "\n\n".join(paras[:100]))
    write(tmp_path / "v.txt", "\n\n".join(val))
    write(tmp_path / "t2.txt", "\n\n".join(paras[120:200] + val[:10]))
    common = {"tokenizer": "char", "test_fraction": 0.0}
    union = prep(
        tmp_path, [tmp_path / "t1.txt", tmp_path / "t2.txt"], "u", val_input=[str(tmp_path / "v.txt")], **common
    )
    tok = str(tmp_path / "u" / "tokenizer.json")
    prep(tmp_path, [tmp_path / "t1.txt"], "a", val_input=[str(tmp_path / "v.txt")], **{**common, "tokenizer": tok})
    prep(tmp_path, [tmp_path / "t2.txt"], "b", val_fraction=0.0, **{**common, "tokenizer": tok})
    merged = prep(tmp_path, [tmp_path / "a", tmp_path / "b"], "m", merge=True)
    assert (
        merged["documents"]["removed"]["overlap_with_eval"] == union["documents"]["removed"]["overlap_with_eval"] == 10
    )
    assert merged["splits"] == {**union["splits"]} and merged["splits"]["val"]["documents"] == 20
    got = docs_by_split(tmp_path / "m")
    assert sorted(got["val"]) == sorted(val) and not set(val) & set(got["train"])


def test_merge_near_dedup_keeps_the_train_copy(tmp_path: Path) -> None:
    """README's caveat, pinned: merge walks split by split, so a train document beats its val
    near-duplicate even when the val copy came first in the input (prepare on the union keeps the val one)."""
    from lmforge.data.split import assign_split, doc_digest

    def split_of(text: str) -> str:
        return assign_split(doc_digest(text), val_fraction=0.5, test_fraction=0.0)

    paras = [p for p in shakespeare_text(400_000).split("\n\n") if len(p) >= 500]
    rng = random.Random(5)
    pair = next(
        (p, q)
        for p in paras
        for q in (perturb(p, rng) for _ in range(20))
        if split_of(p) == "val" and split_of(q) == "train"
    )
    fillers = [p for p in paras[:40] if p not in pair]  # so each part has train documents
    write(tmp_path / "a.txt", "\n\n".join([pair[0], *fillers[:20]]))
    write(tmp_path / "b.txt", "\n\n".join([pair[1], *fillers[20:]]))
    common = {"tokenizer": "char", "val_fraction": 0.5, "test_fraction": 0.0}
    union = prep(tmp_path, [tmp_path / "a.txt", tmp_path / "b.txt"], "union", dedup="near", **common)
    tok = str(tmp_path / "union" / "tokenizer.json")
    prep(tmp_path, [tmp_path / "a.txt"], "a", **{**common, "tokenizer": tok})
    prep(tmp_path, [tmp_path / "b.txt"], "b", **{**common, "tokenizer": tok})
    merged = prep(tmp_path, [tmp_path / "a", tmp_path / "b"], "m", merge=True, dedup="near")
    assert union["documents"]["removed"]["near_dup"] == merged["documents"]["removed"]["near_dup"] == 1
    got, want = docs_by_split(tmp_path / "m"), docs_by_split(tmp_path / "union")
    assert pair[0] in want["val"] and pair[1] not in want["train"]
    assert pair[1] in got["train"] and pair[0] not in got["val"]


def test_merge_refusal_comes_before_range_checks(tmp_path: Path) -> None:
    """A flag --merge does not apply is refused as such even when its value is also out of range: the user
    is told to drop it, not to fix a value that would do nothing."""
    for kwargs, flag in (
        ({"vocab_size": 10}, "--vocab-size"),
        ({"special_tokens": "all", "tokenizer": "char"}, "--tokenizer"),
    ):
        with pytest.raises(LmforgeError, match=f"^{flag} is not applied by --merge"):
            PrepareConfig(inputs=["a"], out=str(tmp_path / "m"), merge=True, **kwargs)
    r = run_cli("prepare", str(tmp_path / "a"), "--merge", "--out", str(tmp_path / "m"), "--vocab-size", "10")
    assert r.returncode == 2 and "--vocab-size is not applied by --merge" in r.stderr, r.stderr


def test_merge_refuses_flags_it_does_not_apply(tmp_path: Path) -> None:
    """Filter/split/tokenizer flags were the parts' to apply: with --merge they are refused (one line,
    naming the flag) before anything is written, not recorded in manifest.config as if applied."""
    write(tmp_path / "a.txt", shakespeare_text(5_000))
    prep(tmp_path, [tmp_path / "a.txt"], "a", tokenizer="char")
    flags = {
        "languages": ("zh", "--languages"), "min_chars": (100_000, "--min-chars"), "normalize": ("NFKC", "--normalize"),
        "val_input": (["x.txt"], "--val-input"), "tokenizer": ("char", "--tokenizer"),
        "max_char_repetition": (0.01, "--max-char-repetition"), "vocab_size": (300, "--vocab-size"),
    }  # fmt: skip
    for name, (value, flag) in flags.items():
        with pytest.raises(LmforgeError, match=f"^{flag} is not applied by --merge"):
            prep(tmp_path, [tmp_path / "a"], "m", merge=True, **{name: value})
    assert not (tmp_path / "m").exists()
    with pytest.raises(LmforgeError, match="is a prepared data folder, not text: combine prepared folders with"):
        prep(tmp_path, [tmp_path / "a"], "m")  # without --merge: its card.md would be the corpus
    assert not (tmp_path / "m").exists()
    # on the command line, a flag written with its default value is refused too
    r = run_cli("prepare", str(tmp_path / "a"), "--merge", "--out", str(tmp_path / "m"), "--val-fraction", "0.05")
    assert r.returncode == 2 and "--val-fraction is not applied by --merge" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
    prep(tmp_path, [tmp_path / "a"], "m", merge=True, dedup="near", near_threshold=0.7, shard_tokens=1000, card=False)


def test_shards_of_a_trained_vocabulary_over_65536_ids_are_uint32_in_the_manifest_and_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a trained tokenizer of over 65,536 ids (70,304 distinct Han characters, char) takes ~3 s here, so the
    # rule that picks uint32 for one is applied to a small one: prepare wrote uint32 shards and a manifest
    # saying uint16 (the dtype of the tokenizer it had not trained yet), and merge wrote the parts' uint32
    # ids as uint16 (crashing on the first id over 65,535)
    import lmforge.data.merge
    import lmforge.data.prepare

    for module in (lmforge.data.prepare, lmforge.data.merge):
        monkeypatch.setattr(module, "dtype_for_vocab", lambda vocab_size: np.uint32, raising=False)
    write(tmp_path / "a.txt", shakespeare_text(3_000))
    part = prep(tmp_path, [tmp_path / "a.txt"], "part", tokenizer="char", val_fraction=0, test_fraction=0, card=False)
    assert read_shard(tmp_path / "part" / "train-00000.bin").dtype == np.uint32
    assert part["dtype"] == "uint32"
    manifest = tmp_path / "part" / "manifest.json"  # as prepare wrote it before: merge reads the vocabulary
    manifest.write_text(manifest.read_text().replace('"dtype": "uint32"', '"dtype": "uint16"'))
    merged = prep(tmp_path, [tmp_path / "part"], "merged", merge=True, card=False)
    assert read_shard(tmp_path / "merged" / "train-00000.bin").dtype == np.uint32
    assert merged["dtype"] == "uint32" and docs_by_split(tmp_path / "merged") == docs_by_split(tmp_path / "part")


def test_the_readmes_merge_command_runs(tmp_path: Path) -> None:
    """`lmforge prepare part-* --merge --out data/all` (README, Parts) wrote the merged folder and then stopped on a
    traceback (KeyError 'invalid_utf8_replaced': the notes read a count that a merge's part inputs do not have)."""
    write(tmp_path / "a.txt", shakespeare_text(20_000))
    prep(tmp_path, [tmp_path / "a.txt"], "part-1", tokenizer="char")
    write(tmp_path / "b.txt", shakespeare_text(40_000)[20_000:])
    prep(tmp_path, [tmp_path / "b.txt"], "part-2", tokenizer=str(tmp_path / "part-1" / "tokenizer.json"))
    r = run_cli(
        "prepare", str(tmp_path / "part-1"), str(tmp_path / "part-2"), "--merge", "--out", str(tmp_path / "all")
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"prepared {tmp_path / 'all'}: "), r.stdout
    # the merge trained no tokenizer: its line said "(of --vocab-size 4,096: the text holds no more tokens to learn)"
    assert "--vocab-size" not in r.stdout, r.stdout


def test_merge_of_a_part_whose_folder_name_is_not_utf8(tmp_path: Path) -> None:
    """A part folder with a Latin-1 byte in its name (`part\\xe9`) reaches Python as a lone surrogate: `prepare`
    wrote its manifest with the byte escaped, but `--merge` wrote the part paths raw and stopped with a
    UnicodeEncodeError traceback after all its work. The merged manifest now names it escaped, as prepare does."""
    import os

    write(tmp_path / "a.txt", "First part, first paragraph.\n\nFirst part, second paragraph.\n")
    write(tmp_path / "b.txt", "Second part, a paragraph.\n")
    odd = os.fsdecode(b"part\xe9")
    prep(tmp_path, [tmp_path / "a.txt"], odd, tokenizer="char", val_fraction=0, test_fraction=0)
    tok = str(tmp_path / odd / "tokenizer.json")
    prep(tmp_path, [tmp_path / "b.txt"], "b", tokenizer=tok, val_fraction=0, test_fraction=0)
    m = prep(tmp_path, [tmp_path / odd, tmp_path / "b"], "m", merge=True)
    assert m["parts"][0] == str(tmp_path / "part\\xe9") and m["documents"]["out"] == 3
    assert load_data_dir(tmp_path / "m").manifest["inputs"][0]["path"] == str(tmp_path / "part\\xe9")
