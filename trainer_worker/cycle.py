"""One training cycle: reward model, PPO, evaluation gate, publication.

1. Retrain the reward model on all feedback, continuing from the previous one.
2. Run PPO from the active policy, against the frozen base model as reference.
3. Score the candidate and the active policy on held-out prompts with the new reward model.
4. Publish (checkpoint sealed, SQL row, SET + PUBLISH) only if the score improves and the KL to
   the base stays under budget; else store the candidate as rejected with its metrics.

Every directory is written under a temporary name and renamed when complete, so nothing
half-done is ever visible; an interrupted cycle leaves no checkpoint and no policy row.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feedback_store import Store
from flywheel.checkpoints import atomic_directory, seal
from flywheel.hotswap import PolicyMessage
from flywheel.settings import Settings

log = logging.getLogger(__name__)


class CycleError(RuntimeError):
    """A cycle that cannot run (e.g. no feedback yet); the run is marked failed with this text."""


@dataclass
class CycleContext:
    settings: Settings
    store: Store
    device: str
    should_stop: Callable[[], bool]
    publish: Callable[[PolicyMessage], None]
    progress: bool = True


@dataclass
class CycleResult:
    status: str  # "succeeded" or "rejected"
    metrics: dict[str, Any]
    policy_id: str
    reward_model_id: str


def _dirs(settings: Settings) -> tuple[Path, Path]:
    root = Path(settings.checkpoint_dir or settings.data_dir / "checkpoints")
    return root / "policies", root / "reward"


def train_reward(ctx: CycleContext) -> tuple[str, Path, dict[str, float]]:
    """Step 1: a new reward-model version from all feedback so far."""
    from trainer_worker.reward.train import train_reward_model

    data = ctx.store.reward_data()
    if not data.groups and not data.thumbs:
        raise CycleError("no feedback to learn from yet")
    previous = ctx.store.latest_reward_model()
    init_dir = Path(previous["path"]) if previous else Path(ctx.settings.model)
    rm_id = ctx.store.next_reward_model_id()
    _, reward_root = _dirs(ctx.settings)
    out = reward_root / rm_id
    log.info("reward model %s: %d groups, %d lone thumbs, from %s", rm_id, len(data.groups),
             len(data.thumbs), init_dir)
    with atomic_directory(out) as tmp:
        metrics = train_reward_model(init_dir, data, ctx.settings.reward, tmp, device=ctx.device,
                                     progress=ctx.progress, should_stop=ctx.should_stop)
        manifest = seal(tmp, rm_id, parent=previous["id"] if previous else None)
    ctx.store.add_reward_model(id=rm_id, parent=previous["id"] if previous else None,
                               path=str(out), sha256=manifest.sha256, metrics=metrics)
    return rm_id, out, metrics


def _prompts(ctx: CycleContext, n: int, seed: int, holdout: bool) -> list[list[int]]:
    records = ctx.store.sample_prompts(n, seed=seed, holdout=holdout)
    if not records:
        raise CycleError("no stored user prompts to train on")
    return [r.prompt_token_ids for r in records]


def train_policy(ctx: CycleContext, active: dict, rm_dir: Path, run_id: int
                 ) -> tuple[str, Path, str, dict[str, float]]:
    """Step 2: PPO from the active policy; returns (id, dir, sha256, metrics)."""
    from trainer_worker.ppo.trainer import run_ppo

    cfg = ctx.settings.ppo
    prompts = _prompts(ctx, cfg.rollout_batch_size * cfg.steps, seed=run_id, holdout=False)
    policy_id = ctx.store.next_policy_id()
    policies_root, _ = _dirs(ctx.settings)
    out = policies_root / policy_id
    log.info("PPO %s from %s on %d prompts", policy_id, active["id"], len(prompts))
    with atomic_directory(out) as tmp:
        metrics = run_ppo(Path(active["path"]), Path(ctx.settings.model), rm_dir, prompts, cfg,
                          tmp, device=ctx.device, progress=ctx.progress,
                          should_stop=ctx.should_stop)
        manifest = seal(tmp, policy_id, parent=active["id"], base_model=ctx.settings.model)
    return policy_id, out, manifest.sha256, metrics


def gate(ctx: CycleContext, candidate: Path, active: dict, rm_dir: Path, run_id: int
         ) -> tuple[bool, dict[str, float]]:
    """Step 3: the candidate must beat the active policy and stay within the KL budget."""
    from trainer_worker.evaluate import evaluate_policy

    train = ctx.settings.train
    prompts = _prompts(ctx, train.eval_prompts, seed=10_000 + run_id, holdout=True)
    kwargs = {"max_new_tokens": ctx.settings.ppo.max_new_tokens, "device": ctx.device,
              "seed": run_id}
    base = Path(ctx.settings.model)
    new = evaluate_policy(candidate, base, rm_dir, prompts, **kwargs)
    old = evaluate_policy(Path(active["path"]), base, rm_dir, prompts, **kwargs)
    gain = new["eval/score_mean"] - old["eval/score_mean"]
    metrics = {**{f"gate/candidate_{k.split('/')[-1]}": v for k, v in new.items()},
               **{f"gate/active_{k.split('/')[-1]}": v for k, v in old.items()},
               "gate/score_gain": gain, "gate/kl_budget": train.kl_budget}
    passed = gain > train.min_improvement and new["eval/kl_ref"] <= train.kl_budget
    return passed, metrics


def run_cycle(ctx: CycleContext, run_id: int) -> CycleResult:
    """Steps 1-4; raises on failure or interruption, leaving no new policy behind."""
    started = time.monotonic()
    active = ctx.store.active_policy()
    if active is None or not active.get("path"):
        raise CycleError("no active policy recorded")
    rm_id, rm_dir, rm_metrics = train_reward(ctx)
    policy_id, policy_dir, sha, ppo_metrics = train_policy(ctx, active, rm_dir, run_id)
    try:
        passed, gate_metrics = gate(ctx, policy_dir, active, rm_dir, run_id)
        if ctx.should_stop():
            raise InterruptedError("stopped before publication")
        metrics = {**rm_metrics, **ppo_metrics, **gate_metrics,
                   "cycle/seconds": time.monotonic() - started}
        status = "candidate" if passed else "rejected"
        ctx.store.add_policy(id=policy_id, parent=active["id"], path=str(policy_dir),
                             sha256=sha, status=status, metrics=metrics)
    except BaseException:
        shutil.rmtree(policy_dir, ignore_errors=True)  # nothing half-done stays behind
        raise
    if not passed:
        log.info("%s rejected by the gate: %s", policy_id, gate_metrics)
        return CycleResult("rejected", metrics, policy_id, rm_id)
    ctx.store.activate_policy(policy_id)
    ctx.publish(PolicyMessage(policy_id, str(policy_dir), sha))
    log.info("published %s (score gain %.3f)", policy_id, gate_metrics["gate/score_gain"])
    return CycleResult("succeeded", metrics, policy_id, rm_id)


def prune(settings: Settings, store: Store) -> None:
    """Delete old checkpoint directories (never the active one, nor the newest few)."""
    for row in store.prunable_policies(keep=settings.train.keep_checkpoints):
        path = Path(row["path"])
        if path.parent != _dirs(settings)[0]:
            continue  # only directories this worker wrote
        shutil.rmtree(path, ignore_errors=True)
        store.mark_policy_pruned(row["id"])
        log.info("pruned %s (%s)", row["id"], path)


def remove_temporaries(settings: Settings) -> None:
    """Delete half-written directories a killed leader left (only a leader writes there)."""
    for root in _dirs(settings):
        if root.is_dir():
            for tmp in root.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
                log.info("removed unfinished %s", tmp)
