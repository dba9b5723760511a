"""One PPO cycle on the policy: rollouts, KL-shaped rewards, GAE, clipped updates, save.

Follows the N+ recipe (Huang et al. 2024, ``ppo_left_padding.py``) and OAI lm-human-preferences:
critic initialised from the reward model, per-token KL to the frozen base, RM score at the last
token, missing-EOS penalty, whitened advantages, ``ppo_epochs`` passes over each rollout batch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flywheel.hf_progress import tqdm, transformers_bars
from flywheel.settings import PPOConfig, Settings
from trainer_worker.ppo.budget import KLGuard, rollout_kl
from trainer_worker.ppo.causal_lm import (
    AdaptersOff,
    add_lora,
    filler_token_id,
    fit_prompts,
    load_causal_lm,
    load_lora_policy,
    resolve_eos_token_ids,
    save_policy,
)
from trainer_worker.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    ReduceSum,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    truncated_is_weights,
    value_loss,
)
from trainer_worker.ppo.defaults import learning_rates
from trainer_worker.ppo.rollout import (
    Rollout,
    answer_logits,
    answer_logprobs,
    answer_scores,
    answer_values,
)
from trainer_worker.ppo.rollout_engines import KeptRollouts, RolloutEngine, open_rollout_engine
from trainer_worker.reward.model import RewardModel
from trainer_worker.stopping import TrainingInterrupted, check_stop

StopFn = Callable[[], bool] | None
KLController = AdaptiveKLController | FixedKLController


@dataclass
class Models:
    policy: nn.Module  # trained
    ref: nn.Module  # frozen base model: the KL anchor
    reward: RewardModel  # frozen
    critic: RewardModel  # trained, initialised from the reward model


@dataclass(frozen=True)
class StepHooks:
    """What changes when the update runs over several processes; the defaults are one process."""

    backward: Callable[[Tensor], None] = Tensor.backward  # ``accelerator.backward`` under DDP
    clip_grad_norm: Callable[..., Tensor] = torch.nn.utils.clip_grad_norm_
    reduce_sum: ReduceSum | None = None  # sum over processes: advantage whitening, early stop


ONE_PROCESS = StepHooks()


def run_ppo(
    policy_dir: Path, ref_dir: Path, reward_dir: Path, prompts: list[list[int]],
    cfg: PPOConfig, out_dir: Path, *, device: str = "cpu", progress: bool = True,
    should_stop: StopFn = None, eos_token_ids: list[int] | None = None,
    kl_ctl: KLController | None = None, kl_limit: float | None = None,
    settings: Settings | None = None, rollouts: RolloutEngine | None = None,
    kept: KeptRollouts | None = None,
) -> dict[str, float]:
    """Run ``cfg.steps`` PPO steps from ``policy_dir`` and write the new policy to ``out_dir``.

    ``kl_ctl`` sets the KL coefficient (default: ``make_kl_controller(cfg)``). With ``kl_limit``
    (nats per answer to the reference) the policy written is the newest one whose rollouts stayed
    within it (``KLGuard``); the training cycle passes both to honour its KL budget.
    Rollouts come from ``cfg.rollout_engine`` (vLLM's engine arguments from ``settings``), or
    from ``rollouts``, an engine the caller opened and closes (synced here before each step).
    With ``kept``, an engine other than the policy itself (vLLM) is taken from it and left open
    for the next run, which syncs it to its own policy first.
    Raises ``TrainingInterrupted`` (writing nothing) when ``should_stop()`` turns true.
    """
    if cfg.temperature <= 0:
        raise ValueError("PPO samples from the policy: temperature must be > 0")
    eos = resolve_eos_token_ids(Path(policy_dir), eos_token_ids)
    with transformers_bars(progress):
        models = load_models(Path(policy_dir), Path(ref_dir), Path(reward_dir), cfg, device)
    pad = filler_token_id(models.ref, eos)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    def open_engine() -> RolloutEngine:
        return open_rollout_engine(cfg, settings, Path(policy_dir), models.policy,
                                   eos_token_ids=eos, pad_token_id=pad, device=device,
                                   generator=sample_gen)

    keep = kept if rollouts is None and cfg.rollout_engine != "hf" else None
    t0 = time.perf_counter()
    engine = rollouts or (keep.take(open_engine) if keep is not None else open_engine())
    start_seconds = time.perf_counter() - t0
    owned = rollouts is None and keep is None
    try:
        metrics = _train(models, engine, prompts, cfg, eos=eos, pad=pad, device=device,
                         generator=sample_gen, progress=progress, should_stop=should_stop,
                         kl_ctl=kl_ctl or make_kl_controller(cfg), kl_limit=kl_limit,
                         synced=owned)
    except TrainingInterrupted:
        raise
    except BaseException:
        if keep is not None:
            keep.discard()
        raise
    finally:
        if owned:
            engine.close()
    check_stop(should_stop)
    with transformers_bars(progress):
        save_policy(models.policy, Path(policy_dir), Path(out_dir), cfg.use_lora)
    return metrics | {"ppo/rollout_engine_start_seconds": start_seconds}


def _train(models: Models, rollouts: RolloutEngine, prompts: list[list[int]], cfg: PPOConfig,
           *, eos: list[int], pad: int, device: str, generator: torch.Generator, progress: bool,
           should_stop: StopFn, kl_ctl: KLController, kl_limit: float | None,
           synced: bool) -> dict[str, float]:
    """The PPO steps of ``run_ppo``; ``synced``: the rollout engine holds the policy already."""
    optimizer = make_optimizer(models.policy, models.critic, cfg)
    guard = KLGuard(models.policy, kl_limit) if kl_limit is not None else None
    batches = prompt_batches(fit_prompts(prompts, models.ref, cfg.max_new_tokens),
                             cfg.rollout_batch_size, cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="ppo", disable=not progress, leave=False)
    for _ in bar:
        check_stop(should_stop)
        # 1. Rollout: sample answers from the current policy (first loaded into the sampler).
        t0 = time.perf_counter()
        if not synced:
            rollouts.sync(models.policy)
        sync_seconds = time.perf_counter() - t0
        rollout = rollouts.sample(next(batches))
        rollout_seconds = time.perf_counter() - t0 - sync_seconds
        synced = False  # the update below changes the policy
        # 2. Score: behaviour and reference logprobs, values, RM scores.
        score_rollout(models, rollout, cfg)
        # 3. Rewards (KL penalty per token, RM score at the end) and GAE advantages; with
        # another sampler's rollouts, the truncated importance weights of its tokens.
        stats = compute_advantages(rollout, cfg, kl_ctl.value)
        stats |= weigh_rollout(rollout, cfg)
        # 4. Budget: past the KL limit, go back to the last weights within it and stop.
        if guard is not None and not guard.admit(stats["ppo/kl_ref"]):
            break
        # 5. Update: PPO epochs over minibatches.
        stats |= ppo_update(models, optimizer, rollout, cfg, shuffle_gen, should_stop)
        # 6. Adapt the KL coefficient (Ziegler; a no-op when fixed).
        kl_ctl.update(stats["ppo/kl_ref"], cfg.rollout_batch_size)
        stats |= {"rollout_seconds": rollout_seconds, "sync_seconds": sync_seconds,
                  "rollout_tokens": float(rollout.answer_mask.sum().item())}
        history.append(stats)
        bar.set_postfix(score=f"{stats['ppo/score_mean']:.3f}", kl=f"{stats['ppo/kl_ref']:.2f}")
    else:
        if guard is not None:  # 7. The last update's weights have not been measured yet.
            guard.admit(rollout_kl(models.policy, models.ref, next(batches),
                                   max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, eos_token_ids=eos,
                                   pad_token_id=pad, device=device, generator=generator))
    metrics = summarise(history, cfg, time.perf_counter() - started, kl_ctl.value)
    if isinstance(kl_ctl, AdaptiveKLController):
        metrics["ppo/kl_target"] = kl_ctl.target
    return metrics | (guard.metrics() if guard is not None else {})


def load_models(policy_dir: Path, ref_dir: Path, reward_dir: Path, cfg: PPOConfig,
                device: str) -> Models:
    """Policy (trainable), frozen reference and RM, and a critic cloned from the RM. With LoRA
    the policy is the base plus adapters and the reference is that base, adapters off."""
    lora = load_lora_policy(policy_dir, ref_dir, cfg, device) if cfg.use_lora else None
    if lora is not None:
        policy, ref = lora, AdaptersOff(lora)
    else:
        policy = load_causal_lm(policy_dir, device, trainable=not cfg.use_lora)
        ref = load_causal_lm(ref_dir, device)
    reward = RewardModel.from_pretrained(reward_dir, device=device).requires_grad_(False)
    critic = RewardModel.from_pretrained(reward_dir, device=device)
    critic.fold_normalization()  # values start in the units of the normalised scores
    if cfg.use_lora:
        policy = policy if lora is not None else add_lora(policy, cfg, task_type="CAUSAL_LM")
        critic.trunk = add_lora(critic.trunk.requires_grad_(False), cfg, task_type=None)
    return Models(policy=policy, ref=ref, reward=reward, critic=critic)


def make_optimizer(policy: nn.Module, critic: nn.Module, cfg: PPOConfig) -> torch.optim.Adam:
    """Adam over the trainable parameters, one learning rate for the policy, one for the critic
    (by the policy's size unless set: trainer_worker/ppo/defaults.py)."""
    rates = learning_rates(cfg, policy)
    return torch.optim.Adam([
        {"params": [p for p in policy.parameters() if p.requires_grad], "lr": rates.policy},
        {"params": [p for p in critic.parameters() if p.requires_grad], "lr": rates.critic},
    ], eps=1e-5)  # N+: eps 1e-5


def make_kl_controller(cfg: PPOConfig) -> KLController:
    return (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.adaptive_kl else FixedKLController(cfg.kl_coef))


def prompt_batches(prompts: Sequence[list[int]], batch_size: int, seed: int) -> Iterator[
    list[list[int]]
]:
    """Endless batches of prompts: shuffled passes over the list, reshuffled every pass."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(prompts)))
                rng.shuffle(order)
            batch.append(list(prompts[order.pop()]))
        yield batch


@torch.no_grad()
def score_rollout(models: Models, rollout: Rollout, cfg: PPOConfig) -> None:
    """Fill the rollout's logprobs, ref_logprobs, values and scores, in minibatch-sized chunks."""
    chunks = []
    batch_size, device = rollout.input_ids.shape[0], rollout.input_ids.device
    chunk = max(1, batch_size // cfg.num_minibatches)
    for start in range(0, batch_size, chunk):
        part = rollout.rows(torch.arange(start, min(start + chunk, batch_size), device=device))
        chunks.append((answer_logprobs(models.policy, part, cfg.temperature),
                       answer_logprobs(models.ref, part, cfg.temperature),
                       answer_values(models.critic, part).float(),
                       answer_scores(models.reward, part)))
    rollout.logprobs, rollout.ref_logprobs, values, rollout.scores = (
        torch.cat(column) for column in zip(*chunks, strict=True))
    rollout.values = values * rollout.answer_mask


@torch.no_grad()
def compute_advantages(rollout: Rollout, cfg: PPOConfig, kl_coef: float,
                       reduce_sum: ReduceSum | None = None) -> dict[str, float]:
    """Per-token rewards, GAE advantages (whitened) and returns; returns the rollout's stats.

    With ``reduce_sum`` the whitening statistics are those of every process's rollout together.
    """
    mask = rollout.answer_mask
    rewards, _ = compute_rewards(
        rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, rollout.has_eos,
        kl_coef, cfg.missing_eos_penalty, cfg.kl_estimator,
    )  # (B, A)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, reduce_sum=reduce_sum)
    advantages, rollout.returns = compute_gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
    rollout.advantages = masked_whiten(advantages, mask, reduce_sum=reduce_sum)
    kl_sequence = (kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1") * mask).sum(-1)
    return {
        "ppo/score_mean": rollout.scores.mean().item(),
        "ppo/reward_mean": rewards.sum(-1).mean().item(),
        "ppo/kl_ref": kl_sequence.mean().item(),
        "ppo/kl_coef": kl_coef,
        "ppo/length_mean": mask.sum(-1).float().mean().item(),
        "ppo/eos_rate": rollout.has_eos.float().mean().item(),
    }


def weigh_rollout(rollout: Rollout, cfg: PPOConfig) -> dict[str, float]:
    """Truncated importance weights of a rollout another engine sampled (none for the trainer's
    own samples): ``rollout.tis_weights`` and their stats, ``ppo/tis_*``."""
    if rollout.rollout_logprobs is None:
        return {}
    rollout.tis_weights, stats = truncated_is_weights(
        rollout.logprobs, rollout.rollout_logprobs, rollout.answer_mask, cfg.tis_cap)
    return stats


def ppo_update(models: Models, optimizer: torch.optim.Optimizer, rollout: Rollout,
               cfg: PPOConfig, generator: torch.Generator, should_stop: StopFn,
               hooks: StepHooks = ONE_PROCESS) -> dict[str, float]:
    """``ppo_epochs`` passes of clipped policy + value updates; stop early past ``target_kl``."""
    batch_size = rollout.input_ids.shape[0]
    mb_size = max(1, batch_size // cfg.num_minibatches)
    sums: dict[str, float] = {}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(batch_size, generator=generator).to(rollout.input_ids.device)
        for start in range(0, batch_size, mb_size):
            check_stop(should_stop)
            mb = rollout.rows(order[start : start + mb_size]).trimmed()
            mb_stats = ppo_minibatch_step(models, optimizer, mb, cfg, hooks)
            for key, value in mb_stats.items():
                sums[key] = sums.get(key, 0.0) + value
            n_updates += 1
            if cfg.target_kl is not None and _approx_kl(mb_stats, hooks) > cfg.target_kl:
                return _averaged(sums, n_updates)  # early stop (cleanrl ``target_kl``)
    return _averaged(sums, n_updates)


def ppo_minibatch_step(models: Models, optimizer: torch.optim.Optimizer, mb: Rollout,
                       cfg: PPOConfig, hooks: StepHooks = ONE_PROCESS) -> dict[str, float]:
    """One gradient step on ``pg_loss + vf_coef * vf_loss - entropy_coef * entropy``."""
    mask = mb.answer_mask
    logits = answer_logits(models.policy, mb, cfg.temperature)  # (b, A, V)
    mb_logprobs = logprobs_from_logits(logits, mb.input_ids[:, mb.prompt_width:])  # (b, A)
    mb_values = answer_values(models.critic, mb).float()  # (b, A)
    pg_loss, clipfrac, approx_kl = ppo_policy_loss(
        mb_logprobs, mb.logprobs, mb.advantages, mask, cfg.cliprange, weights=mb.tis_weights)
    vf_loss, vf_clipfrac = value_loss(mb_values, mb.values, mb.returns, mask, cfg.cliprange_value)
    with torch.set_grad_enabled(cfg.entropy_coef != 0.0):
        entropy = masked_mean(entropy_from_logits(logits), mask)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy
    optimizer.zero_grad(set_to_none=True)
    hooks.backward(loss)
    hooks.clip_grad_norm(models.policy.parameters(), cfg.max_grad_norm)
    hooks.clip_grad_norm(models.critic.parameters(), cfg.max_grad_norm)
    optimizer.step()
    return {
        "ppo/policy_loss": pg_loss.item(), "ppo/value_loss": vf_loss.item(),
        "ppo/approx_kl": approx_kl.item(), "ppo/clipfrac": clipfrac.item(),
        "ppo/value_clipfrac": vf_clipfrac.item(), "ppo/entropy": entropy.item(),
    }


def _approx_kl(mb_stats: dict[str, float], hooks: StepHooks) -> float:
    """The minibatch's approx KL, averaged over processes so they all stop at the same step."""
    if hooks.reduce_sum is None:
        return mb_stats["ppo/approx_kl"]
    kl, count = hooks.reduce_sum(torch.tensor([mb_stats["ppo/approx_kl"], 1.0]))
    return (kl / count).item()


def _averaged(sums: dict[str, float], count: int) -> dict[str, float]:
    out = {key: value / max(1, count) for key, value in sums.items()}
    out["ppo/updates"] = float(count)
    return out


def summarise(history: list[dict[str, float]], cfg: PPOConfig, elapsed: float,
              final_kl_coef: float) -> dict[str, float]:
    """Means over the cycle's steps (maxima for ``*_max``), first/last score, throughput and
    the final KL coefficient."""
    keys = [k for k in history[0] if k.startswith("ppo/")] if history else []
    metrics = {k: max(h[k] for h in history) if k.endswith("_max")
               else sum(h[k] for h in history) / len(history) for k in keys}
    rollout_seconds = sum(h["rollout_seconds"] for h in history)
    tokens = sum(h["rollout_tokens"] for h in history)
    metrics.update({
        "ppo/steps": float(len(history)),
        "ppo/kl_coef": final_kl_coef,
        "ppo/rollout_tokens_per_s": tokens / rollout_seconds if rollout_seconds else 0.0,
        "ppo/rollout_samples_per_s": (len(history) * cfg.rollout_batch_size / rollout_seconds
                                      if rollout_seconds else 0.0),
        "ppo/samples_per_s": len(history) * cfg.rollout_batch_size / elapsed if elapsed else 0.0,
        "ppo/sync_seconds": sum(h.get("sync_seconds", 0.0) for h in history),
        "ppo/updates": sum(h.get("ppo/updates", 0.0) for h in history),
    })
    if history:
        metrics["ppo/score_first"] = history[0]["ppo/score_mean"]
        metrics["ppo/score_last"] = history[-1]["ppo/score_mean"]
    return metrics
