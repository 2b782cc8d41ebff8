"""bench/cost_model.py on the tiny preset: the profiler breakdown covers the whole step and the
training state is counted exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cost_model  # noqa: E402


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("aten::addmm", "matmul"),
        ("aten::linear", "matmul"),
        ("autograd::engine::evaluate_function: MmBackward0", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
        ("aten::native_layer_norm", "norms"),
        ("autograd::engine::evaluate_function: NativeLayerNormBackward0", "norms"),
        ("aten::gelu", "elementwise"),
        ("aten::add_", "elementwise"),
        ("Optimizer.step#AdamW.step", "optimizer"),
        ("aten::_foreach_mul_", "optimizer"),
        ("aten::cross_entropy_loss", "cross-entropy"),
        ("lmforge.data", "data"),
        ("aten::embedding", None),
        ("aten::admm", None),
    ],
)
def test_categories(name, category):
    assert cost_model._category(name) == category


def test_measure_tiny():
    r = cost_model.measure("tiny", batch=2, steps=1, warmup=1, peak=1e11)
    params = r["params_m"] * 1e6
    assert r["shape"] == "2x128"
    assert r["tok_s"] == pytest.approx(2 * 128 / (r["ms_step"] / 1000))
    # fp32 weights + AdamW's two moments (+ its scalar step counters); the loop frees grads after each
    # step (zero_grad(set_to_none=True)), so they are part of the step peak instead
    assert r["state_mib"] * 2**20 == pytest.approx(12 * params, rel=0.001)
    assert r["step_mib"] * 2**20 > 4 * params
    assert r["step_mib"] > 2 * 128 * 4096 * 4 / 2**20  # at least the logits
    b = r["breakdown"]
    assert list(b) == cost_model.ORDER
    assert sum(b.values()) == pytest.approx(100, abs=0.01)
    for category in ("matmul", "attention", "norms", "elementwise", "optimizer", "cross-entropy"):
        assert b[category] > 0, category
