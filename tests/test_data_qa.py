"""Reading comprehension for `--task qa` (lmforge/data/qa.py): contexts in the prompt, SQuAD's answer layouts and
JSON file, best-of-references EM/F1, SQuAD v2's unanswerable questions, and contexts cut to fit --max-len."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from lmforge.adapt.load import load_finetuned
from lmforge.chat import ChatTemplate
from lmforge.data.formats import build_examples
from lmforge.data.qa import UNANSWERABLE, references, unanswerable
from lmforge.data.tables import field_map, read_task_rows
from lmforge.errors import DataError
from tests.test_finetune import DATA, make_base

SQUAD = DATA / "squad_mini.json"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("qa"))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_squad_file_is_one_row_per_question_with_every_reference():
    fields = field_map("qa", None)
    rows = read_task_rows(SQUAD, "qa", fields, scored=True)
    assert [r["id"] for r in rows] == ["en-1", "en-2", "en-3", "zh-1", "zh-2"]
    assert rows[0]["context"].startswith("The old harbour town") and rows[3]["context"].startswith("甄士隐")
    assert references(rows[0], fields) == ["at seven in the morning", "seven in the morning"]
    assert references(rows[4], fields) == ["葫芦庙", "葫芦庙里"]
    assert references(rows[2], fields) == [UNANSWERABLE]  # v2: is_impossible, answers []


def test_answers_are_read_in_every_layout(tmp_path: Path):
    """`answer` as a string or a list; SQuAD's `answers` as HF datasets' dict of lists or a list of objects, found
    without --field, or named with --field answer=answers / answers.text (one row per question, not per answer)."""
    q, c = "Which river?", "It lies on the Seine."
    layouts = {
        "str": ({"answer": "the Seine"}, None),
        "list": ({"answer": ["the Seine", "Seine"]}, None),
        "hf": ({"answers": {"text": ["the Seine", "Seine"], "answer_start": [11, 15]}}, None),
        "squad": (
            {"answers": [{"text": "the Seine", "answer_start": 11}, {"text": "Seine", "answer_start": 15}]},
            None,
        ),
        "hf.text": ({"answers": {"text": ["the Seine", "Seine"]}}, ["answer=answers.text"]),
        "squad.text": ({"answers": [{"text": "the Seine"}, {"text": "Seine"}]}, ["answer=answers.text"]),
        "renamed": ({"gold": [{"text": "the Seine"}, {"text": "Seine"}]}, ["answer=gold"]),
        "v2": ({"answers": {"text": [], "answer_start": []}}, None),
    }
    for name, (answer, renames) in layouts.items():
        fields = field_map("qa", renames)
        path = _write_jsonl(tmp_path / f"{name}.jsonl", [{"question": q, "context": c, **answer}] * 2)
        rows = read_task_rows(path, "qa", fields, scored=True)
        assert len(rows) == 2, name
        expected = ["the Seine"] if name == "str" else [UNANSWERABLE] if name == "v2" else ["the Seine", "Seine"]
        assert references(rows[0], fields) == expected, name
    # a CSV (BOM, CRLF) with SQuAD v2's flag as pandas writes it
    path = tmp_path / "qa.csv"
    path.write_bytes(
        f"\ufeffquestion,answer,context,is_impossible\r\n{q},the Seine,{c},False\r\nWho?,x,,True\r\n".encode()
    )
    fields = field_map("qa", None)
    assert [references(r, fields) for r in read_task_rows(path, "qa", fields, scored=True)] == [
        ["the Seine"],
        [UNANSWERABLE],
    ]
    bad = {
        "no_text": ({"answers": {"answer_start": [3]}}, r"row 1: column 'answers' should be .* keys answer_start"),
        "nested": ({"answer": [["a"]]}, r"row 1: column 'answer' should be an answer text.* holds \['a'\]"),
        "missing": ({"reply": "x"}, r"row 1 has no column 'answer' \(columns: question, context, reply\); rename with"),
        "null": ({"answers": None}, r"row 1 has no value in column 'answers'"),
        "context": ({"answer": "x", "context": ["a", "b"]}, r"row 1 column 'context' holds a JSON list"),
    }  # fmt: skip
    for name, (answer, said) in bad.items():
        path = _write_jsonl(tmp_path / f"{name}.jsonl", [{"question": q, "context": c, **answer}])
        with pytest.raises(DataError, match=said):
            read_task_rows(path, "qa", field_map("qa", None))
    # --field answer=answers.text over a list of strings (no "text" in them) read each row as unanswerable, silently
    path = _write_jsonl(tmp_path / "strings.jsonl", [{"question": q, "context": c, "answers": ["the Seine"]}])
    with pytest.raises(DataError, match=r"row 1: 'answers' holds str values, .*; .*e\.g\. --field answer=answers\)"):
        read_task_rows(path, "qa", field_map("qa", ["answer=answers.text"]))


def test_a_malformed_squad_file_is_a_one_line_error(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"qas": [{"question": "q", "answers": []}]}]}]}))
    with pytest.raises(DataError, match=r"bad.json: data\[0\].paragraphs\[0\] has no 'context' text"):
        read_task_rows(bad, "qa", field_map("qa", None))
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"answers": []}]}]}]}))
    with pytest.raises(DataError, match=r"paragraphs\[0\].qas\[0\] has no 'question' text"):
        read_task_rows(bad, "qa", field_map("qa", None))
    bad.write_text(json.dumps({"version": "v2.0", "data": []}))  # SQuAD's shape, no article: no rows, not "no SQuAD"
    with pytest.raises(DataError, match=r"bad.json holds no rows; check the file"):
        read_task_rows(bad, "qa", field_map("qa", None))


def test_a_context_reaches_the_prompt_and_no_context_keeps_the_old_prompt(base: Path):
    ft = load_finetuned(base, torch.device("cpu"))
    tok, fields = ft.tokenizer, field_map("qa", None)
    rows = [
        {"question": "Which river?", "context": "It lies on the Seine.", "answer": "the Seine"},
        {"question": "Which river?", "context": "", "answer": "the Seine"},
        {"question": "Which river?", "answer": "the Seine"},
    ]
    examples = build_examples(rows, task="qa", tok=tok, fields=fields, max_len=100, labels=None, path="x")
    old = ChatTemplate().segments(
        tok, [{"role": "user", "content": "Which river?"}, {"role": "assistant", "content": "the Seine"}]
    )
    assert examples[1].ids == examples[2].ids == [i for ids, _ in old for i in ids]  # byte-identical to before
    with_context = tok.encode("<|user|>\n") + tok.encode("It lies on the Seine.\n\nWhich river?\n")
    assert examples[0].ids[: len(with_context)] == with_context
    assert tok.decode([i for i, t in zip(examples[0].ids, examples[0].train, strict=True) if t][:-1]) == "the Seine"


def test_a_long_context_is_cut_around_the_answer_never_the_question_or_answer(
    base: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """Training keeps the context window around the answer (its answer_start); the question and the answer are
    never cut; a note counts. (Evaluation, which must not know where the answer is, reads every window:
    `test_evaluation_reads_a_long_context_in_overlapping_windows`.)"""
    ft = load_finetuned(base, torch.device("cpu"))
    tok, fields = ft.tokenizer, field_map("qa", None)
    context = "A" * 60 + " the ferry leaves at seven. " + "B" * 60
    # (answer_start 80 is off by two, as some SQuAD offsets are: the answer is found where it first occurs)
    row = {"question": "When?", "context": context, "answers": [{"text": "at seven", "answer_start": 80}]}
    (example,) = build_examples([row], task="qa", tok=tok, fields=fields, max_len=60, labels=None, path="f.jsonl")
    text = tok.decode(example.ids)
    assert len(example.ids) == 61
    assert text.startswith("<|user|>\n") and "\n\nWhen?\n<|assistant|>\nat seven" in text
    kept = text.removeprefix("<|user|>\n").split("\n\nWhen?")[0]
    assert kept == context[72:93]  # the 21 characters that fit, centred on the answer (78 to 86)
    assert "1 of 1 contexts cut to fit 60 tokens (around the answer)" in capsys.readouterr().err


def test_evaluation_reads_a_long_context_in_overlapping_windows(
    base: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """A context too long for the prompt is split into windows of tokens (the char tokenizer: one per character)
    that each fit, each with the whole question, consecutive ones sharing min(--doc-stride, half a window)
    tokens, together holding every character; all windows are answered in one batch, and the answer only a late
    window can see wins over the others' abstentions. A context that fits is asked exactly as before."""
    import lmforge.eval.tasks as tasks
    from lmforge.data.qa import user_content

    ft = load_finetuned(base, torch.device("cpu"))  # (context 128)
    tok, fields, template = ft.tokenizer, field_map("qa", None), ChatTemplate()
    context = "x" * 150 + "seven" + "y" * 40  # (no spaces: a window's text is exactly its tokens)
    rows = [
        {"question": "When?", "context": context, "answers": [{"text": "seven", "answer_start": 150}]},
        {"question": "When?", "context": "at seven", "answer": "seven"},
    ]
    asked: list[list[int]] = []

    def answer(ft, prompts, n):  # a reader that finds the answer where its window holds it
        asked.extend(prompts)
        return ["seven" if "seven" in tok.decode(p) else "unanswerable" for p in prompts]

    monkeypatch.setattr(tasks, "_answers", answer)
    m = tasks.task_metrics(ft, rows, path="f", task="qa", fields=fields, max_new_tokens=28, doc_stride=16)
    assert m["em"] == 1.0 and m["windowed"] == 1 and "1 long contexts read in windows" in tasks.format_metrics(m)
    err = capsys.readouterr().err
    assert "1 of 2 contexts too long for the model's context beside 28 answer tokens were read in 4 overlapping" in err
    *windows, fitting = [tok.decode(p) for p in asked]
    head, tail = "<|user|>\n", "\n\nWhen?\n<|assistant|>\n"
    assert all(len(p) <= 100 for p in asked) and all(w.startswith(head) and w.endswith(tail) for w in windows)
    texts = [w.removeprefix(head).removesuffix(tail) for w in windows]
    # 69 context tokens beside the question's 31; 16 shared: each window starts 53 after the previous one, and the
    # last one ends with the context (every character is in a window; "seven", at 150, only in the last two)
    assert texts == [context[0:69], context[53:122], context[106:175], context[159:]]
    expected = template.prompt_ids(tok, [{"role": "user", "content": user_content("When?", "at seven")}], budget=100)
    assert asked[-1] == expected[0]  # a context that fits: the prompt as before windows
    m = tasks.task_metrics(ft, rows[:1], path="f", task="qa", fields=fields, max_new_tokens=28, doc_stride=500)
    assert m["windowed"] == 1 and "read in 5 overlapping" in capsys.readouterr().err  # (34 shared: half a window)
    asked.clear()
    wordy = {"question": "When? " + "w" * 100, "context": context, "answer": "seven"}  # no room left for the context
    m = tasks.task_metrics(ft, [wordy], path="f", task="qa", fields=fields, max_new_tokens=28)
    assert m["windowed"] == 0 and len(asked) == 1 and "x" not in tok.decode(asked[0])
    assert "1 of 1 questions were asked without their context" in capsys.readouterr().err


