"""Loading fine-tuning bases and fine-tuned runs: `load_finetuned` opens any lmforge run (pretrained,
imported, or fine-tuned in any mode: adapters, soft prompts and heads rebuilt on their named base), for
`eval`, `generate`, `chat`, `serve`, `export` and `finetune` itself (its base, teacher and resumed weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import CAUSAL_FAMILIES


@dataclass
class Finetuned:
    """A loaded model with what using it needs."""

    model: nn.Module  # GPT, Bert, Electra, or adapt.heads.Adapted (soft prompt / classification head)
    tokenizer: Any
    config: Any  # the run config of the architecture
    info: dict[str, Any] | None  # finetune.json, None for a plain (pretrained/imported) run
    template: Any  # chat.ChatTemplate or None
    run_dir: Path

    @property
    def use_cache(self) -> bool:
        return self.model.__class__.__name__ == "GPT"  # an Adapted wrapper decodes without a KV cache


def run_dir_of(ckpt_dir: Path) -> Path:
    return ckpt_dir.parent.parent


def model_sha(ckpt_dir: Path) -> str:
    from lmforge.checkpoint import model_files, read_json

    meta = read_json(ckpt_dir / "state.json", "the checkpoint is damaged")
    files = meta.get("files", {})
    return ",".join(files[name]["sha256"] for name in model_files(meta))  # sharded: the shards', in rank order


def load_finetuned(path: str | Path, device: torch.device) -> Finetuned:
    """Load any lmforge run: pretrained, imported, or fine-tuned in any mode (eval mode, on `device`).

    A run still training may prune the checkpoint being read: `reading_latest` loads the newer one."""
    from lmforge.checkpoint import reading_latest

    return reading_latest(path, lambda ckpt_dir: _load_finetuned(ckpt_dir, device))


def _load_finetuned(ckpt_dir: Path, device: torch.device) -> Finetuned:
    from lmforge.chat import load_template
    from lmforge.checkpoint import load_checkpoint, read_json, resolve_checkpoint
    from lmforge.trained import load_trained

    run_dir = run_dir_of(ckpt_dir)
    info_path = run_dir / "finetune.json"
    if not info_path.is_file():
        t = load_trained(ckpt_dir, device)
        return Finetuned(t.model, t.tokenizer, t.config, None, load_template(run_dir), run_dir)
    info = read_json(info_path, "re-run lmforge finetune")
    ckpt = load_checkpoint(ckpt_dir, verify="weights")
    if "quantization" in ckpt.meta:  # `lmforge quantize` of a whole-model fine-tune: a plain GPT of int weights
        t = load_trained(ckpt_dir, device)
        return Finetuned(t.model, t.tokenizer, t.config, info, load_template(run_dir), run_dir)
    if info["saved"] == "model":
        t = build_from_config(ckpt, device)
        body, tokenizer, config = t
    else:
        if not Path(info["base"]).exists():  # (a bare "does not exist" would name a path the user never typed)
            raise CheckpointError(
                f"{run_dir} saved only its trained tensors, on top of the base checkpoint {info['base']}, which no "
                "longer exists (pruned by the base run's later training, or deleted); restore that checkpoint, "
                "or fine-tune again (--merge or --adapt full save whole weights)"
            )
        base_ckpt = resolve_checkpoint(info["base"])
        if info.get("base_sha256") and model_sha(base_ckpt) != info["base_sha256"]:
            raise CheckpointError(
                f"the base {info['base']} changed since {run_dir} was fine-tuned on it; restore it or fine-tune again"
            )
        base = load_finetuned(base_ckpt, device)
        from lmforge.adapt.lora import merge_lora

        merge_lora(base.model)  # a LoRA-tuned base was merged before this run trained on top of it
        body, tokenizer, config = base.model, base.tokenizer, base.config
    model = build_adapted(body, info, device)
    state = ckpt.model_state()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if info["saved"] == "model":
        from lmforge.train.state import shared_names

        missing = [k for k in missing if k not in shared_names(model)]
    else:
        missing = [k for k in missing if k in adapter_keys(model)]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.weights_path} does not fit {info_path} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); the run is damaged"
        )
    model.eval()
    return Finetuned(model, tokenizer, config, info, load_template(run_dir), run_dir)


def load_resumed_weights(model: nn.Module, ckpt: Any, saved: str) -> None:
    """Put a resumed run's checkpoint weights into the freshly rebuilt model (whole, or the trained tensors)."""
    if saved == "model":
        ckpt.load_model(model)
        return
    state = ckpt.model_state()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in adapter_keys(model)]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.weights_path} does not fit this run (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); pass --overwrite to start over"
        )


