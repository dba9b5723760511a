"""Which weights a server starts on: the active policy version, else the base model."""

from __future__ import annotations

import json
import logging

import redis
from anyio import to_thread

from feedback_store import Store
from feedback_store.errors import StoreError
from flywheel.checkpoints import CheckpointError, verify
from flywheel.hotswap import PolicyMessage, RedisKeys
from flywheel.policies import BASE_POLICY, record_base_policy
from flywheel.settings import Settings

log = logging.getLogger(__name__)


def _redis_active(settings: Settings) -> PolicyMessage | None:
    if not settings.redis_url:
        return None
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                      socket_timeout=2)
        try:
            raw = client.get(RedisKeys(settings.redis_namespace).active_policy)
        finally:
            client.close()
        return PolicyMessage.from_json(raw) if raw else None
    except (redis.RedisError, OSError, ValueError, json.JSONDecodeError) as exc:
        log.warning("active policy not readable from Redis (%s); using SQL", exc)
        return None


def superseded_by(store: Store, version: str) -> dict | None:
    """SQL's active row when SQL records ``version`` as retired or rejected, else None.

    Every activation is written to SQL before Redis, so an announced version that SQL has since
    retired is stale: a key Redis kept through an outage must not undo a rollback made meanwhile.
    A version SQL does not know, or an unreachable database, leaves the announcement standing.
    """
    try:
        if store.get_policy(version)["status"] not in ("retired", "rejected"):
            return None
        active = store.active_policy()
    except StoreError:
        return None
    return active if active is not None and active.get("path") else None


def _choose(settings: Settings, store: Store) -> tuple[str, str]:
    active = record_base_policy(settings, store)
    candidates = []
    announced = _redis_active(settings)
    if announced is not None and superseded_by(store, announced.version) is not None:
        log.warning("Redis announces %s, which SQL has since replaced by %s; using SQL",
                    announced.version, active["id"])
    elif announced is not None:
        candidates.append(announced)
    if active.get("path"):
        candidates.append(PolicyMessage(active["id"], active["path"], active.get("sha256") or ""))
    for message in candidates:
        if message.version == BASE_POLICY and message.path == settings.model:
            return settings.model, BASE_POLICY
        try:
            verify(message.path, message.sha256 or None, message.version)
            return message.path, message.version
        except CheckpointError as exc:
            log.error("cannot start on %s: %s", message.version, exc)
    log.warning("starting on the base model")
    return settings.model, BASE_POLICY


async def initial_policy(settings: Settings, store: Store) -> tuple[str, str]:
    """(path, version) of the weights to load at start-up."""
    return await to_thread.run_sync(_choose, settings, store)
