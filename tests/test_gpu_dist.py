"""CUDA under torchrun: NCCL process groups, DDP and bf16 FSDP2, and `train.compile` on the GPU.

Marked `gpu` and `dist`; skipped cleanly without CUDA (CI has none). NCCL allows one rank per GPU, and
`pretrain` at world size 1 starts no process group, so on a 1-GPU machine the NCCL group, the wrappers
and the bf16 mixed-precision policy are exercised by `gpu_nccl_worker.py` (a group of one), and the
2-rank `pretrain` comparison runs only where 2 GPUs are visible. Run with `pytest -m gpu` on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, tiny_config
from tests.test_dist import FLAGS, STEPS, free_port, torchrun, train_losses, weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.dist,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = {"train.device": "cuda", "train.dtype": "bfloat16", "train.micro_batch_size": 2}


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module")
def single_cuda(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process on the GPU, bf16 autocast, micro-batch 2 x accumulation 4."""
    from lmforge.train.run import pretrain

    out = tmp_path_factory.mktemp("single-cuda") / "run"
    pretrain(tiny_config(data_dir, out, **FLAGS, **CUDA), progress=False)
    return out


def test_nccl_collectives_and_the_ddp_and_bf16_fsdp2_wrappers(tmp_path: Path):
    """Every GPU here in one NCCL group (a 1-GPU machine makes a group of one, which `pretrain` would
    not start): lmforge's collectives, DDP and bf16 FSDP2 train like the plain model."""
    n = gpus()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1"]
    cmd += [f"--master-port={free_port()}", str(REPO / "tests" / "gpu_nccl_worker.py")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert (out["backend"], out["world"]) == ("nccl", n)
    assert out["sum"] == [n * (n + 1) / 2]
    assert out["gathered"] == [i for r in range(n) for i in range(r + 1)]  # ragged lengths, rank order
    ddp, fsdp = out["ddp"], out["fsdp"]
    assert ddp["wrapper"] == "DistributedDataParallel" and fsdp["wrapper"].startswith("FSDP")
    # DDP averages identical gradients: the plain model's steps, to float rounding
    assert ddp["losses"] == pytest.approx(ddp["reference"], rel=1e-4)
    assert ddp["keys_match"] and ddp["all_fp32"] and ddp["max_weight_diff"] < 1e-4
    # FSDP2 computes with bf16 parameters (autocast casts fp32 ones per op): close, and it learns
    assert fsdp["losses"] == pytest.approx(fsdp["reference"], rel=2e-2)
    assert fsdp["losses"][-1] < fsdp["losses"][0]
    # fp32 master weights, consolidated; bf16 noise can flip the sign of a tiny gradient's Adam update
    assert fsdp["keys_match"] and fsdp["all_fp32"] and fsdp["max_weight_diff"] < 4e-2


@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA GPUs (NCCL allows one rank per device)")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_equal_one_process_with_the_whole_batch(
    strategy: str, data_dir: Path, single_cuda: Path, tmp_path: Path
):
    out = tmp_path / "two"
    p = torchrun(data_dir, out, nproc=2, **{**CUDA, "train.micro_batch_size": 2, "dist.strategy": strategy})
    assert p.returncode == 0, p.stderr[-3000:]
    assert train_losses(out) == pytest.approx(train_losses(single_cuda), rel=2e-2)
    assert len(train_losses(out)) == STEPS


def test_compiled_training_on_cuda_matches_eager(data_dir: Path, single_cuda: Path, tmp_path: Path):
    from lmforge.train.run import pretrain

    out = tmp_path / "compiled"
    pretrain(tiny_config(data_dir, out, **FLAGS, **CUDA, **{"train.compile": True}), progress=False)
    # inductor fuses the bf16 elementwise ops differently: close, not bit-identical
    assert train_losses(out) == pytest.approx(train_losses(single_cuda), rel=2e-2)
    step = sorted((out / "checkpoints").glob("step-*"))[-1]
    keys = load_file(str(step / "model.safetensors")).keys()
    assert keys == weights(single_cuda).keys()  # no `_orig_mod.` prefix from the compile wrapper


def test_cli_eval_and_compiled_generate_on_cuda(single_cuda: Path):
    """The commands a user runs next on a GPU box: `eval` and `generate --compile` (same greedy text)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}

    def lmforge(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "lmforge", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)

    p = lmforge("eval", str(single_cuda), "--device", "cuda")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "perplexity" in p.stdout.lower() or "loss" in p.stdout.lower(), p.stdout
    flags = ["--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0", "--device", "cuda"]
    eager = lmforge("generate", str(single_cuda), *flags)
    compiled = lmforge("generate", str(single_cuda), *flags, "--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, (eager.stderr[-2000:], compiled.stderr[-2000:])
    assert "--compile failed" not in compiled.stderr
    assert compiled.stdout == eager.stdout and eager.stdout.strip(), (eager.stdout, compiled.stdout)


def test_pretrain_with_cudnn_attention_matches_flash(data_dir: Path, single_cuda: Path, tmp_path: Path):
    from lmforge.train.run import pretrain

    out = tmp_path / "cudnn"
    pretrain(tiny_config(data_dir, out, **FLAGS, **CUDA, **{"train.attention": "cudnn"}), progress=False)
    assert train_losses(out) == pytest.approx(train_losses(single_cuda), rel=2e-2)
