"""`lmforge prepare`: raw text -> cleaned, filtered, deduplicated, split, tokenized shards + manifest + card.

    inputs ─read blocks─► [worker: parse ─► clean ─► rewrite ─► filter ─► sha256 ─► split ─► encode* ─► minhash**]
    (ingest.py)           (blocks.py; clean.py, filters.py: DocumentCleaner; fast_encode.py; dedup.py)
                          ─► dedup (dedup.py, here: in input order, in this process)
       * tokenizer.json given: ids go straight into TMP/{train,val,test}-NNNNN.bin (one pass)
       * tokenizer trained:    texts go to TMP/docs-<split>.jsonl.part; train bpe/char/wordpiece/
                               unigram on train; pass 2 encodes the files into the shards (tokenizing.py)
      ** --dedup near: each document's MinHash signature, so this process only looks up and inserts LSH bands
            TMP/{manifest.json, card.json, card.md, length_hist.png} ──► os.replace(TMP, <out>)
    (TMP = .<out>.lmforge-tmp-<random>/, a sibling of <out> no user folder can be; atomic.py)

Key design decisions:
- Streaming, so memory does not grow with the corpus (except the dedup indexes). With a given
  tokenizer.json there is one pass; a tokenizer to be trained needs the kept texts first, so pass 1
  writes them to temporary JSONL files per split, the tokenizer is trained from an iterator over the
  train file only (no eval leakage into the vocabulary; a train split over 1 GiB is sampled by
  document hash for tokenizer training, whose memory grows with the distinct words it sees, and so
  are the Chinese and Japanese documents over 20 MB for BPE, 2 MB for Unigram: tokenizing.py), and
  pass 2 encodes the temporary files in batches.
- Pass 1 works on blocks of ~4 MB (text and JSONL files are cut at document boundaries as raw
  bytes; other formats are read here and sent as batches of texts). A text file's document that grows past
  LONG_DOCUMENT_BYTES (16 MiB) with no boundary in sight (one giant line; a whole file with --doc-unit file) is
  streamed instead, when nothing needs its whole text (near dedup, --normalize-whitespace,
  --boilerplate and the repetition filters are off): read in ~1 MiB chunks (`ingest.LongDocument`), cleaned,
  filtered, hashed (split, exact dedup) and written a chunk at a time (`BlockWorker._long_document`) to a
  spill file that is copied into its split's docs file (a given tokenizer.json: encoded from it a piece at a
  time into its split's shards, `Encoded.write_long`), in this process and in input order, with the
  output of reading it whole (tested); pass 2 reads it in chunks too (tokenizing.py). Otherwise it is held
  whole (about 4 times its size at the peak). `--workers N` runs the per-block
  work (`BlockWorker`: parse, clean, filter, hash, split, encode) in N processes, at most 2N blocks
  in flight, results taken in input order; this process only deduplicates (order matters there),
  counts and writes, so the output is byte-identical for any N. With N = 1 the same code runs here.
- Encoding uses `DocumentEncoder` (fast_encode.py): exactly the ids of HF `encode_batch`, but
  GPT-2-style BPE tokenizers encode each distinct word once and reuse its ids (measured 6x faster on
  English); worker processes run the Rust library single-threaded and are forked with
  TOKENIZERS_PARALLELISM=false, so they cannot deadlock on a thread pool the parent started.
- Every removal has its own counter in `manifest["documents"]["removed"]` (all keys always present,
  0 when a filter is off), and the card records documents and bytes after each step.
- Layout: `prepare()` and its two passes read here in the order the data flows, and the config's
  checks (flags `--merge` refuses) sit with it; the `--dedup-report` file (its path checks and writing,
  shared with `--merge`) is in dedup_report.py, the per-block work in
  blocks.py, the tokenizer stage (training, encoding into shards, the tokenizer report) in
  tokenizing.py, the reader of a prepared directory in datadir.py, and the config (~150 lines of
  typed, documented flags) stays beside the function it drives.
- Nothing half-written ever appears at `<out>`: everything is built in a hidden sibling folder and
  renamed into place at the end; on any error (or Ctrl-C) that folder is removed. `--overwrite` only
  replaces a folder that is a prepared data directory (has manifest.json) or is empty, so a typo
  like `--out ~` cannot delete a home directory.
- Dedup (`--dedup exact`, the default) is by the sha256 of the cleaned text; `--dedup near` adds
  MinHash LSH (dedup.py). Documents from `val_input` / `test_input`
  are read first; a document from `inputs` identical to one of them is removed (counted as
  `overlap_with_eval`, even with dedup off) so evaluation text never leaks into training.
  Explicit val/test files are also deduplicated against each other when dedup is on.
- The split is by document hash (see `split.py`): adding files never moves old documents.
- Every document's tokens are followed by the EOS id, so the loader can cut windows anywhere and
  the model still sees document boundaries.
- `load_data_dir` validates a prepared directory (manifest version, every shard header and size)
  and is what training and evaluation use to find shards.

Length (~860 lines, over the 800-line guide): `prepare` reads as its two passes in order (`_pass1`, `_pass2`,
and the counting between them, `_Counts`) with `PrepareConfig`'s ~185 lines of fields and checks above them; the
next split would be `PrepareConfig` into a module of its own, as `config.py` holds the training settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from tqdm import tqdm

from lmforge.atomic import (
    check_not_inside,
    discard_tmp_dir,
    fresh_tmp_dir,
    naming,
    publish_dir,
    write_json,
)
from lmforge.data.blocks import BlockResult, BlockWorker, Task, init_pool_worker, run_in_pool_worker
from lmforge.data.clean import MAX_INVALID_UTF8, CleanStats, Normalization, check_encoding
from lmforge.data.datadir import FORMAT_VERSION, MANIFEST, TOKENIZER, DataDir, load_data_dir  # noqa: F401 (re-exported)
from lmforge.data.dedup import DedupMode, NearDedup
from lmforge.data.dedup_report import check_report_not_read, dedup_report_path, write_dedup_report
from lmforge.data.filters import LANGUAGES, REMOVAL_REASONS, DocumentCleaner, language_list
from lmforge.data.ingest import (
    BLOCK_BYTES,
    DEFAULT_MAX_LINE_BYTES,
    LONG_DOCUMENT_BYTES,
    DocUnit,
    LongDocument,
    RawDocument,
    input_bytes,
    no_text_error,
    read_blocks,
    read_documents,
    reads_in_blocks,
    resolve_inputs,
    skipped_json,
    unread_compressed,
    writable_text,
)
from lmforge.data.shards import dtype_for_vocab
from lmforge.data.split import SPLITS
from lmforge.data.tokenizing import (
    TRAINED_TOKENIZERS,
    UNSPACED_LANGUAGES,
    Encoded,
    encode_split,
    make_tokenizer,
    tokenizer_kind,
    tokenizer_report,
    top_tokens,
)
from lmforge.errors import DataError, LmforgeError
from lmforge.fields import changed_fields, check, opt
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import EXTRA_SPECIALS, MIN_BPE_VOCAB

_TASK_DOCS = 4096  # documents per task for inputs read in this process (CSV, Parquet, ...)
# What `--merge` applies (merge.py); every other option is the parts' and is refused with it.
_MERGE_FLAGS = frozenset(
    {"inputs", "out", "merge", "dedup", "near_threshold", "dedup_report", "shard_tokens", "card", "overwrite"}
)
REMOVED_KEYS = ("exact_dup", "near_dup", "no_text", "empty", "too_short") + REMOVAL_REASONS + ("overlap_with_eval",)


@dataclass(kw_only=True)
class PrepareConfig:
    inputs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "input files, folders (searched recursively), glob patterns, save_to_disk dataset folders "
            "and hf:NAME[:CONFIG][:SPLIT] hub datasets: .txt .md .jsonl .json .csv .tsv (+ .gz/.zst), .parquet"
        },
    )
    out: str = opt("", "output data directory")
    text_field: str = opt("text", "JSONL field / CSV, TSV, Parquet or dataset column holding the document text")
    tokenizer: str = opt(
        "bpe",
        "'bpe' (byte-level BPE), 'char', 'wordpiece' (BERT-style), 'unigram' (SentencePiece-style) "
        "or a tokenizer.json path",
    )
    vocab_size: int = opt(4096, "vocabulary size for a trained bpe/wordpiece/unigram tokenizer")
    special_tokens: Literal["eos", "all"] = opt(
        "eos",
        "bpe only: 'all' also reserves <|pad|> <|mask|> <|sep|> <|cls|> <|system|> <|user|> <|assistant|> "
        "(wordpiece and unigram always have them)",
    )
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
    normalize: Normalization = opt("NFC", "Unicode normalization of the text")
    normalize_whitespace: bool = opt(False, "collapse spaces/tabs, cut indents/trailing spaces, keep <= 1 blank line")
    boilerplate: bool = opt(False, "remove short boilerplate lines (cookies, 'All rights reserved', 版权所有, ...)")
    min_chars: int = opt(1, "drop documents shorter than this many characters after cleaning")
    max_chars: int = opt(0, "drop documents longer than this many characters (0 = no limit)")
    max_char_repetition: float = opt(
        0.0, "drop documents whose share of repeated character 10-grams is above this (0 = off; try 0.5)"
    )
    max_line_repetition: float = opt(
        0.0, "drop documents whose share of repeated lines is above this (0 = off; Gopher uses 0.3)"
    )
    min_alpha_ratio: float = opt(
        0.0, "drop documents whose letters (any script, Han included) / visible characters is below this (0 = off)"
    )
    languages: str = opt(
        "",
        f"keep only these guessed languages, comma-separated, any case (e.g. 'zh,en' or 'ZH,En'; from "
        f"{', '.join(LANGUAGES)}; 'latin' is every Latin-script language but English, the named ones included)",
    )
    dedup: DedupMode = opt("exact", "'exact' (sha256 of the cleaned text), 'near' (exact + MinHash LSH) or 'none'")
    near_threshold: float = opt(
        0.8, "Jaccard similarity of 5-character shingles at or above which documents are near-duplicates"
    )
    dedup_report: str = opt("", "write example near-duplicate pairs to this file (JSONL)")
    max_line_bytes: int = opt(DEFAULT_MAX_LINE_BYTES, "longest line (or 'file'-unit document) accepted, in bytes")
    max_invalid_utf8: float = opt(
        MAX_INVALID_UTF8,
        "stop when a file's invalid UTF-8 sequences exceed this share of its characters (and 16): "
        "it mixes encodings; 1 = only replace and count",
    )
    shard_tokens: int = opt(50_000_000, "maximum tokens per shard file (a training window never crosses a shard)")
    merge: bool = opt(
        False, "the inputs are prepared data directories (parts, same tokenizer): merge them into --out, deduplicated"
    )
    workers: int = opt(1, "processes that parse, clean, filter and encode blocks of input (1 = this process only)")
    card: bool = opt(True, "write card.md, card.json and length_hist.png into the output directory")
    overwrite: bool = opt(False, "replace the output directory if it already exists")

    def __post_init__(self) -> None:
        check(bool(self.inputs), "prepare needs at least one input file, folder or glob pattern")
        check(bool(self.out), "prepare needs an output directory (--out DIR)")
        if self.merge:  # first: a flag --merge does not apply is refused as such, not range-checked
            self.check_merge_flags(set())
        check(bool(self.text_field), "--text-field must not be empty; name the JSONL field holding the text")
        check(
            bool(self.tokenizer), "--tokenizer must be 'bpe', 'char', 'wordpiece', 'unigram' or a tokenizer.json path"
        )
        if self.tokenizer == "bpe":
            least = MIN_BPE_VOCAB + (len(EXTRA_SPECIALS) if self.special_tokens == "all" else 0)
            check(
                least <= self.vocab_size <= 2**32,
                f"--vocab-size must be >= {least} (256 bytes + special tokens) for bpe, got {self.vocab_size}",
            )
        if self.tokenizer == "wordpiece":
            check(self.vocab_size >= 64, f"--vocab-size must be >= 64 for wordpiece, got {self.vocab_size}")
        if self.tokenizer == "unigram":
            check(
                self.vocab_size >= 281,
                f"--vocab-size must be >= 281 for unigram (specials + bytes), got {self.vocab_size}",
            )
        check(
            self.special_tokens in ("eos", "all"),
            f"--special-tokens must be 'eos' or 'all', got {self.special_tokens!r}",
        )
        check(  # (wordpiece and unigram always reserve them; char and a given tokenizer.json cannot)
            self.special_tokens == "eos" or self.tokenizer in ("bpe", "wordpiece", "unigram"),
            f"--special-tokens all applies to a trained bpe tokenizer, not --tokenizer {self.tokenizer}; drop it",
        )
        if isinstance(self.dedup, bool):  # older configs said dedup = true/false
            object.__setattr__(self, "dedup", "exact" if self.dedup else "none")
        check(self.dedup in get_args(DedupMode), f"--dedup must be one of {get_args(DedupMode)}, got {self.dedup!r}")
        check(
            not self.dedup_report or self.dedup == "near",
            "--dedup-report lists near-duplicate pairs; add --dedup near",
        )
        check(0 < self.near_threshold < 1, f"--near-threshold must be in (0, 1), got {self.near_threshold}")
        check(self.max_chars >= 0, f"--max-chars must be >= 0 (0 = no limit), got {self.max_chars}")
        check(
            self.max_chars == 0 or self.max_chars >= self.min_chars,
            f"--max-chars ({self.max_chars}) must be >= --min-chars ({self.min_chars})",
        )
        for name in ("max_char_repetition", "max_line_repetition", "min_alpha_ratio"):
            value = getattr(self, name)
            check(0 <= value <= 1, f"--{name.replace('_', '-')} must be in [0, 1] (0 = off), got {value}")
        check(
            0 <= self.max_invalid_utf8 <= 1,
            f"--max-invalid-utf8 must be in [0, 1] (0 = strictest, 1 = replace and count), got {self.max_invalid_utf8}",
        )
        unknown = set(language_list(self.languages)) - set(LANGUAGES)
        check(
            not unknown,
            f"--languages: unknown language{'s' if len(unknown) > 1 else ''} {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(LANGUAGES)} (any case)",
        )
        check(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        check(self.max_line_bytes > 0, f"--max-line-bytes must be > 0, got {self.max_line_bytes}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            check(0 <= value < 1, f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        check(
            self.val_fraction + self.test_fraction < 1,
            f"--val-fraction + --test-fraction must be < 1, got {self.val_fraction + self.test_fraction}",
        )
        check(
            self.doc_unit in get_args(DocUnit), f"--doc-unit must be one of {get_args(DocUnit)}, got {self.doc_unit!r}"
        )
        check(
            self.normalize in get_args(Normalization),
            f"--normalize must be one of {get_args(Normalization)}, got {self.normalize!r}",
        )
        check(self.min_chars >= 0, f"--min-chars must be >= 0, got {self.min_chars}")
        check(
            self.shard_tokens >= 64,
            f"--shard-tokens must be >= 64 (tiny shards only multiply files; default 50M), got {self.shard_tokens}",
        )

    def check_written(self, written: set[str]) -> None:
        """The CLI's flags `written` (even at their default value) that this config would not apply are refused,
        naming the flag: those --merge does not apply, --vocab-size for a tokenizer prepare does not train and
        --near-threshold without --dedup near (each was ignored without a word)."""
        if self.merge:
            self.check_merge_flags(written)
        if "vocab_size" in written:
            kind = "char keeps every character it finds" if self.tokenizer == "char" else "FILE has its own vocabulary"
            check(
                self.tokenizer in ("bpe", "wordpiece", "unigram"),
                f"--vocab-size sizes a tokenizer that prepare trains (bpe, wordpiece, unigram); --tokenizer {kind}; "
                "drop --vocab-size",
            )
        check(
            "near_threshold" not in written or self.dedup == "near",
            f"--near-threshold applies to near-duplicate removal, not --dedup {self.dedup}; add --dedup near or drop "
            "--near-threshold",
        )

    def check_merge_flags(self, written: set[str]) -> None:
        """--merge copies the parts' tokens: reading, cleaning, filtering, splitting and tokenizing
        options were the parts' to apply. Given anyway they would be recorded in manifest.config as
        if applied, so a value other than the default is refused, naming the flag, and so is a flag
        in `written` (the CLI's: written at its default value, it would still do nothing)."""
        given = changed_fields(self) | written
        for f in fields(self):
            if f.name not in _MERGE_FLAGS and f.name in given:
                flag = "--" + f.name.replace("_", "-")
                check(False, f"{flag} is not applied by --merge (the parts were already prepared); drop it")


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


def check_out(out: Path, overwrite: bool) -> None:
    from lmforge.runs import check_holds_no_run, check_not_in_run

    check_not_in_run(out, error=DataError)  # `pretrain --overwrite` of that run would delete the data with it
    if not out.exists():
        # the nearest existing parent must be a folder (it said "[Errno 17] File exists" after the whole read)
        parent = next(p for p in out.parents if p.exists())
        if not parent.is_dir():
            raise DataError(f"cannot make --out {out}: {parent} is a file, not a folder; choose another --out")
        return
    replaceable = out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))
    if not overwrite and not replaceable:  # (it said "pass --overwrite", which then refused it)
        what = "a file" if not out.is_dir() else "not a prepared data directory"
        raise DataError(f"output directory {out} already exists and is {what}; choose another --out")
    if not overwrite:
        raise DataError(
            f"output directory {out} already exists; pass --overwrite to replace it or choose another --out"
        )
    if not replaceable:
        raise DataError(f"refusing to overwrite {out}: it is not a prepared data directory; choose another --out")
    # a run trained into the data (`pretrain --out D/run`, which pretrain now refuses) went with the old folder
    check_holds_no_run(out, error=DataError)


