"""Task rows -> training examples (`data.formats.build_examples`): what is said when one does not fit --max-len."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.data.formats import build_examples
from lmforge.data.tables import field_map
from lmforge.tokenizer.train import train_char

ANSWER = "三原色是红色、蓝色和黄色。"  # 15 char-tokenizer ids ("、" is 3 byte ids) + end-of-text


def examples(task: str, rows: list[dict], max_len: int) -> list:
    tok = train_char(["三原色是什么？红蓝黄和。好"])
    return build_examples(rows, task=task, tok=tok, fields=field_map(task, None), max_len=max_len, labels=None,
                          path="zh.jsonl")  # fmt: skip


def test_sft_examples_whose_answer_end_is_cut_are_counted(capsys: pytest.CaptureFixture[str]) -> None:
    """1,927 of Alpaca's 5,000 Chinese examples do not fit 128 tokens: cut at --max-len, an answer loses its end and its
    end-of-text (the model never learns to stop there), which happened without a word. A prompt cut from its start
    to keep the whole answer is no loss of the answer and is not counted."""
    rows = [
        {"instruction": "三原色是什么？", "input": "", "output": ANSWER},  # 47 ids with the chat markers
        {"instruction": "好", "input": "", "output": "好"},  # 27 ids
    ]
    cut, whole = examples("sft", rows, max_len=40)
    assert len(cut.ids) == 41 and len(whole.ids) == 27
    assert "note: zh.jsonl: 1 of 2 examples are longer than 40 tokens and were cut to fit" in (
        err := capsys.readouterr().err
    )
    assert "; 1 of them lose the end of their answer (with its end-of-text" in err
    examples("sft", rows, max_len=60)
    assert capsys.readouterr().err == ""
    examples("sft", rows[1:], max_len=20)  # over 20, but only the prompt's start is cut: the answer trains whole
    assert "were cut to fit" in (err := capsys.readouterr().err) and "lose the end" not in err


def test_translate_examples_whose_target_end_is_cut_are_counted(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"source": "The three primary colours.", "target": ANSWER}]
    (example,) = examples("translate", rows, max_len=12)
    assert sum(example.train) == 12
    assert "1 of 1 examples are longer than 12 tokens and were cut to fit" in (err := capsys.readouterr().err)
    assert "1 of them lose the end of their answer" in err
    (example,) = examples("translate", rows, max_len=40)  # the source's start is cut; the target trains whole
    assert sum(example.train) == 16 and "lose the end" not in capsys.readouterr().err


def test_held_notes_wait_for_the_commands_checks_and_go_with_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """finetune reads the data before its run checks (a resume's seed, a merged LoRA run): a refusal after the
    read printed the cut-examples note above its one-line error. Held notes print at `print_held_notes` or at the
    end of a block that ends well, and are dropped with an error."""
    from lmforge.data.formats import notes_held, print_held_notes

    rows = [{"source": "The three primary colours.", "target": ANSWER}]
    with pytest.raises(ValueError), notes_held():
        examples("translate", rows, max_len=12)
        raise ValueError("a refusal after the data were read")
    assert capsys.readouterr().err == ""
    with notes_held():
        examples("translate", rows, max_len=12)
        assert capsys.readouterr().err == ""
        print_held_notes()
        assert "1 of 1 examples are longer than 12 tokens" in capsys.readouterr().err
        examples("translate", rows, max_len=12)  # after print_held_notes: at once
        assert "1 of 1 examples" in capsys.readouterr().err
    with notes_held():
        examples("translate", rows, max_len=12)
    assert "1 of 1 examples" in capsys.readouterr().err  # a block that ends well prints what it held
    examples("translate", rows, max_len=12)
    assert "1 of 1 examples" in capsys.readouterr().err  # outside any block: at once


def _targets(example) -> list[int]:
    return [i for i, t in zip(example.ids, example.train, strict=True) if t]


def test_number_and_bool_answers_are_their_json_text_in_sft_and_translate(tmp_path: Path) -> None:
    """An sft `output`, input or message content, or a translate `source`/`target`, written as a JSON or Parquet
    number or bool was trained on and scored against Python's spelling ("4.0", "True"; an `input` of 0 was dropped),
    where labels and qa answers read "4" and "true" (`scalar_text`). Now each is its JSON text, in training and in
    eval's references."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from lmforge.adapt.load import load_finetuned
    from lmforge.data.tables import read_task_rows
    from lmforge.eval.tasks import task_metrics
    from tests.test_finetune import make_base

    tok = train_char(["How many? Is it so? Half of seven. 0123456789.truefalse"])
    ft = load_finetuned(make_base(tmp_path, tok=tok), torch.device("cpu"))
    half = [{"role": "user", "content": "Half of seven."}, {"role": "assistant", "content": 3.5}]
    files = {  # file: (task, rows, the answer each row trains on and is scored against)
        "sft.jsonl": ("sft", [{"instruction": "How many?", "output": 4.0}, {"messages": half}], ["4", "3.5"]),
        "bool.jsonl": ("sft", [{"instruction": "Is it so?", "input": 0, "output": True}], ["true"]),
        "sft.parquet": ("sft", [{"instruction": "How many?", "output": 4.0}], ["4"]),
        "tr.jsonl": (
            "translate",
            [{"source": 7.0, "target": False}, {"source": "Half", "target": 3.5}],
            ["false", "3.5"],
        ),
        "tr.parquet": ("translate", [{"source": 7.0, "target": 3.5}], ["3.5"]),  # (double columns)
    }
    examples = {}
    for name, (task, rows, answers) in files.items():
        path, fields = tmp_path / name, field_map(task, None)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        rows = read_task_rows(path, task, fields, scored=True)
        built = examples[name] = build_examples(
            rows, task=task, tok=tok, fields=fields, max_len=64, labels=None, path=path
        )
        assert [_targets(e) for e in built] == [tok.encode(a) + [tok.eos_id] for a in answers], name
        m = task_metrics(ft, rows, path=path, task=task, fields=fields, max_new_tokens=2)
        assert [s["reference"] for s in m["samples"]] == answers, name
    (example,) = examples["tr.parquet"]
    assert tok.decode(example.ids[: example.train.index(True)]) == "<src> 7 <tgt> "  # (the prompt eval gives too)
    assert [s["source"] for s in m["samples"]] == ["7"]
    assert "Is it so?\n\n0\n<|assistant|>" in tok.decode(examples["bool.jsonl"][0].ids)  # (0 was dropped as no input)


def test_keys_parquet_fills_with_null_in_messages_are_absent(tmp_path: Path) -> None:
    """Parquet stores a column of message lists as one struct type, so a key that one message has (a `weight`, a
    `name`) comes back as null in every other message. sft refused `"weight": null` as neither 0 nor 1, and a DPO
    pair whose chosen side alone had a key was skipped as two conversations that differ before their last reply.
    A null key is now no key: each Parquet file gives the examples the same rows give as JSONL."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.data.tables import read_task_rows

    tok = train_char(["Who is she? Where does she live? His wife. In the house. I do not know."])
    user, earlier = {"role": "user", "content": "Who is she?"}, {"role": "assistant", "content": "His wife."}
    ask, good = {"role": "user", "content": "Where does she live?"}, {"role": "assistant", "content": "In the house."}
    bad = {"role": "assistant", "content": "I do not know."}
    talk = [user, earlier, ask]
    files = {
        "sft": ("sft", {"messages": [{**user, "name": "Bo"}, {**earlier, "weight": 0}, ask, good]}),
        "explicit": ("dpo", {"prompt": [user, {**earlier, "weight": 0}, ask], "chosen": [good], "rejected": [bad]}),
        "implicit": ("dpo", {"chosen": [*talk, {**good, "weight": 1}], "rejected": [*talk, bad]}),  # (TRL's)
    }
    for name, (task, row) in files.items():
        fields = field_map(task, None)
        pq.write_table(pa.Table.from_pylist([row]), tmp_path / f"{name}.parquet")
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
        column = "messages" if task == "sft" else "prompt" if "prompt" in row else "chosen"
        assert None in pq.read_table(tmp_path / f"{name}.parquet").to_pylist()[0][column][0].values()  # (filled)
        rows = {
            ext: read_task_rows(tmp_path / f"{name}.{ext}", task, fields, scored=True) for ext in ("parquet", "jsonl")
        }
        if task == "sft":  # (DPO's rows are read as they are; `formats.chat_pair` reads their messages)
            assert rows["parquet"] == rows["jsonl"] == [row]
        built = [
            build_examples(rows[ext], task=task, tok=tok, fields=fields, max_len=128, labels=None, path=name)
            for ext in ("parquet", "jsonl")
        ]
        assert built[0] == built[1] and len(built[0]) == 1, name
    (example,) = built[0]  # (implicit: only the final reply and its end of turn are compared)
    assert _targets(example["chosen"]) == tok.encode("In the house.") + [tok.eos_id]
