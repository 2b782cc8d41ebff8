"""Pick what a pretraining objective needs: loader, objective object, evaluation, extra vocabulary.

`pretrain` (train/run.py) calls `setup_objective` once; the loop only sees the objective and the
loader it returns. The combinations:

    objective.name          model.family    loader                         objective
    clm                     gpt             TokenLoader (shuffled windows)  CausalLM
    clm                     lstm, gru       StreamLoader (contiguous rows)  CarriedStateLM (TBPTT)
    mlm, mlm+nsp, mlm+sop   bert            MLMLoader                       MaskedLM
    electra                 electra         MLMLoader                       ReplacedTokenDetection

(`objective.carry_state false` gives LSTM/GRU the shuffled TokenLoader and a zero state per batch.)
Encoders need [PAD]/[CLS]/[SEP]/[MASK]; ids the tokenizer lacks are appended after its vocabulary
(`data.masking.special_ids`), which is why `encoder_extra_vocab` exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.nn as nn

from lmforge import dist
from lmforge.errors import ConfigError
from lmforge.models import CAUSAL_FAMILIES
from lmforge.objectives import CarriedStateLM, CausalLM, MaskedLM, ReplacedTokenDetection

_FAMILIES = {
    "clm": CAUSAL_FAMILIES,
    "mlm": ("bert",),
    "mlm+nsp": ("bert",),
    "mlm+sop": ("bert",),
    "electra": ("electra",),
}
# presets named in the error below (tests/test_objectives.py checks each exists in presets.PRESETS)
_PRESET_HINT = {"clm": "tiny, llama-tiny, lstm-tiny or gru-tiny", "electra": "electra-tiny"}


def check_objective(name: str, family: str) -> None:
    """A one-line `ConfigError` unless objective `name` can train a model of `family`."""
    if family not in _FAMILIES[name]:
        hint = _PRESET_HINT.get(name, "bert-tiny")
        # `--model.family electra` alone left the default objective clm, and the line only said what clm needs
        mine = " or ".join(f"--objective {o}" for o in objectives_for(family))
        raise ConfigError(
            f"objective {name!r} cannot train a model.family {family!r} model; it needs "
            f"{' or '.join(_FAMILIES[name])} (e.g. --preset {hint})"
            + (f"; model.family {family!r} trains with {mine}" * bool(mine))
        )


def objectives_for(family: str) -> list[str]:
    """The objectives that can train a model of `family` (`pretrain --init-from` names them)."""
    return [name for name, families in _FAMILIES.items() if family in families]


def is_encoder(family: str) -> bool:
    return family not in CAUSAL_FAMILIES


def encoder_extra_vocab(family: str, tokenizer: Any) -> int:
    """How many special ids an encoder appends after the tokenizer's vocabulary (0 for decoders)."""
    if not is_encoder(family):
        return 0
    from lmforge.data.masking import special_ids

    return special_ids(tokenizer).added


@dataclass
class ObjectiveSetup:
    objective: Any  # count(batch) / loss(model, batch), see objectives.py
    loader: Any  # infinite iterator with state_dict() / load_state_dict()
    evaluate: Callable[[nn.Module], dict[str, Any]] | None  # None: causal LM evaluation (bpb, ppl)

    def state_dict(self) -> dict[str, Any]:
        return self.objective.state_dict() if hasattr(self.objective, "state_dict") else {}

    def load_state_dict(self, sd: dict[str, Any], model: nn.Module) -> None:
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(sd, model)


def encoder_loader_kwargs(cfg: Any, shards: list, tokenizer: Any, *, batch_size: int, seed: int) -> dict[str, Any]:
    """Keyword arguments of `MLMLoader` for a run config (`RunConfig`) and a split's shards."""
    from lmforge.data.masking import special_ids, word_start_tables

    return {
        "shards": shards,
        "seq_len": cfg.data.seq_len or cfg.model.max_seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "cfg": cfg.objective,
        "specials": special_ids(tokenizer),
        "eos_id": tokenizer.eos_id,
        "token_bytes": np.asarray(tokenizer.token_bytes()),
        "word_tables": word_start_tables(tokenizer) if cfg.objective.whole_word else None,
    }


