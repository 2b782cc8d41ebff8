"""The torch-free part of `objectives.py`: `--objective.*` settings (`ObjectiveConfig`), the ignored-target index,
and the versions of each objective's train-loss definition a resume compares (`LOSS_DEFINITION_CHANGES`, whose
history objectives.py's top describes). `config.py` and the CLI's parser read these without loading torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.fields import changed_fields, check, opt

IGNORE_INDEX = -100
ENCODER_MIN_SEQ_LEN = 8  # MLMLoader's shortest sequence: [CLS], [SEP] (two for pairs) and text to mask


@dataclass(kw_only=True)
class ObjectiveConfig:
    name: Literal["clm", "mlm", "mlm+nsp", "mlm+sop", "electra"] = opt(
        "clm", "pretraining objective: clm (GPT/LSTM/GRU), mlm, mlm+nsp, mlm+sop (bert), electra (electra)"
    )
    mask_prob: float = opt(0.15, "MLM/ELECTRA: share of tokens selected for prediction")
    mask_token_frac: float = opt(0.8, "of the selected tokens, the share replaced by [MASK]")
    random_token_frac: float = opt(0.1, "of the selected tokens, the share replaced by a random token (rest: kept)")
    whole_word: bool = opt(
        False, "select whole words (all their tokens) instead of single tokens; in CJK text each character is a word"
    )
    rtd_weight: float = opt(50.0, "ELECTRA: weight of the replaced-token-detection loss (the paper's lambda = 50)")
    carry_state: bool = opt(True, "LSTM/GRU: carry the hidden state across consecutive batches (truncated BPTT)")

    def __post_init__(self) -> None:
        check(0.0 < self.mask_prob < 1.0, f"objective.mask_prob must be in (0, 1), got {self.mask_prob}")
        check(
            self.mask_token_frac >= 0 and self.random_token_frac >= 0
            and self.mask_token_frac + self.random_token_frac <= 1.0,
            "objective.mask_token_frac and objective.random_token_frac must be >= 0 and sum to at most 1",
        )  # fmt: skip
        check(self.rtd_weight >= 0, f"objective.rtd_weight must be >= 0, got {self.rtd_weight}")
        self.refuse_unused(changed_fields(self))

    def refuse_unused(self, names: set[str]) -> None:
        """A setting in `names` that this objective never reads is an error rather than silently ignored
        (the config checks those off their defaults; `load_config` also those the user wrote)."""
        unused = _UNUSED_BY.get(self.name, ())
        for f in dataclasses.fields(self):
            check(
                f.name not in unused or f.name not in names,
                f"objective.{f.name} is not used by objective {self.name!r}; drop it",
            )

    @property
    def pairs(self) -> str:
        """Sentence-pair task of the objective: "nsp", "sop" or "" (none)."""
        return {"mlm+nsp": "nsp", "mlm+sop": "sop"}.get(self.name, "")

    def check_encoder(self, model: Any, data_seq_len: int) -> None:
        """What an encoder objective needs of the model and the sequence length, checked when the run
        config is built (`RunConfig.__post_init__`), before a run directory exists: the loader
        (`data.masking.MLMLoader`) refused a short sequence with a traceback after config.json was
        written, and NSP/SOP's sentence B (segment id 1) hit an IndexError at the first step with one
        segment embedding. Other families are left to `train.objective_setup.check_objective`."""
        if self.name == "clm" or getattr(model, "family", "") not in ("bert", "electra"):
            return
        seq_len = data_seq_len or model.max_seq_len
        what = f"data.seq_len {seq_len}" if data_seq_len else f"model.max_seq_len {seq_len} (data.seq_len is 0)"
        check(
            seq_len >= ENCODER_MIN_SEQ_LEN,
            f"{what} is too short for objective {self.name!r}: encoder batches need at least "
            f"{ENCODER_MIN_SEQ_LEN} tokens ([CLS], [SEP] and the text to mask); raise it",
        )
        check(
            not self.pairs or model.n_segments >= 2,
            f"objective {self.name!r} needs model.n_segments >= 2 (its second sentence has segment id 1), got "
            f"{model.n_segments}; raise it, or use --objective mlm",
        )


_UNUSED_BY = {  # the settings each objective never reads
    "clm": ("mask_prob", "mask_token_frac", "random_token_frac", "whole_word", "rtd_weight"),
    "mlm": ("rtd_weight", "carry_state"),
    "mlm+nsp": ("rtd_weight", "carry_state"),
    "mlm+sop": ("rtd_weight", "carry_state"),
    "electra": ("carry_state",),
}


# How each objective's logged training loss is defined, by version: every pretraining checkpoint saves its
# objective's version ("loss_definition" in state.json), and resuming one saved under another version says once
# what changed (train/run.py), so that a train-loss curve that jumps at the resume is explained. Version 1 is the
# first definition, and a checkpoint without the stamp (saved before it existed); each change appends its line.
# Add one whenever the same weights and batch would log another train loss.
LOSS_DEFINITION_CHANGES: dict[str, list[str]] = {
    "mlm+nsp": [
        "train loss = MLM mean + NSP mean over the sentence pairs, the quantity val_loss reports (before: each "
        "pair's NSP loss weighted by its masked-token count)"
    ],
    "mlm+sop": [
        "train loss = MLM mean + SOP mean over the sentence pairs, the quantity val_loss reports (before: each "
        "pair's SOP loss weighted by its masked-token count)"
    ],
    "electra": [
        "train loss = generator MLM mean + rtd_weight x RTD mean over the real tokens, the quantity val_loss "
        "reports (before: each example's RTD loss weighted by its masked / real tokens)"
    ],
}


def loss_definition(name: str) -> int:
    """The version of objective `name`'s training-loss definition (`LOSS_DEFINITION_CHANGES`)."""
    return 1 + len(LOSS_DEFINITION_CHANGES.get(name, []))


def loss_definition_note(name: str, saved: Any, step: int) -> str:
    """The one line a resume says when its checkpoint was saved under another definition of objective `name`'s
    train loss (`saved`: its "loss_definition"; None: saved before the stamp, version 1); "" when the same."""
    now = loss_definition(name)
    was = saved if type(saved) is int and saved >= 1 else 1
    if was == now:
        return ""
    if was > now:
        return (
            f"note: the checkpoint was saved by a newer lmforge whose {name} train loss is defined differently "
            f"(definition {was}; this one computes {now}); train loss before and after step {step} is not comparable"
        )
    changes = "; ".join(LOSS_DEFINITION_CHANGES[name][was - 1 :])
    return (
        f"note: the {name} train loss is defined differently since the checkpoint was saved, from step {step + 1}: "
        f"{changes}; train loss before and after is not comparable (val_loss is)"
    )
