"""Training objectives: losses as plain functions, and the small `Objective` objects the loop calls.

Losses are returned *summed*, not averaged: the training loop first asks the objective how many
targets each micro-batch of the accumulation window holds (`count`), then divides every summed loss
by the window's total (torchtitan's "global valid tokens"), so gradient accumulation gives the same
update as one big batch. Targets equal to `IGNORE_INDEX` (-100) count for nothing.

An objective is anything with
    count(batch) -> int                      targets in this micro-batch (before any forward pass)
    loss(model, batch) -> scalar tensor      summed loss over those targets (runs the forward pass)
                                             (or a dict of summed terms with their own units, below)
where `batch` is whatever the loader yields (a tuple or dict of tensors, already on the device).
Objectives that need more than (inputs, targets) (MLM masks, sentence pairs, a reference model)
are new classes here; the loop never changes.

Pretraining objectives (`ObjectiveConfig.name`, `lmforge pretrain --objective ...`):
- "clm": `CausalLM` for GPT; `CarriedStateLM` (truncated BPTT) for LSTM/GRU.
- "mlm", "mlm+nsp", "mlm+sop": `MaskedLM` on batches from `data/masking.py` (which does the 80/10/10
  masking, so a batch is a pure function of the loader position and resume stays exact).
- "electra": `ReplacedTokenDetection`.
Loss terms with their own units: BERT's NSP/SOP loss is a mean over sentence pairs and ELECTRA's
replaced-token-detection loss a mean over real (non-pad) tokens, as in the reference implementations
(google-research/bert `run_pretraining.py`: `masked_lm_loss + next_sentence_loss`, each a mean over
its own items; google-research/electra `pretrain/pretrain_model.py`: generator MLM mean + 50 x
discriminator mean over `input_mask`). These objectives have `units(batch)` ({"pairs": B} or
{"real": tokens}) and their `loss` returns a dict of summed terms, {"targets": MLM, "pairs": NSP} or
{"targets": generator MLM, "real": rtd_weight x RTD}; the loop divides each term by the window's
total of its unit (`window_loss`), all-reduced over ranks like the targets, so the mean of each term is
over the whole global batch and does not depend on how it is split into micro-batches or ranks. This
is the quantity validation reports as `loss` (eval/objectives.py): one definition for train and val.
(Before, each example's NSP loss was weighted by its masked-token count and its RTD loss by masked /
real tokens, so train and val numbers of the same quantity disagreed. These objectives keep no state in
checkpoints, so a run saved before resumes as it was; its logged train `loss` follows this definition
from the resumed step on, its `val_loss` is unchanged, and the resume says so: `LOSS_DEFINITION_CHANGES`.)
"""

from __future__ import annotations

import base64
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.objective_config import IGNORE_INDEX


class Objective(Protocol):
    """What the training loop needs of an objective. `count(batch)`: the targets the summed loss is
    divided by. An objective whose targets are not the tokens the model reads (MLM's masked positions,
    one label per classified example) also has `tokens(batch)`, the tokens read, which tokens/s, MFU
    and the run's token count use; without it those use `count`. An objective whose loss also has
    terms averaged over other units (NSP: sentence pairs; RTD: real tokens) has `units(batch)`, those
    units in the micro-batch by name, and its `loss` returns {"targets": summed term, unit: summed term, ...}
    (see `window_loss`)."""

    def count(self, batch: Any) -> int: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]: ...


def tokens_read(objective: Objective, batch: Any) -> int:
    """The tokens the model reads in `batch`, for throughput (`objective.tokens`, else its `count`)."""
    tokens = getattr(objective, "tokens", None)
    return tokens(batch) if tokens is not None else objective.count(batch)


def window_counts(objective: Objective, window: list[Any]) -> dict[str, int]:
    """{"targets", "tokens" (read), and each of the objective's `units`} summed over an accumulation
    window's micro-batches (host-side counts of the batches before they move to the device). The keys
    come in the same order on every rank, so the loop all-reduces the values as one list."""
    counts = {
        "targets": sum(objective.count(batch) for batch in window),
        "tokens": sum(tokens_read(objective, batch) for batch in window),
    }
    units = getattr(objective, "units", None)
    for batch in window if units is not None else ():
        for unit, n in units(batch).items():
            counts[unit] = counts.get(unit, 0) + n
    return counts


