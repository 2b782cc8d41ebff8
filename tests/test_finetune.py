"""Fine-tuning on tiny random GPTs and the real slices in tests/data: freezing per mode, loss masks,
metrics against hand-computed values, DPO, task evaluation, and bad inputs -> one-line errors."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import io
import json
import math
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmforge.adapt.load import load_finetuned
from lmforge.atomic import write_json
from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.config import DataConfig, RunConfig
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.finetune import FinetuneConfig, finetune
from lmforge.log import read_metrics
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_char
from lmforge.train.state import TrainState
from tests.conftest import run_cli

DATA = Path(__file__).parent / "data"
FAST = {"train": {"max_steps": 6, "batch_size": 8, "log_every": 3, "warmup_steps": 1}, "eval": {"every": 3}}


def make_base(
    root: Path,
    *,
    max_seq_len: int = 128,
    seed: int = 0,
    tok: Tokenizer | None = None,
    data: DataConfig | None = None,
    **model: object,
) -> Path:
    """A randomly initialised GPT saved as an lmforge run (default: char tokenizer over tests/data; `data`: the
    prepared data it names as trained on)."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(DATA.glob("*.*")) if p.suffix != ".md"]
    tok = tok or train_char(texts)
    run = root / "base"
    run.mkdir(parents=True)
    gpt = GPTConfig(
        **{"vocab_size": tok.vocab_size, "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": max_seq_len} | model
    )
    cfg = RunConfig(out=str(run), model=gpt, data=data or DataConfig())
    torch.manual_seed(seed)
    m = GPT(cfg.model)
    m.init_weights()
    write_json(run / "config.json", cfg.to_dict())
    tok.save(run / "tokenizer.json")
    state = {"train_state": TrainState().to_dict(), "config": cfg.to_dict()}
    save_checkpoint(run, step=0, model=m, optimizer=None, state=state, tokenizer_json=tok.to_str())
    return run


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("ft"))


def _base_state(base: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(base).model_state()


def test_head_only_keeps_body_bit_identical(base: Path, tmp_path: Path):
    out = tmp_path / "head"
    cfg = FinetuneConfig(task="classify", adapt="head")
    result = finetune(base, train_file=DATA / "sentiment_train.csv", out=out, cfg=cfg, overrides=FAST, progress=False)
    assert result["trainable_params"] == 32 * 2  # head: d_model x 2 labels, no bias (as HF's score)
    ft = load_finetuned(out, torch.device("cpu"))
    before = _base_state(base)
    for name, value in ft.model.body.state_dict().items():
        assert torch.equal(value, before[name]), name
    saved = load_checkpoint(out).model_state()
    assert sorted(saved) == ["head.weight"]  # adapter-only: the base is named, not copied
    info = json.loads((out / "finetune.json").read_text(encoding="utf-8"))
    assert info["base"].endswith("step-000000") and len(info["base_sha256"]) == 64


def test_a_finetune_that_cannot_redraw_loss_png_warns_and_finishes(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A fine-tune whose loss.png could not be redrawn after training (a folder in its way; a full disk alike)
    failed there (exit 2), its checkpoints saved but no eval.json; it is now one warning line and the run finishes."""
    out = tmp_path / "ft"
    kw = {"train_file": DATA / "sentiment_train.csv", "out": out, "cfg": FinetuneConfig(task="classify", adapt="head")}
    finetune(base, **kw, overrides={"train": {**FAST["train"], "max_steps": 3}}, progress=False)
    (out / "loss.png").unlink()
    (out / "loss.png").mkdir()
    capsys.readouterr()
    result = finetune(base, **kw, overrides=FAST, progress=False)  # resumed at step 3: steps 4-6 are not drawn
    assert result["steps"] == 6 and json.loads((out / "eval.json").read_text(encoding="utf-8"))["steps"] == 6
    warning = (
        f"warning: could not redraw {out / 'loss.png'}: Is a directory; the checkpoints and metrics.jsonl are saved"
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in lines if not line.startswith("note: ")] == [warning]  # (the data's cut-examples note)


def test_eval_max_batches_counts_batches_of_the_batch_size(base: Path, tmp_path: Path):
    """Fine-tuning's eval.max_batches 1 scores the first train.batch_size (8) val examples, with or without
    accumulation: the tokens of exactly those 8 examples (a val file of only them), not of 2 micro-batches."""
    rows = DATA / "alpaca.jsonl"
    first8 = tmp_path / "first8.jsonl"
    first8.write_text("".join(rows.read_text(encoding="utf-8").splitlines(True)[:8]), encoding="utf-8")
    tokens = {}
    runs = [("micro8", 8, rows, 1), ("micro2", 2, rows, 1), ("first8", 2, first8, 0), ("all", 2, rows, 0)]
    for name, micro, val, max_batches in runs:
        overrides = {
            "train": {"max_steps": 1, "batch_size": 8, "micro_batch_size": micro, "warmup_steps": 0},
            "eval": {"every": 1, "max_batches": max_batches},
        }
        finetune(
            base, train_file=rows, val_file=val, out=tmp_path / name, cfg=FinetuneConfig(task="sft"),
            overrides=overrides, progress=False,
        )  # fmt: skip
        records = read_metrics(tmp_path / name / "metrics.jsonl")
        tokens[name] = [r["val_tokens"] for r in records if "val_tokens" in r][-1]
    assert tokens["micro8"] == tokens["micro2"] == tokens["first8"] < tokens["all"]


def test_prompt_tuning_trains_only_the_prompt(base: Path, tmp_path: Path):
    out = tmp_path / "prompt"
    cfg = FinetuneConfig(task="sft", adapt="prompt", prompt_tokens=4, eval_samples=1, max_new_tokens=4)
    finetune(base, train_file=DATA / "alpaca.jsonl", out=out, cfg=cfg, overrides=FAST, progress=False)
    saved = load_checkpoint(out).model_state()
    assert list(saved) == ["prompt.weight"]
    ft = load_finetuned(out, torch.device("cpu"))
    before = _base_state(base)
    for name, value in ft.model.body.state_dict().items():
        assert torch.equal(value, before[name]), name
    # the prompt moved away from its initial rows of the embedding table
    from lmforge.adapt.prompt_tuning import SoftPrompt

    init = SoftPrompt(4, 32)
    init.init_from_embeddings(before["tok_emb.weight"], seed=ft.info["seed"])
    assert not torch.equal(init.weight, saved["prompt.weight"])
    assert ft.model.cfg.max_seq_len == 128 - 4


def test_the_default_answer_length_fits_a_short_context_and_a_given_one_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A prompt-tuned sft run of a 40-token base (32 after its soft prompt) was refused without --val, nothing to
    score, told to lower a --max-new-tokens 48 the user never passed. The default now fits itself (half the
    context, with a note where answers are scored); a --max-new-tokens given that does not fit is still refused."""
    short = make_base(tmp_path, max_seq_len=40)
    cfg = FinetuneConfig(task="sft", adapt="prompt", prompt_tokens=8, eval_samples=1)
    finetune(short, train_file=DATA / "alpaca.jsonl", out=tmp_path / "a", cfg=cfg, overrides=FAST, progress=False)
    assert "answers are scored" not in capsys.readouterr().err  # (nothing scored: nothing to say)
    # 16 tokens leave no room for an Alpaca prompt (it was cut to fit and scored): refused before training, in
    # the words of a prompt too long for generate, chat and serve
    too_long = (
        r"alpaca\.jsonl: no prompt fits: the shortest is \d+ tokens and the model's context is 32, which holds 16 "
    )
    with pytest.raises(DataError, match=too_long + r"beside 16 new tokens \(--max-new-tokens\)"):
        finetune(short, train_file=DATA / "alpaca.jsonl", val_file=DATA / "alpaca.jsonl", out=tmp_path / "b",
                 cfg=cfg, overrides=FAST, progress=False)  # fmt: skip
    assert not (tmp_path / "b").exists()  # (before training: it trained, then failed to score)
    assert "note: answers are scored up to 16 new tokens, half the model's context of 32" in capsys.readouterr().err
    from lmforge.eval.tasks import evaluate_task

    with pytest.raises(DataError, match=too_long):  # (as eval)
        evaluate_task(tmp_path / "a", task="sft", data=DATA / "alpaca.jsonl", limit=1)
    assert "up to 16 new tokens" in capsys.readouterr().err
    given = dataclasses.replace(cfg, max_new_tokens=48)
    with pytest.raises(ConfigError, match="--max-new-tokens 48 leaves no room .* context of 32 tokens; use at most 31"):
        finetune(short, train_file=DATA / "alpaca.jsonl", out=tmp_path / "c", cfg=given, overrides=FAST, progress=False)


def test_assistant_only_loss_mask_and_stored_template(base: Path):
    import jinja2

    from lmforge.chat import JINJA_TEMPLATE, ChatTemplate
    from lmforge.data.formats import lm_batch, segments_example
    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(base / "tokenizer.json")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Red."},
    ]
    example = segments_example(ChatTemplate().segments(tok, messages), max_len=128)
    x, y = lm_batch([example], pad_id=tok.eos_id)
    targets = [t for t in y[0].tolist() if t != -100]
    # exactly the assistant contents, each followed by EOS, and nothing from system/user turns or markers
    assert targets == tok.encode("Blue.") + [tok.eos_id] + tok.encode("Red.") + [tok.eos_id]
    # the Jinja template written to tokenizer_config.json renders the same text the ids decode to
    rendered = jinja2.Template(JINJA_TEMPLATE).render(messages=messages, eos_token=tok.id_to_token(tok.eos_id))
    assert rendered == tok.decode(example.ids)

    # a prompt that fills the context: its start is cut, not the answer (which would train on nothing)
    long = [{"role": "user", "content": "Summarise: " + "words and more words " * 40}, messages[2]]
    segments = ChatTemplate().segments(tok, long)
    answer = tok.encode("Blue.") + [tok.eos_id]
    assert sum(len(ids) for ids, _ in segments) > 64 + 1
    cut = segments_example(segments, max_len=64)
    assert len(cut.ids) == 65 and cut.ids[-len(answer) :] == answer and sum(cut.train) == len(answer)
    assert tok.decode(cut.ids).endswith("words \n<|assistant|>\nBlue.<|endoftext|>")


def test_an_assistant_turn_of_weight_0_is_context_not_a_target(base: Path, tmp_path: Path):
    """OpenAI's chat fine-tuning files mark a reply not to learn with "weight": 0; it was trained on all the same."""
    from lmforge.chat import JINJA_TEMPLATE, ChatTemplate, JinjaChatTemplate
    from lmforge.data.formats import lm_batch, segments_example
    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(base / "tokenizer.json")
    messages = [
        {"role": "system", "content": "Marv is sarcastic."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris.", "weight": 0},
        {"role": "user", "content": "More sarcastic?"},
        {"role": "assistant", "content": "Paris, obviously.", "weight": 1},
    ]
    jinja = JinjaChatTemplate(source=JINJA_TEMPLATE, eos_token=tok.id_to_token(tok.eos_id))
    for template in (ChatTemplate(), jinja):  # (lmforge's, and an imported model's own)
        x, y = lm_batch([segments_example(template.segments(tok, messages), max_len=200)], pad_id=tok.eos_id)
        assert [t for t in y[0].tolist() if t != -100] == tok.encode("Paris, obviously.") + [tok.eos_id]
    rows = tmp_path / "weights.jsonl"
    rows.write_text(json.dumps({"messages": [*messages[:3], {**messages[3], "weight": 2}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1: bad message .*'weight' is 0 \(not trained on\) or 1"):
        finetune(base, train_file=rows, out=tmp_path / "w", cfg=FinetuneConfig(task="sft"), progress=False)
    rows.write_text(json.dumps({"messages": messages[:3]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 1: every assistant turn has weight 0, so nothing to learn"):
        finetune(base, train_file=rows, out=tmp_path / "w", cfg=FinetuneConfig(task="sft"), progress=False)
    assert not (tmp_path / "w").exists()


def test_openai_message_forms_train_and_score_as_serve_reads_them(base: Path, tmp_path: Path):
    """Text content parts and a developer turn (OpenAI's forms, which `serve` reads) were refused in a training or
    val file ("each needs ... a 'content' string"); they are the same examples as the plain strings. An image part
    is refused in one line naming the row."""
    from lmforge.data.formats import build_examples
    from lmforge.data.tables import field_map, read_task_rows
    from lmforge.tokenizer.tokenizer import Tokenizer

    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who wrote Hamlet?\nAnd when?"},
        {"role": "assistant", "content": "Shakespeare, about 1600."},
    ]
    parts = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Who wrote Hamlet?"}, {"type": "text", "text": "And when?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Shakespeare, about 1600."}]},
    ]
    files = {}
    for name, messages in (("plain", plain), ("parts", parts)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    tok, fields = Tokenizer.load(base / "tokenizer.json"), field_map("sft", None)
    examples = [
        build_examples(
            read_task_rows(files[n], "sft", fields, scored=True),
            task="sft",
            tok=tok,
            fields=fields,
            max_len=128,
            labels=None,
            path=files[n],
        )  # fmt: skip
        for n in ("plain", "parts")
    ]
    assert examples[0] == examples[1]
    image = tmp_path / "image.jsonl"
    image.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, plain[2]]}) + "\n")
    with pytest.raises(DataError, match=r"image\.jsonl: row 1: only text content parts .* are supported; write the"):
        read_task_rows(image, "sft", fields)


def test_sharegpt_turns_train_and_score_as_the_same_messages(base: Path, tmp_path: Path):
    """A ShareGPT file ({"from": "human"/"gpt", "value"} turns under 'conversations') was told to rename its column
    with --field messages=conversations and then refused turn by turn ("each needs 'role' ... and a 'content'
    string"); its turns are now the same examples as role/content messages, in training and scored files. A turn
    that is not a chat role (a tool call) is refused in one line naming the row."""
    from lmforge.data.formats import build_examples
    from lmforge.data.tables import field_map, read_task_rows
    from lmforge.tokenizer.tokenizer import Tokenizer

    turns = [("system", "system", "Be brief."), ("human", "user", "谁写了红楼梦？"), ("gpt", "assistant", "曹雪芹。")]
    messages = tmp_path / "messages.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": r, "content": c} for _, r, c in turns]}) + "\n")
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": f, "value": c} for f, _, c in turns]}) + "\n")
    tok = Tokenizer.load(base / "tokenizer.json")
    examples = []
    for path, fields in ((messages, field_map("sft", None)), (sharegpt, field_map("sft", ["messages=conversations"]))):
        rows = read_task_rows(path, "sft", fields, scored=True)
        examples.append(build_examples(rows, task="sft", tok=tok, fields=fields, max_len=128, labels=None, path=path))
    assert examples[0] == examples[1] and sum(examples[0][0].train) == len(tok.encode("曹雪芹。")) + 1
    tool = tmp_path / "tool.jsonl"
    tool.write_text(
        json.dumps({"conversations": [{"from": "function_call", "value": "{}"}, {"from": "gpt", "value": "ok"}]})
    )
    with pytest.raises(
        DataError, match=r"tool\.jsonl: row 1: a ShareGPT turn from 'function_call': only system, human"
    ):
        read_task_rows(tool, "sft", field_map("sft", ["messages=conversations"]))


