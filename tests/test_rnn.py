"""LSTM/GRU language models: numerics against reference code, truncated BPTT with carried state,
the contiguous stream loader, generation with the recurrent state, and exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config import load_config
from lmforge.data.stream import StreamLoader
from lmforge.errors import ConfigError
from lmforge.generate import generate
from lmforge.models import build_model
from lmforge.models.rnn import RNNLM, RNNConfig
from lmforge.train.run import pretrain
from tests.conftest import shakespeare_text
from tests.test_resume import _assert_same_run


def _model(family: str, tie: bool = True) -> RNNLM:
    torch.manual_seed(0)
    m = RNNLM(RNNConfig(family=family, vocab_size=23, n_layer=2, d_model=16, tie_embeddings=tie))
    m.init_weights()
    return m.eval()


def _lstm_reference(m: RNNLM, idx: torch.Tensor) -> torch.Tensor:
    """The LSTM equations written out (PyTorch's gate order i, f, g, o), one time step at a time."""
    x = m.tok_emb.weight[idx]  # (B, T, C)
    B, T, C = x.shape
    for layer in range(m.cfg.n_layer):
        w_ih, w_hh = getattr(m.rnn, f"weight_ih_l{layer}"), getattr(m.rnn, f"weight_hh_l{layer}")
        b = getattr(m.rnn, f"bias_ih_l{layer}") + getattr(m.rnn, f"bias_hh_l{layer}")
        h, c, out = torch.zeros(B, C), torch.zeros(B, C), []
        for t in range(T):
            i, f, g, o = (x[:, t] @ w_ih.T + h @ w_hh.T + b).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        x = torch.stack(out, dim=1)
    head = m.tok_emb.weight if m.lm_head is None else m.lm_head.weight
    return x @ head.T


def _gru_reference(m: RNNLM, idx: torch.Tensor) -> torch.Tensor:
    """The GRU equations (gate order r, z, n; n uses r * (W_hn h + b_hn))."""
    x = m.tok_emb.weight[idx]
    B, T, C = x.shape
    for layer in range(m.cfg.n_layer):
        w_ih, w_hh = getattr(m.rnn, f"weight_ih_l{layer}"), getattr(m.rnn, f"weight_hh_l{layer}")
        b_ih, b_hh = getattr(m.rnn, f"bias_ih_l{layer}"), getattr(m.rnn, f"bias_hh_l{layer}")
        h, out = torch.zeros(B, C), []
        for t in range(T):
            gi, gh = x[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
            r = torch.sigmoid(gi[:, :C] + gh[:, :C])
            z = torch.sigmoid(gi[:, C : 2 * C] + gh[:, C : 2 * C])
            n = torch.tanh(gi[:, 2 * C :] + r * gh[:, 2 * C :])
            h = (1 - z) * n + z * h
            out.append(h)
        x = torch.stack(out, dim=1)
    return x @ m.tok_emb.weight.T


@pytest.mark.parametrize("tie", [True, False])
def test_lstm_matches_reference_equations_and_torch_lstm(tie):
    m = _model("lstm", tie)
    idx = torch.randint(0, 23, (3, 11))
    with torch.no_grad():
        ours = m(idx)
        # tolerance: float32 sums in a different order over 11 steps x 2 layers; observed ~1e-7
        torch.testing.assert_close(ours, _lstm_reference(m, idx), atol=1e-5, rtol=1e-5)
        # torch.nn.LSTM-based reference built separately from the same weights
        ref = torch.nn.LSTM(16, 16, num_layers=2, batch_first=True)
        ref.load_state_dict({k.removeprefix("rnn."): v for k, v in m.state_dict().items() if k.startswith("rnn.")})
        y, _ = ref(F.embedding(idx, m.tok_emb.weight))
        head = m.tok_emb.weight if tie else m.lm_head.weight
        torch.testing.assert_close(ours, y @ head.T, atol=1e-6, rtol=1e-6)


def test_gru_matches_reference_equations():
    m = _model("gru")
    idx = torch.randint(0, 23, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), _gru_reference(m, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_carried_state_equals_one_long_sequence(family):
    m = _model(family)
    idx = torch.randint(0, 23, (2, 12))
    with torch.no_grad():
        full = m(idx)
        state = m.new_cache(batch_size=2)
        parts = [m(idx[:, :5], state), m(idx[:, 5:6], state), m(idx[:, 6:], state)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-6, rtol=1e-6)
    assert state.pos == 12


@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_bfloat16_autocast_on_cpu_trains_a_recurrent_model(family):
    """`--train.dtype bfloat16` on CPU: autocast ran nn.LSTM in bfloat16, where oneDNN failed ("could not create a
    primitive descriptor for the LSTM forward propagation primitive"), a traceback at the first step."""
    m = _model(family).train()
    idx = torch.randint(0, 23, (3, 11))
    state = m.new_cache(batch_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(idx, state)
    logits.float().sum().backward()
    assert logits.dtype == torch.bfloat16 and state.h.dtype == torch.float32  # the head in bf16, the state fp32
    with torch.no_grad():  # tolerance: the head's bf16 inputs and weights (8 mantissa bits), logits ~0.1
        torch.testing.assert_close(logits.float(), m.eval()(idx), atol=2e-2, rtol=2e-2)


def test_generation_with_state_equals_recompute_and_runs_past_the_window():
    m = _model("lstm")
    a = generate(m, [1, 2, 3], max_new_tokens=40, temperature=0.0, use_cache=True)
    b = generate(m, [1, 2, 3], max_new_tokens=40, temperature=0.0, use_cache=False)
    assert a == b and len(a) == 40
    long = generate(_model("gru"), [1] * 200, max_new_tokens=5, temperature=0.0)
    assert len(long) == 5


def test_batched_sampling_of_a_recurrent_model_draws_each_row_apart():
    """`generate_batch` falls back to one `generate` per prompt for a recurrent model; it seeded every one with
    `seed`, so equal prompts drew equal samples (a GPT's batch draws its rows from one generator: they differ)."""
    from lmforge.generate import generate_batch

    m = _model("lstm")
    rows = generate_batch(m, [[1, 2], [1, 2], [3]], max_new_tokens=20, temperature=1.0, seed=5)
    assert rows[0] != rows[1]
    assert rows == generate_batch(m, [[1, 2], [1, 2], [3]], max_new_tokens=20, temperature=1.0, seed=5)
    assert rows[2] == generate(m, [3], max_new_tokens=20, temperature=1.0, seed=7)  # prompt b: seed + b


def test_stream_loader_rows_are_contiguous_and_resume(data_dir):
    from lmforge.data.prepare import load_data_dir

    shards = load_data_dir(data_dir).split_shards("train")
    loader = StreamLoader(shards, seq_len=16, batch_size=4)
    x1, y1, _ = next(loader)
    x2, *_ = next(loader)
    assert x1.shape == (4, 16)
    assert torch.equal(x2[:, 0], y1[:, -1])  # row r of batch k+1 continues row r of batch k
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    state = loader.state_dict()
    x3, *_ = next(loader)
    again = StreamLoader(shards, seq_len=16, batch_size=4)
    again.load_state_dict(state)
    assert torch.equal(next(again)[0], x3)


@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_carried_state_starts_from_zeros_when_the_stream_wraps_to_a_new_epoch(data_dir, tmp_path, family):
    """After an epoch's last chunk the rows start again from their beginnings, but the state left by their ends
    was carried into them (unrelated text): with the weights fixed, epoch 2's first step had another loss than
    epoch 1's. Now the loader marks those rows fresh and they start from zeros, as at the very first step."""
    from lmforge.data.prepare import load_data_dir
    from lmforge.data.shards import ShardWriter, read_shard
    from lmforge.objectives import CarriedStateLM

    writer = ShardWriter(tmp_path, "train", np.uint16, 1000)  # 3,000 tokens of the text in 3 shards
    writer.write(read_shard(load_data_dir(data_dir).split_shards("train")[0])[:3000])
    torch.manual_seed(0)
    model = RNNLM(RNNConfig(family=family, vocab_size=512, n_layer=2, d_model=16))
    model.init_weights()
    loader = StreamLoader([tmp_path / n for n in writer.close()], seq_len=64, batch_size=4, accum_steps=2)
    objective, n = CarriedStateLM(accum_steps=2), loader.chunks_per_epoch
    assert n == 5  # (8 rows of 374 tokens: the wrap comes soon)
    windows = [[next(loader) for _ in range(2)] for _ in range(n + 2)]  # n + 2 steps of 2 micro-batches
    assert [[bool(b[2].all()) for b in w] for w in windows] == [[True] * 2] + [[False] * 2] * (n - 1) + [
        [True] * 2,
        [False] * 2,
    ]  # (each micro-batch's rows all start over at once, or none does)
    with torch.no_grad():
        losses = [sum(objective.loss(model, b).item() for b in w) for w in windows]
        from_zeros = sum(CarriedStateLM(accum_steps=2).loss(model, b[:2]).item() for b in windows[1])
    assert losses[n] == losses[0]  # the same chunk from the same (zero) state: bit for bit
    assert losses[n + 1] == losses[1]  # ... and the state carried on within the epoch as in the first
    assert losses[1] != from_zeros  # (which it does: chunk 1 from zeros is another loss)


def test_family_flag_selects_the_model_and_wrong_keys_fail():
    from lmforge.errors import ConfigError

    cfg = load_config(overrides=["--model.family", "gru", "--model.n_layer", "1", "--model.vocab_size", "10"])
    assert isinstance(build_model(cfg.model), RNNLM) and cfg.model.family == "gru"
    with pytest.raises(ConfigError, match="unknown config key 'model.n_head'"):
        load_config(preset="lstm-tiny", overrides={"model": {"n_head": 2}})
    with pytest.raises(ConfigError, match="did you mean 'lstm'"):
        load_config(overrides=["--model.family", "lstn"])


def _cfg(data_dir, out, preset="lstm-tiny", **model):
    return load_config(
        preset=preset,
        overrides={
            "out": str(out),
            "data": {"dir": str(data_dir)},
            "model": {"d_model": 32, "max_seq_len": 16, **model},
            "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 12, "warmup_steps": 2, "log_every": 1},
            "eval": {"every": 4, "max_batches": 2},
            "checkpoint": {"every": 6, "keep": 10},
        },
    )


def test_lstm_run_resumes_bit_identically_with_its_carried_state(data_dir, tmp_path):
    straight = tmp_path / "straight"
    pretrain(_cfg(data_dir, straight, dropout=0.1), progress=False)
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000012")
    (crashed / "checkpoints" / "latest").write_text("step-000006\n", encoding="utf-8")
    assert pretrain(_cfg(data_dir, crashed, dropout=0.1), progress=False).step == 12
    _assert_same_run(straight, crashed)
    meta = json.loads((crashed / "checkpoints" / "step-000006" / "state.json").read_text(encoding="utf-8"))
    assert meta["objective"]["h"]["shape"] == [2, 8, 32]  # the carried (n_layer, batch, d_model) state was saved

    # eval (ppl/bpb) and generation from the checkpoint, past the 16-token training window
    from lmforge.eval.lm import evaluate_checkpoint
    from lmforge.generate import generate_from_checkpoint

    m = evaluate_checkpoint(str(crashed), max_batches=2)
    assert m["ppl"] == pytest.approx(math.exp(m["loss"])) and 0 < m["bpb"] < 8
    text = generate_from_checkpoint(str(crashed), prompt="ROMEO: " * 5, max_new_tokens=30, seed=0, stop_at_eos=False)
    assert len(text) > 0


def test_lstm_run_resumes_bit_identically_across_an_epoch_wrap(tmp_path):
    """On ~3,000 training tokens, 16 streams of 32-token chunks make 5 steps an epoch: step 6 wraps (its state
    starts over). A crash after the step-4 checkpoint and a re-run give the straight run's weights and numbers,
    bit for bit. (Its own small data folder: on the shared one an epoch of 5 steps took 256 streams, ~5 s.)"""
    from lmforge.data.prepare import PrepareConfig, prepare

    text = tmp_path / "text.txt"
    text.write_text(shakespeare_text()[:3500], encoding="utf-8")
    data_dir = tmp_path / "data"
    prepare(
        PrepareConfig(inputs=[str(text)], out=str(data_dir), tokenizer="char", val_fraction=0.1, test_fraction=0.1),
        progress=False,
    )
    cfg = _cfg(data_dir, tmp_path / "straight", n_layer=1, d_model=8, max_seq_len=32, dropout=0.1)
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, batch_size=16, micro_batch_size=16, max_steps=7),
        eval=dataclasses.replace(cfg.eval, every=0),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=4),
    )
    pretrain(cfg, progress=False)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "straight", crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000007")
    (crashed / "checkpoints" / "latest").write_text("step-000004\n", encoding="utf-8")
    meta = json.loads((crashed / "checkpoints" / "step-000004" / "state.json").read_text(encoding="utf-8"))
    assert meta["loader"]["row_len"] // 32 == 5 and meta["objective"]["h"]["shape"] == [1, 16, 8]
    assert pretrain(dataclasses.replace(cfg, out=str(crashed)), progress=False).step == 7
    _assert_same_run(tmp_path / "straight", crashed)


@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_accumulation_equals_big_batch_with_carried_state(data_dir, tmp_path, family):
    """Batch 8 as 4 accumulated micro-batches of 2 trained 2 streams (4 consecutive chunks of each per step),
    not the big batch's 8: the loss curves parted at the first step. Now they agree, as for Transformers."""
    curves = {}
    for micro in (8, 2):
        cfg = _cfg(data_dir, tmp_path / f"mb{micro}", preset=f"{family}-tiny", dropout=0.0)
        cfg = dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, micro_batch_size=micro, max_steps=4),
            eval=dataclasses.replace(cfg.eval, every=0),
            checkpoint=dataclasses.replace(cfg.checkpoint, every=0),
        )
        pretrain(cfg, progress=False)
        lines = (tmp_path / f"mb{micro}" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        curves[micro] = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    assert len(curves[8]) == 4 and len(set(curves[8])) > 1
    # float32 sums in another order: agreement to ~1e-7 relative, not bitwise
    assert curves[2] == pytest.approx(curves[8], rel=1e-5)


def test_stream_loader_refuses_a_checkpoint_that_read_micro_batch_rows(data_dir):
    """A checkpoint from before the fix above (state version 1) counted micro-batches of micro-batch rows: with
    accumulation it must not resume silently into other streams. Without it (same rows) it resumes as before."""
    from lmforge.data.prepare import load_data_dir
    from lmforge.errors import DataError

    shards = load_data_dir(data_dir).split_shards("train")
    old = StreamLoader(shards, seq_len=16, batch_size=2)  # what version 1 was: 2 rows, position in micro-batches
    state = {**old.state_dict(), "version": 1, "position": 5}
    state.pop("micro")
    accumulated = StreamLoader(shards, seq_len=16, batch_size=2, accum_steps=4)
    with pytest.raises(DataError, match=r"older lmforge .* resume with --train.batch_size 2 "):
        accumulated.load_state_dict(state)
    same_rows = StreamLoader(shards, seq_len=16, batch_size=2)
    same_rows.load_state_dict(state)
    for _ in range(5):
        next(old)
    assert torch.equal(next(same_rows)[0], next(old)[0])


def test_a_resume_that_flips_carry_state_is_refused_by_name(data_dir, tmp_path):
    """Resuming a carried-state LSTM run with --objective.carry_state false failed as "the data loader was saved
    with seed=None, now 1337; resume with the same seed" (a StreamLoader state read by a TokenLoader)."""
    cfg = _cfg(data_dir, tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")  # the run's
    flipped = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, carry_state=False))
    with pytest.raises(ConfigError, match=r"with --objective.carry_state true, not false; resume with --objective"):
        pretrain(flipped, progress=False)


