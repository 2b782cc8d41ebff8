"""TokenLoader (shuffled, resumable, rank-split) and eval_batches (whole split once)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.loader import IGNORE_INDEX, TokenLoader, eval_batches
from lmforge.data.shards import ShardWriter
from lmforge.errors import DataError


def make_shards(tmp_path: Path, sizes: list[int], prefix: str = "train") -> list[Path]:
    """Shards whose tokens are their global positions (mod 60000), so windows are identifiable."""
    paths = []
    start = 0
    for i, n in enumerate(sizes):
        writer = ShardWriter(tmp_path, f"{prefix}{i}", np.uint16, max_tokens=10**9)
        writer.write((np.arange(start, start + n) % 60000).astype(np.int64))
        paths += [tmp_path / name for name in writer.close()]
        start += n
    return paths


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    return make_shards(tmp_path, [1000, 37, 515])


def take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def test_shapes_and_shift(shards: list[Path]) -> None:
    loader = TokenLoader(shards, seq_len=16, batch_size=4, seed=0)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # tokens are consecutive positions within a window
    assert iter(loader) is loader


def test_windows_per_epoch(shards: list[Path]) -> None:
    loader = TokenLoader(shards, seq_len=16, batch_size=4, seed=0)
    assert loader.windows_per_epoch == 999 // 16 + 36 // 16 + 514 // 16


def test_epoch_covers_every_window_once_and_reshuffles(shards: list[Path]) -> None:
    loader = TokenLoader(shards, seq_len=16, batch_size=1, seed=3)
    n = loader.windows_per_epoch
    epoch0 = [int(next(loader)[0][0, 0]) for _ in range(n)]
    epoch1 = [int(next(loader)[0][0, 0]) for _ in range(n)]
    assert sorted(epoch0) == sorted(epoch1)
    assert len(set(epoch0)) == n
    assert epoch0 != epoch1
    assert loader.epoch == 2


def test_epoch_rollover_deterministic(shards: list[Path]) -> None:
    # batch of 7 does not divide the window count: a batch straddles the epoch boundary
    a = TokenLoader(shards, seq_len=16, batch_size=7, seed=5)
    b = TokenLoader(shards, seq_len=16, batch_size=7, seed=5)
    assert a.windows_per_epoch % 7 != 0
    steps = 3 * a.windows_per_epoch // 7 + 2
    for (xa, ya), (xb, yb) in zip(take(a, steps), take(b, steps), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the straddling batch is the tail of epoch 0's order followed by the head of epoch 1's
    one = TokenLoader(shards, seq_len=16, batch_size=1, seed=5)
    stream = [int(next(one)[0][0, 0]) for _ in range(2 * one.windows_per_epoch)]
    seven = TokenLoader(shards, seq_len=16, batch_size=7, seed=5)
    flat = [int(v) for x, _ in take(seven, len(stream) // 7) for v in x[:, 0]]
    assert flat == stream[: len(flat)]


def test_seed_changes_order(shards: list[Path]) -> None:
    x0, _ = next(TokenLoader(shards, seq_len=16, batch_size=8, seed=0))
    x1, _ = next(TokenLoader(shards, seq_len=16, batch_size=8, seed=1))
    assert not torch.equal(x0, x1)


@pytest.mark.parametrize("k", [0, 1, 9, 10])
def test_exact_resume(shards: list[Path], k: int) -> None:
    total = 23  # crosses epoch boundaries (10 windows per batch, 96 windows per epoch)
    straight = take(TokenLoader(shards, seq_len=16, batch_size=10, seed=7), total)
    first = TokenLoader(shards, seq_len=16, batch_size=10, seed=7)
    resumed = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON (state.json)
    second = TokenLoader(shards, seq_len=16, batch_size=10, seed=7)
    second.load_state_dict(state)
    resumed += take(second, total - k)
    for (xa, ya), (xb, yb) in zip(straight, resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_state_dict_contents(shards: list[Path]) -> None:
    loader = TokenLoader(shards, seq_len=16, batch_size=10, seed=7)
    take(loader, 10)
    state = loader.state_dict()
    assert state["epoch"] == 100 // loader.windows_per_epoch
    assert state["cursor"] == 100 % loader.windows_per_epoch
    assert state["seed"] == 7 and state["seq_len"] == 16


def test_resume_refuses_other_data_or_settings(tmp_path: Path, shards: list[Path]) -> None:
    state = TokenLoader(shards, seq_len=16, batch_size=4, seed=7).state_dict()
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(shards, seq_len=8, batch_size=4, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        TokenLoader(shards, seq_len=16, batch_size=4, seed=8).load_state_dict(state)
    other = make_shards(tmp_path, [300], prefix="other")
    with pytest.raises(DataError, match="same data"):
        TokenLoader(other, seq_len=16, batch_size=4, seed=7).load_state_dict(state)


def test_two_ranks_interleave_to_one(shards: list[Path]) -> None:
    single = TokenLoader(shards, seq_len=16, batch_size=6, seed=11)
    ranks = [TokenLoader(shards, seq_len=16, batch_size=3, seed=11, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):  # several epochs
        x, y = next(single)
        (x0, y0), (x1, y1) = next(ranks[0]), next(ranks[1])
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
    # a rank's state resumes on a single process with the same global batch
    resumed = TokenLoader(shards, seq_len=16, batch_size=6, seed=11)
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(resumed)[0], next(single)[0])


def test_too_little_data(tmp_path: Path) -> None:
    paths = make_shards(tmp_path, [16])
    with pytest.raises(
        DataError,
        match=r"the train split of .* has 16 tokens, fewer than the seq_len\+1 = 17 .*--data.seq_len 15 or lower",
    ):
        TokenLoader(paths, seq_len=16, batch_size=2, seed=0)
    assert (
        TokenLoader(make_shards(tmp_path, [17], prefix="ok"), seq_len=16, batch_size=2, seed=0).windows_per_epoch == 1
    )
    with pytest.raises(DataError, match="no token shards"):
        TokenLoader([], seq_len=16, batch_size=2, seed=0)


def test_shards_cut_below_the_context_name_the_longest_context_they_serve(tmp_path: Path) -> None:
    """Enough tokens spread over shards shorter than a window (prepare --shard-tokens 64, a context of 128):
    the error said only "lower --data.seq_len"; it now names the seq_len the shards serve and the flag to raise."""
    from lmforge.data.curriculum import CurriculumLoader

    paths = make_shards(tmp_path, [64] * 4)
    expected = r"longest has 64, cut by 'lmforge prepare --shard-tokens'\); pass --data.seq_len 63 or lower, or"
    with pytest.raises(DataError, match=expected + r" prepare again with a --shard-tokens far above 129"):
        TokenLoader(paths, seq_len=128, batch_size=2, seed=0)
    with pytest.raises(DataError, match=expected):  # (the curriculum loader said "add data")
        CurriculumLoader(paths, eos=0, seq_len=128, batch_size=2, seed=0, steps=10)
    assert TokenLoader(paths, seq_len=63, batch_size=2, seed=0).windows_per_epoch == 4


def test_eval_batches_cover_every_target_once(shards: list[Path]) -> None:
    seq_len, batch_size = 16, 5
    batches = list(eval_batches(shards, seq_len=seq_len, batch_size=batch_size))
    assert all(x.shape == y.shape and x.shape[1] == seq_len and x.dtype == torch.int64 for x, y in batches)
    assert all(x.shape[0] == batch_size for x, _ in batches[:-1]) and 0 < batches[-1][0].shape[0] <= batch_size
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    targets = targets[targets != IGNORE_INDEX]
    # tokens are global positions: every position except each shard's first (0, 1000, 1037) once
    expected = sorted(set(range(1000 + 37 + 515)) - {0, 1000, 1037})
    assert sorted(targets.tolist()) == expected
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    valid = y != IGNORE_INDEX
    assert torch.equal((y - x)[valid], torch.ones(int(valid.sum()), dtype=torch.int64))  # y is x shifted
    assert int((x[~valid]).abs().sum()) == 0  # padded inputs are 0
    # deterministic
    again = list(eval_batches(shards, seq_len=seq_len, batch_size=batch_size))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))


def test_eval_batches_max_sequences(shards: list[Path]) -> None:
    """The limit counts sequences, so it does not depend on the batch size: the same first windows."""
    full = list(eval_batches(shards, seq_len=16, batch_size=4))
    for batch_size in (1, 4, 5, 12):
        batches = list(eval_batches(shards, seq_len=16, batch_size=batch_size, max_sequences=12))
        assert [len(x) for x, _ in batches][:-1] == [batch_size] * (len(batches) - 1)  # only the last is short
        assert torch.equal(torch.cat([x for x, _ in batches]), torch.cat([x for x, _ in full])[:12])
    assert len(list(eval_batches(shards, seq_len=16, batch_size=4, max_sequences=10**6))) == len(full)


def test_eval_batches_exact_fit(tmp_path: Path) -> None:
    # 33 tokens, seq_len 16: exactly two full windows, no padding anywhere
    (x, y), *rest = list(eval_batches(make_shards(tmp_path, [33]), seq_len=16, batch_size=8))
    assert not rest and x.shape == (2, 16) and bool((y != IGNORE_INDEX).all())


def test_token_ids_beyond_the_vocabulary_are_a_data_error(tmp_path: Path) -> None:
    """A damaged shard (or one encoded with another tokenizer) holds ids the model has no row for:
    training, and evaluation through the bpb byte table made before it, stop with a DataError, not an IndexError."""
    from lmforge.data.loader import IdCheckedLoader
    from lmforge.data.shards import read_shard
    from lmforge.eval.lm import text_byte_table

    paths = make_shards(tmp_path, [1000, 515])  # ids 0..1514
    loader = IdCheckedLoader(TokenLoader(paths, seq_len=16, batch_size=4, seed=0), 2000, tmp_path)
    x, y = next(loader)  # every id < 2000: passes through unchanged
    assert (
        x.shape == (4, 16)
        and loader.windows_per_epoch == TokenLoader(paths, seq_len=16, batch_size=4, seed=0).windows_per_epoch
    )
    assert loader.state_dict()["cursor"] == 4  # the wrapped loader's own state
    small = IdCheckedLoader(TokenLoader(paths, seq_len=16, batch_size=64, seed=0), 1200, tmp_path)
    with pytest.raises(
        DataError, match=rf"the training data in {tmp_path} holds token id 1\d\d\d, beyond the model's 1200"
    ):
        next(small)
    # evaluation: the split's byte table, made before any evaluation, checks every id of the split
    with pytest.raises(DataError, match=r"train1-00000\.bin holds token id 1514, beyond the tokenizer's 1200 ids"):
        text_byte_table(np.ones(1200, dtype=np.int64), [read_shard(p) for p in paths], 0)
