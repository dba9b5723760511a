"""Live approval of the stored versions, as users rated them: what `/v1/policies` shows, which
version is best, and whether the active one has fallen behind a stored one (no forgetting).

Reads the counters the store maintains (`Store.live_ratings`); the maths is in
`flywheel.approval`. Shared by the server (views, `/readyz`) and the worker (auto-rollback,
pruning).
"""

from __future__ import annotations

from typing import Any

from flywheel.approval import Arm, regression, wilson_interval
from flywheel.settings import CanarySettings

Ratings = dict[str, tuple[int, int]]  # version -> (up, down)


def live_record(up: int, down: int) -> dict[str, Any]:
    """The contract's `live` object: ratings, approval = up / (up + down), 95% Wilson interval."""
    n = up + down
    interval = wilson_interval(up, n)
    return {"ratings": n, "up": up, "down": down,
            "approval": None if n == 0 else up / n,
            "interval": None if interval is None else list(interval)}


def _servable(row: dict[str, Any]) -> bool:
    return row.get("path") is not None and row["status"] in ("active", "retired", "candidate")


def best_version(rows: list[dict[str, Any]], ratings: Ratings, min_ratings: int) -> str | None:
    """The stored version with the highest lower bound of live approval, among those with at
    least `min_ratings` thumbs (a lower bound, so a lucky handful of thumbs does not win)."""
    scored = []
    for row in rows:
        up, down = ratings.get(row["id"], (0, 0))
        interval = wilson_interval(up, up + down)
        if _servable(row) and up + down >= min_ratings and interval is not None:
            scored.append((interval[0], row["id"]))
    return max(scored)[1] if scored else None


def forgotten(rows: list[dict[str, Any]], ratings: Ratings, cfg: CanarySettings
              ) -> dict[str, Any] | None:
    """A stored version users rate significantly better than the active one, with the evidence
    (`{"better": id, "active": id, **evidence}`); None when the active holds its own."""
    active = next((r for r in rows if r["status"] == "active"), None)
    if active is None:
        return None
    others = {r["id"]: Arm(*ratings.get(r["id"], (0, 0))) for r in rows
              if r["id"] != active["id"] and _servable(r)}
    found = regression((active["id"], Arm(*ratings.get(active["id"], (0, 0)))), others,
                       min_ratings=cfg.min_rollback_ratings, alpha=cfg.alpha)
    if found is None:
        return None
    better, evidence = found
    return {"better": better, "active": active["id"], **evidence}