def test_an_hh_rlhf_transcript_column_trains_as_its_turns(base: Path, tmp_path: Path):
    """`--task sft --field messages=chosen` on HH-RLHF (a column of "\\n\\nHuman: ...\\n\\nAssistant: ..." strings)
    was refused as "'messages' must be a list ..., not str"; its turns are now user/assistant messages."""
    from lmforge.data.formats import build_examples
    from lmforge.data.tables import field_map, read_task_rows
    from lmforge.tokenizer.tokenizer import Tokenizer

    rows = [json.loads(line) for line in (DATA / "hh_rlhf.jsonl").read_text(encoding="utf-8").splitlines()]
    row = next(r for r in rows if r["chosen"].rsplit("Assistant:", 1)[1].strip())  # (a reply to score)
    fields = field_map("sft", ["messages=chosen"])
    transcript = tmp_path / "hh.jsonl"
    transcript.write_text(json.dumps(row) + "\n", encoding="utf-8")
    turns = read_task_rows(transcript, "sft", fields, scored=True)[0]["chosen"]
    speakers = re.findall(r"\n\n(Human|Assistant): ", row["chosen"])
    assert [t["role"] for t in turns] == [{"Human": "user", "Assistant": "assistant"}[s] for s in speakers]
    assert len(turns) >= 2 and turns[-1]["content"] == row["chosen"].rsplit("\n\nAssistant: ", 1)[1].strip()
    messages = tmp_path / "messages.jsonl"
    messages.write_text(json.dumps({"messages": turns}) + "\n", encoding="utf-8")
    tok = Tokenizer.load(base / "tokenizer.json")
    kw = {"task": "sft", "tok": tok, "max_len": 4096, "labels": None}
    assert build_examples(read_task_rows(transcript, "sft", fields), fields=fields, path=transcript, **kw) == (
        build_examples(read_task_rows(messages, "sft", field_map("sft", None)), fields=field_map("sft", None),
                       path=messages, **kw)
    )  # fmt: skip
    # other text in the column is refused naming the column, with what to do
    transcript.write_text(json.dumps({"chosen": "just some text"}) + "\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"row 1: column 'chosen' holds text, not a list .* --task clm --field text=chosen"
    ):
        read_task_rows(transcript, "sft", fields)


def test_the_prefix_stays_when_the_tokens_after_it_still_carry_a_target_or_the_prompts_end():
    """`segments_example` keeps the prefix (an imported Llama's BOS) when max_len > len(prefix) and `keep_end`
    when n > len(prefix): one apart, because a training window keeps max_len + 1 tokens and needs two after
    the prefix (the token that predicts the first target, and the target), a prompt only its last token. At
    the boundary, keeping the prefix would leave an example with no target, or a prompt of only the prefix."""
    from lmforge.data.formats import keep_end, segments_example

    bos, prompt, answer = [99], [1, 2, 3, 4], [5, 6]
    at = segments_example([(bos + prompt, False), (answer, True)], max_len=1, prefix=bos)
    assert (at.ids, at.train) == ([4, 5], [False, True])  # a target, predicted by the prompt's last token
    past = segments_example([(bos + prompt, False), (answer, True)], max_len=2, prefix=bos)
    assert (past.ids, past.train) == ([99, 4, 5], [False, False, True])
    assert keep_end(bos + prompt, 1, bos) == [4] and keep_end(bos + prompt, 2, bos) == [99, 4]


def test_a_base_with_a_context_too_short_to_fine_tune_says_so(tmp_path: Path):
    """A base of context 1 (a toy pretrained with --model.max_seq_len 1) was refused with "--prompt-tokens 16 leaves
    1 of the model's 1 context tokens ...; use --prompt-tokens -7 or fewer", a flag it was not given (the default
    --adapt full takes no soft prompt). Now the error names the base's context and the one that would do."""
    short = make_base(tmp_path, max_seq_len=4)
    for adapt, need in (("full", 8), ("prompt", 9)):
        with pytest.raises(ConfigError, match=r"context is 4 tokens; fine-tuning needs at least 8 for the text") as e:
            finetune(short, train_file=DATA / "sentiment_train.csv", out=tmp_path / "ft",
                     cfg=FinetuneConfig(task="classify", adapt=adapt), progress=False)  # fmt: skip
        assert str(e.value).endswith(f"--model.max_seq_len {need} or more") and "-4" not in str(e.value)
        assert not (tmp_path / "ft").exists()


def test_examples_cut_to_max_len_are_counted_in_a_note(capsys: pytest.CaptureFixture[str]):
    """Examples longer than --max-len (or the context) were cut without a word, for every task but qa: a
    500-word review trained on its first 30 tokens, and the user never knew. Now one note per file counts them;
    examples that fit say nothing."""
    from lmforge.data.formats import build_examples
    from lmforge.data.tables import field_map

    tok = train_char(["abcdefghijklmnopqrstuvwxyz ?"])
    long, short = "word " * 100, "ok"
    cases = {
        "classify": [{"text": long, "label": "a"}, {"text": short, "label": "b"}, {"text": short, "label": "a"}],
        "sft": [{"instruction": "say", "output": long}, {"instruction": "say", "output": short}],
        "translate": [{"source": long, "target": short}, {"source": short, "target": short}],
        "dpo": [{"prompt": "q?", "chosen": long, "rejected": short}, {"prompt": "q?", "chosen": "a", "rejected": "b"}],
    }
    for task, rows in cases.items():
        kwargs = {"tok": tok, "fields": field_map(task, None), "labels": ["a", "b"], "path": f"{task}.jsonl"}
        examples = build_examples(rows, task=task, max_len=32, **kwargs)
        what = "pairs" if task == "dpo" else "examples"
        note = f"note: {task}.jsonl: 1 of {len(rows)} {what} are longer than 32 tokens and were cut to fit"
        assert capsys.readouterr().err.startswith(note), task
        assert len(examples) == len(rows)
        build_examples(rows, task=task, max_len=1024, **kwargs)  # everything fits: no note
        assert capsys.readouterr().err == "", task


def test_a_val_file_that_is_the_train_file_is_noted_once(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """finetune --train F --val F printed the cut-examples note twice, word for word (once per role); now once
    per distinct file: a --val copy of the same rows is still noted under its own name."""
    train, copy = tmp_path / "train.csv", tmp_path / "val.csv"
    for f in (train, copy):  # (the first 16 reviews: a fast run)
        f.write_text("".join((DATA / "sentiment_train.csv").read_text().splitlines(True)[:17]))
    cfg = FinetuneConfig(task="classify", max_len=8)
    fast = {"train": {"max_steps": 1, "batch_size": 8}}
    for val, notes in ((train, [train]), (copy, [train, copy])):
        finetune(base, train_file=train, val_file=val, out=tmp_path / val.stem, cfg=cfg, overrides=fast, progress=False)
        err = capsys.readouterr().err
        assert [line.split(": ")[1] for line in err.splitlines() if "were cut to fit" in line] == [
            str(f) for f in notes
        ]


def test_the_cut_note_says_a_whole_context_cannot_see_more(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The cut-examples note suggested a longer --max-len even when --max-len (0: all of it) was already the
    model's whole context; there it now says the model cannot see more (shorter examples, a longer-context model),
    for qa's note too."""
    from lmforge.data.formats import build_examples
    from lmforge.data.tables import field_map

    tok = train_char(["abcdefghijklmnopqrstuvwxyz ?"])
    long = "word " * 100
    cases = {
        "sft": [{"instruction": "say", "output": long}],
        "qa": [{"question": "q?", "context": long, "answer": "w"}],
    }
    for task, rows in cases.items():
        kwargs = {"tok": tok, "fields": field_map(task, None), "labels": None, "path": "f.jsonl", "max_len": 32}
        for context, advice in ((32, "32 tokens is the model's whole context, so it cannot see more: shorten"),
                                (64, "a longer --max-len, up to the model's context (64), keeps more")):  # fmt: skip
            build_examples(rows, task=task, context=context, **kwargs)
            err = capsys.readouterr().err
            assert err.startswith("note: f.jsonl: 1 of 1 ") and advice in err and err.count("\n") == 1, (task, err)
    base = make_base(tmp_path, max_seq_len=32)  # finetune passes the model's context
    rows = tmp_path / "long.jsonl"
    rows.write_text(json.dumps({"instruction": "say", "output": "the cat sat " * 20}) + "\n", encoding="utf-8")
    overrides = {"train": {"max_steps": 1, "batch_size": 1, "warmup_steps": 0}}
    finetune(base, train_file=rows, out=tmp_path / "ft", cfg=FinetuneConfig(task="sft"), overrides=overrides,
             progress=False)  # fmt: skip
    assert "32 tokens is the model's whole context, so it cannot see more" in capsys.readouterr().err


def test_eval_and_quantize_cut_notes_name_the_runs_max_len(base: Path, tmp_path: Path, capsys):
    """`eval --task classify|dpo` and quantize's validation metrics built their examples without the model's
    context, so the cut-examples note advised "a longer --max-len", a flag neither command has: the max_len is the
    fine-tune's. The note now says so and what to do (shorten the examples or fine-tune with a longer --max-len)."""
    from lmforge.compress.quantize import quantize_run
    from lmforge.data.tables import read_task_rows
    from lmforge.eval.tasks import task_metrics

    fixed = "24 tokens is the run's max_len (its fine-tune's --max-len), so the model cannot see more: shorten the "
    fixed += "examples or fine-tune with a longer --max-len, up to the model's context (128)"
    one_step = {"train": {"max_steps": 1, "batch_size": 2, "warmup_steps": 0}, "eval": {"every": 0}}
    runs = {"classify": DATA / "sentiment_train.csv", "dpo": DATA / "hh_rlhf.jsonl", "sft": DATA / "alpaca.jsonl"}
    for task, data in runs.items():
        out = tmp_path / task
        cfg = FinetuneConfig(task=task, adapt="lora", max_len=24, merge=task == "sft")  # (quantize: a whole model)
        finetune(base, train_file=data, out=out, cfg=cfg,
                 overrides=one_step, progress=False)  # fmt: skip
        capsys.readouterr()
        ft = load_finetuned(out, torch.device("cpu"))
        if task == "sft":  # quantize compares the run before and after on its examples: one note, not one each
            quantize_run(out, tmp_path / "q", max_batches=1, gen_tokens=1, val_file=data)
        else:
            task_metrics(ft, read_task_rows(data, task, ft.info["fields"]), path=data)
        err = capsys.readouterr().err
        assert err.count(fixed) == 1 and "keeps more" not in err, (task, err)


def test_sft_rows_with_an_empty_answer_are_skipped_with_a_note(capsys: pytest.CaptureFixture[str]):
    """6 of Alpaca zh's 5,000 rows have an empty output (lost data: "Calculate the sum of the digits in 18047"):
    training kept them silently, teaching the model to stop at once, while a scored file refuses them. They are
    now skipped with one stderr note counting them, as blank classification texts and identical DPO pairs are, and
    translate's empty targets."""
    from lmforge.data.formats import build_examples
    from lmforge.data.tables import field_map

    tok = train_char(["abcdefghijklmnopqrstuvwxyz ?"])
    rows = [
        {"instruction": "sum the digits", "input": "18047", "output": " "},
        {"instruction": "say hi", "output": "hi"},
        {"messages": [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}]},
    ]
    kwargs = {"task": "sft", "tok": tok, "fields": field_map("sft", None), "max_len": 64, "labels": None}
    examples = build_examples(rows, path="t.jsonl", **kwargs)
    assert len(examples) == 2 and all(sum(e.train) > 1 for e in examples)  # (an answer and its end of turn)
    assert capsys.readouterr().err == (
        "note: t.jsonl: 2 of 4 rows with an empty answer ('output' or the assistant messages: it teaches only to "
        "stop) were skipped\n"
    )
    with pytest.raises(
        DataError, match=r"^t.jsonl: every row's answer \('output' or the assistant messages\) is empty"
    ):
        build_examples([rows[0], rows[2]], path="t.jsonl", **kwargs)
    pairs = [{"source": "hi", "target": ""}, {"source": "cat", "target": "chat"}]  # translate: the same
    kwargs |= {"task": "translate", "fields": field_map("translate", None)}
    assert len(build_examples(pairs, path="t.tsv", **kwargs)) == 1
    assert "note: t.tsv: 1 of 2 rows with an empty 'target' (it teaches only to stop) was skipped" in (
        capsys.readouterr().err
    )


def test_classification_metrics_against_hand_computed_values():
    from lmforge.eval.classify import classification_report

    # true: a a a b b c ; pred: a a b b c c
    r = classification_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert r["per_class"]["b"]["precision"] == pytest.approx(0.5) and r["per_class"]["b"]["recall"] == 0.5
    assert r["per_class"]["c"]["f1"] == pytest.approx(2 / 3)  # P 1/2, R 1
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert r["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_macro_f1_averages_the_classes_the_data_holds_or_gets():
    from lmforge.eval.classify import classification_report

    # A 4-class model scored on a file of 2 classes, all right: macro-F1 1.0 (scikit-learn's f1_score(average=
    # "macro")), not 0.5 from two never-seen, never-predicted classes counted as F1 0. They stay in the table.
    r = classification_report([0, 0, 1, 1], [0, 0, 1, 1], ["World", "Sports", "Business", "Sci/Tech"])
    assert r["macro_f1"] == 1.0 and r["per_class"]["Business"]["support"] == 0
    # a class only predicted counts (its F1 is 0): true a a a a, pred a a a c -> (6/7 + 0) / 2
    r = classification_report([0, 0, 0, 0], [0, 0, 0, 2], ["a", "b", "c"])
    assert r["macro_f1"] == pytest.approx((2 * 0.75 / 1.75 + 0) / 2)


def test_qa_and_translation_metrics_against_hand_computed_values():
    from lmforge.eval.tasks import bleu_chrf, exact_match, token_f1

    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    # pred tokens: [paris, france], ref: [paris]: P 1/2, R 1 -> F1 2/3
    assert token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    same = bleu_chrf(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    assert bleu_chrf(["zzz qqq"], ["the cat sat on the mat"])["bleu"] == pytest.approx(0.0)
    # Chinese: full-width punctuation dropped, one token per character (CMRC 2018 style), zh BLEU tokens
    assert exact_match("五边形。", "五边形") == 1.0 and exact_match("「北京」", "北京！") == 1.0
    assert exact_match("北京 市", "北京市") == 1.0 and exact_match("ＡＢＣ１２３", "abc123") == 1.0  # NFKC
    # pred 几何形状是五边形 (8 chars) vs ref 几何形状是一个五边形 (10): all 8 shared -> P 1, R 4/5, F1 8/9
    assert token_f1("几何形状是五边形", "几何形状是一个五边形。") == pytest.approx(8 / 9)
    assert token_f1("我爱 Paris", "我 爱paris") == 1.0  # mixed scripts
    import sacrebleu

    hyp, ref = ["我很喜欢这本书。"], ["我非常喜欢这本书。"]
    assert bleu_chrf(hyp, ref)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref], tokenize="zh").score)
    assert bleu_chrf(hyp, ref)["bleu"] > 50  # with 13a tokens the one-"word" sentence scored 0
    # a file of both directions, most references English: the Chinese pair is still scored per character
    hyp, ref = ["the cat sat on the mat", "a dog ran in the park", *hyp], ["the cat sat on the mat", "a dog ran", *ref]
    spaced = [" ".join(s) if "书" in s else s for s in hyp], [" ".join(s) if "书" in s else s for s in ref]
    expected = sacrebleu.corpus_bleu(spaced[0], [spaced[1]], tokenize="13a", force=True).score
    assert bleu_chrf(hyp, ref)["bleu"] == pytest.approx(expected)  # before: 62.4, the Chinese pair one 13a "word"
    # the result names the tokenisation its BLEU used (a BLEU compares only with one tokenised the same way)
    assert bleu_chrf(hyp, ref)["bleu_tokenize"] == "zh+13a"
    assert bleu_chrf(hyp[2:], ref[2:])["bleu_tokenize"] == "zh" and same["bleu_tokenize"] == "13a"


