"""`hf:ORG/NAME` models (export/hub.py), read through huggingface_hub's real cache with HF_HUB_OFFLINE=1:
the folder layout `snapshot_download` fills in (`models--ORG--NAME/refs/main` naming a snapshot), built
here from a model transformers saved. There is no network here; the download itself is that library's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.export.hf_import import import_hf
from lmforge.tokenizer.train import train_bpe
from lmforge.trained import load_trained
from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")


def _saved_gpt2(folder: Path, *, pickled: bool = False) -> Path:
    """A small random HF GPT-2 with its tokenizer, as `save_pretrained` writes it (or as an older repo: .bin)."""
    texts = ["The quick brown fox jumps over the lazy dog.", "你好，世界。", "Some more words to learn."] * 20
    tok = train_bpe(texts, vocab_size=300)
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    if pickled:
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    (folder / "flax_model.msgpack").write_bytes(b"not read")  # what the hub repos hold besides
    return folder


def _cache(root: Path, repo: str, source: Path, revision: str = "main") -> Path:
    """huggingface_hub's cache holding `source` as `repo`'s snapshot at `revision`."""
    cache = root / "hub-cache"
    entry = cache / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, snapshot)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / revision).write_text(snapshot.name)
    return cache


def _offline(cache: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "pytorch_model.bin"])
def test_import_of_a_hub_name_equals_the_import_of_its_folder(pickled: bool, tmp_path: Path) -> None:
    local = _saved_gpt2(tmp_path / "local", pickled=pickled)
    cache = _cache(tmp_path, "some-org/tiny-gpt2", local)
    result = run_cli("import", "hf:some-org/tiny-gpt2", "--out", str(tmp_path / "from-hub"), env=_offline(cache))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'from-hub'}"
    import_hf(local, tmp_path / "from-folder")
    a = load_trained(tmp_path / "from-hub", torch.device("cpu")).model.state_dict()
    b = load_trained(tmp_path / "from-folder", torch.device("cpu")).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if pickled:
        return

    # a revision names its own ref; one the cache lacks is a one-line error that says what to do
    cache = _cache(tmp_path / "other", "some-org/tiny-gpt2", local, revision="v1")
    assert (
        run_cli("import", "hf:some-org/tiny-gpt2@v1", "--out", str(tmp_path / "v1"), env=_offline(cache)).returncode
        == 0
    )
    for spec, needle in [
        ("hf:some-org/tiny-gpt2@v2", "cannot get hf:some-org/tiny-gpt2@v2 from the Hugging Face Hub"),
        ("hf:some-org/absent", " download some-org/absent --local-dir DIR"),
        ("hf:not a/name", "is not a Hugging Face model name; write hf:ORG/NAME"),
        ("hf:org/name@", "is not a Hugging Face model name"),
    ]:
        result = run_cli("import", spec, "--out", str(tmp_path / "x"), env=_offline(cache))
        assert result.returncode == 2 and needle in result.stderr, (spec, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    # an --out that exists is refused before anything is fetched
    result = run_cli("import", "hf:some-org/absent", "--out", str(tmp_path / "v1"), env=_offline(cache))
    assert result.returncode == 2 and "already exists" in result.stderr, result.stderr


def test_finetune_from_a_hub_name_resumes_without_the_hub(tmp_path: Path) -> None:
    """The base is imported into RUN/base once: a re-run (resume, or nothing to do) needs no hub, no cache."""
    cache = _cache(tmp_path, "some-org/tiny-gpt2", _saved_gpt2(tmp_path / "local"))
    rows = [{"text": f"The quick brown fox {i} jumps over the lazy dog."} for i in range(40)]
    data = tmp_path / "clm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = ["finetune", "hf:some-org/tiny-gpt2", "--task", "clm", "--train", str(data), "--out", str(tmp_path / "ft")]
    args += ["--train.max_steps", "3", "--train.batch_size", "4", "--max-len", "32"]
    first = run_cli(*args, env=_offline(cache))
    assert first.returncode == 0, first.stderr
    info = json.loads((tmp_path / "ft" / "finetune.json").read_text(encoding="utf-8"))
    assert info["base_arg"] == "hf:some-org/tiny-gpt2" and (tmp_path / "ft" / "base" / "config.json").is_file()
    shutil.rmtree(cache)
    again = run_cli(*args, env=_offline(cache))
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr


def test_a_failed_download_names_commands_that_exist(tmp_path: Path) -> None:
    """The message told users to run 'huggingface-cli download', a command huggingface_hub 1.0 removed (the
    version transformers 5 installs has only `hf`): the command it names is one this environment has."""
    import re
    import sys

    result = run_cli("import", "hf:some-org/absent", "--out", str(tmp_path / "x"), env=_offline(tmp_path / "empty"))
    assert result.returncode == 2, result.stderr
    login, download = re.search(
        r"needs '([^']+)'\), or download it .* \('([^']+) some-org/absent", result.stderr
    ).groups()
    for command in (login, download):
        assert shutil.which(command.split()[0], path=str(Path(sys.executable).parent)), (command, result.stderr)
