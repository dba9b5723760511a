"""Routes that store what users think of the answers."""

from __future__ import annotations

import asyncio
import functools
import json
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from feedback_store import Store
from feedback_store.errors import InvalidInputError, StoreError
from feedback_store.feedback import MAX_CLIENT_KEY_LENGTH
from server.errors import ErrorResponse
from server.feedback.protocol import FeedbackRequest, RankingRequest
from server.ratelimit import check_feedback_rate
from server.state import AppState, require_admin, require_user

router = APIRouter()
T = TypeVar("T")

# Store calls of these routes run on threads of their own, fewer than the store's pooled
# connections (20), so that a call never opens an overflow connection, a PostgreSQL backend
# forked and closed again: on anyio's default limiter (40 threads) many writes did under load.
STORE_THREADS = 16
FEEDBACK_WRITES = 2  # batches of ratings written at once; ratings arriving meanwhile wait
FEEDBACK_BATCH = 256  # most ratings in one batch (one INSERT of arrays, see Store.add_feedbacks)

# An empty key is refused (400), not stored as a key; keys are scoped per API key (the store's
# `scoped_key`), so the longest a client may send is the column's width less the scope.
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                              max_length=MAX_CLIENT_KEY_LENGTH)]
Outcome = tuple[dict[str, Any], bool] | StoreError
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


class FeedbackWrites:
    """Group commit on the event loop: ratings that arrive while FEEDBACK_WRITES batches are being
    written wait, then go together (Store.add_feedbacks): one thread hand-off, one statement and
    one commit for all of them. A rating that finds a write free is written at once.

    On a busy 2-core machine every thread hand-off and wake-up is costly: against one store call
    per rating, batching halved the server's CPU per rating and cut PostgreSQL's by four
    (bench/feedback_ingest.py).
    """

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._store = weakref.ref(store)  # the store owns this object (see _feedback_writes)
        self._pending: list[tuple[dict[str, Any], asyncio.Future[Outcome]]] = []
        self._writing = 0

    def add(self, request: dict[str, Any]) -> asyncio.Future[Outcome]:
        """`add_feedback`'s (record, created), or the StoreError it would raise, for `request`."""
        future = self.loop.create_future()
        self._pending.append((request, future))
        if self._writing < FEEDBACK_WRITES:
            self._write()
        return future

    def _write(self) -> None:
        store = self._store()
        assert store is not None, "a request holds the store while its rating is pending"
        batch = self._pending[:FEEDBACK_BATCH]
        del self._pending[:FEEDBACK_BATCH]
        self._writing += 1
        write = self.loop.run_in_executor(
            _store_threads(), store.add_feedbacks, [request for request, _ in batch]
        )
        write.add_done_callback(functools.partial(self._written, batch))

    def _written(self, batch: list[tuple[dict[str, Any], asyncio.Future[Outcome]]],
                 write: asyncio.Future[list[Outcome]]) -> None:
        self._writing -= 1
        if self._pending:
            self._write()
        error = None if write.cancelled() else write.exception()
        for i, (_, future) in enumerate(batch):
            if future.done():  # its request was cancelled
                continue
            if write.cancelled():
                future.cancel()
            elif error is not None:  # e.g. StoreUnavailableError: for every rating of the batch
                future.set_exception(error)
            else:
                future.set_result(write.result()[i])


_writes: weakref.WeakKeyDictionary[Store, FeedbackWrites] = weakref.WeakKeyDictionary()


def _feedback_writes(store: Store) -> FeedbackWrites:
    """The batches of this store on the running loop (in tests a store can outlive a loop)."""
    loop = asyncio.get_running_loop()
    writes = _writes.get(store)
    if writes is None or writes.loop is not loop:
        writes = _writes[store] = FeedbackWrites(store, loop)
    return writes


def _created(record: dict, created: bool) -> JSONResponse:
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(record, status_code=201, headers=headers)


@router.post("/v1/feedback", status_code=201, responses=WRITE_RESPONSES)
async def post_feedback(body: FeedbackRequest, request: Request,
                        state: Annotated[AppState, Depends(require_user)],
                        idempotency_key: IdempotencyKey = None) -> JSONResponse:
    check_feedback_rate(request, state, body.user)
    outcome = await _feedback_writes(state.store).add({
        "completion_id": body.completion_id, "choice_index": body.choice_index,
        "rating": body.rating, "comment": body.comment, "user": body.user,
        "idempotency_key": idempotency_key,
        "idempotency_scope": state.auth.idempotency_scope(request),
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
    check_feedback_rate(request, state, body.user)
    scope = state.auth.idempotency_scope(request)
    try:
        record, created = await _in_store_thread(lambda: state.store.add_ranking(
            items=body.as_items(), user=body.user, idempotency_key=idempotency_key,
            idempotency_scope=scope,
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
