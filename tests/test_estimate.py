"""Compute planning (`lmforge.estimate`): parameter and FLOP counts against the real model, the activation
formula against what autograd really saves, the whole-step memory against PyTorch's allocator, scaling
of each memory component, time/cost arithmetic and one-line errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

from lmforge.config import CheckpointConfig, EvalConfig, OptimConfig, RunConfig, load_config
from lmforge.errors import ConfigError
from lmforge.estimate import (
    DEFAULT_VOCAB,
    PEAK_FLOPS,
    StepShape,
    activation_bytes,
    estimate,
    flops_per_token,
    measure_cpu_allocations,
    measure_matmul_flops,
    memory_bytes,
    param_counts,
)
from lmforge.estimate_table import _duration, format_estimate
from lmforge.log import RunLogger
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.objectives import causal_lm_loss
from lmforge.presets import PRESETS
from lmforge.train.loop import train
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import pick_precision
from lmforge.train.state import TrainState
from tests.conftest import run_cli

# every combination of the architecture switches, as in test_models.py
VARIANTS = [
    dict(pos_emb=p, norm=n, mlp=m, n_kv_head=kv, tie_embeddings=tie, bias=bias)
    for p, n, m, kv, tie, bias in itertools.product(
        ["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"], [0, 2], [True, False], [True, False]
    )
] + [dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=True, bias=False, qkv_bias=True)]
GFLOPS = "1000"  # a given peak (1 TFLOP/s): no measurement, exact arithmetic


def small_cfg(**model: object) -> GPTConfig:
    return GPTConfig(**{"vocab_size": 100, "max_seq_len": 32, "n_layer": 2, "n_head": 4, "d_model": 64, **model})


def run_cfg(model: dict | None = None, **sections: dict) -> RunConfig:
    return load_config(preset="tiny", overrides={"model": {"vocab_size": 512, **(model or {})}, **sections})


def meta_model(cfg: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


# --------------------------------------------------------------------------------------------
# parameters and FLOPs


@pytest.mark.parametrize("preset", [p for p in PRESETS if load_config(preset=p).model.family == "gpt"])
def test_params_and_flops_match_every_preset(preset: str) -> None:  # estimate covers the GPT family only
    cfg = load_config(preset=preset)
    result = estimate(cfg, tokens=1000, hardware=GFLOPS)
    model_cfg = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=DEFAULT_VOCAB)
    model = meta_model(model_cfg)
    assert result["params"] == model.num_params(non_embedding=False)
    assert result["non_embedding_params"] == model.num_params(non_embedding=True)
    assert result["flops_per_token"] == model.flops_per_token(model_cfg.max_seq_len)
    assert result["model"]["vocab_size"] == model_cfg.vocab_size


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_params_and_flops_match_every_variant(variant: dict) -> None:
    cfg = small_cfg(d_ff=96 if variant["mlp"] == "swiglu" else 0, **variant)
    model = meta_model(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params(non_embedding=False)
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    assert counts["block"] == sum(p.numel() for p in model.blocks[0].parameters())
    for seq_len in (1, 17, 32):
        assert flops_per_token(cfg, seq_len) == model.flops_per_token(seq_len)


def test_gpt2_124m_is_the_published_size() -> None:
    result = estimate(load_config(preset="gpt2-124m"), tokens=10**9, hardware="a100")
    assert result["params"] == 124_439_808  # HF gpt2: 124,439,808 parameters
    assert 0.10 < result["attention_flops_share"] < 0.15  # 12*12*768*1024 / (6*N_matmul + that)


# --------------------------------------------------------------------------------------------
# activation memory: the formula against the tensors autograd saves


def saved_activation_bytes(cfg: GPTConfig, dtype: str, batch: int, seq_len: int) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward + loss (parameters excluded)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(x)
        causal_lm_loss(logits, y)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
        dict(pos_emb="rope", n_kv_head=1),
        dict(dropout=0.1),  # CPU: SDPA's math path, s x s maps kept, dropout masks
        dict(dropout=0.1, norm="rmsnorm", mlp="swiglu", n_kv_head=2),
    ],
    ids=["gpt2", "llama", "rope-mqa", "dropout", "llama-dropout"],
)
def test_activation_formula_matches_saved_tensors(variant: dict, dtype: str) -> None:
    # Measured over all 64 switch combinations, with and without dropout, fp32 and bf16: worst 1.4% (small
    # bf16 copies of the rotary tables and one math-path buffer are left out); 3% leaves room, not slack.
    cfg = small_cfg(**variant)
    step = StepShape(seq_len=32, micro_batch=4, dtype=dtype, device="cpu")
    act = activation_bytes(cfg, step)
    predicted = act["layers"] + act["head"]
    if dtype == "bfloat16":  # the saved bf16 weight copies are a memory component of their own
        predicted += memory_bytes(cfg, OptimConfig(), step)["autocast_copies"]
    measured = saved_activation_bytes(cfg, dtype, batch=4, seq_len=32)
    assert predicted == pytest.approx(measured, rel=0.03)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", [{}, dict(n_kv_head=1)], ids=["llama", "llama-mqa"])
def test_rotary_tables_are_counted_as_autograd_keeps_them(variant: dict, dtype: str) -> None:
    """The rotary cos/sin rows q and k are multiplied by are kept for backward: once in fp32, or each layer's cast
    copy under autocast. Left out, the pretraining plan was 3.1% (fp32) and 8.6% (bf16) under the saved tensors of
    this 4-layer, 256-position Llama step; now equal to them (the loss's 0-d output: 4 B)."""
    cfg = small_cfg(**{**LLAMA, **variant}, max_seq_len=256, n_layer=4)
    step = StepShape(seq_len=256, micro_batch=1, dtype=dtype, device="cpu")
    predicted = activation_bytes(cfg, step)["layers"] + activation_bytes(cfg, step)["head"]
    predicted += memory_bytes(cfg, OptimConfig(), step)["autocast_copies"]
    assert predicted == pytest.approx(saved_activation_bytes(cfg, dtype, batch=1, seq_len=256), abs=8)
    model = GPT(cfg)  # the rotary buffers: max_seq_len x head_dim fp32 each (they were counted at half that)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory_bytes(cfg, OptimConfig(), step)["weights"] == 4 * param_counts(cfg)["total"] + buffers


@pytest.mark.parametrize(
    "vocab, d_model, batch, seq, variant",
    [
        (64, 64, 8, 64, {}),
        (2048, 64, 8, 64, {}),
        (8192, 64, 8, 64, {}),
        (64, 128, 1, 16, {}),
        (64, 128, 1, 16, "llama"),
        (64, 128, 1, 64, "bf16"),
    ],
    ids=[
        "layers-dominate",
        "logits-dominate",
        "logits-only",
        "weights-dominate",
        "weights-dominate-llama",
        "weights-dominate-bf16",
    ],
)
def test_total_matches_allocator_peak_of_a_real_training_step(
    vocab: int, d_model: int, batch: int, seq: int, variant: dict | str
) -> None:
    """The predicted total against the real loop's peak, counted by PyTorch's CPU allocator (torch.profiler).

    Measured when written: +6% (vocab 64) and +4% (vocab 2048); the estimate is meant as an upper bound
    (it adds all gradients to all activations), so the check is 0.95x .. 1.25x. Leaving out the loss terms
    (log-probs, the two logits-sized gradients) fails the vocab-2048 case; counting the logits as kept (the
    loop no longer holds them) had drifted to +24% there and fails vocab 8192 (+30%; +5% without). With a
    tiny batch the weights dominate, and the final (logging) step's copy of them for the update ratio is the
    peak: left out, the estimate was 19% under the allocator's count; with it, 2.1% (GPT-2) and 3.2% (Llama) under,
    until the update of the largest weight (p - copy, one at a time) was counted too: now within 0.1%. Under bf16
    autocast the cast weights were counted through that update, which comes after backward has freed them: +9.6%.
    """
    dtype = "bfloat16" if variant == "bf16" else "float32"
    variant = LLAMA if variant == "llama" else {} if variant == "bf16" else variant
    cfg = run_cfg(
        model={"vocab_size": vocab, "n_layer": 3, "d_model": d_model, "max_seq_len": seq, **variant},
        train={"batch_size": batch, "max_steps": 2, "warmup_steps": 0, "device": "cpu", "dtype": dtype},
    )
    predicted = estimate(cfg, tokens=1, hardware=GFLOPS)["memory_bytes"]["total"]

    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.init_weights()
    precision = pick_precision(torch.device("cpu"), dtype)
    optimizer = build_optimizer(model, cfg.optim, lr=1e-3, device=torch.device("cpu"))
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    loader = itertools.repeat((tokens[:, :-1], tokens[:, 1:]))

    def run(steps: int) -> None:
        train(
            model,
            optimizer,
            loader,
            cfg=dataclasses.replace(cfg.train, max_steps=steps),
            optim_cfg=cfg.optim,
            eval_cfg=EvalConfig(every=0),
            ckpt_cfg=CheckpointConfig(every=0),
            precision=precision,
            state=TrainState(),
            log=RunLogger(None, max_steps=steps, start_step=0, enabled=False),
            save=lambda s: None,
        )

    run(1)  # creates the optimizer state: from here on only parameters and moments persist
    persistent = sum(p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()])
    persistent += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    transient = measure_cpu_allocations(lambda: run(2))
    measured = persistent + transient
    low, high = (0.995, 1.005) if batch == 1 else (0.95, 1.25)  # (the weights' peak is exact; activations' loose)
    assert low * measured <= predicted <= high * measured, (predicted, measured)


# --------------------------------------------------------------------------------------------
# memory components


