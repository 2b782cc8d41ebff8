"""`lmforge prepare`: raw text files -> cleaned, deduplicated, split, tokenized shards + manifest.

    inputs ──read──► clean ──► length filter ──► dedup ──► split ──► <out>.tmp/docs-<split>.jsonl.part
                                                                          │
                     tokenizer.json ◄── train BPE/char on the train docs ─┤
                                                                          ▼
            <out>.tmp/{train,val,test}-NNNNN.bin ◄── encode_batch + EOS per document
            <out>.tmp/manifest.json ──► os.replace(<out>.tmp, <out>)

Key design decisions:
- Two streaming passes, so memory does not grow with the corpus (except the dedup digest set):
  pass 1 reads, cleans, deduplicates and splits documents into temporary JSONL files per split;
  the tokenizer is trained from an iterator over the train file only (no eval leakage into the
  vocabulary; a train split over 1 GiB is sampled by document hash for BPE training, whose memory
  grows with the distinct words it sees); pass 2 encodes the temporary files in batches and
  streams tokens into shards.
- Nothing half-written ever appears at `<out>`: everything is built in `<out>.tmp/` and renamed
  into place at the end; on any error (or Ctrl-C) the tmp folder is removed. `--overwrite` only
  replaces a folder that is a prepared data directory (has manifest.json) or is empty, so a typo
  like `--out ~` cannot delete a home directory.
- Dedup is exact, by the sha256 of the cleaned text. Documents from `val_input` / `test_input`
  are read first; a document from `inputs` identical to one of them is removed (counted as
  `overlap_with_eval`, even with dedup off) so evaluation text never leaks into training.
  Explicit val/test files are also deduplicated against each other when dedup is on.
- The split is by document hash (see `split.py`): adding files never moves old documents.
- Every document's tokens are followed by the EOS id, so the loader can cut windows anywhere and
  the model still sees document boundaries.
- `load_data_dir` validates a prepared directory (manifest version, every shard header and size)
  and is what training and evaluation use to find shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args

import numpy as np
from tqdm import tqdm

from lmforge.atomic import write_json
from lmforge.data.clean import CleanStats, Normalization, clean_text, length_verdict
from lmforge.data.ingest import DocUnit, read_documents, resolve_inputs
from lmforge.data.shards import ShardWriter, dtype_for_vocab, read_header
from lmforge.data.split import SPLITS, assign_split, bucket, doc_digest
from lmforge.errors import DataError
from lmforge.fields import check, opt
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import MIN_BPE_VOCAB, train_bpe, train_char

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
_ENCODE_BATCH_DOCS = 1024
_ENCODE_BATCH_CHARS = 4_000_000
# BPE training memory grows with the number of distinct words it has seen, so a huge train split is
# sampled (by document hash, deterministically) down to about this many bytes; nanochat trains its
# tokenizer on ~2B characters for the same reason.
TOKENIZER_SAMPLE_BYTES = 1 << 30


@dataclass(kw_only=True)
class PrepareConfig:
    inputs: list[str] = field(
        default_factory=list,
        metadata={"help": "input files, folders (searched recursively) and glob patterns: .txt, .md, .jsonl (+ .gz)"},
    )
    out: str = opt("", "output data directory")
    text_field: str = opt("text", "JSONL field holding the document text")
    tokenizer: str = opt("bpe", "'bpe' (train byte-level BPE), 'char' (train character-level) or a tokenizer.json path")
    vocab_size: int = opt(4096, "vocabulary size for a trained BPE tokenizer (>= 257)")
    val_fraction: float = opt(0.05, "share of documents hashed into the validation split")
    test_fraction: float = opt(0.05, "share of documents hashed into the test split")
    val_input: list[str] = field(
        default_factory=list,
        metadata={"help": "files that ARE the validation split (then no documents are hashed into val)"},
    )
    test_input: list[str] = field(
        default_factory=list,
        metadata={"help": "files that ARE the test split (then no documents are hashed into test)"},
    )
    doc_unit: DocUnit = opt(
        "paragraph", "how .txt/.md files are cut into documents; each JSONL record is always one document"
    )
    min_chars: int = opt(1, "drop documents shorter than this many characters after cleaning")
    normalize: Normalization = opt("NFC", "Unicode normalization of the text")
    dedup: bool = opt(True, "remove exact duplicate documents (sha256 of the cleaned text)")
    shard_tokens: int = opt(50_000_000, "maximum tokens per shard file")
    overwrite: bool = opt(False, "replace the output directory if it already exists")

    def __post_init__(self) -> None:
        check(bool(self.inputs), "prepare needs at least one input file, folder or glob pattern")
        check(bool(self.out), "prepare needs an output directory (--out DIR)")
        check(bool(self.text_field), "text_field must not be empty; name the JSONL field holding the text")
        check(bool(self.tokenizer), "tokenizer must be 'bpe', 'char' or a path to a tokenizer.json")
        if self.tokenizer == "bpe":
            check(
                MIN_BPE_VOCAB <= self.vocab_size <= 2**32,
                f"vocab_size must be >= {MIN_BPE_VOCAB} (256 bytes + <|endoftext|>) for bpe, got {self.vocab_size}",
            )
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            check(0 <= value < 1, f"{name} must be in [0, 1), got {value}")
        check(
            self.val_fraction + self.test_fraction < 1,
            f"val_fraction + test_fraction must be < 1, got {self.val_fraction + self.test_fraction}",
        )
        check(self.doc_unit in get_args(DocUnit), f"doc_unit must be one of {get_args(DocUnit)}, got {self.doc_unit!r}")
        check(
            self.normalize in get_args(Normalization),
            f"normalize must be one of {get_args(Normalization)}, got {self.normalize!r}",
        )
        check(self.min_chars >= 0, f"min_chars must be >= 0, got {self.min_chars}")
        check(self.shard_tokens > 0, f"shard_tokens must be > 0, got {self.shard_tokens}")


# --------------------------------------------------------------------------------------------
# reading a prepared directory


@dataclass(frozen=True)
class DataDir:
    """A validated prepared data directory (see `load_data_dir`)."""

    path: Path
    manifest: dict[str, Any]
    tokenizer_path: Path

    def split_shards(self, split: str) -> list[Path]:
        """Shard paths of `split` ("train", "val" or "test"), in order; empty if the split has no data.

        Raises:
            DataError: unknown split name.
        """
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.path} has no split {split!r}; choose one of {', '.join(splits)}")
        return [self.path / name for name in splits[split]["shards"]]

    def split_tokens(self, split: str) -> int:
        """Number of tokens (EOS included) in `split`."""
        self.split_shards(split)
        return int(self.manifest["splits"][split]["tokens"])

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were encoded with."""
        return Tokenizer.load(self.tokenizer_path)


