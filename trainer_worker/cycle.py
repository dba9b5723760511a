"""One training cycle: reward model, PPO, evaluation gate; the worker releases what passes.

0. Evidence first: at least one held-out prompt and ``train.min_holdout_pairs`` preference
   pairs to judge an RM by, else the cycle is skipped before any training.
1. Reward model on the train split (feedback on held-out prompts never trains it), on a bounded
   window: the feedback given since the RM in service was trained (at most
   ``feedback.new_examples`` events) and a uniform sample of ``feedback.replay_examples`` older
   ones. Each identity keeps at most ``feedback.user_share`` of it, and identities that
   persistently disagree with the RM in service weigh less (feedback_store/identities.py).
   With ``feedback.implicit_weight`` above 0, implicit signals join the window as weak lone
   thumbs under the same caps (feedback_store/implicit.py). It continues the RM in service
   once the held-out pairs alone can judge it; until then (a first RM, a small group) it
   starts from the base model and is judged on the held-out pairs and, by cross-validation
   over prompts, on the others' (``trainer_worker/reward/cross_validation.py``). It is kept
   only when the lower 95% bound of its accuracy on those pairs (``feedback.holdout_examples``
   held-out events at most) reaches ``train.reward_accuracy_floor``; else the cycle is
   skipped and the RM in service stays.
2. PPO from the active policy against the frozen base, its KL coefficient steered so that the
   candidate's KL to the base stays within ``train.kl_budget`` across cycles (``ppo.budget``).
3. Gate: candidate and active policy answer the same held-out prompts at least
   ``train.gate_samples`` times each, paired by prompt and sampling noise. The candidate passes
   when the lower 95% bound of the paired RM score gain beats ``train.min_improvement``, its KL
   to the base is within budget and its length and EOS rate did not drift too far. It is stored
   as "candidate" (the worker then releases it) or as "rejected", with its metrics either way.

Every directory is written under a temporary name and renamed when complete, so nothing
half-done is ever visible; an interrupted cycle leaves no checkpoint and no policy row.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedback_store import Store
from feedback_store.identities import Tally, limit_identities
from feedback_store.preference_groups import balance_thumbs
from feedback_store.types import Marks, RewardData, RewardModelState
from flywheel.checkpoints import atomic_directory, seal
from flywheel.live_approval import best_version
from flywheel.settings import Settings
from trainer_worker.waiting import cap_note

if TYPE_CHECKING:
    from trainer_worker.ppo.rollout_engines import KeptRollouts

log = logging.getLogger(__name__)

KL_LIMIT_SHARE = 0.9  # PPO keeps the newest weights within 0.9 x budget: room for the estimate
# Shown with an RM's metrics; the store keeps both in reward_models' columns, read from there.
SPLIT_MARK = "reward/trained_on_train_split"  # RMs that never saw a held-out prompt carry it
# The last feedback, ranking and implicit-signal ids an RM's window reached: the next one's
# "new" starts above.
WATERMARK_METRICS = {"feedback": "reward/feedback_watermark",
                     "rankings": "reward/rankings_watermark",
                     "implicit": "reward/implicit_watermark"}


class CycleError(RuntimeError):
    """A cycle that cannot run (e.g. no active policy); the run is marked failed with this text."""


class Skip(Exception):
    """A cycle that waits for more evidence; the run ends "skipped" with ``reason``."""

    def __init__(self, reason: str, metrics: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metrics = dict(metrics or {})


@dataclass
class CycleContext:
    settings: Settings
    store: Store
    device: str
    should_stop: Callable[[], bool]
    progress: bool = True
    rollouts: KeptRollouts | None = None  # the worker's vLLM rollout engine, kept across cycles


@dataclass
class CycleResult:
    status: str  # "succeeded" (a candidate stored for release), "rejected" or "skipped"
    metrics: dict[str, Any]  # "skipped" ones carry "cycle/skip_reason"
    policy_id: str | None  # the new candidate or rejected policy; None when skipped
    reward_model_id: str | None  # the RM this cycle trained, else the one in service (or None)


def _dirs(settings: Settings) -> tuple[Path, Path]:
    root = Path(settings.checkpoint_dir or settings.data_dir / "checkpoints")
    return root / "policies", root / "reward"


def warm_start(previous: RewardModelState | None, holdout: RewardData, need: int
               ) -> RewardModelState | None:
    """The RM a new RM continues from, if any: ``previous`` (the RM in service) when it was
    trained on the train split only (an RM from before the split may have seen held-out
    prompts) and the held-out pairs alone can judge what continues it (``need``). Until then
    each new RM starts from the base model and is judged by cross-validation over prompts too: a
    small group's held-out pairs come slowly, and its reward model should not wait for them."""
    from trainer_worker.reward.data import holdout_pairs

    if previous is None or not previous.trained_on_train_split or holdout_pairs(holdout) < need:
        return None
    return previous


