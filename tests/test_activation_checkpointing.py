"""Activation checkpointing: same numbers, less memory kept between forward and backward."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lmforge.dist import apply_activation_checkpointing
from lmforge.estimate import measure_cpu_allocations
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.train.run import pretrain
from tests.conftest import tiny_config


def test_training_with_checkpointing_gives_the_same_weights(data_dir: Path, tmp_path: Path) -> None:
    flags = {"train.max_steps": 4, "eval.every": 0, "checkpoint.every": 4, "model.dropout": 0.1}
    pretrain(tiny_config(data_dir, tmp_path / "plain", **flags), progress=False)
    pretrain(
        tiny_config(data_dir, tmp_path / "ac", **flags, **{"train.activation_checkpointing": True}), progress=False
    )
    a = load_file(str(tmp_path / "plain" / "checkpoints" / "step-000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "ac" / "checkpoints" / "step-000004" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:  # dropout masks are replayed in the recomputation, so even dropout runs match
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_checkpointing_lowers_the_memory_peak_and_keeps_inference_working() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, max_seq_len=128, n_layer=6, n_head=4, d_model=64)
    x = torch.randint(0, 64, (8, 128))

    def peak(model: GPT) -> int:
        return measure_cpu_allocations(lambda: model(x).float().logsumexp(-1).sum().backward())

    plain = GPT(cfg)
    plain.init_weights()
    ac = GPT(cfg)
    ac.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(ac) == 6
    assert peak(ac) < 0.6 * peak(plain)
    for p, q in zip(plain.parameters(), ac.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ac(x), plain(x))