def setup_objective(
    cfg: Any,
    train_shards: list,
    val_shards: list,
    tokenizer: Any,
    precision: Any,
    *,
    micro_batch: int,
    accum_steps: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> ObjectiveSetup:
    """Loader, objective and (for encoders) evaluation function of a resolved `RunConfig`.

    `micro_batch` is this rank's micro-batch and `accum_steps` the micro-batches per optimizer step;
    a loader whose schedule follows optimizer steps (the curriculum) needs both.
    """
    name, family = cfg.objective.name, cfg.model.family
    check_objective(name, family)
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    mb = micro_batch
    ranks = {"rank": rank, "world_size": world_size}
    carried = family in ("lstm", "gru") and cfg.objective.carry_state
    if world_size > 1 and carried:
        # each rank would carry its own rows' state, and the run's state would have to be saved per rank
        raise ConfigError(
            f"model.family {family!r} with a carried hidden state (truncated BPTT) trains in one process: the "
            "state belongs to each rank's rows; run it without torchrun or pass --objective.carry_state false"
        )
    if name == "clm":
        if carried:
            if cfg.data.mix or cfg.data.curriculum != "none":
                raise ConfigError(
                    "data.mix/data.curriculum need shuffled windows; add --objective.carry_state false or drop them"
                )
            from lmforge.data.stream import StreamLoader

            # the streams are the step's rows (micro-batch x accum_steps), as one big batch's would be
            loader = StreamLoader(train_shards, seq_len=seq_len, batch_size=mb, accum_steps=accum_steps, **ranks)
            return ObjectiveSetup(CarriedStateLM(accum_steps), loader, None)
        if cfg.data.mix:  # weighted mixture of prepared directories (lmforge/data/mixture.py)
            from lmforge.data.mixture import mixture_loader

            loader = mixture_loader(
                cfg.data.mix, tokenizer.fingerprint, seq_len=seq_len, batch_size=mb, seed=cfg.train.seed, **ranks
            )
            return ObjectiveSetup(CausalLM(compile=cfg.train.compile, mode=cfg.train.compile_mode), loader, None)
        if cfg.data.curriculum != "none":  # easy windows first (lmforge/data/curriculum.py)
            from lmforge.data.curriculum import CurriculumLoader

            loader = CurriculumLoader(
                train_shards, eos=tokenizer.eos_id, seq_len=seq_len, batch_size=mb, seed=cfg.train.seed,
                steps=cfg.data.curriculum_steps, start=cfg.data.curriculum_start, accum_steps=accum_steps, **ranks,
            )  # fmt: skip
            return ObjectiveSetup(CausalLM(compile=cfg.train.compile, mode=cfg.train.compile_mode), loader, None)
        from lmforge.data.loader import TokenLoader

        loader = TokenLoader(train_shards, seq_len=seq_len, batch_size=mb, seed=cfg.train.seed, **ranks)
        return ObjectiveSetup(CausalLM(compile=cfg.train.compile, mode=cfg.train.compile_mode), loader, None)
    if cfg.data.mix or cfg.data.curriculum != "none":
        raise ConfigError(f"data.mix and data.curriculum work with objective clm for now, not {name!r}")

    from lmforge.data.masking import MLMLoader, mlm_eval_batches
    from lmforge.eval.objectives import evaluate_encoder

    kwargs = encoder_loader_kwargs(cfg, train_shards, tokenizer, batch_size=mb, seed=cfg.train.seed)
    loader = MLMLoader(**kwargs, **ranks)
    electra = name == "electra"
    objective = ReplacedTokenDetection(cfg.objective.rtd_weight) if electra else MaskedLM()
    eval_bs = cfg.eval.forward_batch(cfg.train, world_size)

    eval_kwargs = {**kwargs, "shards": val_shards, "batch_size": eval_bs, "seed": 0}  # fixed masks every time
    if val_shards:
        MLMLoader(**eval_kwargs, shuffle=False)  # a val split too small for the objective fails now, not mid-run

    eval_ranks = dist.eval_share(cfg.dist.strategy, rank, world_size)  # each rank its share of the batches

    def evaluate(model: nn.Module) -> dict[str, Any]:
        batches = mlm_eval_batches(eval_kwargs, max_sequences=cfg.eval.sequences(cfg.train))
        return evaluate_encoder(
            model, batches, precision=precision, electra=electra, rtd_weight=cfg.objective.rtd_weight, **eval_ranks
        )

    return ObjectiveSetup(objective, loader, evaluate)
