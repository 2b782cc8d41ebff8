"""GPT model: shapes for every variant, causality, parameter/FLOP counts, init, meta-device build, dropout."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models import build_model
from lmforge.models.gpt import GPT, GPTConfig

VOCAB = 96
# every combination of the architecture switches (2^6 = 64 tiny models, a few ms each)
VARIANTS = [
    dict(pos_emb=p, norm=n, mlp=m, n_kv_head=kv, tie_embeddings=tie, bias=bias)
    for p, n, m, kv, tie, bias in itertools.product(
        ["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"], [0, 2], [True, False], [True, False]
    )
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and when the other core is busy every OpenMP
    region waits for it (measured: 0.5 s instead of 6 ms per tiny forward+backward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def variant_id(v: dict) -> str:
    return f"{v['pos_emb']}-{v['norm']}-{v['mlp']}-kv{v['n_kv_head']}-{'tied' if v['tie_embeddings'] else 'untied'}" + (
        "-bias" if v["bias"] else ""
    )


def tiny(seed: int = 0, **overrides: object) -> GPT:
    cfg = GPTConfig(**{"vocab_size": VOCAB, "max_seq_len": 32, "n_layer": 2, "n_head": 4, "d_model": 32, **overrides})
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.init_weights()
    return model


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_output_shape_and_dtype(variant: dict) -> None:
    model = tiny(**variant)
    idx = torch.randint(0, VOCAB, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.sum().backward()  # every parameter takes part in the forward pass
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "variant", [v for v in VARIANTS if not v["bias"] and v["tie_embeddings"]] + [VARIANTS[0]], ids=variant_id
)
def test_causal(variant: dict) -> None:
    """Changing tokens after position t leaves logits at positions <= t bit-identical."""
    model = tiny(**variant).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 24))
    t = 10
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, VOCAB, (2, 24 - t - 1))
    assert not torch.equal(idx, changed)
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the test can fail: later positions do change


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_num_params(tie: bool, pos_emb: str) -> None:
    model = tiny(tie_embeddings=tie, pos_emb=pos_emb, n_kv_head=2, mlp="swiglu")
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    embeddings = cfg.vocab_size * cfg.d_model + (cfg.max_seq_len * cfg.d_model if pos_emb == "learned" else 0)
    assert model.num_params() == total - embeddings
    # by formula (bias=True, layernorm by default); an untied head counts, a tied one is the embedding table
    d, qkv_out = cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    attn = (d * qkv_out + qkv_out) + (d * d + d)  # qkv and proj, weights + biases
    mlp = (d * 2 * cfg.ff_dim + 2 * cfg.ff_dim) + (cfg.ff_dim * d + d)  # swiglu fc is [gate; up]
    norms = 2 * 2 * d  # two layernorms per block, weight + bias
    expected = cfg.n_layer * (attn + mlp + norms) + 2 * d + (0 if tie else cfg.vocab_size * d)
    assert model.num_params() == expected


def test_flops_per_token() -> None:
    """6 * matmul weights (12 d^2 per block + the tied V x d output projection) + 12 * L * d * T."""
    model = tiny(bias=False)  # gelu, tied, L = 2, d = 32, V = 96
    expected = 6 * (2 * 12 * 32**2 + VOCAB * 32) + 12 * 2 * 32 * 32
    assert model.flops_per_token(32) == expected
    untied = tiny(bias=False, tie_embeddings=False)  # an untied head is the same matmul
    assert untied.flops_per_token(32) == expected


def test_init_deterministic() -> None:
    a, b, c = tiny(seed=5, pos_emb="rope"), tiny(seed=5, pos_emb="rope"), tiny(seed=6, pos_emb="rope")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])


def test_init_values() -> None:
    """N(0, std) weights, residual projections std / sqrt(2 n_layer), zero biases, unit norms."""
    model = tiny(n_layer=4, d_model=128, n_head=4)
    std = model.cfg.init_std
    resid = std / math.sqrt(2 * 4)
    for i, block in enumerate(model.blocks):
        assert block.attn.qkv.weight.std().item() == pytest.approx(std, rel=0.05), i
        assert block.mlp.fc.weight.std().item() == pytest.approx(std, rel=0.05), i
        assert block.attn.proj.weight.std().item() == pytest.approx(resid, rel=0.05), i
        assert block.mlp.proj.weight.std().item() == pytest.approx(resid, rel=0.05), i
        assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.mlp.proj.bias == 0)
        assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)
    assert model.tok_emb.weight.std().item() == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_meta_device_build(pos_emb: str) -> None:
    """Built on meta + to_empty + init_weights == built on CPU + init_weights, same seed (buffers too)."""
    cfg = GPTConfig(vocab_size=VOCAB, max_seq_len=32, n_layer=2, n_head=4, d_model=32, pos_emb=pos_emb, n_kv_head=2)
    torch.manual_seed(3)
    ref = GPT(cfg)
    ref.init_weights()
    torch.manual_seed(3)
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    model = model.to_empty(device="cpu")
    model.init_weights()
    ref_tensors = dict(ref.named_parameters()) | dict(ref.named_buffers())
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert ref_tensors.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(t, ref_tensors[name]), name
    idx = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(model(idx), ref(idx))


def test_state_dict_keys() -> None:
    """The documented names (the HF export maps against them)."""
    keys = set(tiny(pos_emb="learned", tie_embeddings=False).state_dict())
    assert {"tok_emb.weight", "pos_emb.weight", "norm_f.weight", "norm_f.bias", "lm_head.weight"} <= keys
    for name in ("norm1.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "norm2.bias", "mlp.fc.weight"):
        assert f"blocks.1.{name}" in keys
    rope_tied = set(tiny(pos_emb="rope", norm="rmsnorm", bias=False).state_dict())
    assert "lm_head.weight" not in rope_tied and "pos_emb.weight" not in rope_tied
    assert not any("rope" in k for k in rope_tied)  # rotary tables are non-persistent buffers
    assert "blocks.0.norm1.bias" not in rope_tied


def test_vocab_size_zero_is_config_error() -> None:
    with pytest.raises(ConfigError, match="model.vocab_size is 0"):
        GPT(GPTConfig(vocab_size=0))


def test_too_long_is_value_error() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_dropout_only_in_train_mode(pos_emb: str) -> None:
    model = tiny(dropout=0.3, pos_emb=pos_emb)
    idx = torch.randint(0, VOCAB, (2, 16))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    no_dropout = tiny(dropout=0.0, pos_emb=pos_emb)  # same seed: same weights
    assert torch.equal(model(idx), no_dropout.eval()(idx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_two_multiplications_equals_the_textbook_rotation_bit_for_bit(dtype: torch.dtype) -> None:
    """apply_rope computes x * [c, c] + [x2, x1] * [-s, s]; the rotation by angle theta_j of each pair
    (x1_j, x2_j) written out, x1 c - x2 s and x2 c + x1 s, must come out identical, not just close."""
    from lmforge.models.layers import apply_rope, rope_cos_sin

    T, D = 12, 16
    x = torch.randn(2, T, 3, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    cos, sin = rope_cos_sin(T, D, 10000.0)
    assert torch.equal(cos[:, : D // 2], cos[:, D // 2 :]) and torch.equal(-sin[:, : D // 2], sin[:, D // 2 :])
    c, s = cos[:, None, : D // 2].to(dtype), sin[:, None, D // 2 :].to(dtype)  # each angle's cos and sin
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    textbook = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    rotated = apply_rope(x, cos[:, None], sin[:, None])  # tables broadcast over the heads
    assert torch.equal(rotated, textbook)
    assert torch.equal(rotated[:, 0], x[:, 0])  # position 0: no rotation
    expanded = (cos[:, None].expand(T, 3, D).contiguous(), sin[:, None].expand(T, 3, D).contiguous())
    assert torch.equal(apply_rope(x, *expanded), textbook)  # as GPT.rope_tables passes them


@pytest.mark.parametrize(
    "family, fields, match",
    [
        ("gpt", {"d_model": -8}, "model.d_model must be > 0, got -8"),  # -8 % n_head == 0 let it through
        ("gpt", {"d_model": 0}, "model.d_model must be > 0, got 0"),
        ("gpt", {"n_head": 0}, "model.n_head must be > 0"),
        ("gpt", {"d_ff": -1}, "model.d_ff must be >= 0"),
        ("gpt", {"init_std": -0.02}, "model.init_std must be a number >= 0"),
        ("gpt", {"rope_theta": 0.0, "pos_emb": "rope"}, "model.rope_theta must be a number > 0"),
        ("gpt", {"norm_eps": -1e-5}, "model.norm_eps must be a number >= 0"),
        ("bert", {"d_model": -8}, "model.d_model must be > 0, got -8"),
        ("bert", {"d_model": 0}, "model.d_model must be > 0, got 0"),
        ("bert", {"d_ff": -1}, "model.d_ff must be >= 0"),
        ("bert", {"max_seq_len": 2}, "model.max_seq_len must be >= 4"),
        ("electra", {"d_model": -8}, "model.d_model must be > 0"),
        ("lstm", {"d_model": 0}, "model.d_model must be > 0"),
        ("gru", {"n_layer": 0}, "model.n_layer must be > 0"),
        ("lstm", {"init_std": -1.0}, "model.init_std must be a number >= 0"),
    ],
)
def test_model_sizes_are_validated_for_every_family(family: str, fields: dict, match: str) -> None:
    """A bad size is a one-line ConfigError at config time: `pretrain --model.d_model -8` was a RuntimeError
    traceback after the run directory was written, `estimate` printed negative parameter counts."""
    from lmforge.config import load_config

    with pytest.raises(ConfigError, match=match) as info:
        load_config(overrides={"model": {"family": family, **fields}})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_helper_equals_f_gelu_and_restores_onednn(dtype: torch.dtype) -> None:
    """layers.gelu: F.gelu's values (within 3e-6, where 1 + erf cancels) on both sides of GELU_SMALL, the
    exact and tanh forms, with gradients, and oneDNN switched back on afterwards (also when F.gelu raises)."""
    import torch.nn.functional as F

    from lmforge.models.layers import GELU_SMALL, gelu

    for n in (7, 1536, GELU_SMALL + 1):
        for approximate in ("none", "tanh"):
            x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4).to(dtype).requires_grad_()
            y = gelu(x, approximate)
            tol = dict(atol=3e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(y, F.gelu(x, approximate=approximate), **tol)
            y.sum().backward()
            assert x.grad is not None and torch.isfinite(x.grad).all()
            assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError):
        gelu(torch.zeros(3, dtype=torch.long))  # no GELU for integers: raised inside the switched-off window
    assert torch.backends.mkldnn.enabled


def test_gelu_tanh_through_a_sigmoid_has_f_gelus_values_and_gradients() -> None:
    """layers.GeluTanh (the tanh GELU of a large float32 CPU tensor as x sigmoid(u)): within float32 rounding
    of the float64 `F.gelu(approximate="tanh")`, values and gradients, as close as ATen's own float32 kernel
    is (x from N(0, 16) and N(0, 900), where sigmoid(u) rounds to 0 or 1 and the slope must not cancel); the
    same values without a gradient (in place); the same function written out for a compiled graph; no silent
    second derivative."""
    import torch.nn.functional as F

    from lmforge.models.layers import GELU_SMALL, GeluTanh, gelu

    for scale in (4.0, 30.0):
        x64 = torch.randn(GELU_SMALL + 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * scale
        g64 = torch.randn_like(x64)
        x64.requires_grad_()
        F.gelu(x64, approximate="tanh").backward(g64)
        x = x64.detach().float().requires_grad_()
        y = gelu(x, "tanh")
        assert y.grad_fn is not None and "GeluTanh" in type(y.grad_fn).__name__
        y.backward(g64.float())
        aten_x = x64.detach().float().requires_grad_()
        aten = F.gelu(aten_x, approximate="tanh")
        aten.backward(g64.float())
        ref, ref_grad = F.gelu(x64.detach(), approximate="tanh"), x64.grad
        for ours, theirs, exact in ((y, aten, ref), (x.grad, aten_x.grad, ref_grad)):
            err = (ours.double() - exact).abs().max().item()
            assert err <= 4 * max((theirs.double() - exact).abs().max().item(), 1e-6), err
        with torch.no_grad():
            assert torch.equal(gelu(x, "tanh"), y.detach())
    # inside a compiled graph (is_compiling) the same x sigmoid(u), as plain ops for inductor to fuse
    x = (torch.randn(300, generator=torch.Generator().manual_seed(2)) * 4).requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        y = gelu(x, "tanh")
    assert y.grad_fn is not None and "GeluTanh" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), atol=2e-6, rtol=2e-6)
    (grad,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)
    twice = torch.randn(GELU_SMALL, dtype=torch.float32, requires_grad=True)
    (grad,) = torch.autograd.grad(GeluTanh.apply(twice).sum(), twice, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa_for_one_query(n_kv_head: int, dtype: torch.dtype) -> None:
    """gpt.decode_attention (the compiled CPU decode step's attention): SDPA's output for one query per head
    over L cached keys, with multi-head, grouped and multi-query k/v."""
    import torch.nn.functional as F

    from lmforge.models.gpt import decode_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, n_kv_head, 9, 16, generator=g).to(dtype) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=n_kv_head != 4)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(decode_attention(q, k, v), want, **tol)
