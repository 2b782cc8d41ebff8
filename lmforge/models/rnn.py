"""Recurrent language models: LSTM and GRU baselines with the same interface as `GPT`.

`RNNLM(cfg)` maps token ids (B, T) to next-token logits (B, T, vocab_size), like `GPT`, so the same
loop, objectives, evaluation and generation code run it. The recurrence is PyTorch's `nn.LSTM` /
`nn.GRU` (one fused oneDNN/cuDNN kernel per layer; a Python loop over time steps was ~20x slower on
this CPU), wrapped in the usual embedding -> dropout -> layers -> dropout -> output projection stack
(Zaremba et al. 2014, "Recurrent Neural Network Regularization"; AWD-LSTM's weight tying, Press &
Wolf 2017).

    idx (B, T) ─► tok_emb ─► drop ─► rnn (n_layer, dropout between layers) ─► drop ─► head ─► logits
                                       ▲ state in (h, c) / h          state out ─┘

Notable features
- the recurrent state is the "cache": `new_cache(B)` gives a zero state, `forward(idx, cache)` reads
  and updates it in place, so `generate.py` decodes one token per step exactly as with a KV cache,
  and truncated BPTT (`objectives.CarriedStateLM`) carries it across training batches, detached
- tied or untied output head; tied needs no projection because hidden size == embedding size
- no context limit: `max_seq_len` is only the training window (BPTT length); `max_context` tells
  `generate.py` it may keep decoding with the state beyond it
- construction does not initialize: `init_weights()` sets embeddings ~ N(0, init_std) with
  init_std 1 (nn.Embedding's default), recurrent weights and an untied head ~ U(-1/sqrt(d), 1/sqrt(d))
  (PyTorch's default), LSTM forget-gate biases to 1 (Jozefowicz et al. 2015), other biases 0.
  The Transformers' 0.02 starves a tied LSTM: loss after 120 steps (2x160 LSTM, tinyshakespeare
  chars, AdamW 3e-3, 16x128 tokens) was 3.44 with std 0.02, 3.05 with 0.1, 2.09 with 0.3, 1.87 with 1

Parameter names: tok_emb.weight (vocab, d_model); rnn.weight_ih_l{k}, rnn.weight_hh_l{k},
rnn.bias_ih_l{k}, rnn.bias_hh_l{k} (PyTorch's names; LSTM gates in rows [i; f; g; o], GRU [r; z; n]);
lm_head.weight (vocab, d_model) untied only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.configs import RNNConfig
from lmforge.models.layers import require_vocab_size


class RNNState:
    """Recurrent state of a batch, the RNN's counterpart of a KV cache: `h` (and `c` for LSTM)
    of shape (n_layer, B, d_model), plus `pos`, the number of tokens consumed so far."""

    def __init__(self, h: Tensor, c: Tensor | None) -> None:
        self.h, self.c, self.pos = h, c, 0

    def detach_(self) -> None:
        """Cut the autograd graph (truncated BPTT) but keep the values."""
        self.h = self.h.detach()
        self.c = None if self.c is None else self.c.detach()

    def advance(self, n: int) -> None:
        self.pos += n


class RNNLM(nn.Module):
    """LSTM or GRU language model; see the module docstring."""

    max_context = 1 << 30  # no positional limit; generate.py reads this instead of max_seq_len

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        require_vocab_size(cfg.vocab_size)
        self.cfg = cfg
        rnn_cls = nn.LSTM if cfg.family == "lstm" else nn.GRU
        with torch.random.fork_rng(devices=[]):  # construction leaves the global RNG alone (as GPT)
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.drop = nn.Dropout(cfg.dropout)
            self.rnn = rnn_cls(
                cfg.d_model, cfg.d_model, num_layers=cfg.n_layer, dropout=cfg.dropout if cfg.n_layer > 1 else 0.0
            )
            self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter in place, deterministically given the torch RNG."""
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.init_std)
        bound = 1.0 / math.sqrt(self.cfg.d_model)
        d = self.cfg.d_model
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight"):
                nn.init.uniform_(p, -bound, bound)
            else:
                nn.init.zeros_(p)
                if self.cfg.family == "lstm" and name.startswith("bias_ih"):
                    p[d : 2 * d] = 1.0  # forget gate rows [i; f; g; o]: remember by default
        if self.lm_head is not None:
            nn.init.uniform_(self.lm_head.weight, -bound, bound)
        self.rnn.flatten_parameters()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> RNNState:
        """A zero recurrent state for `batch_size` sequences (max_len is accepted for API parity and unused)."""
        w = self.tok_emb.weight
        shape = (self.cfg.n_layer, batch_size, self.cfg.d_model)
        h = torch.zeros(shape, device=w.device, dtype=w.dtype)
        return RNNState(h, torch.zeros_like(h) if self.cfg.family == "lstm" else None)

    def forward(self, idx: Tensor, cache: RNNState | None = None) -> Tensor:
        """Next-token logits for every position.

        Args:
            idx: token ids, (B, T) int64.
            cache: optional recurrent state (from `new_cache`): the sequence continues from it, and it
                is replaced by the state after the last token. None = start from zeros.

        Returns:
            logits (B, T, vocab_size).
        """
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        x = x.transpose(0, 1)  # (T, B, C): nn.LSTM/GRU's native layout
        # CPU autocast runs nn.LSTM in bfloat16, where oneDNN fails ("could not create a primitive descriptor for
        # the LSTM forward propagation primitive", torch 2.13): `--train.dtype bfloat16` on CPU was a traceback at
        # the first step. The recurrent core stays float32 on CPU (autocast leaves nn.GRU there anyway); the head
        # still runs in bfloat16. CUDA autocast is untouched (cuDNN's LSTM takes bf16/fp16).
        with torch.autocast("cpu", enabled=False):
            if cache is None:
                y, _ = self.rnn(x)
            elif cache.c is not None:
                y, (cache.h, cache.c) = self.rnn(x, (cache.h, cache.c))
            else:
                y, cache.h = self.rnn(x, cache.h)
        if cache is not None:
            cache.advance(idx.shape[1])
        y = self.drop(y.transpose(0, 1))  # (B, T, C)
        if self.lm_head is None:
            return F.linear(y, self.tok_emb.weight)  # tied: (B, T, vocab_size)
        return self.lm_head(y)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters; non_embedding leaves out the token table (and so a tied head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (recurrent matmul weights + output projection); seq_len is unused."""
        n_matmul = sum(p.numel() for name, p in self.rnn.named_parameters() if name.startswith("weight"))
        n_matmul += self.cfg.vocab_size * self.cfg.d_model
        return 6.0 * n_matmul