def test_fsdp_shards_weights_gradients_and_optimizer() -> None:
    cfg = run_cfg()
    n = estimate(cfg, tokens=1, hardware=GFLOPS)["params"]
    single = estimate(cfg, tokens=1, hardware=GFLOPS)["memory_bytes"]
    ddp = estimate(cfg, tokens=1, hardware=GFLOPS, world_size=4)["memory_bytes"]
    fsdp = estimate(cfg, tokens=1, hardware=GFLOPS, world_size=4, strategy="fsdp")["memory_bytes"]
    assert single["weights"] == 4 * n and single["gradients"] == 4 * n and single["optimizer"] == 8 * n
    for key in ("weights", "gradients", "optimizer"):
        assert ddp[key] == single[key]  # DDP replicates the model state
    assert ddp["comm_buffers"] == single["gradients"] and single["comm_buffers"] == 0
    for key in ("weights", "gradients", "optimizer"):
        assert fsdp[key] == pytest.approx(single[key] / 4, abs=1)
    # activations are per device: micro_batch_size 0 means the global batch split over the ranks, as
    # training runs it, so a quarter of the sequences per forward on each of 4 ranks
    quarter = run_cfg(train={"micro_batch_size": cfg.train.batch_size // 4})
    per_rank = estimate(quarter, tokens=1, hardware=GFLOPS)["memory_bytes"]["activations"]
    assert ddp["activations"] == fsdp["activations"] == per_rank < single["activations"]
    # an explicit micro-batch is per rank (a global batch of 4 x 16, as training needs for 4 ranks)
    pinned = run_cfg(train={"batch_size": 4 * cfg.train.batch_size, "micro_batch_size": cfg.train.batch_size})
    assert (
        estimate(pinned, tokens=1, hardware=GFLOPS, world_size=4)["memory_bytes"]["activations"]
        == single["activations"]
    )
    assert fsdp["total"] < ddp["total"]


def test_diloco_memory_and_communication_by_hand() -> None:
    """DiLoCo: DDP's model state, no gradient buckets but the sync's flat outer gradient (4 B/param), the fp32
    anchor + outer momentum (8 B/param), and one all-reduce (2 x 4 B/param per device) every sync_every steps
    and at the last step; `strategy` defaults to the config's dist.strategy."""
    cfg = run_cfg(dist={"strategy": "diloco", "sync_every": 10})
    tokens = 25 * cfg.train.batch_size * cfg.model.max_seq_len  # 25 steps: syncs at 10, 20 and 25
    ddp = estimate(cfg, tokens=tokens, hardware=GFLOPS, world_size=4, strategy="ddp")
    diloco = estimate(cfg, tokens=tokens, hardware=GFLOPS, world_size=4)
    n, mem = ddp["params"], diloco["memory_bytes"]
    assert diloco["strategy"] == "diloco" and diloco["sync_every"] == 10 and diloco["steps"] == 25
    for key in ("weights", "gradients", "optimizer", "activations"):
        assert mem[key] == ddp["memory_bytes"][key]
    assert mem["outer_state"] == 8 * n and mem["comm_buffers"] == 4 * n and ddp["memory_bytes"]["outer_state"] == 0
    assert mem["total"] == ddp["memory_bytes"]["total"] + 8 * n
    # traffic sent and received, ring all-reduce 2(n-1)/n x 4 B/param each way: the bytes of `communication`, which
    # the run's own DiLoCo line counts too (it was ~2x the gradients, 8 B/param, another total for the same run)
    assert ddp["comm_bytes"] == 25 * 2 * 6 * n and diloco["comm_bytes"] == 3 * 2 * 6 * n
    assert diloco["comm_bytes"] == 2 * diloco["communication"]["bytes_per_sync"] * diloco["communication"]["syncs"]
    from lmforge.dist import DiLoCo

    worker = DiLoCo(meta_model(cfg.model), cfg.dist, torch.device("meta"))
    worker.syncs = 3
    said = f"{diloco['comm_bytes'] / 2**20:.1f} MiB for 25 steps vs {ddp['comm_bytes'] / 2**20:.1f} MiB with DDP"
    assert said in worker.comm_report(4, 25), (said, worker.comm_report(4, 25))
    one = estimate(cfg, tokens=tokens, hardware=GFLOPS)  # one worker: no traffic, the outer state all the same
    assert one["comm_bytes"] == 0 and one["memory_bytes"]["outer_state"] == 8 * n
    fsdp = estimate(cfg, tokens=tokens, hardware=GFLOPS, world_size=4, strategy="fsdp")
    assert fsdp["comm_bytes"] == 2 * 25 * fsdp["communication"]["bytes_per_sync"] > 0
    text = format_estimate(diloco)
    assert "4 x 1000 GFLOP/s GPU, diloco, every 10 steps" in text and "outer state (diloco)" in text
    from tests.conftest import run_cli  # the CLI's --strategy defaults to --dist.strategy too

    args = ["--preset", "tiny", "--model.vocab_size", "512", "--tokens", str(tokens), "--hardware", GFLOPS]
    p = run_cli(
        "estimate", *args, "--dist.strategy", "diloco", "--dist.sync_every", "10", "--world-size", "4", "--json"
    )
    assert p.returncode == 0 and json.loads(p.stdout) == json.loads(json.dumps(diloco)), p.stderr


def test_communication_time_by_hand() -> None:
    """--interconnect: each device's bytes per sync over the link, and what compute does not hide, added to the
    time. World 4, 8 Gbit/s (1e9 B/s), 1 TFLOP/s at MFU 0.5, 25 steps, micro-batch 2 (2 per step per device)."""
    model = {"d_model": 512, "n_layer": 4, "n_head": 8}  # 13.3M parameters: 53 MB of fp32 gradients, 3 DDP buckets
    cfg = run_cfg(
        model, train={"micro_batch_size": 2, "dtype": "bfloat16"}, dist={"strategy": "diloco", "sync_every": 10}
    )
    tokens = 25 * 16 * 128
    counts = param_counts(dataclasses.replace(cfg.model, vocab_size=512))
    n, root = counts["total"], counts["root"]
    step_s = flops_per_token(cfg.model, 128) * 16 * 128 / (1e12 * 0.5 * 4)  # compute of one step, per device

    def run(strategy: str, gbps: float | None = 8, world_size: int = 4) -> dict:
        return estimate(cfg, tokens=tokens, hardware=GFLOPS, mfu=0.5, world_size=world_size, strategy=strategy,
                        interconnect=gbps)  # fmt: skip

    ddp = run("ddp")
    c = ddp["communication"]
    assert c["bytes_per_sync"] == math.ceil(2 * 3 / 4 * 4 * n) and c["syncs"] == 25 and c["link_gbps"] == 8
    assert c["sync_s"] == pytest.approx(6 * n / 1e9) and c["time_s"] == pytest.approx(25 * 6 * n / 1e9)
    backward = 2 / 3 * step_s / 2  # the last of 2 micro-batches' backward
    last_bucket = 2 * 3 / 4 * 25 * 2**20 / 1e9
    assert 6 * n / 1e9 - backward > last_bucket  # (this link is slow enough that the all-reduce outlasts it)
    assert c["exposed_s"] == pytest.approx(25 * (6 * n / 1e9 - backward))
    assert ddp["compute_time_s"] == pytest.approx(ddp["train_flops"] / (1e12 * 0.5 * 4))
    assert ddp["time_s"] == pytest.approx(ddp["compute_time_s"] + c["exposed_s"])
    assert ddp["cost_usd"] is None and ddp["comm_bytes"] == 2 * 25 * c["bytes_per_sync"]  # (one total)
    fast = run("ddp", 3600)["communication"]  # NVLink: all but the last bucket hides behind backward
    assert fast["exposed_s"] == pytest.approx(25 * 2 * 3 / 4 * 25 * 2**20 / 450e9)

    fsdp = run("fsdp")["communication"]  # bf16 gathers in forward (all) and backward (blocks), per micro-batch
    sent = math.ceil(3 / 4 * (2 * 2 * (2 * n - root) + 4 * n))
    assert fsdp["bytes_per_sync"] == sent and fsdp["syncs"] == 25
    assert fsdp["exposed_s"] == pytest.approx(25 * max(sent / 1e9 - step_s, 0)) and fsdp["exposed_s"] > 0

    diloco = run("diloco")  # syncs at 10, 20 and 25; the workers wait for each
    assert diloco["communication"]["syncs"] == 3 and diloco["communication"]["exposed_s"] == pytest.approx(18 * n / 1e9)
    assert diloco["time_s"] == pytest.approx(diloco["compute_time_s"] + 18 * n / 1e9)

    none = run("ddp", None)  # no interconnect given: bytes, no time; the time is compute, and says so
    assert none["communication"]["bytes_per_sync"] == c["bytes_per_sync"] and none["communication"]["sync_s"] is None
    assert none["time_s"] == none["compute_time_s"] and any("--interconnect" in a for a in none["assumptions"])
    one = run("ddp", 8, world_size=1)["communication"]
    assert one["bytes_per_sync"] == 0 and one["exposed_s"] == 0
    text = format_estimate(ddp)
    assert re.search(r"comm time +\d+\.\d\d MiB sent per device per step: ring all-reduce", text), text
    assert f"({_duration(ddp['compute_time_s'])} compute + {_duration(c['exposed_s'])} communication)" in text
    assert "all hidden by compute" in format_estimate(run("fsdp", 3600))


def test_diloco_memory_over_plain_training_matches_the_allocator() -> None:
    """What DiLoCo adds to a step's peak (outer state + the sync's buffers), predicted against PyTorch's CPU
    allocator: the real loop with a 1-worker DiLoCo syncing after every step, minus the same loop without it.
    A model-state-dominated shape (batch 1 x 16 tokens), so the difference is not lost in the activations.
    Measured when written: 11.4 B/param added vs 12 predicted (the flat outer gradient of a sync is built
    from per-parameter differences, briefly 8 B/param, while the gradients are already freed)."""
    from lmforge.dist import DiLoCo

    def measured_peak(strategy: str) -> tuple[int, int]:
        cfg = run_cfg(
            model={"vocab_size": 64, "n_layer": 2, "d_model": 128, "max_seq_len": 16},
            train={"batch_size": 1, "max_steps": 2, "warmup_steps": 0, "device": "cpu", "dtype": "float32"},
            dist={"strategy": strategy, **({"sync_every": 1} if strategy == "diloco" else {})},
        )
        torch.manual_seed(0)
        model = GPT(cfg.model)
        model.init_weights()
        optimizer = build_optimizer(model, cfg.optim, lr=1e-3, device=torch.device("cpu"))
        diloco = DiLoCo(model, cfg.dist, torch.device("cpu")) if strategy == "diloco" else None
        batch = torch.randint(0, 64, (1, 17))

        def run(steps: int) -> None:
            train(
                model,
                optimizer,
                itertools.repeat((batch[:, :-1], batch[:, 1:])),
                cfg=dataclasses.replace(cfg.train, max_steps=steps),
                optim_cfg=cfg.optim,
                eval_cfg=EvalConfig(every=0),
                ckpt_cfg=CheckpointConfig(every=0),
                precision=pick_precision(torch.device("cpu"), "float32"),
                state=TrainState(),
                log=RunLogger(None, max_steps=steps, start_step=0, enabled=False),
                save=lambda s: None,
                after_step=diloco.after_step if diloco else None,
            )

        run(1)  # creates the optimizer state
        persistent = sum(p.numel() * p.element_size() for p in model.parameters())
        persistent += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
        if diloco is not None:
            persistent += sum(t.numel() * t.element_size() for t in diloco.state_dict().values())  # anchor, momentum
        measured = persistent + measure_cpu_allocations(lambda: run(2))
        assert diloco is None or diloco.syncs == 2  # (the second run's step 1 was synced by the first)
        return measured, estimate(cfg, tokens=1, hardware=GFLOPS)["memory_bytes"]["total"]

    plain, plain_predicted = measured_peak("ddp")
    diloco, diloco_predicted = measured_peak("diloco")
    assert diloco_predicted - plain_predicted == pytest.approx(diloco - plain, rel=0.1)


def test_optimizer_state_by_optimizer() -> None:
    adamw = estimate(run_cfg(), tokens=1, hardware=GFLOPS)
    sgd = estimate(run_cfg(optim={"name": "sgd"}), tokens=1, hardware=GFLOPS)
    plain = estimate(run_cfg(optim={"name": "sgd", "momentum": 0.0}), tokens=1, hardware=GFLOPS)
    assert adamw["memory_bytes"]["optimizer"] == 2 * 4 * adamw["params"]
    assert sgd["memory_bytes"]["optimizer"] == 4 * sgd["params"]
    assert plain["memory_bytes"]["optimizer"] == 0


@pytest.mark.parametrize("name", ["adamw", "muon", "sgd"])
@pytest.mark.parametrize("tied", [True, False])
def test_optimizer_state_matches_the_built_optimizer(name: str, tied: bool) -> None:
    """The predicted optimizer bytes are those of the state the real optimizer holds after one step (its
    scalar `step` counters, 4 B per tensor, left out). Muon was estimated as one 4 B buffer per parameter
    (SGD's optim.momentum), though embeddings, head, norms and biases get AdamW's two moments."""
    cfg = run_cfg(model={"tie_embeddings": tied}, optim={"name": name})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.init_weights()
    optimizer = build_optimizer(model, cfg.optim, lr=1e-3, device=torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (2, 8))
    causal_lm_loss(model(x), x).backward()
    optimizer.step()
    held = sum(t.nbytes for st in optimizer.state.values() for k, t in st.items() if k != "step")
    predicted = estimate(cfg, tokens=1, hardware=GFLOPS)["memory_bytes"]["optimizer"]
    assert predicted == held


def test_checkpointing_reduces_activations_and_grows_with_depth_more_slowly() -> None:
    said = "train.activation_checkpointing is on: this run's peak is 'total, checkpointed'"
    assert said in estimate(run_cfg(train={"activation_checkpointing": True}), tokens=1, hardware=GFLOPS)["assumptions"]
    assert said not in estimate(run_cfg(), tokens=1, hardware=GFLOPS)["assumptions"]
    shallow, deep = run_cfg(model={"n_layer": 2}), run_cfg(model={"n_layer": 24})
    mem = [estimate(c, tokens=1, hardware=GFLOPS)["memory_bytes"] for c in (shallow, deep)]
    for m in mem:
        assert m["activations_checkpointed"] < m["activations"]
        assert m["total_checkpointed"] < m["total"]
    full_growth = mem[1]["activations"] - mem[0]["activations"]
    ckpt_growth = mem[1]["activations_checkpointed"] - mem[0]["activations_checkpointed"]
    assert ckpt_growth < full_growth / 5  # one fp32 block input per extra layer instead of all its tensors


def test_bf16_halves_matmul_activations_but_not_weights() -> None:
    cfg = small_cfg(vocab_size=64)
    fp32 = activation_bytes(cfg, StepShape(seq_len=32, micro_batch=8, dtype="float32", device="cuda"))
    bf16 = activation_bytes(cfg, StepShape(seq_len=32, micro_batch=8, dtype="bfloat16", device="cuda"))
    # per layer: 2 fp32 residual inputs (+ norm stats) stay, the rest halves; fp32 loss terms stay
    assert 0.5 * fp32["per_layer"] < bf16["per_layer"] < 0.65 * fp32["per_layer"]
    assert bf16["loss_backward"] == fp32["loss_backward"]
    m32, m16 = (
        memory_bytes(cfg, OptimConfig(), StepShape(seq_len=32, micro_batch=8, dtype=d, device="cuda"))
        for d in ("float32", "bfloat16")
    )
    assert m16["weights"] == m32["weights"] and m16["gradients"] == m32["gradients"]  # fp32 master weights
    assert m32["autocast_copies"] == 0 and m16["autocast_copies"] == 2 * param_counts(cfg)["matmul"]


def test_activations_scale_with_micro_batch_not_global_batch() -> None:
    one = estimate(run_cfg(train={"batch_size": 16, "micro_batch_size": 4}), tokens=1, hardware=GFLOPS)
    two = estimate(run_cfg(train={"batch_size": 16, "micro_batch_size": 8}), tokens=1, hardware=GFLOPS)
    assert two["memory_bytes"]["activations"] == 2 * one["memory_bytes"]["activations"]
    assert one["tokens_per_step"] == two["tokens_per_step"] == 16 * 128


def test_math_attention_only_with_dropout_on_cpu() -> None:
    cfg = small_cfg(dropout=0.1)
    cpu = activation_bytes(cfg, StepShape(seq_len=32, micro_batch=1, dtype="float32", device="cpu"))
    gpu = activation_bytes(cfg, StepShape(seq_len=32, micro_batch=1, dtype="float32", device="cuda"))
    assert cpu["per_layer"] > gpu["per_layer"]  # s x s maps on CPU; flash keeps dropout's RNG state only
    no_dropout = activation_bytes(small_cfg(), StepShape(seq_len=32, micro_batch=1, dtype="float32", device="cpu"))
    assert no_dropout["per_layer"] < gpu["per_layer"]  # masks cost something even on GPU


# --------------------------------------------------------------------------------------------
# tokens, time, cost


def test_chinchilla_and_train_flops() -> None:
    result = estimate(run_cfg(), tokens=123_456, hardware=GFLOPS)
    assert result["chinchilla_tokens"] == 20 * result["params"]
    assert result["train_flops"] == result["flops_per_token"] * 123_456
    assert result["tokens"] == 123_456
    assert result["steps"] == -(-123_456 // (16 * 128))


def test_time_and_cost_arithmetic() -> None:
    result = estimate(run_cfg(), tokens=10**9, hardware=GFLOPS, mfu=0.5, world_size=4, price_per_hour=2.0)
    assert result["peak_flops"] == 1e12 and result["mfu"] == 0.5
    assert result["time_s"] == pytest.approx(result["train_flops"] / (1e12 * 0.5 * 4))
    assert result["cost_usd"] == pytest.approx(result["time_s"] / 3600 * 2.0 * 4)
    assert estimate(run_cfg(), tokens=10**9, hardware=GFLOPS)["cost_usd"] is None  # no default price for a number


def test_gpu_defaults() -> None:
    cfg = run_cfg()
    a100 = estimate(cfg, tokens=10**9, hardware="a100")
    assert a100["dtype"] == "bfloat16" and a100["peak_flops"] == PEAK_FLOPS["a100"]["bfloat16"] == 312e12
    assert a100["mfu"] == 0.4
    assert a100["cost_usd"] == pytest.approx(a100["time_s"] / 3600 * 1.8)
    h100 = estimate(run_cfg(train={"dtype": "float32"}), tokens=10**9, hardware="H100", world_size=8)
    assert h100["dtype"] == "float32" and h100["peak_flops"] == 67e12
    assert h100["cost_usd"] == pytest.approx(h100["time_s"] / 3600 * 2.5 * 8)


def test_cpu_hardware_measures_the_peak_at_the_train_dtype() -> None:
    result = estimate(run_cfg(), tokens=10**6, hardware="cpu")
    assert result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["peak_flops"] == measure_matmul_flops("cpu", torch.float32)  # cached: the same measurement
    assert result["mfu"] == 0.45 * 64 / 128  # tiny is 64 wide: the CPU default scaled by d_model / 128
    assert result["cost_usd"] == pytest.approx(result["time_s"] / 3600 * 0.05)
    assert any("scaled by d_model 64/128" in a for a in result["assumptions"])
    assert estimate(run_cfg(train={"device": "cpu"}), tokens=1, hardware="150")["mfu"] == 0.45 * 64 / 128
    for width in (128, 384):  # quickstart's and small's width: the measured 0.45
        assert estimate(run_cfg({"d_model": width}), tokens=1, hardware="cpu")["mfu"] == 0.45
    assert estimate(run_cfg(), tokens=1, hardware="h100")["mfu"] == 0.4  # GPUs are not scaled


def test_vocab_zero_is_assumed_and_said() -> None:
    result = estimate(load_config(preset="tiny"), tokens=1000, hardware=GFLOPS)
    assert result["model"]["vocab_size"] == DEFAULT_VOCAB
    assert any("vocab_size" in a and str(DEFAULT_VOCAB) in a for a in result["assumptions"])


def test_vocab_zero_with_a_data_dir_is_its_tokenizers(data_dir, tmp_path) -> None:
    """As pretrain sets it: the data's tokenizer (it was GPT-2's 50257 whatever --data.dir said)."""
    from lmforge.data.datadir import load_data_dir
    from lmforge.errors import DataError

    vocab = load_data_dir(data_dir).load_tokenizer().vocab_size
    result = estimate(
        load_config(preset="tiny", overrides={"data": {"dir": str(data_dir)}}), tokens=1000, hardware=GFLOPS
    )
    assert result["model"]["vocab_size"] == vocab != DEFAULT_VOCAB
    assert any(f"vocab_size {vocab}" in a and str(data_dir) in a for a in result["assumptions"])
    assert not any(str(DEFAULT_VOCAB) in a for a in result["assumptions"])
    given = load_config(preset="tiny", overrides={"data": {"dir": str(data_dir)}, "model": {"vocab_size": 512}})
    assert estimate(given, tokens=1000, hardware=GFLOPS)["model"]["vocab_size"] == 512  # a given size stays
    with pytest.raises(DataError, match="lmforge prepare"):
        estimate(load_config(preset="tiny", overrides={"data": {"dir": str(tmp_path)}}), tokens=1000, hardware=GFLOPS)


def test_result_is_json_and_formats() -> None:
    result = estimate(load_config(preset="gpt2-124m"), tokens=10**10, hardware="a100", world_size=8, strategy="fsdp")
    json.dumps(result)  # what `lmforge estimate --json` prints
    text = format_estimate(result)
    for word in ("124.44M", "Chinchilla", "activations", "total", "TFLOP/s", "$", "assumptions", "fsdp"):
        assert word in text
    assert "unknown" in format_estimate(estimate(run_cfg(), tokens=10**6, hardware=GFLOPS))  # no price
    # counts with thousands separators, as the rest of the product writes them ("vocab 50257" stood out), and
    # README's copy of the table shows the same line
    model_line = text.splitlines()[0]
    assert "d_ff 3,072, vocab 50,257," in model_line
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert model_line in readme.splitlines()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tokens=0), "tokens must be >= 1"),
        (dict(tokens=-5), "tokens must be >= 1"),
        (dict(tokens=0.5), "tokens must be >= 1, got 0.5"),  # int() made it 0 tokens, 0 steps
        (dict(tokens=float("inf")), "tokens must be a finite number, got inf"),  # said "must be >= 1, got inf"
        (dict(tokens=float("nan")), "tokens must be a finite number, got nan"),
        (dict(tokens=10, hardware=GFLOPS, price_per_hour=float("inf")), "price_per_hour must be >= 0 and finite"),
        # world sizes training refuses (TrainConfig.micro_batch_per_rank, shared with train/run.py): 16
        # sequences on 64 devices printed micro-batch 1, on 3 devices micro-batch 5
        (dict(tokens=10, hardware=GFLOPS, world_size=64), "batch_size 16 .global. must be a multiple of the 64"),
        (dict(tokens=10, hardware=GFLOPS, world_size=3), "batch_size 16 .global. must be a multiple of the 3"),
        (
            dict(tokens=10, hardware=GFLOPS, world_size=2, cfg=run_cfg(train={"micro_batch_size": 16})),
            "micro_batch_size 16 x 2 processes",
        ),
        (dict(tokens=10, hardware="tpu"), "unknown hardware 'tpu'; use cpu, measure, a100, h100"),
        (dict(tokens=10, hardware="-3"), "positive number of GFLOP/s"),
        (dict(tokens=10, hardware="nan"), "positive number of GFLOP/s"),
        (dict(tokens=10, hardware=GFLOPS, mfu=1.5), "mfu must be in"),
        (dict(tokens=10, hardware=GFLOPS, world_size=0), r"world_size must be .*; pass .* \(--world-size 8\)"),
        (dict(tokens=10, hardware=GFLOPS, strategy="zero3"), "unknown strategy"),
        (dict(tokens=10, hardware=GFLOPS, price_per_hour=-1.0), "price_per_hour must be >= 0"),
        (dict(tokens=10, hardware=GFLOPS, interconnect="infiniband"), "unknown interconnect 'infiniband'; use nvlink"),
        (dict(tokens=10, hardware=GFLOPS, interconnect="0"), "positive number of Gbit/s, got '0'; pass e.g."),
        (dict(tokens=10, hardware=GFLOPS, interconnect=float("nan")), "positive number of Gbit/s"),
    ],
)
def test_bad_inputs_are_one_line_config_errors(kwargs: dict, match: str) -> None:
    kwargs = dict(kwargs)
    cfg = kwargs.pop("cfg", None) or run_cfg()
    with pytest.raises(ConfigError, match=match) as info:
        estimate(cfg, **kwargs)
    assert "\n" not in str(info.value)