def judging_raters(weights: Mapping[str, float]) -> set[str]:
    """The identities (of ``weights``: the raters of the feedback at hand) whose pairs judge a
    new RM: those that kept their full weight, or everyone when none did (a lone rater
    down-weighted, or every rater): with no one else to judge by, leaving them out left no pair
    to judge any RM by, and since only a kept RM's tallies move a weight, every later cycle
    skipped for good. Trusted raters without pairs yet are waited for, as before."""
    trusted = {name for name, weight in weights.items() if weight >= 1.0}
    return trusted or set(weights)


def check_evidence(ctx: CycleContext, until: Marks) -> RewardData:
    """Step 0: the held-out feedback the new RM is judged on: a bounded sample, without
    identities whose ratings lost weight (unless every one in it did: `judging_raters`), each
    capped at its share. Whether there are enough pairs to judge by is checked once the window is
    read (`reward_window`)."""
    if ctx.store.holdout_prompt_count() == 0:
        raise Skip("waiting for the first rated answers to held-out prompts (a fifth of the "
                   "distinct prompts is held out to judge each new reward model)")
    limits = ctx.settings.feedback
    sample = ctx.store.holdout_reward_data(until=until, size=limits.holdout_examples, seed=0)
    weights = ctx.store.identity_weights(
        item.identity for item in [*sample.groups, *sample.thumbs])
    judges = judging_raters(weights)
    trusted = RewardData([g for g in sample.groups if g.identity in judges],
                         [t for t in sample.thumbs if t.identity in judges])
    return limit_identities(trusted, limits.user_share, {}, seed=0)[0]


@dataclass
class RewardWindow:
    """What a new RM trains on, and what was learned about its raters on the way."""

    data: RewardData  # capped per identity and weighted
    tallies: dict[str, Tally]  # the new events' agreement (stored only if the new RM is kept)
    judges: set[str]  # identities whose pairs judge an RM (`judging_raters`)
    metrics: dict[str, Any]


def _check_cold_evidence(ctx: CycleContext, data: RewardData, holdout: RewardData,
                         metrics: dict[str, Any], judges: set[str] | None = None) -> None:
    """An RM from the base model is judged on held-out pairs and cross-validated ones (those of
    ``judges``, everyone's when None): enough of both?"""
    from trainer_worker.reward.cross_validation import cross_validated_pair_count
    from trainer_worker.reward.data import holdout_pairs

    held_out, folded = holdout_pairs(holdout), cross_validated_pair_count(data, judges)
    need = ctx.settings.train.min_holdout_pairs
    if held_out + folded < need:
        raise Skip(f"need {need} pairs to judge a reward model, have {held_out + folded} "
                   f"({held_out} on held-out prompts, {folded} by cross-validation over the "
                   "other rated prompts): more answers rated (a pair is a ranking, or one "
                   f"rater's thumb up and thumb down){cap_note(metrics)}",
                   {"reward/holdout_pairs": float(held_out),
                    "reward/cross_validated_pairs": float(folded), **metrics})


