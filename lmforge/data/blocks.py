"""Pass-1 work of `prepare` on one block of documents: parse, clean, filter, hash, split, encode.

    main process                                   worker (or the main process with --workers 1)
    read_blocks / read_documents ──Task──►  BlockWorker: parse ─► DocumentCleaner ─► sha256 ─► split
                                                             ─► DocumentEncoder (if the tokenizer is given)
                                                             ─► MinHash signatures (--dedup near)
    dedup, counters, shard writers ◄──BlockResult (counters + one row per filtered document + tokens)──┘

Key design decisions:
- Everything that depends on one document alone runs in the worker; only what depends on the order
  of documents (exact/near dedup, removal of eval overlap) runs in the main process, in input order,
  so any number of workers gives byte-identical output.
- A worker sends back numbers, 16-byte digests, one numpy token array per block and, for near dedup, one
  array of MinHash signatures, not texts (texts only when the main process needs them: the near-dedup
  report's snippets, or a tokenizer still to be trained), so
  the main process stays light (about a tenth of the CPU time) and results are about half the input's size.
- Plain-text and JSONL inputs travel as raw byte blocks cut at document boundaries (the worker
  parses them; with --doc-unit file a text file is one block); other formats (CSV, Parquet, datasets) are read
  in the main process and sent as batches of texts.
- A text file's document too long for a block (`ingest.LongDocument`, with a trained tokenizer) is a task of
  its own, run in the main process in input order (it reads the input as it goes): cleaned, filtered and hashed
  a chunk at a time, its text written to a spill file, not returned (`BlockWorker._long_document`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.dedup import minhash_signatures
from lmforge.data.filters import LANGUAGES, DocumentCleaner, Processed, utf8_len
from lmforge.data.ingest import Block, DocUnit, LongDocument, RawDocument, block_documents
from lmforge.data.split import SPLITS, assign_split, doc_digest

PRE_DEDUP_REASONS = ("no_text", "empty", "too_short", "too_long", "char_repetition", "line_repetition", "alpha_ratio")
PRE_DEDUP_REASONS += ("boilerplate", "language")
_LANGUAGE_INDEX = {name: i for i, name in enumerate(LANGUAGES)}


@dataclass(frozen=True)
class Task:
    """One unit of pass-1 work: a byte block of `path`, or documents already read."""

    path: str
    role: str  # "auto" (hash split), "val" or "test"
    block: Block | None = None
    docs: list[RawDocument] | None = None
    long: LongDocument | None = None  # (run in the main process: it reads from the file as it goes)
    spill: str | None = None  # where a long document's cleaned text goes (`BlockWorker._long_document`)


@dataclass
class BlockResult:
    """What pass 1 needs to know about a task's documents (see `BlockWorker`)."""

    documents: int = 0  # read
    missing: int = 0  # of them, rows without the text field (`RawDocument.missing`; counted in removed["no_text"])
    first_missing: str | None = None  # the first such row's `RawDocument.missing`
    raw_bytes: int = 0
    chars: int = 0  # characters after cleaning, of every document read (for the mixed-encoding check)
    invalid_utf8: int = 0
    surrogates: int = 0  # of invalid_utf8, JSON's escaped lone surrogates (`RawDocument.surrogates`)
    documents_with_invalid_utf8: int = 0
    control_chars_removed: int = 0
    normalized_documents: int = 0
    whitespace_normalized_documents: int = 0
    boilerplate_lines_removed: int = 0
    cleaned: list[int] = field(default_factory=lambda: [0, 0])  # documents, bytes left after cleaning
    filtered: list[int] = field(default_factory=lambda: [0, 0])  # ... after the removal filters
    removed: dict[str, list[int]] = field(default_factory=dict)  # reason -> [documents, bytes]
    # one entry per document that passed the filters, in input order
    keys: list[bytes] = field(default_factory=list)  # first 16 bytes of the sha256 digest
    splits: np.ndarray | None = None  # int8 index into SPLITS
    nbytes: np.ndarray | None = None  # int64 UTF-8 bytes
    languages: np.ndarray | None = None  # int8 index into LANGUAGES
    length_bits: np.ndarray | None = None  # int8 bit_length(characters)
    texts: list[str] | None = None
    signatures: np.ndarray | None = None  # uint32 MinHash values per document (near dedup), one row each
    tokens: np.ndarray | None = None  # ids of all these documents, EOS after each
    token_counts: np.ndarray | None = None  # int64 ids per document, EOS excluded
    spill: str | None = None  # a kept long document's text, as JSON string content in this file (texts: [""])