def test_em_and_f1_take_the_best_reference_and_score_unanswerable_apart(base: Path, monkeypatch: pytest.MonkeyPatch):
    """Hand values: the official SQuAD v1.1 script scores each question by its best reference
    (metric_max_over_ground_truths); a v2 unanswerable question expects the fixed reply."""
    import lmforge.eval.tasks as tasks
    from lmforge.eval.tasks import best_over_references

    assert best_over_references("seven in the morning", ["at seven in the morning", "seven in the morning"]) == (1, 1)
    # pred [ferry, at, seven] vs [at, seven, in, morning]: 2 shared, P 2/3 R 2/4 -> 4/7; vs [seven]: P 1/3 R 1 -> 1/2
    em, f1 = best_over_references("ferry at seven", ["at seven in the morning", "seven"])
    assert em == 0.0 and f1 == pytest.approx(4 / 7)
    assert best_over_references("葫芦庙", ["葫芦庙里", "旁边"])[1] == pytest.approx(6 / 7)  # P 1, R 3/4
    ft = load_finetuned(base, torch.device("cpu"))
    fields = field_map("qa", None)
    rows = read_task_rows(SQUAD, "qa", fields, scored=True)
    predictions = ["seven in the morning", "Tuesday market", "unanswerable.", "英莲", "庙"]

    by_question = {r["question"]: p for r, p in zip(rows, predictions, strict=True)}

    def answer(ft, prompts, n):  # each row's prediction, in every window of its context (150 tokens: 2 windows)
        asked = [ft.tokenizer.decode(p) for p in prompts]
        return [next(a for q, a in by_question.items() if q in text) for text in asked]

    monkeypatch.setattr(tasks, "_answers", answer)
    m = tasks.task_metrics(ft, rows, path=SQUAD, task="qa", fields=fields, max_new_tokens=4)
    # F1: 1, max(2/3 vs [every, tuesday], 2/3 vs [tuesday]) = 2/3, 1, 1, max(1/2, 2/5) = 1/2
    assert m["em"] == pytest.approx(3 / 5) and m["f1"] == pytest.approx((1 + 2 / 3 + 1 + 1 + 1 / 2) / 5)
    assert m["no_answer"] == {"em": 1.0, "f1": 1.0, "n": 1} and m["has_answer"]["n"] == 4
    assert "no_answer em 1.0000" in tasks.format_metrics(m)
    only_unanswerable = [row for row in rows if unanswerable(row, fields)]  # no has_answer group: not "em 0 n 0"
    by_question = {only_unanswerable[0]["question"]: "unanswerable"}
    m = tasks.task_metrics(ft, only_unanswerable, path=SQUAD, task="qa", fields=fields, max_new_tokens=4)
    assert m["no_answer"]["n"] == 1 and "has_answer" not in m and "has_answer" not in tasks.format_metrics(m)


