"""`lmforge generate --num-samples N` and `--prompt-file FILE`: many completions, decoded in batches.

- Prompts: `--prompt` (one), or `--prompt-file`: a `.jsonl` (one JSON object per line with a "prompt"
  string) or any other file as text, one prompt per line (a prompt with a newline in it needs the JSONL form).
  Blank lines (empty, or only spaces and tabs) are skipped in both, and a note on stderr counts them; a UTF-8
  byte-order mark is read past. Either may be compressed (`.jsonl.gz`,
  `.txt.zst`: read as `prepare` reads its inputs); a `.json` file is refused (a JSON list read as text made each
  of its lines a prompt), as are compressed bytes under another name or on stdin (they read as "not UTF-8").
  `--prompt-file -` reads stdin: it has no name to tell the format by, so it is JSONL when its first non-blank
  line is a JSON object, else text (`cat prompts.jsonl | lmforge generate RUN --prompt-file -`).
- Each prompt gets `num_samples` completions. The (prompt, sample) rows are sorted by prompt length (little
  padding per batch) and decoded `--batch-size` (default `PROMPT_BATCH`) at a time with `generate.generate_batch`,
  which gives each row its own positions and hides the padding: a greedy row equals `lmforge generate --prompt` on that
  prompt alone (tested). Rows go through `generate` one at a time instead where a batch cannot take them:
  a run without a KV cache (a soft-prompt fine-tune, a recurrent model), `--no-cache`, or a batch whose
  longest prompt plus `--max-new-tokens` is past the context (`generate` slides a window there; a batch
  cache cannot).
- Seeds: sample j of a prompt samples from its own generator seeded seed + j, in a batch
  (`generate_batch(seeds=)`) or alone, as `serve` seeds choice j: so it is `lmforge generate --prompt P --seed
  seed+j` (sample 0: `--seed seed`'s), the N samples of a prompt differ, and a completion does not depend on the
  rows beside it: any `--batch-size` gives the same file (up to float rounding in batched matmuls, ~1e-7 on the
  logits, which can flip a near-tie; tested equal on the test model). Two equal prompts get equal samples.
- Each row ends as `--prompt` does: at end-of-text or a run stop id (unless `--ignore-eos`), or before the
  first `--stop` string (`detokenize.StopStrings`, fed token by token: the same cut as a single prompt's).
- Output: with `--prompt-file`, JSONL in input order, one line per completion: a JSONL line's own fields
  ("id", "meta", ...: carried unchanged, in their order, "prompt" among them), then "completion",
  "finish_reason" ("stop" or "length", as OpenAI's) and, with N > 1, "sample" (0..N-1). These three are the
  output's own: an input field of one of those names is replaced (a note on stderr says so). To stdout, each line
  as soon as it and every line before it are done (the rows are decoded shortest first), or written atomically to
  `--out` (`atomic.atomic_write_text`) once every completion is done. With `--prompt` alone, the N samples are
  printed as text, each as prompt + completion under a `=== sample i/N ===` line, as they are done.
- Resume (`--out` only): each finished batch is appended, flushed, to `OUT.partial` beside OUT (`partial_path`),
  a JSON line per row ({"row", "completion", "finish_reason"}) after a header line naming the job (`_job`: a
  sha256 of the prompts, of the checkpoint's state.json, the sampling settings, seed, device, and the command
  that made it). The same command again, with any `--batch-size`, continues it: done rows are read back and only
  the others are batched and decoded; a torn last line (a SIGKILL mid-write) is cut off and its rows made
  again. A partial file of another job, or not of lmforge, is a one-line error naming what differs and what to
  do, and a second run while one writes it is refused (`flock`). OUT appears, in input order, only at the end;
  then the partial file is removed.
- Progress: a tqdm bar of completions done on stderr (on a terminal only, as prepare's; `--quiet`: none). An
  interrupt (Ctrl-C, SIGTERM) stops the run: `--out` stays as it was, the finished completions stay in
  `OUT.partial`, and one line says how many are done and the command that continues (cli: exit 130). Without
  `--out`, the finished rows not yet printed (held behind an unfinished one) are printed then, in input order,
  and the line says how many are missing and the `--out` command that would keep them.

vLLM's `run_batch` and llama.cpp's `llama-parallel` batch prompts for the same reason: a decode step of a
small model costs about the same for 1 row as for 16 (README, Speed: 6.56x on 16 prompts).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from lmforge.atomic import check_out_file_kind, naming, refuse_link_loop, try_lock
from lmforge.data.clean import json_line
from lmforge.data.compressed import inner_name, open_input, read_errors, read_raw, wait_readable
from lmforge.errors import Interrupted, LmforgeError, first_line

PROMPT_BATCH = 16  # rows decoded together by default (eval's ANSWER_BATCH); --batch-size
STDIN = "-"  # --prompt-file -: the prompts come from stdin
OUTPUT_FIELDS = ("completion", "finish_reason", "sample")  # an output line's own, after a JSONL line's fields
PARTIAL_SUFFIX = ".partial"  # --out OUT: the completions finished so far are in OUT.partial (partial_path)
PARTIAL_FORMAT = "lmforge_generate_partial"  # the header line's key, its value the format's version
# 2: sample j sampled with seed + j in any batch; 1 (seed + the batch's number) resumed only with the same --batch-size
PARTIAL_VERSION = 2


def read_prompts(path: str | Path) -> list[tuple[int, str, dict[str, Any]]]:
    """The prompts of a `--prompt-file`, each with its line number and the other fields of its JSONL line
    ({} for text): a .jsonl's "prompt" fields, else the file's lines that are not blank (a note counts the blank
    ones). `-` reads stdin, as JSONL when its first non-blank line is a JSON object, else as text.

    Raises:
        LmforgeError: a missing, non-UTF-8 or empty file; a .jsonl line that is not a JSON object with a
            "prompt" string, or holds a lone surrogate escape (named by its line number).
    """
    if str(path) == STDIN:
        if sys.stdin is not None and sys.stdin.isatty():  # (it waited without a word: for what, and how to end it)
            end = "Ctrl-Z then Enter" if os.name == "nt" else "Ctrl-D"
            print(f"reading prompts from the terminal, one per line; end with {end}", file=sys.stderr, flush=True)
        elif sys.stdin is not None:  # (`slow_cmd | lmforge generate RUN --prompt-file -`: noted if it stays silent)
            wait_readable(sys.stdin.buffer, "stdin", "a pipe")
        name, data, inner = "stdin", sys.stdin.buffer.read(), ""
    else:
        path = Path(path)
        refuse_link_loop(path)  # (it said "does not exist")
        if path.is_dir() or not path.exists():  # (a pipe is read: `--prompt-file <(cut -f2 questions.tsv)`)
            what = "is a directory" if path.is_dir() else "does not exist"
            raise LmforgeError(f"--prompt-file {path} {what}; give a .txt (one prompt per line) or a .jsonl file")
        name, data, inner = str(path), _read_file(path), inner_name(path)
        if inner.endswith(".json"):  # (read as text, a JSON list's lines were each completed as a prompt)
            raise LmforgeError(
                f"--prompt-file {path}: a .json file is neither JSONL nor one prompt per line; rename it to .jsonl if "
                f"it holds one JSON object per line, or convert a JSON list: jq -c '.[]' {path} > prompts.jsonl"
            )
    packed = next((kind for magic, kind in _MAGIC.items() if data.startswith(magic)), None)
    if packed is not None:  # (its bytes were reported as "not UTF-8 text; convert it from GBK")
        suffix, kind, cat = packed
        fix = f"pipe it through {cat}" if name == "stdin" else f"name it {path.name}{suffix} or unpack it"
        raise LmforgeError(f"{name} is {kind}-compressed; {fix}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        fix = "pipe it through iconv -f GBK -t UTF-8" if name == "stdin" else f"e.g. iconv -f GBK -t UTF-8 {name}"
        raise LmforgeError(f"{name} line {line} is not UTF-8 text; convert the file ({fix})") from None
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1)]
    jsonl = _is_jsonl(lines) if name == "stdin" else inner.endswith(".jsonl")
    if not jsonl:  # a text line ends at \n, \r\n or a lone \r, as prepare reads text (a lone \r joined two prompts)
        lines = list(enumerate(re.split(r"\r\n?|\n", text), 1))
    if lines and not lines[-1][1]:  # (what follows the last line end is no line)
        lines.pop()
    # a line of only spaces or tabs is blank in either form, as an empty one: in a text file it was a prompt (the model
    # continued whitespace), one that a JSONL file skipped; a prompt of spaces is still given in JSON ("   ")
    kept = [(n, line) for n, line in lines if line.strip()]
    blank, lines = len(lines) - len(kept), kept
    if not lines:
        raise LmforgeError(f'{name} holds no prompts; put one per line (in a .jsonl: {{"prompt": "..."}} per line)')
    prompts = [_jsonl_prompt(name, n, line) if jsonl else (n, line, {}) for n, line in lines]
    if blank:  # (once every line is read: a bad line's error stays the one line)
        print(f"note: {name}: {blank} blank line{'s' * (blank > 1)} skipped", file=sys.stderr, flush=True)
    return prompts


def _jsonl_prompt(name: str, n: int, line: str) -> tuple[int, str, dict[str, Any]]:
    """Line `n` of a JSONL prompt file: (n, its "prompt", the whole object).

    Raises:
        LmforgeError: the line is not a JSON object with a "prompt" string, or holds a lone surrogate escape.
    """
    try:
        row = json.loads(json_line(line))  # (a BOM mid-file: `cat a.jsonl b.jsonl` of Windows-saved files)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{name} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise LmforgeError(f'{name} line {n} has no "prompt" string; write each line as {{"prompt": "..."}}')
    try:  # a lone surrogate escape ("\ud800") is no text: the tokenizer's TypeError, or the output's, a traceback
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise LmforgeError(
            f"{name} line {n} holds an unpaired surrogate escape such as \\ud800, which is not text; fix that line"
        ) from None
    return n, row["prompt"], row


# the first bytes of a compressed file: (its suffix, its name, what unpacks it to stdout)
_MAGIC = {b"\x1f\x8b": (".gz", "gzip", "zcat"), b"\x28\xb5\x2f\xfd": (".zst", "zstandard", "zstdcat")}


def _read_file(path: Path) -> bytes:
    """A prompt file's bytes, decompressed when it is named .gz or .zst (as `prepare` reads its inputs).

    Raises:
        LmforgeError: a damaged or cut-short compressed file, or a .zst without zstandard installed.
    """
    if inner_name(path) == path.name.lower():
        return read_raw(path)
    raw, stream = open_input(path)
    try:
        with raw, stream:
            return stream.read()
    except read_errors() as e:
        raise LmforgeError(
            f"--prompt-file {path} could not be decompressed ({first_line(e)}); it is damaged or cut short"
        ) from None


def _is_jsonl(lines: list[tuple[int, str]]) -> bool:
    """Whether stdin's lines are JSONL: its first non-blank line is a JSON object."""
    first = next((line for _, line in lines if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def many_prompts(
    path: str | Path,
    prompt: str | None,
    prompt_file: str | Path | None,
    num_samples: int,
    out: str | Path | None,
    compile: bool,  # noqa: A002 - the CLI flag's name
    batch_size: int | None = None,
) -> list[tuple[str, str, dict[str, Any]]]:
    """The prompts of a run with many completions, each with where it is named in errors (its file and line) and
    the fields its output line starts from (a JSONL line's, `prompt` included; {} for text).

    Raises:
        LmforgeError: flags that do not go together, a bad prompt file (`read_prompts`).
    """
    from lmforge.atomic import check_not_inside

    if prompt is not None and prompt_file is not None:
        raise LmforgeError("give --prompt or --prompt-file, not both")
    if num_samples < 1:
        raise LmforgeError(f"--num-samples must be >= 1, got {num_samples}")
    if batch_size is not None and batch_size < 1:
        raise LmforgeError(f"--batch-size must be >= 1 (completions decoded together), got {batch_size}")
    if out is not None and prompt_file is None:
        raise LmforgeError("--out writes the JSONL of --prompt-file; without it the samples print to the terminal")
    if compile:
        raise LmforgeError(
            "--compile speeds up one prompt's decode; drop it with --prompt-file or --num-samples (they decode in "
            "batches)"
        )
    if prompt_file is None:
        return [(prompt or "", str(path), {})]
    if out is not None:
        _check_out_file(Path(out))
        if str(prompt_file) != STDIN:
            check_not_inside(Path(out), Path(prompt_file))  # writing over the prompts would lose them
        # nor over a file of the run (`--out RUN/config.json` replaced the run's config): a checkpoint's whole run
        checkpoint = (Path(path) / "state.json").is_file() and Path(path).parent.name == "checkpoints"
        run = Path(path).parent.parent if checkpoint else Path(path)
        check_not_inside(Path(out), run)
    name = "stdin" if str(prompt_file) == STDIN else prompt_file
    prompts = read_prompts(prompt_file)
    taken = [k for k in OUTPUT_FIELDS if any(k in row for _, _, row in prompts)]
    if taken:  # (documented: the output's own fields win)
        names = ", ".join(f'"{k}"' for k in taken)
        print(f"note: {name} has {names} fields; the output lines' own replace them", file=sys.stderr, flush=True)
    return [(text, f"{name} line {n}", row) for n, text, row in prompts]


def _check_out_file(out: Path) -> None:
    """`--out` is written once every completion is done: a path that cannot take a file (a folder, or one under a
    file) was an OSError only then, after all the generating; it is refused before the run loads."""
    if out.is_dir():
        raise LmforgeError(f"--out {out} is a folder; pass a file name such as {out / 'completions.jsonl'}")
    check_out_file_kind(out)
    if partial_path(out).is_dir():
        raise LmforgeError(f"{partial_path(out)} is a folder in the way of --out's partial file; move it away")
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise LmforgeError(f"--out {out} lies under {blocked}, which is a file, not a folder; choose another --out")


def generate_many(
    loaded: Any,
    prompts: list[tuple[str, str, dict[str, Any]]],
    num_samples: int,
    settings: dict[str, Any],
    *,
    stop: list[str],
    seed: int | None,
    use_cache: bool,
    out: str | Path | None,
    jsonl: bool,
    stream: TextIO | None,
    batch_size: int | None = None,
    progress: bool = False,
    checkpoint: str = "",
) -> str:
    """`num_samples` completions of each of `prompts` ((text, where, fields), `many_prompts`) with a loaded run,
    written as JSONL (`jsonl`: a prompt file's) to `out` or `stream`, else as text to `stream` (module docstring).
    `settings`: `generate_batch`'s sampling keywords, from `generate_from_checkpoint`; `batch_size`: rows decoded
    together (None: `PROMPT_BATCH`); `progress`: a bar of completions done on stderr (on a terminal);
    `checkpoint`: what identifies the loaded checkpoint (`checkpoint_identity`), recorded in `out`'s partial file
    so that only the same job continues it. Returns what it wrote.

    Raises:
        LmforgeError: a prompt that does not fit the context, or is empty without an end-of-text token; a partial
            file beside `out` that another job left.
        Interrupted: Ctrl-C or SIGTERM with `out`: the partial file keeps what is done (the message says how to
            continue).
    """
    from lmforge.atomic import atomic_write_text
    from lmforge.generate import command_prompt_ids

    prompt_ids = [command_prompt_ids(loaded, text, where) for text, where, _ in prompts]
    rows = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]  # (prompt, sample), in output order
    batch = PROMPT_BATCH if batch_size is None else batch_size
    done: dict[int, tuple[str, str]] = {}  # row -> (completion, finish reason)
    partial = None
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        job = _job(prompts, settings, loaded, checkpoint, num_samples=num_samples, seed=seed, use_cache=use_cache,
                   stop=stop)  # fmt: skip
        partial, done = _open_partial(partial_path(Path(out)), job, len(rows))
    from tqdm import tqdm

    def shown(b: int) -> str:  # row b as written: a JSONL line, or one sample under its === line
        i, j = rows[b]
        text_in, _, fields = prompts[i]
        text, finish = done[b]
        if not jsonl:
            return f"=== sample {j + 1}/{num_samples} ===\n{text_in}{text}\n"
        sample = {"sample": j} if num_samples > 1 else {}
        # a JSONL line's own fields ("id", "meta", ...) first, as given; an output field's name in it is replaced
        carried = {k: v for k, v in fields.items() if k not in OUTPUT_FIELDS}
        record = carried | {"prompt": text_in, "completion": text, "finish_reason": finish} | sample
        return json.dumps(record, ensure_ascii=False) + "\n"

    # Without --out the rows go to `stream` as soon as they and every row before them are done (in input order);
    # they were printed only at the end, so that a Ctrl-C lost every finished one
    printed: list[str] = []
    if out is None and stream is not None:
        next_row = 0

        def print_ready() -> None:
            nonlocal next_row
            end = next_row
            while end in done:
                end += 1
            if end > next_row:
                text = "".join(shown(b) for b in range(next_row, end))
                with _signals_held(), bar.external_write_mode(file=stream):  # (the bar cleared meanwhile)
                    stream.write(text)
                    stream.flush()
                    printed.append(text)
                    next_row = end  # (before a Ctrl-C held meanwhile is raised: these are not printed again)

    # drawn only on a terminal (tqdm's None), as prepare's: a log or `2>file` gets no bar frames
    with tqdm(total=len(rows), initial=len(done), unit="completion", desc="generating",
              disable=None if progress else True, file=sys.stderr) as bar:  # fmt: skip
        try:
            for finished in _complete(
                loaded,
                [prompt_ids[i] for i, _ in rows],
                settings,
                stop,
                [None if seed is None else (seed + j) % 2**63 for _, j in rows],  # (as `--prompt P --seed` seed + j)
                use_cache,
                batch,
                set(done),
            ):
                if partial is not None:
                    _append(partial, finished)
                done.update(finished)
                bar.update(len(finished))
                if out is None and stream is not None:
                    print_ready()
        except KeyboardInterrupt:
            stdin = prompts[0][1].startswith("stdin line ")  # (many_prompts' name for them)
            if partial is not None:
                raise Interrupted(_interrupted(Path(out), len(done), len(rows), stdin)) from None
            if stream is None:
                raise
            # the finished rows held back behind an unfinished one, in input order (each line names its prompt)
            late = "".join(shown(b) for b in sorted(done) if b >= next_row)
            with _signals_held(), bar.external_write_mode(file=stream):
                stream.write(late)
                stream.flush()
            raise Interrupted(_interrupted_unsaved(len(done), len(rows), jsonl, stdin)) from None
        finally:
            if partial is not None:
                _close(partial)
    if out is None and stream is not None:
        return "".join(printed)
    written = "".join(shown(b) for b in range(len(rows)))
    if out is not None:
        atomic_write_text(out, written)
        # (a kill before this: the next run finds every row done, and writes out)
        partial_path(Path(out)).unlink(missing_ok=True)
    return written


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held until the block is done, then handled as they would have been (cli's handler: an
    interrupt): Python checks for signals between a pipe's partial writes, so a signal while a slow reader kept
    the pipe full cut a JSONL line short. Only the main thread can change handlers; elsewhere nothing is held."""
    import signal
    import threading

    held: list[int] = []
    signums = (signal.SIGINT, signal.SIGTERM)
    main = threading.current_thread() is threading.main_thread()
    before = (
        {s: signal.signal(s, lambda signum, _: held.append(signum)) for s in signums if signal.getsignal(s) is not None}
        if main
        else {}
    )
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])


def _complete(
    loaded: Any,
    rows: list[list[int]],
    settings: dict[str, Any],
    stop: list[str],
    seeds: list[int | None],
    use_cache: bool,
    batch_size: int,
    skip: set[int],
) -> Iterator[dict[int, tuple[str, str]]]:
    """Each row's completion text and finish reason ("stop" or "length"), decoded in batches where they fit, given
    as each batch (or row decoded alone) is finished: {row: (text, finish)}. The rows in `skip` (done by an earlier
    run of the same job) are left out before batching. Row b samples from its own generator seeded `seeds[b]` (None:
    unseeded), batched or alone, so its completion does not depend on which rows share its batch: any `batch_size`,
    and a resumed run batching only the rest, give the same rows (up to float rounding, module docstring)."""
    from lmforge.detokenize import StopStrings, StreamDecoder
    from lmforge.generate import (
        completion_decoder,
        context_length,
        generate,
        generate_batch,
    )

    stops = frozenset(settings["stop_ids"])  # (with eos: run_stops)
    decoders = [StreamDecoder(completion_decoder(loaded.tokenizer, ids), loaded.tokenizer, ids) for ids in rows]
    cuts = [StopStrings(stop) for _ in rows]

    def on_token(b: int, token: int) -> bool:  # b: the row's index in `rows`
        if token not in stops:  # (as generate_from_checkpoint shows a row's text)
            cuts[b].feed(decoders[b].feed(token))
        return cuts[b].stopped

    def finished(b: int, ids: list[int]) -> tuple[str, str]:
        cuts[b].feed(decoders[b].flush())  # (a character cut by max_new_tokens is dropped, as --prompt drops it)
        return cuts[b].text, "stop" if cuts[b].stopped or (ids and ids[-1] in stops) else "length"

    # stable: a prompt's samples stay in order
    order = sorted((b for b in range(len(rows)) if b not in skip), key=lambda b: len(rows[b]))
    context = context_length(loaded.model)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if use_cache and len(rows[batch[-1]]) + settings["max_new_tokens"] <= context:
            outs = generate_batch(
                loaded.model,
                [rows[b] for b in batch],
                seeds=[seeds[b] for b in batch] if any(s is not None for s in seeds) else None,
                on_token=lambda row, token, batch=batch: on_token(batch[row], token),
                **settings,
            )
            yield {b: finished(b, ids) for b, ids in zip(batch, outs, strict=True)}
            continue
        for b in batch:  # alone: no cache, or past the context (sliding window)
            ids = generate(
                loaded.model,
                rows[b],
                seed=seeds[b],
                use_cache=use_cache,
                on_token=lambda token, b=b: on_token(b, token),
                prefix=loaded.tokenizer.prompt_prefix,  # (kept first when the window slides)
                **settings,
            )
            yield {b: finished(b, ids)}


# --out's partial file: completions as they are finished, so that a killed or interrupted run loses none of them


def partial_path(out: Path) -> Path:
    """Where `--out OUT` keeps the completions finished so far: `OUT.partial`, beside it."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def checkpoint_identity(path: str | Path) -> str:
    """The sha256 of the state.json of the checkpoint `path` (a run directory: its latest) resolves to: it lists
    the sha256 of every weight file, so a newer checkpoint, or another run, has another one."""
    import hashlib

    from lmforge.checkpoint import resolve_checkpoint

    return hashlib.sha256((resolve_checkpoint(path) / "state.json").read_bytes()).hexdigest()


def _job(
    prompts: list[tuple[str, str, dict[str, Any]]],
    settings: dict[str, Any],
    loaded: Any,
    checkpoint: str,
    **options: Any,
) -> dict[str, Any]:
    """What the completions depend on, as JSON: a partial file made with other values is not continued."""
    import dataclasses
    import hashlib

    text = json.dumps([[p, fields] for p, _, fields in prompts], ensure_ascii=False)
    sampling = {k: sorted(v) if isinstance(v, frozenset) else v for k, v in settings.items() if k != "penalties"}
    penalties = settings.get("penalties")
    job = {
        "prompts": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "checkpoint": checkpoint,
        "device": next(loaded.model.parameters()).device.type,
        **options,  # num_samples, seed, use_cache, stop (not the batch size: rows are seeded alone, _complete)
        **sampling,
        "penalties": None if penalties is None or penalties.off else dataclasses.asdict(penalties),
    }
    return json.loads(json.dumps(job))  # (as it reads back: tuples are lists)


# how the keys of a job are set, for the error that names the ones a partial file was made with otherwise
_JOB_FLAGS = {
    "prompts": "the prompts",
    "checkpoint": "the checkpoint",
    "use_cache": "--no-cache",
    "eos_id": "--ignore-eos",
    "stop_ids": "the run's stop ids",
    "vocab_size": "the tokenizer",
    "penalties": "the penalties",
}


def _open_partial(path: Path, job: dict[str, Any], n_rows: int) -> tuple[BinaryIO, dict[int, tuple[str, str]]]:
    """`path` open for appending (and locked: one run at a time), with the rows an earlier run of the same `job`
    finished in it; a new one (a header line naming the job) when there is none. A torn last line (a killed run's)
    and whatever follows a damaged line is dropped from the file: those rows are decoded again.

    Raises:
        LmforgeError: another live process writes `path`; it is not a partial file of `lmforge generate`, or one
            made for another job.
    """
    from lmforge.log import rerun_command

    handle = open(path, "a+b")  # returned open (appended to per batch); closed here on an error
    try:
        _lock(handle, path)
        handle.seek(0)
        data = handle.read()
        done: dict[int, tuple[str, str]] = {}
        start = b'{"' + PARTIAL_FORMAT.encode()
        if b"\n" not in data and (data.startswith(start) or start.startswith(data)):
            data = b""  # a header cut by a kill or a full disk (`{` alone was "not such a file"): nothing done yet
        if not data:
            header = {PARTIAL_FORMAT: PARTIAL_VERSION, "job": job, "command": rerun_command(sys.argv)}
            with naming(path):
                handle.truncate(0)
                # (ASCII: a --stop or path from argv's undecodable bytes is a lone surrogate, which UTF-8 cannot write)
                handle.write(json.dumps(header).encode("ascii") + b"\n")
                handle.flush()
            return handle, done
        lines = data.split(b"\n")  # the last one: b"" after a whole line, else torn
        header = _json_line(lines[0])
        version = header.get(PARTIAL_FORMAT) if isinstance(header, dict) else None
        if type(version) is int and version != PARTIAL_VERSION:
            raise LmforgeError(
                f"{path} holds unfinished completions of another lmforge version (partial format {version}, this "
                f"one reads {PARTIAL_VERSION}); finish it with that version, or delete {path} to start over"
            )
        if not (version == PARTIAL_VERSION and isinstance(header.get("job"), dict)):
            raise LmforgeError(
                f"{path} is in the way: --out keeps its unfinished completions there, and it is not such a file of "
                "lmforge generate; move it away or choose another --out"
            )
        if header["job"] != job:
            changed = [k for k in job if header["job"].get(k) != job[k]] or sorted(header["job"])
            names = ", ".join(dict.fromkeys(_JOB_FLAGS.get(k, "--" + k.replace("_", "-")) for k in changed))
            raise LmforgeError(
                f"{path} holds the unfinished completions of another job (what differs: {names}; it was made by: "
                f"{header.get('command', '?')}); run that command to finish it, or delete {path} to start over"
            )
        keep = len(lines[0]) + 1
        for line in lines[1:-1]:
            record = _json_line(line)
            if not (
                isinstance(record, dict)
                and type(record.get("row")) is int
                and 0 <= record["row"] < n_rows
                and isinstance(record.get("completion"), str)
                and record.get("finish_reason") in ("stop", "length")
            ):
                break
            done.setdefault(record["row"], (record["completion"], record["finish_reason"]))
            keep += len(line) + 1
        if keep < len(data):  # (appending after a torn line would glue the next record to it)
            handle.truncate(keep)
            print(
                f"note: {path} ended in a torn line (a killed run's, or a full disk's); it is dropped and made again",
                file=sys.stderr,
            )
        if done:
            print(f"resuming: {len(done)} of {n_rows} completions are done in {path}", file=sys.stderr, flush=True)
        return handle, done
    except BaseException:
        _close(handle)
        raise


def _close(partial: BinaryIO) -> None:
    """Close the partial file. Every write was flushed and synced, or failed and is being raised: closing retries a
    failed one's bytes, and its second "[Errno 28] No space left on device" replaced the error that named the file."""
    with contextlib.suppress(OSError):
        partial.close()


def _lock(handle: BinaryIO, path: Path) -> None:
    """An exclusive lock on the open partial file (`atomic.try_lock`): two runs appending to one file would mix
    their lines. Where there are no locks (Windows) there is no check."""
    if try_lock(handle) is False:
        raise LmforgeError(
            f"another lmforge generate is writing {path} right now; wait for it to end or stop it, or choose "
            "another --out"
        ) from None


def _json_line(line: bytes) -> Any:
    try:
        return json.loads(line.decode("utf-8"))
    except ValueError:  # (UnicodeDecodeError too)
        return None


def _append(partial: BinaryIO, finished: dict[int, tuple[str, str]]) -> None:
    """A batch's rows, a whole JSON line each, written in one call, flushed and synced: a kill or a power loss
    leaves at most a torn last line (fsync: 6 ms measured on a VM disk; a batch of a real model decodes for
    seconds)."""
    lines = [{"row": b, "completion": text, "finish_reason": finish} for b, (text, finish) in finished.items()]
    with naming(partial.name):  # (a full disk: the rows before stay, a torn last line is made again on a re-run)
        partial.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8"))
        partial.flush()
        os.fsync(partial.fileno())


def _interrupted_unsaved(done: int, total: int, jsonl: bool, stdin: bool) -> str:
    """The line an interrupted run without `--out` ends with: its finished completions were all printed."""
    from lmforge.log import rerun_command

    if not jsonl:  # (--num-samples of one --prompt: nothing to continue)
        return f"interrupted: {done} of {total} samples printed, {total - done} missing"
    again = " (the same prompts on stdin)" if stdin else ""
    return (
        f"interrupted: {done} of {total} completions printed, {total - done} missing; with --out the finished ones "
        f"are kept and the same command{again} continues where it stopped: {rerun_command(sys.argv)} --out "
        "completions.jsonl"
    )


def _interrupted(out: Path, done: int, total: int, stdin: bool) -> str:
    """The line an interrupted run with `--out` ends with: what is done, where it is kept, how to go on."""
    from lmforge.log import rerun_command

    again = "the same command again, with the same prompts on stdin," if stdin else "the same command again"
    return (
        f"interrupted: {done} of {total} completions done, kept in {partial_path(out)}; run {again} to continue: "
        f"{rerun_command(sys.argv)}"
    )