def load_data_dir(path: str | Path) -> DataDir:
    """Open and validate a directory written by `prepare`.

    Checks the manifest (readable, format version), that tokenizer.json exists, and every shard's
    header and size against the manifest's token counts (32 bytes read per shard).

    Raises:
        DataError: not a prepared directory, unreadable/foreign manifest, missing or damaged shard.
    """
    p = Path(path)
    manifest_path = p / MANIFEST
    if not p.is_dir() or not manifest_path.is_file():
        raise DataError(
            f"{p} is not a prepared data directory (no manifest.json); run 'lmforge prepare INPUT... --out {p}' first"
        )
    rerun = f"re-run 'lmforge prepare ... --out {p} --overwrite'"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{manifest_path} is unreadable ({e}); {rerun}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise DataError(f"{manifest_path} is not an lmforge data manifest; {rerun}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path} has format_version {manifest['format_version']}, "
            f"this lmforge reads {FORMAT_VERSION}; {rerun}"
        )
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(s), dict) for s in SPLITS):
        raise DataError(f"{manifest_path} lacks the 'splits' table; {rerun}")
    tokenizer_path = p / TOKENIZER
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path} is missing; {rerun}")
    for split, info in splits.items():
        found = 0
        for name in info.get("shards", []):
            _, count = read_header(p / name)  # missing, foreign or truncated shard -> DataError
            found += count
        if found != info.get("tokens"):
            raise DataError(
                f"{p}: {split} shards hold {found} tokens but the manifest says {info.get('tokens')}; {rerun}"
            )
    return DataDir(path=p, manifest=manifest, tokenizer_path=tokenizer_path)


# --------------------------------------------------------------------------------------------
# prepare


def _lmforge_version() -> str:
    try:
        from importlib.metadata import version

        return version("lmforge")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def _no_bar(progress: bool) -> bool | None:
    # tqdm's None = draw only on a terminal: logs and `2>file` keep one line per error, not bar frames
    return None if progress else True


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise DataError(
            f"output directory {out} already exists; pass --overwrite to replace it or choose another --out"
        )
    if not out.is_dir() or (not (out / MANIFEST).is_file() and any(out.iterdir())):
        raise DataError(f"refusing to overwrite {out}: it is not a prepared data directory; choose another --out")


class _Counts:
    """Document counters for the manifest (plain ints, updated in pass 1)."""

    def __init__(self) -> None:
        self.documents_in = 0
        self.removed = {"exact_dup": 0, "empty": 0, "too_short": 0, "overlap_with_eval": 0}
        self.cleaning = CleanStats()
        self.split_docs = dict.fromkeys(SPLITS, 0)
        self.split_bytes = dict.fromkeys(SPLITS, 0)


