"""Hugging Face import: `import_hf(hf_dir, run)` turns a local GPT-2, Llama or Qwen2 directory into an lmforge
run directory (config.json, tokenizer.json, weights-only checkpoint `checkpoints/step-000000/`) that
`lmforge eval`, `lmforge generate` and fine-tuning load like any other run; BERT and ELECTRA directories go
to `export/bert.py`. The key maps and config translations it uses live in `export/hf_families.py`, shared
with the export direction; see its docstring and `export/hf.py`'s for the design. The tokenizer is the
directory's tokenizer.json, or, without one, the one `export/slow_tokenizer.py` builds from GPT-2's or
BERT's slow tokenizer files.

End-of-sequence ids: lmforge's tokenizer knows one end-of-text token (`Tokenizer.eos_id`), but an
instruct model also ends its turns with another (Llama-3-Instruct: `<|eot_id|>` beside
`<|end_of_text|>`; SmolLM2-Instruct: `<|im_end|>`). `hf_stop_ids` collects the directory's own:
generation_config.json and config.json `eos_token_id` (an id or a list), tokenizer_config.json
`eos_token`; when they name more than the tokenizer's eos, the run gets them as `generation.json`
(`generate.stop_ids_of`), where `generate`, `chat`, `serve` and the HF export find them. It also keeps
config.json's own `eos_token_id` when that is not the tokenizer's eos (Qwen2.5-Instruct names `<|im_end|>`
there, transformers' default stop for the model), so the HF export's config.json names it again.

Chat template: an instruct model's own (`chat_template.jinja`, which transformers prefers, else
tokenizer_config.json `chat_template`: a string, or a list of {name, template} whose "default" is used)
goes to the run's tokenizer_config.json marked `"lmforge_chat_template": "hf-jinja"`, with the
`bos_token`/`eos_token` strings it may reference (`chat.hf_template_config`), so chat, serve, eval and
sft fine-tuning prompt it the way it was trained (`chat.JinjaChatTemplate`). One that jinja2's sandbox
cannot parse is left out with a note: the model still imports.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from pickle import UnpicklingError  # only the error weights_only=True raises; nothing is unpickled here
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lmforge.atomic import (
    building_dir,
    check_not_inside,
    check_out_dir,
    write_json,
)
from lmforge.checkpoint import read_json, save_checkpoint
from lmforge.errors import CheckpointError, ConfigError, LmforgeError, first_line
from lmforge.export.hf import HF_DIR_FILES, from_hf_state_dict
from lmforge.export.hf_families import FAMILIES, KeyMap, _name_table
from lmforge.export.slow_tokenizer import read_slow_tokenizer
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.runs import is_run_dir
from lmforge.tokenizer.tokenizer import Tokenizer


def import_hf(
    hf_dir: str | Path, out: str | Path, *, overwrite: bool = False, generator: str | Path | None = None
) -> Path:
    """Turn a local HF GPT-2, Llama or Qwen2 directory into an lmforge run directory.

    Args:
        hf_dir: a directory with config.json, model.safetensors (or pytorch_model.bin, or their sharded
            index) and tokenizer.json (or GPT-2's vocab.json + merges.txt, BERT's vocab.txt); or
            `hf:ORG/NAME[@REVISION]`, a model on the Hugging Face Hub (`export/hub.py`: downloaded or cached).
        out: the run directory to create: config.json, tokenizer.json and a weights-only checkpoint
            `checkpoints/step-000000/` that `lmforge eval`, `generate` and fine-tuning load.
        overwrite: replace an existing `out` (only after the new one is complete).
        generator: with an ELECTRA discriminator, the HF ElectraForMaskedLM generator trained with it (a local
            directory or `hf:ORG/NAME`), imported as the run's generator (`export/bert.py`); without it the run
            gets a freshly initialised one.

    Returns:
        `out`.

    Raises:
        LmforgeError: unsupported model_type or settings, missing or damaged files, `out` exists.
    """
    from lmforge.config import RunConfig
    from lmforge.export.hub import is_hub_spec, local_model_dir

    out = Path(out)
    if is_hub_spec(hf_dir):  # (checked before a download that would be for nothing)
        check_out_dir(out, overwrite=overwrite)
    hf_dir = local_model_dir(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(
            f"{hf_dir} is not a directory; pass a local HF model directory ({HF_DIR_FILES}), or hf:ORG/NAME for "
            "a model on the Hugging Face Hub"
        )
    if is_run_dir(hf_dir) or (hf_dir / "checkpoints").is_dir() or (hf_dir / "state.json").is_file():  # (no model_type)
        raise LmforgeError(
            f"{hf_dir} is an lmforge run or checkpoint already; pass it to eval, generate, finetune or export as it "
            "is: import reads Hugging Face model directories"
        )
    check_not_inside(out, hf_dir)
    check_out_dir(out, overwrite=overwrite)
    config_path = hf_dir / "config.json"
    hf_cfg = read_json(config_path, f"an HF model directory holds {HF_DIR_FILES}")
    model_type = hf_cfg.get("model_type") if isinstance(hf_cfg, dict) else None
    if generator is not None:
        generator = local_model_dir(generator)
        if not (generator / "config.json").is_file():
            raise CheckpointError(f"--generator {generator} is not an HF model directory (it has no config.json)")
        if model_type != "electra":
            raise LmforgeError(
                f"--generator is for ELECTRA discriminators; {config_path} has model_type {model_type!r}"
            )
    if model_type in ("bert", "electra"):
        from lmforge.export.bert import import_encoder

        return import_encoder(hf_dir, hf_cfg, out, generator)
    if model_type not in FAMILIES:
        raise LmforgeError(
            f"{config_path}: model_type {model_type!r} is not supported; lmforge imports {', '.join(FAMILIES)}, "
            "bert and electra"
        )
    tokenizer, tok_path = read_hf_tokenizer(hf_dir)
    try:
        cfg = FAMILIES[model_type].config_from_hf(hf_cfg, config_path)
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{config_path}: unusable {model_type} config ({e})") from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{tok_path} has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
            "the tokenizer does not belong to this model"
        )
    hf_state, weights_path = _read_hf_weights(hf_dir, FAMILIES[model_type].keys)
    dtype = source_dtype(hf_state)
    model = _load_imported(hf_state, cfg, model_type, weights_path)
    cfg = model.cfg
    stop_ids = hf_stop_ids(hf_dir, hf_cfg, tokenizer)
    own_eos = tokenizer.eos_id_or_none  # None: no known end-of-text token (generate says so when it needs one)
    stop_ids = stop_ids if any(i != own_eos for i in stop_ids) else []  # only if they add to the eos
    hf_eos = hf_cfg.get("eos_token_id")  # an id or a list, kept for the HF export when it is not just our eos
    hf_eos_ids = hf_eos if isinstance(hf_eos, list) else [hf_eos]
    if hf_eos == own_eos or not (hf_eos_ids and all(i in stop_ids for i in hf_eos_ids)):
        hf_eos = None
    run_cfg = RunConfig(out=str(out), model=cfg)
    chat = hf_chat_template(hf_dir)
    return write_imported_run(
        out, run_cfg, model, tokenizer, hf_dir, model_type, dtype, stop_ids=stop_ids, hf_eos=hf_eos, chat=chat
    )


def source_dtype(hf_state: dict[str, Tensor]) -> str:
    """The dtype most of an HF model's floating-point weights are stored in ("bfloat16", "float16", "float32"),
    recorded at import (the run holds float32) so that `export` writes them back in it (`hf.export_dtype`)."""
    counts: dict[torch.dtype, int] = {}
    for t in hf_state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return str(max(counts, key=counts.__getitem__, default=torch.float32)).removeprefix("torch.")


def hf_chat_template(hf_dir: Path) -> dict[str, str] | None:
    """The run's tokenizer_config.json for the directory's chat template (module docstring), or None
    when it has none or one that does not parse (said on stderr)."""
    from jinja2 import TemplateError

    from lmforge.chat import compile_jinja, hf_template_config

    tok_cfg_path = hf_dir / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path, "delete it or save it again") if tok_cfg_path.is_file() else {}
    tok_cfg = tok_cfg if isinstance(tok_cfg, dict) else {}
    jinja_path = hf_dir / "chat_template.jinja"
    source = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else tok_cfg.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}]: transformers' default is the one named so
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str) or not source.strip():
        return None
    try:
        compile_jinja(source)
    except TemplateError as e:
        print(f"note: {hf_dir}'s chat template does not parse ({first_line(e)}); imported without it", file=sys.stderr)
        return None

    def token(name: str) -> str:  # a string, or {"content": ...} (AddedToken's form)
        value = tok_cfg.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else ""

    return hf_template_config(source, token("bos_token"), token("eos_token"))


def hf_stop_ids(hf_dir: Path, hf_cfg: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    """The end-of-sequence ids an HF directory names, in this order without repeats: generation_config.json
    `eos_token_id`, config.json `eos_token_id` (each an id or a list of ids), tokenizer_config.json
    `eos_token` (a token string, or {"content": ...}, looked up in `tokenizer`). Ids outside the tokenizer's
    vocabulary, unknown tokens and other values are left out."""
    named: list[Any] = []
    gen_path = hf_dir / "generation_config.json"
    gen = read_json(gen_path, "delete it or save it again") if gen_path.is_file() else {}
    for source in (gen, hf_cfg):
        value = source.get("eos_token_id") if isinstance(source, dict) else None
        named += value if isinstance(value, list) else [value]
    tok_cfg_path = hf_dir / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path, "delete it or save it again") if tok_cfg_path.is_file() else {}
    eos = tok_cfg.get("eos_token") if isinstance(tok_cfg, dict) else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str):
        named.append(tokenizer.hf.token_to_id(eos))  # None when the tokenizer lacks it
    ids: list[int] = []
    for i in named:
        if type(i) is int and 0 <= i < tokenizer.vocab_size and i not in ids:
            ids.append(i)
    return ids


def write_imported_run(
    out: Path,
    run_cfg: Any,
    model: Any,
    tokenizer: Tokenizer,
    hf_dir: Path,
    model_type: str,
    dtype: str,
    *,
    stop_ids: list[int] | None = None,
    hf_eos: int | list[int] | None = None,
    chat: dict[str, str] | None = None,
) -> Path:
    """Write `out` (built in a hidden sibling, then renamed): config.json, tokenizer.json, a weights-only
    step-0 checkpoint (its state.json `imported_from` names the source and the `dtype` of its weights), with
    `stop_ids` generation.json (`generate.write_stop_ids`, holding `hf_eos`, the HF config.json's eos_token_id,
    too) and with `chat` (an HF chat template's `hf_template_config`) tokenizer_config.json."""
    from lmforge.generate import write_stop_ids
    from lmforge.train.state import TrainState

    with building_dir(out) as tmp:
        write_json(tmp / "config.json", run_cfg.to_dict())
        tokenizer.save(tmp / "tokenizer.json")
        if stop_ids:
            write_stop_ids(tmp, stop_ids, hf_eos=hf_eos)
        if chat:
            write_json(tmp / "tokenizer_config.json", chat)
        save_checkpoint(
            tmp,
            step=0,
            model=model,
            optimizer=None,
            state={
                "train_state": TrainState().to_dict(),
                "config": run_cfg.to_dict(),
                # dtype: the source weights' (`source_dtype`), which export writes back by default
                "imported_from": {"path": str(hf_dir.resolve()), "model_type": model_type, "dtype": dtype},
            },
            tokenizer_json=tokenizer.to_str(),
        )
    return out


def read_hf_tensors(hf_dir: Path) -> tuple[dict[str, Tensor], Path]:
    """All tensors of an HF directory (single or sharded, safetensors or .bin, weights only) as stored,
    and the file found (the index of a sharded one)."""
    candidates = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ]
    found = next((hf_dir / name for name in candidates if (hf_dir / name).is_file()), None)
    if found is None:
        raise CheckpointError(f"{hf_dir} has no model weights; an HF model directory holds {HF_DIR_FILES}")
    if found.name.endswith(".index.json"):
        index = read_json(found, "the sharded checkpoint's index is damaged")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                f"{found} has no 'weight_map' of tensor names to shard files; save the model again with save_pretrained"
            )
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or shard in ("", ".", ".."):  # a shard lies beside its index, nowhere else
                raise CheckpointError(
                    f"{found} names shard {shard!r}, which is not a file name in {hf_dir}; "
                    "save the model again with save_pretrained"
                )
            state.update(_read_weight_file(hf_dir / shard))
        return state, found
    return _read_weight_file(found), found


