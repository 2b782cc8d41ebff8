"""Multiple choice by log-likelihood: `lmforge eval RUN --task choice --data FILE` (zero-shot, or k-shot with
`--k-shot K --shots FILE`), for any causal LM run, no fine-tuning needed.

Rows: a `question`, its options and the `answer`, in one of two layouts:
- `choices`: a list of option texts (JSONL: ARC, HellaSwag, PIQA as Hugging Face datasets hold them), or
- one column per option, `A`, `B`, `C`, ... (the MMLU / C-Eval / CMMLU CSV layout).
`answer` is the correct option's letter (`B`), its 0-based index (`1`, as HF datasets number labels), or
its text; a number (JSON, Parquet) is the index even where an option's text is that number.
`--field question=ctx --field choices=endings --field answer=label` renames them.

Each option is scored as lm-evaluation-harness scores a `multiple_choice` task: the sum of its tokens'
log-probabilities after the prompt `Question: {question}\\nAnswer:` (a Chinese question: `问题：{question}\\n
答案：`), the option written after a space (none after the Chinese colon). `accuracy` picks the highest sum,
`accuracy_norm` the highest sum per UTF-8 byte of the option (lm-evaluation-harness's acc_norm divides by
characters; bytes weigh a Chinese option as its tokens mostly do), which does not favour short options.
k-shot prompts put k solved questions first, drawn per row (seeded) from the shots, never the row itself;
those that do not fit in the context beside the longest option are left out whole, the first ones first.
"""

from __future__ import annotations

import random
import re
import string
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError, DataError

FIELDS = ("question", "choices", "answer")
_LETTERS = string.ascii_uppercase
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def choice_fields(renames: list[str] | None) -> dict[str, str]:
    fields = {name: name for name in FIELDS}
    for item in renames or []:
        name, _, column = item.partition("=")
        if name not in fields or not column:
            raise DataError(
                f"--field {item!r}: --task choice has the fields {', '.join(FIELDS)}; write NAME=COLUMN, e.g. "
                "--field choices=endings"
            )
        fields[name] = column
    return fields


def read_choice_rows(path: str | Path, fields: dict[str, str]) -> list[tuple[str, list[str], int]]:
    """(question, options, index of the correct one) for each row; one-line `DataError`s naming the row."""
    from lmforge.data.tables import read_table

    out = []
    for i, row in enumerate(read_table(path), 1):
        where = f"{path}: row {i}"
        if fields["question"] not in row:
            raise DataError(
                f"{where} has no {fields['question']!r} column (columns: {', '.join(map(str, list(row)[:8]))}); "
                "rename with --field question=COLUMN"
            )
        options = row.get(fields["choices"])
        if options is None:  # one column per option: A, B, C, ...; blank ones after the last option end the list
            options = [row[c] if row[c] is not None else "" for c in _LETTERS if c in row]
            while options and not str(options[-1]).strip():
                options.pop()
            if any(not str(o).strip() for o in options):  # dropping it would give the next options its letter
                gap = _LETTERS[[str(o).strip() for o in options].index("")]
                raise DataError(
                    f"{where}: option {gap} is empty while later options are not; fill it in or drop the row"
                )
        if isinstance(options, str) or not isinstance(options, list) or len(options) < 2:
            raise DataError(
                f"{where} needs at least two options: a list in {fields['choices']!r}, or columns A, B, C, ... "
                "(rename with --field choices=COLUMN)"
            )
        options = [str(o).strip() for o in options]
        out.append(
            (
                str(row[fields["question"]]).strip(),
                options,
                _answer_index(row.get(fields["answer"]), options, where, fields),
            )
        )
    if not out:
        raise DataError(f"{path} holds no rows; check the file")
    return out


