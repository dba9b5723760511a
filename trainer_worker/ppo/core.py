"""PPO maths for language models as pure tensor functions.

Shapes: ``B`` sequences, ``T`` answer tokens, ``V`` vocabulary. ``mask`` is 1 on real answer
tokens (up to and including the first EOS) and 0 on padding. References:
cleanrl ``ppo.py`` (GAE, clipped losses), TRL ``trl/trainer/utils.py`` (masked statistics),
OAI lm-human-preferences ``train_policy.py`` (per-token KL reward, KL controllers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
ReduceSum = Callable[[Tensor], Tensor]  # elementwise sum of a 1-D tensor over all processes


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is set (TRL ``masked_mean``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` where ``mask`` is set, Bessel-corrected (TRL ``masked_var``)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def reduced_masked_mean_var(values: Tensor, mask: Tensor,
                            reduce_sum: ReduceSum) -> tuple[Tensor, Tensor]:
    """``masked_mean`` and ``masked_var`` of the union of every process's entries.

    Sums and counts are reduced, never the per-process means, so unequal token counts weigh
    right (TRL ``masked_whiten`` computed on the gathered batch gives the same numbers).
    """
    mask = mask.to(values.dtype)
    total, count = reduce_sum(torch.stack([(values * mask).sum(), mask.sum()]))
    mean = total / count.clamp(min=1.0)
    squares = reduce_sum((((values - mean) ** 2) * mask).sum().reshape(1))[0]
    variance = squares / count.clamp(min=1.0)
    if count > 1:
        variance = variance * count / (count - 1)
    return mean, variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True,
                  reduce_sum: ReduceSum | None = None) -> Tensor:
    """Normalise to unit variance (and zero mean) over masked entries (TRL ``masked_whiten``).

    With ``reduce_sum`` the statistics are those of the entries of all processes together.
    """
    if reduce_sum is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        mean, var = reduced_masked_mean_var(values, mask, reduce_sum)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label: (B, T, V), (B, T) -> (B, T) (TRL ``logprobs_from_logits``)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of each categorical: (B, T, V) -> (B, T) (TRL ``entropy_from_logits``)."""
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)  # (B, T)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLEstimator = "k1") -> Tensor:
    """Per-token KL estimate from sampled-token logprobs (Schulman, "Approximating KL divergence").

    k1 = log r (unbiased, OAI/TRL), k2 = (log r)^2 / 2, k3 = (r' - 1) - log r' with r' = 1/r
    (unbiased, always >= 0). All (B, T) -> (B, T).
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}")


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    has_eos: Tensor,
    kl_coef: float,
    missing_eos_penalty: float = 0.0,
    kl_kind: KLEstimator = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: ``-kl_coef * KL`` everywhere, the RM score added at the last real token.

    Answers that never emitted EOS lose ``missing_eos_penalty`` from their score (OAI
    ``penalty_reward_value``, TRL ``missing_eos_penalty``). Reference: OAI ``compute_rewards``.
    Returns ``rewards`` (B, T) and the per-token ``kl`` (B, T), both zero on padding.
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, kl_kind) * mask  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    scores = scores - missing_eos_penalty * (~has_eos.bool()).to(scores.dtype)  # (B,)
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last = (positions * mask.long()).argmax(-1)  # (B,) index of the last real token
    has_tokens = mask.sum(-1) > 0  # (B,)
    bonus = torch.where(has_tokens, scores, torch.zeros_like(scores))  # (B,)
    rewards = rewards.scatter_add(1, last.unsqueeze(-1), bonus.unsqueeze(-1))
    return rewards, kl


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the masked tokens of each row (cleanrl ``ppo.py``).

    Padding is skipped: the "next" value of a token is the value of the next real token, and the
    value after the last real token is 0 (the episode ends). Returns (advantages, returns), (B, T).
    """
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    advantages = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * next_advantage  # (B,)
        real = mask[:, t] > 0
        next_value = torch.where(real, values[:, t], next_value)
        next_advantage = torch.where(real, advantage, next_advantage)
        advantages[:, t] = advantage * mask[:, t]
    returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate objective (cleanrl ``ppo.py``). Returns (loss, clipfrac, approx_kl).

    ``weights`` (B, T), when given, multiply each token's clipped loss before the mean: the
    truncated importance weights of rollouts sampled by another engine (``truncated_is_weights``;
    veRL and OpenRLHF apply them at the same place). ``approx_kl`` is the k3 estimate
    ``(r - 1) - log r`` of KL(old || new) (cleanrl).
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    loss_unclipped = -advantages * ratio  # (B, T)
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    per_token = torch.max(loss_unclipped, loss_clipped)  # (B, T)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def truncated_is_weights(
    logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance sampling (TIS) weights for rollouts sampled by another engine.

    ``w = min(exp(logprobs - rollout_logprobs), cap)`` per token, where ``logprobs`` are the
    trainer's (the PPO "old" policy) and ``rollout_logprobs`` the sampler's (vLLM, often in
    bf16): the weight corrects the policy gradient for sampling from a slightly different
    distribution, and the cap bounds its variance (Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"; veRL ``tis_imp_ratio_cap``, OpenRLHF
    ``vllm_is_truncated_threshold``). Returns the weights (B, T), detached and 0 on padding,
    and stats: the mean ratio, the share of tokens the cap clipped and the largest
    |log ratio| (a stale or mismatched sampler shows there first).
    """
    with torch.no_grad():
        log_ratio = (logprobs - rollout_logprobs).float()  # (B, T)
        ratio = torch.exp(log_ratio)  # (B, T)
        weights = torch.clamp(ratio, max=cap) * mask.to(ratio.dtype)  # (B, T)
        real = mask.bool()
        stats = {
            "ppo/tis_ratio_mean": masked_mean(ratio, mask).item(),
            "ppo/tis_clipped_share": masked_mean((ratio > cap).float(), mask).item(),
            "ppo/tis_log_ratio_max": log_ratio[real].abs().max().item() if real.any() else 0.0,
        }
    return weights, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss ``0.5 * max((v - R)^2, (clip(v) - R)^2)`` (cleanrl, TRL).

    Returns (loss, clipfrac) where clipfrac is the share of tokens where clipping bound.
    """
    values_clipped = old_values + torch.clamp(
        values - old_values, -cliprange_value, cliprange_value
    )  # (B, T)
    loss_unclipped = (values - returns) ** 2  # (B, T)
    loss_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clipfrac