def output_dir(cfg: PrepareConfig) -> Path:
    """The absolute output dir ("out/" or "." still has a name), checked to be neither an input nor a
    folder holding one (--overwrite would delete it). It may sit inside an input folder: it is
    built in a hidden sibling (`atomic.fresh_tmp_dir`) after the inputs are listed, and its shards
    and temporary ".part" files are no input format."""
    out = Path(os.path.abspath(cfg.out))
    for source in [*cfg.inputs, *cfg.val_input, *cfg.test_input]:
        check_not_inside(out, Path(source), out_may_sit_inside=True)
    return out


class _Counts:
    """Counters for the manifest and the data card (plain ints, updated in pass 1)."""

    def __init__(self) -> None:
        self.documents_in = 0
        self.removed = dict.fromkeys(REMOVED_KEYS, 0)
        self.removed_bytes = dict.fromkeys(REMOVED_KEYS, 0)
        self.cleaning = CleanStats()
        self.split_docs = dict.fromkeys(SPLITS, 0)
        self.split_bytes = dict.fromkeys(SPLITS, 0)
        # documents and UTF-8 bytes after each step (see card.py)
        self.steps = {step: [0, 0] for step in ("read", "cleaned", "filtered", "deduplicated")}
        self.languages: Counter[str] = Counter()
        self.length_hist: Counter[int] = Counter()  # bit_length(characters) of kept documents
        self.train_language_bytes = np.zeros(len(LANGUAGES), dtype=np.int64)  # for the tokenizer's sample

    def remove(self, reason: str, nbytes: int) -> None:
        self.removed[reason] += 1
        self.removed_bytes[reason] += nbytes

    def add_block(self, r: BlockResult) -> None:
        """Count a block's documents as read, cleaned and filtered (before dedup)."""
        self.documents_in += r.documents
        self.steps["read"][0] += r.documents
        self.steps["read"][1] += r.raw_bytes
        c = self.cleaning
        c.invalid_utf8_replaced += r.invalid_utf8
        c.documents_with_invalid_utf8 += r.documents_with_invalid_utf8
        c.control_chars_removed += r.control_chars_removed
        c.normalized_documents += r.normalized_documents
        c.whitespace_normalized_documents += r.whitespace_normalized_documents
        c.boilerplate_lines_removed += r.boilerplate_lines_removed
        for reason, (docs, nbytes) in r.removed.items():
            self.removed[reason] += docs
            self.removed_bytes[reason] += nbytes
        for step, (docs, nbytes) in (("cleaned", r.cleaned), ("filtered", r.filtered)):
            self.steps[step][0] += docs
            self.steps[step][1] += nbytes

    def add_kept(self, r: BlockResult, keep: np.ndarray) -> None:
        """Count the documents of a block that survived dedup (`keep`) per split, language and length."""
        nbytes, splits, languages = r.nbytes[keep], r.splits[keep], r.languages[keep]
        self.steps["deduplicated"][0] += len(nbytes)
        self.steps["deduplicated"][1] += int(nbytes.sum())
        for index, split in enumerate(SPLITS):
            mask = splits == index
            self.split_docs[split] += int(mask.sum())
            self.split_bytes[split] += int(nbytes[mask].sum())
        train = splits == SPLITS.index("train")
        np.add.at(self.train_language_bytes, languages[train], nbytes[train])
        # languages in order of first appearance, so that ties in most_common() keep the input order
        found, first = np.unique(languages, return_index=True)
        per_language = np.bincount(languages, minlength=len(LANGUAGES))
        for language in found[np.argsort(first)].tolist():
            self.languages[LANGUAGES[language]] += int(per_language[language])
        per_bits = np.bincount(r.length_bits[keep])
        for bits in np.flatnonzero(per_bits).tolist():
            self.length_hist[bits] += int(per_bits[bits])


