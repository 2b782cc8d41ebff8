"""DPO files in TRL's conversational format (`prompt`/`chosen`/`rejected` lists of {role, content} messages, or
only `chosen`/`rejected` conversations sharing their prompt): rendered through the run's chat template as sft
trains on them, in finetune and eval, JSONL and Parquet."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from lmforge.adapt.load import load_finetuned
from lmforge.chat import ChatTemplate, JinjaChatTemplate, transcript_messages
from lmforge.data.formats import build_examples
from lmforge.data.tables import field_map, read_task_rows
from lmforge.errors import DataError
from lmforge.eval.tasks import task_metrics
from lmforge.finetune import FinetuneConfig, finetune
from lmforge.tokenizer.tokenizer import Tokenizer
from tests.conftest import run_cli
from tests.test_finetune import DATA, FAST, make_base

FIELDS = field_map("dpo", None)
CHATML = (  # (Qwen's, shortened: as tests/test_export.py's)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
USER, EARLIER = {"role": "user", "content": "王熙凤是谁?"}, {"role": "assistant", "content": "贾琏之妻。"}
ASK = {"role": "user", "content": "她住在哪里?"}
GOOD, BAD = {"role": "assistant", "content": "荣国府。"}, {"role": "assistant", "content": "不知道。"}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("dpo"))


def _pairs(tok: Tokenizer, path: Path, max_len: int = 128) -> list[dict]:
    rows = read_task_rows(path, "dpo", FIELDS)
    return build_examples(rows, task="dpo", tok=tok, fields=FIELDS, max_len=max_len, labels=None, path=path)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_conversational_pairs_render_through_the_chat_template_as_sft_trains(base: Path, tmp_path: Path):
    """TRL's explicit prompt, its implicit prompt and UltraFeedback's (a text prompt beside the whole
    conversations) give the same pair, in JSONL and Parquet: the prompt's turns rendered by the chat template (the
    earlier assistant turn is context), and only the final reply and its end of turn are targets. The lists
    were refused as 'holds a JSON list, not one text'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = Tokenizer.load(base / "tokenizer.json")
    talk = [USER, EARLIER, ASK]
    explicit = _write(tmp_path / "explicit.jsonl", [{"prompt": talk, "chosen": [GOOD], "rejected": [BAD]}])
    implicit = _write(tmp_path / "implicit.jsonl", [{"chosen": [*talk, GOOD], "rejected": [*talk, BAD]}])
    ultra = _write(
        tmp_path / "ultra.jsonl", [{"prompt": USER["content"], "chosen": [USER, GOOD], "rejected": [USER, BAD]}]
    )
    pq.write_table(
        pa.Table.from_pylist([{"prompt": talk, "chosen": [GOOD], "rejected": [BAD]}]), tmp_path / "p.parquet"
    )
    pair = _pairs(tok, explicit)
    assert _pairs(tok, implicit) == pair and _pairs(tok, tmp_path / "p.parquet") == pair
    for name, reply in (("chosen", GOOD), ("rejected", BAD)):
        example = pair[0][name]
        # the ids sft trains on for this conversation, the earlier reply as context (weight 0)
        sft = ChatTemplate().segments(tok, [USER, {**EARLIER, "weight": 0}, ASK, reply])
        assert example.ids == [i for ids, _ in sft for i in ids]
        targets = [i for i, t in zip(example.ids, example.train, strict=True) if t]
        assert targets == tok.encode(reply["content"]) + [tok.eos_id]  # the final reply + EOS, nothing else
    one_turn = _pairs(tok, ultra)[0]["chosen"]
    assert one_turn.ids == [i for ids, _ in ChatTemplate().segments(tok, [USER, GOOD]) for i in ids]


