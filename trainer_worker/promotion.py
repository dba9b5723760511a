"""What ships: candidates go on canary, live thumbs promote or reject them, and a version users
rated significantly better than the active one is rolled back to.

The leading worker calls `Promotion.tick` on every poll. Every decision is written to SQL with its
evidence (the version's `metrics`, keys `canary/*` and `rollback/*`) before it is announced.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from feedback_store import Store
from feedback_store.types import ANONYMOUS, PooledLive, RaterThumbs
from flywheel.approval import Arm, decide_canary, difference_sequence
from flywheel.hotswap import Publisher
from flywheel.live_approval import forgotten
from flywheel.rater_pooling import pool_arm
from flywheel.serving_plan import announce
from flywheel.settings import Settings
from trainer_worker.rater_review import RaterReview

log = logging.getLogger(__name__)


class Promotion:
    """The worker's side of the rollout; the store and the publisher are the worker's own."""

    def __init__(self, settings: Settings, store: Store, publisher: Publisher) -> None:
        self.settings, self.store, self.publisher = settings, store, publisher
        self.cfg = settings.canary
        self.review = RaterReview(settings, store)
        self.device = "cpu"  # where the rater review scores; the worker sets its own
        self._pooled_thumbs = -1  # thumbs counted when every version was last pooled
        self._pooled_at = -math.inf

    def release(self, policy_id: str) -> str:
        """A candidate that passed the offline gate: on canary (`canary.auto`), else active.
        Returns what happened: "canary", "active", or "waiting" (another canary runs)."""
        if self.cfg.auto:
            _, running = self.store.serving_state()
            if running is not None:
                log.info("%s waits as a candidate: %s is on canary", policy_id, running["id"])
                return "waiting"
            self.store.start_canary(policy_id, self.cfg.fraction)
            outcome = "canary"
        else:
            self.store.activate_policy(policy_id)
            outcome = "active"
        announce(self.store, self.publisher)
        log.info("%s released: %s", policy_id, outcome)
        return outcome

    def tick(self) -> str | None:
        """Decide the running canary, or roll back a forgotten better version; returns what was
        done ("promoted", "rejected", "timeout", "rolled_back") or None."""
        active, canary = self.store.serving_state()
        if canary is not None and active is not None:
            return self._judge(active, canary)
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

    def pooled(self, thumbs: dict[str, RaterThumbs]) -> dict[str, Arm]:
        """Each version's thumbs pooled across its raters: every identity capped at the share of
        `feedback.user_share` and weighted by its current trust weight (flywheel/
        rater_pooling.py, trainer_worker/rater_review.py)."""
        names = {name for raters in thumbs.values() for name in raters} - {ANONYMOUS}
        weights = self.review.weights(names, self.device)
        arms = {}
        for version, raters in thumbs.items():
            named = {name: counts for name, counts in raters.items() if name != ANONYMOUS}
            arms[version] = pool_arm(named, share=self.settings.feedback.user_share,
                                     weights=weights,
                                     unattributed=raters.get(ANONYMOUS, (0, 0)))
        return arms

    def _judge(self, active: dict[str, Any], canary: dict[str, Any]) -> str | None:
        thumbs = self.store.canary_evidence() or {}
        arms = self.pooled(thumbs)
        decision = decide_canary(
            arms.get(active["id"], Arm(0, 0)), arms.get(canary["id"], Arm(0, 0)),
            min_ratings=self.cfg.min_ratings, margin=self.cfg.margin, alpha=self.cfg.alpha)
        metrics = {f"canary/{k}": v for k, v in decision.evidence().items()}
        metrics["canary/against"] = active["id"]
        for arm, version in (("active", active["id"]), ("canary", canary["id"])):
            raters = thumbs.get(version, {})
            metrics[f"canary/{arm}_thumbs"] = sum(u + d for u, d in raters.values())
            metrics[f"canary/{arm}_raters"] = len(raters)
        if decision.verdict == "promote":
            metrics["canary/decision"] = "promoted"
            self.store.activate_policy(canary["id"], metrics=metrics)
            outcome = "promoted"
        elif decision.verdict == "reject":
            metrics["canary/decision"] = "rejected"
            self.store.end_canary("rejected", metrics, id=canary["id"])
            outcome = "rejected"
        elif self._hours_on(canary) >= self.cfg.max_hours:
            metrics["canary/decision"] = "timeout"
            metrics["canary/reason"] = f"no decision within {self.cfg.max_hours} h"
            self.store.end_canary("candidate", metrics, id=canary["id"])
            outcome = "timeout"
        else:
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
        self.store.activate_policy(better, metrics=metrics)
        announce(self.store, self.publisher)
        log.warning("rolled back from %s to %s: users rate it better (%s)", found["active"],
                    better, found)
        return "rolled_back"