def test_dpo_loss_against_hand_computed_value():
    from lmforge.adapt.objectives import DPO, dpo_losses, sequence_logprobs

    beta = 0.5
    losses, rc, rr = dpo_losses(
        torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]), beta
    )
    # beta * ((-3 - -4) - (-5 - -4.5)) = 0.5 * 1.5 = 0.75; loss = -log(sigmoid(0.75)) = log(1 + e^-0.75)
    assert float(losses[0]) == pytest.approx(math.log1p(math.exp(-0.75)), rel=1e-6)
    assert float(rc[0]) == pytest.approx(0.5) and float(rr[0]) == pytest.approx(-0.25)

    # the objective on a real forward pass equals the same formula on log-probs computed by hand
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=1, d_model=8, max_seq_len=8))
    model.init_weights()
    x = torch.tensor([[1, 2, 3, 4]])
    y_c, y_r = torch.tensor([[-100, -100, 5, 6]]), torch.tensor([[-100, -100, 7, -100]])
    batch = {"chosen_x": x, "chosen_y": y_c, "rejected_x": x, "rejected_y": y_r}
    batch |= {"ref_chosen": torch.tensor([-4.0]), "ref_rejected": torch.tensor([-2.0])}
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0], dim=-1)
    pc, pr = float(logp[2, 5] + logp[3, 6]), float(logp[2, 7])
    with torch.no_grad():
        assert float(sequence_logprobs(model(x), y_c)[0]) == pytest.approx(pc, rel=1e-5)
    expected = math.log1p(math.exp(-beta * ((pc + 4.0) - (pr + 2.0))))
    with torch.no_grad():
        assert float(DPO(beta).loss(model, batch)) == pytest.approx(expected, rel=1e-5)


def test_dpo_finetune_starts_at_log2_and_reports_rewards(base: Path, tmp_path: Path):
    out = tmp_path / "dpo"
    cfg = FinetuneConfig(task="dpo", adapt="lora", lora_rank=4)
    overrides = {**FAST, "train": {**FAST["train"], "lr": 1e-2, "log_every": 1}}
    result = finetune(
        base, train_file=DATA / "hh_rlhf.jsonl", val_file=DATA / "hh_rlhf.jsonl", out=out, cfg=cfg,
        overrides=overrides, progress=False,
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    val = result["val"]
    assert 0.0 <= val["reward_accuracy"] <= 1.0 and val["n"] == 16
    assert val["loss"] < math.log(2)  # it learned to prefer the chosen replies it was trained on
    assert val["reward_margin"] > 0


def test_dpo_skips_pairs_without_a_preference(base: Path, tmp_path: Path):
    """Pairs with chosen == rejected were kept: they train nothing (loss log 2, zero gradient) and eval counted
    each as a wrong reward ordering, capping reward_accuracy. Now they are skipped with a count (log line, eval's
    `skipped_identical`); a file of only such pairs is a one-line error before the run folder is made. A pair
    with one empty side is a real preference (hh-rlhf has a few) and is kept."""
    rows = (DATA / "hh_rlhf.jsonl").read_text(encoding="utf-8").splitlines()
    same = [json.dumps({"prompt": f"Q{i}", "chosen": "yes", "rejected": "yes"}) for i in range(3)]
    empty = json.dumps({"prompt": "Q", "chosen": "", "rejected": "no"})
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(rows[:4] + same + [empty]) + "\n", encoding="utf-8")
    out = tmp_path / "dpo"
    overrides = {**FAST, "train": {**FAST["train"], "max_steps": 2}}
    result = finetune(base, train_file=mixed, val_file=mixed, out=out, cfg=FinetuneConfig(task="dpo", adapt="lora"),
                      overrides=overrides, progress=False)  # fmt: skip
    assert result["val"]["n"] == 5 and result["val"]["skipped_identical"] == 3
    r = run_cli("finetune", str(base), "--task", "dpo", "--train", str(mixed), "--val", str(mixed), "--adapt",
                "lora", "--out", str(tmp_path / "log"), "--train.max_steps", "1")  # fmt: skip
    skipped = f"note: {mixed}: 3 of 8 pairs with the same chosen and rejected (no preference) were skipped"
    # one note for the file, --train and --val alike (it was said twice, once per role): the final evaluation of
    # --val and its printed result do not repeat it
    assert r.returncode == 0 and r.stderr.count(skipped) == 1 and "skipped" not in r.stdout, r.stderr + r.stdout
    # eval: said once, by the note (its result's skipped_identical, asserted above, is not printed as text too)
    r = run_cli("eval", str(out), "--task", "dpo", "--data", str(mixed))
    assert r.returncode == 0 and r.stderr.count(skipped) == 1 and "skipped" not in r.stdout, r.stderr + r.stdout
    only_same = tmp_path / "same.jsonl"
    only_same.write_text("\n".join(same) + "\n", encoding="utf-8")
    r = run_cli("finetune", str(base), "--task", "dpo", "--train", str(only_same), "--out", str(tmp_path / "no"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "all 3 pairs have the same" in r.stderr
    assert not (tmp_path / "no").exists()


def test_classify_cli_end_to_end_and_eval_matches(base: Path, tmp_path: Path):
    out = tmp_path / "cls"
    r = run_cli(
        "finetune", str(base), "--task", "classify", "--train", str(DATA / "sentiment_train.csv"),
        "--val", str(DATA / "sentiment_val.jsonl"), "--adapt", "lora", "--lora-rank", "4", "--augment", "1",
        "--out", str(out), "--train.max_steps", "8", "--train.batch_size", "8", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert (out / "confusion.png").stat().st_size > 1000
    # tokens and tokens/s count the sentences' tokens (padding left out), not the 8 x 8 examples
    last = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][-1]
    assert last["step"] == 8 and last["tokens"] > 8 * 8 * 10
    assert saved["trainable_params"] == 2 * (4 * 32 + 96 * 4) + 2 * (4 * 32 + 32 * 4) + 64  # qkv + attn.proj + head
    from lmforge.eval.tasks import evaluate_task

    m = evaluate_task(out, task="classify", data=DATA / "sentiment_val.jsonl")
    assert m["accuracy"] == pytest.approx(saved["val"]["accuracy"])
    assert m["macro_f1"] == pytest.approx(saved["val"]["macro_f1"])
    assert sum(map(sum, m["confusion"])) == 40 and set(m["per_class"]) == {"negative", "positive"}


def test_bad_inputs_are_one_line_errors(base: Path, tmp_path: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,sentiment\ngreat,positive\nawful,negative\n", encoding="utf-8")
    out = tmp_path / "never"
    r = run_cli("finetune", str(base), "--task", "classify", "--train", str(bad), "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "no column 'text'" in r.stderr and "--field text=COLUMN" in r.stderr
    assert not out.exists()
    # the rename flags fix it
    cfg = FinetuneConfig(task="classify", adapt="head", field=["text=sentence", "label=sentiment"])
    finetune(base, train_file=bad, out=out, cfg=cfg, overrides=FAST, progress=False)
    # a label the model never saw, at eval
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text(json.dumps({"sentence": "meh", "sentiment": "neutral"}) + "\n", encoding="utf-8")
    r = run_cli("eval", str(out), "--task", "classify", "--data", str(unseen))
    assert r.returncode == 2 and "'neutral'" in r.stderr and "not trained on" in r.stderr
    # a test file with the standard columns is read as such (the run was trained on renamed ones)
    standard = tmp_path / "standard.jsonl"
    standard.write_text(json.dumps({"text": "great", "label": "positive"}) + "\n", encoding="utf-8")
    r = run_cli("eval", str(out), "--task", "classify", "--data", str(standard), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["n"] == 1, r.stderr
    # ... and what is wrong with it in those columns is said, not that it lacks the run's (it said "no column
    # 'sentence'" of a file whose only fault was an empty text)
    from lmforge.eval.tasks import evaluate_task

    blank = tmp_path / "blank.csv"
    blank.write_text("text,label\ngreat,positive\n,negative\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2 has an empty 'text'; write the text"):
        evaluate_task(out, task="classify", data=blank, device="cpu")
    # an empty conversation
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": []}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty conversation"):
        finetune(base, train_file=empty, out=tmp_path / "e", cfg=FinetuneConfig(task="sft"), progress=False)
    assert not (tmp_path / "e").exists()
    with pytest.raises(ConfigError, match="matches no linear layer"):
        finetune(
            base, train_file=DATA / "alpaca.jsonl", out=tmp_path / "t", progress=False,
            cfg=FinetuneConfig(task="sft", adapt="lora", lora_targets=["qvk"]),
        )  # fmt: skip
    with pytest.raises(ConfigError, match="--train.*--optim"):
        finetune(
            base, train_file=DATA / "alpaca.jsonl", out=tmp_path / "m", overrides={"model": {"n_layer": 3}},
            progress=False,
        )  # fmt: skip


def test_early_stopping_without_validation_and_unread_train_settings_are_refused(base: Path, tmp_path: Path):
    """A patience with no --val file, or with eval.every 0, was accepted and never stopped anything; a
    --train.decay_fraction without the wsd schedule was ignored."""
    args = dict(train_file=DATA / "alpaca.jsonl", cfg=FinetuneConfig(task="sft"), progress=False)
    with pytest.raises(ConfigError, match=r"no validation examples; pass --val FILE or drop --train.early_stop_pat"):
        finetune(base, out=tmp_path / "a", overrides={"train": {"early_stop_patience": 1}}, **args)
    with pytest.raises(ConfigError, match=r"eval.every 0 runs none before the last step"):
        finetune(base, out=tmp_path / "b", val_file=DATA / "alpaca.jsonl",
                 overrides={"train": {"early_stop_patience": 1}, "eval": {"every": 0}}, **args)  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.decay_fraction is used by train.schedule wsd only"):
        finetune(base, out=tmp_path / "c", overrides={"train": {"decay_fraction": 0.3}}, **args)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("adapt", ["lora", "full"])
def test_a_batch_past_the_machines_memory_is_refused_before_training(base: Path, tmp_path: Path, adapt: str):
    """`--train.batch_size 1e11` grew a Python list of examples in the loader until the machine ran out (Ctrl-C held
    inside the step, so only SIGKILL stopped it); now one line before anything trains, and no run is left."""
    cfg = FinetuneConfig(task="sft", adapt=adapt)
    with pytest.raises(
        ConfigError, match=r"micro-batch of 100000000000 examples x \d+ tokens needs .* token ids alone"
    ):
        finetune(base, train_file=DATA / "alpaca.jsonl", out=tmp_path / "r", cfg=cfg,
                 overrides={"train": {"batch_size": 10**11}}, progress=False)  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_lora_targets_take_commas_as_estimate_does(base: Path, tmp_path: Path):
    """`--lora-targets qkv,mlp.fc` (as `estimate` takes it) was refused: "LoRA target 'qkv,mlp.fc' matches no linear
    layer"; it is the two targets, as the repeated flag gives them."""
    cfg = FinetuneConfig(task="sft", adapt="lora", lora_rank=2, lora_targets=["qkv, mlp.fc"])
    assert cfg.lora_targets == ["qkv", "mlp.fc"]
    result = finetune(
        base, train_file=DATA / "alpaca.jsonl", out=tmp_path / "r", cfg=cfg, overrides=FAST, progress=False
    )
    assert result["trainable_params"] == 2 * 2 * (32 + 96) + 2 * 2 * (32 + 128)  # per block: qkv 32->96, fc 32->128


def test_settings_the_run_would_not_use_are_refused(base: Path, tmp_path: Path):
    """Each of these was accepted and silently ignored; a blank label became a class named ""."""
    refused = [
        ({"adapt": "full", "lora_rank": 4}, "--lora-rank is for --adapt lora"),
        ({"adapt": "prompt", "merge": True}, "--merge is for --adapt lora"),
        ({"task": "sft", "augment": 2}, "--augment is for --task classify"),
        ({"task": "sft", "old_val": "old.txt"}, "--old-val is for --task clm"),
        ({"task": "classify", "max_new_tokens": 8}, "--max-new-tokens is for --task sft, qa or translate"),
        ({"task": "clm", "replay": "old.txt"}, "--replay OLD_TEXT and --replay-fraction F"),
        ({"task": "clm", "replay_fraction": 0.5}, "--replay OLD_TEXT and --replay-fraction F"),
        ({"task": "qa", "eval_samples": 0}, "--eval-samples must be >= 1"),
    ]
    for kwargs, message in refused:
        with pytest.raises(ConfigError, match=re.escape(message)):
            FinetuneConfig(**kwargs)
    FinetuneConfig(task="sft", adapt="lora", lora_rank=4, merge=True, max_new_tokens=8)  # where they apply
    out = tmp_path / "long"
    r = run_cli("finetune", str(base), "--task", "sft", "--train", str(DATA / "alpaca.jsonl"), "--out", str(out),
                "--max-new-tokens", "128")  # fmt: skip
    assert r.returncode == 2 and "leaves no room for the prompt" in r.stderr and not out.exists()
    r = run_cli("finetune", str(base), "--task", "sft", "--train", str(DATA / "alpaca.jsonl"), "--out", str(out),
                "--adapt", "prompt", "--prompt-tokens", "124")  # fmt: skip
    assert r.returncode == 2 and "--prompt-tokens 124 leaves 4 of the model's 128" in r.stderr, r.stderr
    assert "use --prompt-tokens 120 or fewer" in r.stderr and not out.exists()
    # on the command line, a flag written at its default value is refused too (it would still do nothing)
    r = run_cli("finetune", str(base), "--task", "classify", "--train", str(DATA / "sentiment_train.csv"),
                "--out", str(out), "--adapt", "full", "--lora-rank", "8")  # fmt: skip
    assert r.returncode == 2 and "--lora-rank is for --adapt lora" in r.stderr and not out.exists()
    r = run_cli("eval", str(base), "--task", "qa", "--data", str(DATA / "alpaca.jsonl"), "--max-new-tokens", "200")
    assert r.returncode == 2 and "use at most 127" in r.stderr
    r = run_cli("eval", str(base), "--task", "dpo", "--data", str(DATA / "hh_rlhf.jsonl"))
    assert r.returncode == 2 and "not fine-tuned with --task dpo" in r.stderr and "Traceback" not in r.stderr
    gbk = tmp_path / "gbk.txt"  # continued pretraining on GBK text: refused as prepare refuses it
    gbk.write_bytes(("红楼梦第一回。甄士隐梦幻识通灵。" * 40).encode("gbk"))
    with pytest.raises(DataError, match=r"is not UTF-8: it reads as GB18030 .* iconv -f GB18030"):
        finetune(base, train_file=gbk, out=tmp_path / "g", cfg=FinetuneConfig(task="clm"), progress=False)
    gbk_csv = tmp_path / "gbk.csv"
    gbk_csv.write_bytes(("text,label\n" + "房间很干净，服务很好。,positive\n" * 30).encode("gbk"))
    with pytest.raises(DataError, match=r"reads as GB18030 .* > '.*gbk\.utf8\.csv'"):
        finetune(base, train_file=gbk_csv, out=tmp_path / "g", cfg=FinetuneConfig(task="classify"), progress=False)
    # mostly ASCII (Alpaca's English fields beside the Chinese ones): not flagged as GB18030 by its share of
    # bad bytes, it said only "cannot read ... as UTF-8 text (...); convert it to UTF-8"
    row = {"en_instruction": "Give three tips for staying healthy. " * 3, "instruction": "保持健康的三个提示。"}
    gbk_jsonl = tmp_path / "gbk.jsonl"
    gbk_jsonl.write_bytes((json.dumps(row, ensure_ascii=False) + "\n").encode("gbk") * 20)
    with pytest.raises(DataError, match=r"gbk\.jsonl is not UTF-8 \(byte \d+: .*iconv -f ENCODING -t UTF-8 \(GB18030"):
        finetune(base, train_file=gbk_jsonl, out=tmp_path / "g", cfg=FinetuneConfig(task="sft"), progress=False)
    cut = tmp_path / "cut.jsonl.gz"  # a damaged .gz is not a matter of encoding
    cut.write_bytes(gzip.compress(b'{"instruction": "hi", "output": "hello"}\n' * 50)[:-12])
    with pytest.raises(DataError, match=r"cannot read .*cut\.jsonl\.gz \(.*\); check the file"):
        finetune(base, train_file=cut, out=tmp_path / "g", cfg=FinetuneConfig(task="sft"), progress=False)
    assert not (tmp_path / "g").exists()
    blank = tmp_path / "blank.csv"
    blank.write_text("text,label\ngreat,positive\nawful,negative\nso-so,\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 3 has an empty 'label'"):
        finetune(base, train_file=blank, out=tmp_path / "b", cfg=FinetuneConfig(task="classify"), progress=False)


def test_a_val_file_in_the_standard_columns_is_read_beside_a_renamed_train_file(base: Path, tmp_path: Path):
    """A training CSV of review/label (--field text=review) with a --val JSONL of text/label was refused ("no
    column 'review'"), and no --field could read both files; `eval --task` already read such a file in the standard
    columns. A val file with neither is still refused, naming the renamed column."""
    train = tmp_path / "train.csv"
    train.write_text("review,label\n很好吃,1\n太难吃了,0\n送得很快,1\n凉了,0\n", encoding="utf-8")
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in ({"text": "好吃", "label": 1}, {"text": "难吃", "label": 0})))
    cfg = FinetuneConfig(task="classify", adapt="head", field=["text=review"])
    out = tmp_path / "run"
    result = finetune(base, train_file=train, val_file=val, out=out, cfg=cfg, overrides=FAST, progress=False)
    assert result["val"]["n"] == 2 and sum(map(sum, result["val"]["confusion"])) == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r] == [3, 6]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"txt": "好吃", "label": 1}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1 has no column 'review' \(columns: txt, label\)"):
        finetune(base, train_file=train, val_file=bad, out=tmp_path / "b", cfg=cfg, overrides=FAST, progress=False)


