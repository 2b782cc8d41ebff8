"""Run by tests/test_gpu_dist.py under torchrun, one rank per GPU: a real NCCL process group through
lmforge's collectives and its DDP and bf16 FSDP2 wrappers (`dist.wrap_model`), against the same steps
on a plain model. Every rank trains on the same batch, so the averaged gradient is the plain model's.
Prints one JSON line of results on rank 0.
"""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as tdist

from lmforge import dist
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.objectives import causal_lm_loss
from lmforge.train.precision import Precision


def steps(model: torch.nn.Module, batch: torch.Tensor, precision: Precision, n: int = 4) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(n):
        with precision.autocast():
            loss = causal_lm_loss(model(batch[:, :-1]), batch[:, 1:]) / batch[:, 1:].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    tdist.init_process_group("nccl", device_id=device)
    precision = Precision(device, torch.bfloat16)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=96, n_layer=2, n_head=4, d_model=64, max_seq_len=32)).to(device)
    base.init_weights()
    batch = torch.randint(0, 96, (8, 33), generator=torch.Generator().manual_seed(1)).to(device)
    out: dict = {
        "backend": dist.backend(),
        "world": world,
        "sum": dist.all_reduce([rank + 1.0], device),
        "gathered": dist.all_gather_1d(torch.arange(rank + 1, device=device)).tolist(),
    }
    reference = steps(copy.deepcopy(base), batch, precision)
    want = copy.deepcopy(base)
    steps(want, batch, precision)
    for strategy in ("ddp", "fsdp"):
        model = copy.deepcopy(base)
        wrapped = dist.wrap_model(model, strategy, device, torch.bfloat16)
        losses = steps(wrapped, batch, precision)
        full = dist.full_state_dict(wrapped)  # a collective under FSDP2; the tensors land on rank 0
        if rank == 0:
            plain = want.state_dict()
            out[strategy] = {
                "wrapper": type(wrapped).__name__,
                "losses": losses,
                "reference": reference,
                "keys_match": sorted(full) == sorted(plain),
                "all_fp32": all(t.dtype == torch.float32 for t in full.values()),
                "max_weight_diff": max((full[k].cpu() - plain[k].cpu()).abs().max().item() for k in plain),
            }
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
