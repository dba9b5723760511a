"""What ships: candidates go on canary, live thumbs promote or reject them, and a version users
rated significantly better than the active one is rolled back to.

The leading worker's judge thread calls `Promotion.tick` every `canary.judge_seconds`, also while
a training cycle runs (trainer_worker/judge.py). Candidates that pass the gate during a canary wait;
when it ends, the newest waiting one goes on canary and the older ones are retired. Every decision
is written to SQL with its evidence (the version's `metrics`, keys `canary/*`, `rollback/*`,
`release/*`) before it is announced, as a conditional change that applies only while the state it
was decided on holds (feedback_store/policy_versions.py, `Transition`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from feedback_store import Store
from feedback_store.types import ANONYMOUS, PooledLive, RaterThumbs
from flywheel.approval import Arm, CanaryDecision, GiveWay, decide_canary, difference_sequence
from flywheel.live_approval import forgotten
from flywheel.rater_pooling import PairedThumbs, decide_paired, pool_arm
from flywheel.serving_plan import Publisher, announce
from flywheel.settings import Settings
from trainer_worker.rater_review import RaterReview
from trainer_worker.waiting import canary_wait_reason

log = logging.getLogger(__name__)

WAIT_LOG_SECONDS = 60.0  # an undecided canary says why in the log at most this often


class Promotion:
    """The worker's side of the rollout; the store and the publisher are the worker's own."""

    def __init__(self, settings: Settings, store: Store, publisher: Publisher) -> None:
        self.settings, self.store, self.publisher = settings, store, publisher
        self.cfg = settings.canary
        self.review = RaterReview(settings, store)
        self.device = "cpu"  # where the rater review scores; the worker sets its own
        self._pooled_thumbs = -1  # thumbs counted when every version was last pooled
        self._pooled_at = -math.inf
        self._waiting: dict[str, str] = {}  # the canary's last stored reason to wait
        self._wait_logged_at = -math.inf

    def release(self, policy_id: str) -> str:
        """A candidate that passed the offline gate: on canary (`canary.auto`), else active.
        Returns what happened: "canary", "active", "waiting" (another canary runs: the judge
        releases the newest waiting candidate when it ends and retires the older ones),
        "retired" (a newer waiting candidate went first), or "not released: <why>" when the
        candidate changed meanwhile (an operator served or retired it). Never raises on a race."""
        if self.cfg.auto:
            done = self.store.release_candidate(policy_id, self.cfg.fraction, self.cfg.unit,
                                                self.cfg.sticky_raters)
        else:
            active, canary = self.store.serving_state()
            done = self.store.activate_if(
                policy_id, active=None if active is None else active["id"],
                canary=None if canary is None else canary["id"], status="candidate")
        if not done.applied:
            log.warning("%s not released: %s", policy_id, done.reason)
            return f"not released: {done.reason}"
        if done.retired:
            log.info("retired waiting candidate(s) %s: a newer one goes first",
                     ", ".join(done.retired))
        if done.outcome == "waiting":
            log.info("%s waits as a candidate: %s", policy_id, done.reason)
            return "waiting"
        announce(self.store, self.publisher)
        log.info("%s released: %s%s", policy_id, done.outcome,
                 f" ({done.reason})" if done.reason else "")
        return done.outcome

    def tick(self) -> str | None:
        """Decide the running canary, release the newest waiting candidate once none runs (in
        the same tick as the decision that ended one), or roll back a forgotten better version.
        Returns what was done ("promoted", "rejected", "timeout", "superseded", "released",
        "rolled_back") or
        None: nothing due, or someone else changed the state first (logged, nothing written).

        The worker's judge thread (trainer_worker/judge.py) calls it every `canary.judge_seconds`,
        whether or not a training cycle runs."""
        active, canary = self.store.serving_state()
        outcome = None
        if canary is not None and active is not None:
            outcome = self._judge(active, canary)
            if outcome is None:
                return None
        if self.cfg.auto:
            released = self.store.release_waiting(self.cfg.fraction, self.cfg.unit,
                                                  self.cfg.sticky_raters)
            if released is not None:
                if released.retired:
                    log.info("retired waiting candidate(s) %s: %s", ", ".join(released.retired),
                             "a newer one goes first" if released.applied else released.reason)
                if released.applied:
                    assert released.record is not None
                    announce(self.store, self.publisher)
                    log.info("%s released from waiting: on canary",
                             released.record["id"])
                    outcome = outcome or "released"
        if outcome is not None:
            return outcome
        self.pool_live()
        if self.cfg.auto_rollback:
            return self._roll_back_if_forgotten()
        return None

    def pool_live(self, *, force: bool = False) -> bool:
        """Pool every stored version's thumbs across raters and store them (`live.pooled`,
        read by `best` and the rollback alarm), at most every `canary.pool_seconds` and only
        when thumbs came since; returns whether it did."""
        counted = sum(up + down for up, down in self.store.live_ratings().values())
        due = time.monotonic() - self._pooled_at >= self.cfg.pool_seconds
        if not force and (counted == self._pooled_thumbs or not due):
            return False
        versions = [row["id"] for row in self.store.list_policies()]
        thumbs = self.store.thumbs_by_rater(versions)
        now = time.time()
        pooled = {version: PooledLive(arm.up, arm.down, arm.variance or 0.0,
                                      len(thumbs[version]), now)
                  for version, arm in self.pooled(thumbs).items() if thumbs[version]}
        self.store.record_pooled_live(pooled)
        self._pooled_thumbs, self._pooled_at = counted, time.monotonic()
        return True

    def _weights(self, thumbs: dict[str, RaterThumbs]) -> dict[str, float]:
        names = {name for raters in thumbs.values() for name in raters} - {ANONYMOUS}
        return self.review.weights(names, self.device)

    def pooled(self, thumbs: dict[str, RaterThumbs]) -> dict[str, Arm]:
        """Each version's thumbs pooled across its raters: every rater capped at its share
        and weighted by its current trust weight (flywheel/rater_pooling.py,
        trainer_worker/rater_review.py)."""
        weights = self._weights(thumbs)
        return {version: pool_arm(raters, share=self.settings.feedback.user_share,
                                  weights=weights)
                for version, raters in thumbs.items()}

    def canary_decision(self, active: str, canary: dict[str, Any]
                        ) -> tuple[CanaryDecision, dict[str, RaterThumbs]]:
        """What the canary's thumbs decide, and those thumbs per arm and rater. Compared within
        raters, their thumbs summed per request, when it is assigned per request (every rater
        sees both arms: `decide_paired`); else pooled per arm."""
        cfg = self.cfg
        if (canary.get("canary") or {}).get("unit") == "request":
            paired = self.store.canary_requests()
            if paired is None or paired.versions != (active, canary["id"]):
                paired = PairedThumbs((active, canary["id"]))  # the arms changed meanwhile
            thumbs = {version: {name: (c.up, c.n - c.up) for name, c in raters.items()}
                      for version, raters in ((active, paired.active),
                                              (canary["id"], paired.canary))}
            decision = decide_paired(
                paired.active, paired.canary, shared=paired.shared,
                share=self.settings.feedback.user_share, weights=self._weights(thumbs),
                min_ratings=cfg.min_ratings, margin=cfg.margin, alpha=cfg.alpha)
            return decision, thumbs
        thumbs = self.store.canary_evidence() or {}
        arms = self.pooled(thumbs)
        decision = decide_canary(arms.get(active, Arm(0, 0)), arms.get(canary["id"], Arm(0, 0)),
                                 min_ratings=cfg.min_ratings, margin=cfg.margin,
                                 alpha=cfg.alpha)
        return decision, thumbs

    def _judge(self, active: dict[str, Any], canary: dict[str, Any]) -> str | None:
        decision, thumbs = self.canary_decision(active["id"], canary)
        metrics = {f"canary/{k}": v for k, v in decision.evidence().items()}
        metrics["canary/against"] = active["id"]
        metrics["canary/unit"] = (canary.get("canary") or {}).get("unit", "user")
        for arm, version in (("active", active["id"]), ("canary", canary["id"])):
            raters = thumbs.get(version, {})
            metrics[f"canary/{arm}_thumbs"] = sum(u + d for u, d in raters.values())
            metrics[f"canary/{arm}_raters"] = len(raters)
        if decision.verdict == "wait":
            self._note_wait(canary["id"], canary_wait_reason(
                decision, thumbs, active["id"], canary["id"], GiveWay.of(self.cfg)))
        # Each change applies only while `canary` is on canary against `active`, as decided: an
        # operator's activation or abort that came first stands, and nothing is raised.
        if decision.verdict == "promote":
            metrics["canary/decision"] = "promoted"
            done = self.store.activate_if(canary["id"], active=active["id"],
                                          canary=canary["id"], metrics=metrics)
            outcome = "promoted"
        elif decision.verdict == "reject":
            metrics["canary/decision"] = "rejected"
            done = self.store.end_canary_if(canary["id"], "rejected", metrics,
                                            active=active["id"])
            outcome = "rejected"
        elif self._hours_on(canary) >= self.cfg.max_hours:
            metrics["canary/decision"] = "timeout"
            metrics["canary/reason"] = f"no decision within {self.cfg.max_hours} h"
            done = self.store.end_canary_if(canary["id"], "candidate", metrics,
                                            active=active["id"])
            outcome = "timeout"
        elif self._superseded(decision):
            metrics["canary/decision"] = "superseded"
            metrics["canary/reason"] = (
                f"no decision after {min(decision.active.n, decision.canary.n):.0f} counted "
                f"thumbs on each arm, showing {decision.shown * 100:+.1f} points, and a newer "
                "candidate waits: it goes on canary next")
            done = self.store.end_canary_if(canary["id"], "candidate", metrics,
                                            active=active["id"])
            outcome = "superseded"
        else:
            return None
        if not done.applied:
            log.warning("canary %s would be %s against %s, but the state changed first: %s",
                        canary["id"], outcome, active["id"], done.reason)
            return None
        announce(self.store, self.publisher)
        log.info("canary %s %s against %s: %s", canary["id"], outcome, active["id"],
                 decision.evidence())
        return outcome

    def _confirmed_by_raters(self, found: dict[str, Any]) -> bool:
        """Whether the regression the counters show holds with the thumbs pooled across raters
        (at the same level): a few identities that flood inverted thumbs on the active version
        can move the counters, not this. Scans the two versions' feedback, only on an alarm."""
        arms = self.pooled(self.store.thumbs_by_rater((found["active"], found["better"])))
        low, _ = difference_sequence(arms[found["active"]], arms[found["better"]],
                                     alpha=float(found["alpha_each"]))
        found["pooled_low"] = low
        if low <= 0:
            log.info("no rollback to %s: pooled across raters, users do not rate it better "
                     "(lower bound %.3f)", found["better"], low)
        return low > 0

    def _note_wait(self, canary: str, reason: str) -> None:
        """Store why the canary waits (`canary/reason`), when that changed."""
        if reason == self._waiting.get(canary):
            return
        self.store.note_canary(canary, {"canary/reason": reason})
        self._waiting = {canary: reason}
        if time.monotonic() - self._wait_logged_at >= WAIT_LOG_SECONDS:
            log.info("%s", reason)
            self._wait_logged_at = time.monotonic()

    def _superseded(self, decision: CanaryDecision) -> bool:
        """Whether an undecided canary gives way (``canary.supersede_*``, ``GiveWay``) and a
        newer candidate waits. Ending it decides nothing about it: no decision's error rate
        changes, and the active version stays."""
        return GiveWay.of(self.cfg).due(decision) and self.store.candidate_waits()

    @staticmethod
    def _hours_on(canary: dict[str, Any]) -> float:
        started = (canary.get("canary") or {}).get("started_at") or time.time()
        return (time.time() - float(started)) / 3600.0

    def _roll_back_if_forgotten(self) -> str | None:
        rows = self.store.list_policies()
        found = forgotten(rows, self.store.live_ratings(), self.cfg, self.store.pooled_live())
        if found is None or not self._confirmed_by_raters(found):
            return None
        better = found["better"]
        metrics = {f"rollback/{k}": v for k, v in found.items()
                   if isinstance(v, int | float | str)}
        done = self.store.activate_if(better, active=found["active"], canary=None,
                                      metrics=metrics)
        if not done.applied:  # an operator or a canary came first: decided again next tick
            log.warning("no rollback to %s, the state changed first: %s", better, done.reason)
            return None
        announce(self.store, self.publisher)
        log.warning("rolled back from %s to %s: users rate it better (%s)", found["active"],
                    better, found)
        return "rolled_back"