def _answer_index(answer: Any, options: list[str], where: str, fields: dict[str, str]) -> int:
    """The correct option of a row: its text, its letter, or its 0-based index (in that order of trust), except
    that a JSON/Parquet number is an index first: HF datasets' `answer: 1` is the second option even where the
    options are numbers themselves (["1", "2", "3"]), which text first read as the first."""
    from lmforge.data.formats import label_name

    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and float(answer).is_integer():
        if 0 <= answer < len(options):
            return int(answer)
    text = str(answer).strip() if answer is not None else ""
    if text in options:
        return options.index(text)
    if len(text) == 1 and text.upper() in _LETTERS[: len(options)]:
        return _LETTERS.index(text.upper())
    index = label_name(answer) if answer is not None and not isinstance(answer, bool) else ""
    # 1, "1", and 1.0 / "1.0" (pandas' int column with a gap); ASCII only: "²" passes isdigit() but not int()
    if index.isascii() and index.isdigit() and int(index) < len(options):
        return int(index)
    raise DataError(
        f"{where}: answer {text!r} names none of its {len(options)} options; give its letter (A-"
        f"{_LETTERS[len(options) - 1]}), its 0-based index or its text in {fields['answer']!r}"
    )


def _prompt(question: str) -> tuple[str, str]:
    """(the prompt for a question, what goes before an option): English or Chinese scaffolding."""
    if _CJK.search(question):
        return f"问题：{question}\n答案：", ""
    return f"Question: {question}\nAnswer:", " "


@torch.no_grad()
def choice_metrics(
    ft: Any,
    rows: list[tuple[str, list[str], int]],
    *,
    shots: list[tuple[str, list[str], int]] | None = None,
    k: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """accuracy, accuracy_norm, n and a few samples of a causal LM on multiple-choice rows (module docstring)."""
    from lmforge.eval.tasks import continuation_logprob, fewshot_head, note_dropped_demos
    from lmforge.generate import context_length

    model, tok = ft.model, ft.tokenizer
    if k and (not shots or k > len(shots)):
        raise DataError(f"--k-shot {k} but the shots file has {len(shots or [])} rows; lower --k-shot")
    rng = random.Random(seed)
    context = context_length(model)
    right = right_norm = dropped = 0
    samples = []
    for question, options, answer in rows:
        demos = []
        if k:
            pool = [s for s in shots or [] if s[0] != question]  # never the row's own answer
            if k > len(pool):
                raise DataError(f"--k-shot {k} but only {len(pool)} shots differ from {question[:40]!r}")
            for q, o, a in rng.sample(pool, k):
                prompt, space = _prompt(q)
                demos.append(f"{prompt}{space}{o[a]}\n\n")
        prompt, space = _prompt(question)
        tails = [tok.encode(space + option) for option in options]
        # demonstrations that do not fit beside the longest option are left out whole (`fewshot_head`)
        head, left_out = fewshot_head(tok, demos, prompt, context + 1 - max(len(t) for t in tails))
        dropped += left_out
        scores = [continuation_logprob(model, head, tail, context, tok.prompt_prefix) for tail in tails]
        best = max(range(len(options)), key=scores.__getitem__)
        norm = [s / max(1, len((space + o).encode("utf-8"))) for s, o in zip(scores, options, strict=True)]
        best_norm = max(range(len(options)), key=norm.__getitem__)
        right += best == answer
        right_norm += best_norm == answer
        if len(samples) < 3:
            samples.append({"question": question[:200], "answer": options[answer], "prediction": options[best]})
    note_dropped_demos(dropped, len(rows), k, context)
    n = len(rows)
    return {"accuracy": right / n, "accuracy_norm": right_norm / n, "n": n, "k_shot": k, "samples": samples}


def evaluate_choice(
    ft: Any, data: str | Path, *, renames: list[str] | None, k: int, shots: str | Path | None, limit: int
) -> dict[str, Any]:
    """`lmforge eval RUN --task choice --data FILE`: any language-model run (not a classifier or encoder)."""
    if getattr(ft.model, "head", None) is not None or getattr(ft.model.cfg, "family", "gpt") in ("bert", "electra"):
        raise ConfigError(
            f"{ft.run_dir} is not a causal language model; --task choice scores options by their likelihood"
        )
    if k and not shots:
        raise ConfigError("--k-shot needs --shots FILE with solved questions to put in the prompt")
    fields = choice_fields(renames)
    rows = read_choice_rows(data, fields)
    rows = rows[:limit] if limit else rows
    shot_rows = read_choice_rows(shots, fields) if k else None
    return {"task": "choice", **choice_metrics(ft, rows, shots=shot_rows, k=k)}