def _copy_spilled(spill: str, out: Any) -> None:
    """Write the JSON string content in file `spill` to docs file `out` as one JSON line, a chunk at a time."""
    out.write('"')
    with open(spill, encoding="utf-8", newline="\n") as f:
        while chunk := f.read(1 << 20):
            out.write(chunk)
    out.write('"\n')


def _doc_file(tmp: Path, split: str) -> Path:
    # ".part" is no input format, so a stale tmp folder inside an input folder is never read back
    return tmp / f"docs-{split}.jsonl.part"


def _tasks(
    cfg: PrepareConfig, sources: list[tuple[Path, str]], bar: tqdm, spill: Path | None
) -> Iterator[tuple[int, Task | None]]:
    """(source index, task) for every block of every input, in order; (index, None) closes an input. With `spill`,
    a text file's document over LONG_DOCUMENT_BYTES is a task of its own, streamed (its text goes to `spill`)."""
    long_bytes = LONG_DOCUMENT_BYTES if spill is not None else None
    for index, (path, role) in enumerate(sources):
        if reads_in_blocks(path, cfg.doc_unit):
            for block in read_blocks(
                path, doc_unit=cfg.doc_unit, on_bytes=bar.update, max_line_bytes=cfg.max_line_bytes,
                block_bytes=BLOCK_BYTES, long_bytes=long_bytes,
            ):  # fmt: skip
                if isinstance(block, LongDocument):
                    yield index, Task(str(path), role, long=block, spill=str(spill))
                else:
                    yield index, Task(str(path), role, block=block)
        else:
            docs = read_documents(
                path, doc_unit=cfg.doc_unit, text_field=cfg.text_field, on_bytes=bar.update,
                max_line_bytes=cfg.max_line_bytes,
            )  # fmt: skip
            batch: list[RawDocument] = []
            chars = 0
            for doc in docs:
                batch.append(doc)
                chars += len(doc.text or "")
                if len(batch) >= _TASK_DOCS or chars >= BLOCK_BYTES:
                    yield index, Task(str(path), role, docs=batch)
                    batch, chars = [], 0
            if batch:
                yield index, Task(str(path), role, docs=batch)
        yield index, None