@dataclass
class BlockWorker:
    """Callable on a `Task`; picklable (the encoder is built lazily in each process from the tokenizer JSON)."""

    cleaner: DocumentCleaner
    doc_unit: DocUnit
    text_field: str
    max_line_bytes: int
    val_fraction: float
    test_fraction: float
    explicit: frozenset[str]
    tokenizer_json: str | None  # encode with this tokenizer; None = return texts only
    dtype: str = "uint16"
    keep_texts: bool = False  # also return texts when encoding (the near-dedup report's snippets need them)
    minhash: bool = False  # compute each document's MinHash signature for near dedup (dedup.minhash_signatures)
    _encoder: object = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_encoder": None}

    def encoder(self):  # noqa: ANN201 - DocumentEncoder, imported lazily
        if self._encoder is None:
            from lmforge.tokenizer.fast_encode import DocumentEncoder
            from lmforge.tokenizer.tokenizer import Tokenizer

            assert self.tokenizer_json is not None
            self._encoder = DocumentEncoder(Tokenizer.from_str(self.tokenizer_json), np.dtype(self.dtype).type)
        return self._encoder

    def __call__(self, task: Task) -> BlockResult:
        if task.long is not None:
            return self._long_document(task)
        if task.block is not None:
            docs = list(
                block_documents(
                    task.block,
                    Path(task.path),
                    doc_unit=self.doc_unit,
                    text_field=self.text_field,
                    max_line_bytes=self.max_line_bytes,
                )
            )
        else:
            docs = task.docs or []
        r = BlockResult(removed={reason: [0, 0] for reason in PRE_DEDUP_REASONS})
        raw = [(doc.text, doc.invalid_utf8) for doc in docs if doc.text is not None]
        r.removed["no_text"][0] = len(docs) - len(raw)  # a null, an empty cell, a row without the field
        missing = [doc.missing for doc in docs if doc.missing is not None]
        r.missing, r.first_missing = len(missing), missing[0] if missing else None
        invalid_total = sum(doc.invalid_utf8 for doc in docs if doc.text is None)  # (a null's line's)
        rows = ((p, len(p.text), utf8_len(p.text), None) for p in self.cleaner(raw))
        texts = self._fill(r, rows, task.role, invalid_total)
        r.documents = len(docs)
        r.surrogates = sum(doc.surrogates for doc in docs)
        if self.tokenizer_json is not None:
            r.tokens, r.token_counts = self.encoder().encode(texts)
        if self.minhash:
            r.signatures = minhash_signatures(texts)
        if self.tokenizer_json is None or self.keep_texts:
            r.texts = texts
        return r

    def _fill(
        self, r: BlockResult, rows: Iterable[tuple[Processed, int, int, bytes | None]], role: str, invalid_total: int
    ) -> list[str]:
        """Count the cleaned documents `rows` into `r`: (its `Processed`, characters, UTF-8 bytes, digest or None to
        take it of the text), with a row for each one that passed the filters, whose texts it returns."""
        keys, splits, nbytes, languages, bits, texts = [], [], [], [], [], []
        auto = role == "auto"
        role_index = SPLITS.index(role) if not auto else 0
        fractions = {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "explicit": self.explicit}
        raw_bytes = chars = invalid_docs = control = normalized = whitespace = boilerplate = 0
        for p, n_chars, size, digest in rows:
            text, reason, language, size_in, invalid, removed_chars, changed, ws_changed, lines = p
            raw_bytes += size_in
            chars += n_chars
            if invalid:
                invalid_total += invalid
                invalid_docs += 1
            control += removed_chars
            normalized += changed
            whitespace += ws_changed
            boilerplate += lines
            if reason is not None:
                if reason not in ("empty", "boilerplate"):
                    r.cleaned[0] += 1
                    r.cleaned[1] += size
                r.removed[reason][0] += 1
                r.removed[reason][1] += size
                continue
            digest = digest or doc_digest(text)
            keys.append(digest[:16])
            splits.append(SPLITS.index(assign_split(digest, **fractions)) if auto else role_index)
            nbytes.append(size)
            languages.append(_LANGUAGE_INDEX[language])
            bits.append(n_chars.bit_length())
            texts.append(text)
        r.raw_bytes, r.chars, r.invalid_utf8, r.documents_with_invalid_utf8 = (
            raw_bytes,
            chars,
            invalid_total,
            invalid_docs,
        )
        r.control_chars_removed, r.normalized_documents = control, normalized
        r.whitespace_normalized_documents, r.boilerplate_lines_removed = whitespace, boilerplate
        r.filtered = [len(keys), sum(nbytes)]
        r.cleaned[0] += len(keys)
        r.cleaned[1] += r.filtered[1]
        r.keys = keys
        r.splits = np.array(splits, dtype=np.int8)
        r.nbytes = np.array(nbytes, dtype=np.int64)
        r.languages = np.array(languages, dtype=np.int8)
        r.length_bits = np.array(bits, dtype=np.int8)
        return texts

    def _long_document(self, task: Task) -> BlockResult:
        """The one document of `task.long`, cleaned a part at a time (`DocumentCleaner.stream`) into the file
        `task.spill` as the content of its JSON string (what `json.dumps` writes between the quotes), hashed as it
        goes: memory holds a part, not the document. A kept one's row has `spill` set and "" as its text."""
        assert task.long is not None and task.spill is not None
        r = BlockResult(removed={reason: [0, 0] for reason in PRE_DEDUP_REASONS})
        digest = hashlib.sha256()
        size = 0
        with open(task.spill, "w", encoding="utf-8", newline="\n") as f:

            def write(part: str) -> None:
                nonlocal size
                data = part.encode("utf-8")
                digest.update(data)
                size += len(data)
                f.write(json.dumps(part, ensure_ascii=False)[1:-1])

            processed, chars = self.cleaner.stream(task.long.chunks, write)
        r.texts = self._fill(r, [(processed, chars, size, digest.digest())], task.role, 0)
        r.documents = 1
        r.spill = task.spill if r.keys else None
        return r


