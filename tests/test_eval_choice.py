"""`eval --task choice`: multiple choice by log-likelihood on both file layouts, against a hand-written scorer
and a model that learned the answers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lmforge.adapt.load import load_finetuned
from lmforge.errors import DataError
from lmforge.eval.choice import choice_fields, choice_metrics, read_choice_rows
from lmforge.finetune import FinetuneConfig, finetune
from tests.conftest import run_cli
from tests.test_finetune import make_base

FACTS = [
    ("What is red?", ["a cloud", "an apple", "the sea"], 1),
    ("What barks?", ["a dog", "a fish", "a stone"], 0),
    ("What is cold?", ["fire", "the sun", "ice"], 2),
    ("What flies?", ["a bird", "a rock", "a tree"], 0),
]


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model fine-tuned (clm) on the questions with their right answers."""
    root = tmp_path_factory.mktemp("choice")
    base = make_base(root)
    text = root / "facts.jsonl"
    lines = [{"text": f"Question: {q}\nAnswer: {o[a]}"} for q, o, a in FACTS]
    text.write_text("".join(json.dumps(r) + "\n" for r in lines * 8), encoding="utf-8")
    overrides = {"train": {"max_steps": 120, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5}, "eval": {"every": 0}}
    finetune(
        base, train_file=text, out=root / "run", cfg=FinetuneConfig(task="clm"), overrides=overrides, progress=False
    )
    return root / "run"


def _write_layouts(root: Path) -> tuple[Path, Path]:
    """The same questions as JSONL with a `choices` list and index answers, and as CSV with A/B/C columns and
    letter answers (MMLU / C-Eval style)."""
    jsonl = root / "mc.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"question": q, "choices": o, "answer": a}) + "\n" for q, o, a in FACTS), encoding="utf-8"
    )
    table = root / "mc.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "A", "B", "C", "answer"])
        for q, o, a in FACTS:
            w.writerow([q, *o, "ABC"[a]])
    return jsonl, table


def test_scores_are_option_log_likelihoods_and_a_trained_model_gets_them_right(learned: Path, tmp_path: Path):
    jsonl, table = _write_layouts(tmp_path)
    fields = choice_fields(None)
    rows = read_choice_rows(jsonl, fields)
    assert rows == read_choice_rows(table, fields) == [(q, o, a) for q, o, a in FACTS]
    ft = load_finetuned(learned, torch.device("cpu"))
    result = choice_metrics(ft, rows)
    assert result["accuracy"] == result["accuracy_norm"] == 1.0 and result["n"] == 4
    # a hand-written scorer (one forward pass over prompt + option) picks the same options
    tok = ft.tokenizer
    for question, options, answer in rows:
        head = tok.encode(f"Question: {question}\nAnswer:")
        sums = []
        for option in options:
            tail = tok.encode(" " + option)
            with torch.no_grad():
                logp = torch.log_softmax(ft.model(torch.tensor([head + tail]))[0], dim=-1)
            sums.append(sum(logp[len(head) - 1 + j, t].item() for j, t in enumerate(tail)))
        assert max(range(3), key=sums.__getitem__) == answer
    # an untrained base is near chance: the trained answers are not an artefact of the scoring
    untrained = load_finetuned(make_base(tmp_path / "fresh"), torch.device("cpu"))
    assert choice_metrics(untrained, rows)["accuracy"] < 1.0

    r = run_cli("eval", str(learned), "--task", "choice", "--data", table.name, "--json", cwd=str(table.parent))
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert (reply["task"], reply["accuracy"], reply["n"], reply["k_shot"]) == ("choice", 1.0, 4, 0)
    assert reply["data"] == str(table.resolve())  # absolute, as eval without --task gives it (it was as typed)
    r = run_cli("eval", str(learned), "--task", "choice", "--data", str(jsonl), "--k-shot", "2", "--shots", str(jsonl))
    assert r.returncode == 0 and r.stdout.startswith("choice: accuracy "), r.stderr