def _results(
    worker: BlockWorker, tasks: Iterator[tuple[int, Task | None]], pool: Any, window: int
) -> Iterator[tuple[int, BlockResult | None]]:
    """Run the tasks (in `pool`, at most `window` at a time, or here) and yield the results in task order. A long
    document's task runs here, after the tasks before it: it reads its text from the input as it goes."""
    if pool is None:
        for index, task in tasks:
            yield index, (worker(task) if task is not None else None)
        return
    pending: deque[tuple[int, Any]] = deque()
    while True:
        try:
            item = next(tasks, None)
        except LmforgeError:
            for _, job in pending:  # an error in an earlier block wins, as in one process
                if job is not None:
                    job.get()
            raise
        if item is None:
            break
        index, task = item
        if task is not None and task.long is not None:
            while pending:
                earlier, job = pending.popleft()
                yield earlier, (job.get() if job is not None else None)
            yield index, worker(task)
            continue
        pending.append((index, pool.apply_async(run_in_pool_worker, (task,)) if task is not None else None))
        while len(pending) > window:
            index, job = pending.popleft()
            yield index, (job.get() if job is not None else None)
    while pending:
        index, job = pending.popleft()
        yield index, (job.get() if job is not None else None)


def _pass1(
    cfg: PrepareConfig,
    sources: list[tuple[Path, str]],
    tmp: Path,
    counts: _Counts,
    bar: tqdm,
    worker: BlockWorker,
    pool: Any,
    encoded: Encoded | None,
) -> tuple[list[dict[str, Any]], NearDedup | None]:
    """Read, clean, filter, dedup and split every document (see blocks.py for the per-block part).

    With `encoded` (the tokenizer is given), tokens go straight into its shard writers; otherwise the
    kept texts go into tmp/docs-<split>.jsonl.part for tokenizer training and pass 2.
    """
    # The dedup indexes are the only things in `prepare` that grow with the corpus: 16 bytes of digest
    # per kept document (~100 bytes with Python's set overhead; 10M documents ~ 1 GB), plus ~0.8 KB per
    # kept document for near dedup (see dedup.py).
    seen: set[bytes] = set()
    eval_seen: set[bytes] = set()  # digests of explicit val/test documents: always kept, for leak removal
    near = None
    if cfg.dedup == "near":
        near = NearDedup(
            threshold=cfg.near_threshold, max_examples=20 if cfg.dedup_report else 0, snippet_dir=str(tmp.parent)
        )
    outputs = {}
    if encoded is None:
        outputs = {split: open(_doc_file(tmp, split), "w", encoding="utf-8", newline="\n") for split in SPLITS}
    # A text file's document too long for a block is streamed through cleaning into this file, then copied into
    # its split's docs file (or, with a given tokenizer, encoded from it into its split's shards), so memory holds
    # a chunk of it, not it: when nothing needs its whole text (near dedup is off, and so are the rewrites and
    # filters that need it).
    streamed = near is None and worker.cleaner.streams()
    spill = tmp / "long-document.part" if streamed else None
    inputs: list[dict[str, Any]] = []
    # documents read, kept, invalid UTF-8 sequences, characters, no text, rows without the field, JSON's lone
    # surrogates (replaced and counted as invalid UTF-8, but no sign of another encoding) of the current input
    per_file = [0, 0, 0, 0, 0, 0, 0]
    first_missing: str | None = None
    try:
        for index, r in _results(worker, _tasks(cfg, sources, bar, spill), pool, window=2 * cfg.workers):
            path, role = sources[index]
            if r is None:  # end of this input
                read, kept, invalid, chars, no_text, missing, surrogates = per_file
                if read and missing == read:  # (a block-read file; read_documents checks the others)
                    raise no_text_error(first_missing or "")
                check_encoding(path, invalid - surrogates, chars, cfg.max_invalid_utf8)
                inputs.append({
                    "path": str(path), "bytes": input_bytes(path), "documents": read, "kept": kept, "role": role,
                    "invalid_utf8_replaced": invalid, "lone_surrogates_replaced": surrogates, "no_text": no_text,
                })  # fmt: skip
                per_file, first_missing = [0, 0, 0, 0, 0, 0, 0], None
                continue
            counts.add_block(r)
            keep = np.ones(len(r.keys), dtype=bool)
            nbytes = r.nbytes.tolist()
            auto = role == "auto"
            exact = cfg.dedup != "none"
            unique = []  # documents of the block that are neither exact duplicates nor eval text, in order
            for i, key in enumerate(r.keys):
                if auto and key in eval_seen:
                    counts.remove("overlap_with_eval", nbytes[i])
                    keep[i] = False
                elif exact and key in seen:
                    counts.remove("exact_dup", nbytes[i])
                    keep[i] = False
                else:
                    if exact:
                        seen.add(key)
                    unique.append(i)
            if near is not None and unique:  # (near dedup a block at a time: NearDedup looks its keys up at once)
                # (the texts only for --dedup-report's snippets: workers encoding the tokens send none else)
                texts = [r.texts[i] for i in unique] if r.texts is not None else [""] * len(unique)
                for i, duplicate in zip(unique, near.duplicates(texts, r.signatures[unique]), strict=True):
                    if duplicate:
                        counts.remove("near_dup", nbytes[i])
                        keep[i] = False
            if not auto:
                eval_seen.update(r.keys[i] for i in unique if keep[i])
            kept = int(keep.sum())
            per_file[0] += r.documents
            per_file[1] += kept
            per_file[2] += r.invalid_utf8
            per_file[3] += r.chars
            per_file[4] += r.removed["no_text"][0]
            per_file[5] += r.missing
            per_file[6] += r.surrogates
            first_missing = first_missing or r.first_missing
            if not kept:
                continue
            counts.add_kept(r, keep)
            if encoded is not None and r.spill is not None:  # a long document (one): encoded from the spill file
                encoded.write_long(r, worker.encoder())
            elif encoded is not None:
                encoded.write(r, keep)
            elif r.spill is not None:  # a long document (one), its text not held: copied from the spill file
                _copy_spilled(r.spill, outputs[SPLITS[r.splits[0]]])
            else:
                for i in np.flatnonzero(keep).tolist():
                    outputs[SPLITS[r.splits[i]]].write(json.dumps(r.texts[i], ensure_ascii=False) + "\n")
    finally:
        for f in outputs.values():
            f.close()
        if spill is not None:
            spill.unlink(missing_ok=True)
    return inputs, near


