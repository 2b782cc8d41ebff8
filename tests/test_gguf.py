"""GGUF export: read the file back with gguf's own reader and check tensors, metadata and values.

Tiny random Llama-style models (n_layer 2, d_model 64, n_head 4, head_dim 16, BPE vocab 300). The
rotary permutation is checked by running llama.cpp's rope layout (adjacent pairs) on the exported
q/k weights and ours (rotate half) on the originals: attention scores must agree.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.models.layers import apply_rope, rope_cos_sin
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe, train_char, train_unigram, train_wordpiece, with_nfkc
from lmforge.trained import load_trained

gguf = pytest.importorskip("gguf")
from lmforge.export.gguf import export_gguf, permute_rope_rows  # noqa: E402
from tests.conftest import file_size_limit  # noqa: E402
from tests.test_export import LLAMA, make_run  # noqa: E402

GQA = dict(LLAMA, d_model=64, n_kv_head=2, tie_embeddings=False, rope_theta=500.0)
CORPUS = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(40)] + ["你好世界 " * 20]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(CORPUS, vocab_size=300)


def read(path: Path) -> tuple[dict[str, object], dict[str, object]]:
    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def dequant(t: object) -> np.ndarray:
    """A tensor of the reader as float32 in numpy (out, in) order."""
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def test_metadata_and_tensor_names(bpe: Tokenizer, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", bpe, **GQA)
    path = export_gguf(run, tmp_path / "m.gguf")
    fields, tensors = read(path)
    cfg = load_trained(run, torch.device("cpu")).config.model
    assert fields["general.architecture"] == "llama"
    assert fields["llama.context_length"] == cfg.max_seq_len == 32
    assert fields["llama.embedding_length"] == 64
    assert fields["llama.block_count"] == 2
    assert fields["llama.feed_forward_length"] == cfg.ff_dim
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.freq_base"] == 500.0
    assert fields["llama.rope.dimension_count"] == 16
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == bpe.vocab_size and all(tokens[i] == bpe.id_to_token(i) for i in range(bpe.vocab_size))
    types = fields["tokenizer.ggml.token_type"]
    assert types[bpe.eos_id] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == bpe.vocab_size - 257 and all(len(m.split(" ")) == 2 for m in merges)
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.bos_token_id"] == bpe.eos_id
    assert fields["tokenizer.ggml.add_bos_token"] is False

    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{n}.weight" for i in range(2) for n in per_block}
    assert set(tensors) == expected
    # ggml lists dims innermost first: (in, out)
    hd, ff = 16, cfg.ff_dim
    shapes = {"attn_q": (64, 64), "attn_k": (64, 2 * hd), "attn_v": (64, 2 * hd), "ffn_gate": (64, ff)}
    for name, shape in shapes.items():
        assert tuple(int(d) for d in tensors[f"blk.0.{name}.weight"].shape) == shape
    assert tuple(int(d) for d in tensors["token_embd.weight"].shape) == (64, bpe.vocab_size)
    assert tensors["blk.1.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_values_match_ours(dtype: str, bpe: Tokenizer, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", bpe, **dict(GQA, bias=True))
    path = export_gguf(run, tmp_path / "m.gguf", dtype=dtype)
    _, tensors = read(path)
    model = load_trained(run, torch.device("cpu")).model
    sd = model.state_dict()
    b = model.blocks[0]
    H, Hkv, D = 4, 2, 16
    q, k, v = sd["blocks.0.attn.qkv.weight"].split([H * D, Hkv * D, Hkv * D])
    gate, up = sd["blocks.0.mlp.fc.weight"].chunk(2)
    pairs = {
        "token_embd.weight": sd["tok_emb.weight"],
        "output.weight": sd["lm_head.weight"],
        "blk.0.attn_v.weight": v,
        "blk.0.attn_output.weight": b.attn.proj.weight,
        "blk.0.ffn_gate.weight": gate,
        "blk.0.ffn_up.weight": up,
        "blk.0.ffn_down.weight": b.mlp.proj.weight,
        "blk.0.attn_norm.weight": b.norm1.weight,
        "blk.0.attn_v.bias": sd["blocks.0.attn.qkv.bias"][-Hkv * D :],
    }
    for name, ours in pairs.items():
        t = tensors[name]
        ours = ours.detach().numpy()
        # f16: relative rounding 2^-11. q8_0: each block of 32 is scaled by d = max|w|/127, so the error
        # is <= d/2 plus the scale's own f16 rounding times up to 127 steps (127 * 2^-11 d = 0.062 d).
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            blocks = np.abs(ours).reshape(ours.shape[0], -1, 32).max(-1, keepdims=True) / 127
            bound = np.repeat(blocks, 32, axis=-1).reshape(ours.shape) * 0.57 + 1e-7
            err = np.abs(dequant(t) - ours)
            assert (err <= bound).all(), name
            assert err.max() > 0  # it really is quantized
        else:
            np.testing.assert_allclose(dequant(t), ours, rtol=2**-10, atol=1e-7, err_msg=name)
    expected_type = gguf.GGMLQuantizationType.Q8_0 if dtype == "q8_0" else gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_q.weight"].tensor_type == expected_type
    assert tensors["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32


def test_a_model_imported_from_bf16_exports_bf16_by_default(bpe: Tokenizer, tmp_path: Path) -> None:
    # it was written f16 (the only 16-bit choice): bf16 values past f16's range overflow, the smallest lose bits
    from lmforge.export.hf import export_hf
    from lmforge.export.hf_import import import_hf
    from tests.test_export import _hf_llama

    torch.manual_seed(0)
    hf = _hf_llama(bpe).to(torch.bfloat16)
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight[0, :2] = torch.tensor([1e5, 1e-7])  # outside f16: inf and 0
    hf.save_pretrained(tmp_path / "hf")
    bpe.save(tmp_path / "hf" / "tokenizer.json")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    fields, tensors = read(export_gguf(run, tmp_path / "m.gguf"))
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.BF16
    source = hf.model.layers[0].mlp.down_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(dequant(down), source)  # the same values, 1e5 and 1e-7 included
    assert all(t.tensor_type == gguf.GGMLQuantizationType.BF16 for t in tensors.values() if len(t.shape) == 2)
    # --dtype f16 still chooses f16, but not for 1e5, which f16 would hold as inf (numpy only warned): one line,
    # no file; so does the HF export's float16
    with pytest.raises(LmforgeError, match=r"blk\.0\.ffn_down\.weight holds a weight of 99840, past float16's range"):
        export_gguf(run, tmp_path / "f16.gguf", dtype="f16")
    assert not (tmp_path / "f16.gguf").exists()
    with pytest.raises(LmforgeError, match=r"holds a weight of 99840, past .*--dtype bfloat16 or float32$"):
        export_hf(run, tmp_path / "hf16", dtype="float16")
    assert not (tmp_path / "hf16").exists()
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight[0, 0] = 6e4  # inside f16's range: written as f16
    hf.save_pretrained(tmp_path / "hf")
    run = import_hf(tmp_path / "hf", tmp_path / "run2")
    _, f16 = read(export_gguf(run, tmp_path / "f16.gguf", dtype="f16"))
    assert f16["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    _, trained = read(export_gguf(make_run(tmp_path / "ours", bpe, **GQA), tmp_path / "ours.gguf"))
    assert trained["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # float32 runs: f16


def test_auto_writes_bf16_where_a_float32_weight_is_past_f16s_range(bpe: Tokenizer, tmp_path: Path, capsys) -> None:
    """--dtype auto (f16 for a float32 run) picks bf16, with a note, where a matrix holds a weight f16 would
    hold as inf; the weights are then written as bf16 rounds them."""
    from lmforge.export.hf_import import import_hf
    from tests.test_export import _hf_llama

    torch.manual_seed(0)
    hf = _hf_llama(bpe)  # float32
    with torch.no_grad():
        hf.model.layers[1].self_attn.o_proj.weight[0, 0] = -7e4
    hf.save_pretrained(tmp_path / "hf")
    bpe.save(tmp_path / "hf" / "tokenizer.json")
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    capsys.readouterr()
    fields, tensors = read(export_gguf(run, tmp_path / "m.gguf"))
    assert "note: blk.1.attn_output.weight holds a weight of 70000, past float16's range" in capsys.readouterr().err
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    out = dequant(tensors["blk.1.attn_output.weight"])
    source = hf.model.layers[1].self_attn.o_proj.weight.detach()
    np.testing.assert_array_equal(out, source.to(torch.bfloat16).float().numpy())
    assert np.isfinite(out).all()


@pytest.mark.parametrize("bias", [True, False])
def test_biases_get_a_note_for_transformers(bias: bool, bpe: Tokenizer, tmp_path: Path, capsys) -> None:
    """transformers' GGUF loader drops a Llama's biases silently; the export (kept for llama.cpp, which
    reads them) says so in one line on stderr, and says nothing for a bias-free model."""
    run = make_run(tmp_path / "run", bpe, **dict(GQA, bias=bias))
    export_gguf(run, tmp_path / "m.gguf")
    err = capsys.readouterr().err
    if bias:
        assert err.count("\n") == 1 and err.startswith("note: this model has biases")
        assert "drops them" in err and "--to hf" in err
    else:
        assert err == ""


def test_a_normalizing_tokenizer_gets_a_note_for_llama_cpp(bpe: Tokenizer, tmp_path: Path, capsys) -> None:
    """`prepare --normalize NFKC` gives the tokenizer an NFKC normalizer, which GGUF cannot carry: one line says so."""
    run = make_run(tmp_path / "run", with_nfkc(Tokenizer.from_str(bpe.to_str())), **GQA)
    export_gguf(run, tmp_path / "m.gguf")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: this tokenizer normalizes text (NFKC")


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.cpp's LLAMA (normal) rope: dimensions (2j, 2j+1) rotate together. x (T, n_head, head_dim)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def test_rope_permutation_gives_the_same_attention_scores(bpe: Tokenizer, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", bpe, **GQA)
    _, tensors = read(export_gguf(run, tmp_path / "m.gguf", dtype="f16"))
    model = load_trained(run, torch.device("cpu")).model
    H, Hkv, D, T = 4, 2, 16, 10
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(T, D, 500.0)  # ours: [c, c] and [-s, s]
    c, s = cos[:, : D // 2], sin[:, D // 2 :]  # the angles' cos and sin, for llama.cpp's layout
    wq, wk, _ = model.blocks[1].attn.qkv.weight.detach().split([H * D, Hkv * D, Hkv * D])
    # ours: rotate-half rope on the original rows (f16-rounded, as in the file)
    wq16, wk16 = wq.half().float(), wk.half().float()
    q = apply_rope((x @ wq16.T).view(1, T, H, D), cos[:, None], sin[:, None])[0]  # tables broadcast over heads
    k = apply_rope((x @ wk16.T).view(1, T, Hkv, D), cos[:, None], sin[:, None])[0]
    # llama.cpp: interleaved rope on the permuted rows read back from the file
    gq = torch.from_numpy(dequant(tensors["blk.1.attn_q.weight"]))
    gk = torch.from_numpy(dequant(tensors["blk.1.attn_k.weight"]))
    q2 = rope_interleaved((x @ gq.T).view(T, H, D), c, s)
    k2 = rope_interleaved((x @ gk.T).view(T, Hkv, D), c, s)
    kv_of = torch.arange(H) // (H // Hkv)  # GQA: query head h reads kv head h // 2
    scores = torch.einsum("thd,shd->hts", q, k[:, kv_of])
    scores2 = torch.einsum("thd,shd->hts", q2, k2[:, kv_of])
    torch.testing.assert_close(scores2, scores, atol=1e-5, rtol=1e-5)
    # and without the permutation they would not match (the test can fail)
    q3 = rope_interleaved((x @ wq16.T).view(T, H, D), c, s)
    assert not torch.allclose(torch.einsum("thd,shd->hts", q3, k2[:, kv_of]), scores, atol=1e-3)
    # permute_rope_rows is a pure reordering of rows within each head
    w = torch.arange(8 * 3).reshape(8, 3)
    assert permute_rope_rows(w, 2)[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def test_errors(bpe: Tokenizer, tmp_path: Path) -> None:
    gpt2_run = make_run(tmp_path / "gpt2", bpe)
    with pytest.raises(LmforgeError, match="Llama-style"):
        export_gguf(gpt2_run, tmp_path / "a.gguf")
    unigram_run = make_run(tmp_path / "unigram", train_unigram(CORPUS, vocab_size=320), **LLAMA)
    with pytest.raises(LmforgeError, match="not this Unigram one.*--to hf and convert that with llama.cpp's conv"):
        export_gguf(unigram_run, tmp_path / "b.gguf")
    run = make_run(tmp_path / "run", bpe, **LLAMA)
    with pytest.raises(LmforgeError, match="--dtype"):
        export_gguf(run, tmp_path / "c.gguf", dtype="q4_0")
    export_gguf(run, tmp_path / "d.gguf", dtype="q8_0")
    with pytest.raises(LmforgeError, match="overwrite"):
        export_gguf(run, tmp_path / "d.gguf")
    small = (tmp_path / "d.gguf").stat().st_size
    assert export_gguf(run, tmp_path / "d.gguf", overwrite=True).stat().st_size > small  # f16 replaced q8_0
    with pytest.raises(LmforgeError, match=r"ends in \.gguf"):
        export_gguf(run, tmp_path / "e.txt")
    # an existing folder: the error said "pass --overwrite", which then failed with "is a directory"
    (tmp_path / "models").mkdir()
    with pytest.raises(LmforgeError, match=r"is a directory; --out for GGUF is a file such as .*model\.gguf"):
        export_gguf(run, tmp_path / "models")
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as on Linux")
@pytest.mark.parametrize("limit", [1, 20_000])
def test_a_failed_write_names_the_file_and_leaves_nothing(bpe: Tokenizer, tmp_path: Path, limit: int) -> None:
    """A full disk (a real EFBIG from a file-size limit) while writing: the error named no file ("4096
    requested and 0 written"); it now names the .gguf, and no partial file is left. At a 1-byte limit the
    header write failed again as the writer was closed in cleanup, which skipped removing its temporary: a
    `.m.gguf.lmforge-tmp-*` was left for good, and the error named no file. An error with an errno keeps it (the
    CLI's line, "cannot write m.gguf: file too large ...", goes by it)."""
    run = make_run(tmp_path / "run", bpe, **LLAMA)
    with (
        file_size_limit(limit),
        pytest.raises(OSError, match=r"could not write .*m\.gguf \(|too large: '.*m\.gguf'") as e,
    ):
        export_gguf(run, tmp_path / "m.gguf")
    assert e.value.errno == (errno.EFBIG if limit == 1 else None)  # (20 kB: numpy's short write has none)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_replaces_a_gguf_file_never_another_file(bpe: Tokenizer, tmp_path: Path) -> None:
    # README: --overwrite replaces only what an export wrote; a file named .gguf that is not one is the user's
    run = make_run(tmp_path / "run", bpe, **LLAMA)
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes, not a model\n")
    with pytest.raises(LmforgeError, match="not a GGUF file.*choose another --out"):
        export_gguf(run, notes, overwrite=True)
    assert notes.read_text() == "my notes, not a model\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "run"]


def test_pre_tokenizer_name_is_the_one_llama_cpp_splits_like() -> None:
    """`tokenizer.ggml.pre` decides llama.cpp's split: GPT-2's regex ("gpt-2"), Llama 3's ("llama-bpe");
    any other split would tokenize differently under either name, so it is refused."""
    import json

    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.export.gguf import LLAMA3_SPLIT, gguf_pre_tokenizer

    def spec(pre: object) -> dict:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre
        return json.loads(tok.to_str())

    assert gguf_pre_tokenizer(spec(pre_tokenizers.ByteLevel(add_prefix_space=False))) == "gpt-2"
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    assert gguf_pre_tokenizer(spec(pre_tokenizers.Sequence([split, no_regex]))) == "llama-bpe"
    other = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"), no_regex])
    with pytest.raises(LmforgeError, match=r"pre-tokenizer \(Split \+ ByteLevel\) is neither GPT-2's nor Llama 3's"):
        gguf_pre_tokenizer(spec(other))
    with pytest.raises(LmforgeError, match="neither"):
        gguf_pre_tokenizer(spec(pre_tokenizers.ByteLevel(add_prefix_space=True)))


def test_cli_export_gguf(bpe: Tokenizer, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    run = make_run(tmp_path / "run", bpe, **LLAMA)
    result = run_cli("export", str(run), "--to", "gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'm.gguf'}"
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    result = run_cli("export", str(make_run(tmp_path / "gpt2", bpe)), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "Llama-style" in result.stderr and not (tmp_path / "x.gguf").exists()
    result = run_cli("export", str(run), "--to", "gguf", "--out", str(tmp_path / "y.gguf"), "--verify")
    assert result.returncode == 2 and "--verify is for --to hf" in result.stderr and not (tmp_path / "y.gguf").exists()


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_transformers_reads_the_gguf_and_gives_our_logits(dtype: str, bpe: Tokenizer, tmp_path: Path) -> None:
    """An independent reader: transformers' GGUF loader (it undoes llama.cpp's q/k permutation itself)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    run = make_run(tmp_path / "run", bpe, **dict(GQA, bias=False, rope_theta=10000.0))
    export_gguf(run, tmp_path / "m.gguf", dtype=dtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    ours = load_trained(run, torch.device("cpu")).model
    # Round our matrices the way the file stores them (f16, or Q8_0 blocks of 32 along each row: the
    # q/k row permutation moves whole rows, so the blocks are the same), then the math is the same.
    qtype = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in ours.parameters():
            if p.ndim == 2 and dtype == "f16":
                p.copy_(p.half().float())
            elif p.ndim == 2 and dtype == "bf16":
                p.copy_(p.bfloat16().float())
            elif p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
    idx = torch.randint(0, bpe.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(idx), theirs(idx).logits
    # Same weights, float32 math on both sides: measured max |diff| 0.0 (f16) on logits up to ~0.64; with
    # the q/k permutation left out, 4e-3 (random weights make attention nearly uniform, hence small).
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "the quick brown fox jumps over 你好 twice"
    assert tok(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)


def test_lora_adapter_run_exports_merged(bpe: Tokenizer, tmp_path: Path) -> None:
    """An adapter-only LoRA run exports with its adapters folded in, as `export --to hf` does."""
    from lmforge.adapt.load import load_finetuned
    from lmforge.adapt.lora import merge_lora
    from lmforge.finetune import FinetuneConfig, finetune

    base = make_run(tmp_path / "base", bpe, **LLAMA)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, twice.\n\n" * 40, encoding="utf-8")
    out = tmp_path / "lora"
    cfg = FinetuneConfig(task="clm", adapt="lora", lora_rank=4, lora_targets=["mlp.proj"])
    finetune(base, train_file=text, out=out, cfg=cfg, progress=False, overrides={"train": {"max_steps": 3, "lr": 0.05}})
    _, tensors = read(export_gguf(out, tmp_path / "m.gguf", dtype="f16"))
    model = load_finetuned(out, torch.device("cpu")).model
    merge_lora(model)
    merged = model.blocks[0].mlp.proj.weight.detach().numpy()
    np.testing.assert_allclose(dequant(tensors["blk.0.ffn_down.weight"]), merged, rtol=2**-10, atol=1e-7)
    base_w = load_trained(base, torch.device("cpu")).model.blocks[0].mlp.proj.weight.detach().numpy()
    assert np.abs(merged - base_w).max() > 1e-3  # the adapters were trained and are in the file


def test_chat_tuned_run_carries_its_template_and_markers_as_text(tmp_path: Path) -> None:
    """A chat-tuned run: llama.cpp gets the chat template, and the role markers, which lmforge trains as
    text, are ordinary tokens (a CONTROL <|user|> would be matched as one reserved id there)."""
    import json as json_

    from lmforge.chat import JINJA_TEMPLATE
    from lmforge.finetune import FinetuneConfig, finetune

    corpus = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(40)]
    tok = train_bpe(corpus, vocab_size=300, extra_specials=True)
    base = make_run(tmp_path / "base", tok, **LLAMA)
    data = tmp_path / "chat.jsonl"
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the quick fox"}]
    data.write_text((json_.dumps({"messages": talk}) + "\n") * 8, encoding="utf-8")
    out = tmp_path / "sft"
    finetune(base, train_file=data, out=out, cfg=FinetuneConfig(task="sft", max_new_tokens=4), progress=False,
             overrides={"train": {"max_steps": 2, "batch_size": 4}})  # fmt: skip
    fields, _ = read(export_gguf(out, tmp_path / "chat.gguf"))
    assert fields["tokenizer.chat_template"] == JINJA_TEMPLATE
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    marker = tokens.index("<|user|>")
    assert types[marker] == gguf.TokenType.NORMAL and types[tok.eos_id] == gguf.TokenType.CONTROL
    fields, _ = read(export_gguf(base, tmp_path / "plain.gguf"))  # not chat-tuned: no template
    assert "tokenizer.chat_template" not in fields


def test_a_tokenizer_that_puts_bos_first_is_written_with_it(bpe: Tokenizer, tmp_path: Path) -> None:
    """An imported Llama's tokenizer puts <s> before each text: llama.cpp must add it too."""
    from tokenizers import processors

    from lmforge.export.hf import export_hf
    from lmforge.export.hf_import import import_hf

    run = make_run(tmp_path / "run", bpe, **LLAMA)
    hf_dir = export_hf(run, tmp_path / "hf")
    hf_tok = Tokenizer.load(hf_dir / "tokenizer.json").hf
    bos = bpe.eos_id + 1  # another id than the end-of-text one
    hf_tok.post_processor = processors.TemplateProcessing(
        single=f"{bpe.id_to_token(bos)} $A", special_tokens=[(bpe.id_to_token(bos), bos)]
    )
    hf_tok.save(str(hf_dir / "tokenizer.json"))
    imported = import_hf(hf_dir, tmp_path / "imported")
    assert load_trained(imported, torch.device("cpu")).tokenizer.prompt_prefix == [bos]
    fields, _ = read(export_gguf(imported, tmp_path / "bos.gguf"))
    assert fields["tokenizer.ggml.bos_token_id"] == bos and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.eos_token_id"] == bpe.eos_id
    fields, _ = read(export_gguf(run, tmp_path / "own.gguf"))  # lmforge's own tokenizer: no BOS added
    assert fields["tokenizer.ggml.add_bos_token"] is False


def test_a_chat_tuned_bos_run_carries_the_template_the_hf_export_writes(bpe: Tokenizer, tmp_path: Path) -> None:
    """A chat-tuned run whose tokenizer puts a BOS first (a fine-tune of an imported Llama) writes its template
    with `{{ bos_token }}` first (`ChatTemplate.jinja_for`): the HF export had it, the GGUF had the plain template.
    Both now carry the one the run wrote."""
    from tokenizers import processors

    from lmforge.chat import save_tokenizer_config
    from lmforge.export.hf import export_hf
    from lmforge.export.hf_import import import_hf

    hf_dir = export_hf(make_run(tmp_path / "run", bpe, **LLAMA), tmp_path / "hf")
    hf_tok = Tokenizer.load(hf_dir / "tokenizer.json").hf
    bos = bpe.id_to_token(bpe.eos_id + 1)
    hf_tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bpe.eos_id + 1)])
    hf_tok.save(str(hf_dir / "tokenizer.json"))
    imported = import_hf(hf_dir, tmp_path / "imported")
    # what `finetune --task sft` writes into its run folder (this one trained no steps: the template is the point)
    save_tokenizer_config(imported, load_trained(imported, torch.device("cpu")).tokenizer)
    written = json.loads((export_hf(imported, tmp_path / "hf2") / "tokenizer_config.json").read_text("utf-8"))
    fields, _ = read(export_gguf(imported, tmp_path / "bos.gguf"))
    assert written["chat_template"].startswith("{{ bos_token }}")
    assert fields["tokenizer.chat_template"] == written["chat_template"]


def spm_tokenize(text: str, tokens: list[str]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm, add_space_prefix false) on a vocabulary of single
    characters: every " " becomes "▁", then each character is its piece or, missing, its UTF-8 byte tokens
    (no pair of neighbours is a piece, so nothing is joined)."""
    ids = {t: i for i, t in enumerate(tokens)}
    out: list[int] = []
    for ch in text.replace(" ", "\u2581"):
        out += [ids[ch]] if ch in ids else [ids[f"<0x{b:02X}>"] for b in ch.encode("utf-8")]
    return out


def test_char_tokenizer_is_written_as_llama_cpps_sentencepiece(tmp_path: Path) -> None:
    """A character-level run exports with tokenizer model "llama": in llama.cpp itself (llama-cpp-python 0.3.36,
    bench/gguf_llamacpp.py) it gave lmforge's ids for 2,000 Shakespeare and 2,000 Hong Lou Meng snippets."""
    tok = train_char(["the quick brown fox jumps over the lazy dog\n\tTHE END"])
    run = make_run(tmp_path / "run", tok, **LLAMA)
    fields, _ = read(export_gguf(run, tmp_path / "char.gguf"))
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    assert "tokenizer.ggml.merges" not in fields and "tokenizer.ggml.pre" not in fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == tok.vocab_size == len(fields["tokenizer.ggml.scores"])
    space = tok.encode(" ")[0]
    assert tokens[space] == "\u2581" and " " not in tokens and types[space] == gguf.TokenType.NORMAL
    assert tokens[tok.encode("\n")[0]] == "\n"
    assert types[tok.eos_id] == gguf.TokenType.CONTROL and tokens[tok.eos_id] == "<|endoftext|>"
    assert [types[i] for i in range(1, 257)] == [gguf.TokenType.BYTE] * 256 and tokens[1 + 0xE4] == "<0xE4>"
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.eos_token_id"] == tok.eos_id
    for text in ["the lazy  dog", " leading and trailing ", "tabs\tand\nlines\n\n", "你好 🙂 é", "<|endoftext|>"]:
        ids = tok.encode(text)
        assert spm_tokenize(text, tokens) == ids and len(ids) >= len(text)


def test_char_vocabulary_llama_cpp_would_read_otherwise_is_refused(tmp_path: Path) -> None:
    """Spaces are looked up as "▁" in llama.cpp: a vocabulary without " " (its spaces are <0x20> here) or with
    a "▁" of its own would tokenize differently there."""
    for text, why in [("你好世界", "has no space character"), ("a \u2581 b", "has the character '▁'")]:
        run = make_run(tmp_path / why[:6], train_char([text]), **LLAMA)
        with pytest.raises(LmforgeError, match=f"vocabulary {why}.*--tokenizer bpe") as e:
            export_gguf(run, tmp_path / "x.gguf")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("kind", ["unigram", "wordpiece"])
def test_tokenizers_llama_cpp_cannot_represent_are_one_line_errors(kind: str, tmp_path: Path) -> None:
    tok = train_unigram(CORPUS, vocab_size=320) if kind == "unigram" else train_wordpiece(CORPUS, vocab_size=100)
    run = make_run(tmp_path / "run", tok, **LLAMA)
    with pytest.raises(LmforgeError, match=f"not this {'Unigram' if kind == 'unigram' else 'WordPiece'} one") as e:
        export_gguf(run, tmp_path / "m.gguf")
    assert "\n" not in str(e.value) and "--tokenizer bpe (or char)" in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_imported_qwen_chat_model_gets_the_eos_llama_cpps_converter_writes(bpe: Tokenizer, tmp_path: Path) -> None:
    """A Qwen2.5-Instruct-like directory (tokenizer_config eos_token and config.json eos_token_id `<|im_end|>`,
    pad and bos `<|endoftext|>`): eos, bos and padding are those gguf's `SpecialVocab` reads from that
    directory (what llama.cpp's convert_hf_to_gguf.py writes for Qwen2), and the end of turn is `<|im_end|>`."""
    transformers = pytest.importorskip("transformers")
    from lmforge.export.hf_import import import_hf
    from tests.test_export import CHATML, _hf_qwen2

    raw = Tokenizer.from_str(bpe.to_str()).hf
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = Tokenizer.from_str(raw.to_str())
    text_end, im_end = tok.eos_id, raw.token_to_id("<|im_end|>")
    assert tok.id_to_token(text_end) == "<|endoftext|>"
    torch.manual_seed(0)
    model = _hf_qwen2(tok)
    model.config.bos_token_id, model.config.eos_token_id = text_end, im_end
    model.generation_config = transformers.GenerationConfig(bos_token_id=text_end, eos_token_id=[im_end, text_end])
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML.replace("{{ bos_token }}", "")
    fast.save_pretrained(hf_dir)
    fields, _ = read(export_gguf(import_hf(hf_dir, tmp_path / "run"), tmp_path / "m.gguf"))
    want = gguf.SpecialVocab(hf_dir, n_vocab=tok.vocab_size).special_token_ids
    assert (want["eos"], want["bos"], want["pad"]) == (im_end, text_end, text_end)
    assert fields["tokenizer.ggml.eos_token_id"] == want["eos"]
    assert fields["tokenizer.ggml.bos_token_id"] == want["bos"]
    assert fields["tokenizer.ggml.padding_token_id"] == want["pad"]
    assert fields["tokenizer.ggml.eot_token_id"] == im_end


def test_added_tokens_are_typed_as_llama_cpps_converter_types_them(bpe: Tokenizer, tmp_path: Path) -> None:
    """An imported tokenizer's added tokens that are not special (Qwen2.5's `<tool_call>`, `<|fim_prefix|>`)
    are matched whole by lmforge (the tokenizers library splits them out before BPE). llama.cpp matches a
    token whole only when its type is USER_DEFINED or CONTROL, and its convert_hf_to_gguf.py writes such a
    token USER_DEFINED, or CONTROL when it looks special (`<|...|>`): as NORMAL they were cut into pieces
    there, and in transformers' GGUF tokenizer, which follows llama.cpp's types."""
    transformers = pytest.importorskip("transformers")
    raw = Tokenizer.from_str(bpe.to_str()).hf
    raw.add_tokens(["<tool_call>", "<|fim_prefix|>"])
    raw.add_special_tokens(["<|im_end|>"])
    tok = Tokenizer.from_str(raw.to_str())
    tool, fim, im_end = (raw.token_to_id(t) for t in ("<tool_call>", "<|fim_prefix|>", "<|im_end|>"))
    run = make_run(tmp_path / "run", tok, **dict(LLAMA, vocab_size=tok.vocab_size))
    fields, _ = read(export_gguf(run, tmp_path / "m.gguf"))
    types = fields["tokenizer.ggml.token_type"]
    assert types[tool] == gguf.TokenType.USER_DEFINED
    assert types[fim] == types[im_end] == types[tok.eos_id] == gguf.TokenType.CONTROL
    assert types[tok.encode("the")[0]] == gguf.TokenType.NORMAL
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "the fox<tool_call>jumps 你好<tool_call>"
    assert theirs(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert tok.encode(text).count(tool) == 2


def test_a_classification_fine_tune_is_refused_in_one_line(tmp_path: Path) -> None:
    """A `finetune --task classify` run of a Llama-style base has a classification head and no LM head: the
    GGUF export raised a bare KeyError ('tok_emb.weight') from its wrapped body; now it says to use --to hf."""
    from lmforge.finetune import FinetuneConfig, finetune
    from tests.test_finetune import DATA, make_base

    base = make_base(tmp_path, max_seq_len=64, **LLAMA)
    out = tmp_path / "cls"
    fast = {"train": {"max_steps": 1, "batch_size": 4, "warmup_steps": 0}, "eval": {"every": 0}}
    finetune(base, train_file=DATA / "sentiment_train.csv", out=out, cfg=FinetuneConfig(task="classify"),
             overrides=fast, progress=False)  # fmt: skip
    with pytest.raises(LmforgeError, match="classif.*--to hf") as e:
        export_gguf(out, tmp_path / "m.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


def test_an_hf_model_directory_is_pointed_to_import(bpe: Tokenizer, tmp_path: Path) -> None:
    """A user who exported to HF and then passes that folder to `--to gguf` (or quantize, eval, ...) was told
    'run directory ... has no complete checkpoint yet; train it first', which is wrong: it needs `lmforge import`."""
    from lmforge.compress.quantize import quantize_run
    from lmforge.export.hf import export_hf

    hf_dir = export_hf(make_run(tmp_path / "run", bpe, **LLAMA), tmp_path / "hf")
    for call in (lambda: export_gguf(hf_dir, tmp_path / "m.gguf"), lambda: quantize_run(hf_dir, tmp_path / "q")):
        with pytest.raises(LmforgeError, match=f"Hugging Face model directory.*lmforge import {hf_dir} --out") as e:
            call()
        assert "\n" not in str(e.value) and "train it first" not in str(e.value)
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "q").exists()
    from lmforge.export.hf_import import import_hf

    with pytest.raises(
        LmforgeError, match="is an lmforge run or checkpoint already"
    ):  # the other way round ('model_type None')
        import_hf(tmp_path / "run", tmp_path / "imported")
    assert not (tmp_path / "imported").exists()
