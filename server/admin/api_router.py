"""Routes to inspect and steer the policy versions and the trainer."""

from __future__ import annotations

from contextlib import suppress
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError

from flywheel.hotswap import PolicyMessage
from server.hotswap import message_from_row
from server.state import AppState, require_admin, require_user

router = APIRouter()

_PUBLIC_POLICY_FIELDS = ("id", "parent", "created_at", "status", "metrics")


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    force: bool = False


def _policy(row: dict) -> dict:
    body = {k: row.get(k) for k in _PUBLIC_POLICY_FIELDS}
    body["object"] = "policy"
    return body


@router.get("/v1/policies")
async def list_policies(state: Annotated[AppState, Depends(require_user)]) -> dict:
    rows = await to_thread.run_sync(state.store.list_policies)
    return {"object": "list", "data": [_policy(r) for r in rows],
            "served": state.engine.policy_version}


@router.get("/v1/policies/{policy_id}")
async def get_policy(policy_id: str, state: Annotated[AppState, Depends(require_user)]) -> dict:
    row = await to_thread.run_sync(lambda: state.store.get_policy(policy_id))
    return _policy(row)


@router.post("/v1/policies/{policy_id}/activate")
async def activate_policy(
    policy_id: str,
    state: Annotated[AppState, Depends(require_admin)],
    force: Annotated[bool, Query()] = False,
    body: Annotated[ActivateRequest | None, Body()] = None,
) -> dict:
    """Make a stored version the served one on every replica (rollback and roll-forward)."""
    force = force or bool(body and body.force)
    row = await to_thread.run_sync(lambda: state.store.activate_policy(policy_id, force=force))
    message: PolicyMessage = message_from_row(row)
    published = False
    if state.watcher is not None:
        published = await state.watcher.publish(message)
        await state.watcher.apply(message)
    result = _policy(row)
    result["published"] = published
    return result


@router.get("/v1/training/runs")
async def list_runs(state: Annotated[AppState, Depends(require_admin)],
                    limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict:
    rows = await to_thread.run_sync(lambda: state.store.list_training_runs(limit=limit))
    return {"object": "list", "data": rows}


@router.get("/v1/training/runs/{run_id}")
async def get_run(run_id: int, state: Annotated[AppState, Depends(require_admin)]) -> dict:
    return await to_thread.run_sync(lambda: state.store.get_training_run(run_id))


@router.post("/v1/training/runs", status_code=201)
async def start_run(state: Annotated[AppState, Depends(require_admin)]) -> dict:
    """Queue a training cycle now; the leading worker picks it up."""
    row = await to_thread.run_sync(lambda: state.store.create_training_run(trigger="manual"))
    if state.watcher is not None and state.watcher.redis is not None:
        with suppress(RedisError, OSError):  # a nudge only: the worker polls SQL anyway
            await state.watcher.redis.publish(state.watcher.keys.training_requests,
                                              str(row["id"]))
    return row
