"""Hourly history for the console's charts: approval per version, feedback volume; paged back
in time by `before`, each page a bounded query on the feedback time index."""

from __future__ import annotations

import time
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Query

from feedback_store.history import HOUR_S, MAX_HOURS
from flywheel.live_approval import live_record
from server.state import AppState, require_admin

router = APIRouter()

Hours = Annotated[int, Query(ge=1, le=MAX_HOURS, description="hours per page")]
MAX_BEFORE = 32_503_680_000  # the year 3000: later moments are not dates the database keeps
Before = Annotated[int | None, Query(ge=HOUR_S, le=MAX_BEFORE, description=(
    "unix seconds; the page ends at the start of this hour (default: the end of this hour). "
    "Pass a page's `next_before` for the page before it."))]


def _window(hours: int, before: int | None) -> tuple[int, int]:
    end = (int(time.time()) // HOUR_S + 1) * HOUR_S if before is None else \
        before // HOUR_S * HOUR_S
    return max(0, end - hours * HOUR_S), end


def _page(state: AppState, hours: int, before: int | None, *, by_version: bool
          ) -> dict[str, Any]:
    start, end = _window(hours, before)
    rows = state.store.hourly_ratings(start, end, by_version=by_version) if end > start else []
    for row in rows:
        row["ratings"] = row["up"] + row["down"]
        if by_version:
            row.update({k: v for k, v in live_record(row["up"], row["down"]).items()
                        if k in ("approval", "interval")})
    more = start > 0 and state.store.feedback_before(start)
    return {"object": "list", "start": start, "end": end, "data": rows,
            "has_more": more, "next_before": start if more else None}


@router.get("/v1/history/approval")
async def approval_history(state: Annotated[AppState, Depends(require_admin)],
                           hours: Hours = 48, before: Before = None) -> dict:
    """Thumbs per hour per policy version (the version that produced the rated answer), with
    the approval and its 95% interval; hours without thumbs are absent."""
    return await to_thread.run_sync(lambda: _page(state, hours, before, by_version=True))


@router.get("/v1/history/feedback")
async def feedback_history(state: Annotated[AppState, Depends(require_admin)],
                           hours: Hours = 48, before: Before = None) -> dict:
    """Thumbs stored per hour, up and down; hours without thumbs are absent."""
    return await to_thread.run_sync(lambda: _page(state, hours, before, by_version=False))
