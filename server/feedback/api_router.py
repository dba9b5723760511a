"""Routes that store what users think of the answers."""

from __future__ import annotations

import json
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse, Response

from server.errors import APIError
from server.feedback.protocol import FeedbackRequest, RankingRequest
from server.state import AppState, require_admin, require_user

router = APIRouter()

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


def _created(record: dict, created: bool) -> JSONResponse:
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(record, status_code=201, headers=headers)


@router.post("/v1/feedback", status_code=201)
async def post_feedback(body: FeedbackRequest, state: Annotated[AppState, Depends(require_user)],
                        idempotency_key: IdempotencyKey = None) -> JSONResponse:
    record, created = await to_thread.run_sync(lambda: state.store.add_feedback(
        completion_id=body.completion_id, choice_index=body.choice_index, rating=body.rating,
        comment=body.comment, user=body.user, idempotency_key=idempotency_key,
    ))
    if created:
        state.metrics.feedback.labels(body.rating).inc()
    return _created(record, created)


@router.post("/v1/rankings", status_code=201)
async def post_ranking(body: RankingRequest, state: Annotated[AppState, Depends(require_user)],
                       idempotency_key: IdempotencyKey = None) -> JSONResponse:
    items = body.as_items()
    if len(set(items)) != len(items):
        raise APIError(400, "A ranking may not name the same answer twice.", param="ranking",
                       code="duplicate_items")
    record, created = await to_thread.run_sync(lambda: state.store.add_ranking(
        items=items, user=body.user, idempotency_key=idempotency_key,
    ))
    if created:
        state.metrics.feedback.labels("ranking").inc()
    return _created(record, created)


@router.get("/v1/feedback/export")
async def export_feedback(state: Annotated[AppState, Depends(require_admin)]) -> Response:
    rows = await to_thread.run_sync(lambda: list(state.store.export_preferences()))
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return Response(text, media_type="application/jsonl")