# --------------------------------------------------------------------------------------------
# running workers in a pool (used by prepare.py)

_WORKER: BlockWorker | None = None


def init_pool_worker(worker: BlockWorker, parent: int) -> None:
    """Set up a pool process (`parent`: the pid of the process that started the pool)."""
    global _WORKER
    _die_with_parent(parent)
    # each process encodes on its own core; Rust threads on top would only compete for the same cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C reaches the whole process group: the parent stops the pool and reports it in one line;
    # a worker's own KeyboardInterrupt would only print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate() stops workers with it
    if hasattr(signal, "pthread_sigmask"):  # held by the parent while it started the pool (prepare._start_pool)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _WORKER = worker


def _die_with_parent(parent: int) -> None:
    """Have Linux kill this process the moment `parent` dies (prctl PR_SET_PDEATHSIG).

    A parent killed alone (SIGKILL, the OOM killer) left its workers running their blocks to the end, then
    printing two BrokenPipeError tracebacks each when they sent the result to no one. Other platforms keep
    that behaviour (no such call there); a pool's workers ending with it otherwise is the normal case."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl in this C library: keep running as before
        return
    if os.getppid() != parent:  # the parent died before the call: no signal will come
        os._exit(1)


def run_in_pool_worker(task: Task) -> BlockResult:
    assert _WORKER is not None
    return _WORKER(task)
