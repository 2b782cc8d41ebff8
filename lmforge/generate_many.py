"""`lmforge generate --num-samples N` and `--prompt-file FILE`: many completions, decoded in batches.

- Prompts: `--prompt` (one), or `--prompt-file`: a `.jsonl` (one JSON object per line with a "prompt"
  string) or any other file as text, one prompt per line (a prompt with a newline in it needs the JSONL form).
  Empty lines are skipped in both; a UTF-8 byte-order mark is read past. `--prompt-file -` reads stdin: it has
  no name to tell the format by, so it is JSONL when its first non-blank line is a JSON object, else text
  (`cat prompts.jsonl | lmforge generate RUN --prompt-file -`).
- Each prompt gets `num_samples` completions. The (prompt, sample) rows are sorted by prompt length (little
  padding per batch) and decoded `--batch-size` (default `PROMPT_BATCH`) at a time with `generate.generate_batch`,
  which gives each row its own positions and hides the padding: a greedy row equals `lmforge generate --prompt` on that
  prompt alone (tested). Rows go through `generate` one at a time instead where a batch cannot take them:
  a run without a KV cache (a soft-prompt fine-tune, a recurrent model), `--no-cache`, or a batch whose
  longest prompt plus `--max-new-tokens` is past the context (`generate` slides a window there; a batch
  cache cannot).
- Seeds: batch k samples with seed + k, a row generated alone with seed + its row number (rows in prompt
  order, a prompt's samples in order), so the same command and seed give the same samples, and the N
  samples of a prompt differ.
- Each row ends as `--prompt` does: at end-of-text or a run stop id (unless `--ignore-eos`), or before the
  first `--stop` string (`generate.StopStrings`, fed token by token: the same cut as a single prompt's).
- Output: with `--prompt-file`, JSONL in input order, one line per completion: a JSONL line's own fields
  ("id", "meta", ...: carried unchanged, in their order, "prompt" among them), then "completion",
  "finish_reason" ("stop" or "length", as OpenAI's) and, with N > 1, "sample" (0..N-1). These three are the
  output's own: an input field of one of those names is replaced (a note on stderr says so). To stdout, or
  written atomically to `--out` (`atomic.atomic_write_text`). With `--prompt` alone, the N samples are
  printed as text, each as prompt + completion under a `=== sample i/N ===` line.
- Progress: a tqdm bar of completions done on stderr (on a terminal only, as prepare's; `--quiet`: none). An
  interrupt (Ctrl-C, SIGTERM) ends the run before anything is written: `--out` stays as it was (cli: exit 130).

vLLM's `run_batch` and llama.cpp's `llama-parallel` batch prompts for the same reason: a decode step of a
small model costs about the same for 1 row as for 16 (README, Speed: 6.56x on 16 prompts).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from lmforge.errors import LmforgeError

PROMPT_BATCH = 16  # rows decoded together by default (eval's ANSWER_BATCH); --batch-size
STDIN = "-"  # --prompt-file -: the prompts come from stdin
OUTPUT_FIELDS = ("completion", "finish_reason", "sample")  # an output line's own, after a JSONL line's fields


def read_prompts(path: str | Path) -> list[tuple[int, str, dict[str, Any]]]:
    """The prompts of a `--prompt-file`, each with its line number and the other fields of its JSONL line
    ({} for text): a .jsonl's "prompt" fields, else the file's non-empty lines. `-` reads stdin, as JSONL when
    its first non-blank line is a JSON object, else as text.

    Raises:
        LmforgeError: a missing, non-UTF-8 or empty file; a .jsonl line that is not a JSON object with a
            "prompt" string (named by its line number).
    """
    if str(path) == STDIN:
        name, data = "stdin", sys.stdin.buffer.read()
    else:
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise LmforgeError(f"--prompt-file {path} {what}; give a .txt (one prompt per line) or a .jsonl file")
        name, data = str(path), path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        fix = "pipe it through iconv -f GBK -t UTF-8" if name == "stdin" else f"e.g. iconv -f GBK -t UTF-8 {name}"
        raise LmforgeError(f"{name} line {line} is not UTF-8 text; convert the file ({fix})") from None
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1)]
    jsonl = _is_jsonl(lines) if name == "stdin" else path.suffix.lower() == ".jsonl"
    lines = [(n, line) for n, line in lines if (line.strip() if jsonl else line)]  # (a line of spaces: a prompt)
    if not lines:
        raise LmforgeError(f'{name} holds no prompts; put one per line (in a .jsonl: {{"prompt": "..."}} per line)')
    if not jsonl:
        return [(n, line, {}) for n, line in lines]
    prompts = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{name} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise LmforgeError(f'{name} line {n} has no "prompt" string; write each line as {{"prompt": "..."}}')
        prompts.append((n, row["prompt"], row))
    return prompts


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
) -> str:
    """`num_samples` completions of each of `prompts` ((text, where, fields), `many_prompts`) with a loaded run,
    written as JSONL (`jsonl`: a prompt file's) to `out` or `stream`, else as text to `stream` (module docstring).
    `settings`: `generate_batch`'s sampling keywords, from `generate_from_checkpoint`; `batch_size`: rows decoded
    together (None: `PROMPT_BATCH`); `progress`: a bar of completions done on stderr (on a terminal). Returns what
    it wrote.

    Raises:
        LmforgeError: a prompt that does not fit the context, or is empty without an end-of-text token.
    """
    from lmforge.atomic import atomic_write_text
    from lmforge.generate import command_prompt_ids

    prompt_ids = [command_prompt_ids(loaded, text, where) for text, where, _ in prompts]
    rows = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]  # (prompt, sample), in output order
    batch = PROMPT_BATCH if batch_size is None else batch_size
    from tqdm import tqdm

    # drawn only on a terminal (tqdm's None), as prepare's: a log or `2>file` gets no bar frames
    with tqdm(total=len(rows), unit="completion", desc="generating", disable=None if progress else True,
              file=sys.stderr) as bar:  # fmt: skip
        texts, finishes = _complete(
            loaded, [prompt_ids[i] for i, _ in rows], settings, stop, seed, use_cache, batch, bar.update
        )
    records = []
    for (i, j), text, finish in zip(rows, texts, finishes, strict=True):
        text_in, _, fields = prompts[i]
        sample = {"sample": j} if num_samples > 1 else {}
        # a JSONL line's own fields ("id", "meta", ...) first, as given; an output field's name in it is replaced
        carried = {k: v for k, v in fields.items() if k not in OUTPUT_FIELDS}
        records.append(carried | {"prompt": text_in, "completion": text, "finish_reason": finish} | sample)
    if jsonl:
        written = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:  # one prompt's samples
        written = "".join(
            f"=== sample {j}/{num_samples} ===\n{r['prompt']}{r['completion']}\n" for j, r in enumerate(records, 1)
        )
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, written)
    elif stream is not None:
        stream.write(written)
        stream.flush()
    return written


def _complete(
    loaded: Any,
    rows: list[list[int]],
    settings: dict[str, Any],
    stop: list[str],
    seed: int | None,
    use_cache: bool,
    batch_size: int,
    done: Callable[[int], Any],
) -> tuple[list[str], list[str]]:
    """Each row's completion text and finish reason ("stop" or "length"), decoded in batches where they fit;
    `done(n)` is told each time n more rows are finished."""
    from lmforge.generate import (
        StopStrings,
        StreamDecoder,
        completion_decoder,
        context_length,
        generate,
        generate_batch,
    )

    stops = frozenset(settings["stop_ids"])  # (with eos: run_stops)
    decoders = [StreamDecoder(completion_decoder(loaded.tokenizer, ids)) for ids in rows]
    cuts = [StopStrings(stop) for _ in rows]

    def on_token(b: int, token: int) -> bool:  # b: the row's index in `rows`
        if token not in stops:  # (as generate_from_checkpoint shows a row's text)
            cuts[b].feed(decoders[b].feed(token))
        return cuts[b].stopped

    new: list[list[int]] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda b: len(rows[b]))  # stable: a prompt's samples stay in order
    context = context_length(loaded.model)
    for k, start in enumerate(range(0, len(order), batch_size)):
        batch = order[start : start + batch_size]
        if use_cache and len(rows[batch[-1]]) + settings["max_new_tokens"] - 1 <= context:
            outs = generate_batch(
                loaded.model,
                [rows[b] for b in batch],
                seed=None if seed is None else (seed + k) % 2**63,
                on_token=lambda row, token, batch=batch: on_token(batch[row], token),
                **settings,
            )
            for b, ids in zip(batch, outs, strict=True):
                new[b] = ids
            done(len(batch))
            continue
        for b in batch:  # alone: no cache, or past the context (sliding window)
            new[b] = generate(
                loaded.model,
                rows[b],
                seed=None if seed is None else (seed + b) % 2**63,
                use_cache=use_cache,
                on_token=lambda token, b=b: on_token(b, token),
                prefix=loaded.tokenizer.prompt_prefix,  # (kept first when the window slides)
                **settings,
            )
            done(1)
    texts, finishes = [], []
    for b, ids in enumerate(new):
        cuts[b].feed(decoders[b].flush())  # (a character cut by max_new_tokens is dropped, as --prompt drops it)
        texts.append(cuts[b].text)
        finishes.append("stop" if cuts[b].stopped or (ids and ids[-1] in stops) else "length")
    return texts, finishes
