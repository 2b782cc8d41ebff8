"""Question answering rows (`--task qa`): reading comprehension in the SQuAD / CMRC 2018 layouts.

- Prompt: the user turn is the question; with a `context` it is `CONTEXT`, a blank line, then the question
  (`user_content`). A row without a context (or with an empty one) gets the question alone, the prompt qa
  always had, so runs trained before contexts were read see the same ids.
- References: `answer` may be one string, a list of strings, Hugging Face datasets' SQuAD column
  `{"text": [...], "answer_start": [...]}` or SQuAD's own `[{"text": ..., "answer_start": ...}, ...]`; a file
  without an `answer` column is read from `answers` (SQuAD's name) unless `--field answer=...` names another.
  Training uses the first reference; scoring takes the best EM and the best F1 over all of them, as the
  official SQuAD v1.1 script's `metric_max_over_ground_truths` does.
- The official SQuAD JSON file (`{"version", "data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`,
  also CMRC 2018's and DRCD's) is read directly, one row per question (`squad_rows`).
- Unanswerable questions (SQuAD v2's `is_impossible: true`, or an empty answer list): the target is the fixed
  reply `UNANSWERABLE`, so a v2 model learns to abstain in words one can see in `chat`; EM on those rows is
  the share of abstentions (reported apart as `no_answer`).
- Too long for `--max-len`: the context is cut, never the question or the answer (`fit_context`). Training
  keeps the window of the context around the answer (from `answer_start`, else where the answer text first
  occurs).
- Too long for the model at evaluation, which must not know where the answer is: the context is read in
  overlapping windows of tokens, each with the whole question (`context_windows`; consecutive windows share
  `--doc-stride` tokens, 128 by default and at most half a window, as the `doc_stride` of Hugging Face's
  question-answering pipeline). Each window gets its own answer and the question's answer is the one the
  model is surest of (`pick_answer`): the highest mean log-probability per token of the reply as trained
  (answer + end of text) after its window. Abstaining (`unanswerable`, or nothing) is chosen only when every
  window abstains: a window that does not hold the answer should abstain, so one window's abstention is no
  evidence against an answer another window found (the pipeline's rule too: the no-answer score is the
  minimum over the chunks).
- Scoring follows the official SQuAD v2 script: a reply of `unanswerable` (or an empty one) is the empty
  prediction, and a question without answers is scored against the empty string (`scored_prediction`).
"""

from __future__ import annotations

import bisect
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.data.formats import label_name, scalar_text
from lmforge.data.tables import MissingColumnError, column, null_cell, refuse_structured
from lmforge.errors import DataError

UNANSWERABLE = "unanswerable"  # the reply trained and expected for a question the context does not answer
# tokens consecutive evaluation windows of a long context share: Hugging Face's question-answering pipeline's
# default doc_stride (beside its max_seq_len of 384); at most half a window (`context_windows`)
DOC_STRIDE = 128


def is_squad(data: Any) -> bool:
    """Whether parsed JSON is a SQuAD-shaped file (a `data` list of articles holding `paragraphs`; an empty list
    too, so that such a file is said to hold no questions rather than not to be SQuAD's shape)."""
    articles = data.get("data") if isinstance(data, dict) else None
    return isinstance(articles, list) and all(isinstance(a, dict) and "paragraphs" in a for a in articles)


def squad_rows(data: dict[str, Any], path: str | Path) -> list[dict[str, Any]]:
    """One row per question of a SQuAD-shaped file: `question`, `context`, `answers` (as written; [] when the
    question has none), and `id`, `title`, `is_impossible` where the file has them."""
    rows = []
    for i, article in enumerate(data["data"]):
        for j, paragraph in enumerate(article["paragraphs"] or []):
            where = f"{path}: data[{i}].paragraphs[{j}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise DataError(f'{where} has no \'context\' text; each paragraph is {{"context": ..., "qas": [...]}}')
            for k, qa in enumerate(paragraph.get("qas") or []):
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                    raise DataError(f"{where}.qas[{k}] has no 'question' text; fix or remove that question")
                row = {"question": qa["question"], "context": paragraph["context"], "answers": qa.get("answers") or []}
                row |= {key: qa[key] for key in ("id", "is_impossible") if key in qa}
                if "title" in article:
                    row["title"] = article["title"]
                rows.append(row)
    return rows


def answer_column(row: dict[str, Any], fields: dict[str, str]) -> str:
    """The column a row's answers are in: `fields["answer"]`, or SQuAD's `answers` when the answer field has
    its default name and the row has no such column."""
    name = fields["answer"]
    return "answers" if name == "answer" and name not in row and "answers" in row else name


