"""Live approval of the stored versions, as users rated them: what `/v1/policies` shows, which
version is best, and whether the active one has fallen behind a stored one (no forgetting).

Reads the counters the store maintains (`Store.live_ratings`) and, where the worker has pooled a
version's thumbs across raters (`Store.pooled_live`, flywheel/rater_pooling.py), decides on
those: plain counts let one identity that floods thumbs move `best` and `regression`. The maths
is in `flywheel.approval`. Shared by the server (views, `/readyz`) and the worker
(auto-rollback, pruning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from feedback_store.types import PooledLive
from flywheel.approval import Z95, Arm, regression, wilson_interval
from flywheel.settings import CanarySettings

Ratings = dict[str, tuple[int, int]]  # version -> (up, down)
Pooled = Mapping[str, PooledLive]


def live_record(up: int, down: int, pooled: PooledLive | None = None) -> dict[str, Any]:
    """The contract's `live` object: ratings, approval = up / (up + down), 95% Wilson interval;
    plus `pooled` (null until the worker pooled the version): the approval with thumbs pooled
    across raters, its 95% normal interval, the weighted ratings, the raters and `as_of`."""
    n = up + down
    interval = wilson_interval(up, n)
    return {"ratings": n, "up": up, "down": down,
            "approval": None if n == 0 else up / n,
            "interval": None if interval is None else list(interval),
            "pooled": None if pooled is None else _pooled_record(pooled)}


def _pooled_record(pooled: PooledLive) -> dict[str, Any]:
    n = pooled.up + pooled.down
    approval = pooled.up / n if n > 0 else None
    interval = None
    if approval is not None:
        half = Z95 * math.sqrt(max(pooled.variance, 0.0))
        interval = [max(0.0, approval - half), min(1.0, approval + half)]
    return {"ratings": n, "approval": approval, "interval": interval, "raters": pooled.raters,
            "as_of": pooled.at}


def arms(rows: list[dict[str, Any]], ratings: Ratings, pooled: Pooled | None = None
         ) -> dict[str, Arm]:
    """Each version's thumbs: pooled across raters where the worker has pooled them, else the
    plain counters."""
    pooled = pooled or {}
    found = {}
    for row in rows:
        version = row["id"]
        if version in pooled:
            p = pooled[version]
            found[version] = Arm(p.up, p.down, variance=p.variance)
        else:
            found[version] = Arm(*ratings.get(version, (0, 0)))
    return found


def _servable(row: dict[str, Any]) -> bool:
    return row.get("path") is not None and row["status"] in ("active", "retired", "candidate")


def _low(arm: Arm) -> float | None:
    """The lower end of the arm's 95% interval (Wilson for plain counts)."""
    if arm.variance is None:
        interval = wilson_interval(int(arm.up), int(arm.n))
        return None if interval is None else interval[0]
    if arm.approval is None:
        return None
    return arm.approval - Z95 * math.sqrt(max(arm.variance, 0.0))


def best_version(rows: list[dict[str, Any]], ratings: Ratings, min_ratings: int,
                 pooled: Pooled | None = None) -> str | None:
    """The stored version with the highest lower bound of live approval, among those with at
    least `min_ratings` thumbs (a lower bound, so a lucky handful of thumbs does not win)."""
    scored = []
    for version, arm in arms([r for r in rows if _servable(r)], ratings, pooled).items():
        low = _low(arm)
        if arm.n >= min_ratings and low is not None:
            scored.append((low, version))
    return max(scored)[1] if scored else None


def forgotten(rows: list[dict[str, Any]], ratings: Ratings, cfg: CanarySettings,
              pooled: Pooled | None = None) -> dict[str, Any] | None:
    """A stored version users rate significantly better than the active one, with the evidence
    (`{"better": id, "active": id, **evidence}`); None when the active holds its own."""
    active = next((r for r in rows if r["status"] == "active"), None)
    if active is None:
        return None
    by_version = arms(rows, ratings, pooled)
    others = {r["id"]: by_version[r["id"]] for r in rows
              if r["id"] != active["id"] and _servable(r)}
    found = regression((active["id"], by_version[active["id"]]), others,
                       min_ratings=cfg.min_rollback_ratings, alpha=cfg.alpha)
    if found is None:
        return None
    better, evidence = found
    return {"better": better, "active": active["id"], **evidence}
