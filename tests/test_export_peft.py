"""LoRA runs leave lmforge: merged into an HF model (the default), or as a PEFT adapter directory that
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)` loads with the
same logits as our unmerged LoRA model. Real `lmforge finetune --adapt lora` runs on tiny GPTs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.adapt.load import load_finetuned
from lmforge.adapt.lora import LoRALinear
from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.export.hf import export_hf, verify_hf
from lmforge.export.peft import export_peft
from lmforge.finetune import FinetuneConfig, _TensorView, finetune
from lmforge.generate import generate_from_checkpoint
from tests.conftest import REPO, run_cli
from tests.test_finetune import DATA, FAST, make_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 1}
ALL_TARGETS = ["qkv", "attn.proj", "mlp.fc", "mlp.proj"]
# Same float32 math: peft adds B(A x) * alpha/r after the base matmul as we do. Measured max |diff| here:
# 0.0 through peft, ~7e-7 merged (logits ~0.5; the adapters move them by ~0.9).
TOL = dict(atol=1e-5, rtol=1e-5)


def lora_run(root: Path, model: dict) -> Path:
    """An adapter-only LoRA sft run on a tiny base; its B matrices are then scaled up (as after a longer
    run), so that a dropped or misplaced adapter moves the logits far beyond the tolerance."""
    base = make_base(root, max_seq_len=64, **model)
    run = root / "lora"
    cfg = FinetuneConfig(task="sft", adapt="lora", lora_rank=4, lora_alpha=8.0, lora_targets=ALL_TARGETS,
                         eval_samples=1, max_new_tokens=2)  # fmt: skip
    finetune(base, train_file=DATA / "alpaca.jsonl", out=run, cfg=cfg, overrides=FAST, progress=False)
    ckpt = load_checkpoint(run)
    g = torch.Generator().manual_seed(0)
    state = ckpt.model_state()
    state = {k: torch.randn(v.shape, generator=g) * 0.3 if k.endswith("lora_B") else v for k, v in state.items()}
    meta = {k: v for k, v in ckpt.meta.items() if k in ("train_state", "config", "finetune")}
    save_checkpoint(run, step=ckpt.meta["step"], model=_TensorView(state), optimizer=None, state=meta,
                    tokenizer_json=(run / "tokenizer.json").read_text(encoding="utf-8"))  # fmt: skip
    return run


@pytest.mark.parametrize("model", [{}, LLAMA], ids=["gpt2", "llama-gqa"])
def test_peft_adapter_and_merged_export_match_our_lora_model(model: dict, tmp_path: Path) -> None:
    run = lora_run(tmp_path, model)
    ours = load_finetuned(run, torch.device("cpu")).model
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == 2 * 4
    x = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(x)

    out = export_peft(run, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base")
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    if model:  # Llama: fused qkv / gate-up split into HF's modules
        assert config["target_modules"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                            "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]  # fmt: skip
    else:
        assert config["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
        assert config["fan_in_fan_out"] is True
    base = transformers.AutoModelForCausalLM.from_pretrained(str(out / "base")).eval()
    with torch.no_grad():
        base_logits = base(x).logits
    assert (base_logits - expected).abs().max() > 0.1  # the adapters matter: a dropped one would show
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    n_adapters = len(load_file(str(out / "adapter_model.safetensors")))
    assert n_adapters == 2 * 2 * (4 if not model else 4 + 2 + 1)  # layers x (A, B) x HF modules
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, expected, **TOL)
    assert verify_hf(run, out, peft=True) < 1e-4  # what `export --peft --verify` prints
    assert transformers.AutoTokenizer.from_pretrained(str(out)).vocab_size > 0

    merged = export_hf(run, tmp_path / "merged")  # the default: adapters folded into the weights
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(merged)).eval()
        torch.testing.assert_close(plain(x).logits, expected, **TOL)


def test_qwen2_adapter_tokenizer_gives_our_ids_where_its_card_loads_it(tmp_path: Path, capfd) -> None:
    # AutoTokenizer loads the adapter folder (no config.json) from tokenizer.json as it is, but the Qwen2 base/
    # folder as Qwen2Tokenizer: the base's card names PreTrainedTokenizerFast, and export prints no note naming
    # base/ (it named the hidden folder export builds in, and the adapter card's AutoTokenizer is right)
    run = lora_run(tmp_path, dict(LLAMA, qkv_bias=True))
    capfd.readouterr()
    out = export_peft(run, tmp_path / "adapter")
    assert "note" not in capfd.readouterr().err
    tokenizer = load_finetuned(run, torch.device("cpu")).tokenizer
    assert "tokenizer = AutoTokenizer.from_pretrained(" in (out / "README.md").read_text()
    assert "tokenizer = PreTrainedTokenizerFast.from_pretrained(" in (out / "base" / "README.md").read_text()
    for where, name in [(out, "AutoTokenizer"), (out / "base", "PreTrainedTokenizerFast")]:
        hf_tok = getattr(transformers, name).from_pretrained(str(where))
        for text in ["In 2024 we sold 12345 apples.", "价格是 42 元。\n  第二行"]:
            assert hf_tok(text)["input_ids"] == tokenizer.encode(text), (where, text)


def test_peft_refuses_runs_without_an_adapter(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    with pytest.raises(LmforgeError, match="not an adapter-only LoRA run"):
        export_peft(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    classify = tmp_path / "cls"
    cfg = FinetuneConfig(task="classify", adapt="lora", lora_rank=2)
    finetune(base, train_file=DATA / "sentiment_train.csv", out=classify, cfg=cfg, overrides=FAST, progress=False)
    with pytest.raises(LmforgeError, match="of a decoder; export it without --peft"):  # (merged, it exports)
        export_peft(classify, tmp_path / "out")
    # a prompt-tuned sft run is a language model: the error says why it does not export (it was told to
    # fine-tune "on an LM task such as sft", which it was)
    prompt = tmp_path / "prompt"
    cfg = FinetuneConfig(task="sft", adapt="prompt", prompt_tokens=4, eval_samples=1, max_new_tokens=2)
    finetune(base, train_file=DATA / "alpaca.jsonl", out=prompt, cfg=cfg, overrides=FAST, progress=False)
    with pytest.raises(LmforgeError, match="prompt-tuned sft run") as e:
        export_hf(prompt, tmp_path / "out")
    assert "such as sft" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(LmforgeError, match="prompt-tuned sft run") as e:  # it said "export it without --peft"
        export_peft(prompt, tmp_path / "out")
    assert "without --peft" not in str(e.value) and not (tmp_path / "out").exists()
    assert isinstance(generate_from_checkpoint(prompt, prompt="hi", max_new_tokens=2, seed=0, device="cpu"), str)
    # the README said "`generate` and `export` load LM-task runs of every adaptation mode"
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert "`generate` and `export` load LM-task runs of every adaptation mode" not in readme
    assert "`export` takes those LM-task runs but prompt-tuned ones" in readme and "Classifiers" in readme


def test_cli_export_peft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = lora_run(tmp_path, {})
    r = run_cli("export", str(run), "--to", "hf", "--peft", "--out", str(tmp_path / "adapter"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "base" / "model.safetensors").is_file()
    r = run_cli("export", str(tmp_path / "base"), "--peft", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "not an adapter-only LoRA run" in r.stderr and "Traceback" not in r.stderr

    # base_model_name_or_path was the exporting machine's absolute path; now `--out` as given + "/base", as
    # PEFT records the path it loaded its base from: AutoPeftModelForCausalLM finds the base from the folder
    # the export ran in, also after that folder tree moved elsewhere (another machine), with the same logits
    (tmp_path / "work").mkdir()
    r = run_cli("export", str(run), "--to", "hf", "--peft", "--out", "exports/adapter", cwd=str(tmp_path / "work"))
    assert r.returncode == 0, r.stderr
    moved = tmp_path / "elsewhere"
    (tmp_path / "work").rename(moved)
    config = json.loads((moved / "exports" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.join("exports", "adapter", "base")
    monkeypatch.chdir(moved)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained("exports/adapter")  # (an OSError without its base)
    assert auto.base_model.model.config.name_or_path == os.path.join("exports", "adapter", "base")
    assert auto.peft_config["default"].r == 4


def test_model_card_of_a_fine_tune_names_its_base_task_and_chat_prompt(tmp_path: Path) -> None:
    """The card of an exported fine-tune listed the base's pretraining data as "training data" beside the
    fine-tune's steps, the base's pretraining config as the model's, and prompted a chat-tuned model with
    plain text; the base/ of a --peft export claimed the adapter's steps and evaluations as its own."""
    run = lora_run(tmp_path, {})
    card = (export_hf(run, tmp_path / "merged") / "README.md").read_text(encoding="utf-8")
    assert f"| fine-tuned from | `{tmp_path / 'base'}` |" in card
    assert "| fine-tuning | `--task sft`, `--adapt lora` (LoRA merged into the weights) |" in card
    assert "| fine-tuning steps | 6 |" in card and "| steps |" not in card and "| training data |" not in card
    assert "apply_chat_template(messages, add_generation_prompt=True" in card  # how it was trained to be prompted
    assert "Fine-tuning settings (`finetune.json`" in card and '"task": "sft"' in card
    from tests.test_export import card_snippet

    exec(compile(card_snippet(tmp_path / "merged"), "README.md", "exec"), {})  # the chat example runs as written
    base_card = (export_peft(run, tmp_path / "adapter") / "base" / "README.md").read_text(encoding="utf-8")
    assert "the base of the LoRA adapter" in base_card
    assert "fine-tuning steps" not in base_card and "last validation" not in base_card
    assert "apply_chat_template" not in base_card


def test_the_adapter_cards_usage_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    """The adapter card loaded `from_pretrained("adapter/base")` and `"adapter"`: the export's last folder name,
    looked up on the Hub from anywhere but its parent folder. It names `--out` as given, and runs as written."""
    from tests.test_export import card_snippet

    run = lora_run(tmp_path, {})
    monkeypatch.chdir(tmp_path)
    export_peft(run, "exports/adapter")
    snippet = card_snippet(tmp_path / "exports" / "adapter")
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # (what a reader pastes)
    assert '"exports/adapter/base"' in snippet and scope["model"].config.name_or_path == "exports/adapter/base"