def _pass2(
    cfg: PrepareConfig, tmp: Path, counts: _Counts, splits: dict[str, Any], report_split: str, progress: bool
) -> tuple[Tokenizer, str, np.ndarray, dict[str, list[int]]]:
    """Train the tokenizer on tmp/docs-train, encode every split's docs file into shards (filling `splits`).

    Returns (tokenizer, its kind, train token counts, per-language [bytes, tokens] of `report_split`).
    """
    unspaced = sum(counts.train_language_bytes[LANGUAGES.index(lang)] for lang in UNSPACED_LANGUAGES)
    tok, kind = make_tokenizer(
        cfg, None, _doc_file(tmp, "train"), counts.split_bytes["train"], progress, unspaced_bytes=int(unspaced)
    )
    dtype = dtype_for_vocab(tok.vocab_size)
    token_counts = np.zeros(tok.vocab_size, dtype=np.int64)
    by_language: dict[str, list[int]] = {}
    with tqdm(
        total=sum(counts.split_bytes.values()),
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=_no_bar(progress),
        file=sys.stderr,
    ) as bar:
        for split in SPLITS:
            shards, tokens = encode_split(
                tok,
                _doc_file(tmp, split),
                tmp,
                split,
                dtype,
                cfg.shard_tokens,
                bar,
                token_counts=token_counts if split == "train" else None,
                by_language=by_language if split == report_split else None,
            )
            splits[split] = {
                "documents": counts.split_docs[split],
                "tokens": tokens,
                "bytes": counts.split_bytes[split],
                "shards": shards,
            }
            _doc_file(tmp, split).unlink()
    return tok, kind, token_counts, by_language


