"""Optimizers: decay / no-decay parameter groups, AdamW, SGD and Muon builders, the L1 penalty.

Weight decay applies to matrices (linear and embedding weights, `p.dim() >= 2`) and not to biases
or norm gains, as in GPT-2/nanoGPT: decaying gains towards 0 fights the normalisation. For SGD
the same coefficient is the classic L2 penalty (`weight_decay` in `torch.optim.SGD`).

Muon (`optim.name = "muon"`; Keller Jordan, "Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/, 2024): for each 2-D weight of a hidden `nn.Linear`, keep a
Nesterov momentum of the gradient and replace the update by its nearest semi-orthogonal matrix
(U V^T of its SVD), approximated by five steps of a quintic Newton-Schulz iteration with the blog's
coefficients (3.4445, -4.7750, 2.0315), scaled by sqrt(max(1, rows / cols)). Embeddings, the output
head, norm gains and biases are not "hidden matrices" and get AdamW. One `Muon` optimizer holds both
kinds of groups, so the training loop (which sets every group's `lr` from the schedule) needs no
change: a Muon group scales the scheduled lr by `lr_scale = optim.muon_lr / train.lr`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmforge.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (dim >= 2) and a non-decayed group."""
    decay, no_decay = [], []
    for p in model.parameters():  # .parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic: X <- aX + (b A + c A^2) X, A = X X^T


