"""Speedrun features: QK-norm, ReLU², zero-init projections, the Muon optimizer, and the speedrun config."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import OptimConfig, load_config
from lmforge.errors import LmforgeError
from lmforge.export.hf_families import hf_family
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.train.optim import Muon, build_optimizer, muon_groups, newton_schulz, newton_schulz_many, param_groups
from lmforge.train.state import flatten_optimizer, unflatten_optimizer

REPO = Path(__file__).resolve().parent.parent


def tiny(**kw) -> GPT:
    cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=16, **kw)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    return model


def test_defaults_leave_the_model_unchanged():
    cfg = GPTConfig()
    assert (cfg.qk_norm, cfg.mlp, cfg.zero_init_proj) == (False, "gelu", False)
    a, b = tiny(), tiny(qk_norm=False, zero_init_proj=False, mlp="gelu")
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_zero_init_projections_start_each_block_as_the_identity():
    model = tiny(zero_init_proj=True)
    for block in model.blocks:
        assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.proj.weight.abs().sum() == 0
        assert block.mlp.fc.weight.std() > 0.01  # the other matrices are still random
    x = torch.randint(0, 64, (2, 16))
    h = model.tok_emb(x) + model.pos_emb.weight[:16]
    expected = F.linear(model.norm_f(h), model.tok_emb.weight)  # blocks add exactly zero
    torch.testing.assert_close(model(x), expected)


def test_relu2_mlp_is_relu_squared():
    model = tiny(mlp="relu2")
    mlp = model.blocks[0].mlp
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.proj(F.relu(mlp.fc(x)) ** 2))
    assert mlp.fc.weight.shape == (128, 32)  # d_ff = 4 * d_model, one matrix


def test_qk_norm_makes_attention_invariant_to_the_scale_of_q_and_k():
    model = tiny(qk_norm=True, bias=False)
    x = torch.randint(0, 64, (2, 16))
    before = model(x)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * 32].mul_(7.0)  # rows of q and k
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    plain = tiny(bias=False)
    with torch.no_grad():
        for block in plain.blocks:
            block.attn.qkv.weight[: 2 * 32].mul_(7.0)
    assert (plain(x) - tiny(bias=False)(x)).abs().max() > 1e-3  # without qk_norm the scale matters


def test_qk_norm_and_relu2_stay_causal_with_rope_and_kv_cache():
    model = tiny(qk_norm=True, mlp="relu2", pos_emb="rope", norm="rmsnorm").eval()
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 64
    torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])
    cache = model.new_cache(1)
    with torch.no_grad():
        stepwise = torch.cat([model(x[:, :6], cache)] + [model(x[:, i : i + 1], cache) for i in range(6, 12)], dim=1)
        torch.testing.assert_close(stepwise, model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change", [{"qk_norm": True}, {"mlp": "relu2"}])
def test_export_refuses_what_hf_cannot_express(change):
    assert hf_family(GPTConfig(vocab_size=64, **{"zero_init_proj": True})) == "gpt2"  # init only: exportable
    with pytest.raises(LmforgeError, match="qk_norm|mlp=relu2"):
        hf_family(GPTConfig(vocab_size=64, **change))


def test_gguf_export_refuses_qk_norm():
    from lmforge.export.gguf import _check_llama

    llama = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "vocab_size": 64}
    _check_llama(GPTConfig(**llama))  # a plain Llama-style model passes
    with pytest.raises(LmforgeError, match="qk_norm"):
        _check_llama(GPTConfig(**llama, qk_norm=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48), (32, 64)])
def test_newton_schulz_approximately_orthogonalises(shape, dtype):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(g, dtype=dtype)
    assert x.dtype == torch.float32
    s = torch.linalg.svdvals(x)
    assert x.shape == g.shape
    assert s.min() > 0.5 and s.max() < 1.3, s  # Muon's quintic pushes every singular value near 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (x * (u @ vh)).sum() / (x.norm() * (u @ vh).norm())
    assert cos > 0.97  # and points along U V^T


def test_muon_groups_split_hidden_matrices_from_the_rest():
    model = tiny(tie_embeddings=False)
    groups = muon_groups(model, weight_decay=0.1, lr_scale=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["muon"] and groups[0]["lr_scale"] == 10.0
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    rest = {names[id(p)] for g in groups[1:] for p in g["params"]}
    assert {"tok_emb.weight", "pos_emb.weight", "lm_head.weight", "norm_f.weight"} <= rest
    assert not muon & rest and len(muon | rest) == len(list(model.parameters()))


def test_muon_adamw_part_matches_torch_adamw():
    a, b = tiny(), tiny()
    opt_a = Muon(muon_groups(a, 0.1, lr_scale=10.0), lr=3e-3, betas=(0.9, 0.99), eps=1e-8)
    non_hidden_b = [dict(g) for g in muon_groups(b, 0.1, lr_scale=10.0)[1:]]
    for g in non_hidden_b:
        g.pop("muon", None)
        g.pop("lr_scale", None)
    opt_b = torch.optim.AdamW(non_hidden_b, lr=3e-3, betas=(0.9, 0.99), eps=1e-8)
    x = torch.randint(0, 64, (4, 16))
    for _ in range(3):
        for model in (a, b):
            F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        for opt in (opt_a, opt_b):
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # keep the hidden matrices equal so the next gradients stay comparable
            for pa, pb in zip(a.blocks.parameters(), b.blocks.parameters(), strict=True):
                if pa.dim() == 2:
                    pb.copy_(pa)
    torch.testing.assert_close(a.tok_emb.weight, b.tok_emb.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.blocks[1].norm2.weight, b.blocks[1].norm2.weight, rtol=1e-5, atol=1e-6)


def test_muon_trains_through_build_optimizer_and_its_state_round_trips():
    cfg = load_config(preset="tiny", overrides={"optim": {"name": "muon", "muon_lr": 0.05}, "train": {"lr": 1e-2}})
    model = tiny(qk_norm=True, mlp="relu2", zero_init_proj=True)
    opt = build_optimizer(model, cfg.optim, lr=cfg.train.lr, device=torch.device("cpu"))
    assert isinstance(opt, Muon) and opt.param_groups[0]["lr_scale"] == pytest.approx(5.0)
    x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < 0.5 * losses[0], losses  # memorises one batch

    tensors, structure = flatten_optimizer(opt.state_dict())
    tensors = {k: v.clone() for k, v in tensors.items()}  # as if read back from optim.safetensors
    clone = copy.deepcopy(model)
    opt2 = build_optimizer(clone, cfg.optim, lr=cfg.train.lr, device=torch.device("cpu"))
    opt2.load_state_dict(unflatten_optimizer(tensors, structure))
    for m, o in ((model, opt), (clone, opt2)):
        F.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        o.step()
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bad_muon_settings_are_config_errors():
    with pytest.raises(LmforgeError, match="muon_momentum"):
        OptimConfig(name="muon", muon_momentum=1.0)
    with pytest.raises(LmforgeError, match="muon_lr"):
        OptimConfig(name="muon", muon_lr=0.0)
    with pytest.raises(LmforgeError, match="muon_ns_steps"):
        OptimConfig(name="muon", muon_ns_steps=0)


def test_param_groups_unchanged_for_adamw():
    model = tiny()
    groups = param_groups(model, 0.1)
    opt = build_optimizer(model, OptimConfig(), lr=1e-3, device=torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in groups]


def test_adamw_is_fused_on_cpu_by_default_and_the_nanogpt_replica_pins_the_for_loop():
    """The default fused AdamW is the same update up to rounding; `off` is torch's for-loop AdamW exactly."""
    cpu = torch.device("cpu")
    runs = {}
    for fused in ("auto", "off"):
        model = tiny()
        opt = build_optimizer(model, OptimConfig(fused=fused, weight_decay=0.1), lr=3e-3, device=cpu)
        assert opt.defaults["fused"] is (True if fused == "auto" else None)
        reference = tiny()
        plain = torch.optim.AdamW(param_groups(reference, 0.1), lr=3e-3, betas=(0.9, 0.95))
        x = torch.randint(0, 64, (4, 16))
        for _ in range(5):
            for m, o in ((model, opt), (reference, plain)):
                F.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
                o.step()
                o.zero_grad(set_to_none=True)
        runs[fused] = (model, reference)
    fused_model, reference = runs["auto"]
    loop_model, _ = runs["off"]
    pairs = list(zip(loop_model.parameters(), reference.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in pairs)  # "off": bit for bit torch's default AdamW
    pairs = list(zip(fused_model.parameters(), reference.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in pairs)  # the fused kernel rounds differently...
    # ...and only that: 5 Adam steps of lr 3e-3 move a weight by up to 1.5e-2; the two agree to < 0.2% of
    # that (measured 4.2e-6, on a bias whose tiny gradient makes m / sqrt(v) sensitive to rounding)
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-5)
    replica = load_config(config_file=REPO / "configs" / "nanogpt-baby-cpu.toml")
    assert replica.optim.fused == "off"  # nanoGPT fuses AdamW on CUDA only


def test_speedrun_config_loads_and_uses_the_features():
    cfg = load_config(config_file=REPO / "configs" / "speedrun-shakespeare-char.toml")
    assert cfg.optim.name == "muon" and cfg.model.qk_norm and cfg.model.mlp == "relu2"


def _textbook_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    x = g.mT if g.size(-2) > g.size(-1) else g
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return x.mT if g.size(-2) > g.size(-1) else x


@pytest.mark.parametrize("shape", [(128, 512), (512, 128), (64, 192), (2, 32, 96), (48, 80), (64, 64)])
def test_gram_space_newton_schulz_equals_the_textbook_iteration(shape):
    # float32 iterates on the Gram matrix; the result must be the same iteration
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(newton_schulz(g), _textbook_newton_schulz(g), rtol=0, atol=3e-5)
    torch.testing.assert_close(newton_schulz(g, steps=3), _textbook_newton_schulz(g, steps=3), rtol=0, atol=3e-5)


def test_newton_schulz_many_batches_equal_gram_sizes_without_mixing_them():
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(*s, generator=gen) for s in [(96, 32), (32, 32), (32, 128), (48, 16), (16, 40)]]
    together = newton_schulz_many(mats)
    for m, t in zip(mats, together, strict=True):
        assert t.shape == m.shape
        torch.testing.assert_close(t, _textbook_newton_schulz(m), rtol=0, atol=3e-5)


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    g = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(1))
    batched = newton_schulz(g)
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(g[i]), rtol=1e-4, atol=1e-5)