def adapter_keys(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def build_from_config(ckpt: Any, device: torch.device) -> tuple[nn.Module, Any, Any]:
    """The bare architecture of a self-contained checkpoint (weights come later)."""
    from lmforge.config import config_from_json
    from lmforge.models import build_model
    from lmforge.tokenizer.tokenizer import Tokenizer
    from lmforge.trained import tokenizer_file

    config = config_from_json(ckpt.meta["config"], where=str(ckpt.path / "state.json"))
    tokenizer = Tokenizer.load(tokenizer_file(ckpt.path))
    with torch.device("meta"):
        body = build_model(config.model)
    body = body.to_empty(device=device)
    body.init_weights()
    return body, tokenizer, config


def build_adapted(body: nn.Module, info: dict[str, Any], device: torch.device) -> nn.Module:
    """Wrap `body` as `info` (finetune.json) says: LoRA layers, soft prompt, classification head.

    An `Electra` body is cut to its discriminator (`ElectraDiscriminator`) first: its generator and
    replaced-token head are neither trained nor saved."""
    from lmforge.adapt.heads import Adapted, set_trainable
    from lmforge.adapt.lora import inject_lora
    from lmforge.adapt.prompt_tuning import SoftPrompt

    adapt = info["adapt"]
    if body.__class__.__name__ == "Electra":  # the discriminator is what ELECTRA fine-tunes; the generator stays out
        from lmforge.models.bert import ElectraDiscriminator

        body = ElectraDiscriminator(body)
    if adapt == "lora" and not info.get("lora_merged"):
        lora = info["lora"]
        inject_lora(body, targets=lora["targets"], rank=lora["rank"], alpha=lora["alpha"], dropout=lora["dropout"])
    prompt = None
    if adapt == "prompt":
        prompt = SoftPrompt(info["prompt_tokens"], body.cfg.d_model).to(device)
        prompt.init_from_embeddings(body.tok_emb.weight, seed=info.get("seed", 0))
    model = body
    if prompt is not None or info["task"] == "classify":
        # a decoder classifier fine-tuned before heads lost their bias has one (finetune.json without head_bias)
        head_bias = bool(info.get("head_bias", True))
        model = Adapted(body, prompt=prompt, n_labels=len(info.get("labels") or []), head_bias=head_bias)
    set_trainable(model, adapt if info["saved"] == "adapter" else "full")
    return model


def load_base_model(info: dict[str, Any], device: torch.device) -> nn.Module:
    """The frozen base a run was fine-tuned from, as a plain GPT (LoRA adapters merged)."""
    from lmforge.adapt.lora import merge_lora

    base = load_finetuned(info["base"], device).model
    merge_lora(base)
    return base


def load_teacher(teacher: str, student: Finetuned, device: torch.device, max_len: int | None = None) -> nn.Module:
    """The frozen teacher of `--adapt distill`: a causal language model with the student's tokenizer.

    The teacher reads the student's training examples and gives next-token logits for every position,
    so it must be causal (GPT, Llama, LSTM or GRU; an encoder predicts masked tokens from both sides) and
    its context must hold an example: `max_len` tokens (finetune's --max-len), 0 = the student's whole
    context. `max_len` None (a caller that does not pass it) checks the student's context. A Hugging Face
    directory is imported as BASE is (`import_hf`), into a temporary folder deleted once it is loaded.
    """
    import tempfile

    from lmforge.adapt.lora import merge_lora
    from lmforge.export.hub import local_model_dir

    p = local_model_dir(teacher)  # (a hub name: its cached or downloaded snapshot)
    if is_hf_dir(p):
        from lmforge.export.hf_import import import_hf

        with tempfile.TemporaryDirectory(prefix="lmforge-teacher-") as tmp:
            loaded = load_finetuned(import_hf(p, Path(tmp) / "teacher"), device)
    else:
        loaded = load_finetuned(teacher, device)
    family = getattr(loaded.model.cfg, "family", "gpt")
    if loaded.model.__class__.__name__ == "Adapted":
        raise ConfigError(f"--teacher {teacher} is a classification or prompt-tuned run; use a language model")
    if family not in CAUSAL_FAMILIES:
        raise ConfigError(
            f"--teacher {teacher} is a {family} encoder (it predicts masked tokens, not the next one); "
            "the teacher must be a causal language model (gpt, llama, lstm or gru)"
        )
    check_teacher_tokenizer(teacher, loaded.tokenizer, student.tokenizer)
    # (output rows padded past the tokenizer may differ: compress.distill.distill_loss compares the shared ids)
    student_context = student.model.cfg.max_seq_len
    example = max_len or student_context
    teacher_context = getattr(loaded.model, "max_context", loaded.model.cfg.max_seq_len)  # recurrent: no limit
    if example > teacher_context:
        hint = (
            f", or pass --max-len {teacher_context} to cut the student's examples to it" if max_len is not None else ""
        )
        raise ConfigError(
            f"--teacher {teacher} has a context of {teacher_context} tokens, shorter than the student's "
            f"{'--max-len' if max_len else 'context'} of {example}; the teacher must read whole examples "
            f"(use a teacher with a context of at least {example}{hint})"
        )
    merge_lora(loaded.model)
    return loaded.model.eval()


def check_teacher_tokenizer(teacher: str | Path, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Distillation compares the teacher's and the student's next-token distributions id by id, so both use one
    tokenizer: a one-line ConfigError otherwise (`load_teacher`; `estimate --teacher RUN` with a student run)."""
    if teacher_tokenizer.fingerprint != student_tokenizer.fingerprint:
        sizes = f"{teacher_tokenizer.vocab_size:,} vs {student_tokenizer.vocab_size:,} ids"
        raise ConfigError(
            f"--teacher {teacher} uses another tokenizer than the student ({sizes}); distillation needs the same "
            "one (prepare the student's data with the teacher's tokenizer.json)"
        )


def is_hf_dir(p: Path) -> bool:
    """A folder with a config.json that is not an lmforge run (`runs.is_run_dir`) or checkpoint (state.json).

    A run stopped before its first checkpoint (config.json beside status.json and env.json, no checkpoints/) was
    taken for one: finetune and import said "config.json: model_type None is not supported", --init-from "is a
    Hugging Face model folder; import it first", where eval says to train it first."""
    from lmforge.runs import is_run_dir

    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    return not (is_run_dir(p) or (p / "state.json").exists())  # (is_run_dir counts checkpoints/ too)


def load_base(base: str | Path, out: Path, device: torch.device) -> tuple[Finetuned, str, str]:
    """The starting model as a plain GPT; returns (loaded, base path recorded, its model sha256)."""
    from lmforge.adapt.lora import merge_lora
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.export.hub import is_hub_spec, local_model_dir

    imported = (out / "base" / "config.json").is_file()  # a resumed run imported its HF base already
    p = out / "base" if is_hub_spec(base) and imported else local_model_dir(base)  # (no download on resume)
    if is_hf_dir(p):
        from lmforge.export.hf_import import import_hf

        if not imported:
            import_hf(p, out / "base")
        p = out / "base"
    ckpt_dir = resolve_checkpoint(p)
    loaded = load_finetuned(ckpt_dir, device)
    family = getattr(loaded.model.cfg, "family", "gpt")
    if loaded.model.__class__.__name__ == "Adapted":
        raise ConfigError(
            f"{base} is a classification or prompt-tuned run; start from a language model (pretrained, sft, clm)"
        )
    if family not in ("gpt", "bert", "electra"):
        raise ConfigError(
            f"{base} is a model.family '{family}' run; fine-tuning supports gpt (GPT/Llama-style), bert and electra "
            "bases: start from such a run (lmforge pretrain --preset bert-tiny, electra-tiny, llama-tiny, ...)"
        )
    merge_lora(loaded.model)  # a LoRA-tuned base becomes a plain GPT with the adapters folded in
    return loaded, str(ckpt_dir.resolve()), model_sha(ckpt_dir)