def test_choice_rows_errors_name_the_row_and_the_fix(tmp_path: Path):
    fields = choice_fields(None)
    cases = [
        ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "answer 'C' names none of its 2 options"),
        ({"question": "q", "choices": ["a", "b"], "answer": "\u00b2"}, "names none of its 2 options"),  # not int()
        ({"question": "q", "choices": ["a", "b"], "answer": "\u0661"}, "names none of its 2 options"),  # not 1
        ({"question": "q", "choices": ["a"], "answer": 0}, "needs at least two options"),
        ({"prompt": "q", "choices": ["a", "b"], "answer": 0}, "has no 'question' column"),
    ]
    for row, needle in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(row) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=needle):
            read_choice_rows(path, fields)
    path = tmp_path / "renamed.jsonl"  # HellaSwag's names
    path.write_text(json.dumps({"ctx": "q", "endings": ["a", "b"], "label": "1"}) + "\n", encoding="utf-8")
    renamed = choice_fields(["question=ctx", "choices=endings", "answer=label"])
    assert read_choice_rows(path, renamed) == [("q", ["a", "b"], 1)]
    with pytest.raises(DataError, match="--task choice has the fields question, choices, answer"):
        choice_fields(["label=x"])


def test_a_blank_option_column_is_refused_not_skipped(tmp_path: Path):
    """MMLU-style columns: a blank B with C and D filled would give C's letter to D's text (the answer 'C' then
    scored the wrong option); it is refused naming the column. Blank columns after the last option are fine."""
    path = tmp_path / "gap.csv"
    path.write_text("question,A,B,C,D,answer\nWhat is red?,a cloud,,an apple,the sea,C\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 1: option B is empty"):
        read_choice_rows(path, choice_fields(None))
    path.write_text("question,A,B,C,D,E,answer\nWhat is red?,a cloud,an apple,the sea,,,B\n", encoding="utf-8")
    assert read_choice_rows(path, choice_fields(None)) == [("What is red?", ["a cloud", "an apple", "the sea"], 1)]


def test_an_index_answer_written_as_a_float_is_that_index(tmp_path: Path):
    """pandas writes an int column that has a gap as floats ("1.0"), and JSON may hold 1.0: index 1, as a
    classification label "1.0" is the class "1"; a non-integer stays an error."""
    header = "question,A,B,C,answer\n"
    for answer, expected in (("1.0", 1), ("2", 2)):
        path = tmp_path / "float.csv"
        path.write_text(f"{header}What is red?,a cloud,an apple,the sea,{answer}\n", encoding="utf-8")
        assert read_choice_rows(path, choice_fields(None))[0][2] == expected
    path = tmp_path / "float.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1.0}) + "\n", encoding="utf-8")
    assert read_choice_rows(path, choice_fields(None))[0][2] == 1
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0.5}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="answer '0.5' names none of its 2 options"):
        read_choice_rows(path, choice_fields(None))


def test_a_number_answer_is_an_index_even_where_an_option_is_that_number(tmp_path: Path):
    """A JSON number names the option by its 0-based index, as HF datasets store answers: with the options "1",
    "2", "3", `answer: 1` is "2". Reading the text first scored such rows against "1", the wrong option. A
    string answer still names an option's text first, and a number beyond the options still matches a text."""
    path = tmp_path / "numbers.jsonl"
    rows = [
        {"question": "1+1=?", "choices": ["1", "2", "3"], "answer": 1},
        {"question": "2+1=?", "choices": ["1", "2", "3"], "answer": 2.0},
        {"question": "0+1=?", "choices": ["1", "2", "3"], "answer": "1"},
        {"question": "5+5=?", "choices": ["5", "10"], "answer": 10},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert [row[2] for row in read_choice_rows(path, choice_fields(None))] == [1, 2, 0, 1]
