"""Sharded evaluation: each rank evaluates its own validation batches, the sums are all-reduced.

The end-to-end check (2 gloo ranks under DDP and FSDP2 log the same val_loss/val_bpb/val_tokens as one
process, with an odd number of validation batches) is in test_dist.py's 2-rank tests; these are the
pieces, in one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.config import EvalConfig, TrainConfig
from lmforge.data.datadir import load_data_dir
from lmforge.data.loader import eval_batches
from lmforge.eval.lm import evaluate_lm, shard_batches
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.train.precision import pick_precision


@pytest.mark.parametrize("n, world", [(5, 2), (6, 2), (1, 2), (0, 2), (7, 3), (4, 1)])
def test_every_batch_goes_to_one_rank_and_every_rank_runs_the_same_number_of_forwards(n: int, world: int):
    batches = list(range(n))
    per_rank = [list(shard_batches(batches, r, world)) for r in range(world)]
    assert {len(p) for p in per_rank} == {-(-n // world)}  # ceil(n / world) forwards on every rank
    mine = sorted(b for p in per_rank for b, is_mine in p if is_mine)
    assert mine == batches  # each batch evaluated exactly once
    for r, p in enumerate(per_rank):
        assert [b for b, is_mine in p if is_mine] == batches[r::world]


def test_rank_outside_the_world_is_an_error():
    with pytest.raises(ValueError, match="rank 2 is not in"):
        list(shard_batches([1, 2], 2, 2))


@pytest.mark.parametrize("micro, world", [(0, 1), (2, 1), (0, 2), (2, 2), (1, 4)])
def test_max_batches_covers_the_same_sequences_whatever_the_accumulation_and_world_size(
    micro: int, world: int, data_dir: Path
):
    """Training's evaluation under torchrun: batches of `forward_batch` sequences (the micro-batch per
    rank), the first `sequences` of the split, dealt round-robin to the ranks: together exactly
    max_batches x train.batch_size sequences, each once, and the same forward count on every rank."""
    data = load_data_dir(data_dir)
    train, eval_cfg = TrainConfig(batch_size=8, micro_batch_size=micro), EvalConfig(max_batches=3)
    limit = eval_cfg.sequences(train)
    assert limit == 24
    whole = torch.cat([x for x, _ in eval_batches(data.split_shards("val"), seq_len=16, batch_size=1)])
    evaluated, forwards = [], set()
    for rank in range(world):
        batches = eval_batches(
            data.split_shards("val"), seq_len=16, batch_size=eval_cfg.forward_batch(train, world), max_sequences=limit
        )
        mine = list(shard_batches(batches, rank, world))
        forwards.add(len(mine))
        evaluated += [x for (x, _), is_mine in mine if is_mine]
        assert all(len(x) <= (micro or 8 // world) for (x, _), _ in mine)  # the training micro-batch per rank
    assert len(forwards) == 1
    assert sorted(map(tuple, torch.cat(evaluated).tolist())) == sorted(map(tuple, whole[:24].tolist()))


def test_rank_shards_add_up_to_the_whole_split(data_dir: Path):
    data = load_data_dir(data_dir)
    tok = Tokenizer.load(data.tokenizer_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=16, n_layer=1, n_head=2, d_model=16))
    model.init_weights()
    token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.int64)
    precision = pick_precision(torch.device("cpu"), "float32")

    def run(**ranks: int) -> dict[str, float]:
        batches = eval_batches(data.split_shards("val"), seq_len=16, batch_size=3, max_sequences=15)
        return evaluate_lm(model, batches, token_bytes=token_bytes, precision=precision, **ranks)

    whole = run()
    # without a process group the all-reduce is the identity: each call returns its own shard's sums
    parts = [run(rank=r, world_size=2) for r in range(2)]
    assert parts[0]["tokens"] == 3 * 16 * 3 and parts[1]["tokens"] == 2 * 16 * 3  # batches 0, 2, 4 and 1, 3
    assert sum(p["tokens"] for p in parts) == whole["tokens"]
    assert sum(p["bytes"] for p in parts) == whole["bytes"]
    nats = sum(p["loss"] * p["tokens"] for p in parts)
    assert nats / whole["tokens"] == pytest.approx(whole["loss"], rel=1e-9)


def test_eval_of_a_torchrun_run_forwards_one_ranks_batch(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`lmforge eval` in one process of a run trained by 2 ranks with micro_batch_size 0 forwards 4
    sequences at a time (one rank's share of the global 8), not all 8; the metrics do not change."""
    import json

    import lmforge.eval.lm as lm
    from lmforge.train.run import pretrain
    from tests.conftest import tiny_config

    run = tmp_path / "run"
    flags = {"train.batch_size": 8, "train.micro_batch_size": 0, "train.max_steps": 2, "eval.every": 0}
    pretrain(tiny_config(data_dir, run, **flags), progress=False)
    sizes: list[int] = []
    import lmforge.data.loader as loader

    real = loader.eval_batches  # (imported by evaluate_checkpoint when it runs)
    monkeypatch.setattr(loader, "eval_batches", lambda *a, **kw: sizes.append(kw["batch_size"]) or real(*a, **kw))
    one = lm.evaluate_checkpoint(str(run), split="val", max_batches=2)
    env = json.loads((run / "env.json").read_text(encoding="utf-8"))
    assert env["world_size"] == 1
    (run / "env.json").write_text(json.dumps({**env, "world_size": 2}), encoding="utf-8")  # as torchrun's 2 ranks
    two = lm.evaluate_checkpoint(str(run), split="val", max_batches=2)
    assert sizes == [8, 4]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6) and two["tokens"] == one["tokens"]
    (run / "env.json").write_text(json.dumps({**env, "world_size": 3}), encoding="utf-8")  # 8 does not split
    lm.evaluate_checkpoint(str(run), split="val", max_batches=2)
    assert sizes[-1] == 8