def _start_pool(workers: int, worker: BlockWorker) -> Any:
    """`workers` processes that run `worker` on pass-1 tasks."""
    import multiprocessing

    # fork on Linux: starts in milliseconds and needs no `if __name__ == "__main__"` guard in the caller's
    # script (spawn re-imports it). TOKENIZERS_PARALLELISM=false while forking tells the Rust library
    # that the children must not use the thread pool the parent may have started (the fork-deadlock
    # guard), without its warning; the workers run one thread each anyway (init_pool_worker).
    method = "fork" if sys.platform == "linux" else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C/SIGTERM are held while the workers start: a KeyboardInterrupt raised inside an at-fork callback
    # (logging's lock release) is printed as "Exception ignored" and lost, and the command ran on to the end.
    # Held signals arrive when the mask is restored; the workers unblock them (init_pool_worker).
    mask = getattr(signal, "pthread_sigmask", None)
    held = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if mask else None
    try:
        return multiprocessing.get_context(method).Pool(
            workers, initializer=init_pool_worker, initargs=(worker, os.getpid())
        )
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
        if mask:
            mask(signal.SIG_SETMASK, held)


def prepare(cfg: PrepareConfig, *, progress: bool = True) -> dict[str, Any]:
    """Turn raw text files into a prepared data directory (see the module docstring).

    Args:
        cfg: what to read, how to clean/filter/dedup/split/tokenize, where to write.
        progress: show progress bars on stderr.

    Returns:
        The manifest dict, as written to `<out>/manifest.json`.

    Raises:
        DataError: missing/binary/malformed inputs, no documents, or an existing output directory.
    """
    if cfg.merge:
        from lmforge.data.merge import merge_parts

        return merge_parts(cfg, progress=progress)
    out = output_dir(cfg)
    check_out(out, cfg.overwrite)
    report_inside = dedup_report_path(cfg, out)
    given: Tokenizer | None = None
    if cfg.tokenizer not in TRAINED_TOKENIZERS:  # load (and check) an existing tokenizer before the long read
        given = Tokenizer.load(cfg.tokenizer)
        given.eos_id  # noqa: B018 - raises DataError if the tokenizer has no end-of-text token
        if "NFKC" in given.unicode_forms and cfg.normalize == "NFC":
            # it encodes NFKC text whatever it is handed (a ， as ","), so the text is cleaned so too: its byte
            # counts (bits per byte) and split hashes are those of the text the tokens hold, as in the part that
            # trained it with --normalize NFKC; NFC kept the 3-byte ，, and one text got two bpb values
            cfg = dataclasses.replace(cfg, normalize="NFKC")
    if cfg.dedup == "near":
        NearDedup(max_examples=0)  # fail now, with the install hint, if datasketch is missing

    val_files, val_skipped = resolve_inputs(cfg.val_input, out) if cfg.val_input else ([], [])
    test_files, test_skipped = resolve_inputs(cfg.test_input, out) if cfg.test_input else ([], [])
    train_files, skipped = resolve_inputs(cfg.inputs, out)
    both = sorted({p.resolve() for p in val_files} & {p.resolve() for p in test_files})
    if both:  # its documents would all go to val, and test would hold none (each counted as a duplicate)
        raise DataError(f"{both[0]} is given as both --val-input and --test-input; give each split its own file")
    eval_files = {p.resolve() for p in val_files + test_files}
    # Explicit eval files are read first (their documents win dedup) and never also read as `inputs`.
    sources = [(p, "val") for p in val_files] + [(p, "test") for p in test_files]
    sources += [(p, "auto") for p in train_files if p.resolve() not in eval_files]
    check_report_not_read(cfg, [p for p, _ in sources] + ([Path(cfg.tokenizer)] if given is not None else []))
    skipped_files = sorted(set(skipped + val_skipped + test_skipped))
    if not train_files:
        json_files, packed = skipped_json(skipped), unread_compressed(skipped)
        hint = "check the paths"
        if json_files:  # a folder of .json files: the walk skips them (usually metadata), naming them reads them
            hint = f"folders skip .json files (such as {json_files[0]}); name them as inputs, e.g. 'DIR/*.json'"
        elif packed:  # a folder of .xz files (OpenWebText's): "check the paths" did not say why
            hint = f"{packed[0]} and the like are not read (only .gz and .zst are decompressed); decompress them first"
        elif skipped:  # a folder of .log or extensionless files: "check the paths" when the path was right
            example = Path(skipped[0])
            pattern = f"'{example.parent}/*{example.suffix}'" if example.suffix else f"'{example}'"
            hint = (
                f"folders skip files of other extensions (such as {example}); name them as inputs to read them as "
                f"text, e.g. {pattern}"
            )
        raise DataError(f"no readable .txt, .md, .jsonl, .csv, .tsv or .parquet files in the inputs; {hint}")
    if all(role != "auto" for _, role in sources):
        raise DataError(
            "every input is also a --val-input/--test-input file, which is read only as evaluation data; "
            "pass the training files as inputs"
        )

    tmp = fresh_tmp_dir(out)
    pool = None
    try:
        dtype = dtype_for_vocab(given.vocab_size) if given is not None else np.uint16  # (encoding in pass 1)
        worker = BlockWorker(
            cleaner=DocumentCleaner.from_settings(dataclasses.asdict(cfg)),  # (eval --task clm: from the manifest)
            doc_unit=cfg.doc_unit, text_field=cfg.text_field, max_line_bytes=cfg.max_line_bytes,
            val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
            explicit=frozenset(role for _, role in sources if role != "auto"),
            tokenizer_json=given.to_str() if given is not None else None, dtype=np.dtype(dtype).name,
            keep_texts=bool(cfg.dedup_report), minhash=cfg.dedup == "near",
        )  # fmt: skip
        encoded = Encoded(tmp, dtype, cfg.shard_tokens, given.vocab_size) if given is not None else None
        if cfg.workers > 1:
            pool = _start_pool(cfg.workers, worker)
        counts = _Counts()
        total_bytes = sum(input_bytes(p) for p, _ in sources)
        with tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="reading", disable=_no_bar(progress), file=sys.stderr
        ) as bar:
            inputs, near = _pass1(cfg, sources, tmp, counts, bar, worker, pool, encoded)
        if pool is not None:
            pool.close()
        documents_out = sum(counts.split_docs.values())
        if counts.documents_in == 0:
            raise DataError(f"no documents found in {len(sources)} input(s): they are empty or blank")
        if documents_out == 0:
            reasons = ", ".join(f"{k} {v}" for k, v in counts.removed.items() if v)
            raise DataError(
                f"no documents left from {len(sources)} input(s) ({counts.documents_in} read; removed: {reasons}); "
                "check the files, --text-field, --min-chars and the filters"
            )
        if counts.split_docs["train"] == 0:
            overlap = counts.removed["overlap_with_eval"]
            raise DataError(
                f"all {documents_out} documents went to val/test, none to train; "
                + (
                    f"{overlap} more were removed as copies of --val-input/--test-input documents: "
                    "pass training files that are not the evaluation files"
                    if overlap
                    else "add data or lower --val-fraction/--test-fraction"
                )
            )
        for split, given_inputs in (("val", cfg.val_input), ("test", cfg.test_input)):
            if given_inputs and counts.split_docs[split] == 0:  # (it was written with no such split, silently)
                raise DataError(
                    f"--{split}-input {', '.join(given_inputs)} gave no {split} documents (empty, or every one removed "
                    f"as a duplicate or by a filter); pass a file holding evaluation text, or drop --{split}-input"
                )

        splits: dict[str, Any] = {}
        report_split = next((s for s in ("val", "test", "train") if counts.split_docs[s]), "train")
        if encoded is not None:  # the tokenizer was given: pass 1 wrote the shards
            tok, kind = given, tokenizer_kind(given)
            for split, writer in encoded.writers.items():
                shards = writer.close()
                splits[split] = {
                    "documents": counts.split_docs[split],
                    "tokens": writer.total_tokens,
                    "bytes": counts.split_bytes[split],
                    "shards": shards,
                }
            token_counts, by_language = encoded.token_counts, encoded.language_stats(report_split)
        else:
            tok, kind, token_counts, by_language = _pass2(cfg, tmp, counts, splits, report_split, progress)

        dedup_info: dict[str, Any] = {"mode": cfg.dedup, "exact_dup": counts.removed["exact_dup"]}
        if near is not None:
            dedup_info.update(
                near_dup=near.removed, near_dup_clusters=near.clusters, threshold=cfg.near_threshold,
                num_perm=near.num_perm, shingle_chars=near.shingle_chars,
            )  # fmt: skip
        manifest = {
            "format_version": FORMAT_VERSION,
            "lmforge_version": _lmforge_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": dataclasses.asdict(cfg),
            "inputs": inputs,
            "skipped_files": skipped_files,
            "documents": {"in": counts.documents_in, "out": documents_out, "removed": dict(counts.removed)},
            "cleaning": counts.cleaning.to_dict(),
            "dedup": dedup_info,
            "languages": dict(counts.languages.most_common()),
            "tokenizer": {
                "kind": kind,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "sha256": tok.fingerprint,
                "report": tokenizer_report(report_split, by_language),
            },
            "dtype": np.dtype(dtype_for_vocab(tok.vocab_size)).name,  # the shards' (uint32 over 65,536 ids)
            "splits": splits,
        }
        manifest = writable_text(manifest)  # (a file name that is not UTF-8)
        tok.save(tmp / TOKENIZER)
        if cfg.card:
            from lmforge.data.card import write_card

            write_card(
                tmp,
                manifest,
                steps={k: {"documents": v[0], "bytes": v[1]} for k, v in counts.steps.items()},
                removed_bytes=dict(counts.removed_bytes),
                length_hist={int(k): v for k, v in sorted(counts.length_hist.items())},
                top_tokens=top_tokens(tok, token_counts),
            )
        write_json(tmp / MANIFEST, manifest)
        if cfg.dedup_report:
            write_dedup_report(cfg, report_inside, tmp, near)

        publish_dir(tmp, out)
        return manifest
    except BaseException:
        if pool is not None:
            pool.terminate()
        discard_tmp_dir(tmp)
        with naming(out):  # (a full disk's error from writing a split or shard names no file: it names --out)
            raise
    finally:
        if pool is not None:
            pool.join()