def reward_window(ctx: CycleContext, previous: RewardModelState | None, until: Marks, seed: int,
                  holdout: RewardData, *, cold: bool) -> RewardWindow:
    """Step 1a: the RM's bounded data, capped per identity and weighted. A ``cold`` RM (from
    the base model) is skipped here when it could not be judged."""
    from trainer_worker.reward.consensus import cross_fitted_tallies, in_service_tallies

    limits = ctx.settings.feedback
    since = previous.watermark if previous is not None else {}
    data = ctx.store.cycle_reward_data(since=since, until=until, new=limits.new_examples,
                                       replay=limits.replay_examples, seed=seed,
                                       implicit_weight=limits.implicit_weight)
    if not data.groups and not data.thumbs:
        raise Skip("no feedback outside the held-out prompts to train on yet")
    if cold:  # before the cross-fitted RMs: an upper bound of what the caps will keep
        _check_cold_evidence(ctx, data, holdout, {})
    if previous is not None:
        tallies = in_service_tallies(ctx.store, previous, data, ctx.settings.reward.max_length,
                                     ctx.device)
    else:  # no RM in service yet: RMs fitted on the other raters judge each one
        tallies = cross_fitted_tallies(Path(ctx.settings.model), data, ctx.settings.reward,
                                       share=limits.user_share, device=ctx.device,
                                       holdout=holdout,
                                       floor=ctx.settings.train.reward_accuracy_floor,
                                       should_stop=ctx.should_stop)
    held_out = [] if holdout is None else [*holdout.groups, *holdout.thumbs]
    names = {item.identity for item in [*data.groups, *data.thumbs, *held_out]}  # they judge too
    weights = ctx.store.weights_with(tallies, names, limits.disagreeing_weight)
    items = [*data.groups, *data.thumbs]
    metrics: dict[str, Any] = {
        "reward/new_examples": float(sum(item.new for item in items)),
        "reward/replay_examples": float(sum(not item.new for item in items)),
        **{key: float(until.get(table, 0)) for table, key in WATERMARK_METRICS.items()},
    }
    data, capped = limit_identities(data, limits.user_share, weights, seed=seed)
    if limits.implicit_weight > 0:  # signals kept under the caps, trained on
        metrics["reward/implicit_examples"] = float(
            sum(t.source == "implicit" for t in data.thumbs))
    data = RewardData(data.groups, balance_thumbs(data.thumbs))
    judges = judging_raters(weights)
    if cold:
        _check_cold_evidence(ctx, data, holdout, capped, judges)
    return RewardWindow(data, tallies, judges, metrics | capped)


def train_reward(ctx: CycleContext, holdout: RewardData, until: Marks, seed: int = 0
                 ) -> tuple[str, Path, dict[str, Any]]:
    """Step 1: a new reward-model version from the train split's bounded window, judged on the
    held-out sample (and, for one trained from the base model, by cross-validation).

    Continuing the RM in service is honest because no RM trained here sees a held-out prompt
    (the split hashes the prompt text, so it never moves); it cannot be cross-validated (its
    start saw every fold), so it waits for enough held-out pairs (`warm_start`).
    """
    from trainer_worker.reward.cross_validation import (
        ENOUGH_HELD_OUT_PAIRS,
        cross_validated_verdicts,
    )
    from trainer_worker.reward.data import holdout_pairs
    from trainer_worker.reward.train import train_reward_model

    floor = ctx.settings.train.reward_accuracy_floor
    previous = ctx.store.latest_reward_model_state()
    warm = warm_start(previous, holdout, ctx.settings.train.min_holdout_pairs)
    window = reward_window(ctx, previous, until, seed, holdout, cold=warm is None)
    init_dir = Path(warm.path) if warm else Path(ctx.settings.model)
    parent = warm.id if warm else None
    cross_validated = None
    if warm is None and holdout_pairs(holdout) < ENOUGH_HELD_OUT_PAIRS:
        log.info("a reward model from the base model: cross-validating it over prompts")
        cross_validated = cross_validated_verdicts(init_dir, window.data, ctx.settings.reward,
                                                   judges=window.judges, device=ctx.device,
                                                   should_stop=ctx.should_stop)
    data = window.data
    rm_id = ctx.store.next_reward_model_id()
    out = unrecorded_leftover_removed(_dirs(ctx.settings)[1] / rm_id)
    log.info("reward model %s: %d groups, %d lone thumbs, from %s", rm_id, len(data.groups),
             len(data.thumbs), init_dir)
    with atomic_directory(out) as tmp:
        metrics: dict[str, Any] = train_reward_model(
            init_dir, data, ctx.settings.reward, tmp, holdout=holdout,
            cross_validated=cross_validated, device=ctx.device, progress=ctx.progress,
            should_stop=ctx.should_stop)
        metrics |= {SPLIT_MARK: 1.0, "reward/warm_start": float(warm is not None),
                    **window.metrics}
        if not metrics["reward/accuracy_low"] >= floor:  # (NaN-safe) below the floor
            raise Skip(f"reward model under the accuracy floor: it agrees with users on "
                       f"{metrics['reward/accuracy']:.1%} of {_judged(metrics)} (95% lower "
                       f"bound {metrics['reward/accuracy_low']:.1%}, floor {floor:.0%}): more "
                       f"feedback, or raters who agree more, needed{cap_note(window.metrics)}",
                       metrics)  # atomic_directory deletes what was written
        manifest = seal(tmp, rm_id, parent=parent)
    ctx.store.add_reward_model(id=rm_id, parent=parent, path=str(out), sha256=manifest.sha256,
                               metrics=metrics, watermark=until, trained_on_train_split=True)
    # Counted once: the next window starts above this RM's watermarks.
    ctx.store.record_tallies(window.tallies, ctx.settings.feedback.disagreeing_weight)
    return rm_id, out, metrics


