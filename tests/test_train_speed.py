"""bench/train_speed.py's profile breakdown (kernel names as an H200 profile printed them) and its
`--inductor` option parsing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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


def test_inductor_options_are_parsed_and_unknown_keys_refused():
    import torch._inductor.config as inductor_config

    # inductor's own `patch`, not monkeypatch: the config module keeps its values outside its __dict__, so
    # monkeypatch's undo deleted the option, and a later compile in this process failed ("... does not exist")
    with inductor_config.patch(coordinate_descent_tuning=False):
        train_speed.set_inductor_options(["coordinate_descent_tuning=true"])
        assert inductor_config.coordinate_descent_tuning is True
    assert hasattr(inductor_config, "coordinate_descent_tuning")
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


def test_mfu_never_exceeds_one_when_the_measured_peak_is_below_the_training_rate(monkeypatch):
    # bf16 on a CPU without AVX512-BF16/AMX: the emulated 1024^3 matmul measured 0.8 GFLOP/s while the
    # tiny preset's small matmuls reached 1.7, and the table printed MFU 219.7%
    monkeypatch.setattr(train_speed, "measure_matmul_flops", lambda *args, **kwargs: 1.0)  # 1 FLOP/s
    r = train_speed.bench("tiny", batch=2, steps=1, warmup=0, dtype="float32", device="cpu")
    assert r["measured_peak"] == 1e-12
    assert r["mfu"] == 1.0 and r["peak"] == pytest.approx(r["tflops"])


def bench_exit(monkeypatch, capsys, main, argv: list[str]) -> str:
    """Run a bench script's `main` as `python bench/SCRIPT argv...` does; its stderr, after exit code 2."""
    import bench_cli

    monkeypatch.setattr(sys, "argv", ["bench/script.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.run(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--steps", "-1"], "--steps: expected an integer >= 0, got -1"),  # printed negative speeds
        (["--accum", "0"], "--accum: expected an integer >= 1, got 0"),  # a ConfigError traceback
        (["--profile", "x"], "--profile: expected an integer, got 'x'"),
        (["--presets", "tiny", "--dtype", "float16", "--device", "cpu"], "float16 autocast is not supported"),
    ],
)
def test_train_speed_bad_options_are_one_line(monkeypatch, capsys, argv, said):
    assert said in bench_exit(monkeypatch, capsys, train_speed.main, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_speed_on_cuda_without_cuda_is_one_line(monkeypatch, capsys):
    err = bench_exit(monkeypatch, capsys, train_speed.main, ["--device", "cuda", "--presets", "tiny"])
    assert "--device cuda but no CUDA GPU is visible; use --device cpu" in err  # was torch's AssertionError


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--shape", "1,2,32"], "expected n_layer,n_head,d_model,context"),  # a ValueError traceback
        (["--rounds", "0"], "--rounds: expected an integer >= 1"),  # statistics.median of nothing
        (["--steps", "0"], "--steps: expected an integer >= 1"),  # ZeroDivisionError
    ],
)
def test_vs_hf_bad_options_are_one_line(monkeypatch, capsys, argv, said):
    import vs_hf

    assert said in bench_exit(monkeypatch, capsys, vs_hf.main, argv)


def test_speedrun_reads_configs_from_the_working_directory(monkeypatch, capsys, tmp_path):
    import speedrun

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.toml").write_text("[train]\nmax_steps = 3\n", encoding="utf-8")
    assert speedrun.config_path("mine.toml") == str(tmp_path / "mine.toml")  # runs start in the repository
    assert speedrun.config_path(speedrun.SPEEDRUN) == str(speedrun.REPO / speedrun.SPEEDRUN)
    err = bench_exit(monkeypatch, capsys, speedrun.main, ["--configs", "missing.toml"])
    assert "config file 'missing.toml' not found" in err  # before the peak measurement and the data preparation


@pytest.mark.parametrize(
    ("script", "argv", "said"),
    [
        ("cost_model", ["--steps", "-1"], "--steps: expected an integer >= 0, got -1"),  # negative ms/step
        ("generate_speed", ["--new", "0"], "--new: expected an integer >= 1, got 0"),
        ("generate_speed", ["--rounds", "0"], "--rounds: expected an integer >= 1, got 0"),
        # the scripts below took any int or float: tracebacks, a hang (--workers 0), nonsense tables (--tokens 0)
        ("estimate_vs_measured", ["--steps", "-1"], "--steps: expected an integer >= 0, got -1"),
        ("faults", ["--kills", "5", "--steps", "4"], "--kills 5 needs --steps of at least 7, got 4"),
        ("faults", ["--steps", "0"], "--steps: expected an integer >= 3, got 0"),
        ("finetune_modes", ["--n-train", "0"], "--n-train: expected an integer >= 2, got 0"),
        ("finetune_tasks", ["--n-test", "0"], "--n-test: expected an integer >= 1, got 0"),
        ("quantize", ["--tokens", "0"], "--tokens: expected an integer >= 1, got 0"),
        ("quantize", ["--run", "no/such/run", "--steps", "0"], "no/such/run does not exist; pass a run directory"),
        ("long_document", ["--size-mb", "0"], "--size-mb: expected a finite number > 0, got 0"),
        ("prepare_speed", ["--workers", "0"], "--workers: expected an integer >= 1, got 0"),
        ("architectures", ["--batch", "0"], "--batch: expected an integer >= 1, got 0"),
        ("gguf_llamacpp", ["run", "--new-tokens", "-3"], "--new-tokens: expected an integer >= 1, got -3"),
    ],
)
def test_other_speed_benches_refuse_bad_counts_in_one_line(monkeypatch, capsys, script, argv, said):
    import importlib

    assert said in bench_exit(monkeypatch, capsys, importlib.import_module(script).main, argv)