@contextlib.contextmanager
def _pipe(data: bytes) -> Iterator[str]:
    """A real pipe holding `data`, by the name a shell's process substitution gives it: <(cat FILE) is /dev/fd/N."""
    import os
    import threading

    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        yield f"/dev/fd/{read_end}"
    finally:
        os.close(read_end)
        writer.join(timeout=10)


def test_task_files_from_a_pipe_are_read_once_in_the_format_their_content_has(base: Path, tmp_path: Path):
    """`finetune --train <(zcat data.jsonl.gz)`: the path /dev/fd/63 has no extension and was refused as "unknown
    file type"; a --val in the standard columns beside a renamed train file was read a second time (the retry in
    those columns), which a pipe cannot give. Now a file named without an extension is read by its content (JSON
    Lines, a JSON list, gzip, else headerless tab-separated text as a .txt) and every task file is read once."""
    train = [{"review": t, "label": y} for t, y in (("很好吃", 1), ("太难吃了", 0), ("送得很快", 1), ("凉了", 0))]
    val = [{"text": "好吃", "label": 1}, {"text": "难吃", "label": 0}]
    jsonl = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")  # noqa: E731
    cfg = FinetuneConfig(task="classify", adapt="head", field=["text=review"])
    with _pipe(jsonl(train)) as train_file, _pipe(gzip.compress(jsonl(val))) as val_file:
        result = finetune(base, train_file=train_file, val_file=val_file, out=tmp_path / "run", cfg=cfg,
                          overrides=FAST, progress=False)  # fmt: skip
    assert result["val"]["n"] == 2 and sum(map(sum, result["val"]["confusion"])) == 2
    from lmforge.data.tables import read_table, read_task_rows

    fields = {"text": "text", "label": "label"}
    with _pipe(json.dumps(val).encode("utf-8")) as listed, _pipe(b"good\t1\nbad\t0\n") as tabbed:
        assert read_task_rows(listed, "classify", fields) == val
        assert read_task_rows(tabbed, "classify", fields) == [
            {"text": "good", "label": "1"},
            {"text": "bad", "label": "0"},
        ]
    with _pipe(b"text,label\ngood,1\n") as table, pytest.raises(DataError, match="not JSON, and its name has no "):
        read_table(table)  # (no task to name a .txt file's columns: asked for a name that says the format)


def test_a_silent_pipe_is_noted_once_and_what_it_sends_later_is_read(tmp_path: Path, monkeypatch, capsys):
    """`finetune --train <(slow_cmd)`, or a FIFO no one writes to yet, waited without a word (as `cat` does). Once
    it has sent nothing for PIPE_NOTE_SECONDS (here 0.05 s) one note on stderr says what it waits for, and the
    rows that come later are read as before. A real FIFO, written 0.5 s after it is opened."""
    import os
    import threading
    import time

    from lmforge.data.tables import read_table

    monkeypatch.setenv("LMFORGE_PIPE_NOTE_SECONDS", "0.05")
    fifo = tmp_path / "train"
    os.mkfifo(fifo)

    def write_late() -> None:
        with open(fifo, "wb") as f:  # (returns once the reader has opened it)
            time.sleep(0.5)
            f.write(b'{"text": "good", "label": 1}\n')

    writer = threading.Thread(target=write_late, daemon=True)
    writer.start()
    rows = read_table(fifo)
    writer.join(timeout=10)
    assert rows == [{"text": "good", "label": 1}]
    assert capsys.readouterr().err == f"waiting for data on {fifo} (a pipe): nothing came in 0.05 s; Ctrl-C stops\n"


