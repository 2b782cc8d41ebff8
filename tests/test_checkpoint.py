"""Checkpoints: atomic write, validity marker, keep-k + best, corruption -> one-line CheckpointError,
optimizer state round trip, tied weights."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch

from lmforge.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_aside_later,
)
from lmforge.errors import CheckpointError
from lmforge.models.gpt import GPT, GPTConfig


def _model_and_optimizer():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=8, tie_embeddings=True))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    opt.step()
    return model, opt


def _save(run, step, model, opt, **state):
    return save_checkpoint(run, step=step, model=model, optimizer=opt, state={"train_state": state})


def test_round_trip_model_and_optimizer(tmp_path):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 3, model, opt)
    assert path.name == "step-000003" and (path / "state.json").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000003"
    ckpt = load_checkpoint(tmp_path)
    _assert_restores(ckpt, model, opt)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_weights_files_get_the_same_permissions_as_the_json_beside_them(tmp_path):
    """safetensors creates its files readable by the owner alone (0600): a run shared with a group had a
    readable config and unreadable weights. Every file of a checkpoint now gets 0666 less the umask."""
    old = os.umask(0o022)
    try:
        model, opt = _model_and_optimizer()
        path = _save(tmp_path, 3, model, opt)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert modes["model.safetensors"] == modes["optim.safetensors"] == modes["state.json"] == 0o644, modes


def _assert_restores(ckpt, model, opt):
    """`ckpt` loaded into a fresh model and optimizer gives exactly `model` and `opt`."""
    torch.manual_seed(1)
    fresh = GPT(model.cfg)
    fresh.init_weights()
    ckpt.load_model(fresh)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    ckpt.load_optimizer(fresh_opt)
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(v, b["state"][pid][k])


def test_incomplete_folder_is_not_a_checkpoint(tmp_path):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 1, model, opt)
    broken = tmp_path / "checkpoints" / "step-000002"
    broken.mkdir()  # e.g. killed before state.json was written
    (tmp_path / "checkpoints" / "step-000003.tmp").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert latest_checkpoint(tmp_path).name == "step-000001"


def test_a_latest_that_names_a_missing_checkpoint_says_what_is_used_instead(tmp_path, capsys):
    """`checkpoints/latest` naming a folder that is gone (deleted by hand, a copy without it) fell back to the
    newest complete checkpoint without a word; a note on stderr now names both, once per command."""
    model, opt = _model_and_optimizer()
    for step in (1, 2):
        _save(tmp_path, step, model, opt)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000002")
    assert latest_checkpoint(tmp_path).name == "step-000001"
    _assert_restores(load_checkpoint(tmp_path), model, opt)  # (a second lookup: no second note)
    pointer = tmp_path / "checkpoints" / "latest"
    assert capsys.readouterr().err.splitlines() == [
        f"note: {pointer} names 'step-000002', which is not a complete checkpoint (deleted or moved?); "
        "using step-000001"
    ]
    # resuming from an earlier checkpoint moves the later ones aside and points `latest` at it: nothing to say
    for step in (2, 3):
        _save(tmp_path, step, model, opt)
    set_aside_later(tmp_path, 1)
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert pointer.read_text(encoding="utf-8") == "step-000001\n" and capsys.readouterr().err == ""


def test_keep_last_k_and_best(tmp_path):
    model, opt = _model_and_optimizer()
    for step in range(1, 7):
        _save(tmp_path, step, model, opt)
        prune_checkpoints(tmp_path, keep=2, best_step=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000005", "step-000006"]


def test_pruning_removes_what_a_kill_left_of_an_earlier_prune(tmp_path):
    """A kill during a prune's rmtree left `step-N/` with its state.json gone and other files (the optimizer
    state) still there: not a checkpoint, and never removed, so the run kept that disk space for good."""
    model, opt = _model_and_optimizer()
    for step in (1, 2):
        _save(tmp_path, step, model, opt)
    half = tmp_path / "checkpoints" / "step-000001"
    (half / "state.json").unlink()  # where the killed rmtree stopped
    _save(tmp_path, 3, model, opt)
    prune_checkpoints(tmp_path, keep=2, best_step=None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000003"]


def test_damaged_files_give_one_line_errors(tmp_path):
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 1, model, opt)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is \d+ bytes, expected \d+ \(truncated\?\)") as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)
    weights.write_bytes(data + b"\0" * 16)  # another run's bigger file copied in: not "truncated?"
    with pytest.raises(CheckpointError, match=r"bytes, expected \d+ \(replaced by another file\?\)"):
        load_checkpoint(tmp_path)
    weights.write_bytes(data[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path)
    weights.write_bytes(data)
    load_checkpoint(tmp_path)  # intact again
    (path / "state.json").write_text("{ truncated", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_state_json_that_still_parses_after_damage_is_refused(tmp_path):
    """state.json lists the other files' checksums but had none of its own: a changed digit (the loader's
    cursor: a silently wrong resume) or a changed type (a TypeError traceback) went through."""
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 3, model, opt, tokens=96)
    state = path / "state.json"
    meta = json.loads(state.read_text(encoding="utf-8"))
    state.write_text(json.dumps(meta), encoding="utf-8")  # reformatted, same content: still fine
    load_checkpoint(path)
    meta["train_state"]["tokens"] = "96"
    state.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"state.json fails its checksum \(damaged or edited by hand\)"):
        load_checkpoint(path)
    meta["train_state"]["tokens"] = 96
    del meta["state_sha256"]  # a checkpoint written before the checksum existed still loads
    state.write_text(json.dumps(meta), encoding="utf-8")
    load_checkpoint(path)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("step", "3", "'step' should be an integer"),
        ("train_state", {"step": "three"}, "'train_state.step' should be an integer"),
        ("loader", [1], "'loader' should be an object"),
        ("rng", 5, "'rng' should be an object"),
        ("files", {"model.safetensors": {"bytes": "1", "sha256": "x"}}, "'files.model.safetensors' should be"),
    ],
)
def test_state_json_without_its_checksum_and_a_wrong_type_is_one_line(tmp_path, key, value, says):
    """A state.json with no checksum (an older one, or one rewritten by a script) holding a wrong type was a
    traceback deep in a load or a resume ("'int' object has no attribute 'items'"); now a line naming it."""
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 3, model, opt, tokens=96)
    state = path / "state.json"
    meta = json.loads(state.read_text(encoding="utf-8"))
    del meta["state_sha256"]
    meta[key] = value
    state.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"state.json: {says}.*use an earlier checkpoint") as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)
    state.write_text("[]", encoding="utf-8")
    with pytest.raises(CheckpointError, match="state.json is not a JSON object"):
        load_checkpoint(path)


def test_readers_of_the_weights_check_only_their_files(tmp_path):
    """verify="weights" (eval, generate, export, a fine-tune's base): a damaged optimizer file, which only a
    resume reads, does not stop them, a damaged weights file still does, and a full check (resume) names it."""
    model, opt = _model_and_optimizer()
    path = _save(tmp_path, 1, model, opt)
    optim = path / "optim.safetensors"
    optim.write_bytes(optim.read_bytes()[:-8])
    assert load_checkpoint(tmp_path, verify="weights").path == path
    with pytest.raises(CheckpointError, match=r"optim.safetensors is \d+ bytes"):
        load_checkpoint(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"model.safetensors is \d+ bytes"):
        load_checkpoint(tmp_path, verify="weights")


def test_foreign_or_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "random").mkdir()
    with pytest.raises(CheckpointError, match="not an lmforge run directory"):
        load_checkpoint(tmp_path / "random")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint yet; train it first \(lmforge pretrain"):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "finetune.json").write_text("{}", encoding="utf-8")  # a fine-tune killed before saving
    with pytest.raises(CheckpointError, match=r"train it first \(lmforge finetune"):
        load_checkpoint(tmp_path / "run")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "state.json").write_text(json.dumps({"format_version": 99}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(fake)


def test_weights_not_matching_the_model(tmp_path):
    model, opt = _model_and_optimizer()
    _save(tmp_path, 1, model, opt)
    other = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=8))
    other.init_weights()
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(tmp_path).load_model(other)


def test_rnn_weights_packed_in_one_buffer_save_and_load(tmp_path):
    """On CUDA, cuDNN packs an LSTM's weights into one flat buffer (each parameter a view of it);
    safetensors refuses views that share memory, which crashed the first save of LSTM runs on a GPU.
    Packed here by hand, as `flatten_parameters` does there."""
    from safetensors import safe_open

    from lmforge.models.rnn import RNNLM, RNNConfig

    torch.manual_seed(0)
    model = RNNLM(RNNConfig(family="lstm", vocab_size=30, n_layer=2, d_model=8, tie_embeddings=True))
    rnn_params = list(model.rnn.parameters())
    flat = torch.cat([p.detach().flatten() for p in rnn_params])
    offset = 0
    for p in rnn_params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    assert len({p.untyped_storage().data_ptr() for p in rnn_params}) == 1
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=None, state={})
    torch.manual_seed(1)
    fresh = RNNLM(model.cfg)
    load_checkpoint(tmp_path).load_model(fresh)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(model.state_dict())


def test_sharded_checkpoint_in_one_process_round_trips_and_names_a_damaged_shard(tmp_path):
    from lmforge.dist import save_sharded_checkpoint

    model, opt = _model_and_optimizer()
    path = save_sharded_checkpoint(tmp_path, 4, model, opt, {"train_state": {}}, tokenizer_json="{}")
    assert path == tmp_path / "checkpoints" / "step-000004"
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.meta["sharded"]["world_size"] == 1 and ckpt.meta["sharded"]["model"] == []  # nothing split
    _assert_restores(ckpt, model, opt)
    shard = path / "model-00000-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model-00000-of-00001\.safetensors is \d+ bytes, expected"):
        load_checkpoint(tmp_path)


def test_rows_of_a_sharded_tensor_are_read_across_shard_files(tmp_path):
    """What an FSDP2 rank reads at a new world size: rows [a, b) that straddle two ranks' files."""
    from lmforge.checkpoint import begin_checkpoint, finish_checkpoint, shard_files, write_shard

    whole = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)  # 7 rows over 2 ranks: 4 + 3
    bias = torch.arange(2.0)
    tmp = begin_checkpoint(tmp_path, 1)
    for rank, rows in enumerate(torch.chunk(whole, 2)):
        write_shard(tmp, rank, 2, {"w": rows, "b": bias}, {"0.exp_avg": rows * 2})
    sharded = {"world_size": 2, "model": ["w"], "optim": ["0.exp_avg"], "tied": {"v": "w"}}
    files = [name for r in range(2) for name in shard_files(r, 2)]
    finish_checkpoint(tmp, step=1, files=files, meta={"sharded": sharded})
    ckpt = load_checkpoint(tmp_path)
    for start, stop in [(0, 4), (2, 6), (4, 7), (5, 5), (0, 7)]:
        assert torch.equal(ckpt.read_rows(0, "w", start, stop), whole[start:stop])
        assert torch.equal(ckpt.read_rows(0, "v", start, stop), whole[start:stop])  # a tied name
        assert torch.equal(ckpt.read_rows(1, "0.exp_avg", start, stop), whole[start:stop] * 2)
    assert ckpt.whole_shape(0, "w") == (7, 3) and torch.equal(ckpt.read_whole(0, "b"), bias)
    assert torch.equal(ckpt.model_state()["w"], whole)
    with pytest.raises(CheckpointError, match="has no tensor 'nope'"):
        ckpt.read_whole(0, "nope")