def test_world_size_check_is_the_one_training_uses() -> None:
    """estimate and train/run.py ask the same TrainConfig method; what splits works in both."""
    train = run_cfg().train
    assert [train.micro_batch_per_rank(w) for w in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    for world_size in (3, 32, 64):
        with pytest.raises(ConfigError, match="must be a multiple"):
            train.micro_batch_per_rank(world_size)
    assert estimate(run_cfg(), tokens=10, hardware=GFLOPS, world_size=16)["micro_batch_size"] == 1
    assert estimate(run_cfg(), tokens=1.9, hardware=GFLOPS)["tokens"] == 1  # a fraction >= 1 is cut, not refused


@pytest.mark.parametrize(
    "model, match",
    [
        ({"d_model": -8}, "model.d_model must be > 0, got -8"),  # printed negative parameter counts
        ({"d_model": 0}, "model.d_model must be > 0, got 0"),  # ZeroDivisionError
        ({"d_ff": -4}, "model.d_ff must be >= 0"),
        ({"n_layer": 0}, "model.n_layer must be > 0"),
        ({"max_seq_len": 0}, "model.max_seq_len must be > 0"),
        ({"vocab_size": -1}, "model.vocab_size must be >= 0"),
    ],
)
def test_bad_model_sizes_are_refused_before_estimating(model: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        estimate(run_cfg(model=model), tokens=10, hardware=GFLOPS)


def test_float16_on_cpu_and_too_long_data_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="float16 autocast is not supported"):
        estimate(run_cfg(train={"dtype": "float16"}), tokens=10, hardware="cpu")
    assert estimate(run_cfg(train={"dtype": "float16"}), tokens=10, hardware="a100")["dtype"] == "float16"
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        estimate(run_cfg(data={"seq_len": 4096}), tokens=10, hardware=GFLOPS)


def test_cli_json_matches_the_library_and_errors_are_one_line(tmp_path) -> None:
    from tests.conftest import run_cli

    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nn_layer = 3\nvocab_size = 1000\n", encoding="utf-8")
    args = ["--preset", "tiny", "--config", str(cfg), "--model.d_model", "96", "--tokens", "2e6"]
    flags = ["--hardware", GFLOPS, "--world-size", "2", "--strategy", "fsdp", "--interconnect", "IB", "--json"]
    p = run_cli("estimate", *args, *flags)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    want = estimate(
        load_config(preset="tiny", config_file=cfg, overrides={"model": {"d_model": 96}}),
        tokens=2_000_000,
        hardware=1000.0,
        world_size=2,
        strategy="fsdp",
        interconnect="ib",
    )
    assert got["communication"]["link_gbps"] == 400 and got["communication"]["exposed_s"] is not None
    assert got == json.loads(json.dumps(want))
    assert got["model"]["n_layer"] == 3 and got["model"]["d_model"] == 96 and got["strategy"] == "fsdp"
    for key in ("params", "non_embedding_params", "train_flops", "chinchilla_tokens", "time_s", "cost_usd"):
        assert key in got
    assert {"weights", "gradients", "optimizer", "activations", "total"} <= set(got["memory_bytes"])

    p = run_cli("estimate", *args, "--hardware", "a100")
    assert p.returncode == 0 and "parameters" in p.stdout and "a100" in p.stdout, p.stderr
    bad = [
        ["--tokens", "0"],
        ["--tokens", "0.5"],
        ["--tokens", "1e6", "--hardware", "tpu"],
        ["--tokens", "1e6", "--mfu", "2"],
        ["--tokens", "1e9", "--world-size", "3"],
        ["--tokens", "1e9", "--model.d_model", "0"],
    ]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:  # fresh interpreters importing torch: two at a time
        replies = list(pool.map(lambda flags: run_cli("estimate", "--preset", "tiny", *flags), bad))
    for p in replies:
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("lmforge: error:"), p.stderr


def test_cpu_bf16_is_assumed_no_faster_than_fp32():
    """bf16 autocast on a CPU trains small models at fp32's speed (measured), not at 45% of the AMX peak."""
    import torch

    from lmforge.estimate import measure_matmul_flops, resolve_hardware

    bf16 = resolve_hardware("cpu", "bfloat16")
    fp32 = resolve_hardware("cpu", "float32")
    assert fp32["default_mfu"] == 0.45
    assert bf16["default_mfu"] * bf16["peak_flops"] == pytest.approx(0.45 * measure_matmul_flops("cpu", torch.float32))


def test_huge_numbers_print_in_scientific_notation() -> None:
    """--tokens 1e30 printed "24998314796090327040.0 days", a 25-digit step count and cost, and
    "1000000000000000000.00T" tokens; they read as years and 3 significant digits now. A given GFLOP/s peak says
    which dtype it stands for."""
    text = format_estimate(estimate(run_cfg(), tokens=1e30, hardware=GFLOPS, price_per_hour=2.0))
    assert re.search(r"time +\d\.\d\de\+\d+ years on 1 device", text), text
    assert re.search(r"cost +\$\d\.\d+e\+\d+ at", text) and "tokens       1e+30 (" in text
    assert not re.search(r"\d{16}", text), text
    assert _duration(60 * 86400) == "60.0 days" and _duration(3 * 365.25 * 86400) == "3.0 years"
    given = estimate(run_cfg(), tokens=10, hardware=GFLOPS)
    assert any(f"peak is a {'CPU' if given['device'] == 'cpu' else 'GPU'}'s {given['dtype']} peak" in a
               and "--train.dtype" in a for a in given["assumptions"]), given["assumptions"]  # fmt: skip


def test_a_runs_config_json_or_folder_is_a_config_file(tmp_path) -> None:
    """`estimate --config RUN/config.json` (or `--config RUN`): a run's resolved config.json, as pretrain, finetune
    and import write it, reads back as the same typed config (it was "invalid TOML"); flags still apply on top.
    An encoder run's config.json lists every objective key, which a TOML file may not: it loads all the same.
    Other JSON (an HF model's config.json, a manifest) and folders without config.json are one-line errors."""
    from lmforge.atomic import write_json
    from tests.conftest import run_cli

    for preset, name in (("llama-tiny", "llama"), ("bert-tiny", "bert")):
        cfg = load_config(preset=preset, overrides={"model": {"n_layer": 3, "vocab_size": 700}, "out": str(tmp_path)})
        (tmp_path / name).mkdir()
        write_json(tmp_path / name / "config.json", cfg.to_dict())
        for given in (tmp_path / name / "config.json", tmp_path / name):
            assert load_config(config_file=given).to_dict() == cfg.to_dict()
    wider = load_config(config_file=tmp_path / "llama", overrides={"model": {"d_model": 96}})
    assert wider.model.d_model == 96 and wider.model.n_layer == 3 and wider.model.norm == "rmsnorm"
    # its optimizer keys (all listed, AdamW's beta2 off its default) give way to another optimizer, as a preset's do
    small = load_config(preset="small", overrides={"out": str(tmp_path)})
    (tmp_path / "small").mkdir()
    write_json(tmp_path / "small" / "config.json", small.to_dict())
    sgd = load_config(config_file=tmp_path / "small", overrides={"optim": {"name": "sgd"}})
    assert sgd.optim.name == "sgd" and sgd.optim.beta2 == OptimConfig().beta2 and small.optim.beta2 != sgd.optim.beta2
    with pytest.raises(ConfigError, match="optim.momentum is not used by optim.name adamw"):
        load_config(config_file=tmp_path / "small", overrides={"optim": {"momentum": 0.5}})
    # a --preset under a run's config.json changed nothing, yet was recorded as the run's preset
    with pytest.raises(ConfigError, match="--preset tiny: .* is a run's resolved config, .* drop --preset"):
        load_config(preset="tiny", config_file=tmp_path / "small")
    assert load_config(preset="small", config_file=tmp_path / "small").to_dict() == small.to_dict()

    p = run_cli("estimate", "--config", str(tmp_path / "llama"), "--tokens", "1e6", "--hardware", GFLOPS, "--json")
    assert p.returncode == 0, p.stderr
    want = estimate(
        load_config(preset="llama-tiny", overrides={"model": {"n_layer": 3, "vocab_size": 700}}),
        tokens=10**6,
        hardware=1000.0,
    )
    assert json.loads(p.stdout) == json.loads(json.dumps(want))

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}', encoding="utf-8")
    (tmp_path / "manifest.json").write_text('{"inputs": []}', encoding="utf-8")
    (tmp_path / "broken.json").write_text('{"model": ', encoding="utf-8")
    (tmp_path / "empty").mkdir()
    for given, match in (
        (tmp_path / "hf", "a Hugging Face model's config.json; import it first"),
        (tmp_path / "manifest.json", "not an lmforge run's config.json"),
        (tmp_path / "broken.json", "is not valid JSON"),
        (tmp_path / "empty", "a folder without config.json"),
        (tmp_path / "missing.json", "not found"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(config_file=given)


def test_a_bare_gflops_number_says_which_device_it_was_taken_for() -> None:
    """`--hardware 150` alone was taken for a GPU (bf16, MFU 0.4) and printed as just "150 GFLOP/s"; the
    hardware line now names the device it assumed and how to say CPU."""
    gpu = estimate(run_cfg(), tokens=1e6, hardware=150.0)
    assert gpu["device"] == "cuda" and gpu["hardware"] == "150 GFLOP/s GPU" and gpu["mfu"] == 0.4
    line = next(x for x in format_estimate(gpu).splitlines() if x.startswith("hardware"))
    assert "GPU" in line and "pass --train.device cpu for a CPU" in line
    cpu = estimate(run_cfg(train={"device": "cpu"}), tokens=1e6, hardware="150")
    assert cpu["device"] == "cpu" and cpu["hardware"] == "150 GFLOP/s CPU" and cpu["dtype"] == "float32"
    assert "CPU's float32 peak" in cpu["peak_source"]


def lora_saved_bytes(
    model_cfg: GPTConfig, targets: tuple[str, ...], *, dtype: str = "float32", dropout: float = 0.0
) -> tuple[int, GPT]:
    """Bytes of the storages autograd saves in one LoRA (rank 4) forward + loss on 4 x 32 tokens (parameters and
    buffers left out), and the model."""
    from lmforge.adapt.heads import set_trainable
    from lmforge.adapt.lora import inject_lora

    torch.manual_seed(0)
    model = GPT(model_cfg)
    model.init_weights()
    inject_lora(model, targets=list(targets), rank=4, alpha=8, dropout=dropout)
    set_trainable(model, "lora")
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, model_cfg.vocab_size, (4, 33))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(x[:, :-1])
        causal_lm_loss(logits, x[:, 1:])
    return sum(n for ptr, n in kept.items() if ptr not in params), model


@pytest.mark.parametrize("mlp, norm", [("gelu", "layernorm"), ("swiglu", "rmsnorm")])
@pytest.mark.parametrize(
    "targets", [("qkv", "attn.proj"), ("qkv", "mlp.proj"), ("qkv", "attn.proj", "mlp.fc", "mlp.proj")]
)
def test_lora_activations_are_what_autograd_keeps(mlp: str, norm: str, targets: tuple[str, ...]) -> None:
    """`estimate --adapt lora` had no LoRA mode (a LoRA fine-tune was estimated as full training: every gradient,
    all optimizer state, every activation). Its activations are now the tensors autograd saves in a LoRA forward,
    counted with saved-tensor hooks (parameters left out), plus backward's working set (see lora_activation_bytes)."""
    from lmforge.estimate_adapt import lora_activation_bytes, lora_memory_bytes, lora_param_count

    model_cfg = small_cfg(mlp=mlp, norm=norm, n_layer=3)
    saved, model = lora_saved_bytes(model_cfg, targets)
    step = StepShape(seq_len=32, micro_batch=4, dtype="float32", device="cpu")
    result = lora_memory_bytes(model_cfg, OptimConfig(), step, rank=4, targets=targets)
    act = lora_activation_bytes(model_cfg, step, rank=4, targets=targets)
    assert act["kept"] == pytest.approx(saved, abs=8)  # (the loss's 0-d output: 4 B)
    assert result["activations"] == act["total"] >= act["kept"] + act["loss_backward"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_param_count(model_cfg, 4, targets) == trainable
    assert result["gradients"] == 4 * trainable and result["optimizer"] == 8 * trainable


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "variant, targets",
    [
        ({}, ("qkv", "attn.proj", "mlp.fc", "mlp.proj")),
        ("llama", ("qkv", "attn.proj")),
        ({}, ("attn.proj", "mlp.proj")),
    ],
    ids=["all", "llama-default", "no-qkv"],
)
def test_lora_dropout_keeps_its_masks(variant: dict | str, targets: tuple[str, ...], dtype: str) -> None:
    """`--lora-dropout` was not modelled: with 0.1 on every Linear the plan was 31% (fp32) / 27% (bf16) under the
    tensors a 3-layer step keeps, 18% / 14% on finetune's default targets. Now exact where qkv has an adapter (the
    loss's 0-d output: 4 B); without one the plan is an upper bound (the first block's attention is counted), and
    what dropout adds is exact."""
    from lmforge.estimate_adapt import lora_activation_bytes, lora_memory_bytes

    model_cfg = small_cfg(n_layer=3, **(LLAMA if variant == "llama" else variant))

    def saved(dropout: float) -> int:
        return lora_saved_bytes(model_cfg, targets, dtype=dtype, dropout=dropout)[0]

    step = StepShape(seq_len=32, micro_batch=4, dtype=dtype, device="cpu")
    copies = lora_memory_bytes(model_cfg, OptimConfig(), step, rank=4, targets=targets)["autocast_copies"]
    planned = {p: lora_activation_bytes(model_cfg, step, rank=4, targets=targets, dropout=p)["kept"] for p in (0, 0.1)}
    if "qkv" in targets:
        assert planned[0.1] + copies == pytest.approx(saved(0.1), abs=8)
    else:
        assert planned[0.1] - planned[0] == saved(0.1) - saved(0.0)
    memory = lora_memory_bytes(model_cfg, OptimConfig(), step, rank=4, targets=targets, dropout=0.1)
    assert (
        memory["activations"]
        > lora_memory_bytes(model_cfg, OptimConfig(), step, rank=4, targets=targets)["activations"]
    )


def test_lora_dropout_flag_follows_finetune() -> None:
    """`estimate --lora-dropout` (finetune's flag) plans it; a LoRA run's finetune.json gives its own; other modes
    refuse it, as finetune does, and a bad value is one line."""
    plain = estimate(run_cfg(), tokens=1, hardware=GFLOPS, adapt="lora")
    dropped = estimate(run_cfg(), tokens=1, hardware=GFLOPS, adapt="lora", lora_dropout=0.1)
    assert dropped["memory_bytes"]["activations"] > plain["memory_bytes"]["activations"]
    assert any("dropout 0.1" in a for a in dropped["assumptions"])
    with pytest.raises(ConfigError, match="--lora-dropout is for --adapt lora"):
        estimate(run_cfg(), tokens=1, hardware=GFLOPS, adapt="head", lora_dropout=0.1)
    with pytest.raises(ConfigError, match=r"--lora-dropout must be in \[0, 1\)"):
        estimate(run_cfg(), tokens=1, hardware=GFLOPS, adapt="lora", lora_dropout=1.5)


@pytest.mark.parametrize("vocab, batch", [(64, 8), (2048, 8)], ids=["layers-dominate", "logits-dominate"])
def test_lora_total_matches_allocator_peak_of_a_real_lora_step(vocab: int, batch: int) -> None:
    """A LoRA step's predicted total against the real loop's peak (PyTorch's CPU allocator), as for full training.
    Measured when written: -3.5% (6.04 vs 6.26 MB) and +0.2% (18.35 vs 18.31 MB); the full-training estimate it
    gave before was +52% and +30%. With backward's working set counted as for prompt tuning (the tail freed, two
    d_ff-sized gradients): +0.6% (6.30 vs 6.26 MB) and +0.2%, within the head/prompt tests' -3% .. +10%."""
    from lmforge.adapt.heads import set_trainable
    from lmforge.adapt.lora import inject_lora

    cfg = run_cfg(
        model={"vocab_size": vocab, "n_layer": 3, "d_model": 64, "max_seq_len": 64},
        train={"batch_size": batch, "max_steps": 2, "warmup_steps": 0, "device": "cpu", "dtype": "float32"},
    )
    result = estimate(cfg, tokens=1, hardware=GFLOPS, adapt="lora")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.init_weights()
    inject_lora(model, targets=["qkv", "attn.proj"], rank=8, alpha=16, dropout=0.0)
    set_trainable(model, "lora")
    assert result["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    precision = pick_precision(torch.device("cpu"), "float32")
    optimizer = build_optimizer(model, cfg.optim, lr=1e-3, device=torch.device("cpu"))
    tokens = torch.randint(0, vocab, (batch, 65))
    loader = itertools.repeat((tokens[:, :-1], tokens[:, 1:]))

    def run(steps: int) -> None:
        train(model, optimizer, loader, cfg=dataclasses.replace(cfg.train, max_steps=steps), optim_cfg=cfg.optim,
              eval_cfg=EvalConfig(every=0), ckpt_cfg=CheckpointConfig(every=0), precision=precision,
              state=TrainState(), log=RunLogger(None, max_steps=steps, start_step=0, enabled=False),
              save=lambda s: None)  # fmt: skip

    run(1)
    persistent = sum(p.numel() * p.element_size() for p in model.parameters())
    persistent += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    measured = persistent + measure_cpu_allocations(lambda: run(2))
    assert 0.97 * measured <= result["memory_bytes"]["total"] <= 1.10 * measured, (result["memory_bytes"], measured)
    full = estimate(cfg, tokens=1, hardware=GFLOPS)
    assert result["memory_bytes"]["total"] < full["memory_bytes"]["total"]
    assert result["flops_per_token"] < full["flops_per_token"]


def test_lora_estimate_flags_follow_finetune_defaults_and_refuse_bad_input() -> None:
    from lmforge.finetune import FinetuneConfig

    r = run_cli("estimate", "--preset", "tiny", "--tokens", "1e6", "--hardware", "1000", "--adapt", "lora", "--json")
    out = json.loads(r.stdout)
    cfg = FinetuneConfig()
    m = out["model"]  # finetune's default adapters: r x (d_in + d_out) per target per block (tiny: no GQA)
    shapes = {"qkv": m["d_model"] + 3 * m["d_model"], "attn.proj": 2 * m["d_model"]}
    assert out["adapt"] == "lora"
    assert out["trainable_params"] == m["n_layer"] * sum(cfg.lora_rank * shapes[t] for t in cfg.lora_targets)
    r = run_cli("estimate", "--preset", "tiny", "--tokens", "1e6", "--adapt", "lora", "--lora-targets", "qkv,foo")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--lora-targets from qkv" in r.stderr
    r = run_cli("estimate", "--preset", "tiny", "--tokens", "1e6", "--adapt", "lora", "--world-size", "2")
    assert r.returncode == 2 and "one process" in r.stderr


def test_config_of_a_lora_fine_tune_plans_that_fine_tune(tmp_path) -> None:
    """`estimate --config FINETUNE_RUN` read only its config.json, which is its base's (architecture and the base's
    pretraining batch), so a LoRA fine-tune was planned as full pretraining at another batch. It now takes the
    fine-tune's own batch, example length and adapters from finetune.json; flags still win."""
    from lmforge.finetune import FinetuneConfig, finetune
    from tests.test_finetune import DATA, FAST, make_base

    tuned = tmp_path / "lora"
    cfg = FinetuneConfig(
        task="sft", adapt="lora", lora_rank=4, lora_dropout=0.1, max_len=96, eval_samples=1, max_new_tokens=2
    )
    finetune(make_base(tmp_path), train_file=DATA / "chat.jsonl", out=tuned, cfg=cfg, overrides=FAST, progress=False)
    args = ("estimate", "--config", str(tuned), "--tokens", "1e5", "--hardware", "1000", "--json")
    out = json.loads(run_cli(*args).stdout)
    assert out["adapt"] == "lora" and out["batch_size"] == FAST["train"]["batch_size"] and out["seq_len"] == 96
    assert out["trainable_params"] == 2 * 4 * ((32 + 3 * 32) + (32 + 32))  # 2 blocks, rank 4 on qkv and attn.proj
    assert any("dropout 0.1" in a for a in out["assumptions"])  # the run's --lora-dropout; the flag wins
    undropped = json.loads(run_cli(*args, "--lora-dropout", "0").stdout)
    assert undropped["memory_bytes"]["activations"] < out["memory_bytes"]["activations"]
    out = json.loads(run_cli(*args, "--adapt", "full", "--train.batch_size", "2").stdout)
    assert out["adapt"] == "full" and out["batch_size"] == 2 and out["trainable_params"] == out["params"]


def test_adapt_modes_plan_finetunes_batch_not_the_presets() -> None:
    """`estimate --preset small --adapt lora` planned the preset's batch (64 sequences, pretraining's), which finetune
    never reads: a fine-tune without --train.batch_size trains finetune's own (16). The adapt modes now take
    finetune's train and optim defaults; --train.* still wins, and --adapt full keeps the preset's."""
    from lmforge.estimate_adapt import plan_arguments
    from lmforge.finetune import finetune_sections

    for adapt in ("lora", "head", "prompt"):
        train, optim = finetune_sections(adapt, None)[:2]
        settings, _ = plan_arguments(None, {"adapt": adapt})
        assert settings["train"]["batch_size"] == train.batch_size == 16 and settings["optim"]["name"] == optim.name
    assert plan_arguments(None, {})[0] == {}  # (pretraining: the preset's or config's)
    train, optim = finetune_sections("full", None)[:2]  # a full classification fine-tune is finetune's too
    settings, _ = plan_arguments(None, {"labels": 3})
    assert settings["train"]["batch_size"] == train.batch_size == 16 and settings["optim"]["name"] == optim.name
    base = ("estimate", "--preset", "small", "--tokens", "1e6", "--hardware", "1000", "--json")
    assert load_config(preset="small").train.batch_size == 64
    out = json.loads(run_cli(*base, "--adapt", "lora").stdout)
    assert out["batch_size"] == out["micro_batch_size"] == 16
    out = json.loads(run_cli(*base, "--adapt", "lora", "--train.batch_size", "8").stdout)
    assert out["batch_size"] == 8


def test_lora_targets_take_finetunes_repeated_flag_and_commas() -> None:
    """finetune takes `--lora-targets qkv --lora-targets mlp.fc` (one flag per target); estimate took commas only,
    so that command, copied from finetune, planned the last target alone, without a word."""
    counts = []
    for targets in (["--lora-targets", "qkv", "--lora-targets", "mlp.fc"], ["--lora-targets", "qkv,mlp.fc"]):
        r = run_cli("estimate", "--preset", "tiny", "--tokens", "1e6", "--hardware", "1000", "--adapt", "lora",
                    *targets, "--json")  # fmt: skip
        assert r.returncode == 0, r.stderr
        counts.append(json.loads(r.stdout)["trainable_params"])
    m = json.loads(r.stdout)["model"]
    rank = 8  # qkv: d -> 3d, mlp.fc: d -> d_ff, per block
    assert counts == [m["n_layer"] * rank * (4 * m["d_model"] + m["d_model"] + m["d_ff"])] * 2


# --------------------------------------------------------------------------------------------
# head-only and prompt tuning (`estimate --adapt head|prompt`)


def adapted_model(
    model_cfg: GPTConfig, adapt: str, labels: int, prompt_tokens: int, targets: tuple[str, ...] = ("qkv", "attn.proj")
) -> torch.nn.Module:
    """A fine-tuning model as `finetune` builds it (adapt/load.build_adapted): the base in fp32, frozen but for
    what `adapt` trains (LoRA: rank 8 on `targets`, finetune's default rank); a classification head when `labels` >
    0."""
    from lmforge.adapt.load import build_adapted

    torch.manual_seed(0)
    body = GPT(model_cfg)
    body.init_weights()
    info = {"adapt": adapt, "task": "classify" if labels else "sft", "labels": [str(i) for i in range(labels)],
            "prompt_tokens": prompt_tokens, "saved": "adapter", "seed": 0, "head_bias": False,
            "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": list(targets)}}  # fmt: skip
    model = build_adapted(body, info, torch.device("cpu"))
    for p in model.parameters():
        p.grad = None
    return model


def adapted_batch(vocab: int, labels: int, batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    x = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    if labels:  # (ids, lengths, labels): every row full length
        return x[:, :-1], torch.full((batch,), seq), torch.arange(batch) % labels
    return x[:, :-1], x[:, 1:]


def adapted_objective(labels: int) -> object:
    from lmforge.adapt.objectives import Classification
    from lmforge.objectives import CausalLM

    return Classification() if labels else CausalLM()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("labels", [0, 3], ids=["lm", "classify"])
@pytest.mark.parametrize(
    "variant",
    [{}, dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False)],
    ids=["gpt2", "llama"],
)
@pytest.mark.parametrize("adapt", ["head", "prompt", "lora"])
def test_head_and_prompt_activations_are_what_autograd_keeps(
    adapt: str, variant: dict, labels: int, dtype: str
) -> None:
    """`estimate --adapt head|prompt` were refused (pointed at --adapt full, every gradient and activation). What
    they count as kept is the tensors autograd saves in such a fine-tuning forward, with saved-tensor hooks
    (parameters left out): head-only keeps nothing in the body; prompt tuning keeps, over prompt + text positions,
    what the inputs' gradients need and no input of a frozen Linear. LoRA (finetune's rank and targets) as its own
    test below, here with a classification head too (`--adapt lora --labels N` was refused)."""
    from lmforge.estimate_adapt import (
        head_activation_bytes,
        head_memory_bytes,
        lora_activation_bytes,
        lora_memory_bytes,
        prompt_activation_bytes,
        prompt_memory_bytes,
    )

    prompt_tokens = 8 if adapt == "prompt" else 0
    model_cfg = small_cfg(n_layer=3, max_seq_len=32 + prompt_tokens, **variant)
    model = adapted_model(model_cfg, adapt, labels, prompt_tokens)
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch = adapted_batch(model_cfg.vocab_size, labels, 4, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            adapted_objective(labels).loss(model, batch)
    saved = sum(n for ptr, n in kept.items() if ptr not in params)
    step = StepShape(seq_len=32, micro_batch=4, dtype=dtype, device="cpu")
    if adapt == "head":
        act = head_activation_bytes(model_cfg, step, labels=labels)
        # the tail without the loss's two gradients (backward makes them); classification: pooled states + scores
        predicted = act["tail"] - (0 if labels else 4 * 32 * 8 * model_cfg.vocab_size)
        memory = head_memory_bytes(model_cfg, OptimConfig(), step, labels=labels)
    elif adapt == "prompt":
        act = prompt_activation_bytes(model_cfg, step, prompt_tokens=prompt_tokens, labels=labels)
        predicted = act["layers"] + act["tail"]
        memory = prompt_memory_bytes(model_cfg, OptimConfig(), step, prompt_tokens=prompt_tokens, labels=labels)
    else:
        lora = dict(rank=8, targets=("qkv", "attn.proj"), labels=labels)
        predicted = lora_activation_bytes(model_cfg, step, **lora)["kept"]
        memory = lora_memory_bytes(model_cfg, OptimConfig(), step, **lora)
    predicted += memory["autocast_copies"]  # the cast weights a bf16 forward keeps
    # (the loss's 0-d output: 4 B; classification: the labels' and scores' few bytes per row, < 64 B in all)
    assert predicted == pytest.approx(saved, abs=64)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = estimate(
        dataclasses.replace(run_cfg(), model=model_cfg, data=dataclasses.replace(run_cfg().data, seq_len=32)),
        tokens=1, hardware=GFLOPS, adapt=adapt, labels=labels, prompt_tokens=prompt_tokens or None,
    )  # fmt: skip
    assert result["trainable_params"] == trainable


LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", [{}, LLAMA], ids=["gpt2", "llama"])
def test_full_classify_activations_are_what_autograd_keeps(variant: dict, dtype: str) -> None:
    """`estimate --adapt full --labels N` was refused (and a full classify run planned with the LM head's logits).
    What it counts as kept is what autograd saves in a real `finetune --task classify --adapt full` forward
    (parameters left out): no vocabulary logits or log-probs."""
    from lmforge.estimate_adapt import full_classify_memory_bytes

    model_cfg = small_cfg(n_layer=3, max_seq_len=32, **variant)
    model = adapted_model(model_cfg, "full", 3, 0)
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            adapted_objective(3).loss(model, adapted_batch(model_cfg.vocab_size, 3, 4, 32))
    saved = sum(n for ptr, (n, _) in kept.items() if ptr not in params)
    step = StepShape(seq_len=32, micro_batch=4, dtype=dtype, device="cpu")
    memory = full_classify_memory_bytes(model_cfg, OptimConfig(), step, labels=3)
    # (the loss's 0-d output and the scores' and labels' few bytes per row, < 96 B in all)
    assert memory["activations"] + memory["autocast_copies"] == pytest.approx(saved, abs=96)


@pytest.mark.parametrize(
    "adapt, labels, vocab, d_model, batch, variant",
    [
        ("head", 3, 64, 64, 8, {}),
        ("head", 3, 2048, 128, 2, LLAMA),
        ("head", 0, 2048, 64, 8, {}),
        ("prompt", 0, 64, 64, 8, {}),
        ("prompt", 0, 2048, 64, 8, LLAMA),
        ("prompt", 3, 2048, 128, 2, {}),
        ("lora", 3, 64, 64, 8, {}),
        ("lora", 3, 2048, 128, 2, LLAMA),
        ("full", 3, 2048, 64, 8, {}),
        ("full", 3, 2048, 128, 2, LLAMA),
    ],
    ids=["head-classify", "head-classify-llama", "head-lm", "prompt-lm", "prompt-lm-llama", "prompt-classify",
         "lora-classify", "lora-classify-llama", "full-classify", "full-classify-llama"],
)  # fmt: skip
def test_head_and_prompt_totals_match_allocator_peak_of_a_real_step(
    adapt: str, labels: int, vocab: int, d_model: int, batch: int, variant: dict
) -> None:
    """A head-only or prompt-tuning step's predicted total against the real loop's peak (PyTorch's CPU allocator),
    as for full and LoRA training: the model as finetune builds it, its objective (classification or next-token),
    3 layers, 64 text tokens, 16 soft-prompt tokens. Measured when written (predicted vs allocated): head-classify
    2.21 vs 2.21 MB (+0.0%), head-classify-llama 5.62 vs 5.61 (+0.2%), head-lm 13.87 vs 13.86 (+0.0%), prompt-lm
    7.10 vs 7.10 (+0.1%), prompt-lm-llama 22.14 vs 22.13 (+0.1%), prompt-classify 6.72 vs 6.71 (+0.1%); the
    full-training plan they got before was 1.5-4.6x these. Leaving out the rotary tables (alive through a head-only
    forward) made head-classify-llama -1.6%; counting the first block's MLP gradients once (LoRA's working set)
    instead of twice, prompt-lm -4.9%. The bounds, -3% .. +10%, hold those to what the count is meant to be:
    the allocator's peak, a little above it at most. LoRA classification (finetune's rank and targets and the head
    it trains with them) was refused, and a LoRA classify run's --config planned with the LM head's logits:
    lora-classify 6.30 vs 6.26 MB (+0.6%), lora-classify-llama 8.69 vs 8.62 (+0.8%). A full classify fine-tune
    was refused (--labels) and its run's --config planned with the LM head (+127% and +27%): full-classify 11.05 vs
    10.49 MB (+5.3%: every gradient on top of every activation, as in full training), full-classify-llama 20.22 vs
    20.21 (+0.0%)."""
    prompt_tokens = 16 if adapt == "prompt" else 0
    cfg = run_cfg(
        model={"vocab_size": vocab, "n_layer": 3, "d_model": d_model, "max_seq_len": 64 + prompt_tokens, **variant},
        train={"batch_size": batch, "max_steps": 2, "warmup_steps": 0, "device": "cpu", "dtype": "float32"},
    )
    result = estimate(cfg, tokens=1, hardware=GFLOPS, adapt=adapt, labels=labels, prompt_tokens=prompt_tokens or None)
    assert result["seq_len"] == 64  # (prompt: the context less the soft prompt, as finetune's max_len)
    model = adapted_model(cfg.model, adapt, labels, prompt_tokens)
    assert result["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    precision = pick_precision(torch.device("cpu"), "float32")
    optimizer = build_optimizer(model, cfg.optim, lr=1e-3, device=torch.device("cpu"))
    loader = itertools.repeat(adapted_batch(vocab, labels, batch, 64))

    def run(steps: int) -> None:
        train(model, optimizer, loader, cfg=dataclasses.replace(cfg.train, max_steps=steps), optim_cfg=cfg.optim,
              eval_cfg=EvalConfig(every=0), ckpt_cfg=CheckpointConfig(every=0), precision=precision,
              state=TrainState(), log=RunLogger(None, max_steps=steps, start_step=0, enabled=False),
              save=lambda s: None, objective=adapted_objective(labels))  # fmt: skip

    run(1)
    persistent = sum(p.numel() * p.element_size() for p in model.parameters())
    persistent += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    measured = persistent + measure_cpu_allocations(lambda: run(2))
    predicted = result["memory_bytes"]["total"]
    assert 0.97 * measured <= predicted <= 1.10 * measured, (result["memory_bytes"], measured)
    full = estimate(cfg, tokens=1, hardware=GFLOPS)
    assert predicted < full["memory_bytes"]["total"]


def test_head_and_prompt_flags_follow_finetune_and_refuse_what_they_do_not_use() -> None:
    """`estimate --adapt head|prompt` took only full and lora. Now: finetune's soft-prompt length by default, the
    text gets the context less the prompt (as finetune's max_len), --labels N plans a classification head, and a
    setting the plan would not use, a prompt leaving too little context, or several devices are one-line errors."""
    from lmforge.finetune import FinetuneConfig

    base = ("estimate", "--preset", "tiny", "--tokens", "1e6", "--hardware", "1000", "--json")
    out = json.loads(run_cli(*base, "--adapt", "prompt").stdout)
    prompt_tokens, m = FinetuneConfig().prompt_tokens, out["model"]
    assert out["adapt"] == "prompt" and out["prompt_tokens"] == prompt_tokens
    assert out["trainable_params"] == prompt_tokens * m["d_model"] and out["seq_len"] == 128 - prompt_tokens
    out = json.loads(run_cli(*base, "--adapt", "head", "--labels", "5").stdout)
    assert out["trainable_params"] == 5 * m["d_model"] and out["labels"] == 5
    full = json.loads(run_cli(*base).stdout)
    assert 2 * out["flops_per_token"] < full["flops_per_token"]  # forward only, and no vocabulary matmul
    out = json.loads(run_cli(*base, "--labels", "5").stdout)  # a full classification fine-tune (it was refused)
    assert out["trainable_params"] == full["params"] + 5 * m["d_model"] and out["labels"] == 5
    assert out["flops_per_token"] < full["flops_per_token"]  # (no vocabulary matmul)
    for flags, message in [
        (["--adapt", "prompt", "--prompt-tokens", "125"], "--prompt-tokens 125 leaves 3 of the model's 128"),
        (["--adapt", "prompt", "--prompt-tokens", "16", "--data.seq_len", "120"], "less the 16 soft-prompt tokens"),
        (["--adapt", "head", "--prompt-tokens", "4"], "--prompt-tokens is for --adapt prompt"),
        (["--labels", "2", "--world-size", "2"], "one process"),
        (["--adapt", "head", "--labels", "1"], "--labels must be 0 (an LM task) or the number of classes"),
        (["--adapt", "prompt", "--world-size", "2"], "one process"),
    ]:
        r = run_cli(*base, *flags)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (flags, r.stderr)


def test_a_prompt_or_head_fine_tunes_json_plans_its_mode(tmp_path) -> None:
    """`estimate --config FINETUNE_RUN` refused a head-only or prompt-tuning run ("estimate plans full and LoRA
    training"). Its finetune.json (the keys finetune writes) now gives the mode, the soft-prompt length and, for
    classification, the labels; --adapt on the command line wins and takes only what it uses."""
    from lmforge.estimate_adapt import plan_arguments

    info = {"task": "classify", "adapt": "prompt", "labels": ["neg", "pos", "neutral"], "prompt_tokens": 4,
            "max_len": 60, "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["qkv"]},
            "train": {"batch_size": 8, "lr": 1e-2}, "optim": {"name": "adamw"}}  # fmt: skip
    (tmp_path / "finetune.json").write_text(json.dumps(info), encoding="utf-8")
    settings, kwargs = plan_arguments(tmp_path, {})
    assert settings["data"] == {"seq_len": 60} and settings["train"] == {"batch_size": 8}
    assert kwargs["adapt"] == "prompt" and kwargs["prompt_tokens"] == 4 and kwargs["labels"] == 3
    _, kwargs = plan_arguments(tmp_path, {"adapt": "head"})
    assert kwargs["labels"] == 3 and "prompt_tokens" not in kwargs
    _, kwargs = plan_arguments(tmp_path, {"adapt": "lora"})  # (LoRA classification trains the head too)
    assert kwargs["labels"] == 3 and kwargs["lora_targets"] == ("qkv",) and "prompt_tokens" not in kwargs
    _, kwargs = plan_arguments(tmp_path / "config.json", {"adapt": "full"})  # (the head replaces the LM head)
    assert kwargs["adapt"] == "full" and kwargs["labels"] == 3 and "prompt_tokens" not in kwargs
    (tmp_path / "finetune.json").write_text(json.dumps({**info, "adapt": "full"}), encoding="utf-8")
    assert plan_arguments(tmp_path, {})[1]["labels"] == 3  # a full classify run was planned with the LM head
    (tmp_path / "finetune.json").write_text(json.dumps({**info, "adapt": "head", "task": "sft"}), encoding="utf-8")
    assert plan_arguments(tmp_path, {})[1]["adapt"] == "head" and "labels" not in plan_arguments(tmp_path, {})[1]
    (tmp_path / "finetune.json").write_text(json.dumps({**info, "adapt": "sparse"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="--adapt sparse fine-tune, which estimate does not plan"):
        plan_arguments(tmp_path, {})


@pytest.mark.parametrize(
    "adapt, labels, variant",
    [
        ("head", 3, {}),
        ("head", 0, {}),
        ("head", 0, LLAMA),
        ("prompt", 0, {}),
        ("prompt", 3, LLAMA),
        ("lora", 3, {}),
        ("lora", 3, LLAMA),
        ("full", 3, {}),
        ("full", 3, LLAMA),
    ],
    ids=[
        "head-classify",
        "head-lm-tied",
        "head-lm-llama",
        "prompt-lm",
        "prompt-classify-llama",
        "lora-classify",
        "lora-classify-llama",
        "full-classify",
        "full-classify-llama",
    ],
)
def test_head_and_prompt_flops_are_a_real_steps_matmuls(adapt: str, labels: int, variant: dict) -> None:
    """A head-only or prompt-tuning step's FLOPs, but for attention's scores, equal the matmul FLOPs torch's
    FlopCounterMode counts in a real forward + backward (exactly, when written): head-only is the body's forward
    (no vocabulary matmul under a classification head) + the head's backward; prompt tuning the forward and the
    inputs' gradients over prompt + text positions, no weight gradient of the base. (FlopCounterMode has no formula
    for CPU flash attention, so the attention term, PaLM's as in full training, is left out of the comparison.)"""
    from torch.utils.flop_counter import FlopCounterMode

    prompt_tokens = 16 if adapt == "prompt" else 0
    cfg = run_cfg(model={"n_layer": 3, "d_model": 64, "max_seq_len": 64 + prompt_tokens, **variant},
                  train={"batch_size": 4})  # fmt: skip
    result = estimate(cfg, tokens=1, hardware=GFLOPS, adapt=adapt, labels=labels, prompt_tokens=prompt_tokens or None)
    model = adapted_model(cfg.model, adapt, labels, prompt_tokens)
    with FlopCounterMode(display=False) as counter:
        adapted_objective(labels).loss(model, adapted_batch(512, labels, 4, 64)).backward()
    assert not any("attention" in str(op) for op in counter.get_flop_counts()["Global"])  # (else: compare all)
    predicted = result["flops_per_token"] * (1 - result["attention_flops_share"]) * 4 * 64
    assert predicted == pytest.approx(counter.get_total_flops(), rel=1e-9)


@pytest.mark.parametrize("variant", [{}, LLAMA, {"dropout": 0.1}], ids=["gpt2", "llama", "math-attention"])
@pytest.mark.parametrize(
    "targets",
    [("qkv", "attn.proj"), ("mlp.proj",), ("attn.proj", "mlp.fc"), ("qkv", "attn.proj", "mlp.fc", "mlp.proj")],
    ids=lambda t: "+".join(t),
)
def test_lora_flops_are_a_real_steps_matmuls(targets: tuple[str, ...], variant: dict) -> None:
    """A LoRA step's FLOPs against torch's FlopCounterMode on a real forward + backward. It was counted as 4 N + 6 x
    the adapters: +3.5% for finetune's default targets, +16% for mlp.proj alone, because nothing needs a gradient
    before the first adapter (the first block's Linears up to it, its A's input gradient, and its attention's
    backward when qkv has none). Now exact but attention's scores under SDPA's flash kernel (FlopCounterMode has no
    formula for it); with dropout > 0 SDPA takes its math path on CPU, whose bmm it counts: exact, attention
    included."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = run_cfg(model={"n_layer": 3, "d_model": 64, "max_seq_len": 64, **variant}, train={"batch_size": 4})
    result = estimate(cfg, tokens=1, hardware=GFLOPS, adapt="lora", lora_targets=targets)
    model = adapted_model(cfg.model, "lora", 0, 0, targets)
    assert result["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with FlopCounterMode(display=False) as counter:
        adapted_objective(0).loss(model, adapted_batch(512, 0, 4, 64)).backward()
    counted = {str(op) for op in counter.get_flop_counts()["Global"]}
    predicted = result["flops_per_token"] * 4 * 64
    if "dropout" not in variant:
        assert not any("attention" in op for op in counted)  # (else: compare all)
        predicted *= 1 - result["attention_flops_share"]
    else:
        assert "aten.bmm" in counted  # the math path's q @ k^T and att @ v
    assert predicted == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_check_fits_refuses_weights_grads_and_state_beyond_the_memory_and_shares_them_under_fsdp():
    """A model whose fp32 weights, gradients and AdamW state alone exceed the machine's RAM is refused in one line
    naming the need, the memory and what to shrink; under FSDP each rank holds its share, so 4 ranks fit it."""
    from lmforge.estimate import check_fits, device_memory_bytes

    cpu = torch.device("cpu")
    total = device_memory_bytes(cpu)
    assert total and total > 2**28  # MemTotal of /proc/meminfo, in bytes
    adamw = OptimConfig()
    layer = GPTConfig(n_layer=1, n_head=32, d_model=4096, vocab_size=64)
    per_layer = 16 * param_counts(layer)["block"]  # 4 B weights + 4 B gradients + 8 B AdamW moments
    model = dataclasses.replace(layer, n_layer=math.ceil(1.5 * total / per_layer))  # 1.5x the RAM
    with pytest.raises(ConfigError) as e:
        check_fits(model, adamw, cpu)
    said = str(e.value)
    assert "\n" not in said and "RAM" in said and "--model.n_layer" in said, said
    with pytest.raises(ConfigError, match="per rank"):
        check_fits(dataclasses.replace(model, n_layer=8 * model.n_layer), adamw, cpu, world_size=4, strategy="fsdp")
    check_fits(model, adamw, cpu, world_size=4, strategy="fsdp")  # 0.375x the RAM per rank: fits
    with pytest.raises(ConfigError):
        check_fits(model, adamw, cpu, world_size=4, strategy="ddp")  # every DDP rank holds it all
    check_fits(dataclasses.replace(model, n_layer=model.n_layer // 2), adamw, cpu)  # 0.75x: not refused


def test_check_fits_counts_every_cpu_rank_of_the_machine_against_its_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    """`torchrun --nproc-per-node 4` on CPU: four processes of one machine share its RAM, yet each rank compared its
    own need with the whole of it, so a model needing 0.4x the RAM per rank (1.6x together) was built four times
    until the machine ran out. On CPU LOCAL_WORLD_SIZE x the per-rank need is checked now; each GPU has its own
    memory, and a run without torchrun is one rank."""
    from lmforge.estimate import check_fits, device_memory_bytes

    cpu, adamw = torch.device("cpu"), OptimConfig()
    total = device_memory_bytes(cpu)
    assert total
    layer = GPTConfig(n_layer=1, n_head=16, d_model=1024, vocab_size=64)  # (~0.2 GB a layer: n_layer lands near 0.4x)
    model = dataclasses.replace(layer, n_layer=math.ceil(0.4 * total / (16 * param_counts(layer)["block"])))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    check_fits(model, adamw, cpu)  # one process: 0.4x the RAM fits
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_fits(model, adamw, cpu, world_size=2)  # two DDP ranks: 0.8x fits
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError) as e:  # four: 1.6x
        check_fits(model, adamw, cpu, world_size=4)
    said = str(e.value)
    assert "\n" not in said and "x 4 ranks on this machine" in said and "--nproc-per-node" in said, said
    check_fits(model, adamw, cpu, world_size=4, strategy="fsdp")  # FSDP: each holds a quarter, 0.4x together
    check_fits(model, adamw, torch.device("meta"), world_size=4)  # (no memory known: no check)


def test_check_batch_fits_counts_every_cpu_rank_of_the_machine_as_check_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The up-front micro-batch check compared one rank's token ids with the whole RAM while `check_fits` counts the
    LOCAL_WORLD_SIZE ranks that share it: 4 CPU ranks of 0.4x each passed. Both count them now, in the same words."""
    from lmforge.estimate import check_batch_fits, device_memory_bytes

    cpu = torch.device("cpu")
    total = device_memory_bytes(cpu)
    assert total
    micro_batch, seq_len = math.ceil(0.4 * total / (16 * 1024)), 1024  # token ids at 0.4x the RAM per rank
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    check_batch_fits(micro_batch, seq_len, cpu)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_batch_fits(micro_batch, seq_len, cpu)  # 0.8x together
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError) as e:  # 1.6x
        check_batch_fits(micro_batch, seq_len, cpu)
    said = str(e.value)
    assert "\n" not in said and "per rank x 4 ranks on this machine for its token ids" in said, said
    assert said.endswith("(or --train.micro_batch_size) (or fewer CPU ranks per machine: torchrun --nproc-per-node)")
    check_batch_fits(micro_batch, seq_len, torch.device("meta"))  # (no memory known: no check)


@pytest.mark.parametrize("preset", ["bert-tiny", "electra-tiny", "lstm-tiny", "gru-tiny"])
def test_check_fits_covers_encoders_and_recurrent_models(preset: str) -> None:
    """check_fits covered GPT/Llama shapes only: a BERT, ELECTRA, LSTM or GRU far beyond the RAM was built (and
    grew until killed). Their parameters are counted on the meta device (exactly the built model's, with 3 layers
    at most: the rest extrapolated), and 4 B weights + 4 B gradients + 8 B AdamW moments each are checked."""
    from lmforge.estimate import check_fits, device_memory_bytes, model_param_count
    from lmforge.models import build_model

    model = dataclasses.replace(load_config(preset=preset).model, vocab_size=128)
    for n_layer in (1, 5):
        sized = dataclasses.replace(model, n_layer=n_layer)
        assert model_param_count(sized) == sum(p.numel() for p in build_model(sized).parameters())
    cpu, adamw = torch.device("cpu"), OptimConfig()
    per_layer = model_param_count(dataclasses.replace(model, n_layer=3)) - model_param_count(model)
    per_layer //= 3 - model.n_layer
    huge = dataclasses.replace(model, n_layer=math.ceil(1.5 * device_memory_bytes(cpu) / (16 * per_layer)))
    with pytest.raises(ConfigError) as e:
        check_fits(huge, adamw, cpu)
    assert f"the {model.family} model (" in str(e.value) and "RAM" in str(e.value) and e.value.every_rank
    check_fits(huge, adamw, cpu, world_size=4, strategy="fsdp")  # each rank's share fits
    check_fits(huge, OptimConfig(name="sgd", momentum=0.0), torch.device("meta"))  # (no memory known: no check)


# --------------------------------------------------------------------------------------------
# distillation: the frozen teacher


def distill_cfgs(vocab: int, d_model: int, batch: int, teacher: dict) -> tuple[RunConfig, GPTConfig]:
    cfg = run_cfg(
        model={"vocab_size": vocab, "n_layer": 3, "d_model": d_model, "max_seq_len": 64},
        train={"batch_size": batch, "max_steps": 2, "warmup_steps": 0, "device": "cpu", "dtype": "float32"},
    )
    return cfg, dataclasses.replace(cfg.model, **teacher)


@pytest.mark.parametrize(
    "vocab, d_model, batch, teacher, dtype",
    [
        (512, 64, 8, {"d_model": 128, "n_layer": 4}, "float32"),
        (4096, 64, 8, {"n_layer": 3}, "float32"),
        (64, 128, 1, {"d_model": 128}, "float32"),
        (4096, 64, 8, {"n_layer": 3}, "bfloat16"),
    ],
    ids=["layers", "logits-dominate", "weights-dominate", "logits-dominate-bf16"],
)
def test_distill_total_matches_allocator_peak_of_a_real_step(
    vocab: int, d_model: int, batch: int, teacher: dict, dtype: str
) -> None:
    """A distillation step (finetune --adapt distill) against the real loop's peak (PyTorch's CPU allocator). It was
    planned as a plain full fine-tune, without the teacher's weights or the soft targets: 41%, 55% and 80% of the
    measured peak when written (12.8 vs 21.8 MB, 38.4 vs 88.8, 12.2 vs 14.9). Now +3.5%, +1.9% and +0.7%. In bf16
    the teacher's logits are bf16 (it runs in the student's autocast) and the cast weights are freed before the
    log step's update: planned all fp32 and through the update, +12.8% (logits-dominate), now +7.5%."""
    from lmforge.compress.distill import Distill

    cfg, teacher_cfg = distill_cfgs(vocab, d_model, batch, teacher)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype=dtype))
    result = estimate(cfg, tokens=1, hardware=GFLOPS, teacher=teacher_cfg)
    torch.manual_seed(0)
    model, frozen = GPT(cfg.model), GPT(teacher_cfg)
    model.init_weights()
    frozen.init_weights()
    assert result["teacher_params"] == sum(p.numel() for p in frozen.parameters())
    precision = pick_precision(torch.device("cpu"), dtype)
    optimizer = build_optimizer(model, cfg.optim, lr=1e-3, device=torch.device("cpu"))
    tokens = torch.randint(0, vocab, (batch, 65))
    loader = itertools.repeat((tokens[:, :-1], tokens[:, 1:]))
    objective = Distill(frozen, temperature=2.0, alpha=0.5)

    def run(steps: int) -> None:
        train(model, optimizer, loader, cfg=dataclasses.replace(cfg.train, max_steps=steps), optim_cfg=cfg.optim,
              eval_cfg=EvalConfig(every=0), ckpt_cfg=CheckpointConfig(every=0), precision=precision,
              state=TrainState(), log=RunLogger(None, max_steps=steps, start_step=0, enabled=False),
              save=lambda s: None, objective=objective)  # fmt: skip

    run(1)
    persistent = sum(t.numel() * t.element_size() for m in (model, frozen) for t in [*m.parameters(), *m.buffers()])
    persistent += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    measured = persistent + measure_cpu_allocations(lambda: run(2))
    predicted = result["memory_bytes"]["total"]
    assert 0.95 * measured <= predicted <= 1.1 * measured, (result["memory_bytes"], measured)
    plain = estimate(cfg, tokens=1, hardware=GFLOPS)["memory_bytes"]["total"]
    assert plain < 0.85 * measured  # (what it was planned as)


@pytest.mark.parametrize("variant", [{}, LLAMA], ids=["gpt2", "llama"])
def test_distill_flops_are_a_real_steps_matmuls(variant: dict) -> None:
    """A distillation step's FLOPs, but for attention's scores, equal FlopCounterMode's count of a real step: the
    student's forward and backward (6N) and the teacher's forward (2N of its own), which was left out."""
    from torch.utils.flop_counter import FlopCounterMode

    from lmforge.compress.distill import Distill

    cfg, teacher_cfg = distill_cfgs(512, 64, 4, {"d_model": 96, "n_layer": 4, **variant})
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **variant))
    result = estimate(cfg, tokens=1, hardware=GFLOPS, teacher=teacher_cfg)
    model, frozen = GPT(cfg.model), GPT(teacher_cfg)
    tokens = torch.randint(0, 512, (4, 65))
    with FlopCounterMode(display=False) as counter:
        Distill(frozen, temperature=2.0, alpha=0.5).loss(model, (tokens[:, :-1], tokens[:, 1:])).backward()
    assert not any("attention" in str(op) for op in counter.get_flop_counts()["Global"])
    predicted = result["flops_per_token"] * (1 - result["attention_flops_share"]) * 4 * 64
    assert predicted == pytest.approx(counter.get_total_flops(), rel=1e-9)
    plain = estimate(cfg, tokens=1, hardware=GFLOPS)
    teacher_forward = 2 * param_counts(teacher_cfg)["matmul"] + 4 * teacher_cfg.n_layer * teacher_cfg.d_model * 64
    assert result["flops_per_token"] == pytest.approx(plain["flops_per_token"] + teacher_forward)