def read_hf_tokenizer(hf_dir: Path) -> tuple[Tokenizer, Path]:
    """The directory's tokenizer and the file it came from: tokenizer.json when there is one, else one built
    from GPT-2's or BERT's slow tokenizer files (`slow_tokenizer.read_slow_tokenizer`; older fine-tunes and
    BERT models ship only those)."""
    tok_path = hf_dir / "tokenizer.json"
    if not tok_path.is_file():
        return read_slow_tokenizer(hf_dir)
    return Tokenizer.load(tok_path), tok_path


def _read_hf_weights(hf_dir: Path, keys: KeyMap) -> tuple[dict[str, Tensor], Path]:
    """`read_hf_tensors` with full HF names: checkpoints saved from the bare model (e.g. OpenAI's GPT-2)
    have no base-model prefix."""
    state, found = read_hf_tensors(hf_dir)
    state = {
        k if k.startswith(keys.base_prefix) or k == "lm_head.weight" else keys.base_prefix + k: v
        for k, v in state.items()
    }
    return state, found


def _read_weight_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the HF checkpoint is incomplete")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    try:  # never unpickle code: weights_only refuses anything but tensors and plain containers
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError:  # torch's own text is a page of advice with terminal colour codes
        raise CheckpointError(
            f"{path} holds pickled objects besides tensors, which lmforge never loads (loading them can run "
            "code); convert it to safetensors where it was made"
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged file fails inside torch's unpickler in many ways (KeyError, ...)
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint ({type(e).__name__}: {first_line(e)}); convert it to "
            "safetensors where it was made"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors; convert it to safetensors")
    return state


def _load_imported(hf_state: dict[str, Tensor], cfg: GPTConfig, family: str, where: Path) -> GPT:
    """Build our GPT for `cfg` and load the HF tensors into it (float32, eval mode)."""
    keys = FAMILIES[family].keys
    if cfg.tie_embeddings:
        hf_state = {k: v for k, v in hf_state.items() if k != keys.top["lm_head.weight"]}  # HF ignores it too
    if family == "gpt2":  # all-zero (or absent) biases = a bias-free model (module docstring)
        with torch.device("meta"):
            names = GPT(cfg).state_dict().keys()
        table = _name_table(keys, cfg)
        biases = [table[n].hf[0] for n in names if n.endswith(".bias")]
        present = [b for b in biases if b in hf_state]
        if not present or (len(present) == len(biases) and all(not hf_state[b].any() for b in present)):
            hf_state = {k: v for k, v in hf_state.items() if k not in set(present)}
            cfg = dataclasses.replace(cfg, bias=False)
    with torch.device("meta"):
        model = GPT(cfg)
    state = from_hf_state_dict(hf_state, cfg, family, list(model.state_dict().keys()), where)
    model = model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):  # init_weights only fills the rotary tables that matter here
        model.init_weights()
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{where} does not match its config.json ({first})") from None
    return model.eval()
