"""bench/train_speed.py's profile breakdown (kernel names as an H200 profile printed them) and its
`--inductor` option parsing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_speed  # noqa: E402


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1", "attention"),
        ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)", "other"),
        ("triton_poi_fused_gelu_gelu_backward_view_5", "gelu/activation"),
        ("triton_red_fused__log_softmax__to_copy_prepare_softmax_online_view_0", "cross-entropy"),
        ("triton_per_fused__to_copy_add_native_layer_norm_backward_view_8", "norm"),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata>",
            "optimizer",
        ),
        ("triton_poi_fused__to_copy_view_1", "copy/fill"),
        ("triton_poi_fused_cat_transpose_view_10", "other (fused elementwise)"),
        ("aten::mm", "matmul"),
    ],
)
def test_kernel_kinds(name, kind):
    assert train_speed.kernel_kind(name) == kind


def test_inductor_options_are_parsed_and_unknown_keys_refused(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)
    train_speed.set_inductor_options(["coordinate_descent_tuning=true"])
    assert inductor_config.coordinate_descent_tuning is True
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        train_speed.set_inductor_options(["no_such_option=1"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        train_speed.set_inductor_options(["coordinate_descent_tuning"])


def test_profile_of_a_tiny_run_covers_its_steps():
    r = train_speed.bench("tiny", batch=2, steps=1, warmup=1, dtype="float32", device="cpu", profile=2)
    p = r["profile"]
    assert p["steps"] == 2 and p["wall_ms"] > 0
    assert sum(p["by_kind"].values()) == pytest.approx(sum(t for t, _ in p["kernels"].values()))
    assert p["by_kind"]["matmul"] > 0 and p["by_kind"]["attention"] > 0
    flops_per_token = r["tflops"] * 1e12 / r["tok_s"]  # 6 N_matmul + 12 L d T
    assert r["matmul_flops_step"] == pytest.approx(2 * 128 * (flops_per_token - 12 * 2 * 64 * 128), rel=1e-9)