def test_labels_spelled_in_other_cases_are_refused_not_split_into_classes(base: Path, tmp_path: Path):
    """A label column with 'Positive', ' positive ' and 'positive' trained a 4-class head for 2 classes and
    scored each class against its own other spelling; now one line says to write each label one way, and an
    eval file's 'POSITIVE' is told the spelling the model knows."""
    from lmforge.data.formats import class_labels
    from lmforge.eval.tasks import evaluate_task

    mixed = tmp_path / "mixed.csv"
    rows = [("good film", "Positive"), ("bad film", "negative"), ("great", " positive "), ("awful", "Negative")]
    mixed.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows * 3), encoding="utf-8")
    cfg = FinetuneConfig(task="classify", adapt="head")
    with pytest.raises(DataError, match=r"mixed.csv spells one label 2 ways \('Negative', 'negative'\)"):
        finetune(base, train_file=mixed, out=tmp_path / "never", cfg=cfg, overrides=FAST, progress=False)
    assert not (tmp_path / "never").exists()
    lower = tmp_path / "lower.csv"
    lower.write_text(mixed.read_text(encoding="utf-8").lower(), encoding="utf-8")
    out = tmp_path / "ok"
    result = finetune(base, train_file=lower, out=out, cfg=cfg, overrides={"train": {"max_steps": 1}}, progress=False)
    assert json.loads((out / "finetune.json").read_text(encoding="utf-8"))["labels"] == ["negative", "positive"]
    upper = tmp_path / "upper.jsonl"
    upper.write_text(json.dumps({"text": "good film", "label": "POSITIVE"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"label 'POSITIVE', which the model .* write it 'positive' as the model does"):
        evaluate_task(out, task="classify", data=upper, device="cpu")
    assert result["trainable_params"] == 32 * 2
    # full-width letters and a decomposed accent are other spellings too; other labels are other classes
    with pytest.raises(DataError, match=r"f.csv spells one label 2 ways \('positive', 'ｐｏｓｉｔｉｖｅ'\)"):
        class_labels(["positive", "ｐｏｓｉｔｉｖｅ", "negative"], "f.csv")
    with pytest.raises(DataError, match="2 ways"):
        class_labels(["caf\u00e9", "cafe\u0301", "tea"], "f.csv")
    assert class_labels(["正面", "负面", " 正面 ", "1", 1.0, "10"], "f.csv") == ["1", "10", "正面", "负面"]
    # few-shot prompting reads the labels the same way
    with pytest.raises(DataError, match=r"mixed.csv spells one label 2 ways"):
        evaluate_task(base, task="classify", data=lower, shots=mixed, k_shot=1, device="cpu")


def test_a_nan_label_is_a_missing_label_and_nan_as_a_name_sorts_the_same_in_every_process(base: Path, tmp_path: Path):
    """A JSONL label NaN (how Python's json writes a missing float) became a class "nan" trained like any other;
    and "nan" as a label name sorted by float('nan'), which compares unequal to everything, so the labels came
    out in the order of a set of strings: another order in another process."""
    from lmforge.data.formats import label_key, label_name

    rows = [("good", 1), ("bad", 0), ("meh", float("nan")), ("fine", 1)]
    nan = tmp_path / "nan.jsonl"
    nan.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"nan.jsonl: row 3 has an empty 'label'; label it or remove the row"):
        finetune(base, train_file=nan, out=tmp_path / "never", cfg=FinetuneConfig(task="classify"), progress=False)
    assert label_name(float("nan")) == ""
    for names in (["nan", "10", "2", "b", "a"], ["a", "b", "2", "nan", "10"], ["b", "nan", "a", "10", "2"]):
        assert sorted(names, key=label_key) == ["2", "10", "a", "b", "nan"]


def test_a_text_column_given_as_the_label_is_refused(base: Path, tmp_path: Path):
    """`--field label=sentence` on SST-2's dev.tsv trained an 872-class classifier, one class per row, silently
    (and printed all 872 sentences as its labels); no class seen twice is a wrong column, said in one line."""
    swapped = tmp_path / "swapped.tsv"
    rows = [f"review number {i} of a film\t{i % 2}" for i in range(24)]
    swapped.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    r = run_cli("finetune", str(base), "--task", "classify", "--train", str(swapped), "--field", "text=label",
                "--field", "label=sentence", "--out", str(tmp_path / "s"))  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "each of its 24 rows has a label of its own" in r.stderr and "--field label=COLUMN" in r.stderr
    assert not (tmp_path / "s").exists()
    r = run_cli("finetune", str(base), "--task", "classify", "--train", str(swapped), "--field", "text=sentence",
                "--out", str(tmp_path / "ok"), "--train.max_steps", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_an_empty_classification_text_is_skipped_in_training_and_refused_where_scored(base: Path, tmp_path: Path):
    """A row with a blank text (ChnSentiCorp_htl_all.csv ends with the row "0,") trained and was scored silently
    as the bare frame ([EOS]). A training file's blank rows are now skipped and counted in the log (one stray row
    should not block a real dataset); in a file whose rows are scored (--val, eval) it is a one-line error naming
    the row, as an empty label is; a training file of only blank texts is an error."""
    from lmforge.data.tables import field_map, read_task_rows

    blank = tmp_path / "blank.csv"
    blank.write_text("review,label\n房间很干净,1\n太差了,0\n  ,0\n", encoding="utf-8")
    fields = field_map("classify", ["text=review"])
    with pytest.raises(DataError, match=r"blank\.csv: row 3 has an empty 'review'; write the text or remove the row"):
        read_task_rows(blank, "classify", fields, scored=True)
    r = run_cli("finetune", str(base), "--task", "classify", "--train", str(blank), "--val", str(blank),
                "--field", "text=review", "--out", str(tmp_path / "b"))  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "row 3 has an empty 'review'" in r.stderr
    assert not (tmp_path / "b").exists()

    r = run_cli("finetune", str(base), "--task", "classify", "--train", str(blank), "--field", "text=review",
                "--out", str(tmp_path / "c"), "--train.max_steps", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "2 train / 0 val examples" in r.stdout
    skipped = f"note: {blank}: 1 of 3 rows with an empty 'review' (no text to learn the label from) was skipped"
    assert skipped in r.stderr
    # eval --limit 2 scores rows 1-2 only: the blank row 3 after them is not scored, so it is not refused
    # (ChnSentiCorp_htl_all.csv's blank row 6375 refused `--limit 3000`)
    from lmforge.eval.tasks import evaluate_task

    assert evaluate_task(tmp_path / "c", task="classify", data=blank, limit=2, device="cpu")["n"] == 2
    with pytest.raises(DataError, match="row 3 has an empty 'review'"):
        evaluate_task(tmp_path / "c", task="classify", data=blank, limit=3, device="cpu")

    only_blank = tmp_path / "only_blank.csv"
    only_blank.write_text("review,label\n ,1\n,0\n", encoding="utf-8")
    r = run_cli("finetune", str(base), "--task", "classify", "--train", str(only_blank), "--field", "text=review",
                "--out", str(tmp_path / "d"))  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "only_blank.csv: every row's 'review' is empty" in r.stderr
    assert not (tmp_path / "d").exists()


def test_a_label_written_as_a_float_is_the_integer_label(base: Path, tmp_path: Path):
    """pandas writes an int label column that has a gap as float64: "1.0", "0.0". That CSV gave the classes
    "0.0" and "1.0" (and, mixed with "1" and "0", four classes silently), and a --val JSONL labelled 1 and 0
    was refused as holding labels never trained on. Now all of them name the classes "0" and "1"."""
    from lmforge.data.formats import build_examples, label_name
    from lmforge.data.tables import field_map, read_task_rows

    train_rows = list(csv.DictReader((DATA / "sentiment_train.csv").read_text(encoding="utf-8").splitlines()))
    number = {"negative": 0, "positive": 1}
    mixed = tmp_path / "mixed.csv"  # half the rows as pandas writes a float column, half as an int one
    with mixed.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i, row in enumerate(train_rows):
            writer.writerow([row["text"], f"{number[row['label']]}.0" if i % 2 else number[row["label"]]])
    val = tmp_path / "val.jsonl"
    val_rows = [json.loads(line) for line in (DATA / "sentiment_val.jsonl").read_text(encoding="utf-8").splitlines()]
    val.write_text("".join(json.dumps({**r, "label": number[r["label"]]}) + "\n" for r in val_rows), encoding="utf-8")
    out = tmp_path / "run"
    result = finetune(
        base,
        train_file=mixed,
        val_file=val,
        out=out,
        cfg=FinetuneConfig(task="classify", adapt="head"),
        overrides={"train": {"max_steps": 1, "batch_size": 4}},
        progress=False,
    )
    assert json.loads((out / "finetune.json").read_text(encoding="utf-8"))["labels"] == ["0", "1"]
    assert result["val"]["labels"] == ["0", "1"] and result["val"]["n"] == len(val_rows)
    # every spelling of one label is one class; JSON true, CSV "true" and pandas' "True" too
    assert {label_name(v) for v in (1, 1.0, "1", "1.0", " 1.00 ", "1.5")} == {"1", "1.5"}
    assert {label_name(v) for v in (0, 0.0, "0", "0.0", "-0.0")} == {"0"}
    assert {label_name(v) for v in (True, "true", "True", "TRUE")} == {"true"}
    assert [label_name(v) for v in ("01", "1e0", "one", "True story")] == ["01", "1e0", "one", "True story"]
    # a run saved with the labels "0.0" and "1.0" (before) still scores a file labelled 0 and 1
    fields = field_map("classify", [])
    rows = read_task_rows(val, "classify", fields, scored=True)
    tok = Tokenizer.load(out / "tokenizer.json")
    examples = build_examples(
        rows, path=val, task="classify", tok=tok, fields=fields, max_len=64, labels=["0.0", "1.0"]
    )
    assert [label for _, label in examples] == [number[r["label"]] for r in val_rows]


def test_a_folder_being_fine_tuned_is_not_touched_by_another_process(base: Path, tmp_path: Path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "busy"
    cfg = FinetuneConfig(task="classify", adapt="head")
    kw = {"train_file": DATA / "sentiment_train.csv", "cfg": cfg, "overrides": FAST, "progress": False}
    finetune(base, out=out, **kw)
    before = sorted(p.name for p in out.iterdir())
    with open(out / ".lock", "a+") as held:  # as another live finetune holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match="is being trained by another process"):
                finetune(base, out=out, overwrite=overwrite, **kw)
        assert sorted(p.name for p in out.iterdir()) == before  # --overwrite deleted nothing
    finetune(base, out=out, **kw)  # free again: the re-run resumes (nothing left to train)


def test_adapter_run_whose_base_checkpoint_was_pruned_says_so(base: Path, tmp_path: Path):
    import shutil

    own_base = tmp_path / "base"
    shutil.copytree(base, own_base)
    out = tmp_path / "lora"
    cfg = FinetuneConfig(task="classify", adapt="lora", lora_rank=2)
    finetune(own_base, train_file=DATA / "sentiment_train.csv", out=out, cfg=cfg, overrides=FAST, progress=False)
    pinned = Path(json.loads((out / "finetune.json").read_text(encoding="utf-8"))["base"])
    shutil.rmtree(pinned)  # as the base run's checkpoint.keep prunes it when that run trains on
    with pytest.raises(CheckpointError, match=r"on top of the base checkpoint .* which no longer exists"):
        load_finetuned(out, torch.device("cpu"))


def test_translate_fewshot_and_clm_forgetting(base: Path, tmp_path: Path):
    from lmforge.eval.tasks import evaluate_task

    out = tmp_path / "mt"
    cfg = FinetuneConfig(task="translate", eval_samples=4, max_new_tokens=6)
    result = finetune(
        base, train_file=DATA / "eng_fra.txt", val_file=DATA / "eng_fra.txt", out=out, cfg=cfg, overrides=FAST,
        progress=False,
    )  # fmt: skip
    assert 0.0 <= result["val"]["bleu"] <= 100.0 and 0.0 <= result["val"]["chrf"] <= 100.0
    assert len(result["val"]["samples"]) == 3 and result["val"]["n"] == 4
    # a full-mode LM run is an ordinary run: load_trained-style loading works and it has no finetune head
    assert load_finetuned(out, torch.device("cpu")).model.__class__.__name__ == "GPT"

    m = evaluate_task(
        base, task="classify", data=DATA / "sentiment_val.jsonl", k_shot=2, shots=DATA / "sentiment_train.csv", limit=6
    )
    assert m["k_shot"] == 2 and m["n"] == 6 and 0.0 <= m["accuracy"] <= 1.0

    new, old = tmp_path / "new.txt", tmp_path / "old.txt"
    new.write_text((DATA / "eng_fra.txt").read_text(encoding="utf-8").replace("\t", "\n\n"), encoding="utf-8")
    old.write_text(
        "\n\n".join(json.loads(line)["output"] for line in open(DATA / "alpaca.jsonl", encoding="utf-8")),
        encoding="utf-8",
    )
    cfg = FinetuneConfig(task="clm", old_val=str(old), replay=str(old), replay_fraction=0.5)
    result = finetune(base, train_file=new, val_file=new, out=tmp_path / "clm", cfg=cfg, overrides=FAST, progress=False)
    before, after = result["forgetting"]["before"], result["forgetting"]["after"]
    assert after["new_val_loss"] < before["new_val_loss"]
    assert before["old_val_loss"] > 0 and after["old_val_loss"] > 0


def test_fewshot_orders_numeric_labels_as_a_fine_tune_does(base: Path):
    """k-shot sorted its labels as strings (1, 10, 2: the order of its per-class table and confusion matrix), where a
    fine-tune on the same file orders them 1, 2, 10."""
    from lmforge.eval.tasks import fewshot_classify

    ft = load_finetuned(base, torch.device("cpu"))
    rows = [{"text": f"text {i}", "label": label} for i, label in enumerate([1, 2, 10, 1, 2, 10])]
    report = fewshot_classify(ft, rows[:3], rows, k=1, fields={"text": "text", "label": "label"})
    assert report["labels"] == list(report["per_class"]) == ["1", "2", "10"]


def test_fewshot_demos_are_drawn_per_row_and_never_the_row_itself(base: Path, monkeypatch: pytest.MonkeyPatch):
    """The shots may be the evaluated file: a row's own labelled copy must never be in its prompt."""
    from lmforge.data.tables import read_task_rows
    from lmforge.eval.tasks import fewshot_classify

    ft = load_finetuned(base, torch.device("cpu"))
    fields = {"text": "text", "label": "label"}
    rows = read_task_rows(DATA / "sentiment_val.jsonl", "classify", fields)[:12]
    prompts: list[str] = []
    encode = ft.tokenizer.encode
    monkeypatch.setattr(ft.tokenizer, "encode", lambda text: prompts.append(text) or encode(text))
    k = len(rows) - 1  # every other row: only the row itself is left out
    m = fewshot_classify(ft, rows, rows, k=k, fields=fields, seed=0)
    queries = [p for p in prompts if p.endswith("\nLabel:")]
    assert m["n"] == len(rows) and len(queries) == len(rows)
    for row, prompt in zip(rows, queries, strict=True):
        text = str(row["text"]).strip()
        assert prompt.count(f"Text: {text}\n") == 1 and prompt.count("Text: ") == k + 1
    assert len({p.split("Text: ")[1] for p in queries}) > 1  # demos are drawn per row, not once
    with pytest.raises(DataError, match="only 11 shots differ"):
        fewshot_classify(ft, rows, rows, k=len(rows), fields=fields, seed=0)


def test_fewshot_prompts_start_with_the_tokenizers_bos(base: Path, monkeypatch: pytest.MonkeyPatch):
    """An imported Llama-style tokenizer puts <s> before every text: in-context classification prompts start
    with it, as `generate` and `--task choice` prompts do (the model was pretrained to see it first)."""
    from tokenizers import processors

    import lmforge.eval.tasks as tasks
    from lmforge.data.tables import read_task_rows

    ft = load_finetuned(base, torch.device("cpu"))
    hf = Tokenizer.from_str(ft.tokenizer.to_str()).hf
    bos = hf.token_to_id("<|endoftext|>")
    hf.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    ft.tokenizer = Tokenizer(hf)
    assert ft.tokenizer.prompt_prefix == [bos]
    heads: list[list[int]] = []
    score = tasks.continuation_logprob
    monkeypatch.setattr(tasks, "continuation_logprob", lambda m, head, *a: heads.append(head) or score(m, head, *a))
    fields = {"text": "text", "label": "label"}
    rows = read_task_rows(DATA / "sentiment_val.jsonl", "classify", fields)[:3]
    tasks.fewshot_classify(ft, rows, rows, k=1, fields=fields, seed=0)
    assert heads and all(head[0] == bos and head[1] != bos for head in heads)


def test_fewshot_demonstrations_that_do_not_fit_are_left_out_whole(
    base: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """k demonstrations longer than the context were cut at the prompt's start token by token, so the model read
    half a demonstration first. They are left out whole, the first ones first, and a note counts them; classify
    (labels of one length, 128-character context) and choice (options of different lengths) alike."""
    import lmforge.eval.tasks as tasks
    from lmforge.data.tables import read_task_rows
    from lmforge.eval.choice import choice_metrics

    ft = load_finetuned(base, torch.device("cpu"))
    context = ft.model.cfg.max_seq_len
    scored: list[tuple[list[int], list[int]]] = []
    score = tasks.continuation_logprob
    monkeypatch.setattr(
        tasks, "continuation_logprob", lambda m, head, tail, *a: scored.append((head, tail)) or score(m, head, tail, *a)
    )
    fields = {"text": "text", "label": "label"}
    rows = read_task_rows(DATA / "sentiment_val.jsonl", "classify", fields)[:4]
    tasks.fewshot_classify(ft, rows, rows, k=3, fields=fields, seed=0)
    facts = [(f"What is fact number {i} about the sea?", ["salt", "fresh water", "sand"], i % 3) for i in range(5)]
    choice_metrics(ft, facts, shots=facts, k=3)
    assert len(scored) == 4 * 2 + 5 * 3
    for head, tail in scored:
        text = ft.tokenizer.decode(head)
        assert len(head) + len(tail) <= context + 1, text
        assert text.startswith(("Text: ", "Question: ")), text  # a whole demonstration (or the query) first
    notes = [line for line in capsys.readouterr().err.splitlines() if "left out whole" in line]
    assert len(notes) == 2 and notes[0].startswith("note: ") and "of 12 demonstrations" in notes[0], notes
    assert "of 15 demonstrations" in notes[1], notes


def _with_bos(ft: object) -> tuple[Tokenizer, int]:
    """Give a loaded run the tokenizer an imported Llama-style model has: one whose post-processor puts a BOS
    (here <|endoftext|>) before every text. Returns (tokenizer, bos id)."""
    from tokenizers import processors

    hf = Tokenizer.from_str(ft.tokenizer.to_str()).hf
    bos = hf.token_to_id("<|endoftext|>")
    hf.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    ft.tokenizer = Tokenizer(hf)
    return ft.tokenizer, bos


def test_task_examples_start_with_the_bos_that_inference_puts_first(base: Path, monkeypatch: pytest.MonkeyPatch):
    """An imported Llama-style tokenizer puts <s> before every text, and `generate`/`serve` put it before a
    prompt: every task's training example starts with the very ids inference uses for its prompt (BOS once),
    and `eval` generates qa/translate answers from those same prompts."""
    import lmforge.eval.tasks as tasks
    from lmforge.chat import ChatTemplate
    from lmforge.data.formats import build_examples, classify_frame, translate_prompt
    from lmforge.data.tables import field_map
    from lmforge.generate import prompt_text_ids

    ft = load_finetuned(base, torch.device("cpu"))
    tok, bos = _with_bos(ft)
    assert tok.prompt_prefix == [bos]
    asked: list[list[int]] = []
    monkeypatch.setattr(tasks, "_answers", lambda ft, prompts, n: asked.extend(prompts) or [""] * len(prompts))
    question = [{"role": "user", "content": "Who wrote it?"}]
    cases = {  # task: (row, the prompt's ids as inference builds them)
        "classify": ({"text": "a fine day", "label": "1"}, tok.prompt_prefix + prompt_text_ids(ft, "a fine day")),
        "translate": (
            {"source": "hi", "target": "salut"},
            tok.prompt_prefix + prompt_text_ids(ft, translate_prompt("hi")),
        ),
        "dpo": ({"prompt": "Q: ", "chosen": "yes", "rejected": "no"}, tok.prompt_prefix + prompt_text_ids(ft, "Q: ")),
        "qa": ({"question": "Who wrote it?", "answer": "Cao"}, ChatTemplate().prompt_ids(tok, question, budget=99)[0]),
        "sft": (
            {"instruction": "Who wrote it?", "output": "Cao"},
            ChatTemplate().prompt_ids(tok, question, budget=99)[0],
        ),
    }
    for task, (row, prompt) in cases.items():
        fields = field_map(task, None)
        frame = classify_frame(tok, "gpt") if task == "classify" else None
        (example,) = build_examples(
            [row], task=task, tok=tok, fields=fields, max_len=64, labels=["0", "1"], path="x", frame=frame
        )
        ids = example[0] if task == "classify" else example["chosen"].ids if task == "dpo" else example.ids
        assert prompt[:2] == [bos, prompt[1]] and prompt[1] != bos, task  # BOS first, once
        assert ids[: len(prompt)] == prompt, task
        if task in ("qa", "translate"):
            tasks.task_metrics(ft, [row], path="x", task=task, fields=fields, max_new_tokens=1)
            assert asked.pop() == prompt, task


def test_eval_skips_a_prompt_too_long_to_see_whole(base: Path, capsys: pytest.CaptureFixture[str]):
    """eval --task sft scored an answer to a last message cut to its end (`ChatTemplate.prompt_ids`), and translate
    one to a source cut to its end, without a word, where generate, chat and serve refuse such a prompt. Such rows
    are now skipped and counted in one note (and in the result's skipped_long); none fitting is a one-line error."""
    from lmforge.data.tables import field_map
    from lmforge.eval.tasks import task_metrics

    ft = load_finetuned(base, torch.device("cpu"))
    long = "words and more words " * 10  # (over the 128-token context)
    cases = {
        "sft": [{"instruction": "Hi?", "output": "Hello."}, {"instruction": long, "output": "Words."}],
        "translate": [{"source": "Hi.", "target": "Salut."}, {"source": long, "target": "Des mots."}],
    }
    for task, rows in cases.items():
        m = task_metrics(ft, rows, path="x.jsonl", task=task, fields=field_map(task, None), max_new_tokens=4)
        assert (m["n"], m["skipped_long"]) == (1, 1), task
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("note: x.jsonl: 1 of 2 prompts are longer than the 124 tokens")
        with pytest.raises(DataError, match=r"^x\.jsonl: no prompt fits: the shortest is \d+ tokens and the model's"):
            task_metrics(ft, rows[1:], path="x.jsonl", task=task, fields=field_map(task, None), max_new_tokens=4)


def test_a_prompt_cut_to_fit_keeps_the_tokenizers_bos_first(base: Path, monkeypatch: pytest.MonkeyPatch):
    """A prompt too long for --max-len (or for the context beside an answer) loses its start *after* an imported
    Llama-style tokenizer's BOS, in training examples and in every prompt inference cuts (eval's answers, chat's
    history, scored continuations), so both see the BOS first; cutting from the very start dropped it."""
    import lmforge.generate
    from lmforge.chat import ChatTemplate
    from lmforge.data.formats import build_examples
    from lmforge.data.tables import field_map
    from lmforge.eval.tasks import _answers, continuation_logprob

    ft = load_finetuned(base, torch.device("cpu"))
    tok, bos = _with_bos(ft)
    question = "Summarise: " + "words and more words " * 40 + "in short."
    whole = [
        i
        for ids, _ in ChatTemplate().segments(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
        for i in ids
    ]
    assert whole[0] == bos and len(whole) > 100

    row = {"instruction": question, "output": "Blue."}
    (example,) = build_examples(
        [row], task="sft", tok=tok, fields=field_map("sft", None), max_len=64, labels=None, path="x"
    )
    answer = tok.encode("Blue.") + [tok.eos_id]
    assert example.ids == [bos] + whole[-(64 - len(answer)) :] + answer and sum(example.train) == len(answer)

    prompt, _ = ChatTemplate().prompt_ids(tok, [{"role": "user", "content": question}], budget=50)
    assert prompt == [bos] + whole[-49:]

    asked: list[list[int]] = []
    batch = lmforge.generate.generate_batch
    monkeypatch.setattr(
        lmforge.generate, "generate_batch", lambda m, prompts, **kw: asked.extend(prompts) or batch(m, prompts, **kw)
    )
    _answers(ft, [whole], max_new_tokens=2)
    assert asked == [[bos] + whole[-125:]]

    tail = tok.encode(" yes")
    seq = [bos] + (whole + tail)[-32:]  # the context (32) + 1 tokens, BOS first
    with torch.no_grad():
        logp = torch.log_softmax(ft.model(torch.tensor([seq[:-1]])), -1)[0, -len(tail) :]
    expected = float(logp.gather(-1, torch.tensor(tail)[:, None]).sum())
    assert continuation_logprob(ft.model, whole, tail, 32, tok.prompt_prefix) == pytest.approx(expected, abs=1e-5)


def test_augmentation_is_seeded():
    import random

    from lmforge.data.formats import augment_text

    text = "the food was great and the staff were friendly"
    a = [augment_text(text, random.Random(3)) for _ in range(2)]
    assert a[0] == a[1] and a[0] != text
    assert augment_text(text, random.Random(4)) != a[0] or augment_text(text, random.Random(5)) != a[0]
    chinese = "房间很干净，服务也很好，下次还会再来。"  # no spaces: each character is a word (it came back unchanged)
    changed = augment_text(chinese, random.Random(0))
    assert changed != chinese and " " not in changed and set(changed) <= set(chinese)


def test_augmentation_of_chinese_with_spaces_changes_characters_not_phrases():
    """A Chinese review with a space in it ("味道很好 送餐很快 ...", common in online reviews) was cut at the
    spaces into a few phrases, so one edit deleted, doubled or moved a whole phrase (a third of the review)
    instead of about 10% of its characters; each character is a word there, the spaces kept where they are."""
    import collections
    import random

    from lmforge.data.formats import augment_text

    review = "味道很好 送餐很快 服务也不错 下次还点"
    letters = collections.Counter(review.replace(" ", ""))
    for seed in range(12):
        changed = augment_text(review, random.Random(seed))
        got = collections.Counter(changed.replace(" ", ""))
        assert (got - letters).total() + (letters - got).total() <= 1, (seed, changed)  # one character at most
        assert changed.count(" ") == 3 and "  " not in changed, (seed, changed)


def test_a_dotted_field_reads_nested_lists_one_row_per_item(tmp_path: Path):
    """Self-Instruct's seed tasks keep their answers in `instances`, a list of {input, output}: `--field
    output=instances.output` reads each item as its own row (other columns repeated), as `prepare
    --text-field` walks a list of objects; before, the file needed a conversion script."""
    from lmforge.data.tables import field_map, read_task_rows

    rows = [json.loads(line) for line in (DATA / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    tasks = [  # the seed file's layout: the first task with two instances, one of them without an input
        {"id": "t0", "instruction": rows[0]["instruction"], "tags": [{"name": "food"}], "instances": [
            {"input": rows[0]["input"], "output": rows[0]["output"]}, {"output": rows[1]["output"]}]},
        {"id": "t1", "instruction": rows[2]["instruction"], "instances": [
            {"input": rows[2]["input"], "output": rows[2]["output"]}]},
    ]  # fmt: skip
    path = tmp_path / "seed_tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
    fields = field_map("sft", ["input=instances.input", "output=instances.output"])
    got = read_task_rows(path, "sft", fields)
    pairs = [(r["instruction"], r.get("instances.input"), r["instances.output"]) for r in got]
    assert pairs == [
        (rows[0]["instruction"], rows[0]["input"], rows[0]["output"]),
        (rows[0]["instruction"], None, rows[1]["output"]),
        (rows[2]["instruction"], rows[2]["input"], rows[2]["output"]),
    ]
    with pytest.raises(
        DataError, match=r"holds a JSON list.* dotted --field NAME=instances.KEY \(keys: input, output\)"
    ):
        read_task_rows(path, "sft", field_map("sft", ["output=instances"]))  # the error says how to reach in
    with pytest.raises(DataError, match=r"row 1: the --field paths .* walk different lists"):
        read_task_rows(path, "qa", field_map("qa", ["question=instances.input", "answer=tags.name"]))
    path.write_text(json.dumps({"instruction": "x", "instances": ["a plain string"]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1: 'instances' holds str values, not objects with keys for "
                       r"instances.input, instances.output; point --field NAME=COLUMN at the text$"):  # fmt: skip
        read_task_rows(path, "sft", fields)


def test_a_dotted_field_no_row_has_is_an_error_naming_where_its_path_ends(tmp_path: Path):
    """A dotted --field that is in no row is a typo: `--field input=instances.inptu` trained an sft model without
    its inputs, silently (a key missing from some items stays allowed: sft's input is optional). Now a one-line
    error names the row, where the path ends and the keys there; a required column's typo says the same."""
    from lmforge.data.tables import field_map, read_task_rows

    tasks = [{"instruction": "say hi", "instances": [{"input": "", "output": "hi"}, {"output": "hello"}]}]
    path = tmp_path / "seed_tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
    good = field_map("sft", ["input=instances.input", "output=instances.output"])
    assert [r.get("instances.input") for r in read_task_rows(path, "sft", good)] == ["", None]
    for typo, end in [
        ("input=instances.inptu", "inptu' at 'instances\\[0\\]'"),
        ("output=instance.output", "instance'"),
    ]:
        fields = field_map("sft", [typo, "output=instances.output" if "input" in typo else "input=instances.input"])
        with pytest.raises(DataError, match=rf"seed_tasks.jsonl: row 1: no field '{end} \(found: .*\); no row has"):
            read_task_rows(path, "sft", fields)


def test_task_files_split_rows_on_newlines_only(tmp_path: Path):
    """json.dumps(ensure_ascii=False) leaves U+2028 unescaped; splitlines() cut such a JSONL row in two."""
    from lmforge.data.tables import read_task_rows

    rows = [{"instruction": "问", "output": "第一段。\u2028第二段。\u0085完"}] * 3
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    fields = {"messages": "messages", "instruction": "instruction", "input": "input", "output": "output"}
    assert read_task_rows(jsonl, "sft", fields) == rows
    txt = tmp_path / "x.txt"
    txt.write_text("房间很好\u2028很干净\t1\r\n差\t0\n", encoding="utf-8")
    got = read_task_rows(txt, "classify", {"text": "text", "label": "label"})
    assert got == [{"text": "房间很好\u2028很干净", "label": "1"}, {"text": "差", "label": "0"}]


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_task_files_read_unix_windows_and_old_mac_line_ends_alike(end: str, tmp_path: Path):
    """As `prepare`: a row of a .txt/.csv/.tsv task file ends at "\\n", "\\r\\n" or a lone "\\r" (before, an
    old-Mac .txt was one row and a .csv/.tsv failed with csv's "new-line character seen in unquoted field");
    a clm .txt's documents end at a line of only whitespace, whatever the line ends, and lose a BOM."""
    from lmforge.data.tables import read_task_rows

    fields = {"source": "source", "target": "target"}
    pairs = [{"source": "hello", "target": "bonjour"}, {"source": "cat", "target": "chat"}]
    files = {
        "t.txt": f"hello\tbonjour{end}cat\tchat{end}",
        "t.tsv": f"source\ttarget{end}hello\tbonjour{end}cat\tchat{end}",
        "t.csv": f"source,target{end}hello,bonjour{end}cat,chat{end}",
    }
    for name, text in files.items():
        (tmp_path / name).write_bytes(text.encode("utf-8"))
        assert read_task_rows(tmp_path / name, "translate", fields) == pairs, name
    quoted = tmp_path / "quoted.csv"  # a line end inside a quoted field is text, kept as written
    quoted.write_bytes(f'source,target{end}"two{end}lines",deux{end}'.encode())
    assert read_task_rows(quoted, "translate", fields) == [{"source": f"two{end}lines", "target": "deux"}]
    clm = tmp_path / "clm.txt"
    clm.write_bytes(f"\ufeffone{end}still one{end}{end}two{end} \t{end}three{end}\u3000{end}{end}".encode())
    got = read_task_rows(clm, "clm", {"text": "text"})
    assert got == [{"text": "one\nstill one"}, {"text": "two"}, {"text": "three"}]


@pytest.mark.parametrize("model", [{}, {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"}])
def test_packing_keeps_examples_apart(model: dict, tmp_path: Path):
    from lmforge.adapt.heads import packed_logits
    from lmforge.adapt.objectives import PackedCausalLM
    from lmforge.data.formats import build_examples, lm_batch, pack_examples, packed_batch
    from lmforge.data.tables import field_map, read_task_rows
    from lmforge.objectives import CausalLM
    from lmforge.trained import load_trained

    base = make_base(tmp_path, **model)
    trained = load_trained(base, torch.device("cpu"))
    fields = field_map("translate", None)
    rows = read_task_rows(DATA / "eng_fra.txt", "translate", fields)[:10]
    examples = build_examples(
        rows, task="translate", tok=trained.tokenizer, fields=fields, max_len=128, labels=None, path="eng_fra"
    )
    packed = pack_examples(examples, 128)
    assert len(packed) < len(examples) and sum(len(r) for r in packed) == len(examples)
    batch = packed_batch(packed, trained.tokenizer.eos_id)
    x, y, positions, segments = batch
    with torch.no_grad():
        logits = packed_logits(trained.model, x, positions, segments)
        for b, row in enumerate(packed):
            start = 0
            for e in row:
                alone_x, _ = lm_batch([e], trained.tokenizer.eos_id)
                n = alone_x.shape[1]
                alone = trained.model(alone_x)[0]  # the example on its own
                torch.testing.assert_close(logits[b, start : start + n], alone, atol=1e-4, rtol=1e-4)
                start += n
        separate = sum(float(CausalLM().loss(trained.model, lm_batch([e], 0))) for e in examples)
        assert float(PackedCausalLM().loss(trained.model, batch)) == pytest.approx(separate, rel=1e-4)
    cfg = FinetuneConfig(task="translate", pack=True, eval_samples=1, max_new_tokens=2)
    result = finetune(base, train_file=DATA / "eng_fra.txt", out=tmp_path / "packed", cfg=cfg, overrides=FAST,
                      progress=False)  # fmt: skip
    assert result["steps"] == FAST["train"]["max_steps"]


def test_task_file_errors_say_what_is_wrong(tmp_path: Path):
    from lmforge.data.tables import field_map, read_task_rows

    fields = field_map("classify", None)
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": null}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2 has no value in column 'label'"):
        read_task_rows(nulls, "classify", fields)
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text('text,label\n"never closed,1\nb,0\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"unclosed\.csv:2: .*quote opened"):
        read_task_rows(unclosed, "classify", fields)
    with pytest.raises(DataError, match="is a directory"):
        read_task_rows(tmp_path, "classify", fields)
    with pytest.raises(DataError, match="not found"):
        read_task_rows(tmp_path / "missing.csv", "classify", fields)
    # a headerless .txt: its columns are the task's fields in order, and --field picks among them, so
    # the Tatoeba pairs translate the other way round (they were silently left as they were)
    swapped = field_map("translate", ["source=target", "target=source"])
    forward = read_task_rows(DATA / "eng_fra.txt", "translate", field_map("translate", None))
    backward = read_task_rows(DATA / "eng_fra.txt", "translate", swapped)
    assert [r[swapped["source"]] for r in backward[:5]] == [r["target"] for r in forward[:5]]
    assert [r[swapped["target"]] for r in backward[:5]] == [r["source"] for r in forward[:5]]
    with pytest.raises(DataError, match="review"):  # a name no .txt column has
        read_task_rows(DATA / "eng_fra.txt", "translate", field_map("translate", ["source=review"]))


def test_a_headerless_table_is_told_how_to_give_it_columns(tmp_path: Path):
    """A headerless .tsv of pairs (Tatoeba's, Moses') lost its first pair as the header and was told only to
    rename with --field source=COLUMN, which reads the file one pair short; the error now says how to name them."""
    from lmforge.data.tables import field_map, read_task_rows

    pairs = (DATA / "eng_fra.txt").read_text(encoding="utf-8")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text(pairs, encoding="utf-8")
    hint = (
        r"pairs\.tsv: row 1 has no column 'source' \(columns: .*\); rename with --field source=COLUMN; if the file has "
        r"no header row, add the line source<TAB>target at its top, or name it \.txt \(columns source, target in that "
        r"order\)$"
    )
    with pytest.raises(DataError, match=hint):
        read_task_rows(tsv, "translate", field_map("translate", None))
    tsv.write_text("source\ttarget\n" + pairs, encoding="utf-8")  # the first advice, taken
    assert read_task_rows(tsv, "translate", field_map("translate", None)) == read_task_rows(
        DATA / "eng_fra.txt", "translate", field_map("translate", None)
    )
    csv_file = tmp_path / "reviews.csv"
    csv_file.write_text("很好吃,1\n太难吃了,0\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"add the line review,label at its top, or name it \.txt \(columns text, label"
    ):
        read_task_rows(csv_file, "classify", field_map("classify", ["text=review"]))


def test_a_header_without_the_label_column_is_not_told_it_has_no_header(base: Path, tmp_path: Path):
    """A one-column CSV for classify (header `review`, no labels) was told the headerless hint, "add the line
    review,label at its top"; it has a header, it lacks a label column, and the error now says so."""
    from lmforge.data.tables import field_map, read_task_rows

    one = tmp_path / "reviews.csv"
    one.write_text("review\ngreat food\nawful service\n", encoding="utf-8")
    with pytest.raises(DataError) as raised:
        read_task_rows(one, "classify", field_map("classify", ["text=review"]))
    assert str(raised.value) == (
        f"{one}: its header row (review) has no column 'label' for --task classify; add one, or name the column "
        "that holds the label with --field label=COLUMN"
    )
    both = tmp_path / "text.csv"  # a header naming one of the task's columns, the other missing
    both.write_text("text,stars\ngreat food,5\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"its header row \(text, stars\) has no column 'label'.*--field label=COLUMN$"):
        read_task_rows(both, "classify", field_map("classify", None))
    # headerless DPO pairs without the optional prompt were told to add "prompt,chosen,rejected" (a header one
    # column wider than the file) or to name it .txt (which reads its two columns as prompt, chosen): now the
    # header its two columns are, and taking that advice reads it
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a kind answer,a rude answer\nyes,no\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"if the file has no header row, add the line chosen,rejected at its top$"):
        read_task_rows(pairs, "dpo", field_map("dpo", None))
    pairs.write_text("chosen,rejected\na kind answer,a rude answer\nyes,no\n", encoding="utf-8")
    assert read_task_rows(pairs, "dpo", field_map("dpo", None))[1] == {"chosen": "yes", "rejected": "no"}
    triples = tmp_path / "triples.csv"  # with the prompt: all three, and .txt reads them in that order
    triples.write_text("Be kind.,a kind answer,a rude answer\nSay no.,no,yes\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"add the line prompt,chosen,rejected at its top, or name it \.txt \(columns"):
        read_task_rows(triples, "dpo", field_map("dpo", None))
    r = run_cli("finetune", str(base), "--task", "classify", "--train", str(one), "--out", str(tmp_path / "never"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "its header row (review) has no column 'text'" in r.stderr and "at its top" not in r.stderr


def test_a_conversation_column_is_told_to_be_the_messages(tmp_path: Path):
    """An sft file whose chat is in another column (ShareGPT's 'conversations') was told to rename it with
    --field instruction=COLUMN; the column holding a list of message objects is named as the messages."""
    from lmforge.data.tables import field_map, read_task_rows

    chat = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    chat.write_text(json.dumps({"id": 1, "conversations": turns}, ensure_ascii=False) + "\n", encoding="utf-8")
    told = r"has neither 'messages' nor 'instruction' .*; rename with --field messages=conversations$"
    with pytest.raises(DataError, match=told):
        read_task_rows(chat, "sft", field_map("sft", None))
    rows = read_task_rows(chat, "sft", field_map("sft", ["messages=conversations"]))  # the advice, taken
    assert rows[0]["conversations"] == turns
    plain = tmp_path / "plain.jsonl"  # no such column: the instruction is what is missing
    plain.write_text(json.dumps({"prompt": "hi", "output": "yo"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rename with --field instruction=COLUMN$"):
        read_task_rows(plain, "sft", field_map("sft", None))


def test_report_table_lines_up_with_chinese_labels():
    from lmforge.eval.classify import classification_report, format_report
    from lmforge.log import display_width

    lines = format_report(classification_report([0, 1, 1, 0], [0, 1, 0, 0], ["正面", "负面"])).splitlines()
    table = lines[2:5]  # header and one row per class: the same terminal width (a CJK character is 2 columns)
    assert len({display_width(line) for line in table}) == 1
    confusion = lines[-3:]
    assert len({display_width(line) for line in confusion}) == 1


def test_confusion_png_says_when_chinese_labels_cannot_be_drawn(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    import lmforge.plotting
    from lmforge.eval.classify import classification_report, plot_confusion

    monkeypatch.setattr(lmforge.plotting, "_noted", False)  # (an earlier test in this process may have said it)

    report = classification_report([0, 1, 1, 0], [0, 1, 0, 0], ["正面", "负面"])
    assert plot_confusion(report, tmp_path / "c.png").stat().st_size > 1000
    note = "no CJK font is installed" in capsys.readouterr().err
    assert note == (lmforge.plotting._cjk_font is None)  # said once, and only where boxes would be drawn
    plot_confusion(report, tmp_path / "d.png")
    assert "no CJK font" not in capsys.readouterr().err


def test_confusion_png_of_many_classes_stays_a_readable_size(tmp_path: Path):
    """40 classes drew a 26-inch figure with 1,600 cell counts; 150 (CLINC150's intents) a 92-inch one with 22,500,
    192 s at the end of a fine-tune for a 3.3 MB PNG. Past 30 classes the figure stops growing and cells are
    colour only, with a colour bar; a small matrix is drawn as before. The printed report leaves such a matrix out."""
    import struct

    from lmforge.eval.classify import MAX_ANNOTATED, classification_report, format_report, plot_confusion

    def pixels(png: Path) -> tuple[int, int]:
        return struct.unpack(">II", png.read_bytes()[16:24])  # (the IHDR chunk: width, height)

    k = 40
    report = classification_report(list(range(k)), [(i * 7) % k for i in range(k)], [f"intent_{i}" for i in range(k)])
    width, height = pixels(plot_confusion(report, tmp_path / "many.png"))
    limit = 100 * (0.6 * MAX_ANNOTATED + 2) * 1.1  # (dpi 100; the colour bar and tight bbox add a little)
    assert width <= limit and height <= limit, (width, height)
    few = classification_report([0, 1, 2], [0, 2, 2], ["a", "b", "c"])
    assert max(pixels(plot_confusion(few, tmp_path / "few.png"))) < 500
    # printed: the per-class table, and the matrix only where a terminal can show it (40 lines of 480 characters)
    printed = format_report(report).splitlines()
    assert len(printed) == 3 + k + 2 and max(map(len, printed)) < 100
    assert printed[-1] == "confusion matrix of 40 classes: too wide to print; it is 'confusion' in --json / eval.json"
    assert format_report(few).splitlines()[-4:] == [
        "                 a         b         c",
        "a                1         0         0",
        "b                0         0         1",
        "c                0         0         1",
    ]


def test_sft_null_instruction_or_output_is_an_error(tmp_path: Path):
    """A JSON null under instruction/output was trained on as the text "None" (str(None)); `input` may be null."""
    from lmforge.data.tables import read_task_rows

    fields = {"messages": "messages", "instruction": "instruction", "input": "input", "output": "output"}
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"instruction": "hi", "input": None, "output": "hello"}) + "\n", encoding="utf-8")
    assert read_task_rows(ok, "sft", fields)[0]["output"] == "hello"
    for name in ("instruction", "output"):
        row = {"instruction": "hi", "output": "hello", name: None}
        bad = tmp_path / f"null_{name}.jsonl"
        bad.write_text(
            json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps(row) + "\n", encoding="utf-8"
        )
        with pytest.raises(DataError, match=f"row 2 has no value in column '{name}'"):
            read_task_rows(bad, "sft", fields)


def test_an_empty_reference_is_an_error_where_it_is_scored(base: Path, tmp_path: Path):
    """An empty qa answer scored exact match and F1 1.0 against an empty prediction (and sft outputs, translate
    targets and a final assistant message likewise): refused in files whose answers are scored (eval --task, a
    fine-tune's --val), as classify refuses an empty label. A training file's rows are read (sft's empty answers
    are then skipped with a note: `test_sft_rows_with_an_empty_answer_are_skipped_with_a_note`)."""
    from lmforge.data.tables import field_map, read_task_rows

    files = {
        "qa.csv": (
            "qa",
            "question,answer\nwhat,\nwho,me\n",
            r"row 1 has an empty 'answer', which would score an empty answer as perfect; write the reference answer",
        ),
        "mt.tsv": ("translate", "source\ttarget\nhello\tbonjour\ncat\t \n", r"row 2 has an empty 'target'"),
        "mt.txt": ("translate", "hello\tbonjour\ncat\t\n", r"row 2 has an empty 'target'"),
        "sft.jsonl": (
            "sft",
            json.dumps({"instruction": "a", "output": ""}) + "\n" + json.dumps({"instruction": "b", "output": ""}),
            r"row 1 has an empty 'output' \(2 rows have one\), which would score",
        ),
        "chat.jsonl": (
            "sft",
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}),
            r"row 1 has an empty last assistant message in 'messages'",
        ),
    }
    for name, (task, text, said) in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=said):
            read_task_rows(tmp_path / name, task, field_map(task, None), scored=True)
        assert len(read_task_rows(tmp_path / name, task, field_map(task, None))) >= 1  # to train on: kept
    r = run_cli("eval", str(base), "--task", "qa", "--data", str(tmp_path / "qa.csv"))
    assert r.returncode == 2 and "row 1 has an empty 'answer'" in r.stderr and len(r.stderr.splitlines()) == 1
    (tmp_path / "good.csv").write_text("question,answer\nwho,me\nwhat,it\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"qa\.csv: row 1 has an empty 'answer'"):
        finetune(base, train_file=tmp_path / "good.csv", val_file=tmp_path / "qa.csv", out=tmp_path / "ft",
                 cfg=FinetuneConfig(task="qa"))  # fmt: skip
    assert not (tmp_path / "ft").exists()


def test_a_scored_conversation_must_end_with_the_reply(base: Path, tmp_path: Path):
    """A --val conversation ending with a user turn failed the run only after training (at the final scoring,
    status 'failed', no eval.json), and `eval` on a `messages` string stopped with a TypeError traceback: both are
    now one-line errors naming the row when the file is read, before anything runs."""
    from lmforge.data.tables import field_map, read_task_rows

    hello = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    trailing = {"messages": [*hello["messages"], {"role": "user", "content": "and?"}]}
    said = {
        "trailing.jsonl": (trailing, r"row 2: the conversation ends with a user turn; .* add it or drop the row"),
        "string.jsonl": (
            {"messages": "hi there"},
            r"row 2: column 'messages' holds text, not a list of \{role, content\}",
        ),
        "role.jsonl": ({"messages": [{"role": "tool", "content": "x"}]}, r"row 2: bad message"),
    }
    for name, (row, message) in said.items():
        path = tmp_path / name
        path.write_text(json.dumps(hello) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=message):
            read_task_rows(path, "sft", field_map("sft", None), scored=True)
        r = run_cli("eval", str(base), "--task", "sft", "--data", str(path))
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and name in r.stderr, r.stderr
    assert len(read_task_rows(tmp_path / "trailing.jsonl", "sft", field_map("sft", None))) == 2  # trains as before
    with pytest.raises(DataError, match="ends with a user turn"):
        finetune(base, train_file=DATA / "alpaca.jsonl", val_file=tmp_path / "trailing.jsonl", out=tmp_path / "ft",
                 cfg=FinetuneConfig(task="sft"), overrides=FAST, progress=False)  # fmt: skip
    assert not (tmp_path / "ft").exists()


def test_task_files_in_parquet(base: Path, tmp_path: Path):
    """A Hugging Face dataset's Parquet data file is a task file as its JSONL would be (it was refused as
    'a binary file'): the same rows, lists (chat messages) kept, and a fine-tune and eval run on it."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from lmforge.data.tables import field_map, read_task_rows

    rows = [json.loads(line) for line in (DATA / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alpaca.parquet")
    fields = field_map("sft", None)
    assert read_task_rows(tmp_path / "alpaca.parquet", "sft", fields) == read_task_rows(
        DATA / "alpaca.jsonl", "sft", fields
    )
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "chat.parquet")
    assert read_task_rows(tmp_path / "chat.parquet", "sft", fields) == chat
    out = tmp_path / "ft"
    finetune(base, train_file=tmp_path / "alpaca.parquet", out=out, cfg=FinetuneConfig(task="sft"), overrides=FAST,
             progress=False)  # fmt: skip
    r = run_cli("eval", str(out), "--task", "sft", "--data", str(tmp_path / "alpaca.parquet"), "--limit", "2")
    assert r.returncode == 0, r.stderr
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        read_task_rows(tmp_path / "bad.parquet", "sft", fields)


def test_task_file_with_a_nul_byte_is_refused_as_prepare_refuses_it(tmp_path: Path):
    from lmforge.data.tables import read_table

    head = tmp_path / "head.csv"  # a NUL near the start: named by its line too (it was "looks like a binary file")
    head.write_bytes(b"text,label\ngood movie,1\nbad\x00 movie,0\n")
    with pytest.raises(DataError, match=r"head.csv:3: holds a NUL byte"):
        read_table(head)
    deep = tmp_path / "deep.csv"  # past the part prepare sniffs: named by its line
    deep.write_bytes(b"text,label\n" + b"a fine film,1\n" * 1000 + b"bad\x00 movie,0\n")
    with pytest.raises(DataError, match=r"deep.csv:1002: holds a NUL byte.*remove it or re-export the file$"):
        read_table(deep)
    deep.write_bytes(b"text,label\n" + b"a fine film,1\n" * 1000 + b"bad movie,0\n")
    assert len(read_table(deep)) == 1001


def test_csv_and_tsv_rows_past_their_header_and_long_fields(tmp_path: Path):
    """A row with more fields than the header crashed `finetune` with a TypeError (the extras sat under the key
    None, which its hash of the rows cannot sort); a text over the csv module's 128 KiB field limit was "not valid
    CSV". Now: an extra field is a one-line error naming the line, a blank one (trailing delimiter) is dropped."""
    from lmforge.data.tables import read_table

    for name, sep in (("rows.csv", ","), ("rows.tsv", "\t")):
        path = tmp_path / name
        path.write_text(f"text{sep}label\ngood{sep}1\nbad movie{sep}0{sep}oops\n", encoding="utf-8")
        with pytest.raises(DataError, match=rf"{name}:3: row has 3 fields but the header has 2; .*quote fields"):
            read_table(path)
        path.write_text(f"text{sep}label\ngood{sep}1{sep}\n{'x' * 200_000}{sep}0{sep}\n", encoding="utf-8")
        assert read_table(path) == [{"text": "good", "label": "1"}, {"text": "x" * 200_000, "label": "0"}]


def test_translate_scores_an_nfkc_models_references_in_its_form(tmp_path: Path):
    """A model prepared with --normalize NFKC trains on targets whose ，！ became , ! and writes those: its
    exact translations scored BLEU 16 here against the raw references' full-width marks."""
    from lmforge.eval.tasks import evaluate_task, format_metrics
    from lmforge.tokenizer.train import with_nfkc

    pairs = [("hi", "你好，世界！"), ("bye", "再见，朋友！")]
    data = tmp_path / "en_zh.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs), encoding="utf-8")
    tok = with_nfkc(train_char(["hi bye 你好,世界!再见,朋友! <src> <tgt>"]))
    base = make_base(tmp_path, max_seq_len=32, tok=tok)
    overrides = {"train": {"max_steps": 60, "batch_size": 4, "lr": 1e-2, "warmup_steps": 5}}
    cfg = FinetuneConfig(task="translate", max_new_tokens=8)
    finetune(base, train_file=data, out=tmp_path / "mt", cfg=cfg, overrides=overrides, progress=False)
    m = evaluate_task(tmp_path / "mt", task="translate", data=data, max_new_tokens=8)
    assert [s["prediction"] for s in m["samples"]] == ["你好,世界!", "再见,朋友!"]  # learned exactly, NFKC
    assert m["bleu"] == pytest.approx(100.0) and m["chrf"] == pytest.approx(100.0)
    assert m["bleu_tokenize"] == "zh" and "| BLEU tokenize zh" in format_metrics(m).splitlines()[0]


def test_clm_task_bpb_counts_the_text_an_nfkc_tokenizer_reads(tmp_path: Path):
    """`eval --task clm FILE` and `eval` on the same text prepared with --normalize NFKC score the same tokens;
    the task counted the file's raw bytes (each ，！ 3 bytes where the model reads a 1-byte , !), so the same
    model on the same text got a bpb 14% lower here than on the prepared split."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.eval.lm import evaluate_checkpoint
    from lmforge.eval.tasks import evaluate_task
    from lmforge.tokenizer.train import with_nfkc

    tok = with_nfkc(train_char(["你好,世界!再见,朋友!我们明天见。"]))
    base = make_base(tmp_path, max_seq_len=16, tok=tok)
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("我们明天见。\n", encoding="utf-8")
    val.write_text("你好，世界！\n\n再见，朋友！我们明天见。\n", encoding="utf-8")
    cfg = PrepareConfig(
        inputs=[str(train)], val_input=[str(val)], tokenizer=str(base / "tokenizer.json"), normalize="NFKC",
        out=str(tmp_path / "data"),
    )  # fmt: skip
    prepare(cfg, progress=False)
    split = evaluate_checkpoint(str(base), data_dir=str(tmp_path / "data"), split="val", device="cpu")
    task = evaluate_task(base, task="clm", data=val, device="cpu")
    assert task["loss"] == pytest.approx(split["loss"]) and task["tokens"] == split["tokens"]
    assert task["bytes"] == split["bytes"] and task["bpb"] == pytest.approx(split["bpb"])


def test_clm_task_cleans_text_as_the_runs_data_was_prepared(tmp_path: Path, capsys: pytest.CaptureFixture):
    """`eval --task clm valid.txt` on the file a run's val split was prepared from gives the split's (its logged)
    numbers: the text is cleaned, filtered and deduplicated by the settings of the run's data manifest, in windows
    of its data.seq_len. Scored raw, control characters, a decomposed é and a repeated paragraph were 11 tokens
    the split never held (56 vs 45), in windows of the model's context rather than of its data.seq_len."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.eval.lm import evaluate_checkpoint
    from lmforge.eval.tasks import evaluate_task

    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("the cat sat on the mat\n", encoding="utf-8")
    val.write_text(
        "\ufeffthe cafe\u0301 sat\x07 on\r\nthe mat\r\n\r\nNurse:\r\n\r\nthe dog\x1b[0m ran\r\n\r\nNurse:\r\n",
        encoding="utf-8",
        newline="",
    )
    tok = train_char(["the cat sat on the mat caf\u00e9 dog ran Nurse:"])
    tok.save(tmp_path / "tokenizer.json")
    cfg = PrepareConfig(
        inputs=[str(train)], val_input=[str(val)], tokenizer=str(tmp_path / "tokenizer.json"),
        out=str(tmp_path / "data"), card=False,
    )  # fmt: skip
    prepare(cfg, progress=False)
    base = make_base(tmp_path, max_seq_len=16, tok=tok, data=DataConfig(dir=str(tmp_path / "data"), seq_len=8))
    split = evaluate_checkpoint(str(base), split="val", device="cpu")  # the data the run names
    capsys.readouterr()
    task = evaluate_task(base, task="clm", data=val, device="cpu")
    assert (task["tokens"], task["bytes"]) == (split["tokens"], split["bytes"])
    assert task["loss"] == pytest.approx(split["loss"], abs=1e-6) and task["bpb"] == pytest.approx(split["bpb"])
    assert "1 of 4 documents left out as prepare left them out" in capsys.readouterr().err
    (tmp_path / "data").rename(tmp_path / "moved")  # without its data folder: scored raw, and said so
    raw = evaluate_task(base, task="clm", data=val, device="cpu")
    assert raw["tokens"] > split["tokens"] and "(the run's prepared data) is gone" in capsys.readouterr().err


# One document per cleaning setting, each changed or removed by it alone (and one the defaults keep as it is).
_CLEANING_TEXT = (
    "the cat sat on the mat and looked at the dog\n\n"
    "ｆｕｌｌ width ｔｅｘｔ here\n\n"  # normalize NFKC
    "spaces   and\ttabs    here\n\n"  # normalize_whitespace
    "a real line\nAll rights reserved.\n\n"  # boilerplate
    "short\n\n"  # min_chars
    "a rather long paragraph that goes on and on for well over sixty characters in all\n\n"  # max_chars
    "abcabcabcabcabcabcabcabcabcabcabcabc\n\n"  # max_char_repetition
    "same line\nsame line\nsame line\nother\n\n"  # max_line_repetition
    "12345 67890 !!! ??? 1234\n\n"  # min_alpha_ratio
    "这是一个中文段落，没有英文。\n"  # languages
)
_CLEANING_SETTINGS = {
    "normalize": "NFKC", "normalize_whitespace": True, "boilerplate": True, "min_chars": 8, "max_chars": 60,
    "max_char_repetition": 0.5, "max_line_repetition": 0.3, "min_alpha_ratio": 0.5, "languages": "en",
}  # fmt: skip


def test_clm_task_cleans_by_each_setting_as_prepare_did(tmp_path: Path):
    """`prepare` and `eval --task clm` build their cleaner from the same settings by one function (there were two
    mappings): each cleaning setting (every one `DocumentCleaner.from_settings` reads) changes the prepared val
    split, and `eval --task clm` makes of the val file exactly the documents that split holds, setting by setting."""
    from lmforge.data.filters import CLEANING_SETTINGS
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.data.tables import read_task_rows
    from lmforge.eval.tasks import clm_text_as_trained
    from tests.test_data_prepare import docs_by_split

    assert set(_CLEANING_SETTINGS) == set(CLEANING_SETTINGS)  # a new setting needs its document above
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("the cat sat on the mat\n", encoding="utf-8")
    val.write_text(_CLEANING_TEXT, encoding="utf-8")
    tok = train_char([_CLEANING_TEXT, unicodedata.normalize("NFKC", _CLEANING_TEXT)])
    tok.save(tmp_path / "tokenizer.json")
    data = tmp_path / "data"
    base = make_base(tmp_path, max_seq_len=32, tok=tok, data=DataConfig(dir=str(data), seq_len=32))
    ft = load_finetuned(base, torch.device("cpu"))
    texts = [row["text"] for row in read_task_rows(val, "clm", {"text": "text"})]  # (as evaluate_task reads it)
    common = {"inputs": [str(train)], "val_input": [str(val)], "tokenizer": str(tmp_path / "tokenizer.json")}
    default = None
    for name, value in [("min_chars", 1), *_CLEANING_SETTINGS.items()]:  # (min_chars 1: the defaults)
        prepare(PrepareConfig(**common, out=str(data), card=False, overwrite=True, **{name: value}), progress=False)
        split = docs_by_split(data)["val"]
        default = default or split
        assert (name, value) == ("min_chars", 1) or split != default, f"{name} changed nothing"
        with contextlib.redirect_stderr(io.StringIO()):  # (its note on the documents left out)
            assert clm_text_as_trained(ft, texts, val)[0] == split, name


def test_clm_task_cleans_a_merged_folders_text_as_its_parts_were(tmp_path: Path, capsys: pytest.CaptureFixture):
    """A `prepare --merge`d folder's manifest config is the merge's own (cleaning flags are refused with --merge),
    so `eval --task clm` cleaned a run's val file with the defaults, not as its parts were prepared: 5,770 tokens
    where the split held 3,979 with --normalize-whitespace parts. The merge records the settings its parts share;
    parts cleaned differently are said in a note and the file is scored as it is."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.eval.lm import evaluate_checkpoint
    from lmforge.eval.tasks import evaluate_task

    a, b, val = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "val.txt"
    a.write_text("the cat sat on the mat\n", encoding="utf-8")
    b.write_text("the dog ran\n", encoding="utf-8")
    val.write_text("the  cat\t sat   on\n\nthe dog    ran  \n", encoding="utf-8")
    tok = train_char(["the cat sat on the mat dog ran \t"])
    tok.save(tmp_path / "tokenizer.json")
    common = {"tokenizer": str(tmp_path / "tokenizer.json"), "card": False}
    prepare(PrepareConfig(inputs=[str(a)], val_input=[str(val)], out=str(tmp_path / "pa"), normalize_whitespace=True,
                          **common), progress=False)  # fmt: skip
    prepare(
        PrepareConfig(inputs=[str(b)], out=str(tmp_path / "pb"), normalize_whitespace=True, **common), progress=False
    )
    prepare(PrepareConfig(inputs=[str(b)], out=str(tmp_path / "pc"), **common), progress=False)
    merged = tmp_path / "merged"
    m = prepare(PrepareConfig(inputs=[str(tmp_path / "pa"), str(tmp_path / "pb")], out=str(merged), merge=True,
                              card=False), progress=False)  # fmt: skip
    assert m["part_cleaning"]["normalize_whitespace"] is True
    base = make_base(tmp_path, max_seq_len=16, tok=tok, data=DataConfig(dir=str(merged), seq_len=8))
    split = evaluate_checkpoint(str(base), split="val", device="cpu")
    task = evaluate_task(base, task="clm", data=val, device="cpu")
    assert (task["tokens"], task["bytes"]) == (split["tokens"], split["bytes"])
    prepare(PrepareConfig(inputs=[str(tmp_path / "pa"), str(tmp_path / "pc")], out=str(merged), merge=True,
                          card=False, overwrite=True), progress=False)  # fmt: skip
    capsys.readouterr()
    raw = evaluate_task(base, task="clm", data=val, device="cpu")
    assert raw["bytes"] > task["bytes"]  # (the spaces --normalize-whitespace took out are back)
    assert "were cleaned with different settings, so" in capsys.readouterr().err


def test_clm_task_scores_a_finetune_in_windows_of_its_max_len(base: Path, tmp_path: Path):
    """A `--task clm --max-len 16` fine-tune validates in windows of 16 tokens; its final task metrics (and
    `eval --task clm` on its val file) took windows of the whole context, so they disagreed with its logged
    val_loss on the same text (7.1716 vs 7.1692 on the whole chapter)."""
    text = tmp_path / "ch1.txt"
    text.write_text((DATA / "hongloumeng_ch1.txt").read_text(encoding="utf-8")[:1500], encoding="utf-8")
    overrides = {"train": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0}, "eval": {"every": 2}}
    cfg = FinetuneConfig(task="clm", max_len=16)
    result = finetune(
        base, train_file=text, val_file=text, out=tmp_path / "ft", cfg=cfg, overrides=overrides, progress=False
    )
    logged = [r for r in read_metrics(tmp_path / "ft" / "metrics.jsonl") if "val_loss" in r][-1]
    assert result["val"]["tokens"] == logged["val_tokens"]
    assert result["val"]["loss"] == pytest.approx(logged["val_loss"], abs=1e-6)


def test_clm_finetune_cleans_text_as_prepare_does(base: Path, tmp_path: Path):
    """`finetune --task clm` trained and validated on NUL bytes and control characters that `prepare` removes
    from the same text. It now cleans by prepare's rule (line breaks, control characters, NFC), and `eval --task
    clm` of the fine-tune scores the text cleaned the same way: the tokens its logged val_loss counted."""
    from lmforge.data.formats import build_examples
    from lmforge.data.tables import field_map
    from lmforge.eval.tasks import evaluate_task

    tok = Tokenizer.load(base / "tokenizer.json")
    kwargs = {"task": "clm", "tok": tok, "fields": field_map("clm", None), "max_len": 16, "labels": None}
    dirty = "\x00the cat\x1b sat on the mat\r\nand the dog ran\x7f away\x85"
    clean = "the cat sat on the mat\nand the dog ran away"
    got = build_examples([{"text": dirty}], path="d.txt", **kwargs)
    assert [e.ids for e in got] == [e.ids for e in build_examples([{"text": clean}], path="c.txt", **kwargs)]
    with pytest.raises(DataError, match=r"^d.txt: every document is empty once control characters are removed"):
        build_examples([{"text": "\x00\x01"}], path="d.txt", **kwargs)
    text = tmp_path / "dirty.txt"
    text.write_text((dirty + "\n\n") * 2, encoding="utf-8")  # (2 NULs: more would read as a binary file)
    overrides = {"train": {"max_steps": 1, "batch_size": 4, "warmup_steps": 0}, "eval": {"every": 1}}
    cfg = FinetuneConfig(task="clm", max_len=16)
    finetune(base, train_file=text, val_file=text, out=tmp_path / "ft", cfg=cfg, overrides=overrides, progress=False)
    logged = [r for r in read_metrics(tmp_path / "ft" / "metrics.jsonl") if "val_loss" in r][-1]
    assert logged["val_tokens"] == 2 * (len(tok.encode(clean)) + 1) - 1  # (EOS after each; the first is no target)
    scored = evaluate_task(tmp_path / "ft", task="clm", data=text, device="cpu")
    assert scored["loss"] == pytest.approx(logged["val_loss"], abs=1e-6)


def test_clm_task_reads_invalid_utf8_as_prepare_does(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """`eval --task clm FILE` decoded the file with errors="replace" and said nothing; `prepare` counts the
    replaced sequences and refuses a file that mixes encodings. Both now read it with the same helpers: the
    same count (said on stderr), the same bytes and loss as the prepared split, and the same one-line error."""
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.eval.lm import evaluate_checkpoint
    from lmforge.eval.tasks import evaluate_task

    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("the cat sat on the mat\n", encoding="utf-8")
    val.write_bytes(b"the caf\xe9 sat\r\non the mat\n\nthe \xff\xfe dog ran\n")  # 3 invalid sequences
    cfg = PrepareConfig(
        inputs=[str(train)],
        val_input=[str(val)],
        tokenizer=str(base / "tokenizer.json"),
        out=str(tmp_path / "data"),
        card=False,
    )
    m = prepare(cfg, progress=False)
    assert m["cleaning"]["invalid_utf8_replaced"] == 3
    split = evaluate_checkpoint(str(base), data_dir=str(tmp_path / "data"), split="val", device="cpu")
    capsys.readouterr()
    task = evaluate_task(base, task="clm", data=val, device="cpu")
    err = capsys.readouterr().err
    assert f"note: {val}: 3 invalid UTF-8 sequences replaced with U+FFFD" in err and err.count("\n") == 1
    assert task["bytes"] == split["bytes"] and task["loss"] == pytest.approx(split["loss"])
    mixed = tmp_path / "mixed.txt"  # Latin-1 accents throughout: 20 bad sequences in 200 characters
    mixed.write_bytes(b"caf\xe9 cr\xe8me br\xfbl\xe9e " * 5 + b"plain text " * 10)
    with pytest.raises(DataError) as prepared:
        prepare(dataclasses.replace(cfg, val_input=[str(mixed)], out=str(tmp_path / "d2")), progress=False)
    with pytest.raises(DataError) as evaluated:
        evaluate_task(base, task="clm", data=mixed, device="cpu")
    said = str(evaluated.value)
    assert said.startswith(f"{mixed}: 20 invalid UTF-8 sequences in 199 characters: the file is not UTF-8 or mixes")
    assert str(prepared.value) == said + " or pass --max-invalid-utf8 1 to replace them"  # (a prepare flag)


def test_fewshot_accuracy_norm_does_not_favour_short_labels():
    """Summed log-probabilities favour labels of fewer tokens: a model that gives each character of 正面评价
    more probability than each of 负面 still loses on the sum (4 x -2.5 < 2 x -4) and wins per byte."""
    from types import SimpleNamespace

    from lmforge.eval.tasks import fewshot_classify

    tok = train_char(["Text: 好 Label: 正面评价 负面\n"])
    per_char = torch.full((tok.vocab_size,), -30.0)
    for ch, logp in [*((c, -2.5) for c in "正评价"), ("负", -4.0), ("面", -3.25), (" ", -0.1)]:
        (i,) = tok.encode(ch)
        per_char[i] = logp

    class FixedLM(torch.nn.Module):  # the same next-token scores at every position
        cfg = SimpleNamespace(max_seq_len=256)

        def __init__(self) -> None:
            super().__init__()
            self.scores = torch.nn.Parameter(per_char.clone(), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scores.expand(*x.shape, -1)

    rows = [{"text": "好", "label": "正面评价"}, {"text": "好好", "label": "正面评价"}]
    shots = [*rows, {"text": "好好好", "label": "负面"}]  # the labels: both names
    ft = SimpleNamespace(model=FixedLM(), tokenizer=tok)
    m = fewshot_classify(ft, rows, shots, k=1, fields={"text": "text", "label": "label"})
    # " 正面评价": -0.1 - 2.5 - 3.25 - 2.5 - 2.5 = -10.85 over 13 bytes; " 负面": -0.1 - 4 - 3.25 = -7.35 over 7
    assert m["accuracy"] == 0.0 and m["accuracy_norm"] == 1.0


def test_a_json_list_or_object_where_one_text_belongs_is_refused(tmp_path: Path):
    """UltraFeedback-style DPO rows (`chosen`/`rejected` as lists of chat messages) trained on the lists' Python
    repr, silently; so did a multi-label row's list of labels, or an object as an sft output. One line now. (DPO
    rows whose sides are both message lists are TRL's conversational format, `test_finetune_dpo.py`; a row that
    mixes lists and text says to write both one way.)"""
    from lmforge.data.tables import field_map, read_task_rows

    talk = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    cases = [
        ("dpo", {"prompt": "2+2?", "chosen": talk, "rejected": "5"}, "row 2: 'chosen' is a list of messages and"),
        ("dpo", {"prompt": talk[:1], "chosen": "4", "rejected": "5"}, "row 2: 'prompt' is a list of messages and"),
        ("dpo", {"prompt": {"text": "2+2?"}, "chosen": "4", "rejected": "5"}, "row 2 column 'prompt' holds a JSON obj"),
        ("classify", {"text": "good and fun", "label": [1, 3]}, "row 2 column 'label' holds a JSON list"),
        ("sft", {"instruction": "hi", "output": {"text": "hello"}}, "row 2 column 'output' holds a JSON object"),
    ]
    ok = {"dpo": {"prompt": "hi", "chosen": "a", "rejected": "b"}, "classify": {"text": "bad", "label": 0}}
    ok["sft"] = {"instruction": "hi", "output": "hello"}
    for task, row, said in cases:
        path = tmp_path / f"{task}.jsonl"
        path.write_text(json.dumps(ok[task]) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
        rest = "; write " if "messages" in said else ", not one text or label; write it as a string"
        with pytest.raises(DataError, match=re.escape(said) + ".*" + re.escape(rest)):
            read_task_rows(path, task, field_map(task, []))


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("train.compile", True),
        ("train.compile_mode", "max-autotune"),
        ("train.activation_checkpointing", True),
        ("train.rollback_after", 2),
        ("checkpoint.sharded", True),
        ("eval.sample_tokens", 0),  # also at its default: written, so the user expects it to act
    ],
)
def test_pretrain_only_settings_are_refused_by_finetune(flag: str, value: object) -> None:
    """These were accepted and ignored by `finetune` (no compile, no activation checkpointing, no rollback,
    no sample at evaluations): a one-line error naming the setting now, and its --help no longer lists them."""
    from lmforge.cli_adapt import _finetune_epilog
    from lmforge.finetune import finetune_sections

    section, key = flag.split(".")
    with pytest.raises(ConfigError, match=rf"^--{re.escape(flag)} is pretrain's: .*; drop it$"):
        finetune_sections("full", {section: {key: value}})
    assert f"--{flag} " not in _finetune_epilog()
    finetune_sections("full", {"train": {"max_steps": 3}, "eval": {"every": 1}})  # the others still apply
