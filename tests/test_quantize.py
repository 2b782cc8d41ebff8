"""Weight-only quantization: the int8/int4 numerics against hand-computed values, and a small trained
model quantized end to end (bpb within a stated bound, smaller files, loadable by eval/generate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.compress.quantize import (
    dequantize_weight,
    format_quantize,
    quantize_run,
    quantize_weight,
    to_quant_linears,
)
from lmforge.errors import DataError, LmforgeError
from lmforge.trained import load_trained
from tests.conftest import run_cli, tiny_config


def test_int8_per_channel_matches_hand_computed() -> None:
    w = torch.tensor([[0.5, -1.27, 0.01], [2.54, 0.0, -0.02]])
    q, s = quantize_weight(w, 8, 64)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (2, 1)
    torch.testing.assert_close(s.float().squeeze(1), torch.tensor([0.01, 0.02]), rtol=1e-3, atol=0)
    assert q.tolist() == [[50, -127, 1], [127, 0, -1]]
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q, s = quantize_weight(w, 8, 64)
    err = (dequantize_weight(q, s) - w).abs()
    # round to nearest: <= half a step, plus the fp16 rounding of the scale over up to 127 steps
    assert (err <= s.float() * (0.5 + 127 * 2**-11)).all()


def test_generation_speed_fits_a_context_shorter_than_its_prompt() -> None:
    """`lmforge quantize` of a model whose context is under 8 tokens failed, after quantizing, with "prompt is 8
    tokens but the model's context is 1; shorten the prompt" (its speed test's own prompt). Now the test prompt
    and length fit the context, and the speed is measured."""
    from lmforge.compress.quantize import generation_speed
    from lmforge.models.gpt import GPT, GPTConfig

    for context in (1, 2, 5, 32):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50, max_seq_len=context, n_layer=1, n_head=2, d_model=16))
        model.init_weights()
        assert generation_speed(model.eval(), n_tokens=8, repeats=1) > 0, context


def test_int4_groups_and_packing() -> None:
    # one row, two groups of 4: max 7 and max 0.7 -> scales 1 and 0.1; values land on the int grid
    w = torch.tensor([[7.0, -7.0, 3.0, 0.0, 0.7, 0.1, -0.3, -0.7]])
    q, s = quantize_weight(w, 4, 4)
    assert q.dtype == torch.uint8 and q.shape == (1, 4) and s.shape == (1, 2)
    # stored value = q + 8, low nibble = even column: (7+8) | (-7+8) << 4 = 15 | 16, ...
    assert q.tolist() == [[15 | (1 << 4), 11 | (8 << 4), 15 | (9 << 4), 5 | (1 << 4)]]
    torch.testing.assert_close(dequantize_weight(q, s), w, rtol=1e-3, atol=1e-3)
    # a group size that does not divide the row: the whole row is one group
    q, s = quantize_weight(torch.randn(3, 24), 4, 64)
    assert s.shape == (3, 1) and q.shape == (3, 12)
    # an odd row cannot be packed: the error says what to do instead (it named no way out)
    with pytest.raises(LmforgeError, match=r"odd number of inputs \(97\); quantize it with --bits 8"):
        quantize_weight(torch.randn(2, 97), 4, 64)
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    q, s = quantize_weight(w, 4, 32)
    err = (dequantize_weight(q, s) - w).abs().view(8, 4, 32)
    assert (err <= s.float()[:, :, None] * (0.5 + 8 * 2**-11)).all()


@pytest.fixture(scope="module")
def trained_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny char-level GPT trained for 150 steps on Shakespeare (val bpb ~4.4, down from ~8 at init)."""
    from lmforge.train.run import pretrain

    out = tmp_path_factory.mktemp("q") / "run"
    overrides = {"train.max_steps": 150, "train.log_every": 50, "eval.every": 150, "checkpoint.every": 150}
    overrides |= {"model.n_layer": 2, "model.d_model": 64, "model.bias": False}
    pretrain(tiny_config(data_dir, out, **overrides), progress=False)
    return out


