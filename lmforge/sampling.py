"""Sampling rules: how the next token is picked from a step's logits, and the penalties applied before.

- `sample_next(logits, ...)`: one sampling step for a batch of logits: greedy (temperature 0),
  temperature, top-k, top-p (nucleus) and min-p filtering, drawn from a caller's `torch.Generator`.
- `Penalties`: discouraging repeats, applied to the logits before sampling (greedy included): OpenAI's
  presence and frequency penalties over the tokens generated so far, and the CTRL / transformers
  repetition penalty over prompt and output.
- `check_sampling`, `check_seed`, `check_max_new_tokens`: the settings' ranges, checked once per call (by
  `generate`, `chat`, `serve`) rather than every token.

Split out of `generate.py` (the decode loops, which call `sample_unchecked` on each step's logits) because the rules are
pure functions of the logits and change on their own: a new filter touches only this file.

References:
- repetition penalty: Keskar et al. 2019 (CTRL), https://arxiv.org/abs/1909.05858, section 4.1
- presence / frequency penalties: OpenAI's API reference ("mu[j] -> mu[j] - c[j] * alpha_frequency -
  float(c[j] > 0) * alpha_presence", c[j] the times token j was sampled before the current position)
- top-p / nucleus sampling: Holtzman et al. 2019, https://arxiv.org/abs/1904.09751
- top-k sampling: Fan et al. 2018, https://arxiv.org/abs/1805.04833
- min-p sampling: Nguyen et al. 2024, https://arxiv.org/abs/2407.01082
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.errors import LmforgeError


def check_seed(seed: int | None) -> None:
    """A seed torch's generators take: None, or an int in [0, 2**63)."""
    if seed is not None and not 0 <= seed < 2**63:
        raise LmforgeError(f"seed must be in [0, 2**63), got {seed}")


def sampling_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A private generator on `device`: seeded (reproducible) or from OS entropy; the global RNG is untouched."""
    check_seed(seed)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def check_max_new_tokens(max_new_tokens: int) -> None:
    """`--max-new-tokens` of `generate` and `chat`: at least 1, as OpenAI's `max_tokens` (serve's own check names
    its field). 0 generated nothing: `generate` printed the prompt back and exited 0, while chat refused it."""
    if max_new_tokens < 1:
        raise LmforgeError(f"--max-new-tokens must be >= 1 (tokens to generate), got {max_new_tokens}")


def check_sampling(temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> None:
    """Raise an LmforgeError naming the first sampling setting out of range."""
    if not 0 <= temperature < math.inf:
        raise LmforgeError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k < -1:  # -1 is vLLM's off (serve's `top_k`), 0 transformers' and ours: both mean off everywhere
        raise LmforgeError(f"top_k must be >= 1, or 0 or -1 for off, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise LmforgeError(f"top_p must be in [0, 1] (1 = off, 0 = only the most likely token), got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise LmforgeError(f"min_p must be in [0, 1] (0 = off; 0.05-0.1 is typical), got {min_p}")


@dataclass(frozen=True)
class Penalties:
    """Penalties on tokens already seen, subtracted from (or dividing) the logits before sampling.

    presence, frequency: OpenAI's, each in [-2, 2] (0 = off): token j's logit loses
        frequency * c[j] + presence * (c[j] > 0), c[j] = how often j was generated so far (not the prompt).
    repetition: transformers' `repetition_penalty` (CTRL), > 0 (1 = off): a token anywhere in the prompt or
        the output has its logit divided by it when positive and multiplied by it when negative.
    bias: OpenAI's `logit_bias`, ((token id, -100..100), ...) added to those tokens' logits last (-100 bans
        a token, 100 all but forces it).
    """

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("presence", "frequency"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise LmforgeError(f"{name} penalty must be in [-2, 2] (0 = off), got {value}")
        if not 0.0 < self.repetition < math.inf:
            raise LmforgeError(f"repetition penalty must be > 0 (1 = off; 1.1-1.3 is typical), got {self.repetition}")
        for token, value in self.bias:
            if not -100 <= value <= 100:
                raise LmforgeError(f"logit bias of token {token} must be in [-100, 100], got {value}")

    @property
    def off(self) -> bool:
        return self.presence == 0 and self.frequency == 0 and self.repetition == 1 and not self.bias

    def apply(self, logits: Tensor, counts: Tensor, seen: Tensor) -> Tensor:
        """(B, V) logits -> penalised float32 logits; `counts`: times generated, `seen` bool: in the prompt or
        generated, both (V,) for every row or (B, V) per row."""
        out = logits.to(torch.float32, copy=True)  # (the caller's logits stay as they were)
        if self.repetition != 1:
            # clamped to float32's finite range: a penalty like 1e-300 (or 1e300) overflowed the scores to
            # +-inf, and sampling then died on NaN probabilities ("probability tensor contains inf, nan")
            big = torch.finfo(torch.float32).max
            hit = torch.where(out > 0, out / self.repetition, out * self.repetition).clamp(-big, big)
            out = torch.where(seen, hit, out)
        if self.frequency or self.presence:
            out = out - (self.frequency * counts + self.presence * (counts > 0).float())
        for token, value in self.bias:
            out[:, token] += value
        return out


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token for each row of logits.

    Args:
        logits: (B, V) unnormalized scores (any float dtype; computed in float32).
        temperature: divides the logits; 0 means greedy (argmax, no randomness).
        top_k: keep only the k highest-scoring tokens (0 or -1 = no limit).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p
            (1 = no limit); the most likely token is always kept (0 = it alone, as OpenAI's API reads 0).
        min_p: keep only the tokens whose probability is at least min_p times the most likely token's
            (0 = no limit), after temperature, top-k and top-p, as transformers' `MinPLogitsWarper` does.
        generator: source of randomness (must live on logits' device); None = the global RNG.

    Returns:
        (B,) int64 token ids.
    """
    check_sampling(temperature, top_k, top_p, min_p)
    return sample_unchecked(logits, temperature, top_k, top_p, min_p, generator)


def sample_unchecked(
    logits: Tensor, temperature: float, top_k: int, top_p: float, min_p: float, generator: torch.Generator | None
) -> Tensor:
    """`sample_next` without the argument checks (the decode loops check once, not every token)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p, min_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def sampling_probs(logits: Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> Tensor:
    """(B, V) logits -> the (B, V) float32 distribution `sample_next` draws from at a temperature > 0."""
    scaled = logits.float() / temperature  # (B, V)
    if bool(torch.isinf(scaled).any()):
        # a tiny temperature overflowed the scores to inf (softmax would give NaN): divide the distances
        # to each row's best score instead (the same distribution, as softmax ignores a shift)
        logits = logits.float()
        scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    logits = scaled
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest score
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p; the first always stays (top_p 0: alone)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    if min_p > 0:
        # min-p (Nguyen et al. 2024): a cut that scales with the model's confidence; the most likely token
        # always stays, its probability being >= min_p x itself
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
