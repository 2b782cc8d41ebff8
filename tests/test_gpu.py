"""CUDA paths: bf16 autocast training, fused AdamW, KV-cache generation on the GPU.

Marked `gpu` and skipped cleanly when no CUDA device is visible (CI has none); run them on a GPU
machine with `pytest -m gpu`.
"""

from __future__ import annotations

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
