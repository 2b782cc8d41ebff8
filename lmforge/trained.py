"""A trained model rebuilt from a checkpoint: `load_trained(path, device)` -> `Trained(model, tokenizer, config,
checkpoint)`, what `eval`, `generate`, `export`, `quantize` and fine-tuning's base loading start from.

The config and tokenizer come from the checkpoint itself (state.json, tokenizer.json; the run's tokenizer.json
when the folder has none), so a copied checkpoint folder works on its own. The model is built on the meta device,
materialised, and the weights loaded over it (a quantized checkpoint's dequantized, `compress/quantize.py`).
Checkpoint files, their layout, checks and the race with a running training's pruning (`reading_latest`) are
`lmforge/checkpoint.py`'s. Nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from lmforge.checkpoint import Checkpoint, _open_checkpoint, read_json, reading_latest
from lmforge.errors import CheckpointError


@dataclass
class Trained:
    """A model restored from a checkpoint, with what is needed to use it."""

    model: nn.Module
    tokenizer: Any  # lmforge.tokenizer.tokenizer.Tokenizer
    config: Any  # lmforge.config.RunConfig
    checkpoint: Checkpoint


def load_trained(path: str | Path, device: torch.device) -> Trained:
    """Rebuild the model of a run directory or checkpoint folder and load its weights (eval mode).

    The config and tokenizer come from the checkpoint itself (state.json, tokenizer.json), so a
    copied checkpoint folder works on its own. Nothing is unpickled.
    """
    return reading_latest(path, lambda ckpt_dir: _load_trained(ckpt_dir, device))


def _load_trained(ckpt_dir: Path, device: torch.device) -> Trained:
    from lmforge.models import build_model

    ckpt, config, tokenizer = open_trained(ckpt_dir)
    with torch.device("meta"):
        model = build_model(config.model)
    model = model.to_empty(device=device)
    model.init_weights()  # buffers (e.g. rotary tables); weights are overwritten below
    load_weights(model, ckpt)
    model.eval()
    return Trained(model=model, tokenizer=tokenizer, config=config, checkpoint=ckpt)


def open_trained(ckpt_dir: Path, *, verify: Literal["weights", "state"] = "weights") -> tuple[Checkpoint, Any, Any]:
    """A whole model's checkpoint (pretrained, imported, quantized, fully fine-tuned) with its run config and
    tokenizer, checked and not yet loaded: (checkpoint, RunConfig, Tokenizer). `load_trained` builds the model from
    them; `pretrain --init-from` loads the weights into the model it built. `verify="state"`: state.json's
    checksum only, not the weight files' sha256 (`Checkpoint.verify`, for the caller to run once it reads them).
    Nothing is unpickled."""
    from lmforge.config import config_from_json
    from lmforge.errors import ConfigError
    from lmforge.tokenizer.tokenizer import Tokenizer

    ckpt = _open_checkpoint(ckpt_dir, verify=verify)
    if "config" not in ckpt.meta:
        raise CheckpointError(f"{ckpt.path / 'state.json'} has no config; it was not written by lmforge pretrain")
    info = ckpt.path.parent.parent / "finetune.json"
    if info.is_file() and read_json(info, "re-run lmforge finetune").get("saved") == "adapter":
        raise CheckpointError(
            f"{ckpt.path} holds only fine-tuned adapters, prompt or head; open it with "
            "lmforge.adapt.load.load_finetuned (as eval, generate, chat and export do), which rebuilds it on its base"
        )
    try:
        config = config_from_json(ckpt.meta["config"], where=str(ckpt.path / "state.json"))
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.path / 'state.json'}: {e}") from None
    return ckpt, config, Tokenizer.load(tokenizer_file(ckpt.path))


def tokenizer_file(ckpt_dir: Path) -> Path:
    """A checkpoint's tokenizer.json: its own (a copied checkpoint folder works on its own), else its run's."""
    own = ckpt_dir / "tokenizer.json"
    return own if own.is_file() else ckpt_dir.parent.parent / "tokenizer.json"


def load_weights(model: nn.Module, ckpt: Checkpoint) -> None:
    """Put a whole model's checkpoint weights into `model` (built from its config); a quantized one's integer
    weights (`lmforge quantize`) dequantized."""
    if "quantization" in ckpt.meta:
        from lmforge.compress.quantize import load_quantized

        load_quantized(model, ckpt)
    else:
        ckpt.load_model(model)