def test_config_of_a_distill_fine_tune_plans_its_teacher(tmp_path) -> None:
    """`estimate --config DISTILL_RUN` planned a plain full fine-tune: no teacher weights, FLOPs or soft targets, and
    no line saying so. Now the teacher finetune.json names is read and planned, and the assumptions say how."""
    from lmforge.finetune import FinetuneConfig, finetune
    from tests.test_finetune import DATA, FAST, make_base

    teacher = make_base(tmp_path / "t", n_layer=3, d_model=64)
    cfg = FinetuneConfig(
        task="sft", adapt="distill", teacher=str(teacher), max_len=96, eval_samples=1, max_new_tokens=2
    )
    tuned = tmp_path / "distilled"
    finetune(make_base(tmp_path / "s"), train_file=DATA / "chat.jsonl", out=tuned, cfg=cfg, overrides=FAST,
             progress=False)  # fmt: skip
    args = ("estimate", "--config", str(tuned), "--tokens", "1e5", "--hardware", "1000")
    out = json.loads(run_cli(*args, "--json").stdout)
    teacher_model = load_config(config_file=str(teacher / "config.json")).model
    assert out["teacher_params"] == param_counts(teacher_model)["total"]
    assert out["memory_bytes"]["teacher_weights"] >= 4 * out["teacher_params"] and out["memory_bytes"]["soft_targets"]
    student_model = load_config(config_file=str(tuned / "config.json")).model
    teacher_forward = 2 * param_counts(teacher_model)["matmul"] + 4 * 3 * 64 * 96  # + its attention's forward
    assert out["seq_len"] == 96
    assert out["flops_per_token"] == pytest.approx(flops_per_token(student_model, 96) + teacher_forward)
    lora = json.loads(run_cli(*args, "--json", "--adapt", "lora").stdout)  # (another mode: no teacher there)
    assert lora["teacher_params"] is None and "teacher_weights" not in lora["memory_bytes"]
    text = run_cli(*args).stdout
    assert "distillation: a frozen teacher" in text and "teacher weights" in text
    flag = json.loads(run_cli(*args, "--json", "--teacher", str(teacher)).stdout)  # (finetune's flag, a run folder)
    assert flag["teacher_params"] == out["teacher_params"] and flag["flops_per_token"] == out["flops_per_token"]


