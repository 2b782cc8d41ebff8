"""Data card: what `prepare` did to a corpus, for humans (card.md) and scripts (card.json).

Written into the prepared directory next to manifest.json:
- card.json: sources, documents and UTF-8 bytes after each step, removal reasons (documents and
  bytes), tokens per split, document length histogram, top tokens, language mix, tokenizer report.
- card.md: the same as Markdown tables, linking length_hist.png.
- length_hist.png: documents per length bucket (characters, powers of two).

Steps, in pipeline order: "read" (raw documents as decoded), "cleaned" (after normalization,
control characters, whitespace and boilerplate rewrites; empty documents gone), "filtered" (after
the length/repetition/alphabetic/language filters), "deduplicated" (after eval-overlap, exact and
near dedup; what is split and tokenized).

The PNG is drawn with matplotlib's object API on an Agg canvas (no pyplot), so no global backend
state changes and nothing needs a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_text, replacing, write_json
from lmforge.data.ingest import skipped_json, unread_compressed

CARD_JSON = "card.json"
CARD_MD = "card.md"
HISTOGRAM_PNG = "length_hist.png"
# below this --shard-tokens, prepare notes that a training window never crosses a shard (the longest context
# it serves, and the tokens a long context leaves at each shard's end: up to 0.8% at seq_len 8,192 above it)
SMALL_SHARDS = 1_000_000


def _length_label(bit_length: int) -> str:
    """Bucket `bit_length` holds lengths in [2**(b-1), 2**b - 1] characters."""
    low = 0 if bit_length == 0 else 1 << (bit_length - 1)
    return f"{low}-{(1 << bit_length) - 1}"


def _plot_histogram(path: Path, length_hist: dict[int, int]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted(length_hist)
    fig = Figure(figsize=(8, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(keys)), [length_hist[k] for k in keys], color="#4c72b0")
    ax.set_xticks(range(len(keys)), [_length_label(k) for k in keys], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.set_title("kept documents by length")
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "⏎") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_card(
    directory: Path,
    manifest: dict[str, Any],
    *,
    steps: dict[str, dict[str, int]],
    removed_bytes: dict[str, int],
    length_hist: dict[int, int],
    top_tokens: list[dict[str, Any]],
) -> dict[str, Any]:
    """Write card.json, card.md and length_hist.png into `directory`; return the card dict."""
    removed = manifest["documents"]["removed"]
    card = {
        "sources": [{k: i[k] for k in ("path", "bytes", "documents", "kept", "role")} for i in manifest["inputs"]],
        "steps": steps,
        "removed": {k: {"documents": n, "bytes": removed_bytes.get(k, 0)} for k, n in removed.items()},
        "cleaning": manifest["cleaning"],
        "dedup": manifest["dedup"],
        "splits": {s: {k: v[k] for k in ("documents", "tokens", "bytes")} for s, v in manifest["splits"].items()},
        "languages": manifest["languages"],
        "length_histogram": {_length_label(k): v for k, v in sorted(length_hist.items())},
        "top_tokens": top_tokens,
        "tokenizer": manifest["tokenizer"],
    }
    write_json(directory / CARD_JSON, card)
    _plot_histogram(directory / HISTOGRAM_PNG, length_hist)

    tok = manifest["tokenizer"]
    report = tok.get("report") or {}
    bpt = report.get("bytes_per_token", {})
    md = ["# Data card\n\n"]
    md.append(f"Prepared by lmforge {manifest['lmforge_version']} on {manifest['created']}.\n\n")
    md.append("## Sources\n\n")
    md.append(_table(["input", "role", "bytes", "documents", "kept"], [
        [s["path"], s["role"], f"{s['bytes']:,}", f"{s['documents']:,}", f"{s['kept']:,}"] for s in card["sources"]
    ]))  # fmt: skip
    md.append("\n## Documents and bytes after each step\n\n")
    md.append(_table(["step", "documents", "bytes"], [
        [k, f"{v['documents']:,}", f"{v['bytes']:,}"] for k, v in steps.items()
    ]))  # fmt: skip
    md.append("\n## Removed, by reason\n\n")
    rows = [[k, f"{v['documents']:,}", f"{v['bytes']:,}"] for k, v in card["removed"].items() if v["documents"]]
    md.append(_table(["reason", "documents", "bytes"], rows or [["(none)", 0, 0]]))
    md.append("\n## Splits\n\n")
    md.append(_table(["split", "documents", "tokens", "bytes"], [
        [s, f"{v['documents']:,}", f"{v['tokens']:,}", f"{v['bytes']:,}"] for s, v in card["splits"].items()
    ]))  # fmt: skip
    md.append("\n## Languages (kept documents, guessed by script)\n\n")
    md.append(_table(["language", "documents"], [[k, f"{v:,}"] for k, v in card["languages"].items()]))
    md.append(f"\n## Document lengths\n\n![length histogram]({HISTOGRAM_PNG})\n\n")
    md.append(_table(["characters", "documents"], [[k, f"{v:,}"] for k, v in card["length_histogram"].items()]))
    md.append(f"\n## Tokenizer\n\n{tok['kind']}, {tok['vocab_size']:,} ids, sha256 {tok['sha256'][:16]}.\n")
    md.append(f"Compression on the {report.get('split')} split (UTF-8 bytes per token): ")
    md.append(", ".join(f"{k} {v}" for k, v in bpt.items() if v is not None) + ".\n\n")
    md.append("### Top tokens (train)\n\n")
    md.append(_table(["id", "token", "count"], [[t["id"], repr(t["token"]), f"{t['count']:,}"] for t in top_tokens]))
    atomic_write_text(directory / CARD_MD, "".join(md))
    return card


def _files_and_total(counts: dict[str, int], noun: str) -> str:
    """'a.txt and 2 more files: 1,234 {noun}s' for the files with a nonzero count (at least one), in order
    ('a.txt: 1 {noun}' for one)."""
    files = [path for path, n in counts.items() if n]
    more = f" and {len(files) - 1:,} more file{'s' if len(files) > 2 else ''}" if len(files) > 1 else ""
    total = sum(counts.values())
    return f"{files[0]}{more}: {total:,} {noun}{'s' if total != 1 else ''}"


def notes(manifest: dict[str, Any]) -> list[str]:
    """Notes for `prepare`'s stderr, each one line: .json files a folder or glob walk skipped (usually metadata,
    but a corpus of .json files, such as the classical poetry sets, is read only when named); .bz2/.xz/.zip/...
    files it skipped (a corpus folder half in .xz prepared its other half without a word); inputs whose
    invalid UTF-8 was replaced with U+FFFD under `--max-invalid-utf8` (a small Latin-1 file's accents were
    silent mojibake, with only a count in manifest.json)."""
    out = []
    json_files = skipped_json(manifest.get("skipped_files", []))
    if json_files:
        many = f"{len(json_files):,} .json files" if len(json_files) > 1 else "a .json file"
        out.append(
            f"note: folders skip .json files, so {many} (such as {json_files[0]}) went unread; "
            "name them as inputs to read them, e.g. 'DIR/*.json' (listed in manifest.json skipped_files)"
        )
    packed = unread_compressed(manifest.get("skipped_files", []))
    if packed:  # a folder of .txt files and .xz files read the .txt files and said nothing of the rest
        many = f"{len(packed):,} compressed files" if len(packed) > 1 else "a compressed file"
        out.append(
            f"note: folders skip files compressed other than .gz or .zst, so {many} (such as {packed[0]}) went "
            "unread; decompress them first, or recompress them with gzip (listed in manifest.json skipped_files)"
        )
    # (JSON's escaped lone surrogates are counted as invalid UTF-8 too, but say nothing about the file's encoding)
    lone = {i["path"]: i.get("lone_surrogates_replaced", 0) for i in manifest["inputs"]}
    # (a --merge manifest's inputs are the parts, which read no text: their own manifests hold those counts)
    bad = {i["path"]: i.get("invalid_utf8_replaced", 0) - lone[i["path"]] for i in manifest["inputs"]}
    if any(lone.values()):
        out.append(
            f"note: {_files_and_total(lone, 'lone surrogate')} escaped in JSON strings (half an emoji, like \\ud83d, "
            "cut from its pair) replaced with U+FFFD (manifest.json inputs[].lone_surrogates_replaced, counted in "
            "cleaning.invalid_utf8_replaced too)"
        )
    if any(bad.values()):
        out.append(
            f"note: {_files_and_total(bad, 'invalid UTF-8 sequence')} replaced with U+FFFD "
            "(manifest.json cleaning.invalid_utf8_replaced); if a file is in another encoding, convert it with "
            "iconv -f ENCODING -t UTF-8 (CP1252 or LATIN1 for Western European text, GB18030 for Chinese) and "
            "prepare again"
        )
    shard_tokens = manifest.get("config", {}).get("shard_tokens", SMALL_SHARDS)
    cut = {split: len(info["shards"]) for split, info in manifest.get("splits", {}).items() if len(info["shards"]) > 1}
    if shard_tokens < SMALL_SHARDS and cut:
        split, n = max(cut.items(), key=lambda item: item[1])
        out.append(
            f"note: --shard-tokens {shard_tokens:,} cut the {split} split into {n:,} shards, and a training window "
            f"never crosses a shard: pretraining takes --data.seq_len {shard_tokens - 1:,} at most and leaves up to "
            "seq_len tokens of each shard untrained; for long contexts prepare again with a larger --shard-tokens "
            "(default 50M)"
        )
    for i in manifest["inputs"]:
        if i.get("no_text"):
            field = manifest["config"]["text_field"]
            out.append(
                f"note: {i['path']}: {i['no_text']:,} of {i['documents']:,} rows have no text (a null, an empty cell "
                f"or no field '{field}') and were skipped (manifest.json inputs[].no_text)"
            )
    return out


def empty_splits(manifest: dict[str, Any]) -> list[str]:
    """The val/test splits a fraction asked for that got no documents (a corpus of a few documents: each goes
    to a split by a hash of its text, so 3 lines at --val-fraction 0.05 all land in train), for prepare's summary
    line and `eval`'s error."""
    config, splits = manifest.get("config", {}), manifest.get("splits", {})
    return [
        split
        for split in ("val", "test")
        if config.get(f"{split}_fraction", 0) > 0
        and not config.get(f"{split}_input")
        and not splits.get(split, {}).get("documents", 0)
    ]


