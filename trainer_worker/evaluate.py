"""The publication gate's measurements: RM score and KL to the base of a policy's answers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from flywheel.hf_progress import transformers_bars
from trainer_worker.ppo.core import kl_penalty
from trainer_worker.ppo.policy import (
    filler_token_id,
    fit_prompts,
    load_causal_lm,
    resolve_eos_token_ids,
)
from trainer_worker.ppo.rollout import answer_logprobs, answer_scores, make_rollout
from trainer_worker.reward.model import RewardModel


@torch.no_grad()
def evaluate_policy(
    policy_dir: Path, ref_dir: Path, reward_dir: Path, prompts: Sequence[Sequence[int]], *,
    max_new_tokens: int, device: str = "cpu", seed: int = 0, samples_per_prompt: int = 1,
    temperature: float = 1.0, batch_size: int = 32, eos_token_ids: list[int] | None = None,
) -> dict[str, float]:
    """Sample answers to ``prompts`` and measure them.

    Returns ``eval/score_mean`` (normalised RM score: 0 is the mean of the RM's training
    answers), ``eval/kl_ref`` (mean over answers of the summed k1 log-ratio to the reference),
    ``eval/length_mean`` (tokens, EOS included) and ``eval/eos_rate``. The same ``seed`` gives
    the same sampling noise, so two policies are compared on equal terms.
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
    return {
        "eval/score_mean": torch.cat(scores).mean().item(),
        "eval/kl_ref": torch.cat(kls).mean().item(),
        "eval/length_mean": torch.cat(lengths).mean().item(),
        "eval/eos_rate": torch.cat(stops).mean().item(),
        "eval/samples": float(len(queue)),
    }