def test_hh_rlhf_as_trl_conversations_finetunes_and_evaluates(base: Path, tmp_path: Path):
    """The hh-rlhf slice converted to TRL's implicit-prompt conversational format (as TRL's own hh-rlhf
    conversion writes it) trains (DPO starts at log 2) and `eval --task dpo` scores all 16 pairs."""
    rows = [json.loads(line) for line in (DATA / "hh_rlhf.jsonl").read_text(encoding="utf-8").splitlines()]
    trl = [{k: transcript_messages(r[k]) for k in ("chosen", "rejected")} for r in rows]
    path = _write(tmp_path / "hh_trl.jsonl", trl)
    tok = Tokenizer.load(base / "tokenizer.json")
    pairs = _pairs(tok, path, max_len=4096)
    for row, pair in zip(trl, pairs, strict=True):
        targets = [i for i, t in zip(pair["chosen"].ids, pair["chosen"].train, strict=True) if t]
        assert targets == tok.encode(row["chosen"][-1]["content"]) + [tok.eos_id]
    out = tmp_path / "run"
    overrides = {**FAST, "train": {**FAST["train"], "lr": 1e-2, "log_every": 1, "max_steps": 3}}
    result = finetune(base, train_file=path, val_file=path, out=out, cfg=FinetuneConfig(task="dpo", adapt="lora"),
                      overrides=overrides, progress=False)  # fmt: skip
    first = json.loads((out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result["val"]["n"] == 16 and result["val"]["skipped_forked"] == 0
    ft = load_finetuned(out, torch.device("cpu"))  # as `eval --task dpo` opens the run (its chat template)
    m = task_metrics(ft, read_task_rows(path, "dpo", FIELDS), path=path, task="dpo", fields=FIELDS)
    assert m["n"] == 16 and m["loss"] == pytest.approx(result["val"]["loss"], rel=1e-5)
    # a run that keeps an imported model's own template is scored in it (eval built the pairs in lmforge's)
    ft.template = JinjaChatTemplate(source=CHATML, eos_token=tok.id_to_token(tok.eos_id))
    chatml = task_metrics(ft, read_task_rows(path, "dpo", FIELDS), path=path, task="dpo", fields=FIELDS)
    assert chatml["loss"] != pytest.approx(m["loss"], rel=1e-6)


def test_conversations_that_fork_early_are_skipped_and_bad_rows_are_one_line(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    """A pair whose conversations differ before the final reply (hh-rlhf has 5 of 2,312, a reply holding a
    "Human:" line) is not two replies to one prompt: skipped and counted. A row mixing forms, or a conversation
    that does not end with the reply, is a one-line error naming the row."""
    tok = Tokenizer.load(base / "tokenizer.json")
    good = {"chosen": [USER, GOOD], "rejected": [USER, BAD]}
    forked = {"chosen": [USER, GOOD], "rejected": [ASK, BAD]}
    path = _write(tmp_path / "forked.jsonl", [good, forked])
    assert len(_pairs(tok, path)) == 1
    said = (
        "1 of 2 pairs with chosen and rejected conversations that differ before their last assistant turn was skipped"
    )
    assert said in capsys.readouterr().err
    cases = [
        (
            {"chosen": [USER, GOOD], "rejected": "不知道。"},
            "row 2: 'chosen' is a list of messages and 'rejected' is not",
        ),
        ({"prompt": [USER], "chosen": "荣国府。", "rejected": "不"}, "row 2: 'prompt' is a list of messages and"),
        ({"chosen": [USER, GOOD, ASK], "rejected": [USER, BAD]}, "row 2: the chosen conversation does not end with"),
        ({"prompt": "别的", "chosen": [USER, GOOD], "rejected": [USER, BAD]}, "row 2: 'prompt' is text and 'chosen'"),
    ]
    for row, message in cases:
        bad = _write(tmp_path / "bad.jsonl", [good, row])
        with pytest.raises(DataError, match=re.escape(message)):
            _pairs(tok, bad)
    # on the command line: one line, exit 2, no run folder
    r = run_cli("finetune", str(base), "--task", "dpo", "--train", str(bad), "--out", str(tmp_path / "no"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and cases[-1][1] in r.stderr, r.stderr
    assert not (tmp_path / "no").exists()