def test_glibc_accepts_the_allocator_settings():
    # mallopt silently refuses an mmap threshold above 32 MiB (returns 0): the settings must be in range
    import platform

    from lmforge.train.precision import keep_freed_memory

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert keep_freed_memory(torch.device("cpu")) is True
    assert keep_freed_memory(torch.device("meta")) is False  # CPU training only


def test_muon_step_on_hidden_matrices_follows_the_formula():
    # two steps by hand: buf <- m buf + g; update = NS(g + m buf); W <- W - lr sqrt(max(1, rows/cols)) update
    gen = torch.Generator().manual_seed(4)
    weights = [
        torch.randn(48, 16, generator=gen),
        torch.randn(16, 16, generator=gen),
        torch.randn(16, 64, generator=gen),
    ]
    params = [w.clone().requires_grad_() for w in weights]
    opt = Muon([{"params": params, "muon": True}], lr=0.05, momentum=0.8)
    expected = [w.clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in weights]
    for _ in range(2):
        grads = [torch.randn(w.shape, generator=gen) for w in weights]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = 0.8 * bufs[i] + g
            update = _textbook_newton_schulz(g + 0.8 * bufs[i])
            expected[i] = expected[i] - 0.05 * max(1.0, g.shape[0] / g.shape[1]) ** 0.5 * update
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-5)


