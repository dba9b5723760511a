"""Routes that store what users think of the answers."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, TypeVar

from anyio import to_thread
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from server.errors import APIError
from server.feedback.protocol import FeedbackRequest, RankingRequest
from server.state import AppState, require_admin, require_user

router = APIRouter()
T = TypeVar("T")

# Feedback writes run on threads of their own, fewer than the store's pooled connections (20), so
# that a call never opens an overflow connection, a PostgreSQL backend forked and closed again:
# on anyio's default limiter (40 threads) that happened to many writes under load.
STORE_THREADS = 16

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


async def user_state(request: Request) -> AppState:
    """`require_user` as an async dependency: FastAPI runs a plain `def` dependency on a worker
    thread, a hop that cost the feedback route about a tenth of its CPU."""
    return require_user(request)


@functools.cache
def _store_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="feedback-store")


async def _in_store_thread(call: Callable[[], T]) -> T:
    """Run a blocking store call off the event loop; asyncio's executor hand-off costs the loop
    about half the CPU of anyio's to_thread (py-spy, bench/feedback_ingest.py)."""
    return await asyncio.get_running_loop().run_in_executor(_store_threads(), call)


def _created(record: dict, created: bool) -> JSONResponse:
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(record, status_code=201, headers=headers)


@router.post("/v1/feedback", status_code=201)
async def post_feedback(body: FeedbackRequest, state: Annotated[AppState, Depends(user_state)],
                        idempotency_key: IdempotencyKey = None) -> JSONResponse:
    record, created = await _in_store_thread(lambda: state.store.add_feedback(
        completion_id=body.completion_id, choice_index=body.choice_index, rating=body.rating,
        comment=body.comment, user=body.user, idempotency_key=idempotency_key,
    ))
    if created:
        state.metrics.feedback.labels(body.rating).inc()
    return _created(record, created)


@router.post("/v1/rankings", status_code=201)
async def post_ranking(body: RankingRequest, state: Annotated[AppState, Depends(user_state)],
                       idempotency_key: IdempotencyKey = None) -> JSONResponse:
    items = body.as_items()
    if len(set(items)) != len(items):
        raise APIError(400, "A ranking may not name the same answer twice.", param="ranking",
                       code="duplicate_items")
    record, created = await _in_store_thread(lambda: state.store.add_ranking(
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
