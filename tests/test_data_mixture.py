"""`MixtureLoader`: exact proportions at every step, exact resume, rank slicing, one-source == TokenLoader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.loader import TokenLoader
from lmforge.data.mixture import MixtureLoader, mixture_loader, parse_mix
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.data.shards import ShardWriter
from lmforge.errors import ConfigError, DataError
from tests.conftest import shakespeare_text
from tests.test_data_prepare import write

SEQ = 8


def source(tmp_path: Path, name: str, low: int, n_tokens: int = 2000) -> list[Path]:
    """Shards whose token ids all lie in [low, low + 100): a row's ids tell which source it came from."""
    writer = ShardWriter(tmp_path / name, "train", np.uint16, 700)
    (tmp_path / name).mkdir(exist_ok=True)
    writer.write(low + np.random.default_rng(low).integers(0, 100, n_tokens))
    return [tmp_path / name / s for s in writer.close()]


@pytest.fixture
def sources(tmp_path: Path) -> list[tuple[str, list[Path], float]]:
    weights = dict(parse_mix("web=7,books=2,code=1"))
    return [(n, source(tmp_path, n, low), weights[n]) for n, low in (("web", 0), ("books", 100), ("code", 200))]


def owner(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // 100).tolist()


def test_parse_mix() -> None:
    assert [n for n, _ in parse_mix("a=0.7, b=0.2,c=0.1")] == ["a", "b", "c"]
    assert [w for _, w in parse_mix("a=0.7, b=0.2,c=0.1")] == pytest.approx([0.7, 0.2, 0.1])
    assert parse_mix("data/x=3,data/y=1") == [("data/x", 0.75), ("data/y", 0.25)]
    for bad, match in [
        ("a", "DATA_DIR=WEIGHT"),
        ("a=x", "not a number"),
        ("a=0", "> 0"),
        ("a=inf,b=1", "finite"),
        ("a=1,a=2", "twice"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_mix(bad)


def test_proportions_are_exact_at_every_step(sources: list) -> None:
    loader = MixtureLoader(sources, seq_len=SEQ, batch_size=10, seed=1)
    drawn = np.zeros(3, dtype=int)
    for step in range(1, 31):
        x, y = next(loader)
        assert x.shape == y.shape == (10, SEQ) and torch.equal(x[:, 1:], y[:, :-1])
        drawn += np.bincount(owner(x), minlength=3)
        assert np.all(np.abs(drawn - np.array([0.7, 0.2, 0.1]) * 10 * step) < 1), (step, drawn)
    assert loader.achieved() == {"web": 0.7, "books": 0.2, "code": 0.1}


def test_resume_is_exact(sources: list) -> None:
    straight = MixtureLoader(sources, seq_len=SEQ, batch_size=6, seed=3)
    expected = [next(straight) for _ in range(40)]  # several epochs of the small sources
    first = MixtureLoader(sources, seq_len=SEQ, batch_size=6, seed=3)
    for _ in range(17):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = MixtureLoader(sources, seq_len=SEQ, batch_size=6, seed=3)
    resumed.load_state_dict(state)
    for want in expected[17:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = MixtureLoader(sources[:2], seq_len=SEQ, batch_size=6, seed=3)
    with pytest.raises(DataError, match="data.mix"):
        other.load_state_dict(state)


def test_ranks_split_the_global_batch(sources: list) -> None:
    whole = MixtureLoader(sources, seq_len=SEQ, batch_size=4, seed=5)
    ranks = [MixtureLoader(sources, seq_len=SEQ, batch_size=2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        x, _ = next(whole)
        x0, x1 = (next(r)[0] for r in ranks)
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)


def test_one_source_reads_what_token_loader_reads(sources: list) -> None:
    name, shards, _ = sources[0]
    mix = MixtureLoader([(name, shards, 1.0)], seq_len=SEQ, batch_size=4, seed=9)
    plain = TokenLoader(shards, seq_len=SEQ, batch_size=4, seed=9)
    for _ in range(10):
        assert torch.equal(next(mix)[0], next(plain)[0])


def test_mixture_loader_checks_the_directories(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", shakespeare_text(8_000))
    prepare(PrepareConfig(inputs=[str(tmp_path / "a.txt")], out=str(tmp_path / "a"), tokenizer="char"), progress=False)
    prepare(PrepareConfig(inputs=[str(tmp_path / "a.txt")], out=str(tmp_path / "b"), vocab_size=300), progress=False)
    sha = json.loads((tmp_path / "a" / "manifest.json").read_text(encoding="utf-8"))["tokenizer"]["sha256"]
    loader = mixture_loader(f"{tmp_path / 'a'}=1", sha, seq_len=16, batch_size=2, seed=0)
    assert next(loader)[0].shape == (2, 16)
    with pytest.raises(DataError, match="another tokenizer"):
        mixture_loader(f"{tmp_path / 'a'}=1,{tmp_path / 'b'}=1", sha, seq_len=16, batch_size=2, seed=0)
    with pytest.raises(DataError, match="not a prepared data directory"):
        mixture_loader(f"{tmp_path / 'nope'}=1", sha, seq_len=16, batch_size=2, seed=0)


def test_pretrain_on_a_mixture_resumes_exactly(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The mixed stream through the real training loop: a crash after step 6 + re-run == a straight run."""
    import shutil

    from safetensors.torch import load_file

    from lmforge.checkpoint import latest_checkpoint
    from lmforge.train.run import pretrain
    from tests.conftest import tiny_config

    tok = str(Path(data_dir) / "tokenizer.json")
    write(tmp_path / "other.txt", shakespeare_text(120_000)[60_000:])
    prepare(PrepareConfig(inputs=[str(tmp_path / "other.txt")], out=str(tmp_path / "other"), tokenizer=tok))
    bad = {"data.mix": f"{data_dir}=0.75,{tmp_path / 'nothere'}=0.25"}
    with pytest.raises(DataError, match="not a prepared data directory"):
        pretrain(tiny_config(data_dir, tmp_path / "bad", **bad), progress=False)
    assert not (tmp_path / "bad").exists()  # refused before the run folder (and its lock) is made
    mix = {"data.mix": f"{data_dir}=0.75,{tmp_path / 'other'}=0.25"}
    straight = tmp_path / "straight"
    pretrain(tiny_config(data_dir, straight, **mix), progress=True)
    assert "data mix achieved: " in capsys.readouterr().out
    state = json.loads((straight / "checkpoints" / "step-000012" / "state.json").read_text(encoding="utf-8"))
    loader_state = json.dumps(state)
    assert '"kind": "mixture"' in loader_state and '"achieved"' in loader_state

    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000012")
    (crashed / "checkpoints" / "latest").write_text("step-000006\n", encoding="utf-8")
    pretrain(tiny_config(data_dir, crashed, **mix), progress=False)
    a = load_file(str(latest_checkpoint(straight) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(crashed) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="DATA_DIR=WEIGHT"):
        tiny_config(data_dir, tmp_path / "bad", **{"data.mix": "oops"})


@pytest.mark.parametrize("mixed_first", [True, False])
def test_a_resume_that_adds_or_drops_the_mixture_is_refused_by_name(data_dir: Path, tmp_path: Path, mixed_first):
    """Dropping data.mix on resume failed as "the data loader was saved with seq_len=None, now 32; resume with the
    same seq_len" (the seq_len had not changed)."""
    from lmforge.train.run import pretrain
    from tests.conftest import tiny_config

    run = tmp_path / "run"
    run.mkdir()
    mixed, plain = tiny_config(data_dir, run, **{"data.mix": f"{data_dir}=1"}), tiny_config(data_dir, run)
    saved, now = (mixed, plain) if mixed_first else (plain, mixed)
    (run / "config.json").write_text(json.dumps(saved.to_dict()), encoding="utf-8")  # the run's
    named = f"with --data.mix {data_dir}=1, not none; resume with --data.mix" if mixed_first else "without --data.mix"
    with pytest.raises(ConfigError, match=f"was trained {named}"):
        pretrain(now, progress=False)