def test_relu_squared_function_equals_autograd_of_relu_then_square():
    from lmforge.models.gpt import ReLUSquared

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, 64, generator=gen)
    x[0, 0, :4] = 0.0  # the kink: both give gradient 0 there
    grad = torch.randn(4, 8, 64, generator=gen)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = F.relu(a).square(), ReLUSquared.apply(b)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)  # bit for bit, not just close
    assert torch.autograd.gradcheck(ReLUSquared.apply, (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),))


def test_muon_state_dict_numbers_parameters_like_torch_optim():
    model = tiny(tie_embeddings=False)
    groups = muon_groups(model, weight_decay=0.1, lr_scale=2.0)
    ours = Muon(groups, lr=1e-3).state_dict()["param_groups"]
    theirs = torch.optim.SGD([{"params": g["params"]} for g in groups], lr=1e-3).state_dict()["param_groups"]
    assert [g["params"] for g in ours] == [g["params"] for g in theirs]
    opt = Muon(groups, lr=1e-3)
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": ours[:1]})
    with pytest.raises(ValueError, match="more than one"):
        Muon([{"params": groups[0]["params"]}, {"params": groups[0]["params"][:1]}], lr=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(900)  # cold inductor cache: 98-118 s at load 6, and 300 s ran out at load 8 (as test_generate's)
def test_compiled_training_equals_eager_and_saves_plain_keys(data_dir: Path, tmp_path: Path):
    """`--train.compile true` (inductor on CPU here; ~15 s of compilation): same losses, same checkpoint keys."""
    import json

    from safetensors.torch import load_file

    from lmforge.train.run import pretrain
    from tests.conftest import tiny_config

    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        pretrain(tiny_config(data_dir, out, **{"train.max_steps": 4, "train.compile": compiled}), progress=False)
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
        runs[compiled] = (losses, load_file(str(out / "checkpoints" / "step-000004" / "model.safetensors")))
    (eager_losses, eager_w), (comp_losses, comp_w) = runs[False], runs[True]
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4)
    assert comp_w.keys() == eager_w.keys()  # no `_orig_mod.` prefix from the compile wrapper
    for name in eager_w:
        torch.testing.assert_close(comp_w[name], eager_w[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_rms_norm_equals_f_rms_norm_values_and_gradients(dtype):
    from lmforge.models.gpt import HeadRMSNorm

    gen = torch.Generator().manual_seed(7)
    x = (3 * torch.randn(4, 6, 5, 32, generator=gen)).to(dtype).requires_grad_()
    dy = torch.randn(4, 6, 5, 32, generator=gen).to(dtype)
    y = HeadRMSNorm.apply(x)
    (grad,) = torch.autograd.grad(y, x, dy)
    reference = F.rms_norm(x, (32,))
    (reference_grad,) = torch.autograd.grad(reference, x, dy)
    assert y.dtype == grad.dtype == dtype
    # float32: a few ulps; bf16: 1-2 ulps (8 mantissa bits) of values ~1 and gradients ~1
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-2)
    torch.testing.assert_close(y, reference, **tol)
    torch.testing.assert_close(grad, reference_grad, **tol)
    x64 = torch.randn(3, 4, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(HeadRMSNorm.apply, (x64,))