def _judged(metrics: dict[str, Any]) -> str:
    """"N held-out pairs", or for a cross-validated RM "N pairs (H held-out, C cross-validated)"."""
    held_out = metrics["reward/holdout_pairs"]
    if "reward/cross_validated_pairs" not in metrics:
        return f"{held_out:.0f} held-out pairs"
    folded = metrics["reward/cross_validated_pairs"]
    return (f"{metrics['reward/judged_pairs']:.0f} pairs ({held_out:.0f} held-out, "
            f"{folded:.0f} cross-validated over the other prompts)")


def _prompts(ctx: CycleContext, n: int, seed: int, holdout: bool) -> list[list[int]]:
    return [r.prompt_token_ids for r in ctx.store.sample_prompts(n, seed=seed, holdout=holdout)]


def _carried_kl_coef(ctx: CycleContext) -> float:
    """The budget controller's last coefficient (newest policy PPO made with it), else the
    configured one: the controller's state carries from cycle to cycle."""
    carried = ctx.store.latest_kl_coef()
    return ctx.settings.ppo.kl_coef if carried is None else carried


def train_policy(ctx: CycleContext, active: dict, rm_dir: Path, run_id: int
                 ) -> tuple[str, Path, str, dict[str, float], float | None]:
    """Step 2: PPO from the active policy; returns (id, dir, sha256, metrics, the coefficient
    its adaptive KL controller ended with, None for a fixed one)."""
    import torch

    from trainer_worker.ppo.core import AdaptiveKLController, kl_budget_controller
    from trainer_worker.ppo.defaults import autocast_dtype
    from trainer_worker.ppo.trainer import KLController, make_kl_controller, run_ppo

    cfg, budget = ctx.settings.ppo, ctx.settings.train.kl_budget
    prompts = _prompts(ctx, cfg.rollout_batch_size * cfg.steps, seed=run_id, holdout=False)
    if not prompts:
        raise Skip("no stored user prompts outside the held-out split to train on")
    kl_ctl: KLController = make_kl_controller(cfg)
    kl_limit: float | None = None
    if budget > 0:  # a budget of 0 or less rejects every candidate: nothing to steer to
        kl_ctl = kl_budget_controller(budget, _carried_kl_coef(ctx), cfg.rollout_batch_size)
        kl_limit = KL_LIMIT_SHARE * budget
    policy_id = ctx.store.next_policy_id()
    out = unrecorded_leftover_removed(_dirs(ctx.settings)[0] / policy_id)
    log.info("PPO %s from %s on %d prompts", policy_id, active["id"], len(prompts))
    dtype = autocast_dtype(cfg, ctx.device)  # bf16 forward passes on CUDA, fp32 weights
    with atomic_directory(out) as tmp, torch.autocast("cuda", dtype=dtype or torch.bfloat16,
                                                      enabled=dtype is not None):
        metrics = run_ppo(Path(active["path"]), Path(ctx.settings.model), rm_dir, prompts, cfg,
                          tmp, device=ctx.device, progress=ctx.progress,
                          should_stop=ctx.should_stop, settings=ctx.settings,
                          kept=ctx.rollouts, kl_ctl=kl_ctl, kl_limit=kl_limit)
        manifest = seal(tmp, policy_id, parent=active["id"], base_model=ctx.settings.model)
    carried = kl_ctl.value if isinstance(kl_ctl, AdaptiveKLController) else None
    return policy_id, out, manifest.sha256, metrics, carried


def gate(ctx: CycleContext, candidate: Path, active: dict, rm_dir: Path, run_id: int
         ) -> dict[str, Any]:
    """Step 3: paired comparison on held-out prompts; ``gate/reasons`` lists what failed."""
    from trainer_worker.evaluate import compare_policies, gate_reasons, sample_policy

    train = ctx.settings.train
    prompts = _prompts(ctx, train.eval_prompts, seed=10_000 + run_id, holdout=True)
    prompts = [p for p in prompts if p]  # an empty prompt has nothing to answer
    if not prompts:
        raise Skip("no held-out prompts yet")
    per_prompt = math.ceil(train.gate_samples / len(prompts))
    kwargs = {"max_new_tokens": ctx.settings.ppo.max_new_tokens, "device": ctx.device,
              "seed": run_id, "samples_per_prompt": per_prompt,
              "temperature": ctx.settings.ppo.temperature}  # KL as served
    base = Path(ctx.settings.model)
    new = sample_policy(candidate, base, rm_dir, prompts, **kwargs)
    old = sample_policy(Path(active["path"]), base, rm_dir, prompts, **kwargs)
    n, need = new.scores.numel(), max(2, train.gate_samples)
    if n < need:
        raise Skip(f"too few held-out samples to judge: {n}, need {need}")
    metrics: dict[str, Any] = compare_policies(new, old)
    metrics |= {"gate/prompts": float(len(prompts)), "gate/samples_per_prompt": float(per_prompt),
                "gate/kl_budget": train.kl_budget}
    metrics["gate/reasons"] = gate_reasons(metrics, train)
    return metrics


