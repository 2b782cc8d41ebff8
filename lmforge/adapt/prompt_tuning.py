"""Prompt tuning: `n_tokens` trainable vectors prepended to the input embeddings of a frozen model.

Only `SoftPrompt.weight` (n_tokens x d_model) trains. It is initialised from the embeddings of
randomly drawn vocabulary tokens, which Lester et al. found to train better than random vectors
at small model sizes. The prompt takes the first `n_tokens` positions of the context, so the text
gets `max_seq_len - n_tokens` of it.

Reference: Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning",
https://arxiv.org/abs/2104.08691
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class SoftPrompt(nn.Module):
    def __init__(self, n_tokens: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_tokens, d_model))

    @torch.no_grad()
    def init_from_embeddings(self, table: Tensor, seed: int) -> None:
        """Copy rows of the token table, picked with a local generator (the global RNG is untouched)."""
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, table.shape[0], (self.weight.shape[0],), generator=g)
        self.weight.copy_(table[rows.to(table.device)])

    def prepend(self, x: Tensor) -> Tensor:
        """(B, T, C) embeddings -> (B, n_tokens + T, C)."""
        return torch.cat([self.weight.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