def window_loss(loss: torch.Tensor | dict[str, torch.Tensor], counts: dict[str, int]) -> torch.Tensor:
    """A micro-batch's share of its window's loss: a summed loss over the window's targets, or each
    summed term of a dict over the window's count of its unit ("targets", "pairs", "real", ...), so the
    window's shares add up to the sum of per-term means over the whole window."""
    if isinstance(loss, torch.Tensor):
        return loss / max(counts["targets"], 1)
    return sum(term / max(counts[unit], 1) for unit, term in loss.items())


class CausalLM:
    """Next-token prediction on (inputs, targets) batches: `causal_lm_loss(model(inputs), targets)`.

    `compile=True` (`--train.compile`) compiles the cross-entropy as well as the model: inductor then
    reads the (bf16) logits once for the upcast, log-softmax and NLL, and writes their gradient once,
    instead of materialising fp32 copies of a (tokens x vocab) tensor several times per step.
    """

    def __init__(self, compile: bool = False, mode: str = "default") -> None:
        if compile:  # `mode`: torch.compile's (`--train.compile_mode`), as for the model
            self.loss_fn = torch.compile(causal_lm_loss, mode=mode)  # shadows the method below

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(logits, targets)

    def count(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return count_targets(batch[1])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(model(x), y)


class CarriedStateLM:
    """Next-token prediction for recurrent models with truncated BPTT.

    The loader (`data.stream.StreamLoader`) gives each batch row the next contiguous chunk of its own
    stream, so the state after batch k is the right start for batch k + 1. The state is carried,
    detached (gradients stop at the chunk boundary), and saved with checkpoints (`state_dict`) so a
    resumed run continues bit-identically.

    With gradient accumulation the state covers all `accum_steps x micro-batch` rows of a step, and the
    m-th micro-batch of each step (the loop calls `loss` for them in order) starts from, and updates,
    its own rows [m*b, (m+1)*b): the streams of one big batch, trained as the big batch would.

    A batch is (x, y) or the loader's (x, y, fresh): rows where `fresh` is True start from a zero state,
    because their chunk does not continue the one before (the loader wrapped to a new epoch). Without
    it the state left by the end of an epoch's rows was carried into their beginnings, unrelated text.
    """

    def __init__(self, accum_steps: int = 1) -> None:
        self.accum_steps = accum_steps
        self.state: Any = None  # the model's RNNState for all rows of a step, or None before the first batch
        self._micro = 0  # which micro-batch of the step comes next (0 between steps, when checkpoints are saved)

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return count_targets(batch[1])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch[0], batch[1]
        B = x.shape[0]
        if self.state is None or self.state.h.shape[1] != B * self.accum_steps:
            self.state, self._micro = model.new_cache(batch_size=B * self.accum_steps), 0
        m, self._micro = self._micro, (self._micro + 1) % self.accum_steps
        rows = slice(m * B, (m + 1) * B)
        full = self.state
        part = type(full)(full.h[:, rows].clone(), None if full.c is None else full.c[:, rows].clone())
        if len(batch) > 2:  # torch.where, not a masked assignment: no host sync on CUDA
            fresh = batch[2].view(1, B, 1)  # (1, B, 1) against the state's (n_layer, B, d_model)
            part.h = torch.where(fresh, 0.0, part.h)
            part.c = None if part.c is None else torch.where(fresh, 0.0, part.c)
        part.pos = full.pos  # (the position of the step's chunk, the same for every micro-batch)
        logits = model(x, part)
        with torch.no_grad():  # the carried state is detached: gradients stop at the chunk boundary
            full.h[:, rows] = part.h
            if full.c is not None:
                full.c[:, rows] = part.c
        if m == self.accum_steps - 1:
            full.pos = part.pos
        return causal_lm_loss(logits, y)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy of the carried state (exact: raw float32 bytes, base64)."""
        if self.state is None:
            return {}
        out = {"pos": self.state.pos}
        for name in ("h", "c"):
            t = getattr(self.state, name)
            if t is not None:
                arr = t.detach().float().cpu().numpy()
                out[name] = {"shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode()}
        return out

    def load_state_dict(self, sd: dict[str, Any], model: nn.Module) -> None:
        if not sd:
            self.state, self._micro = None, 0
            return
        w = next(model.parameters())

        def decode(d: dict[str, Any]) -> torch.Tensor:
            arr = np.frombuffer(base64.b64decode(d["data"]), dtype=np.float32).reshape(d["shape"])
            return torch.from_numpy(arr.copy()).to(device=w.device, dtype=w.dtype)

        self.state, self._micro = model.new_cache(batch_size=sd["h"]["shape"][1]), 0
        self.state.h = decode(sd["h"])
        self.state.c = decode(sd["c"]) if "c" in sd else None
        self.state.pos = int(sd["pos"])


class MaskedLM:
    """BERT pretraining: MLM on the selected positions (+ NSP/SOP on the pooled [CLS] state).

    Batches are dicts from `data/masking.py`: input_ids, segments, pad_mask, labels (IGNORE_INDEX at
    positions not selected), and pair_labels (0 = in order / is next, 1 = not) with pairs.
    """

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return count_targets(batch["labels"])

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:  # every real token, not only the masked ones
        return int(batch["pad_mask"].sum())

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:  # NSP/SOP: a mean over sentence pairs
        return {"pairs": len(batch["pair_labels"])} if "pair_labels" in batch else {}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        pairs = "pair_labels" in batch
        # the heads run inside forward, so a DDP/FSDP wrapper's forward is what runs (and syncs gradients)
        mlm_logits, nsp_logits = model(
            batch["input_ids"], batch["segments"], batch["pad_mask"], select=selected, pairs=pairs
        )
        terms = {"targets": mlm_loss(mlm_logits, labels[selected])}
        if pairs:  # summed over the pairs; `window_loss` divides by the window's pairs (BERT's mean NSP)
            terms["pairs"] = F.cross_entropy(nsp_logits.float(), batch["pair_labels"], reduction="sum")
        return terms


class ReplacedTokenDetection:
    """ELECTRA: generator MLM loss + `weight` x discriminator loss on every real token.

    The generator predicts the selected positions; tokens sampled from it (no gradient, as in the
    paper) replace them; the discriminator labels each real token 1 if it differs from the original
    (a sample equal to the original counts as original, as in the paper). Sampling reads the
    batch's `sample_noise` (per-example uniforms from the MLM loader), so samples do not depend on
    how the global batch is split over ranks and micro-batches, and resume stays exact; batches
    without it sample with the torch RNG, which checkpoints save.
    """

    def __init__(self, weight: float = 50.0) -> None:
        self.weight = weight

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return count_targets(batch["labels"])

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:  # every real token, not only the masked ones
        return int(batch["pad_mask"].sum())

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:  # RTD: a mean over real tokens
        return {"real": int(batch["pad_mask"].sum())}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        step, rtd_labels, gen_loss = electra_step(model, batch)
        real = batch["pad_mask"]
        rtd = F.binary_cross_entropy_with_logits(step.disc_logits.float(), rtd_labels, reduction="none")  # (B, T)
        # summed over real tokens; `window_loss` divides by the window's real tokens (ELECTRA's mean RTD)
        return {"targets": gen_loss, "real": self.weight * (rtd * real).sum()}


def electra_step(
    model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """One ELECTRA forward (`Electra.forward(select=...)`, through any DDP/FSDP wrapper):
    (`ElectraStep` (gen_logits, corrupted, disc_logits), replaced labels (B, T) float, summed generator MLM loss).

    Samples come from the batch's `sample_noise` when it has one, else from `generator` (default:
    the global torch RNG, which checkpoints save).
    """
    labels = batch["labels"]
    selected = labels != IGNORE_INDEX
    step = model(
        batch["input_ids"], batch["segments"], batch["pad_mask"],
        select=selected, noise=batch.get("sample_noise"), generator=generator,
    )  # fmt: skip
    gen_loss = mlm_loss(step.gen_logits, labels[selected])
    original = torch.where(selected, labels, batch["input_ids"])
    return step, (step.corrupted != original).float(), gen_loss


def electra_corrupt(
    model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(corrupted input_ids, replaced labels (B, T) float, summed generator MLM loss) of `electra_step`."""
    step, replaced, gen_loss = electra_step(model, batch, generator)
    return step.corrupted, replaced, gen_loss


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (N, V) logits at the selected positions against (N,) original token ids."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy.

    Args:
        logits: (B, T, V) scores for the next token at each position.
        targets: (B, T) token ids, `IGNORE_INDEX` where there is no target.

    Returns:
        Scalar float32 tensor: the sum of the per-token losses over valid targets.
    """
    B, T, V = logits.shape
    return F.cross_entropy(
        logits.reshape(B * T, V).float(), targets.reshape(B * T), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_targets(targets: torch.Tensor) -> int:
    """Number of targets that contribute to the loss."""
    return int((targets != IGNORE_INDEX).sum())


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch (a tensor, or a tuple/list/dict of them) to `device`.

    A CPU tensor bound for CUDA is copied into pinned memory first: from pageable memory even a
    `non_blocking` copy waits for the GPU's queue to drain, leaving it idle while the host launches the step.
    """
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