def test_teacher_flag_plans_a_distillation_from_a_preset_and_refuses_what_finetune_would() -> None:
    """`estimate` had no --teacher: a distillation was planned only from a distillation run's --config. The flag
    (finetune's name) takes a run, an HF directory or a preset (its vocabulary the student's), plans finetune's
    batch and optimizer (distill's defaults, not the preset's pretraining ones), and refuses in one line what
    cannot be planned or what finetune would refuse."""
    args = ("estimate", "--preset", "tiny", "--model.vocab_size", "512", "--tokens", "1e5", "--hardware", "1000")
    out = json.loads(run_cli(*args, "--teacher", "small", "--json").stdout)
    teacher = dataclasses.replace(load_config(preset="small").model, vocab_size=512)
    assert out["teacher_params"] == param_counts(teacher)["total"]
    assert out["batch_size"] == 16  # finetune's, not tiny's pretraining batch
    assert out["memory_bytes"]["teacher_weights"] == 4 * param_counts(teacher)["total"]
    for teacher_arg, match in (
        ("bert-base", "is a bert preset; estimate plans GPT/Llama-style teachers only"),
        ("no-such-run", "pass --teacher a run or checkpoint folder, an HF model directory, hf:ORG/NAME or a preset"),
    ):
        err = run_cli(*args, "--teacher", teacher_arg)
        assert err.returncode == 2 and match in err.stderr and len(err.stderr.strip().splitlines()) == 1
    short = run_cli("estimate", "--preset", "small", "--teacher", "tiny", "--tokens", "1e5")
    assert short.returncode == 2 and "the teacher's context of 128 tokens is shorter" in short.stderr
    lora = run_cli(*args, "--teacher", "small", "--adapt", "lora")
    assert lora.returncode == 2 and "a distillation fine-tune trains every weight" in lora.stderr


