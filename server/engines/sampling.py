"""Per-row sampling for a decode batch: temperature, top-p, seeds and logprobs in one pass.

Every row draws its own uniform number (from its own seeded generator when the request has a
seed) and picks its token by inverse-CDF lookup, so a seeded request samples the same tokens
whatever else shares the batch, while the tensor work stays batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Reported in place of -inf for alternatives outside the top-p nucleus (vLLM does the same):
# JSON has no infinity.
MASKED_LOGPROB = -9999.0
# Temperatures below this are greedy, as vLLM's `_SAMPLING_EPS`: dividing logits by 1e-40 gives
# inf, and log_softmax of inf is NaN.
SAMPLING_EPS = 1e-5
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads the seeds of the n choices
_SEED_MASK = (1 << 63) - 1


def choice_generator(seed: int | None, index: int) -> torch.Generator | None:
    """A CPU generator for choice ``index`` of a seeded request; None for unseeded requests."""
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed((seed + index * _SEED_MIX) & _SEED_MASK)
    return generator


@dataclass(frozen=True)
class RowParams:
    """What the sampler needs to know about one row."""

    temperature: float
    top_p: float
    top_logprobs: int
    generator: torch.Generator | None


@dataclass
class Sampled:
    """Host-side result of one sampling step: one entry per row."""

    tokens: list[int]
    logprobs: list[float]
    device_tokens: torch.Tensor  # (B,) the same ids, left on the model's device for the next step
    top_ids: list[list[int]] | None = None  # (B, k) alternatives, best first
    top_logprobs: list[list[float]] | None = None


class RowSampler:
    """Sampling settings of a batch as device tensors; rebuilt when the batch's rows change."""

    def __init__(self, rows: Sequence[RowParams], device: torch.device) -> None:
        greedy = [r.temperature < SAMPLING_EPS for r in rows]
        self.size = len(rows)
        self.all_greedy = all(greedy)
        self.any_greedy = any(greedy)
        self.any_top_p = any(r.top_p < 1.0 and not g for r, g in zip(rows, greedy, strict=True))
        self.max_top_logprobs = max((r.top_logprobs for r in rows), default=0)
        temps = [1.0 if g else r.temperature for r, g in zip(rows, greedy, strict=True)]
        top_ps = [1.0 if g else r.top_p for r, g in zip(rows, greedy, strict=True)]
        self.temperature = torch.tensor(temps, dtype=torch.float32, device=device)[:, None]
        self.top_p = torch.tensor(top_ps, dtype=torch.float32, device=device)[:, None]
        self.greedy = torch.tensor(greedy, dtype=torch.bool, device=device)
        self.seeded = [(i, r.generator) for i, r in enumerate(rows) if r.generator is not None]
        self.device = device

    def uniforms(self, shared: torch.Generator) -> torch.Tensor:
        """One U[0, 1) per row: seeded rows from their own generator, others from ``shared``."""
        u = torch.rand(self.size, generator=shared)
        for i, generator in self.seeded:
            u[i] = torch.rand((), generator=generator)
        return u.to(self.device, non_blocking=True)

    def sample(self, logits: torch.Tensor, shared: torch.Generator) -> Sampled:
        """Pick one token per row from ``logits`` (B, V) and return it with its logprob."""
        logits = logits.float()
        if self.all_greedy:
            logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
            tokens = logprobs.argmax(dim=-1)  # (B,)
        else:
            logprobs = torch.log_softmax(logits / self.temperature, dim=-1)  # (B, V)
            if self.any_top_p:
                logprobs = top_p_filter(logprobs, self.top_p)
            tokens = inverse_cdf_sample(logprobs, self.uniforms(shared))
            if self.any_greedy:  # greedy rows have temperature 1 here: this is the raw argmax
                tokens = torch.where(self.greedy, logprobs.argmax(dim=-1), tokens)
        chosen = finite(logprobs.gather(-1, tokens[:, None])[:, 0])  # (B,)
        # One host transfer for ids and logprobs: ids up to 2**24 are exact in float32.
        host = torch.stack([tokens.float(), chosen]).tolist()
        result = Sampled([int(t) for t in host[0]], host[1], tokens)
        if self.max_top_logprobs > 0:
            k = min(self.max_top_logprobs, logprobs.shape[-1])
            values, ids = logprobs.topk(k, dim=-1)  # (B, k)
            values = finite(values)
            result.top_ids = ids.tolist()
            result.top_logprobs = values.tolist()
        return result


def finite(logprobs: torch.Tensor) -> torch.Tensor:
    """Logprobs fit for JSON: -inf (and NaN, from logits that overflowed) become MASKED_LOGPROB,
    and so does anything below it."""
    return torch.nan_to_num(logprobs, nan=MASKED_LOGPROB, posinf=0.0).clamp(min=MASKED_LOGPROB)


def top_p_filter(logprobs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's nucleus (smallest set of tokens with mass >= top_p) and renormalise.

    A token is dropped when the tokens more probable than it already hold ``top_p`` of the mass,
    the rule of HF's ``TopPLogitsWarper`` and vLLM; the most probable token is always kept.
    """
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_lp.exp()
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V)
    drop = mass_before >= top_p
    drop[:, 0] = False
    drop &= top_p < 1.0  # rows without top-p keep everything despite rounding in the cumsum
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    filtered = torch.empty_like(logprobs).scatter_(-1, order, sorted_lp)
    return filtered - torch.logsumexp(filtered, dim=-1, keepdim=True)


def inverse_cdf_sample(logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token per row whose CDF interval contains ``u`` (B,): the same law as ``multinomial``."""
    cdf = logprobs.exp().cumsum(dim=-1)  # (B, V)
    target = (u * cdf[:, -1])[:, None]  # scale by the total so rounding never runs off the end
    # right=True returns the first token whose CDF exceeds the target, never a zero-mass token.
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0]
    return tokens.clamp_(max=logprobs.shape[-1] - 1)