def check_rows(rows: list[dict[str, Any]], fields: dict[str, str], path: str | Path) -> None:
    """A one-line error for the first row whose question, answers or context cannot be read."""
    column(rows, fields["question"], "question", path)
    context = fields.get("context", "context")
    for i, row in enumerate(rows, 1):
        name = answer_column(row, fields)
        if name not in row:
            raise MissingColumnError(
                f"{path}: row {i} has no column {name!r} (columns: {', '.join(list(row)[:8])}); rename with "
                "--field answer=COLUMN"
            )
        if row[name] is None:
            raise null_cell(path, i, name)
        references(row, fields, where=f"{path}: row {i}")
        refuse_structured(row.get(context), context, i, path)


def dotted_answers(rows: list[dict[str, Any]], fields: dict[str, str], path: str | Path) -> list[dict[str, Any]]:
    """Rows with a dotted answer column that is not a key itself (`--field answer=answers.text`) read into the
    row's references: the value the path reaches, or every one of them as one list where it walks a list (the
    walker of every dotted field, `jsonl.dotted_rows`); `tables.nested_rows` would make one row per answer of a
    list of SQuAD answers, asking the same question several times. Only where the question and context are plain
    columns: with `--field question=instances.input --field answer=instances.output` each item is a question of
    its own (`nested_rows`). A row where the path ends early is left without the column (`check_rows` names it).

    Raises:
        DataError: a list on the way holds something other than objects (`answers.text` over ["Paris"]).
    """
    from lmforge.data.jsonl import dotted_rows

    name = fields["answer"]
    others = [fields["question"], fields.get("context", "context")]
    if "." not in name or not rows or name in rows[0] or any("." in c and c not in rows[0] for c in others):
        return rows
    hint = f"point --field answer=COLUMN at the answers (e.g. --field answer={name.rsplit('.', 1)[0]})"
    out = []
    for i, row in enumerate(rows, 1):
        items = dotted_rows(row, [name], f"{path}: row {i}", missing="absent", hint=hint)
        values = [item[name] for item in items if item.get(name) is not None]
        if items and not values:  # the path ends early (or at null) everywhere: no column
            out.append(row)
            continue
        texts = [t for v in values for t in (v if isinstance(v, list) else [v])]
        out.append(row | {name: values[0] if len(items) == 1 else texts})  # (an empty list: no answer, SQuAD v2)
    return out


def _texts(value: Any, where: str, name: str) -> tuple[list[str], int | None]:
    """(reference texts, the first one's answer_start or None) of an answer cell in any of the layouts."""
    hint = (
        f"{where}: column {name!r} should be an answer text, a list of them, or SQuAD's "
        '{"text": [...], "answer_start": [...]} / [{"text": ..., "answer_start": ...}]'
    )
    if isinstance(value, dict):
        if "text" not in value:
            raise DataError(f"{hint}; it is an object with keys {', '.join(map(str, value)) or 'none'}")
        texts = value["text"] if isinstance(value["text"], list) else [value["text"]]
        starts = value.get("answer_start")
        start = (starts[0] if starts else None) if isinstance(starts, list) else starts
    elif isinstance(value, list):
        texts, start = [], None
        for k, item in enumerate(value):
            if isinstance(item, dict):
                if "text" not in item:
                    raise DataError(f"{hint}; item {k} has keys {', '.join(map(str, item)) or 'none'}")
                if not texts:
                    start = item.get("answer_start")
                texts.append(item["text"])
            else:
                texts.append(item)
    else:
        return [scalar_text(value)], None
    for t in texts:
        if t is None or isinstance(t, (list, dict)):
            raise DataError(f"{hint}; it holds {t!r}")
    return [scalar_text(t) for t in texts], start if isinstance(start, int) and not isinstance(start, bool) else None


def unanswerable(row: dict[str, Any], fields: dict[str, str]) -> bool:
    """SQuAD v2's no-answer question: `is_impossible` true, or an answer list or SQuAD object with no text."""
    if row.get("is_impossible") is not None and label_name(row["is_impossible"]) in ("true", "1"):  # (CSV: "True")
        return True
    value = row.get(answer_column(row, fields))
    if isinstance(value, (list, dict)):
        return not any(t.strip() for t in _texts(value, "", "")[0])
    return False


