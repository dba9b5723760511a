"""The release gate's measurements: RM score, KL to the base, length and EOS rate of a policy's
answers, and the paired comparison of a candidate with the active policy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flywheel.approval import Z95
from flywheel.hf_progress import transformers_bars
from flywheel.settings import TrainSettings
from trainer_worker.ppo.causal_lm import (
    filler_token_id,
    fit_prompts,
    load_causal_lm,
    resolve_eos_token_ids,
)
from trainer_worker.ppo.core import kl_penalty
from trainer_worker.ppo.rollout import answer_logprobs, answer_scores, make_rollout
from trainer_worker.reward.model import RewardModel


@dataclass(frozen=True)
class PolicySamples:
    """Per-answer measurements of one policy's answers, in the order of the prompt queue."""

    scores: Tensor  # (N,) normalised RM score: 0 is the mean of the RM's training answers
    kl_ref: Tensor  # (N,) summed k1 log-ratio to the reference over the answer
    lengths: Tensor  # (N,) answer tokens, EOS included
    has_eos: Tensor  # (N,) 1.0 when the answer stopped by itself

    def summary(self) -> dict[str, float]:
        return {
            "eval/score_mean": self.scores.mean().item(),
            "eval/kl_ref": self.kl_ref.mean().item(),
            "eval/length_mean": self.lengths.mean().item(),
            "eval/eos_rate": self.has_eos.mean().item(),
            "eval/samples": float(self.scores.numel()),
        }


@torch.no_grad()
def sample_policy(
    policy_dir: Path, ref_dir: Path, reward_dir: Path, prompts: Sequence[Sequence[int]], *,
    max_new_tokens: int, device: str = "cpu", seed: int = 0, samples_per_prompt: int = 1,
    temperature: float = 1.0, batch_size: int = 32, eos_token_ids: list[int] | None = None,
) -> PolicySamples:
    """Sample ``samples_per_prompt`` answers to each prompt and measure every answer.

    Answer ``i`` answers the same prompt for every policy, and the same ``seed`` gives the same
    sampling noise, so two policies' answers can be compared pair by pair.
    """
    eos = resolve_eos_token_ids(Path(policy_dir), eos_token_ids)
    with transformers_bars(False):
        policy = load_causal_lm(Path(policy_dir), device)
        ref = load_causal_lm(Path(ref_dir), device)
        reward = RewardModel.from_pretrained(Path(reward_dir), device=device)
    pad = filler_token_id(ref, eos)
    generator = torch.Generator(device=device).manual_seed(seed)
    fitted = fit_prompts(prompts, ref, max_new_tokens)
    queue = [p for p in fitted for _ in range(samples_per_prompt)]
    scores, kls, lengths, stops = [], [], [], []
    for start in range(0, len(queue), batch_size):
        rollout = make_rollout(
            policy, queue[start : start + batch_size], max_new_tokens=max_new_tokens,
            temperature=temperature, eos_token_ids=eos, pad_token_id=pad, device=device,
            generator=generator,
        )
        logp_temperature = temperature if temperature > 0 else 1.0
        logprobs = answer_logprobs(policy, rollout, logp_temperature)  # (b, A)
        ref_logprobs = answer_logprobs(ref, rollout, logp_temperature)  # (b, A)
        kl = kl_penalty(logprobs, ref_logprobs, "k1") * rollout.answer_mask  # (b, A)
        scores.append(answer_scores(reward, rollout).cpu())
        kls.append(kl.sum(-1).cpu())
        lengths.append(rollout.answer_mask.sum(-1).float().cpu())
        stops.append(rollout.has_eos.float().cpu())
    return PolicySamples(torch.cat(scores), torch.cat(kls), torch.cat(lengths), torch.cat(stops))


def evaluate_policy(
    policy_dir: Path, ref_dir: Path, reward_dir: Path, prompts: Sequence[Sequence[int]],
    **kwargs: Any,
) -> dict[str, float]:
    """Means of ``sample_policy``: ``eval/score_mean``, ``eval/kl_ref``, ``eval/length_mean``,
    ``eval/eos_rate`` and ``eval/samples``."""
    return sample_policy(policy_dir, ref_dir, reward_dir, prompts, **kwargs).summary()


def paired_interval(diffs: Tensor, z: float = Z95) -> tuple[float, float, float]:
    """Mean of paired differences and its normal 95% interval ``mean +- z * sd / sqrt(n)``.

    Needs two or more pairs. The normal quantile is used: the gate compares 100+ pairs, where
    Student's t quantile differs from it in the second decimal.
    """
    n = diffs.numel()
    if n < 2:
        raise ValueError("a paired interval needs at least two pairs")
    mean = diffs.double().mean().item()
    half = z * diffs.double().std().item() / math.sqrt(n)
    return mean, mean - half, mean + half


def compare_policies(candidate: PolicySamples, active: PolicySamples) -> dict[str, float]:
    """The gate's measurements: paired score gain with its interval, drift, both summaries."""
    if candidate.scores.shape != active.scores.shape:
        raise ValueError("the two policies answered different numbers of prompts")
    gain, low, high = paired_interval(candidate.scores - active.scores)
    new, old = candidate.summary(), active.summary()
    return {
        **{f"gate/candidate_{k.split('/')[-1]}": v for k, v in new.items()},
        **{f"gate/active_{k.split('/')[-1]}": v for k, v in old.items()},
        "gate/samples": float(candidate.scores.numel()),
        "gate/score_gain": gain,
        "gate/score_gain_low": low,
        "gate/score_gain_high": high,
        "gate/length_drift": (new["eval/length_mean"] - old["eval/length_mean"])
        / max(old["eval/length_mean"], 1e-9),
        "gate/eos_drift": new["eval/eos_rate"] - old["eval/eos_rate"],
    }


def gate_reasons(metrics: dict[str, float], train: TrainSettings) -> list[str]:
    """What keeps a candidate from release, as short sentences; empty when it passes."""
    reasons = []
    if not metrics["gate/score_gain_low"] > train.min_improvement:
        reasons.append(f"score gain not shown: 95% lower bound {metrics['gate/score_gain_low']:.3f}"
                       f" <= {train.min_improvement:g}")
    if not metrics["gate/candidate_kl_ref"] <= train.kl_budget:
        reasons.append(f"KL to the base {metrics['gate/candidate_kl_ref']:.2f} > budget "
                       f"{train.kl_budget:g}")
    if not abs(metrics["gate/length_drift"]) <= train.max_length_drift:
        reasons.append(f"answer length drift {metrics['gate/length_drift']:+.0%} beyond "
                       f"{train.max_length_drift:.0%}")
    if not abs(metrics["gate/eos_drift"]) <= train.max_eos_drift:
        reasons.append(f"EOS rate drift {metrics['gate/eos_drift']:+.2f} beyond "
                       f"{train.max_eos_drift:g}")
    return reasons
