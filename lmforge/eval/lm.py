"""Language-model evaluation: loss, perplexity and bits per byte.

Bits per byte (bpb) is comparable across tokenizers: it divides the total negative log-likelihood
(converted to bits) by the number of UTF-8 bytes of the text whose tokens were predicted. The bytes
come from a per-token table indexed by the target tokens. The tokenizer's `token_bytes()` is exact
for byte-level BPE and character tokenizers (they decode every byte of the text back). It is not for
WordPiece, whose tokens leave out the whitespace between words, nor for Metaspace (Unigram)
tokenizers, which count a word-start space before each document's first word; `text_byte_table`
rescales the table so that the evaluated text's tokens add up to its true UTF-8 byte count (the
prepared split's count from the manifest, or a task file's text), which makes a whole-split
evaluation exact for every tokenizer (the scale is exactly 1 where the table already is). Targets
that decode to no bytes (the end-of-document token) are left out of both the bits and the bytes, as
in nanochat's `evaluate_bpb`: bpb then measures the text itself. `loss` and perplexity cover every
target token, EOS included.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import EvalConfig, TrainConfig
from lmforge.data.shards import read_shard
from lmforge.errors import ConfigError, DataError
from lmforge.log import recorded_world_size
from lmforge.objectives import IGNORE_INDEX
from lmforge.train.precision import Precision

if TYPE_CHECKING:
    from lmforge.data.datadir import DataDir


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    token_bytes: torch.Tensor,
    precision: Precision,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Evaluate a causal LM over `batches` of (inputs, targets).

    Under torchrun (`world_size` > 1, every rank passing the same `batches`) each rank evaluates
    batches i with i % world_size == rank and the sums are all-reduced, so every rank returns the
    metrics of the whole split (equal to one process's up to float64 summation order). Every rank runs
    the same number of forward passes (a rank without a batch in the last round reruns the round's
    first batch and discards it), since an FSDP forward is a collective.

    Args:
        model: returns logits (B, T, V) for inputs (B, T).
        batches: e.g. `lmforge.data.loader.eval_batches(...)`; targets are -100 where ignored.
        token_bytes: (V,) UTF-8 bytes per token id (0 for special tokens): `text_byte_table`, or the
            tokenizer's `token_bytes()` where that is exact.
        precision: device and autocast dtype to run under.
        rank, world_size: this process's share of the batches (see above); 0, 1 = all of them.

    Returns:
        {"loss", "ppl", "bpb", "tokens", "bytes"}; loss in nats per target token.
    """
    was_training = model.training
    model.eval()
    device = precision.device
    token_bytes = token_bytes.to(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    text_nats = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    n_bytes = 0.0
    for (x, y), mine in shard_batches(batches, rank, world_size):
        x, y = x.to(device), y.to(device)
        with precision.autocast():
            logits = model(x)
        if not mine:  # padding forward of the last round (keeps FSDP's collectives in step)
            continue
        losses = F.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B*T,), 0 at ignored positions
        valid = y.flatten() != IGNORE_INDEX
        nbytes = torch.where(valid, token_bytes[y.flatten().clamp(min=0)], 0)
        nats += losses.double().sum()
        text_nats += (losses.double() * (nbytes > 0)).sum()
        n_tokens += int(valid.sum())
        n_bytes += float(nbytes.sum())
    model.train(was_training)
    if world_size > 1:
        from lmforge import dist

        sums = dist.all_reduce([float(nats), float(text_nats), n_tokens, n_bytes], device)
        nats, text_nats, n_tokens, n_bytes = sums[0], sums[1], int(sums[2]), sums[3]
    if n_tokens == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "bpb": float("nan"), "tokens": 0, "bytes": 0}
    loss = float(nats) / n_tokens
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": float(text_nats) / (math.log(2) * n_bytes) if n_bytes else float("nan"),
        "tokens": n_tokens,
        "bytes": round(n_bytes),
    }


def text_byte_table(token_bytes: np.ndarray, tokens: Iterable[np.ndarray], text_bytes: int) -> torch.Tensor:
    """`token_bytes` (float64) scaled so that `tokens` (the evaluated text's token ids, in arrays)
    add up to `text_bytes`, the text's UTF-8 byte count (module docstring).

    The scale is exactly 1 where the table already counts the text's bytes (byte-level BPE, characters),
    and 1 when either count is 0 (nothing to calibrate against). An id beyond the table is a `DataError`
    (naming the shard when `tokens` are `read_shard` memmaps): the model would fail on it anyway.
    """
    table = np.asarray(token_bytes, dtype=np.int64)
    counted = 0
    for ids in tokens:
        for start in range(0, len(ids), 1 << 24):  # bounded memory on big shards
            chunk = np.asarray(ids[start : start + (1 << 24)], dtype=np.int64)
            if chunk.size and int(chunk.max()) >= len(table):
                where = f"{ids.filename} holds " if isinstance(ids, np.memmap) else ""  # a shard: name it
                raise DataError(
                    f"{where}token id {int(chunk.max())}, beyond the tokenizer's {len(table)} ids: the data is "
                    "damaged or was encoded with another tokenizer; prepare it again"
                )
            counted += int(table[chunk].sum())
    scale = text_bytes / counted if counted and text_bytes else 1.0
    return torch.as_tensor(table, dtype=torch.float64) * scale


