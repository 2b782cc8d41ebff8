"""Encoder Transformer (BERT style) with MLM and NSP heads, and ELECTRA's generator/discriminator pair.

`Bert(cfg)` maps token ids (B, T) (+ segment ids, + padding mask) to hidden states (B, T, d_model);
the heads are methods (`mlm_logits`, `nsp_logits`) because one encoder serves MLM, NSP/SOP and
fine-tuning, and the losses live in `objectives.py`. `Electra(cfg)` (family "electra") holds a
small generator and a full-size discriminator that share one embedding module.

Notable features
- BERT's post-LN layout (norm after each residual add), exact-erf GELU, learned positions,
  segment (token-type) embeddings, LayerNorm eps 1e-12: weights map 1:1 to HF `BertForPreTraining`
  (q/k/v fused here: rows [q; k; v]); tests/test_bert.py checks the forward against it
- bidirectional attention via SDPA with a key-padding mask (no causal mask)
- MLM head: dense -> GELU -> LayerNorm -> output projection tied to the token embedding, + bias
- NSP head on the pooled [CLS] state: dense -> tanh -> Linear(d_model, 2)
- ELECTRA (Clark et al. 2020): the generator is the discriminator scaled by `generator_ratio` in
  width, heads and MLP size (same depth; the paper's best is 1/4-1/2 size). Token, position and
  segment embeddings are shared, of the discriminator's width; the generator reads them through a
  projection and its MLM head projects back to that width, so the output matrix is the shared token
  table (as HF's ELECTRA with `embedding_size`). `d_embed` makes the embeddings narrower than the
  discriminator (HF's `embedding_size`: 128 under ELECTRA-small's 256); the discriminator then reads
  them through its own projection too (`discriminator.in_proj`, HF's `embeddings_project`). 0, the
  default, keeps them d_model wide with no projection, as every run before the field had.
- fine-tuning ELECTRA starts from `ElectraDiscriminator(electra)`: the shared embeddings and the
  discriminator encoder only, as the paper and HF `ElectraForSequenceClassification` do (the
  generator and the replaced-token head are pretraining-only and are dropped)
- no loss and no `torch.distributed` here; `init_weights()` is explicit (N(0, init_std), biases 0)
- pretraining runs the heads inside `forward` (`select=` the masked positions): DDP and FSDP2 wrappers
  only see `forward`, and DDP synchronises gradients only of what ran through it. Without `select`,
  `forward` is the plain encoder (HF parity, fine-tuning, export).

Residual layout (post-norm):

    idx, segments ─► tok_emb + pos_emb + seg_emb ─► norm ─► drop ─► x
    layers.{i}:  x ─► (+ drop(attn(x)))  ─► norm1 ─► x
                 x ─► (+ drop(mlp(x)))   ─► norm2 ─► x
    x[:, 0] ─► pooler (dense, tanh) ─► nsp_head ─► (B, 2)        x ─► mlm_head ─► (B, T, vocab_size)

References: BERT https://arxiv.org/abs/1810.04805 ; whole-word masking and the released code
https://github.com/google-research/bert ; ALBERT (SOP) https://arxiv.org/abs/1909.11942 ;
ELECTRA https://arxiv.org/abs/2003.10555
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.configs import BertConfig
from lmforge.models.layers import gelu, require_vocab_size

# --------------------------------------------------------------------------------------------
# Layers. Legend: B batch, T tokens, C width, H heads, D head_dim.


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, C)
        self.seg_emb = nn.Embedding(cfg.n_segments, C)
        self.norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: Tensor, segments: Tensor | None) -> Tensor:
        B, T = idx.shape
        x = self.tok_emb(idx) + self.pos_emb.weight[:T]  # (B, T, C)
        x = x + (self.seg_emb(segments) if segments is not None else self.seg_emb.weight[0])
        return self.drop(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # rows [q; k; v]
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.proj = nn.Linear(cfg.ff_dim, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.norm1(x + self.drop(self.attn(x, mask)))  # post-LN (BERT)
        return self.norm2(x + self.drop(self.proj(gelu(self.fc(x)))))


class Encoder(nn.Module):
    """A stack of encoder layers, reading inputs of width `d_in` (a projection when it differs)."""

    def __init__(self, cfg: BertConfig, d_in: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(d_in, cfg.d_model) if d_in != cfg.d_model else None
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))

    def forward(self, x: Tensor, pad_mask: Tensor | None) -> Tensor:
        if self.in_proj is not None:
            x = self.in_proj(x)
        mask = None if pad_mask is None else pad_mask[:, None, None, :]  # (B, 1, 1, T): True = attend to key
        for layer in self.layers:
            x = layer(x, mask)
        return x


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm (to the embedding width) -> tied output projection + bias."""

    def __init__(self, cfg: BertConfig, d_embed: int) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, d_embed)
        self.norm = nn.LayerNorm(d_embed, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: Tensor, tok_emb: Tensor) -> Tensor:
        return F.linear(self.norm(gelu(self.dense(h))), tok_emb, self.bias)  # (..., vocab_size)


