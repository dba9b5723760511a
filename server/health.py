"""`/v1/models`, `/healthz`, `/readyz` and `/metrics`."""

from __future__ import annotations

import time
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from feedback_store.errors import StoreError
from flywheel.live_approval import forgotten
from server.auth import exposed
from server.errors import APIError, error_body
from server.state import AppState, get_state, require_user

router = APIRouter()
_STARTED = int(time.time())


@router.get("/v1/models")
async def list_models(state: Annotated[AppState, Depends(require_user)]) -> dict:
    return {"object": "list", "data": [{
        "id": state.settings.served_model_name, "object": "model", "created": _STARTED,
        "owned_by": "flywheel", "policy_version": state.engine.policy_version,
        "max_model_len": state.engine.max_model_len,
    }]}


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when the model is loaded and the database answers."""
    state = getattr(request.app.state, "flywheel", None)
    if state is None:
        return JSONResponse(error_body(503, "model not loaded"), status_code=503,
                            headers={"Retry-After": "2"})
    if state.engine.stats().extra.get("degraded"):
        reason = "engine degraded (a failed weight swap or a dead engine core)"
        return JSONResponse(error_body(503, reason), status_code=503,
                            headers={"Retry-After": "5"})
    try:
        await to_thread.run_sync(lambda: state.store.ping(write=True))
    except StoreError as exc:
        return JSONResponse(error_body(503, f"database unavailable: {exc.message}"),
                            status_code=503, headers={"Retry-After": "2"})
    watcher = state.watcher
    return JSONResponse({
        "status": "ready", "policy_version": state.engine.policy_version,
        "canary": state.split.version,
        "redis": None if watcher is None or watcher.redis is None else watcher.redis_connected,
        "regression": await to_thread.run_sync(_regression, state),
    })


def _regression(state: AppState) -> dict | None:
    """A stored version users rate significantly better than the active one: ready still (the
    server serves), but said, so an operator or the worker's auto-rollback can act."""
    try:
        return forgotten(state.store.list_policies(), state.store.live_ratings(),
                         state.settings.canary, state.store.pooled_live())
    except StoreError:
        return None


class MetricsResponse(Response):
    media_type = "text/plain"  # the schema's; the header carries Prometheus' version too


@router.get("/metrics", response_class=MetricsResponse)
async def metrics(request: Request) -> Response:
    """Prometheus text format. Closed (404, as if absent) on a server with keys unless
    FLYWHEEL_EXPOSE_METRICS is true; open without keys unless it is false."""
    state = get_state(request)
    if not exposed(state.settings.expose_metrics, state.settings):
        raise APIError(404, "Not Found")
    body = await to_thread.run_sync(state.metrics.render)
    return MetricsResponse(body, media_type=CONTENT_TYPE_LATEST)
