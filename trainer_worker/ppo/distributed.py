"""The PPO cycle of ``run_ppo`` over several processes with Hugging Face ``accelerate`` (DDP).

    accelerate launch -m trainer_worker.ppo.distributed --policy DIR --ref DIR --reward DIR \\
        --prompts PROMPTS.jsonl --out DIR [--config flywheel.yaml]

Each process samples and scores its own share of ``rollout_batch_size`` from its shard of the
prompts (``prompts[rank::world]``); advantages are whitened with sums and counts reduced over
all processes, so they match one process on the union batch; the update runs on the models and
optimizer wrapped by ``accelerator.prepare`` (gradients averaged by DDP); metrics are averaged
over processes; the main process alone writes the new policy. The single-process path the
worker uses stays ``run_ppo``.

On CPUs (gloo), launch with ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu
--num_processes N ...``: ``accelerate launch --cpu --num_processes N`` starts one process
unless it is given an MPI host file (accelerate 1.x ``simple_launcher``).

FSDP: the same entry point runs under ``accelerate launch --use_fsdp``, where accelerate's FSDP
plugin wraps the prepared policy and critic instead of DDP. That path is untested (no GPUs
here); note that rollouts and scoring call the unwrapped policy and critic, whose parameters
FSDP shards, so a sharded run needs them gathered there (``FSDP.summon_full_params``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from flywheel.settings import PPOConfig, load_settings
from trainer_worker.ppo.causal_lm import (
    filler_token_id,
    fit_prompts,
    resolve_eos_token_ids,
    save_policy,
)
from trainer_worker.ppo.rollout import make_rollout
from trainer_worker.ppo.trainer import (
    StepHooks,
    compute_advantages,
    load_models,
    make_kl_controller,
    make_optimizer,
    ppo_update,
    prompt_batches,
    score_rollout,
    summarise,
)
from trainer_worker.reward.model import RewardModel


class CriticForward(nn.Module):
    """The critic with ``token_scores`` as its ``forward``, so a DDP/FSDP wrapper sees each call."""

    def __init__(self, critic: RewardModel) -> None:
        super().__init__()
        self.critic = critic

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.critic.token_scores(input_ids, attention_mask)  # (B, T)


class WrappedCritic:
    """What the update asks of a critic (``token_scores``, ``parameters``), through the wrapper."""

    def __init__(self, wrapped: nn.Module) -> None:
        self.wrapped = wrapped

    def token_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.wrapped(input_ids, attention_mask)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.wrapped.parameters()


def run_ppo_distributed(
    accelerator: Accelerator, policy_dir: Path, ref_dir: Path, reward_dir: Path,
    prompts: list[list[int]], cfg: PPOConfig, out_dir: Path,
) -> dict[str, float]:
    """``run_ppo`` on this process's shard; ``cfg.rollout_batch_size`` is the global batch."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.temperature <= 0:
        raise ValueError("PPO samples from the policy: temperature must be > 0")
    if cfg.rollout_engine != "hf":
        raise ValueError("distributed PPO samples its rollouts with Hugging Face models only: "
                         "unset FLYWHEEL_PPO__ROLLOUT_ENGINE")
    if cfg.rollout_batch_size % world:
        raise ValueError(f"rollout_batch_size {cfg.rollout_batch_size} is not a multiple of "
                         f"the {world} processes")
    device = accelerator.device
    eos = resolve_eos_token_ids(Path(policy_dir), None)
    models = load_models(Path(policy_dir), Path(ref_dir), Path(reward_dir), cfg, str(device))
    pad = filler_token_id(models.ref, eos)
    policy, critic, optimizer = accelerator.prepare(
        models.policy, CriticForward(models.critic),
        make_optimizer(models.policy, models.critic, cfg))
    trained = replace(models, policy=policy, critic=WrappedCritic(critic))
    hooks = StepHooks(backward=accelerator.backward, clip_grad_norm=accelerator.clip_grad_norm_,
                      reduce_sum=lambda t: accelerator.reduce(t.to(device), "sum"))
    kl_ctl = make_kl_controller(cfg)
    batches = prompt_batches(fit_prompts(prompts[rank::world], models.ref, cfg.max_new_tokens),
                             cfg.rollout_batch_size // world, cfg.seed + rank)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + rank)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for _ in range(cfg.steps):
        # 1. Rollout: this process's prompts, sampled from the unwrapped policy (no collectives).
        t0 = time.perf_counter()
        rollout = make_rollout(
            models.policy, next(batches), max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, eos_token_ids=eos, pad_token_id=pad, device=device,
            generator=sample_gen,
        )
        rollout_seconds = time.perf_counter() - t0
        # 2. Score: behaviour and reference logprobs, values, RM scores.
        score_rollout(models, rollout, cfg)
        # 3. Rewards and GAE advantages, whitened over every process's rollout.
        stats = compute_advantages(rollout, cfg, kl_ctl.value, hooks.reduce_sum)
        # 4. Update: PPO epochs on the wrapped models; DDP averages the gradients.
        stats |= ppo_update(trained, optimizer, rollout, cfg, shuffle_gen, None, hooks)
        stats = mean_over_processes(accelerator, stats)
        # 5. Adapt the KL coefficient with the averaged KL: the same on every process.
        kl_ctl.update(stats["ppo/kl_ref"], cfg.rollout_batch_size)
        stats["rollout_seconds"] = rollout_seconds
        stats["rollout_tokens"] = float(hooks.reduce_sum(rollout.answer_mask.sum().reshape(1)))
        history.append(stats)
    elapsed = time.perf_counter() - started
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_policy(accelerator.unwrap_model(policy), Path(policy_dir), Path(out_dir),
                    cfg.use_lora)
    accelerator.wait_for_everyone()
    return summarise(history, cfg, elapsed, kl_ctl.value) | {"ppo/processes": float(world)}


def mean_over_processes(accelerator: Accelerator, stats: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over processes (every process holds the same keys)."""
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    means = accelerator.reduce(values, "mean").tolist()
    return dict(zip(keys, means, strict=True))


def read_prompts(path: Path) -> list[list[int]]:
    """One JSON list of token ids per line; blank lines skipped."""
    lines = Path(path).read_text().splitlines()
    return [[int(t) for t in json.loads(line)] for line in lines if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--reward", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="JSON lines of token ids")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="flywheel YAML; its ppo section is used")
    args = parser.parse_args(argv)
    cfg = load_settings(args.config).ppo
    accelerator = Accelerator()
    metrics = run_ppo_distributed(accelerator, args.policy, args.ref, args.reward,
                                  read_prompts(args.prompts), cfg, args.out)
    if accelerator.is_main_process:
        print(json.dumps(metrics, sort_keys=True))
    accelerator.end_training()


if __name__ == "__main__":
    main()
