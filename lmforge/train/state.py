"""TrainState: everything about training progress that the next step depends on.

Together with the model, optimizer, torch RNG and the data loader's `state_dict()`, this is the
whole state of a run: the loop keeps nothing else, which is what makes resume bit-exact. The RNG and
optimizer states, and the model's weights, are turned into what a checkpoint stores (JSON and tensors)
here too.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # target tokens trained on
    elapsed_s: float = 0.0  # training wall-clock summed over all sessions of this run
    best_val_loss: float | None = None  # the lowest validation loss so far (the "best" checkpoint's)
    best_step: int | None = None
    evals_since_best: int = 0  # early stopping: evaluations since one beat patience_ref by min_delta
    patience_ref: float | None = None  # the loss an evaluation must beat by early_stop_min_delta to count
    stop_reason: str = ""  # "", "max_steps", "time_budget", "early_stop", "interrupted"
    skipped_steps: int = 0  # optimizer steps skipped for non-finite gradients (or by the fp16 GradScaler)
    loss_ema: float | None = None  # running mean of logged train losses, for flagging loss spikes
    rollbacks: int = 0  # times the run went back to its latest checkpoint after repeated non-finite steps
    grad_scaler: dict[str, Any] | None = None  # float16's GradScaler (its loss scale), as of the last checkpoint

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------------------------
# RNG, optimizer and model state <-> JSON + tensors (what a checkpoint stores)


def rng_state() -> dict[str, Any]:
    """Torch CPU (and CUDA) generator states as base64 strings."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    def decode(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and a JSON structure."""
    tensors: dict[str, torch.Tensor] = {}
    structure: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, pstate in sd["state"].items():
        entry = {}
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
                entry[name] = {"tensor": f"{pid}.{name}"}
            else:
                entry[name] = value
        structure["state"][str(pid)] = entry
    return tensors, structure


def unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, entry in structure["state"].items():
        state[int(pid)] = {
            name: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
            for name, value in entry.items()
        }
    # JSON turned tuples (AdamW's betas) into lists; give them back their type.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in structure["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def savable(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors as safetensors can store them, and {dropped name: kept name} for metadata.

    A tied weight (one tensor under several names) is written once, under its alphabetically first
    name, as `safetensors.torch.save_model` does (`load_model` restores it through the module's own
    sharing). Views into one flat buffer, which cuDNN makes of an LSTM/GRU's weights on CUDA, are
    copied: safetensors refuses distinct tensors that share memory.
    """
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (str(t.device), t.untyped_storage().data_ptr()) if t.numel() else ("empty", name)
        groups.setdefault(key, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    for names in groups.values():
        first = state[names[0]]
        same = (first.data_ptr(), first.shape, first.stride())
        if all((state[n].data_ptr(), state[n].shape, state[n].stride()) == same for n in names):
            keep = sorted(names)[0]  # one tensor, maybe tied under several names
            tensors[keep] = state[keep].contiguous()
            dropped.update({n: keep for n in names if n != keep})
        else:  # distinct views of one buffer
            tensors.update({n: state[n].detach().clone().contiguous() for n in names})
    return tensors, dropped


def shared_names(model: nn.Module) -> set[str]:
    """The state-dict names of `model` that share their tensor with another name (tied weights): `savable`
    stores one of each, so a loader counts the others as present."""
    seen: dict[int, str] = {}
    shared = set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = t.data_ptr()
        if key in seen:
            shared.update({name, seen[key]})
        seen[key] = name
    return shared