def _doc_file(tmp: Path, split: str) -> Path:
    # ".part" is no input format, so a stale tmp folder inside an input folder is never read back
    return tmp / f"docs-{split}.jsonl.part"


def _read_docs(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            yield json.loads(line)


def _pass1(
    cfg: PrepareConfig, sources: list[tuple[Path, str]], tmp: Path, counts: _Counts, bar: tqdm
) -> list[dict[str, Any]]:
    """Read, clean, filter, dedup and split every document into tmp/docs-<split>.jsonl.part."""
    explicit = frozenset(role for _, role in sources if role != "auto")
    # The dedup set is the only thing in `prepare` that grows with the corpus: 16 bytes of digest per
    # kept document (~100 bytes with Python's set overhead; 10M documents ~ 1 GB).
    seen: set[bytes] = set()
    eval_seen: set[bytes] = set()  # digests of explicit val/test documents: always kept, for leak removal
    outputs = {split: open(_doc_file(tmp, split), "w", encoding="utf-8", newline="\n") for split in SPLITS}
    inputs: list[dict[str, Any]] = []
    try:
        for path, role in sources:
            read = kept = 0
            for raw in read_documents(path, doc_unit=cfg.doc_unit, text_field=cfg.text_field, on_bytes=bar.update):
                read += 1
                counts.documents_in += 1
                if raw.invalid_utf8:
                    counts.cleaning.invalid_utf8_replaced += raw.invalid_utf8
                    counts.cleaning.documents_with_invalid_utf8 += 1
                cleaned = clean_text(raw.text, cfg.normalize)
                counts.cleaning.control_chars_removed += cleaned.control_chars_removed
                counts.cleaning.normalized_documents += cleaned.normalized
                verdict = length_verdict(cleaned.text, cfg.min_chars)
                if verdict != "ok":
                    counts.removed[verdict] += 1
                    continue
                digest = doc_digest(cleaned.text)
                key = digest[:16]
                if role == "auto" and key in eval_seen:
                    counts.removed["overlap_with_eval"] += 1
                    continue
                if cfg.dedup:
                    if key in seen:
                        counts.removed["exact_dup"] += 1
                        continue
                    seen.add(key)
                if role == "auto":
                    split = assign_split(
                        digest, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, explicit=explicit
                    )
                else:
                    split = role
                    eval_seen.add(key)
                outputs[split].write(json.dumps(cleaned.text, ensure_ascii=False) + "\n")
                counts.split_docs[split] += 1
                counts.split_bytes[split] += len(cleaned.text.encode("utf-8"))
                kept += 1
            inputs.append(
                {"path": str(path), "bytes": path.stat().st_size, "documents": read, "kept": kept, "role": role}
            )
    finally:
        for f in outputs.values():
            f.close()
    return inputs


def _sample_docs(path: Path, fraction: float) -> Iterator[str]:
    """Documents of `path`, each kept with probability `fraction`, decided by its hash (deterministic)."""
    for text in _read_docs(path):
        # digest bytes 8..16: independent of the split bucket, which uses bytes 0..8
        if fraction >= 1 or bucket(doc_digest(text)[8:16]) < fraction:
            yield text


def _make_tokenizer(
    cfg: PrepareConfig, given: Tokenizer | None, train_docs: Path, train_bytes: int, progress: bool
) -> tuple[Tokenizer, str]:
    if given is not None:
        return given, "file"
    if cfg.tokenizer == "bpe":
        # the Rust trainer draws its own bar, and only prints stray newlines when stderr is no terminal
        show = progress and sys.stderr.isatty()
        texts = _sample_docs(train_docs, TOKENIZER_SAMPLE_BYTES / max(train_bytes, 1))
        return train_bpe(texts, cfg.vocab_size, show_progress=show), "bpe"
    return train_char(_read_docs(train_docs)), "char"  # memory: one counter per distinct character


def _encode_split(
    tok: Tokenizer, docs: Path, out_dir: Path, split: str, dtype: type[np.unsignedinteger], max_tokens: int, bar: tqdm
) -> tuple[list[str], int]:
    """Encode one split's documents (EOS after each) into shards; return (shard names, tokens)."""
    writer = ShardWriter(out_dir, split, dtype, max_tokens)
    eos = tok.eos_id

    def flush(batch: list[str]) -> None:
        encoded = tok.encode_batch(batch)
        tokens = np.empty(sum(len(ids) + 1 for ids in encoded), dtype=dtype)
        at = 0
        for ids in encoded:
            tokens[at : at + len(ids)] = ids
            tokens[at + len(ids)] = eos
            at += len(ids) + 1
        writer.write(tokens)
        bar.update(sum(len(text.encode("utf-8")) for text in batch))

    try:
        batch: list[str] = []
        chars = 0
        for text in _read_docs(docs):
            batch.append(text)
            chars += len(text)
            if len(batch) >= _ENCODE_BATCH_DOCS or chars >= _ENCODE_BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
        return writer.close(), writer.total_tokens
    except BaseException:
        writer.abort()
        raise


def prepare(cfg: PrepareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Turn raw text files into a prepared data directory (see the module docstring).

    Args:
        cfg: what to read, how to clean/split/tokenize, where to write.
        progress: show progress bars on stderr.

    Returns:
        The manifest dict, as written to `<out>/manifest.json`.

    Raises:
        DataError: missing/binary/malformed inputs, no documents, or an existing output directory.
    """
    out = Path(os.path.abspath(cfg.out))  # absolute, so "out/" or "." still has a name for the siblings
    tmp = out.with_name(out.name + ".tmp")
    old = out.with_name(out.name + ".tmp.old")  # both names are ours: "<out>.tmp*"
    _check_out(out, cfg.overwrite)
    given: Tokenizer | None = None
    if cfg.tokenizer not in ("bpe", "char"):  # load (and check) an existing tokenizer before the long read
        given = Tokenizer.load(cfg.tokenizer)
        given.eos_id  # noqa: B018 - raises DataError if the tokenizer has no end-of-text token
    if tmp.exists():  # left over from a crashed run; it is ours by name
        shutil.rmtree(tmp)

    val_files, val_skipped = resolve_inputs(cfg.val_input) if cfg.val_input else ([], [])
    test_files, test_skipped = resolve_inputs(cfg.test_input) if cfg.test_input else ([], [])
    train_files, skipped = resolve_inputs(cfg.inputs)
    eval_files = {p.resolve() for p in val_files + test_files}
    # Explicit eval files are read first (their documents win dedup) and never also read as `inputs`.
    sources = [(p, "val") for p in val_files] + [(p, "test") for p in test_files]
    sources += [(p, "auto") for p in train_files if p.resolve() not in eval_files]
    skipped_files = sorted(set(skipped + val_skipped + test_skipped))
    if not sources:
        raise DataError("no readable .txt, .md or .jsonl files in the inputs; check the paths")

    tmp.mkdir(parents=True)
    try:
        counts = _Counts()
        total_bytes = sum(p.stat().st_size for p, _ in sources)
        with tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="reading", disable=_no_bar(progress), file=sys.stderr
        ) as bar:
            inputs = _pass1(cfg, sources, tmp, counts, bar)
        documents_out = sum(counts.split_docs.values())
        if counts.documents_in == 0:
            raise DataError(f"no documents found in {len(sources)} input file(s): they are empty or blank")
        if documents_out == 0:
            raise DataError(
                f"no documents left from {len(sources)} input file(s) ({counts.documents_in} read; all empty, "
                "too short or duplicates); check the files, --text-field and --min-chars"
            )
        if counts.split_docs["train"] == 0:
            raise DataError(
                f"all {documents_out} documents went to val/test, none to train; "
                "add data or lower --val-fraction/--test-fraction"
            )

        tok, kind = _make_tokenizer(cfg, given, _doc_file(tmp, "train"), counts.split_bytes["train"], progress)
        dtype = dtype_for_vocab(tok.vocab_size)
        splits: dict[str, Any] = {}
        with tqdm(
            total=sum(counts.split_bytes.values()),
            unit="B",
            unit_scale=True,
            desc="tokenizing",
            disable=_no_bar(progress),
            file=sys.stderr,
        ) as bar:
            for split in SPLITS:
                shards, tokens = _encode_split(tok, _doc_file(tmp, split), tmp, split, dtype, cfg.shard_tokens, bar)
                splits[split] = {
                    "documents": counts.split_docs[split],
                    "tokens": tokens,
                    "bytes": counts.split_bytes[split],
                    "shards": shards,
                }
                _doc_file(tmp, split).unlink()

        manifest = {
            "format_version": FORMAT_VERSION,
            "lmforge_version": _lmforge_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": dataclasses.asdict(cfg),
            "inputs": inputs,
            "skipped_files": skipped_files,
            "documents": {"in": counts.documents_in, "out": documents_out, "removed": dict(counts.removed)},
            "cleaning": counts.cleaning.to_dict(),
            "tokenizer": {"kind": kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "sha256": tok.fingerprint},
            "dtype": np.dtype(dtype).name,
            "splits": splits,
        }
        tok.save(tmp / TOKENIZER)
        write_json(tmp / MANIFEST, manifest)

        # Swap into place: the old directory (if any) is moved aside first, so <out> is never partial.
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():  # interrupted mid-swap: put the previous data back
            os.replace(old, out)
        raise
