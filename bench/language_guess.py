"""Accuracy and speed of `prepare --languages`' guess (`lmforge.data.filters.guess_language`) on real text.

Reads the sets of `../shared/data` (see its README; a set that is missing is skipped) and prints, per set,
how its sentences and its documents (runs of consecutive sentences joined, about a paragraph) were guessed,
then the en/fr confusion of the Tatoeba pairs and the speed (documents per second, one process) of the guess.

    python bench/language_guess.py                          # ../shared/data
    python bench/language_guess.py --data /work/shared/data --sentences 20000
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.filters import guess_language


def _tsv_column(path: Path, column: int, skip_header: bool = False) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        if skip_header:
            next(f)
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) > column and fields[column].strip():
                yield fields[column]


def _csv_column(path: Path, name: str) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from (row[name] for row in csv.DictReader(f) if row.get(name, "").strip())


def _paragraphs(path: Path) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    yield from (p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip())


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from (line.strip() for line in f if line.strip())


def sets(data: Path) -> dict[str, tuple[str, list[str], bool]]:
    """name -> (expected language, texts, whether the texts are sentences to join into documents too)."""
    out: dict[str, tuple[str, list[str], bool]] = {}
    found = [
        ("tatoeba en (eng-fra)", "en", lambda: _tsv_column(data / "tatoeba/eng-fra.txt", 0), True),
        ("tatoeba fr (eng-fra)", "fr", lambda: _tsv_column(data / "tatoeba/eng-fra.txt", 1), True),
        ("tatoeba en (cmn-eng)", "en", lambda: _tsv_column(data / "tatoeba/cmn-eng.txt", 0), True),
        ("tatoeba zh (cmn-eng)", "zh", lambda: _tsv_column(data / "tatoeba/cmn-eng.txt", 1), True),
        ("sst2 train", "en", lambda: _tsv_column(data / "sst2/train.tsv", 0, skip_header=True), True),
        ("sentiment sentences", "en", lambda: (
            t for p in sorted((data / "sentiment_labelled_sentences").glob("*_labelled.txt"))
            for t in _tsv_column(p, 0)), True),
        ("ag_news", "en", lambda: (
            r["title"] + ". " + r["description"] for r in csv.DictReader(
                open(data / "ag_news/test.csv", encoding="utf-8", newline=""))), False),
        ("tinyshakespeare lines", "en", lambda: _lines(data / "tinyshakespeare.txt"), False),
        ("tinyshakespeare paragraphs", "en", lambda: _paragraphs(data / "tinyshakespeare.txt"), False),
        ("alpaca en", "en", lambda: (
            json.loads(line)["en_output"] for line in open(data / "alpaca_zh_en/alpaca_zh_en_first5000.jsonl",
                                                           encoding="utf-8")), False),
        ("alpaca zh", "zh", lambda: (
            json.loads(line)["output"] for line in open(data / "alpaca_zh_en/alpaca_zh_en_first5000.jsonl",
                                                        encoding="utf-8")), False),
        ("hongloumeng lines", "zh", lambda: _lines(data / "chinese_text/hongloumeng.txt"), False),
        ("ChnSentiCorp", "zh", lambda: _csv_column(data / "chinese_sentiment/ChnSentiCorp_htl_all.csv", "review"),
         False),
        ("waimai", "zh", lambda: _csv_column(data / "chinese_sentiment/waimai_10k.csv", "review"), False),
    ]  # fmt: skip
    for name, language, read, join in found:
        try:
            out[name] = (language, [t for t in read() if t.strip()], join)
        except OSError:
            continue
    return out


def documents(sentences: list[str], per_doc: int, rng: random.Random) -> list[str]:
    """Runs of `per_doc` consecutive sentences from random starts, joined by a space (about a paragraph)."""
    starts = rng.sample(range(max(len(sentences) - per_doc, 1)), min(2000, max(len(sentences) - per_doc, 1)))
    return [" ".join(sentences[s : s + per_doc]) for s in starts]


def row(name: str, expected: str, texts: list[str]) -> str:
    guesses = Counter(map(guess_language, texts))
    right = guesses[expected] / len(texts)
    others = ", ".join(f"{lang} {n / len(texts):.1%}" for lang, n in guesses.most_common() if lang != expected)
    return f"| {name} | {len(texts):,} | {expected} | {right:.2%} | {others[:70]} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--sentences", type=int, default=0, help="at most this many texts per set (0 = all)")
    parser.add_argument("--per-doc", type=int, default=5, help="sentences per joined document")
    args = parser.parse_args()
    rng = random.Random(0)
    found = sets(Path(args.data))
    print("| set | texts | expected | right | guessed instead |\n| --- | ---: | --- | ---: | --- |")
    for name, (expected, texts, join) in found.items():
        if args.sentences and len(texts) > args.sentences:
            texts = rng.sample(texts, args.sentences)
        print(row(name, expected, texts))
        if join:
            print(row(f"{name}, {args.per_doc} joined", expected, documents(found[name][1], args.per_doc, rng)))
    if "tatoeba en (eng-fra)" in found:
        en, fr = found["tatoeba en (eng-fra)"][1], found["tatoeba fr (eng-fra)"][1]
        print("\nTatoeba eng-fra, sentences: rows = true language, columns = guess")
        table = {true: Counter(map(guess_language, texts)) for true, texts in (("en", en), ("fr", fr))}
        columns = sorted({c for t in table.values() for c in t}, key=lambda c: -sum(t[c] for t in table.values()))
        print("| true | " + " | ".join(columns) + " |\n| --- |" + " ---: |" * len(columns))
        for true, counts in table.items():
            print(f"| {true} | " + " | ".join(f"{counts[c]:,}" for c in columns) + " |")
    print("\n| speed on | documents | docs/s |\n| --- | ---: | ---: |")
    for name in ("tinyshakespeare paragraphs", "tatoeba fr (eng-fra)", "ag_news", "ChnSentiCorp"):
        if name not in found:
            continue
        texts = (found[name][1] * 10)[:10_000]
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for text in texts:
                guess_language(text)
            best = min(best, time.perf_counter() - start)
        print(f"| {name} | {len(texts):,} | {len(texts) / best:,.0f} |")


if __name__ == "__main__":
    main()
