"""`lmforge prepare --merge PART... --out DIR`: one data directory from independently prepared parts.

A big corpus can be prepared as N parts (one per node or array job, each `lmforge prepare
files-of-part-i --tokenizer shared/tokenizer.json --out part-i`) and merged here:

    for split in train, val, test:
        for part in parts (in the order given):
            for document in part's shards (cut at EOS, across shard boundaries):
                text = decode(document)
                drop it if exact (sha256 of text) or near (MinHash LSH) duplicate of an earlier one
                else copy its tokens (EOS included) into TMP/<split>-NNNNN.bin
    manifest.json + data card -> os.replace(TMP, <out>)   (TMP: atomic.fresh_tmp_dir, as in prepare.py)

Key design decisions:
- Parts must share one tokenizer (same fingerprint): tokens are copied, never re-encoded, so
  merging costs a decode and a hash per document, not a tokenization.
- Dedup across parts works on the decoded text, which is exactly the cleaned text for byte-level
  BPE, char and Unigram tokenizers (they round-trip), so exact dedup here equals dedup over the
  union of the inputs. The hash split is content-based, so a document duplicated across parts is
  in the same split in every part. A part's given --val-input/--test-input documents are not hashed:
  a train document with the text of any part's val or test document is removed as
  `overlap_with_eval` (a first pass collects their keys), as `prepare` on the union does, so the
  given evaluation set stays whole and its text stays out of training.
- Byte counts are the parts' own, not the decoded text's: WordPiece decoding adds spaces and drops
  newlines, so bytes are counted on decoded text and scaled per part-split to the part manifest's
  true total (`_true_bytes`; exact for split totals when nothing is deduplicated away, and always for
  round-tripping tokenizers). Still taken on decoded text, so approximate for WordPiece only: the
  card's length histogram (characters), the language guess, and exact dedup (two texts WordPiece
  decodes alike count as duplicates).
- Near dedup is not the union's: shards keep no record of how a part's documents interleaved across
  splits, so the walk is split by split and a train copy always wins over a val/test near-duplicate
  (prepare keeps the first in input order). Exact duplicates share a split or are evaluation text
  (above), so exact dedup is unaffected.
- Streaming: one document at a time per split, kept documents buffered into writes of ~1M tokens.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import discard_tmp_dir, fresh_tmp_dir, naming, publish_dir, write_json
from lmforge.data.datadir import FORMAT_VERSION, MANIFEST, TOKENIZER, DataDir, cleaning_settings, load_data_dir
from lmforge.data.dedup import NearDedup
from lmforge.data.dedup_report import check_report_not_read, dedup_report_path, write_dedup_report
from lmforge.data.filters import CLEANING_SETTINGS, DocumentCleaner, guess_language, utf8_len
from lmforge.data.ingest import writable_text
from lmforge.data.prepare import (
    REMOVED_KEYS,
    PrepareConfig,
    _lmforge_version,
    check_out,
    output_dir,
)
from lmforge.data.shards import ShardWriter, dtype_for_vocab, read_shard
from lmforge.data.split import SPLITS, doc_digest
from lmforge.data.tokenizing import tokenizer_kind, tokenizer_report, top_tokens
from lmforge.errors import DataError

_WRITE_TOKENS = 1 << 20
_MERGE_REMOVALS = ("exact_dup", "near_dup", "overlap_with_eval")


def _documents(shards: list[Path], eos: int) -> Iterator[np.ndarray]:
    """Documents (token arrays ending with EOS) of a split, joined across shard boundaries."""
    carry = np.zeros(0, dtype=np.int64)
    for shard in shards:
        tokens = read_shard(shard)
        cuts = np.flatnonzero(tokens == eos)
        start = 0
        for cut in cuts:
            doc = tokens[start : cut + 1]
            if carry.size:
                doc, carry = np.concatenate([carry, doc]), np.zeros(0, dtype=np.int64)
            yield doc
            start = cut + 1
        if start < len(tokens):
            carry = np.concatenate([carry, tokens[start:]])
    if carry.size:
        yield carry  # a part whose last document lacks EOS (not written by prepare; kept as is)


def _eval_keys(parts: list[Any], tok: Any, eos: int) -> set[bytes]:
    """The exact-dedup keys of every part's val and test documents: a train document with one of them is
    evaluation text (a part's --val-input, say) and is removed as `overlap_with_eval`, as `prepare` does,
    before the split-by-split walk reaches the val copy and drops that as a duplicate instead."""
    keys: set[bytes] = set()
    for part in parts:
        for split in SPLITS:
            if split != "train":
                for doc in _documents(part.split_shards(split), eos):
                    keys.add(doc_digest(tok.decode((doc[:-1] if doc[-1] == eos else doc).tolist()))[:16])
    return keys


def _true_bytes(decoded: Counter[str], part_bytes: int | None) -> dict[str, int]:
    """A part-split's byte counts (read, kept, removed per reason, per language) in the part's own
    UTF-8 bytes of cleaned text, from the same counts taken on decoded text.

    Decoding is not the cleaned text for every tokenizer: WordPiece joins words with spaces and
    drops newlines, so decoded bytes ran ~15% over and eval's bits-per-byte (which divides by the
    manifest's split bytes) was off by as much. The part's manifest has the true total, so each
    count is scaled by (true total / decoded total) of its part-split: exact for tokenizers that
    round-trip (ratio 1) and for any count that covers the whole part-split (nothing deduplicated
    away, which includes every per-split total); otherwise a proportional estimate. `kept` is
    read minus the removals, so the counts always add up.
    """
    read = decoded["read"]
    scale = part_bytes / read if part_bytes is not None and read else 1.0
    true = {name: round(n * scale) for name, n in decoded.items() if name != "read"}
    true["read"] = part_bytes if part_bytes is not None and read else read
    for reason in _MERGE_REMOVALS:
        true.setdefault(reason, 0)
    true["kept"] = true["read"] - sum(true[reason] for reason in _MERGE_REMOVALS)
    return true


def _part_cleaning(parts: list[DataDir]) -> dict[str, Any] | None:
    """The cleaning settings the parts share (`eval --task clm` cleans a file by them), or None if they differ."""
    settings = [cleaning_settings(part.manifest) for part in parts]
    if any(s is None for s in settings) or len({DocumentCleaner.from_settings(s) for s in settings}) > 1:
        return None
    first = settings[0]
    return {key: first[key] for key in CLEANING_SETTINGS if key in first}


def merge_parts(cfg: PrepareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Merge prepared directories `cfg.inputs` into `cfg.out` (see the module docstring).

    Raises:
        DataError: an input is not a prepared directory, the parts use different tokenizers, or `--out` exists.
    """
    out = output_dir(cfg)
    check_out(out, cfg.overwrite)
    report_inside = dedup_report_path(cfg, out)
    parts = [load_data_dir(p) for p in cfg.inputs]
    check_report_not_read(cfg, [part.path for part in parts])
    fingerprints = {part.manifest["tokenizer"]["sha256"] for part in parts}
    if len(fingerprints) > 1:
        raise DataError(
            "the parts were prepared with different tokenizers; prepare every part with the same "
            "--tokenizer path/to/tokenizer.json"
        )
    tok = parts[0].load_tokenizer()
    eos = tok.eos_id
    # from the vocabulary, not manifest["dtype"]: prepare recorded uint16 there for a trained tokenizer of
    # over 65,536 ids, whose shards are uint32
    dtype = dtype_for_vocab(tok.vocab_size)
    near = None
    if cfg.dedup == "near":
        near = NearDedup(
            threshold=cfg.near_threshold, max_examples=20 if cfg.dedup_report else 0, snippet_dir=str(out.parent)
        )

    tmp = fresh_tmp_dir(out)
    try:
        seen: set[bytes] = set()
        eval_keys = _eval_keys(parts, tok, eos)
        removed = dict.fromkeys(REMOVED_KEYS, 0)
        removed_bytes = dict.fromkeys(REMOVED_KEYS, 0)
        steps = {"read": [0, 0], "deduplicated": [0, 0]}
        languages: Counter[str] = Counter()
        length_hist: Counter[int] = Counter()
        token_counts = np.zeros(tok.vocab_size, dtype=np.int64)
        report_split = next((s for s in ("val", "test", "train") if any(p.split_tokens(s) for p in parts)), "train")
        by_language: dict[str, list[int]] = {}
        kept_per_part = [0] * len(parts)
        splits: dict[str, Any] = {}
        for split in SPLITS:
            writer = ShardWriter(tmp, split, dtype, cfg.shard_tokens)
            buffer: list[np.ndarray] = []
            buffered = documents = nbytes_split = 0
            for index, part in enumerate(parts):
                decoded: Counter[str] = Counter()  # decoded UTF-8 bytes of this part-split, see _true_bytes
                for doc in _documents(part.split_shards(split), eos):
                    ids = doc[:-1] if doc[-1] == eos else doc
                    text = tok.decode(ids.tolist())
                    nbytes = utf8_len(text)
                    steps["read"][0] += 1
                    decoded["read"] += nbytes
                    key = doc_digest(text)[:16]
                    if split == "train" and key in eval_keys:  # (even with dedup off, as in prepare)
                        removed["overlap_with_eval"] += 1
                        decoded["overlap_with_eval"] += nbytes
                        continue
                    if cfg.dedup != "none":
                        if key in seen:
                            removed["exact_dup"] += 1
                            decoded["exact_dup"] += nbytes
                            continue
                        seen.add(key)
                    if near is not None and near.is_duplicate(text):
                        removed["near_dup"] += 1
                        decoded["near_dup"] += nbytes
                        continue
                    steps["deduplicated"][0] += 1
                    kept_per_part[index] += 1
                    documents += 1
                    language = guess_language(text)
                    languages[language] += 1
                    length_hist[len(text).bit_length()] += 1
                    if split == "train":
                        np.add.at(token_counts, ids.astype(np.int64), 1)
                    if split == report_split:
                        decoded["lang:" + language] += nbytes
                        entry = by_language.setdefault(language, [0, 0])
                        entry[1] += len(ids)
                    buffer.append(doc)
                    buffered += len(doc)
                    if buffered >= _WRITE_TOKENS:
                        writer.write(np.concatenate(buffer))
                        buffer, buffered = [], 0
                true = _true_bytes(decoded, part.manifest["splits"].get(split, {}).get("bytes"))
                steps["read"][1] += true["read"]
                steps["deduplicated"][1] += true["kept"]
                nbytes_split += true["kept"]
                for reason in _MERGE_REMOVALS:
                    removed_bytes[reason] += true[reason]
                for name, nbytes in true.items():
                    if name.startswith("lang:"):
                        by_language.setdefault(name[5:], [0, 0])[0] += nbytes
            if buffer:
                writer.write(np.concatenate(buffer))
            shards = writer.close()
            splits[split] = {
                "documents": documents, "tokens": writer.total_tokens, "bytes": nbytes_split, "shards": shards
            }  # fmt: skip

        documents_in = steps["read"][0]
        documents_out = steps["deduplicated"][0]
        dedup_info: dict[str, Any] = {"mode": cfg.dedup, "exact_dup": removed["exact_dup"]}
        if near is not None:
            dedup_info.update(
                near_dup=near.removed, near_dup_clusters=near.clusters, threshold=cfg.near_threshold,
                num_perm=near.num_perm, shingle_chars=near.shingle_chars,
            )  # fmt: skip
        first_tok = parts[0].manifest["tokenizer"]
        manifest = {
            "format_version": FORMAT_VERSION,
            "lmforge_version": _lmforge_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": dataclasses.asdict(cfg),
            "inputs": [
                {
                    "path": str(part.path),
                    "bytes": sum(s["bytes"] for s in part.manifest["splits"].values()),
                    "documents": part.manifest["documents"]["out"],
                    "kept": kept,
                    "role": "part",
                }
                for part, kept in zip(parts, kept_per_part, strict=True)
            ],  # fmt: skip
            "skipped_files": [],
            "documents": {"in": documents_in, "out": documents_out, "removed": removed},
            "cleaning": {},
            "dedup": dedup_info,
            "languages": dict(languages.most_common()),
            "tokenizer": {
                # parts prepared before kinds were detected from the file say "file"
                "kind": tokenizer_kind(tok) if first_tok["kind"] == "file" else first_tok["kind"],
                "vocab_size": tok.vocab_size,
                "eos_id": eos,
                "sha256": tok.fingerprint,
                "report": tokenizer_report(report_split, by_language),
            },
            "dtype": np.dtype(dtype).name,
            "splits": splits,
            "parts": [str(part.path) for part in parts],
            "part_cleaning": _part_cleaning(parts),
        }
        manifest = writable_text(manifest)  # (a part folder whose name is not UTF-8, as prepare.py escapes inputs)
        tok.save(tmp / TOKENIZER)
        if cfg.card:
            from lmforge.data.card import write_card

            write_card(
                tmp,
                manifest,
                steps={k: {"documents": v[0], "bytes": v[1]} for k, v in steps.items()},
                removed_bytes=removed_bytes,
                length_hist={int(k): v for k, v in sorted(length_hist.items())},
                top_tokens=top_tokens(tok, token_counts),
            )
        write_json(tmp / MANIFEST, manifest)
        if cfg.dedup_report:
            write_dedup_report(cfg, report_inside, tmp, near)
        publish_dir(tmp, out)
        return manifest
    except BaseException:
        discard_tmp_dir(tmp)
        with naming(out):  # (a full disk's error from writing a shard names no file: it names --out)
            raise