def _init_module(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()
        elif isinstance(m, MLMHead):
            nn.init.zeros_(m.bias)


def _matmul_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _check_vocab(cfg: BertConfig) -> None:
    require_vocab_size(cfg.vocab_size, "the tokenizer's vocabulary size plus its missing special tokens")


def sample_tokens(logits: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of (N, V) logits, from softmax(logits); no gradient.

    With `noise` (N,) uniforms in [0, 1) (the MLM loader's per-example draws) the sample is the
    inverse CDF at that point, a pure function of the batch, so it does not depend on how a global
    batch is split across ranks or micro-batches; otherwise `torch.multinomial` with `generator`.
    """
    probs = F.softmax(logits.detach().float(), dim=-1)
    if noise is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = probs.cumsum(-1)
    point = noise.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]  # scaled by the total: the cumsum may end below 1
    return torch.searchsorted(cdf, point, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


class BertHeads(NamedTuple):
    mlm_logits: Tensor  # (n_selected, vocab_size) at the selected positions, row-major order
    nsp_logits: Tensor | None  # (B, 2) with pairs=True


class ElectraStep(NamedTuple):
    gen_logits: Tensor  # (n_selected, vocab_size): the generator's scores at the selected positions
    corrupted: Tensor  # (B, T) input ids with the selected positions replaced by generator samples
    disc_logits: Tensor  # (B, T) discriminator scores of `corrupted`


# --------------------------------------------------------------------------------------------
# The models


class Bert(nn.Module):
    """BERT encoder with MLM and NSP heads; see the module docstring."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        _check_vocab(cfg)
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):  # construction leaves the global RNG alone (as GPT)
            self.embed = Embeddings(cfg)
            self.encoder = Encoder(cfg, cfg.d_model)
            self.mlm_head = MLMHead(cfg, cfg.d_model)
            self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
            self.nsp_head = nn.Linear(cfg.d_model, 2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Linear and embedding weights ~ N(0, init_std), biases 0, norms 1 (BERT's init)."""
        _init_module(self, self.cfg.init_std)

    def forward(
        self,
        idx: Tensor,
        segments: Tensor | None = None,
        pad_mask: Tensor | None = None,
        *,
        select: Tensor | None = None,
        pairs: bool = False,
    ) -> Tensor | BertHeads:
        """Hidden states (B, T, d_model) of token ids idx (B, T); pad_mask (B, T) is True at real tokens.

        Pretraining: with `select` (B, T) bool, the MLM head's logits at the selected positions (and
        with pairs=True the NSP head's) instead, as `BertHeads`.
        """
        hidden = self.encoder(self.embed(idx, segments), pad_mask)
        if select is None:
            return hidden
        return BertHeads(self.mlm_logits(hidden[select]), self.nsp_logits(hidden) if pairs else None)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Token scores (..., vocab_size) for hidden states (..., d_model)."""
        return self.mlm_head(hidden, self.embed.tok_emb.weight)

    def nsp_logits(self, hidden: Tensor) -> Tensor:
        """Is-next (class 0) / not-next (class 1) scores (B, 2) from the first ([CLS]) position."""
        return self.nsp_head(torch.tanh(self.pooler(hidden[:, 0])))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.embed.parameters() if p.dim() == 2)
        return n

    def flops_per_token(self, seq_len: int, predicted: float = 1.0) -> float:
        """6 * N_matmul + 12 * n_layer * d_model * seq_len, where the MLM head (dense + the tied projection)
        runs on the `predicted` share of tokens only (pretraining: `select`, about objective.mask_prob) and
        the pooler and NSP head once per sequence. Counting the head for every token overstated MFU by 17%
        (bert-tiny) to 23% (bert-base) at mask_prob 0.15."""
        every = _matmul_params(self.encoder)
        head = self.mlm_head.dense.weight.numel() + self.embed.tok_emb.weight.numel()
        once = self.pooler.weight.numel() + self.nsp_head.weight.numel()
        n = every + predicted * head + once / seq_len
        return 6.0 * n + 12.0 * self.cfg.n_layer * self.cfg.d_model * seq_len


class Electra(nn.Module):
    """ELECTRA: a small MLM generator and a replaced-token discriminator sharing `embed`."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        _check_vocab(cfg)
        self.cfg = cfg
        gen = cfg.generator
        with torch.random.fork_rng(devices=[]):
            self.embed = Embeddings(cfg)  # shared, embed_dim wide (the discriminator's width unless d_embed)
            self.generator = Encoder(gen, cfg.embed_dim)
            self.gen_head = MLMHead(gen, cfg.embed_dim)
            self.discriminator = Encoder(cfg, cfg.embed_dim)  # in_proj = HF's embeddings_project when they differ
            self.disc_dense = nn.Linear(cfg.d_model, cfg.d_model)
            self.disc_head = nn.Linear(cfg.d_model, 1)

    @torch.no_grad()
    def init_weights(self) -> None:
        _init_module(self, self.cfg.init_std)

    def forward(
        self,
        idx: Tensor,
        segments: Tensor | None = None,
        pad_mask: Tensor | None = None,
        *,
        select: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor | ElectraStep:
        """Discriminator scores (B, T): > 0 means "this token was replaced".

        Pretraining: with `select` (B, T) bool, one ELECTRA step as `ElectraStep`: the generator
        predicts the selected positions, its samples (`sample_tokens` with `noise` (B, T) or
        `generator`) replace them, and the discriminator scores the result.
        """
        if select is None:
            return self.discriminate(idx, segments, pad_mask)
        gen_logits = self.mlm_logits(self.generator_hidden(idx, segments, pad_mask)[select])  # (n, V)
        samples = sample_tokens(gen_logits, None if noise is None else noise[select], generator)
        corrupted = idx.clone()
        corrupted[select] = samples
        return ElectraStep(gen_logits, corrupted, self.discriminate(corrupted, segments, pad_mask))

    def discriminate(self, idx: Tensor, segments: Tensor | None = None, pad_mask: Tensor | None = None) -> Tensor:
        h = self.discriminator(self.embed(idx, segments), pad_mask)  # (B, T, C)
        return self.disc_head(gelu(self.disc_dense(h))).squeeze(-1)

    def generator_hidden(self, idx: Tensor, segments: Tensor | None = None, pad_mask: Tensor | None = None) -> Tensor:
        """Generator hidden states (B, T, generator width)."""
        return self.generator(self.embed(idx, segments), pad_mask)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Generator token scores (..., vocab_size) for generator hidden states."""
        return self.gen_head(hidden, self.embed.tok_emb.weight)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.embed.parameters() if p.dim() == 2)
        return n

    def flops_per_token(self, seq_len: int, predicted: float = 1.0) -> float:
        """As `Bert.flops_per_token`: both encoders and the discriminator's head run on every token, the
        generator's MLM head (dense + the tied projection) on the `predicted` share."""
        every = _matmul_params(self.generator) + _matmul_params(self.discriminator)
        every += self.disc_dense.weight.numel() + self.disc_head.weight.numel()
        head = self.gen_head.dense.weight.numel() + self.embed.tok_emb.weight.numel()
        attn = 12.0 * self.cfg.n_layer * (self.cfg.d_model + self.cfg.generator.d_model) * seq_len
        return 6.0 * (every + predicted * head) + attn


class ElectraDiscriminator(nn.Module):
    """ELECTRA's discriminator encoder alone: `embed` + `discriminator` of an `Electra`, nothing else.

    The model ELECTRA fine-tunes downstream (Clark et al. 2020, section 3.1; HF `ElectraModel` under
    `ElectraForSequenceClassification`): the generator and the replaced-token head are left out, so they
    are neither trained nor saved. Parameter names stay `embed.*` / `discriminator.*` as in `Electra`, so a
    pretraining checkpoint's tensors load by name.
    """

    def __init__(self, electra: Electra) -> None:
        super().__init__()
        self.cfg = electra.cfg
        self.embed = electra.embed
        self.discriminator = electra.discriminator

    def forward(self, idx: Tensor, segments: Tensor | None = None, pad_mask: Tensor | None = None) -> Tensor:
        """Hidden states (B, T, d_model) of token ids idx (B, T); pad_mask (B, T) is True at real tokens."""
        return self.discriminator(self.embed(idx, segments), pad_mask)
