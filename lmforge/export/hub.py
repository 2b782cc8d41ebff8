"""Models named on the Hugging Face Hub: `hf:ORG/NAME[@REVISION]` wherever a local HF directory is taken
(`lmforge import`, `finetune`'s BASE, `--teacher`), as `prepare` takes `hf:NAME` for hub datasets.

`hub_model_dir(spec)` downloads what import reads, and nothing else, with `huggingface_hub.snapshot_download`
(into its cache, `HF_HOME` / `HF_HUB_CACHE`; a second use reads the cache, and `HF_HUB_OFFLINE=1` uses the
cache alone), and returns the snapshot folder, which is then imported like any local directory:
- config.json and generation_config.json;
- the weights as safetensors (single or sharded with their index); only a repository without them gets
  its `pytorch_model*.bin` (loaded with `weights_only=True`), so a repo that holds both (gpt2 also holds
  TensorFlow, Flax, ONNX and Rust copies) costs one download of the weights, not six;
- the tokenizer files of either kind (tokenizer.json; vocab.json + merges.txt; vocab.txt), its config,
  special tokens and chat template (`chat_template.jinja`).
A hub download needs `huggingface_hub` (which transformers installs: `pip install 'lmforge[hf]'`) and
the network; a gated model needs `hf auth login` (or `HF_TOKEN`) first. Every failure is one
line that says what to do, including the way around it: download elsewhere and pass the folder, with the
commands of the installed huggingface_hub (`hf`, or `huggingface-cli` before 0.34; 1.0 removed that name).
"""

from __future__ import annotations

import re
from pathlib import Path

from lmforge.errors import CheckpointError, first_line

PREFIX = "hf:"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # NAME or ORG/NAME, as the hub allows
_COMMON = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",  # read by nothing, but import then says what to do about it
    "chat_template.jinja",
]
_SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
_PICKLED = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


def is_hub_spec(source: str | Path) -> bool:
    return str(source).startswith(PREFIX)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """`hf:ORG/NAME[@REVISION]` -> (repo id, revision or None)."""
    name = spec.removeprefix(PREFIX)
    repo, at, revision = name.partition("@")
    if not _REPO_ID.fullmatch(repo) or (at and not revision):
        raise CheckpointError(
            f"{spec!r} is not a Hugging Face model name; write hf:ORG/NAME (e.g. hf:Qwen/Qwen2.5-0.5B), "
            "optionally @REVISION (a branch, tag or commit)"
        )
    return repo, revision or None


def hub_model_dir(spec: str) -> Path:
    """The local snapshot folder of hub model `spec` (`hf:ORG/NAME[@REVISION]`), downloaded if not cached.

    Raises:
        CheckpointError: a malformed name, no huggingface_hub, or the download failed (network, unknown or
            gated repository); one line with what to do.
    """
    repo, revision = parse_hub_spec(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"loading {spec} from the Hugging Face Hub needs huggingface_hub: pip install 'lmforge[hf]' "
            "(or download the model elsewhere and pass its folder)"
        ) from None
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=_COMMON + _SAFETENSORS))
        if not any(folder.glob("*.safetensors")):  # an older repository: its PyTorch pickles instead
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=_COMMON + _PICKLED))
    except Exception as e:  # noqa: BLE001 - network, 401/404, offline cache misses: huggingface_hub raises many types
        login, download = hub_commands()
        raise CheckpointError(
            f"cannot get {spec} from the Hugging Face Hub ({type(e).__name__}: {first_line(e)}); check the name "
            f"and the network (a gated model needs '{login}'), or download it where there is "
            f"network ('{download} {repo} --local-dir DIR') and pass DIR"
        ) from None
    return folder


def hub_commands() -> tuple[str, str]:
    """(login, download) commands of the installed huggingface_hub: its `hf` CLI from 0.34 on (1.0 removed
    `huggingface-cli`, which the message used to name), `huggingface-cli` before."""
    import huggingface_hub

    major, minor = (int(n) for n in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    return (
        ("hf auth login", "hf download")
        if (major, minor) >= (0, 34)
        else ("huggingface-cli login", "huggingface-cli download")
    )


def local_model_dir(source: str | Path) -> Path:
    """A local HF directory as given, or the snapshot folder of an `hf:` hub name."""
    return hub_model_dir(str(source)) if is_hub_spec(source) else Path(source)