def references(row: dict[str, Any], fields: dict[str, str], *, where: str = "") -> list[str]:
    """The reference answers of a row, as written (the first one is trained on); `[UNANSWERABLE]` for a question
    that has none. A plain string is kept even when empty (a scored file refuses it, `check_columns`)."""
    name = answer_column(row, fields)
    texts, _ = _texts(row[name], where, name)  # (checked first: a malformed cell is an error, not "no answer")
    if unanswerable(row, fields):
        return [UNANSWERABLE]
    kept = [t for t in texts if t.strip()]  # (a blank item of a list is no reference)
    return kept or texts


def context_of(row: dict[str, Any], fields: dict[str, str]) -> str:
    """The row's context, "" when it has none."""
    value = row.get(fields.get("context", "context"))
    return "" if value is None else str(value)


def answer_span(row: dict[str, Any], fields: dict[str, str]) -> tuple[int, int] | None:
    """(start, end) characters of the trained answer in the context: at its `answer_start` when the text is
    there, else where it first occurs; None when it is not in the context."""
    context, answer = context_of(row, fields), references(row, fields)[0]
    if not answer or unanswerable(row, fields):
        return None
    _, start = _texts(row[answer_column(row, fields)], "", "")
    if start is None or context[start : start + len(answer)] != answer:
        start = context.find(answer)
    return None if start < 0 else (start, start + len(answer))


def user_content(question: str, context: str) -> str:
    """The user turn: the question, after the context and a blank line when there is one."""
    return f"{context.strip()}\n\n{question}" if context.strip() else question


