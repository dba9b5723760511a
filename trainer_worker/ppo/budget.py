"""Keeping a cycle's candidate within the KL budget to the frozen base.

Each cycle starts PPO from the active policy while the KL is measured to the base, so KL spent in
earlier cycles counts. Two parts: the KL coefficient follows ``kl_budget_controller`` (Ziegler's
controller aimed below the budget, its coefficient carried from cycle to cycle), and ``KLGuard``
keeps the newest weights whose rollouts stayed within the limit, going back to them when a later
rollout shows the policy past it. The coefficient alone cannot promise the limit in a few steps:
with whitened advantages and Adam, an update's size does not shrink with the reward's scale, so
noise moves the policy away from the base whatever the penalty (measured on the tiny model: a
coefficient grown to 190 still ended 30% over a 2-nat budget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from trainer_worker.ppo.core import kl_penalty
from trainer_worker.ppo.rollout import answer_logprobs, make_rollout


class KLGuard:
    """The newest policy weights whose rollouts' mean KL to the base stayed within ``limit``."""

    def __init__(self, policy: nn.Module, limit: float) -> None:
        self.policy = policy
        self.limit = limit
        self.saved: dict[str, Tensor] | None = None
        self.saved_kl = math.nan
        self.current_kl = math.nan  # measured KL of the weights the policy holds now
        self.restored = False

    def admit(self, kl: float) -> bool:
        """Keep the current weights, whose rollout showed ``kl`` nats; False when they are past
        the limit while earlier ones were not (those are restored: stop training).

        A policy that was never within the limit (an active policy from an older, looser budget)
        keeps training: the KL penalty pulls it back.
        """
        if math.isfinite(kl) and kl <= self.limit:
            self.saved = {name: p.detach().to("cpu", copy=True)
                          for name, p in self.policy.named_parameters() if p.requires_grad}
            self.saved_kl = self.current_kl = kl
            return True
        if self.saved is None:
            self.current_kl = kl
            return True
        params = dict(self.policy.named_parameters())
        with torch.no_grad():
            for name, value in self.saved.items():
                params[name].copy_(value)
        self.restored = True
        self.current_kl = self.saved_kl
        return False

    def metrics(self) -> dict[str, float]:
        out = {"ppo/kl_limit": self.limit, "ppo/kl_restored": float(self.restored)}
        if math.isfinite(self.current_kl):
            out["ppo/kl_ref_final"] = self.current_kl
        return out


@torch.no_grad()
def rollout_kl(policy: nn.Module, ref: nn.Module, prompts: Sequence[Sequence[int]], *,
               max_new_tokens: int, temperature: float, eos_token_ids: Sequence[int],
               pad_token_id: int, device: str, generator: torch.Generator) -> float:
    """Mean over sampled answers of the summed k1 log-ratio to the reference (as ``ppo/kl_ref``)."""
    rollout = make_rollout(policy, prompts, max_new_tokens=max_new_tokens,
                           temperature=temperature, eos_token_ids=eos_token_ids,
                           pad_token_id=pad_token_id, device=device, generator=generator)
    logprobs = answer_logprobs(policy, rollout, temperature)  # (B, A)
    ref_logprobs = answer_logprobs(ref, rollout, temperature)  # (B, A)
    kl = kl_penalty(logprobs, ref_logprobs, "k1") * rollout.answer_mask  # (B, A)
    return kl.sum(-1).mean().item()
