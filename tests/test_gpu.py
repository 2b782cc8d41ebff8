"""CUDA paths: bf16 autocast training, fused AdamW, KV-cache generation on the GPU.

Marked `gpu` and skipped cleanly when no CUDA device is visible (CI has none); run them on a GPU
machine with `pytest -m gpu`.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import OptimConfig
from lmforge.generate import generate
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import pick_device, pick_precision

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _model(device: torch.device) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, n_layer=2, n_head=4, d_model=64, max_seq_len=64, pos_emb="rope"))
    model = model.to(device)
    model.init_weights()
    return model


def test_auto_precision_and_fused_adamw_on_cuda():
    device = pick_device("auto")
    assert device.type == "cuda"
    precision = pick_precision(device, "auto")
    if torch.cuda.is_bf16_supported():
        assert precision.dtype == torch.bfloat16
    model = _model(device)
    optimizer = build_optimizer(model, OptimConfig(), lr=1e-3, device=device)
    assert optimizer.defaults.get("fused") is True
    x = torch.randint(0, 128, (4, 64), device=device)
    losses = []
    for _ in range(20):
        with precision.autocast():
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0  # memorises one batch under bf16


def test_kv_cache_generation_matches_no_cache_on_cuda():
    model = _model(torch.device("cuda"))
    prompt = [1, 2, 3, 4, 5]
    a = generate(model, prompt, max_new_tokens=20, temperature=0, use_cache=True)
    b = generate(model, prompt, max_new_tokens=20, temperature=0, use_cache=False)
    assert a == b


def _sdpa_ops(model: GPT, x: torch.Tensor, attention: str) -> tuple[set[str], torch.Tensor, list[torch.Tensor]]:
    """The aten SDPA ops one bf16 forward + backward ran under `train.attention`, its logits and grads."""
    precision = pick_precision(torch.device("cuda"), "bfloat16", attention)
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with precision.autocast():
            logits = model(x)
        logits.float().square().mean().backward()
    ops = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    return ops, logits.float(), [p.grad.float() for p in model.parameters()]


def test_train_attention_picks_the_cuda_kernel_and_the_kernels_agree():
    model = _model(torch.device("cuda"))
    x = torch.randint(0, 128, (4, 64), device="cuda")
    order = torch._C._get_sdp_priority_order()
    ops, flash_logits, flash_grads = _sdpa_ops(model, x, "flash")
    assert "aten::_scaled_dot_product_flash_attention" in ops
    assert "aten::_scaled_dot_product_cudnn_attention" not in ops
    ops, cudnn_logits, cudnn_grads = _sdpa_ops(model, x, "cudnn")
    assert "aten::_scaled_dot_product_cudnn_attention" in ops, ops
    assert "aten::_scaled_dot_product_flash_attention" not in ops
    # two bf16 kernels: equal to bf16 rounding, in the forward and in every parameter's gradient
    torch.testing.assert_close(cudnn_logits, flash_logits, rtol=2e-2, atol=2e-2)
    for a, b in zip(cudnn_grads, flash_grads, strict=True):
        assert (a - b).norm() <= 3e-2 * b.norm() + 1e-6
    # outside the context torch's own order is back (torch 2.11 puts cuDNN first on an H100 itself)
    assert torch._C._get_sdp_priority_order() == order


def test_compiled_generation_on_cuda_matches_eager(capsys: pytest.CaptureFixture[str]):
    from lmforge.generate import _compile_failed

    model = _model(torch.device("cuda"))
    prompt = [1, 2, 3, 4, 5]
    eager = generate(model, prompt, max_new_tokens=24, temperature=0)
    assert generate(model, prompt, max_new_tokens=24, temperature=0, compile=True) == eager
    assert model not in _compile_failed and "--compile failed" not in capsys.readouterr().err


def test_cuda_graphs_compile_mode_trains_as_the_default_mode(data_dir, tmp_path):
    """`--train.compile_mode reduce-overhead`: the compiled model and loss replay as CUDA graphs (none skipped),
    and the run's curve is the default mode's, to bf16 rounding (the same kernels, launched from a graph)."""
    from torch._dynamo.utils import counters

    from lmforge.train.run import pretrain
    from tests.conftest import tiny_config

    flags = {"train.device": "cuda", "train.compile": True, "checkpoint.every": 0}
    runs = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        counters.clear()
        pretrain(tiny_config(data_dir, tmp_path / mode, **flags, **{"train.compile_mode": mode}), progress=False)
        lines = (tmp_path / mode / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        runs[mode] = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
        if mode == "reduce-overhead":
            assert counters["inductor"]["cudagraph_skips"] == 0
    assert len(runs["default"]) == len(runs["reduce-overhead"]) == 12
    assert runs["reduce-overhead"] == pytest.approx(runs["default"], rel=2e-2)
    assert runs["default"][-1] < runs["default"][0]