def fit_context(context: str, n_tokens: Callable[[str], int], room: int, span: tuple[int, int] | None) -> str:
    """The longest window of `context` whose prompt (`n_tokens(window)`) takes at most `room` tokens: around
    `span` (the answer, centred) when given, else the start. "" when even that does not fit. Searched by
    bisection over the window's length in characters (a token count grows with it)."""

    def window(n: int) -> str:
        if span is None:
            return context[:n]
        a, b = span
        start = max(0, min(a - (n - (b - a)) // 2, len(context) - n))
        return context[start : start + n]

    lo, hi = 0, len(context)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(window(mid)) <= room:
            lo = mid
        else:
            hi = mid - 1
    return window(lo)


def context_windows(
    tok: Any, context: str, n_tokens: Callable[[str], int], room: int, doc_stride: int = DOC_STRIDE
) -> list[str]:
    """Overlapping windows of a context too long for its prompt, in order: each the most context tokens whose
    prompt (`n_tokens(window)`: the question and the template around it) takes at most `room` tokens; each
    starts `doc_stride` tokens (at most half a window) before the previous one ended, and the last one ends
    with the context, so every token of the context is in a window. Windows are cut between the context's
    own tokens (their character offsets), so no character is split: never inside a run of tokens that share
    characters (byte-fallback pieces carry their character's offsets, a unigram model's pieces of a run of unseen
    characters the whole run's), a run longer than a window staying whole. [""] when not even one token fits."""
    spans = tok.hf.encode(context, add_special_tokens=False).offsets  # (start, end) characters of each token
    width = room - (n_tokens(context) - len(spans))  # the room the question and template leave (+-1 at the seams)
    if width < 1 or not spans:
        return [""]
    # the token indices a window may start or end at (a cut inside a shared run took in the whole run, went over
    # `room` and moved on one token at a time: hundreds of windows of one run)
    cuts = [0, *(i for i in range(1, len(spans)) if spans[i][0] >= spans[i - 1][1]), len(spans)]

    def cut_at_or_before(i: int) -> int:
        return cuts[bisect.bisect_right(cuts, i) - 1]

    def cut_after(i: int) -> int:
        return cuts[bisect.bisect_right(cuts, i)]

    overlap = min(doc_stride, width // 2)
    windows, start = [], 0
    while True:
        end = max(cut_at_or_before(start + width), cut_after(start))
        while cut_at_or_before(end - 1) > start and n_tokens(context[spans[start][0] : spans[end - 1][1]]) > room:
            end = cut_at_or_before(end - 1)  # (a seam encoded differently in the prompt than in the context alone)
        windows.append(context[spans[start][0] : spans[end - 1][1]])
        if end == len(spans):
            return windows
        start = max(cut_at_or_before(end - overlap), cut_after(start))
        if cut_at_or_before(start + width) <= end:  # (a run longer than a window next: it, not windows in this one)
            start = end


def abstains(prediction: str) -> bool:
    """Whether a reply says the context holds no answer: `unanswerable` (any case, punctuation) or nothing.

    "Nothing" is what SQuAD v2's script takes for the empty prediction: nothing left once ASCII punctuation,
    articles and spaces are dropped. Scoring drops every Unicode punctuation mark (so "北京。" is "北京"), but a
    reply of only "，，，" is a reply, not an abstention: a degenerate model scored as abstaining correctly."""
    from lmforge.eval.tasks import normalize_answer

    if normalize_answer(prediction) == UNANSWERABLE:
        return True
    text = "".join(ch for ch in prediction.lower() if ch not in string.punctuation)
    return not re.sub(r"\b(a|an|the)\b", " ", text).split()


def scored_prediction(prediction: str) -> str:
    """The prediction as SQuAD v2's official script scores it: an abstention is the empty string."""
    return "" if abstains(prediction) else prediction


def pick_answer(answers: list[str], scores: list[float]) -> str:
    """One answer from a question's windows (module docstring): the best-scored (`scores`: the mean
    log-probability per token of each window's reply) of the replies that answer, an abstention only when
    every reply abstains; ties go to the earlier window."""
    found = [i for i, a in enumerate(answers) if not abstains(a)] or list(range(len(answers)))
    return answers[max(found, key=scores.__getitem__)]


def qa_windows(
    tok: Any, template: Any, row: dict[str, Any], fields: dict[str, str], room: int, doc_stride: int = DOC_STRIDE
) -> list[list[dict[str, str]]]:
    """The evaluation prompts (chat messages to answer) of a row, each within `room` tokens: one when the
    context fits, as `qa_messages` makes it, else one per window of the context (`context_windows`)."""
    question, context = str(row[fields["question"]]), context_of(row, fields)

    def messages(ctx: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": user_content(question, ctx)}]

    def n_tokens(ctx: str) -> int:
        return template.prompt_length(tok, messages(ctx))

    if not context.strip() or n_tokens(context) <= room:
        return [messages(context)]
    return [messages(window) for window in context_windows(tok, context, n_tokens, room, doc_stride)]


def qa_messages(
    tok: Any, template: Any, row: dict[str, Any], fields: dict[str, str], room: int
) -> tuple[list[dict[str, str]], str]:
    """(the row's training chat messages, the context they hold) with the context cut so that the whole example
    (prompt, answer and its EOS) fits `room` tokens, keeping the window around the answer (evaluation reads
    every window instead: `qa_windows`)."""
    question, context = str(row[fields["question"]]), context_of(row, fields)
    reply = {"role": "assistant", "content": references(row, fields)[0]}  # (once: not per try)

    def messages(ctx: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": user_content(question, ctx)}, reply]

    def n_tokens(ctx: str) -> int:
        return sum(len(ids) for ids, _ in template.segments(tok, messages(ctx)))

    if context.strip() and n_tokens(context) > room:
        context = fit_context(context, n_tokens, room, answer_span(row, fields))
    return messages(context), context


def qa_examples(
    rows: list[dict[str, Any]],
    *,
    tok: Any,
    template: Any,
    fields: dict[str, str],
    max_len: int,
    path: str | Path,
    advice: str,
) -> list[Any]:
    """Training examples of qa rows (`formats.build_examples`): each context cut to fit `max_len` around its
    answer; a note on stderr counts the contexts cut, answers the cut left out of their context, and answers
    cut short (the question and answer alone are over `max_len`), with `advice` (`formats.keep_more`'s)."""
    from lmforge.data.formats import note, segments_example

    out, cut, lost, short = [], 0, 0, 0
    for i, row in enumerate(rows, 1):
        try:
            messages, kept = qa_messages(tok, template, row, fields, max_len + 1)
            segments = template.segments(tok, messages)
        except DataError as e:
            raise DataError(f"{path}: row {i}: {e}") from None
        context, answer = context_of(row, fields), messages[-1]["content"]
        if kept != context:
            cut += 1
            lost += bool(answer) and answer in context and answer not in kept
        example = segments_example(segments, max_len, tok.prompt_prefix)
        short += sum(example.train) < sum(len(ids) for ids, train in segments if train)
        out.append(example)
    if cut or short:
        notes = [f"{cut:,} of {len(rows):,} contexts cut to fit {max_len} tokens (around the answer)"] if cut else []
        notes += [f"{lost:,} of them no longer hold the answer"] if lost else []
        notes += [f"{short:,} answers cut short (question and answer alone exceed {max_len} tokens)"] if short else []
        note(f"note: {path}: {'; '.join(notes)}; {advice}")
    return out
