"""The raters the trainer has read: events, agreement with the RM in service, loss weight."""

from __future__ import annotations

from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Query

from server.state import AppState, require_admin

router = APIRouter()

MAX_PAGE = 1_000


@router.get("/v1/identities")
async def list_identities(
    state: Annotated[AppState, Depends(require_admin)],
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> dict[str, Any]:
    """Identities ("user:<user>", "key:<API key digest>", "anonymous"), the least trusted first:
    `weight` < 1 marks raters who agree with the reward model significantly less often than
    chance; `user_share` is the most of a cycle's reward-model data one identity may give."""
    rows = await to_thread.run_sync(lambda: state.store.list_identities(limit=limit,
                                                                        offset=offset))
    limits = state.settings.feedback
    return {"object": "list", "data": rows, "user_share": limits.user_share,
            "disagreeing_weight": limits.disagreeing_weight,
            "rate_per_minute": limits.rate_per_minute}
