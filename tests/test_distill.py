"""Distillation: the loss against a hand computation, and `finetune --adapt distill` bringing a small
student closer to a trained teacher (its KL on validation text falls) with the teacher untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.adapt.load import load_finetuned
from lmforge.compress.distill import Distill, distill_loss
from lmforge.errors import ConfigError
from lmforge.finetune import FinetuneConfig, finetune
from tests.conftest import shakespeare_text, tiny_config


def test_loss_equals_hand_computed_value() -> None:
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, -2.0, 0.0]]])  # (1, 3, 3)
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    targets = torch.tensor([[1, 0, -100]])  # the last position is ignored
    T, alpha = 2.0, 0.3

    def softmax(row: list[float], t: float) -> list[float]:
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    kl = ce = 0.0
    for pos in range(2):
        p = softmax(teacher[0, pos].tolist(), T)
        q = softmax(student[0, pos].tolist(), T)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        ce -= math.log(softmax(student[0, pos].tolist(), 1.0)[int(targets[0, pos])])
    expected = alpha * T * T * kl + (1 - alpha) * ce
    total, soft = distill_loss(student, teacher, targets, temperature=T, alpha=alpha)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert soft.item() == pytest.approx(T * T * kl, rel=1e-6)
    # alpha 0: plain cross-entropy; identical distributions: no soft term
    total, _ = distill_loss(student, teacher, targets, temperature=T, alpha=0.0)
    assert total.item() == pytest.approx(ce, rel=1e-6)
    assert distill_loss(student, student, targets, temperature=T, alpha=1.0)[0].item() == pytest.approx(0, abs=1e-6)


def test_a_teacher_padded_past_the_tokenizer_teaches_over_the_shared_ids() -> None:
    """Models of one tokenizer padded to other sizes (--model.vocab_size 50304 vs the tokenizer's 50257) were
    refused ("they must match"); the soft term now compares the ids both have."""
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # (1, 2, 3)
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]]])
    padded = torch.cat([teacher, torch.full((1, 2, 5), 7.0)], dim=-1)  # 5 more rows, with large logits
    targets = torch.tensor([[1, 0]])
    want = distill_loss(student, teacher, targets, temperature=2.0, alpha=0.5)
    for got in (
        distill_loss(student, padded, targets, temperature=2.0, alpha=0.5),
        distill_loss(torch.cat([student, torch.full((1, 2, 1), -3.0)], -1), teacher, targets, temperature=2.0, alpha=0),
    ):
        assert got[1].item() == pytest.approx(want[1].item(), rel=1e-6)  # the soft term: the 3 shared ids only
    assert distill_loss(student, padded, targets, temperature=2.0, alpha=0.5)[0].item() == pytest.approx(
        want[0].item(), rel=1e-6
    )


def test_teacher_is_frozen_and_gets_no_gradient() -> None:
    from lmforge.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=20, max_seq_len=8, n_layer=1, n_head=2, d_model=16)
    torch.manual_seed(0)
    teacher, student = GPT(cfg), GPT(cfg)
    teacher.init_weights()
    student.init_weights()
    objective = Distill(teacher, temperature=2.0, alpha=0.5)
    x = torch.randint(0, 20, (2, 8))
    batch = (x, torch.roll(x, -1, dims=1))
    assert objective.count(batch) == 16
    objective.loss(student, batch).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert not teacher.training


def test_loss_reads_nothing_back_to_the_host() -> None:
    """Distill.loss runs on every micro-batch: a `float()`/`.item()` there (aten._local_scalar_dense) is a
    GPU sync per step. It used to keep an unread `last_kl_sum` that way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lmforge.models.gpt import GPT, GPTConfig

    class CountScalarReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func is torch.ops.aten._local_scalar_dense.default:
                CountScalarReads.reads += 1
            return func(*args, **(kwargs or {}))

    cfg = GPTConfig(vocab_size=20, max_seq_len=8, n_layer=1, n_head=2, d_model=16)
    teacher, student = GPT(cfg), GPT(cfg)
    teacher.init_weights()
    student.init_weights()
    x = torch.randint(0, 20, (2, 8))
    objective = Distill(teacher, temperature=2.0, alpha=0.5)
    with CountScalarReads():
        loss = objective.loss(student, (x, torch.roll(x, -1, dims=1)))
        float(loss.detach())  # the mode does see a read
    assert CountScalarReads.reads == 1


def _masked_distill_loss(student_logits, teacher_logits, targets, *, temperature, alpha):  # noqa: ANN001, ANN202
    """distill_loss as it was, selecting the targets by boolean mask three times (three syncs on a GPU)."""
    import torch.nn.functional as F

    valid = targets.flatten() != -100
    s, t = student_logits.flatten(0, 1)[valid].float(), teacher_logits.flatten(0, 1)[valid].float()
    shared = min(s.size(-1), t.size(-1))
    log_p_student = F.log_softmax(s[:, :shared] / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t[:, :shared] / temperature, dim=-1)
    soft = temperature**2 * (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(s, targets.flatten()[valid], reduction="sum"), soft


def test_loss_finds_its_targets_once_and_trains_bit_identically() -> None:
    """Distill.loss indexed the logits of both models and the targets by a boolean mask: each index finds the
    valid positions again, a GPU-to-host sync (the count sets the shape), three per micro-batch. They are now
    found once (the count's one sync stays: masking instead of selecting changes the sums' rounding), and a few
    training steps give bit-identical losses and weights to the masked version on CPU."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    from lmforge.models.gpt import GPT, GPTConfig

    class CountSyncs(TorchDispatchMode):  # ops whose output size (or value) the host must read from the device
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            masked_index = func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1]
            )
            if masked_index or func in (torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default):
                CountSyncs.syncs += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=20, max_seq_len=8, n_layer=1, n_head=2, d_model=16)
    teacher, student = GPT(cfg), GPT(cfg)
    teacher.init_weights()
    student.init_weights()
    reference = copy.deepcopy(student)
    objective = Distill(teacher, temperature=2.0, alpha=0.5)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (student, reference)]
    for step in range(4):
        x = torch.randint(0, 20, (3, 8))
        y = torch.roll(x, -1, dims=1)
        y[0, :3] = y[1, 5:] = y[2, 2] = -100  # ignored positions inside and at the ends of rows
        with CountSyncs():
            loss = objective.loss(student, (x, y))
        assert CountSyncs.syncs == step + 1
        with torch.no_grad():
            teacher_logits = teacher(x)
        want, _ = _masked_distill_loss(reference(x), teacher_logits, y, temperature=2.0, alpha=0.5)
        assert torch.equal(loss, want), (step, loss.item(), want.item())
        for opt, value in zip(optimizers, (loss, want), strict=True):
            opt.zero_grad()
            (value / 10).backward()
            opt.step()
    for (name, p), q in zip(student.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A teacher trained for 150 steps and a smaller student trained for 10, on the same char data."""
    from lmforge.train.run import pretrain

    root = tmp_path_factory.mktemp("distill")
    common = {"train.log_every": 50, "eval.every": 1000, "eval.max_batches": 1}
    teacher = {"train.max_steps": 150, "checkpoint.every": 150, "model.d_model": 64, **common}
    student = {"train.max_steps": 10, "checkpoint.every": 10, "model.n_layer": 1, "model.d_model": 32, **common}
    pretrain(tiny_config(data_dir, root / "teacher", **teacher), progress=False)
    pretrain(tiny_config(data_dir, root / "student", **student), progress=False)
    text = shakespeare_text(200_000)
    (root / "train.txt").write_text(text[60_000:90_000], encoding="utf-8")
    (root / "val.txt").write_text(text[90_000:96_000], encoding="utf-8")
    return {"teacher": root / "teacher", "student": root / "student", "root": root}


def _sha(run: Path) -> str:
    (ckpt,) = (run / "checkpoints").glob("step-*")
    return hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()


def test_finetune_distill_moves_the_student_towards_the_teacher(runs: dict[str, Path], tmp_path: Path) -> None:
    before = _sha(runs["teacher"])
    cfg = FinetuneConfig(task="clm", adapt="distill", teacher=str(runs["teacher"]), distill_alpha=0.9)
    overrides = {"train": {"max_steps": 40, "batch_size": 8, "log_every": 20}, "eval": {"every": 20, "max_batches": 2}}
    result = finetune(
        runs["student"],
        train_file=runs["root"] / "train.txt",
        val_file=runs["root"] / "val.txt",
        out=tmp_path / "student-distilled",
        cfg=cfg,
        overrides=overrides,
        progress=False,
    )
    kl = result["distill"]
    assert kl["kl_after"] < 0.8 * kl["kl_before"], kl
    assert result["trainable_params"] == result["total_params"]  # the whole student trains
    assert _sha(runs["teacher"]) == before  # the teacher's weights are untouched
    metrics = [json.loads(line) for line in (tmp_path / "student-distilled" / "metrics.jsonl").open(encoding="utf-8")]
    logged = [m["val_kl_to_teacher"] for m in metrics if "val_kl_to_teacher" in m]
    assert len(logged) == 2 and logged[-1] < kl["kl_before"]
    from lmforge.report import load_runs, task_table  # the report shows the KL before and after (it did not)

    header, (row,) = task_table(load_runs([tmp_path / "student-distilled"]))
    shown = dict(zip(header, row, strict=True))
    assert (shown["kl_to_teacher before"][1], shown["kl_to_teacher after"][1]) == (kl["kl_before"], kl["kl_after"])
    again = finetune(  # a re-run (as after an interrupted one) resumes and ends like the first
        runs["student"], train_file=runs["root"] / "train.txt", val_file=runs["root"] / "val.txt",
        out=tmp_path / "student-distilled", cfg=cfg, overrides=overrides, progress=False,
    )  # fmt: skip
    assert again["distill"] == kl
    info = json.loads((tmp_path / "student-distilled" / "finetune.json").read_text(encoding="utf-8"))
    assert info["adapt"] == "distill" and info["saved"] == "model" and info["teacher"] == str(runs["teacher"].resolve())
    # the distilled student is an ordinary run: it loads with the student's (smaller) architecture
    loaded = load_finetuned(tmp_path / "student-distilled", torch.device("cpu"))
    assert loaded.model.cfg.n_layer == 1 and loaded.model.cfg.d_model == 32
    # ... and it quantizes like one (the next step when shrinking a model)
    from lmforge.compress.quantize import quantize_run
    from lmforge.trained import load_trained

    quantize_run(tmp_path / "student-distilled", tmp_path / "q8", bits=8, compare=False)
    assert load_trained(tmp_path / "q8", torch.device("cpu")).model.cfg.d_model == 32
    # `lmforge runs` tells them apart (a quantized copy read exactly like its original, a student like any run)
    from lmforge.runs import format_runs, summarize

    quantize_run(runs["student"], tmp_path / "student-q4", bits=4, group_size=32, compare=False)
    rows = [summarize(p) for p in (runs["student"], tmp_path / "student-q4", tmp_path / "student-distilled")]
    rows.append(summarize(tmp_path / "q8"))
    assert [r.kind for r in rows] == ["pretrain", "pretrain, int4", "distill clm", "distill clm, int8"]
    table = format_runs(rows).splitlines()
    assert table[0].split()[:3] == ["run", "kind", "preset"] and table[2].split()[:3] == [
        "student-q4",
        "pretrain,",
        "int4",
    ]


def test_errors(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--teacher"):
        FinetuneConfig(task="clm", adapt="distill")
    with pytest.raises(ConfigError, match="--task clm, sft"):
        FinetuneConfig(task="classify", adapt="distill", teacher="x")
    with pytest.raises(ConfigError, match="--distill-alpha"):
        FinetuneConfig(task="clm", adapt="distill", teacher="x", distill_alpha=1.5)
    # a teacher with another tokenizer (BPE vs the student's char vocabulary)
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import RunConfig
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.tokenizer.train import train_bpe

    bpe = train_bpe(["some other text " * 50], vocab_size=270)
    model_cfg = GPTConfig(vocab_size=bpe.vocab_size, max_seq_len=32, n_layer=1, n_head=4, d_model=32)
    other = tmp_path / "bpe-teacher"
    model = GPT(model_cfg)
    model.init_weights()
    state = {"train_state": {}, "config": RunConfig(out=str(other), model=model_cfg).to_dict()}
    save_checkpoint(other, step=1, model=model, optimizer=None, state=state, tokenizer_json=bpe.to_str())
    cfg = FinetuneConfig(task="clm", adapt="distill", teacher=str(other))
    out = tmp_path / "x"
    with pytest.raises(ConfigError, match="another tokenizer"):
        finetune(runs["student"], train_file=runs["root"] / "train.txt", out=out, cfg=cfg, progress=False)
    assert not out.exists()  # nothing half-written


def _save_teacher(out: Path, model_cfg: object, tokenizer_json: str) -> Path:
    """A step-1 run of `model_cfg` (random weights) with the given tokenizer: enough to be loaded as a teacher."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import RunConfig
    from lmforge.models import build_model

    model = build_model(model_cfg)
    model.init_weights()
    state = {"train_state": {}, "config": RunConfig(out=str(out), model=model_cfg).to_dict()}
    save_checkpoint(out, step=1, model=model, optimizer=None, state=state, tokenizer_json=tokenizer_json)
    return out


def test_teacher_kinds_and_context(runs: dict[str, Path], tmp_path: Path) -> None:
    """What can teach: any causal LM (GPT, LSTM, an HF directory) whose context holds the student's
    examples; an encoder or a too-short context is a one-line error before anything is written."""
    from lmforge.adapt.load import load_teacher
    from lmforge.export.hf import export_hf
    from lmforge.models.bert import BertConfig
    from lmforge.models.gpt import GPTConfig
    from lmforge.models.rnn import RNNConfig

    cpu = torch.device("cpu")
    student = load_finetuned(runs["student"], cpu)
    vocab, tok_json = student.model.cfg.vocab_size, student.tokenizer.to_str()
    assert student.model.cfg.max_seq_len == 32
    short_cfg = GPTConfig(vocab_size=vocab, max_seq_len=16, n_layer=1, n_head=2, d_model=16)
    short = _save_teacher(tmp_path / "short", short_cfg, tok_json)
    cfg = FinetuneConfig(task="clm", adapt="distill", teacher=str(short))
    out = tmp_path / "x"
    with pytest.raises(ConfigError, match="context of 16 tokens, shorter than the student's context of 32"):
        finetune(runs["student"], train_file=runs["root"] / "train.txt", out=out, cfg=cfg, progress=False)
    assert not out.exists()  # refused before the run directory is written (it crashed mid-run before)
    # finetune's --max-len (passed as max_len) can cut the student's examples to the teacher's context
    with pytest.raises(ConfigError, match="--max-len of 24.*pass --max-len 16"):
        load_teacher(str(short), student, cpu, max_len=24)
    assert load_teacher(str(short), student, cpu, max_len=16).cfg.max_seq_len == 16
    with pytest.raises(ConfigError, match="student's context of 32"):
        load_teacher(str(short), student, cpu, max_len=0)
    # an encoder cannot give next-token logits; the message says so (it blamed classification/prompt runs)
    bert = _save_teacher(tmp_path / "bert", BertConfig(vocab_size=vocab, n_layer=1, n_head=2, d_model=16), tok_json)
    with pytest.raises(ConfigError, match="is a bert encoder.*causal language model"):
        load_teacher(str(bert), student, cpu)
    # a teacher padded past the tokenizer by more rows than the student is accepted (it was "they must match")
    padded = GPTConfig(vocab_size=vocab + 8, max_seq_len=32, n_layer=1, n_head=2, d_model=16)
    assert (
        load_teacher(str(_save_teacher(tmp_path / "padded", padded, tok_json)), student, cpu).cfg.vocab_size
        == vocab + 8
    )
    # a recurrent LM is a causal LM with no context limit: it teaches
    lstm = _save_teacher(tmp_path / "lstm", RNNConfig(vocab_size=vocab, max_seq_len=8, n_layer=1, d_model=16), tok_json)
    assert load_teacher(str(lstm), student, cpu, max_len=0).__class__.__name__ == "RNNLM"
    # a Hugging Face directory is accepted as BASE is (it said "no complete checkpoint yet; train it first")
    hf = export_hf(runs["teacher"], tmp_path / "teacher-hf")
    teacher = load_teacher(str(hf), student, cpu)
    x = torch.randint(0, vocab, (1, 32))
    reference = load_finetuned(runs["teacher"], cpu).model
    torch.testing.assert_close(teacher(x), reference(x), rtol=1e-4, atol=1e-4)


def test_an_infinite_temperature_is_refused() -> None:
    """--distill-temperature inf passed the check (> 0): T^2 * KL was inf * 0, every step's loss NaN and skipped,
    and the run was written anyway with a hint to lower --train.lr."""
    with pytest.raises(ConfigError, match="--distill-temperature must be a number > 0, got inf"):
        FinetuneConfig(task="clm", adapt="distill", teacher="x", distill_temperature=float("inf"))