def newton_schulz_many(
    mats: list[torch.Tensor], steps: int = 5, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Approximately orthogonalise each matrix (or stack, (..., rows, cols)): U V^T of its SVD, singular
    values pushed into ~[0.7, 1.2] by Muon's quintic Newton-Schulz iteration (`NS_COEFFS`).

    Each matrix is iterated in its wide orientation (rows <= cols), scaled to Frobenius norm 1 (spectral
    norm <= 1: the iteration's basin), in `dtype`.

    float32 runs the iteration in the rows x rows Gram space: every X_k is P_k(G_0) X_0 for a polynomial
    P_k of G_0 = X_0 X_0^T, and with M_k = a I + b G_k + c G_k^2 the updates P_{k+1} = M_k P_k and
    G_{k+1} = M_k G_k M_k^T = M_k^2 G_k need only rows x rows products. X_0 is touched twice (G_0, then
    P_K X_0) instead of twice per iteration, and matrices whose Gram matrices have the same size (every
    hidden matrix of a GPT: d_model x d_model) iterate together as one batch. Same result as the textbook
    iteration up to rounding (tested to 3e-5 on entries ~0.1-0.3); on 12 baby-GPT matrices 6.1 ms instead
    of 12.5 ms per step (2 threads). Not in bfloat16: G_k is carried forward instead of
    recomputed from X_k, so rounding errors accumulate, and in bf16 they pushed a speedrun out of the
    basin (NaN after ~240 steps); bfloat16 runs the textbook iteration, matrix by matrix.
    """
    a, b, c = NS_COEFFS
    xs, flipped = [], []
    for g in mats:
        x = g.to(dtype)
        flipped.append(x.size(-2) > x.size(-1))
        x = x.mT if flipped[-1] else x
        xs.append(x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7))
    if dtype != torch.float32:
        for i, x in enumerate(xs):
            for _ in range(steps):
                gram = x @ x.mT
                x = a * x + (b * gram + c * gram @ gram) @ x
            xs[i] = x
    else:
        batches: dict[tuple, list[int]] = {}  # same Gram shape and device: one batched iteration
        for i, x in enumerate(xs):
            batches.setdefault((x.shape[:-1], x.device), []).append(i)
        for idx in batches.values():
            gram = torch.stack([xs[i] @ xs[i].mT for i in idx])  # (n, ..., rows, rows)
            shape = gram.shape
            gram = gram.reshape(-1, *shape[-2:])  # (n', rows, rows): one bmm per product
            poly = None  # P_0 = identity
            for k in range(steps):
                m = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2 in one op
                m.diagonal(dim1=-2, dim2=-1).add_(a)  # M_k
                poly = m if poly is None else torch.bmm(m, poly)
                if k < steps - 1:  # the last G_{k+1} would go unused: 2 of the 19 products saved
                    gram = torch.bmm(m, torch.bmm(m, gram))
            poly = poly.reshape(shape)
            for j, i in enumerate(idx):
                xs[i] = poly[j] @ xs[i]
    return [(x.mT if f else x).to(g.dtype) for x, f, g in zip(xs, flipped, mats, strict=True)]


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`newton_schulz_many` for one matrix (or one stack of matrices)."""
    return newton_schulz_many([g], steps, dtype)[0]


class Muon:
    """Muon for groups with `muon=True`, AdamW (decoupled weight decay) for the others; see the module docstring.

    It has `torch.optim.Optimizer`'s interface (`param_groups`, `state`, `defaults`, `step`, `zero_grad`,
    `add_param_group`, `state_dict` / `load_state_dict` in the same format, so checkpoints, resume and
    GradScaler work unchanged) but is a plain class: the base class imports `torch._dynamo` the first
    time a wrapped method runs, which costs ~1 s of start-up on this CPU (measured: 0.95 s), a fifth of
    the speedrun's start-up. (`torch.optim.AdamW` still pays it; with Muon nothing else imports it.)
    """

    def __init__(
        self,
        groups: list[dict],
        *,
        lr: float,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_steps: int = 5,
        ns_dtype: str = "float32",
    ) -> None:
        self.defaults = dict(
            lr=lr,
            lr_scale=1.0,
            muon=False,
            momentum=momentum,
            betas=betas,
            eps=eps,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            weight_decay=0,
        )
        self.state: dict[torch.Tensor, dict] = {}
        self.param_groups: list[dict] = []
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict) -> None:
        params = list(group["params"])
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append({**self.defaults, **group, "params": params})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        """`torch.optim.Optimizer.state_dict()`'s format: parameters numbered in group order."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: st for p, st in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()`; moment and momentum tensors follow their parameter's device and dtype."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        if any(len(a["params"]) != len(b["params"]) for a, b in zip(saved, self.param_groups, strict=True)):
            raise ValueError("loaded state dict has a parameter group of a different size than this optimizer's")
        params = [p for group in self.param_groups for p in group["params"]]
        self.state = {}
        for key, st in state_dict["state"].items():
            p = params[int(key)]
            self.state[p] = {
                k: v if k == "step" or not torch.is_tensor(v) else v.to(device=p.device, dtype=p.dtype)
                for k, v in st.items()
            }
        for group, old in zip(self.param_groups, saved, strict=True):
            group.update({k: v for k, v in old.items() if k != "params"})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        with torch.profiler.record_function("Optimizer.step#Muon.step"):  # as torch.optim labels its steps
            for group in self.param_groups:
                lr, wd = group["lr"] * group["lr_scale"], group["weight_decay"]
                if group["muon"]:
                    self._muon_step(group, lr, wd)
                else:
                    self._adamw_step(group, lr, wd)

    def _adamw_step(self, group: dict, lr: float, wd: float) -> None:
        """AdamW with decoupled weight decay, every tensor of the group per op (`torch._foreach_*`, the
        same element-wise arithmetic as one tensor at a time, in ~1/10 of the op calls)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state.setdefault(p, {})
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        beta1, beta2 = group["betas"]
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_([st["step"] for st in states], 1)
        ts = [float(st["step"]) for st in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in ts])
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**t) for t in ts])

    def _muon_step(self, group: dict, lr: float, wd: float) -> None:
        """Nesterov momentum, Newton-Schulz (all of the group's matrices in one call), scaled step."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        bufs = []
        for p in params:
            state = self.state.setdefault(p, {})
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        nesterov = torch._foreach_add(grads, bufs, alpha=group["momentum"])
        updates = newton_schulz_many(nesterov, group["ns_steps"], getattr(torch, group["ns_dtype"]))
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        by_scale: dict[float, list[int]] = {}  # the step's scale depends on the shape: one foreach per scale
        for i, p in enumerate(params):
            by_scale.setdefault(math.sqrt(max(1.0, p.size(0) / p.size(1))), []).append(i)
        for scale, idx in by_scale.items():
            torch._foreach_add_([params[i] for i in idx], [updates[i] for i in idx], alpha=-lr * scale)


def muon_groups(model: nn.Module, weight_decay: float, lr_scale: float) -> list[dict]:
    """Hidden matrices (2-D weights of `nn.Linear` modules other than `lm_head`) for Muon; the rest for AdamW."""
    hidden = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] != "lm_head" and m.weight.requires_grad
    }
    muon = [p for p in model.parameters() if id(p) in hidden]
    groups = [{"params": muon, "muon": True, "lr_scale": lr_scale, "weight_decay": 0.0}]
    for g in param_groups(model, weight_decay):
        g["params"] = [p for p in g["params"] if id(p) not in hidden]
        groups.append(g)
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, lr: float, device: torch.device
) -> torch.optim.Optimizer | Muon:
    """AdamW, SGD or Muon (+ AdamW) over `param_groups(model)`.

    AdamW is fused by default on CPU and CUDA (`optim.fused = "auto"`): one kernel reads each tensor once
    instead of ~10 element-wise passes. Measured on 2 CPU threads (torch 2.13) for a whole step: 2.3 ->
    0.6 ms at 0.8M parameters, 28.6 -> 9.6 ms at 10.8M, 364 -> 81 ms for GPT-2 124M. Its rounding
    differs from the for-loop implementation (`"off"`, which nanoGPT's CPU recipe runs and its replica
    config pins), so the two give slightly different curves; each is deterministic and resumes exactly.
    """
    if cfg.name == "muon":
        groups = muon_groups(model, cfg.weight_decay, lr_scale=cfg.muon_lr / lr)
        return Muon(
            groups,
            lr=lr,
            momentum=cfg.muon_momentum,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            ns_steps=cfg.muon_ns_steps,
            ns_dtype=cfg.muon_ns_dtype,  # a string: param groups are saved as JSON
        )
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    fused = cfg.fused == "on" or (cfg.fused == "auto" and device.type in ("cpu", "cuda"))
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def l1_penalty(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Sum of |w| over the trained weight matrices (dim >= 2: what weight decay applies to, never norms or
    biases), whatever the weight decay (0 included) and in every group (Muon's hidden matrices too);
    None when nothing qualifies."""
    terms = [p.abs().sum() for g in optimizer.param_groups for p in g["params"] if p.dim() >= 2]
    return torch.stack(terms).sum() if terms else None