def empty_split_reason(manifest: dict[str, Any], splits: list[str]) -> str:
    """Why the `splits` (of `empty_splits`) are empty and what to do."""
    n = manifest.get("documents", {}).get("out", 0)
    unit = manifest.get("config", {}).get("doc_unit", "paragraph")
    more = "more documents" if unit == "line" else "more documents (--doc-unit line makes each line one)"
    flags = " / ".join(f"--{split}-input FILE" for split in splits)
    return (
        f"{n:,} document{'s' if n != 1 else ''} in all, each put in a split by a hash of its text; "
        f"prepare {more}, or give {'it its' if len(splits) == 1 else 'them their'} own text with {flags}"
    )


def summary_line(manifest: dict[str, Any], out: str | Path) -> str:
    """The one line `lmforge prepare` prints when it is done: where, documents kept (and the main removal
    reasons), tokens per split and the tokenizer, e.g. `prepared data/x: 564 of 600 documents kept (36
    exact_dup removed); tokens train 49,325 / val 3,158; bpe tokenizer, vocab 300`."""
    docs, tok = manifest["documents"], manifest["tokenizer"]
    kept = f"{docs['out']:,} of {docs['in']:,} documents kept"
    removed = sorted(((n, k) for k, n in docs["removed"].items() if n), reverse=True)
    if removed:
        more = ", ..." if len(removed) > 3 else ""
        kept += f" ({', '.join(f'{n:,} {k}' for n, k in removed[:3])}{more} removed)"
    tokens = " / ".join(f"{split} {info['tokens']:,}" for split, info in manifest["splits"].items())
    line = f"prepared {out}: {kept}; tokens {tokens}; {tok['kind']} tokenizer, vocab {tok['vocab_size']:,}"
    cfg = manifest.get("config", {})
    asked = cfg.get("vocab_size", 0)
    # (a --vocab-size larger than a small text can fill: the trainers stop without a word. A --merge trains none:
    # its config holds the unused default, and every merge of parts with under 4,096 ids was told it fell short)
    if not cfg.get("merge") and cfg.get("tokenizer") in ("bpe", "wordpiece", "unigram") and tok["vocab_size"] < asked:
        line += f" (of --vocab-size {asked:,}: the text holds no more tokens to learn)"
    empty = empty_splits(manifest)  # (pretrain then trains without evaluating: say so here, not at eval time)
    if empty:
        line += f"; {' and '.join(empty)} got no documents: {empty_split_reason(manifest, empty)}"
    return line