class FixedKLController:
    """A constant KL coefficient (OAI ``FixedKLController``)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Proportional controller driving the sequence KL to ``target`` (Ziegler et al. 2019).

    ``error = clip(KL / target - 1, min_error, max_error)``; ``coef *= 1 + error * n_steps /
    horizon`` (OAI ``AdaptiveKLController``: errors clipped to +-0.2, no floor).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int, *,
                 min_error: float = -0.2, max_error: float = 0.2,
                 min_value: float = 0.0) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon
        self.min_error, self.max_error, self.min_value = min_error, max_error, min_value

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, self.min_error), self.max_error)
        self.value = max(self.value * (1.0 + error * n_steps / self.horizon), self.min_value)


MIN_KL_COEF = 1e-4  # the budget controller never lets the penalty vanish entirely


def kl_budget_controller(kl_budget: float, init_kl_coef: float, batch_size: int, *,
                         headroom: float = 0.8) -> AdaptiveKLController:
    """Ziegler's controller aimed at ``headroom * kl_budget`` nats per answer to the frozen base.

    Each cycle starts PPO from the active policy, whose KL to the base is already spent, so the
    rollouts' KL to the base is what counts against the budget. The horizon is one rollout batch
    and the error is clipped to [-0.5, 1]: the coefficient doubles in a step when the KL is twice
    the target, so it acts within a cycle's few steps (with OAI's horizon of 10,000 episodes it
    moves about 1% per cycle). Passing the last cycle's final coefficient as ``init_kl_coef``
    keeps the controller's state across cycles, as OAI keeps it across one long run.
    """
    if kl_budget <= 0:
        raise ValueError("kl_budget must be positive")
    return AdaptiveKLController(max(init_kl_coef, MIN_KL_COEF), headroom * kl_budget,
                                batch_size, min_error=-0.5, max_error=1.0, min_value=MIN_KL_COEF)