# Bounds stated in the README: int8 within 1% of the float bpb, int4 (groups of 32) within 10%.
@pytest.mark.parametrize(("bits", "bound", "ratio"), [(8, 0.01, 0.5), (4, 0.10, 0.4)])
def test_quantized_run_bpb_size_and_loading(
    trained_run: Path, tmp_path: Path, bits: int, bound: float, ratio: float
) -> None:
    out = tmp_path / f"q{bits}"
    r = quantize_run(trained_run, out, bits=bits, group_size=32, max_batches=8, gen_tokens=16)
    assert r["layers"] == 2 * 4  # qkv, attn.proj, mlp.fc, mlp.proj per block (tied head: the embedding)
    assert abs(r["bpb_after"] - r["bpb_before"]) <= bound * r["bpb_before"], r
    assert r["bpb_after"] != r["bpb_before"]  # the weights really changed
    # the embedding (vocab ~100 x 64) stays float32; the Linear weights shrink 4x (int8) / ~7x (int4)
    assert r["bytes_after"] < ratio * r["bytes_before"], r
    assert r["tok_s_before"] > 0 and r["tok_s_after"] > 0
    assert json.loads((out / "quantize.json").read_text(encoding="utf-8"))["bits"] == bits

    # round trip: the loaded model holds exactly the dequantized weights
    original = load_trained(trained_run, torch.device("cpu")).model
    loaded = load_trained(out, torch.device("cpu"))
    w = original.blocks[0].attn.qkv.weight
    q, s = quantize_weight(w, bits, 32)
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, dequantize_weight(q, s))
    assert torch.equal(loaded.model.tok_emb.weight, original.tok_emb.weight)
    # QuantLinear (dequantize on the fly) computes the same logits as dequantize-on-load
    idx = torch.randint(0, original.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.model(idx)
        torch.testing.assert_close(to_quant_linears(original, bits, 32)(idx), expected, rtol=1e-5, atol=1e-5)

    # `lmforge eval` and `generate` load the quantized run like any other
    result = run_cli("eval", str(out), "--max-batches", "8", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bpb"] == pytest.approx(r["bpb_after"], rel=1e-9)
    result = run_cli("generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "10", "--seed", "0")
    assert result.returncode == 0 and result.stdout.startswith("ROMEO:"), result.stderr


def test_the_summary_says_which_layers_group_size_does_not_divide(trained_run: Path, tmp_path: Path) -> None:
    """`--group-size 128` on 64-wide inputs quantizes those rows as one group each: the summary said "groups of
    128" for all 8 layers. Only the MLP's output projection (256 wide) is in groups of 128."""
    r = quantize_run(trained_run, tmp_path / "q128", bits=4, group_size=128, compare=False)
    assert (r["layers"], r["whole_row_layers"]) == (8, 6)
    assert "groups of 128 (whole rows in 6 layers, whose width 128 does not divide), 8 Linear layers" in (
        format_quantize(r)
    )
    r = quantize_run(trained_run, tmp_path / "q32", bits=4, group_size=32, compare=False)
    assert r["whole_row_layers"] == 0 and "groups of 32, 8 Linear layers)" in format_quantize(r)


def test_errors(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="--bits"):
        quantize_run(trained_run, tmp_path / "a", bits=3)
    with pytest.raises(LmforgeError, match="--group-size"):
        quantize_run(trained_run, tmp_path / "a", bits=4, group_size=0)
    q = tmp_path / "q"
    quantize_run(trained_run, q, bits=8, compare=False)
    with pytest.raises(LmforgeError, match="already quantized"):
        quantize_run(q, tmp_path / "b", compare=False)
    with pytest.raises(LmforgeError, match="overwrite"):
        quantize_run(trained_run, q, compare=False)
    result = run_cli("quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "c"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    # --group-size with --bits 8 was ignored (one scale per row) and still written to quantize.json
    result = run_cli("quantize", str(trained_run), "--bits", "8", "--group-size", "32", "--out", str(tmp_path / "d"))
    assert result.returncode == 2 and "--group-size is for --bits 4" in result.stderr
    assert not (tmp_path / "d").exists()


def test_other_families_are_refused_with_what_to_do(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "gru"
    pretrain = ["pretrain", "--data", str(data_dir), "--out", str(run), "--preset", "gru-tiny", "--quiet"]
    assert run_cli(*pretrain, "--train.max_steps", "2").returncode == 0
    result = run_cli("quantize", str(run), "--out", str(tmp_path / "q"), "--no-compare")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "model.family is 'gru'" in result.stderr and "train a gpt model to quantize" in result.stderr
    assert not (tmp_path / "q").exists()


def test_out_may_not_overlap_the_run(trained_run: Path, tmp_path: Path) -> None:
    """--out --overwrite on the run, a folder holding it or one inside it would delete the run: refused."""
    import shutil

    sand = tmp_path / "sand"
    run = sand / "gpt"
    shutil.copytree(trained_run, run)
    (sand / "precious.txt").write_text("keep me", encoding="utf-8")
    step = next((run / "checkpoints").glob("step-*"))
    for path, out in [(run, sand), (run, run), (run, run / "checkpoints"), (run, run / "q"), (step, run)]:
        with pytest.raises(LmforgeError, match="overlaps the directory being read"):
            quantize_run(path, out, overwrite=True, compare=False)
    result = run_cli("quantize", str(run), "--out", str(sand), "--overwrite", "--no-compare")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (sand / "precious.txt").is_file() and (step / "model.safetensors").is_file()


def test_missing_data_dir_writes_nothing_and_points_to_no_compare(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's data directory was deleted: a one-line error naming --no-compare, and no half --out."""
    import shutil

    from lmforge.checkpoint import state_sha256

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for state_file in run.glob("checkpoints/step-*/state.json"):  # as if trained on a copy since deleted
        meta = json.loads(state_file.read_text(encoding="utf-8"))
        meta["config"]["data"]["dir"] = str(tmp_path / "deleted-data")
        meta["state_sha256"] = state_sha256(meta)  # (a consistent state.json, as a real run would write)
        state_file.write_text(json.dumps(meta), encoding="utf-8")
    result = run_cli("quantize", str(run), "--out", str(tmp_path / "q"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--no-compare" in result.stderr and "deleted-data" in result.stderr
    from lmforge.eval.lm import evaluate_checkpoint

    # `lmforge eval RUN` said "run 'lmforge prepare INPUT... --out .../deleted-data' first", not --data
    with pytest.raises(
        DataError, match="deleted-data, which is not there any more; pass the prepared data with --data"
    ):
        evaluate_checkpoint(run, max_batches=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written, nothing left behind
    r = quantize_run(run, tmp_path / "q", compare=False)  # no --overwrite needed
    assert "bpb_before" not in r and (tmp_path / "q" / "quantize.json").is_file()
    with pytest.raises(LmforgeError, match="--no-compare"):  # a failed --overwrite keeps the old one
        quantize_run(run, tmp_path / "q", bits=4, overwrite=True)
    assert json.loads((tmp_path / "q" / "quantize.json").read_text(encoding="utf-8"))["bits"] == 8

    # the comparison itself fails (after the checkpoint was written): still nothing half-written
    import lmforge.eval.lm

    def fail(*args: object, **kwargs: object) -> None:
        raise DataError("the data was prepared with another tokenizer")

    monkeypatch.setattr(lmforge.eval.lm, "evaluate_checkpoint", fail)
    with pytest.raises(DataError, match="another tokenizer.*--no-compare"):
        quantize_run(trained_run, tmp_path / "q", bits=4, overwrite=True, max_batches=1, gen_tokens=4)
    assert json.loads((tmp_path / "q" / "quantize.json").read_text(encoding="utf-8"))["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "run"]


def test_quantize_reads_a_sharded_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    from lmforge.train.run import pretrain

    run = tmp_path / "run"
    overrides = {"train.max_steps": 10, "eval.every": 10, "checkpoint.every": 10, "checkpoint.sharded": True}
    pretrain(tiny_config(data_dir, run, **overrides), progress=False)
    step = run / "checkpoints" / "step-000010"
    assert not (step / "model.safetensors").exists()
    r = quantize_run(run, tmp_path / "q8", bits=8, group_size=32, max_batches=2, gen_tokens=4)
    assert r["bytes_before"] == (step / "model-00000-of-00001.safetensors").stat().st_size
    assert 0 < r["bytes_after"] < r["bytes_before"] and abs(r["bpb_after"] - r["bpb_before"]) < 0.05


def test_quantize_compares_on_forward_batches_not_the_whole_batch(data_dir: Path, tmp_path: Path) -> None:
    """--max-batches N: N forward batches of the run's micro-batch (what fits one forward), not N of its
    whole batch (eval.max_batches' unit), which for gpt2-124m is 480 sequences of 1,024 tokens."""
    from lmforge.eval.lm import evaluate_checkpoint
    from lmforge.train.run import pretrain

    run = tmp_path / "run"
    overrides = {"train.max_steps": 4, "train.batch_size": 8, "train.micro_batch_size": 2, "eval.every": 4}
    pretrain(tiny_config(data_dir, run, **overrides, **{"checkpoint.every": 4}), progress=False)
    r = quantize_run(run, tmp_path / "q8", bits=8, group_size=32, max_batches=1, gen_tokens=4)
    two = evaluate_checkpoint(str(run), batch_size=2, max_batches=1, device="cpu")
    eight = evaluate_checkpoint(str(run), max_batches=1, device="cpu")
    assert two["tokens"] < eight["tokens"] and r["bpb_before"] == two["bpb"] != eight["bpb"]


def test_quantized_run_keeps_the_stop_ids_of_an_imported_instruct_model(tmp_path: Path) -> None:
    """An imported instruct model ends its turns with another token than its eos (generation.json); the
    quantized copy lost the file, so generate/chat/serve/export ran past the end of turn."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import RunConfig
    from lmforge.generate import stop_ids_of, write_stop_ids
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.tokenizer.train import train_char

    tok = train_char(["abc def"])
    cfg = RunConfig(out=str(tmp_path / "run"), model=GPTConfig(vocab_size=tok.vocab_size, max_seq_len=16, n_layer=1))
    model = GPT(cfg.model)
    model.init_weights()
    save_checkpoint(
        tmp_path / "run",
        step=0,
        model=model,
        optimizer=None,
        state={"config": cfg.to_dict()},
        tokenizer_json=tok.to_str(),
    )
    write_stop_ids(tmp_path / "run", [0, 5])
    quantize_run(tmp_path / "run", tmp_path / "q", bits=8, group_size=64, compare=False)
    assert stop_ids_of(tmp_path / "q") == [0, 5]


def test_quantized_fine_tune_keeps_its_finetune_json(tmp_path: Path) -> None:
    """A quantized chat fine-tune is still that fine-tune: loaders see its task and base, its export's card
    names them and the quantization, and neither finetune nor pretrain takes it for a run to continue."""
    from lmforge.adapt.load import load_finetuned
    from lmforge.export.hf import export_hf
    from lmforge.finetune import FinetuneConfig, finetune
    from tests.test_finetune import DATA, FAST, make_base

    base = make_base(tmp_path)
    tuned = tmp_path / "sft"
    finetune(
        base, train_file=DATA / "chat.jsonl", out=tuned, cfg=FinetuneConfig(task="sft"), overrides=FAST, progress=False
    )
    quantize_run(tuned, tmp_path / "q", bits=8, group_size=64, compare=False)
    assert json.loads((tmp_path / "q" / "finetune.json").read_text(encoding="utf-8"))["task"] == "sft"
    loaded = load_finetuned(tmp_path / "q", torch.device("cpu"))
    assert loaded.info["task"] == "sft" and loaded.template is not None
    original = load_finetuned(tuned, torch.device("cpu"))
    ids = torch.tensor([loaded.tokenizer.encode("hello there")])
    with torch.no_grad():  # the int8 copy's logits stay near the float model's
        assert (loaded.model(ids) - original.model(ids)).abs().max() < 0.05
    card = (export_hf(tmp_path / "q", tmp_path / "hf") / "README.md").read_text(encoding="utf-8")
    assert f"| fine-tuned from | `{base.resolve()}` |" in card
    assert "| quantization | int8 weights (per output channel) of `" in card
    r = run_cli("eval", str(tmp_path / "q"))  # its base names no prepared data: eval it on its task
    assert r.returncode == 2 and "is a --task sft fine-tune of a base that names no prepared data" in r.stderr
    r = run_cli(
        "finetune", str(base), "--train", str(DATA / "chat.jsonl"), "--task", "sft", "--out", str(tmp_path / "q")
    )
    assert r.returncode == 2 and "is a quantized copy, which finetune does not continue" in r.stderr


def test_max_batches_with_no_compare_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # --max-batches sets only the comparison: with --no-compare it was ignored without a word (refused before the
    # run is read, so it need not exist here)
    from lmforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["quantize", str(tmp_path / "run"), "--out", str(tmp_path / "q"), "--no-compare", "--max-batches", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("lmforge: error: --max-batches sets the before/after comparison")
    assert len(err.splitlines()) == 1 and not (tmp_path / "q").exists()


def test_a_fine_tune_is_compared_on_its_own_validation_data(tmp_path: Path) -> None:
    """quantize compared a fine-tune on its base's prepared data (or, a base naming none, on nothing, silently);
    it now scores the fine-tune's own --val file as its evaluations did: the whole file gives the val_loss and
    val_bpb its last evaluation logged, and --val FILE picks another task file."""
    from lmforge.finetune import FinetuneConfig, finetune
    from tests.test_finetune import DATA, FAST, make_base

    base = make_base(tmp_path)
    tuned = tmp_path / "sft"
    val = DATA / "chat.jsonl"
    overrides = FAST | {"eval": {"every": 3, "max_batches": 0}}
    cfg = FinetuneConfig(task="sft", eval_samples=5, max_new_tokens=2)  # (the first 3 are too long to score)
    finetune(base, train_file=DATA / "alpaca.jsonl", val_file=val, out=tuned, cfg=cfg, overrides=overrides,
             progress=False)  # fmt: skip
    logged = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    last = [m for m in logged if "val_bpb" in m][-1]
    r = quantize_run(tuned, tmp_path / "q", bits=4, group_size=16, max_batches=0, gen_tokens=4)
    assert r["compared_on"].startswith(str(val.resolve()))
    assert r["bpb_before"] == pytest.approx(last["val_bpb"], rel=1e-6)
    assert r["loss_before"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert r["bpb_after"] != r["bpb_before"] and abs(r["bpb_after"] / r["bpb_before"] - 1) < 0.1
    assert "val compared on" in format_quantize(r)
    other = DATA / "alpaca.jsonl"  # --val: another task file
    r2 = quantize_run(tuned, tmp_path / "q2", bits=8, group_size=64, max_batches=1, gen_tokens=4, val_file=other)
    assert r2["compared_on"].startswith(str(other)) and r2["bpb_before"] != r["bpb_before"]
    # a fine-tune that recorded no validation file, of a base naming no data: said, not silent
    info = json.loads((tuned / "finetune.json").read_text(encoding="utf-8"))
    info.pop("val_file")
    (tuned / "finetune.json").write_text(json.dumps(info), encoding="utf-8")
    r3 = quantize_run(tuned, tmp_path / "q3", bits=8, group_size=64, gen_tokens=4)
    assert "bpb_before" not in r3 and "pass --val FILE" in format_quantize(r3)
    with pytest.raises(LmforgeError, match="--val is for fine-tuned runs"):
        quantize_run(base, tmp_path / "q4", val_file=val)


def test_without_out_the_copy_goes_beside_the_run_named_by_its_bits(trained_run: Path, tmp_path: Path) -> None:
    """`lmforge quantize RUN_DIR --bits 8|4`, as the interop issue writes it, stopped at 'required: --out'."""
    import shutil

    run = tmp_path / "gpt"
    shutil.copytree(trained_run, run)
    result = run_cli("quantize", str(run), "--bits", "4", "--no-compare")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'gpt-int4'} (int4" in result.stdout
    assert json.loads((tmp_path / "gpt-int4" / "quantize.json").read_text(encoding="utf-8"))["bits"] == 4
    step = next((run / "checkpoints").glob("step-*"))
    result = run_cli("quantize", str(step), "--no-compare")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"gpt-{step.name}-int8" / "checkpoints").is_dir()
    again = run_cli("quantize", str(run), "--bits", "4", "--no-compare")  # the default is an --out like any other
    assert again.returncode == 2 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