def split_byte_table(data: DataDir, split: str, token_bytes: np.ndarray) -> torch.Tensor:
    """`text_byte_table` for a prepared split: its shards against the manifest's byte count (a shard
    holding an id beyond the vocabulary is a `DataError` naming it)."""
    shards = data.split_shards(split)
    text_bytes = int(data.manifest["splits"][split].get("bytes", 0))
    return text_byte_table(token_bytes, (read_shard(p) for p in shards), text_bytes)


def shard_batches(batches: Iterable[Any], rank: int, world_size: int) -> Iterator[tuple[Any, bool]]:
    """(batch, mine) pairs for this rank: batch i is mine when i % world_size == rank.

    Batches come in rounds of `world_size`; in a last, incomplete round a rank without a batch of its
    own gets the round's first batch with mine=False, so all ranks run the same number of forwards.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    it = iter(batches)
    while True:
        round_ = list(itertools.islice(it, world_size))
        if not round_:
            return
        if rank < len(round_):
            yield round_[rank], True
        else:
            yield round_[0], False
        if len(round_) < world_size:
            return


def run_forward_batch(eval_cfg: EvalConfig, train_cfg: TrainConfig, ckpt_dir: Path) -> int:
    """Sequences per forward pass when one process evaluates a run's checkpoint: those of one of the
    processes that trained it (the run's env.json world_size). Under torchrun, train.micro_batch_size 0
    splits the global batch over the ranks, and a forward of the whole global batch may not fit one GPU.
    Which sequences are scored does not depend on it (`EvalConfig.sequences`)."""
    from lmforge.adapt.load import run_dir_of

    try:
        return eval_cfg.forward_batch(train_cfg, recorded_world_size(run_dir_of(ckpt_dir)))
    except ConfigError:  # (an env.json edited by hand: a world size the batch does not split over)
        return eval_cfg.forward_batch(train_cfg)


def evaluate_checkpoint(
    path: str,
    *,
    data_dir: str | None = None,
    split: str = "val",
    batch_size: int = 0,
    max_batches: int = 0,
    device: str = "auto",
    seq_len: int = 0,
) -> dict[str, float | int | str]:
    """`lmforge eval`: loss, perplexity and bits per byte of a run/checkpoint on a prepared split.

    Encoder runs (objective mlm, mlm+nsp, mlm+sop, electra) report their objective's metrics instead:
    mlm_accuracy, mlm_ppl, and nsp_accuracy or rtd_accuracy/rtd_auc (see eval/objectives.py).

    Args:
        path: run directory (its latest checkpoint) or a checkpoint folder.
        data_dir: prepared data directory; default: the one the run was trained on.
        split: "val", "test" or "train".
        batch_size: sequences per batch, one forward pass each; 0 = the run's eval batch (its eval.batch_size,
            or its train.batch_size in forward passes of its micro-batch), as in its own evaluations.
        max_batches: evaluate the first max_batches x that batch sequences of the split; 0 = all of them.
        device: "auto", "cpu", "cuda" or "mps".
        seq_len: tokens per scored sequence; 0 = the run's data.seq_len (else its model's context), so a run and
            its export imported back (which knows only the context) are compared at one length.
    """
    from lmforge.adapt.load import load_finetuned
    from lmforge.checkpoint import load_checkpoint
    from lmforge.data.datadir import load_data_dir
    from lmforge.data.loader import eval_batches
    from lmforge.errors import ConfigError, DataError
    from lmforge.train.precision import pick_device, pick_precision

    if batch_size < 0 or max_batches < 0 or seq_len < 0:
        flag, value = next((f, v) for f, v in (("--batch-size", batch_size), ("--max-batches", max_batches),
                                                ("--seq-len", seq_len)) if v < 0)  # fmt: skip
        raise ConfigError(f"{flag} must be >= 1 (or 0 for the default), got {value}")
    if seq_len == 1:
        raise ConfigError("--seq-len must be >= 2: a sequence of one token has nothing to predict")
    precision = pick_precision(pick_device(device), "auto")
    trained = load_finetuned(path, precision.device)  # any run: pretrained, LoRA adapters, soft prompt, ...
    if getattr(trained.model, "head", None) is not None:
        raise DataError(f"{path} is a classifier; evaluate it with --task classify --data FILE")
    checkpoint = load_checkpoint(path, verify=False)  # its folder and step (load_finetuned verified it)
    if not (data_dir or trained.config.data.dir):
        if trained.info:  # a fine-tune of a base that names no data (an imported model, say)
            task = trained.info.get("task")
            raise DataError(
                f"{path} is a --task {task} fine-tune of a base that names no prepared data; score it on its task "
                f"with --task {task} --data FILE, or pass --data DATA_DIR for perplexity on prepared data"
            )
        raise DataError(f"{path} does not name its training data (an imported model?); pass --data DATA_DIR")
    if not data_dir and not Path(trained.config.data.dir).exists():  # moved or deleted since the run trained
        raise DataError(
            f"{path} trained on {trained.config.data.dir}, which is not there any more; pass the prepared data with "
            "--data DATA_DIR (moved, or prepared again with the run's tokenizer)"
        )
    data = load_data_dir(data_dir or trained.config.data.dir)
    data_path = str(data.path.resolve())  # (the result's "data": absolute, as the run records it, given or not)
    manifest_tok = data.manifest.get("tokenizer", {}).get("sha256")
    # the ids are what must agree: a BERT export adds its specials after them, so its import reads the run's data
    if manifest_tok != trained.tokenizer.fingerprint and not trained.tokenizer.reads_ids_of(data.load_tokenizer()):
        raise DataError(
            f"{data.path} was prepared with another tokenizer than {path}; prepare the text again with "
            f"--tokenizer {checkpoint.path / 'tokenizer.json'}"
        )
    shards = data.split_shards(split)
    if not shards:
        from lmforge.data.card import empty_split_reason, empty_splits

        if split in empty_splits(data.manifest):  # a fraction was asked for, but a tiny corpus gave it nothing
            raise DataError(
                f"the {split} split of {data.path} got no documents: {empty_split_reason(data.manifest, [split])}"
            )
        raise DataError(f"{data.path} has no '{split}' split; pick another --split or prepare with a {split} fraction")
    context = trained.model.cfg.max_seq_len
    if seq_len > context:
        raise ConfigError(
            f"--seq-len {seq_len} is longer than the model's context of {context} tokens; pass at most {context}"
        )
    seq_len = seq_len or min(trained.config.data.seq_len or trained.config.model.max_seq_len, context)
    # the run's eval settings with these flags: the same sequences as its evaluations with --eval.max_batches N
    train_cfg = trained.config.train
    eval_cfg = dataclasses.replace(
        trained.config.eval, batch_size=batch_size or trained.config.eval.batch_size, max_batches=max_batches
    )
    forward = run_forward_batch(eval_cfg, train_cfg, checkpoint.path)
    limit = eval_cfg.sequences(train_cfg)
    if trained.config.objective.name != "clm":  # encoders: mlm_accuracy, mlm_ppl, nsp_accuracy, rtd_auc, ...
        from lmforge.data.masking import mlm_eval_batches
        from lmforge.eval.objectives import evaluate_encoder
        from lmforge.train.objective_setup import encoder_loader_kwargs

        cfg = dataclasses.replace(trained.config, data=dataclasses.replace(trained.config.data, seq_len=seq_len))
        kwargs = encoder_loader_kwargs(cfg, shards, trained.tokenizer, batch_size=forward, seed=0)
        metrics = evaluate_encoder(
            trained.model,
            mlm_eval_batches(kwargs, max_sequences=limit),
            precision=precision,
            electra=cfg.objective.name == "electra",
            rtd_weight=cfg.objective.rtd_weight,
        )
        return {"checkpoint": str(checkpoint.path), "step": int(checkpoint.meta.get("step", 0)),
                "data": data_path, "split": split, "seq_len": seq_len, "objective": cfg.objective.name,
                **metrics}  # fmt: skip
    token_bytes = split_byte_table(data, split, trained.tokenizer.token_bytes())  # (also checks the split's ids)
    batches = eval_batches(shards, seq_len=seq_len, batch_size=forward, max_sequences=limit)
    metrics = evaluate_lm(trained.model, batches, token_bytes=token_bytes, precision=precision)
    return {
        "checkpoint": str(checkpoint.path),
        "step": int(checkpoint.meta.get("step", 0)),
        "data": data_path,
        "split": split,
        "seq_len": seq_len,
        **metrics,
    }
