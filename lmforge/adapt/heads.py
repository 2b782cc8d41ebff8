"""Task heads and freezing: the `Adapted` wrapper and `set_trainable` for each `--adapt` mode.

`Adapted(body, prompt=None, n_labels=0, head_bias=False)` puts an optional soft prompt in front of a decoder
body and an optional classification head on top:

    idx (B, T) ─► body.tok_emb ─► [soft prompt (P, C) prepended] ─► positions ─► blocks ─► norm_f ─► h (B, P+T, C)
        LM tasks:        h[:, P:] ─► output head (tied tok_emb or lm_head) ─► logits (B, T, V)
        classification:  h[b, P + length_b - 1] (the last real token, "last-token pooling") ─► head ─► (B, n_labels)

The decoder's classification head is a Linear without bias, as HF's `score` in GPT2/Llama/Qwen2
ForSequenceClassification (which pool the same token: the last one that is not padding), so a fine-tuned
decoder classifier exports as one (export/hf_classifier.py). Runs fine-tuned before (finetune.json without `head_bias`)
have a bias: `head_bias=True` rebuilds their head as it was saved.

The forward pass is written out here (not `GPT.forward`) because a soft prompt enters as embeddings
and classification needs hidden states, neither of which the LM forward exposes. Batches are padded
on the right, so causal attention never lets a real token see padding and no mask is needed;
packed rows (`decoder_hidden(..., positions, segments)`) get a block-diagonal causal mask and
per-example positions instead, so each example computes exactly what it would alone (tested).
Encoder bodies (BERT) classify from the pooled [CLS] state instead, as BERT does (Devlin et al.
2019, section 4.1; HF `BertForSequenceClassification`): rows are `[CLS] text [SEP] [PAD]...`, the
encoder sees a key-padding mask built from the lengths, and the body's own pooler (dense + tanh,
pretrained by NSP when the run used it) feeds the new head:

    idx (B, T), lengths ─► Bert(idx, pad_mask) ─► h[:, 0] ─► tanh(pooler) ─► head ─► (B, n_labels)

ELECTRA bodies (`models.bert.ElectraDiscriminator`: the discriminator, generator dropped) pool [CLS]
through a new `ElectraClassificationHead` instead (HF's, as the paper fine-tunes: dropout, dense, GELU,
dropout, projection). ELECTRA pretrains no pooler (BERT's pooler is NSP's), so the dense layer is as new
as the projection; as part of the task head it trains and is saved in every mode (under BERT's path it
would be a frozen random projection with --adapt head or lora):

    idx (B, T), lengths ─► ElectraDiscriminator(idx, pad_mask) ─► h[:, 0] ─► dense, GELU, out_proj ─► (B, n_labels)

Encoder bodies take classification only (no soft prompt, no LM tasks): `Adapted` refuses the rest.

Modes (`set_trainable`): `full` trains everything; `head` only the task head (classification) or the
final norm and an untied output head (LM tasks); `lora` the adapters (and a classification head);
`prompt` the soft prompt (and a classification head). Everything else has `requires_grad=False`, so
the optimizer never sees it and its bits stay exactly as loaded.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.adapt.lora import LORA_KEYS
from lmforge.adapt.prompt_tuning import SoftPrompt
from lmforge.errors import ConfigError
from lmforge.models.layers import gelu

ADAPT_MODES = ("full", "head", "lora", "prompt")


class Adapted(nn.Module):
    """A decoder body with an optional soft prompt and an optional classification head."""

    def __init__(
        self, body: nn.Module, *, prompt: SoftPrompt | None = None, n_labels: int = 0, head_bias: bool = False
    ) -> None:
        super().__init__()
        family = getattr(body.cfg, "family", "gpt")
        if family not in ("gpt", "bert", "electra"):
            raise ConfigError(f"fine-tuning {family} models is not supported; use a GPT, BERT or ELECTRA base")
        if family == "electra" and body.__class__.__name__ != "ElectraDiscriminator":
            raise ValueError("an ELECTRA body is its discriminator: pass ElectraDiscriminator(electra)")
        self.encoder = family in ("bert", "electra")
        if self.encoder and (prompt is not None or not n_labels):
            raise ConfigError(f"a {family.upper()} base fine-tunes for --task classify with --adapt full, head or lora")
        self.body = body
        self.prompt = prompt
        self.head: nn.Module | None = None
        if n_labels and family == "electra":
            self.head = ElectraClassificationHead(body.cfg.d_model, n_labels, body.cfg.dropout)
        elif n_labels:  # BERT's classifier has a bias (HF's has one too); a decoder's has none unless an old run's
            self.head = nn.Linear(body.cfg.d_model, n_labels, bias=self.encoder or head_bias)
        if self.head is not None:
            self.head.to(next(body.parameters()).device)
            for m in self.head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=body.cfg.init_std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    @property
    def n_prompt(self) -> int:
        return 0 if self.prompt is None else self.prompt.weight.shape[0]

    @property
    def cfg(self) -> Any:
        """The body's config with the context the text gets (max_seq_len minus the soft prompt)."""
        return replace(self.body.cfg, max_seq_len=self.body.cfg.max_seq_len - self.n_prompt)

    def hidden(self, idx: Tensor) -> Tensor:
        """Final-normed hidden states (B, P + T, C) over [soft prompt; idx]."""
        return decoder_hidden(self.body, idx, prompt=self.prompt)

    def forward(self, idx: Tensor, cache: Any = None) -> Tensor:
        """Next-token logits (B, T, V) for the text positions (the soft prompt's are dropped)."""
        if cache is not None:
            raise ValueError("an adapted model decodes without a KV cache; pass use_cache=False")
        if self.prompt is None:
            return self.body(idx)
        return output_head(self.body, self.hidden(idx)[:, self.n_prompt :])  # (B, T, V)

    def classify(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """Label scores (B, n_labels): the last real token's hidden state (decoder) or pooled [CLS] (encoder)."""
        if self.encoder:
            pad_mask = torch.arange(idx.shape[1], device=idx.device)[None, :] < lengths[:, None]  # (B, T)
            h = self.body(idx, pad_mask=pad_mask)  # (B, T, C)
            if isinstance(self.head, ElectraClassificationHead):
                return self.head(h[:, 0])  # [CLS] -> (B, n_labels)
            return self.head(torch.tanh(self.body.pooler(h[:, 0])))  # [CLS] -> (B, n_labels)
        h = self.hidden(idx)  # (B, P + T, C)
        last = self.n_prompt + lengths - 1  # (B,)
        pooled = h[torch.arange(idx.shape[0], device=idx.device), last]  # (B, C)
        return self.head(pooled)


class ElectraClassificationHead(nn.Module):
    """HF's `ElectraClassificationHead` on the [CLS] state: dropout, dense, GELU, dropout, out_proj."""

    def __init__(self, d_model: int, n_labels: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, n_labels)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.out_proj(self.drop(gelu(self.dense(self.drop(h)))))  # (B, C) -> (B, n_labels)


def decoder_hidden(
    gpt: nn.Module,
    idx: Tensor,
    *,
    prompt: SoftPrompt | None = None,
    positions: Tensor | None = None,
    segments: Tensor | None = None,
) -> Tensor:
    """Final-normed hidden states of a GPT body: (B, T) ids -> (B, P + T, C).

    Args:
        prompt: soft prompt prepended as embeddings (P rows).
        positions: (B, T) position of each token within its own example (packed rows); None = 0..T-1.
        segments: (B, T) example index of each token (packed rows): attention stays inside a segment.
    """
    x = gpt.tok_emb(idx)  # (B, T, C)
    if prompt is not None:
        x = prompt.prepend(x)  # (B, P + T, C)
    T = x.shape[1]
    if T > gpt.cfg.max_seq_len:
        raise ValueError(f"sequence of {T} tokens exceeds the model's max_seq_len {gpt.cfg.max_seq_len}")
    rope = None
    if gpt.pos_emb is not None:
        # packed rows restart positions per example, so a packed example sees what it would alone
        x = x + (gpt.pos_emb.weight[:T] if positions is None else gpt.pos_emb(positions))
    else:
        # rotary attention depends only on q/k offsets, so inside a segment 0..T-1 equals a restart
        rope = gpt.rope_tables(0, T)
    mask = None
    if segments is not None:  # block-diagonal causal mask: no attention across packed examples
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        mask = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T)
        mask = mask[:, None]  # (B, 1, T, T): broadcast over heads
    x = gpt.drop(x)
    for block in gpt.blocks:
        x = block(x, rope, mask, None)  # (B, P + T, C)
    return gpt.norm_f(x)