@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_truncated_bptt_objective_overfits_one_batch(family):
    from lmforge.objectives import CarriedStateLM

    torch.manual_seed(0)
    model = RNNLM(RNNConfig(family=family, vocab_size=23, n_layer=2, d_model=32))
    model.init_weights()
    x = torch.randint(0, 23, (4, 17))
    batch = (x[:, :-1], x[:, 1:])
    objective, opt, losses = CarriedStateLM(), torch.optim.Adam(model.parameters(), lr=1e-2), []
    for _ in range(80):
        loss = objective.loss(model, batch) / objective.count(batch)
        opt.zero_grad()
        loss.backward()  # would fail ("backward through the graph a second time") if the state were not detached
        opt.step()
        losses.append(loss.item())
    assert objective.state.pos == 80 * 16
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_serve_and_chat_take_a_recurrent_model_past_its_training_window(data_dir, tmp_path, capsys):
    """A recurrent model has no context limit (`generate` runs past its `max_seq_len`, the BPTT window), but
    `serve` refused a prompt longer than the window as over "the context", and `chat` cut replies to half of it
    (8 tokens here, whatever --max-new-tokens said) and the conversation to the other half."""
    import io
    import threading
    import urllib.request

    from lmforge.chat import chat
    from lmforge.serve import make_server

    run = tmp_path / "lstm"
    pretrain(_cfg(data_dir, run), progress=False)  # window: 16 tokens
    server = make_server(run, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = {"prompt": "ROMEO: " * 5, "max_tokens": 30, "temperature": 0}  # 35 + 30 tokens
        req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.loads(resp.read())
        assert reply["usage"]["prompt_tokens"] == 35, reply
    finally:
        server.shutdown()
        server.server_close()

    chat(run, stdin=io.StringIO("hi\n"), stdout=io.StringIO(), max_new_tokens=30, seed=0)
    assert "note: the conversation is" not in capsys.readouterr().err  # (it was cut to its last 8 tokens)


def test_compile_is_refused_for_a_recurrent_run(data_dir, tmp_path):
    """`generate/chat --compile` on an LSTM/GRU run was accepted silently: Dynamo cannot trace nn.LSTM/nn.GRU, so
    it compiled for ~20 s around them and each token then took ~25% longer. Refused in one line, before any work."""
    from tests.conftest import run_cli

    run = tmp_path / "gru"
    cfg = _cfg(data_dir, run, family="gru")
    cfg.train.max_steps = cfg.checkpoint.every = 2
    pretrain(cfg, progress=False)
    for command in (["generate", str(run), "--prompt", "RO"], ["chat", str(run)]):
        r = run_cli(*command, "--compile", "--max-new-tokens", "4", input="hi\n")
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [
            "lmforge: error: --compile does not speed up a model.family gru run (torch.compile cannot trace nn.GRU: "
            "it compiles for ~20 s, then each token is slower); drop --compile"
        ]
    r = run_cli("generate", str(run), "--prompt", "RO", "--max-new-tokens", "4", "--seed", "0")
    assert r.returncode == 0 and r.stdout.startswith("RO"), r.stderr  # without it, the run generates