def _trained_run(run):
    """A run directory with one loadable checkpoint (config + tokenizer), as `pretrain` leaves it."""
    from lmforge.config import RunConfig
    from lmforge.tokenizer.train import train_char

    tok = train_char(["to be or not to be"])
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=8)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    config = RunConfig(out=str(run), model=cfg).to_dict()
    save_checkpoint(run, step=5, model=model, optimizer=None, state={"config": config}, tokenizer_json=tok.to_str())
    return model


def _train_on(ckpt):
    """What a running training does between a reader's resolve and its load: write the next checkpoint,
    point `latest` at it, prune the one the reader holds."""
    step = int(ckpt.name.removeprefix("step-"))
    shutil.copytree(ckpt, ckpt.with_name(f"step-{step + 1:06d}"))
    (ckpt.parent / "latest").write_text(f"step-{step + 1:06d}\n")
    shutil.rmtree(ckpt)


@pytest.mark.parametrize("when", ["after resolve", "while verifying", "while loading weights"])
def test_a_checkpoint_pruned_while_read_is_read_again_from_latest(tmp_path, monkeypatch, when):
    """eval/generate/export on a run still training: the folder `latest` named is pruned under the
    reader (deterministically here, through a hook); the reader loads the newer one instead."""
    import lmforge.checkpoint as ckpt_module
    from lmforge.adapt.load import load_finetuned
    from lmforge.export.peft import load_exportable
    from lmforge.trained import load_trained

    run = tmp_path / "run"
    model = _trained_run(run)
    prunes = {"left": 0}
    if when == "after resolve":
        real = ckpt_module.resolve_checkpoint

        def hook(path):
            found = real(path)
            if prunes["left"] and (found / "state.json").is_file():
                prunes["left"] -= 1
                _train_on(found)
            return found

        monkeypatch.setattr(ckpt_module, "resolve_checkpoint", hook)
    else:
        hooked = "_sha256" if when == "while verifying" else "_load_tensors"
        real = getattr(ckpt_module, hooked)

        def hook(path):
            if prunes["left"]:
                prunes["left"] -= 1
                _train_on(path.parent)
            return real(path)

        monkeypatch.setattr(ckpt_module, hooked, hook)

    cpu = torch.device("cpu")
    loaders = {
        "load_checkpoint": lambda: load_checkpoint(run).model_state(),  # resume, eval's step, finetune
        "load_trained": lambda: load_trained(run, cpu).model,
        "load_finetuned": lambda: load_finetuned(run, cpu).model,  # eval, generate, chat, serve
        "load_exportable": lambda: load_exportable(run).model,  # export
    }
    for name, load in loaders.items():
        if name == "load_checkpoint" and when == "while loading weights":
            continue  # its tensors are read after it returns
        prunes["left"] = 2
        loaded = load()
        assert prunes["left"] == 0, name  # the race really happened (twice)
        state = loaded if isinstance(loaded, dict) else loaded.state_dict()
        assert torch.equal(state["tok_emb.weight"], model.tok_emb.weight), name
    # a training that keeps winning: a one-line error that says what happened, never "damaged"/"incomplete"
    prunes["left"] = 1000
    with pytest.raises(CheckpointError, match="pruned each checkpoint before it could be read.*retry") as excinfo:
        load_finetuned(run, cpu)
    assert "damaged" not in str(excinfo.value) and "incomplete" not in str(excinfo.value)
    # a checkpoint folder named explicitly is not swapped for another; it is said to be deleted, not damaged
    prunes["left"] = 1
    with pytest.raises(CheckpointError, match="was deleted while it was read") as excinfo:
        load_trained(latest_checkpoint(run), cpu)
    assert "damaged" not in str(excinfo.value) and "incomplete" not in str(excinfo.value)


def test_a_data_directory_given_as_a_run_says_to_train_on_it_first(data_dir, tmp_path):
    from lmforge.checkpoint import resolve_checkpoint
    from tests.conftest import run_cli

    with pytest.raises(CheckpointError, match=r"is a prepared data directory \(lmforge prepare\), not a run"):
        resolve_checkpoint(data_dir)
    with pytest.raises(CheckpointError, match="pass a folder made by lmforge pretrain, finetune or import"):
        resolve_checkpoint(tmp_path)  # some other folder
    text = tmp_path / "new.txt"
    text.write_text("Some new text to adapt to.\n", encoding="utf-8")
    r = run_cli("finetune", str(data_dir), "--task", "clm", "--train", str(text), "--out", str(tmp_path / "ft"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "lmforge pretrain --data" in r.stderr, r.stderr