def output_head(gpt: nn.Module, h: Tensor) -> Tensor:
    """Vocabulary logits of hidden states (tied table or lm_head)."""
    return F.linear(h, gpt.tok_emb.weight) if gpt.lm_head is None else gpt.lm_head(h)


def packed_logits(model: nn.Module, idx: Tensor, positions: Tensor, segments: Tensor) -> Tensor:
    """LM logits (B, T, V) of packed rows, for a GPT or an `Adapted` without soft prompt."""
    body = model.body if isinstance(model, Adapted) else model
    return output_head(body, decoder_hidden(body, idx, positions=positions, segments=segments))


def set_trainable(model: nn.Module, mode: str) -> None:
    """Freeze everything, then unfreeze what `mode` trains (see the module docstring)."""
    if mode not in ADAPT_MODES:
        raise ConfigError(f"unknown adapt mode {mode!r}; choose one of {', '.join(ADAPT_MODES)}")
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or _trains(name, mode, model))


def _trains(name: str, mode: str, model: nn.Module) -> bool:
    if name.startswith("head."):  # a new task head always trains
        return True
    if mode == "lora":
        return name.rsplit(".", 1)[-1] in LORA_KEYS
    if mode == "prompt":
        return name.startswith("prompt.")
    # head-only on an LM: the final norm and an untied output head (a tied one is the input table too)
    body = "body." if isinstance(model, Adapted) else ""
    has_head = isinstance(model, Adapted) and model.head is not None
    return not has_head and (name.startswith(f"{body}norm_f.") or name.startswith(f"{body}lm_head."))


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), a tied matrix counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@torch.no_grad()
def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors an adapter-only checkpoint holds: every trainable parameter, by state-dict name."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in model.state_dict().items() if k in names}
