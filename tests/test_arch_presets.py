"""The architecture presets: each builds the model its name promises, at the size its docstring states."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.config import load_config
from lmforge.models import build_model
from lmforge.models.bert import Bert, Electra
from lmforge.models.gpt import GPT
from lmforge.models.rnn import RNNLM

# preset -> (class, objective, total parameters with a 68-token char vocabulary or the preset's own vocab)
EXPECTED = {
    "llama-tiny": (GPT, "clm", 0.2e6),
    "llama-160m": (GPT, "clm", 153e6),
    "lstm-tiny": (RNNLM, "clm", 0.27e6),
    "gru-tiny": (RNNLM, "clm", 0.21e6),
    "bert-tiny": (Bert, "mlm+nsp", 0.46e6),
    "electra-tiny": (Electra, "electra", 0.56e6),
    "bert-base": (Bert, "mlm+nsp", 110e6),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_builds_the_promised_model(name):
    cls, objective, params = EXPECTED[name]
    cfg = load_config(preset=name)
    model_cfg = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=68)
    with torch.device("meta"):  # no memory for the 100M+ presets
        model = build_model(model_cfg)
    assert type(model) is cls and cfg.objective.name == objective
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.03)
    if name.startswith("llama"):
        m = cfg.model
        assert (m.pos_emb, m.norm, m.mlp, m.bias) == ("rope", "rmsnorm", "swiglu", False)
        assert 0 < m.n_kv_head < m.n_head  # grouped-query attention
        assert not any(n.endswith(".bias") for n, _ in model.named_parameters())


def test_llama_tiny_runs_forward_and_backward():
    cfg = dataclasses.replace(load_config(preset="llama-tiny").model, vocab_size=68)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    logits = model(torch.randint(0, 68, (2, 16)))
    logits.sum().backward()
    assert logits.shape == (2, 16, 68) and all(p.grad is not None for p in model.parameters())


def test_estimate_and_generate_refuse_families_they_do_not_cover(data_dir, tmp_path):
    from lmforge.errors import ConfigError, LmforgeError
    from lmforge.estimate import estimate
    from lmforge.generate import generate_from_checkpoint
    from lmforge.train.run import pretrain

    with pytest.raises(ConfigError, match="GPT/Llama-style models only; model.family is 'lstm'"):
        estimate(load_config(preset="lstm-tiny"), tokens=1000, hardware=1e12)
    overrides = {"out": str(tmp_path / "bert"), "data": {"dir": str(data_dir)}, "train": {"max_steps": 1}}
    cfg = load_config(preset="bert-tiny", overrides=overrides | {"model": {"n_layer": 1, "max_seq_len": 32}})
    pretrain(cfg, progress=False)
    with pytest.raises(LmforgeError, match="encoder \\(model.family 'bert'\\), which does not generate text"):
        generate_from_checkpoint(str(tmp_path / "bert"), max_new_tokens=5)


@pytest.mark.parametrize("budget", ["0", "-5"])
def test_architecture_bench_refuses_a_budget_that_would_never_end(monkeypatch, capsys, tmp_path, budget):
    """--budget 0 became train.time_budget 0, "no limit": each of the four models trained for 10**6 steps."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import architectures

    out = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "--models", "lstm"]
    monkeypatch.setattr(sys, "argv", ["architectures.py", "--budget", budget, *out])
    with pytest.raises(SystemExit) as exit_info:
        architectures.main()
    assert exit_info.value.code == 2 and "--budget must be > 0 seconds" in capsys.readouterr().err
