"""`CurriculumLoader`: difficulty by document length, competence schedule, easy-first order, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.curriculum import CurriculumLoader, _seam_tokens, competence, window_difficulty
from lmforge.data.shards import ShardWriter
from lmforge.errors import DataError

EOS, SEQ = 0, 8


def test_window_difficulty_by_hand() -> None:
    # documents of 3, 5 and 9 tokens (EOS included), then 4 tokens without EOS
    tokens = np.array([1, 1, EOS] + [2] * 4 + [EOS] + [3] * 8 + [EOS] + [4] * 4)
    d = window_difficulty(tokens, EOS, 4)  # windows start at 0, 4, 8, 12, 16 (5 tokens each)
    per_token = [3] * 3 + [5] * 5 + [9] * 9 + [4] * 4
    assert d.tolist() == [np.mean(per_token[s : s + 4]) for s in (0, 4, 8, 12, 16)]


def test_documents_cut_at_a_shard_end_keep_their_whole_length(tmp_path: Path) -> None:
    """`prepare` cuts a document at a shard's end (--shard-tokens) and goes on in the next shard. Its length
    was counted per shard, so its pieces ranked as short documents: with every document 40 tokens long, the
    seam windows got difficulties down to 8. Each token now counts its whole document, as over the stream."""
    rng = np.random.default_rng(0)
    lengths = [40, 3, 70, 9, 25, 2, 33]  # EOS included; 182 tokens, shards of 16: a 70-token one spans 5
    stream = np.concatenate([np.append(rng.integers(1, 50, n - 1), EOS) for n in lengths])
    shards = [stream[i : i + 16] for i in range(0, len(stream), 16)]
    per_token = np.repeat(lengths, lengths)  # the reference: over the whole stream
    for k, (before, after) in enumerate(_seam_tokens(shards, EOS)):
        got = window_difficulty(shards[k], EOS, 4, before=before, after=after)
        assert got.tolist() == [per_token[16 * k + s : 16 * k + s + 4].mean() for s in range(0, len(got) * 4, 4)]

    writer = ShardWriter(tmp_path, "train", np.uint16, 64)
    writer.write(np.concatenate([np.append(rng.integers(1, 50, 39), EOS) for _ in range(20)]))
    shard_paths = [tmp_path / name for name in writer.close()]
    loader = CurriculumLoader(shard_paths, eos=EOS, seq_len=SEQ, batch_size=4, seed=0, steps=10)
    assert loader.difficulty_range == (40.0, 40.0)


def test_competence_schedule() -> None:
    assert competence(0, 100, 0.1) == pytest.approx(0.1)
    assert competence(100, 100, 0.1) == 1.0 and competence(500, 100, 0.1) == 1.0
    assert competence(50, 100, 0.1) == pytest.approx(np.sqrt(0.5 * 0.99 + 0.01))
    assert competence(3, 0, 0.1) == 1.0


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    """Short documents (5 tokens, ids 1..) and long ones (200 tokens, ids 100..) interleaved."""
    rng = np.random.default_rng(0)
    parts = []
    for i in range(60):
        short = np.append(rng.integers(1, 50, 4), EOS)
        long = np.append(rng.integers(100, 150, 199), EOS)
        parts += [short] * 8 + [long] if i % 2 else [long] + [short] * 8
    writer = ShardWriter(tmp_path, "train", np.uint16, 5000)
    writer.write(np.concatenate(parts))
    return [tmp_path / s for s in writer.close()]


def test_easy_windows_first(shards: list[Path]) -> None:
    # ~1/6 of the windows lie in short documents; at step 0 only the easiest 10% are eligible
    loader = CurriculumLoader(shards, eos=EOS, seq_len=SEQ, batch_size=64, seed=0, steps=50, start=0.1)
    assert bool((next(loader)[0] < 100).all())  # short-document ids only
    for _ in range(60):
        x, y = next(loader)
    late = torch.cat([next(loader)[0] for _ in range(20)])
    assert (late >= 100).float().mean() > 0.5  # after curriculum_steps the long documents are back
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_resume_and_ranks(shards: list[Path]) -> None:
    def make(**kw: int) -> CurriculumLoader:
        return CurriculumLoader(shards, eos=EOS, seq_len=SEQ, seed=4, steps=30, **{"batch_size": 6, **kw})

    straight = make()
    expected = [next(straight)[0] for _ in range(40)]
    first = make()
    for _ in range(13):
        next(first)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert all(torch.equal(next(resumed)[0], want) for want in expected[13:])
    ranks = [make(batch_size=3, rank=r, world_size=2) for r in (0, 1)]
    whole = make()
    for _ in range(5):
        x = next(whole)[0]
        assert torch.equal(x[0::2], next(ranks[0])[0]) and torch.equal(x[1::2], next(ranks[1])[0])


def test_schedule_follows_optimizer_steps(shards: list[Path]) -> None:
    # one optimizer step of 8 rows: 1 micro-batch of 8, 4 of 2 (accumulation), or 2 ranks x 2 micro-batches of 2
    def make(**kw: int) -> CurriculumLoader:
        return CurriculumLoader(shards, eos=EOS, seq_len=SEQ, seed=3, steps=10, start=0.1, **kw)

    whole, accum = make(batch_size=8), make(batch_size=2, accum_steps=4)
    ranks = [make(batch_size=2, accum_steps=2, rank=r, world_size=2) for r in (0, 1)]
    for step in range(12):
        x = next(whole)[0]
        assert torch.equal(x, torch.cat([next(accum)[0] for _ in range(4)]))
        both = [[next(loader)[0] for _ in range(2)] for loader in ranks]  # [rank][micro]
        for micro in range(2):
            assert torch.equal(x[4 * micro : 4 * micro + 4][0::2], both[0][micro])
            assert torch.equal(x[4 * micro : 4 * micro + 4][1::2], both[1][micro])
        for loader in (whole, accum, *ranks):
            assert loader.state_dict()["step"] == step + 1
            assert loader.state_dict()["competence"] == competence(step + 1, 10, 0.1)


def test_resume_mid_step_and_old_state(shards: list[Path]) -> None:
    def make() -> CurriculumLoader:
        return CurriculumLoader(shards, eos=EOS, seq_len=SEQ, batch_size=2, seed=5, steps=20, accum_steps=3)

    straight = make()
    expected = [next(straight)[0] for _ in range(20)]
    first = make()
    for _ in range(7):  # two steps and one micro-batch of the third
        next(first)
    assert (first.state_dict()["step"], first.state_dict()["micro"]) == (2, 1)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert all(torch.equal(next(resumed)[0], want) for want in expected[7:])
    old = {**first.state_dict(), "version": 1, "step": 6}  # version 1 counted micro-batches
    del old["micro"]
    from_old = make()
    from_old.load_state_dict(old)
    assert all(torch.equal(next(from_old)[0], want) for want in expected[6:])
    bad = CurriculumLoader(shards, eos=EOS, seq_len=SEQ, batch_size=6, seed=5, steps=20)  # 1 micro-batch a step
    with pytest.raises(DataError, match="mid-step"):
        bad.load_state_dict(first.state_dict())


def test_pretrain_with_curriculum_resumes_exactly(data_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lmforge.checkpoint import latest_checkpoint
    from lmforge.train.run import pretrain
    from tests.conftest import tiny_config

    # 4 micro-batches per optimizer step: the schedule still counts optimizer steps
    over = {"data.curriculum": "doc_length", "data.curriculum_steps": 8, "train.micro_batch_size": 2}
    straight = tmp_path / "straight"
    pretrain(tiny_config(data_dir, straight, **over), progress=False)
    state = json.loads((straight / "checkpoints" / "step-000012" / "state.json").read_text(encoding="utf-8"))
    assert '"kind": "curriculum"' in json.dumps(state)
    half = json.loads((straight / "checkpoints" / "step-000006" / "state.json").read_text(encoding="utf-8"))
    assert half["loader"]["competence"] == pytest.approx(competence(6, 8, 0.1))  # 0.87, not 1.0 (24 micro-batches)
    assert (half["loader"]["step"], half["loader"]["micro"]) == (6, 0)
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000012")
    (crashed / "checkpoints" / "latest").write_text("step-000006\n", encoding="utf-8")
    pretrain(tiny_config(data_dir, crashed, **over), progress=False)
    a = load_file(str(latest_checkpoint(straight) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(crashed) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("saved", "now", "named"),
    [
        ({"data.curriculum_start": 0.1}, {"data.curriculum_start": 0.5}, "--data.curriculum_start 0.1, not 0.5"),
        ({}, {"data.curriculum_steps": 50}, "--data.curriculum_steps 8, not 50"),
        ({}, {"data.curriculum": "none"}, "--data.curriculum doc_length, not none"),
    ],
)
def test_a_resume_that_changes_the_curriculum_is_refused_by_name(data_dir: Path, tmp_path: Path, saved, now, named):
    """A changed curriculum_start resumed silently into another data order; a changed curriculum_steps failed as
    "saved with curriculum_steps=8, now 50" (no fix said), and dropping the curriculum as "saved with
    windows_per_epoch=None ... resume with the same data" (the data was the same)."""
    from lmforge.errors import ConfigError
    from lmforge.train.run import pretrain
    from tests.conftest import tiny_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(data_dir, run, **{"data.curriculum": "doc_length", "data.curriculum_steps": 8, **saved})
    (run / "config.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")  # the run's
    curriculum = {"data.curriculum": "doc_length", "data.curriculum_steps": 8}
    if now.get("data.curriculum") == "none":  # (its steps would be refused as unused)
        curriculum = {}
    changed = tiny_config(data_dir, run, **{**curriculum, **now})
    with pytest.raises(ConfigError, match=f"was trained with {named}; resume with "):
        pretrain(changed, progress=False)
    assert json.loads((run / "config.json").read_text(encoding="utf-8")) == cfg.to_dict()  # untouched
