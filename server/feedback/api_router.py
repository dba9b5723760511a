"""Routes that store what users think of the answers, and what they did with them."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from feedback_store.errors import InvalidInputError, StoreError
from feedback_store.feedback import MAX_CLIENT_KEY_LENGTH
from server.errors import ErrorResponse
from server.feedback.protocol import FeedbackRequest, ImplicitRequest, RankingRequest
from server.ratelimit import check_feedback_rate
from server.state import AppState, require_admin, require_user

router = APIRouter()
T = TypeVar("T")

# Store calls of these routes run on threads of their own, fewer than the store's pooled
# connections (20) with the group commits' threads (server/*/recording.py), so that a call never
# opens an overflow connection, a PostgreSQL backend forked and closed again: on anyio's default
# limiter (40 threads) many writes did under load.
STORE_THREADS = 16

# An empty key is refused (400), not stored as a key; keys are scoped per API key (the store's
# `scoped_key`), so the longest a client may send is the column's width less the scope.
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                              max_length=MAX_CLIENT_KEY_LENGTH)]
# What the write routes answer besides 201 and the statuses every route documents.
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such completion or choice"},
    422: {"model": ErrorResponse,
          "description": "The Idempotency-Key was used before with a different body"},
}


class JSONLinesResponse(Response):
    media_type = "application/jsonl"


@functools.cache
def _store_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="feedback-store")


async def _in_store_thread(call: Callable[[], T]) -> T:
    """Run a blocking store call off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_store_threads(), call)


def _created(record: dict, created: bool) -> JSONResponse:
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(record, status_code=201, headers=headers)


@router.post("/v1/feedback", status_code=201, responses=WRITE_RESPONSES)
async def post_feedback(body: FeedbackRequest, request: Request,
                        state: Annotated[AppState, Depends(require_user)],
                        idempotency_key: IdempotencyKey = None) -> JSONResponse:
    rater = state.auth.rater(request, body.user)
    check_feedback_rate(request, state, rater)
    outcome = await state.feedback_writes.add({
        "completion_id": body.completion_id, "choice_index": body.choice_index,
        "rating": body.rating, "comment": body.comment, "user": body.user,
        "idempotency_key": idempotency_key,
        "idempotency_scope": rater.key_scope, "rater": rater,
    })
    if isinstance(outcome, StoreError):
        raise outcome
    record, created = outcome
    if created:
        state.metrics.feedback.labels(body.rating).inc()
    return _created(record, created)


@router.post("/v1/rankings", status_code=201, responses=WRITE_RESPONSES)
async def post_ranking(body: RankingRequest, request: Request,
                       state: Annotated[AppState, Depends(require_user)],
                       idempotency_key: IdempotencyKey = None) -> JSONResponse:
    rater = state.auth.rater(request, body.user)
    check_feedback_rate(request, state, rater)
    try:
        record, created = await _in_store_thread(lambda: state.store.add_ranking(
            items=body.as_items(), user=body.user, idempotency_key=idempotency_key,
            idempotency_scope=rater.key_scope, rater=rater,
        ))
    except InvalidInputError as error:
        if body.ranking is not None and error.param == "items":
            error.param = "ranking"  # the field this request used
        raise
    if body.completion_id is not None:  # echo the request's form too, tie groups as lists
        record = {**record, "completion_id": body.completion_id,
                  "ranking": [_indices(entry) for entry in record["items"]]}
    if created:
        state.metrics.feedback.labels("ranking").inc()
    return _created(record, created)


@router.post("/v1/feedback/implicit", status_code=201, responses={
    404: WRITE_RESPONSES[404],
    403: {"model": ErrorResponse, "description": "The answer was served to another API key"}})
async def post_implicit(body: ImplicitRequest, request: Request,
                        state: Annotated[AppState, Depends(require_user)]) -> JSONResponse:
    """What a user did with an answer besides rating it (regenerate, edit, copy): stored as its
    own kind of feedback, never as a thumb."""
    rater = state.auth.rater(request, body.user)
    check_feedback_rate(request, state, rater)
    record = await _in_store_thread(lambda: state.store.add_implicit(
        completion_id=body.completion_id, choice_index=body.choice_index, signal=body.signal,
        user=body.user, rater=rater))
    state.metrics.feedback.labels(f"implicit_{body.signal}").inc()
    return JSONResponse(record, status_code=201)


def _indices(entry: dict[str, Any] | list[dict[str, Any]]) -> int | list[int]:
    if isinstance(entry, list):
        return [answer["choice_index"] for answer in entry]
    return int(entry["choice_index"])


@router.get("/v1/feedback/export", response_class=JSONLinesResponse)
async def export_feedback(state: Annotated[AppState, Depends(require_admin)]) -> Response:
    """Preference data as JSON lines in TRL's formats."""
    rows = await to_thread.run_sync(lambda: list(state.store.export_preferences()))
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return JSONLinesResponse(text)