def test_a_teacher_run_with_another_tokenizer_than_the_student_run_is_refused_as_finetune_refuses_it(tmp_path) -> None:
    """`estimate --config STUDENT_RUN --teacher RUN` planned a teacher whose tokenizer differs from the student's
    (e.g. 319 vs 2,948 ids), which `finetune --adapt distill` refuses; the same rule (one function,
    `adapt.load.check_teacher_tokenizer`) now refuses it here in one line, for a run or checkpoint folder on either
    side. The teacher's own tokenizer is still accepted."""
    from lmforge.tokenizer.tokenizer import Tokenizer
    from lmforge.tokenizer.train import train_char
    from tests.test_finetune import make_base

    teacher = make_base(tmp_path / "t", n_layer=3, d_model=64)
    other = make_base(tmp_path / "other", tok=train_char(["a student with a smaller alphabet"]))
    same = make_base(tmp_path / "same", tok=Tokenizer.load(teacher / "tokenizer.json"))
    args = ("estimate", "--tokens", "1e5", "--hardware", "1000", "--teacher")
    n_teacher = Tokenizer.load(teacher / "tokenizer.json").vocab_size
    n_other = Tokenizer.load(other / "tokenizer.json").vocab_size
    for student, teacher_arg in ((other, teacher), (other / "config.json", teacher / "checkpoints" / "step-000000")):
        r = run_cli(*args, str(teacher_arg), "--config", str(student))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        said = f"--teacher {teacher_arg} uses another tokenizer than the student ({n_teacher:,} vs {n_other:,} ids)"
        assert said in r.stderr and "distillation needs the same one" in r.stderr, r.stderr
    r = run_cli(*args, str(teacher), "--config", str(same), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["teacher_params"], r.stderr


def test_an_hf_directory_teacher_with_another_tokenizer_is_refused_as_finetune_refuses_it(tmp_path) -> None:
    """`estimate --teacher HF_DIR --config STUDENT_RUN` did not compare the HF directory's tokenizer with the
    student's: `finetune --adapt distill` found the difference only after importing the teacher. The directory's
    tokenizer is now read from its files (as the import reads it) and checked by the same function."""
    from lmforge.estimate_adapt import check_teacher_run_tokenizer
    from lmforge.export.hf import export_hf
    from lmforge.tokenizer.tokenizer import Tokenizer
    from lmforge.tokenizer.train import train_char
    from tests.test_finetune import make_base

    teacher = make_base(tmp_path / "t", n_layer=3, d_model=64)
    hf = export_hf(teacher, tmp_path / "hf")
    other = make_base(tmp_path / "other", tok=train_char(["a student with a smaller alphabet"]))
    same = make_base(tmp_path / "same", tok=Tokenizer.load(teacher / "tokenizer.json"))
    with pytest.raises(ConfigError, match=rf"^--teacher {re.escape(str(hf))} uses another tokenizer than the student"):
        check_teacher_run_tokenizer(hf, other)  # (the estimate command calls it: the test above)
    check_teacher_run_tokenizer(hf, same / "config.json")


def test_a_distillation_teacher_is_read_from_a_run_or_an_hf_directory(tmp_path) -> None:
    from lmforge.estimate_adapt import read_teacher
    from tests.test_finetune import make_base

    transformers = pytest.importorskip("transformers")
    run = make_base(tmp_path / "t", n_layer=3, d_model=64)
    assert read_teacher(run) == load_config(config_file=str(run / "config.json")).model
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    )  # fmt: skip
    hf.save_pretrained(tmp_path / "hf")
    assert param_counts(read_teacher(tmp_path / "hf"))["total"] == sum(p.numel() for p in hf.parameters())
    with pytest.raises(ConfigError, match=r"^cannot read the distillation teacher .*nope"):
        read_teacher(tmp_path / "nope")