def run_cycle(ctx: CycleContext, run_id: int) -> CycleResult:
    """Steps 0-3; raises on failure or interruption, leaving no new policy behind."""
    started = time.monotonic()
    active = ctx.store.active_policy()
    if active is None or not active.get("path"):
        raise CycleError("no active policy recorded")
    rm_id: str | None = None
    try:
        until = ctx.store.feedback_watermark()  # what this cycle may read, fixed at its start
        holdout = check_evidence(ctx, until)
        rm_id, rm_dir, rm_metrics = train_reward(ctx, holdout, until, seed=run_id)
        policy_id, policy_dir, sha, ppo_metrics, kl_coef = train_policy(ctx, active, rm_dir,
                                                                         run_id)
        try:
            gate_metrics = gate(ctx, policy_dir, active, rm_dir, run_id)
            if ctx.should_stop():
                raise InterruptedError("stopped before the candidate was recorded")
            metrics = {**rm_metrics, **ppo_metrics, **gate_metrics,
                       "cycle/seconds": time.monotonic() - started}
            passed = not gate_metrics["gate/reasons"]
            ctx.store.add_policy(id=policy_id, parent=active["id"], path=str(policy_dir),
                                 sha256=sha, status="candidate" if passed else "rejected",
                                 metrics=metrics, kl_coef=kl_coef)
        except BaseException:
            shutil.rmtree(policy_dir, ignore_errors=True)  # nothing half-done stays behind
            raise
    except Skip as skip:
        return _skipped(ctx, skip, rm_id, started)
    if not passed:
        log.info("%s rejected by the gate: %s", policy_id, "; ".join(gate_metrics["gate/reasons"]))
        return CycleResult("rejected", metrics, policy_id, rm_id)
    log.info("%s passed the gate (score gain %.3f, 95%% bound %.3f): a candidate for release",
             policy_id, gate_metrics["gate/score_gain"], gate_metrics["gate/score_gain_low"])
    return CycleResult("succeeded", metrics, policy_id, rm_id)


def _skipped(ctx: CycleContext, skip: Skip, rm_id: str | None, started: float) -> CycleResult:
    if rm_id is None:
        in_service = ctx.store.latest_reward_model()
        rm_id = in_service["id"] if in_service else None
    log.info("cycle skipped: %s", skip.reason)
    metrics = {**skip.metrics, "cycle/skip_reason": skip.reason,
               "cycle/seconds": time.monotonic() - started}
    return CycleResult("skipped", metrics, None, rm_id)


def prune(settings: Settings, store: Store) -> None:
    """Delete old checkpoint directories: never the active one, the canary, the best version by
    live approval (a rollback may need it), nor the newest few."""
    best = best_version(store.list_policies(), store.live_ratings(),
                        settings.canary.min_rollback_ratings, store.pooled_live())
    protect = {best} if best is not None else set()
    for row in store.prunable_policies(keep=settings.train.keep_checkpoints, protect=protect):
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


def unrecorded_leftover_removed(out: Path) -> Path:
    """``out``, the directory of the id the store just handed out (no row holds it), with what
    a cycle wrote there and never recorded moved aside (``.tmp-leftover-*``, which the next
    start removes). A policy is written before its gate and recorded after it, an RM recorded
    just after it is written: a worker killed in between (or, for an RM, a database gone in
    between) left a complete directory no row names, and every later cycle, taking that id
    again, failed on it ("already exists"), each failure consuming its feedback. Moved, not
    deleted: a stale leader still reading it keeps its open files."""
    if out.exists() or out.is_symlink():
        aside = out.with_name(f".tmp-leftover-{out.name}-{time.time_ns()}")
        log.warning("moving %s aside to %s: written by a cycle that never recorded it", out,
                    aside.name)
        out.rename(aside)
    return out