def test_finetune_and_eval_read_a_squad_file(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """End to end on the shipped SQuAD file: a fine-tune trains on it (the unanswerable row's target is the fixed
    reply) and `eval --task qa` scores it from the command line."""
    from lmforge.cli import main
    from lmforge.finetune import FinetuneConfig, finetune

    fast = {"train": {"max_steps": 2, "batch_size": 4, "log_every": 1, "warmup_steps": 1}, "eval": {"every": 2}}
    out = tmp_path / "ft"
    result = finetune(base, train_file=SQUAD, val_file=SQUAD, out=out, cfg=FinetuneConfig(task="qa", max_new_tokens=4),
                      overrides=fast, progress=False)  # fmt: skip
    assert result["val"]["n"] == 5 and result["val"]["no_answer"]["n"] == 1
    with contextlib.suppress(SystemExit):  # (in process: a subprocess costs seconds)
        main(["eval", str(out), "--task", "qa", "--data", str(SQUAD), "--max-new-tokens", "4", "--json"])
    assert json.loads(capsys.readouterr().out)["has_answer"]["n"] == 4


def test_a_question_keeps_the_answer_the_model_is_surest_of(base: Path):
    """Per window, the score is the mean log-probability per token of the reply as trained (answer + EOS after the
    window's prompt), checked against one unbatched forward pass each; the best-scored answer wins, an abstention
    only when every window abstains, ties go to the earlier window."""
    from lmforge.data.qa import pick_answer, user_content
    from lmforge.eval.tasks import continuation_logprob, reply_logprobs

    assert pick_answer(["unanswerable", "Paris", "London", ""], [-0.1, -2.0, -1.0, -0.05]) == "London"
    assert pick_answer(["Unanswerable.", ""], [-3.0, -1.0]) == ""  # every window abstains: the surer abstention
    assert pick_answer(["Paris", "London"], [-1.0, -1.0]) == "Paris"
    ft = load_finetuned(base, torch.device("cpu"))
    tok, template = ft.tokenizer, ChatTemplate()
    pairs = [([{"role": "user", "content": user_content("When?", ctx)}], reply) for ctx, reply in
             [("the ferry leaves at seven", "at seven"), ("x" * 60, "unanswerable"), ("早上七点", "七点")]]  # fmt: skip
    got = reply_logprobs(ft, template, pairs)
    for (messages, reply), score in zip(pairs, got, strict=True):
        prompt = template.prompt_ids(tok, messages, budget=128)[0]
        tail = tok.encode(reply) + [tok.eos_id]
        alone = continuation_logprob(ft.model, prompt, tail, 128) / len(tail)
        assert score == pytest.approx(alone, abs=1e-5)  # (right padding in the batch changes no logit)


def test_unanswerable_is_scored_as_squad_v2s_empty_prediction(base: Path, monkeypatch: pytest.MonkeyPatch):
    """The official v2 script scores a no-answer question against "" and F1 of an empty side is 1 only when both
    are: the trained reply `unanswerable` (any case or punctuation) and an empty reply are the empty prediction,
    so "it is unanswerable" no longer earns F1 1/2 against the reference `unanswerable`."""
    import lmforge.eval.tasks as tasks

    ft = load_finetuned(base, torch.device("cpu"))
    fields = field_map("qa", None)
    rows = read_task_rows(SQUAD, "qa", fields, scored=True)
    no_answer, has_answer = rows[2], rows[0]  # (en-3 is impossible; en-1 is answered "at seven in the morning")
    cases = [("Unanswerable!", 1.0), ("", 1.0), ("it is unanswerable", 0.0), ("the river", 0.0)]
    # empty as the v2 script sees it (ASCII punctuation, articles, spaces); a reply of Chinese marks is a reply,
    # though scoring drops them ("北京。" is "北京"): a degenerate "，，，" was scored a right abstention
    cases += [("...", 1.0), (" the ", 1.0), ("unanswerable。", 1.0), ("，，，", 0.0), ("。", 0.0)]
    for prediction, expected in cases:
        monkeypatch.setattr(tasks, "_answers", lambda ft, prompts, n, p=prediction: [p] * len(prompts))
        m = tasks.task_metrics(ft, [no_answer, has_answer], path=SQUAD, task="qa", fields=fields, max_new_tokens=4)
        assert m["no_answer"] == {"em": expected, "f1": expected, "n": 1}, prediction
        assert m["has_answer"]["f1"] == 0.0, prediction  # (an abstention on an answerable question scores 0)


def test_doc_stride_is_a_qa_flag(base: Path, capsys: pytest.CaptureFixture):
    """`--doc-stride` with another task, or below 0, is a one-line error (exit 2), in eval and in finetune."""
    from lmforge.cli import main
    from lmforge.errors import ConfigError
    from lmforge.finetune import FinetuneConfig

    for args, message in [
        (
            ["--task", "sft", "--doc-stride", "64"],
            "--doc-stride is for --task qa (windows of a context too long for the model); drop it",
        ),
        (["--task", "qa", "--doc-stride", "-1"], "--doc-stride must be a number of tokens >= 0, got -1"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["eval", str(base), "--data", str(SQUAD), *args])
        assert exit_.value.code == 2 and capsys.readouterr().err.strip() == f"lmforge: error: {message}"
    # one default: eval's parser writes data/qa.py's DOC_STRIDE out (it imports no torch), finetune takes it
    from lmforge.cli_adapt import _TASK_FLAGS
    from lmforge.data.qa import DOC_STRIDE

    assert _TASK_FLAGS["doc_stride"] == FinetuneConfig(task="qa").doc_stride == DOC_STRIDE
    with pytest.raises(ConfigError, match=r"--doc-stride is for --task qa \(windows of a context too long"):
        FinetuneConfig(task="sft", doc_stride=64)
    with pytest.raises(ConfigError, match="--doc-stride must be a number of tokens >= 0"):
        FinetuneConfig(task="qa", doc_stride=-1)


def test_windows_never_cut_inside_tokens_that_share_characters():
    """A unigram tokenizer's byte pieces of a run of unseen characters all carry the whole run's offsets: a window
    cut inside the run took in all of it, went over its room, and the next one moved on one token, so this context
    of 183 tokens made 64 windows, 57 of them the same. Windows now start and end only between tokens that share
    no character: the run longer than a window is one window of its own (over the room: nothing smaller holds it
    whole), and no window is repeated."""
    from lmforge.data.qa import context_windows
    from lmforge.tokenizer.train import train_unigram

    tok = train_unigram(iter(["the cat sat on the mat and then the dog ran off"] * 20), 300)
    run = "猫坐在垫子上" * 3  # 18 unseen characters: 54 byte pieces, every one with the run's offsets
    context = "the cat sat on the mat " * 4 + run + " and then the dog ran off" * 4
    assert tok.hf.encode(context, add_special_tokens=False).offsets.count((92, 110)) == 54

    def n_tokens(window: str) -> int:  # the question and template: 10 tokens
        return 10 + len(tok.encode(window))

    windows = context_windows(tok, context, n_tokens, room=40, doc_stride=4)
    assert [w for w in windows if n_tokens(w) > 40] == [run], windows
    assert len(windows) == len(set(windows)) == 7, windows  # (the 3 before the run, the run, the 3 after it)
    assert windows[0] == context[: len(windows[0])] and context.endswith(windows[-1])


def test_the_printed_samples_show_several_references_as_text():
    """A QA row with several references printed its sample as the Python list "['Paris', 'in Paris']"."""
    from lmforge.eval.tasks import format_metrics

    m = {"task": "qa", "em": 0.0, "f1": 0.0, "n": 1}
    m["samples"] = [{"prompt": "Where?", "reference": ["Paris", "in Paris"], "prediction": "巴黎"}]
    assert (
        format_metrics(m).splitlines()[1] == "  prompt: 'Where?' | reference: 'Paris / in Paris' | prediction: '巴黎'"
    )


def test_numbers_and_bools_as_answers_are_their_json_text(base: Path, tmp_path: Path):
    """`"answer": true` trained on and was scored against Python's "True", and a number in a list with a float
    (`[4, 4.0]`, or a Parquet list<double>) against "4.0", so the reply "4" scored EM 0. Now an answer is the text
    JSON writes (`4`, `3.5`, `true`), the integer where a float holds one, in training and scoring alike."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.eval.tasks import best_over_references
    from lmforge.tokenizer.tokenizer import Tokenizer

    q, c = "How many?", "There are 4 of 3.5 true."
    cases = [(True, ["true"]), (3.5, ["3.5"]), (7, ["7"]), ([4, 4.0], ["4", "4"]), ({"text": [4.0]}, ["4"])]
    path = _write_jsonl(tmp_path / "numbers.jsonl", [{"question": q, "context": c, "answer": a} for a, _ in cases])
    pq.write_table(pa.Table.from_pylist([{"question": q, "context": c, "answer": [4, 3.5]}]), tmp_path / "n.parquet")
    fields = field_map("qa", None)
    rows = read_task_rows(path, "qa", fields, scored=True)
    assert [references(r, fields) for r in rows] == [want for _, want in cases]
    assert references(read_task_rows(tmp_path / "n.parquet", "qa", fields)[0], fields) == ["4", "3.5"]
    tok = Tokenizer.load(base / "tokenizer.json")
    examples = build_examples(rows, task="qa", tok=tok, fields=fields, max_len=128, labels=None, path=path)
    for example, (_, want) in zip(examples, cases, strict=True):
        trained = [i for i, t in zip(example.ids, example.train, strict=True) if t]
        assert trained == tok.encode(want[0]) + [tok.eos_id]  # the text the reply is scored against
    assert best_over_references("true", references(rows[0], fields)) == (1.0, 1.0)
    assert best_over_references("4", references(rows[3], fields)) == (1.0, 1.0)
