"""The server's side of the hot-swap protocol: follow the active policy version, swap the engine.

With Redis: subscribe to the policy channel, and read the active-version key after every
(re)connect, so a message lost while disconnected is never a lost swap. Without Redis, or while it
is unreachable: poll the active policy row in SQL. Every checkpoint is verified before it is
loaded; a corrupt one is refused and logged, and the old weights keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from contextlib import suppress

import redis.asyncio as aioredis
from anyio import to_thread
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from feedback_store import Store
from feedback_store.errors import StoreError
from flywheel.checkpoints import CheckpointError, verify
from flywheel.hotswap import PolicyMessage, RedisKeys, publish_policy_async
from flywheel.settings import Settings
from server.engines.base import Engine, SwapError
from server.metrics import ServerMetrics
from server.policy import superseded_by

log = logging.getLogger(__name__)

SQL_POLL_SECONDS = 2.0  # while Redis is down or absent
SQL_RECHECK_SECONDS = 30.0  # while Redis is up: SQL stays the record of truth
REFUSED_RETRY_SECONDS = 60.0  # a refused checkpoint is not retried more often than this


class Backoff:
    """Capped exponential backoff with full jitter (dramatiq-style)."""

    def __init__(self, base: float = 0.2, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


def message_from_row(row: dict) -> PolicyMessage:
    return PolicyMessage(version=row["id"], path=row["path"], sha256=row.get("sha256") or "")


class PolicyWatcher:
    """Keeps one engine on the active policy version."""

    def __init__(self, settings: Settings, engine: Engine, store: Store,
                 metrics: ServerMetrics) -> None:
        self.settings, self.engine, self.store, self.metrics = settings, engine, store, metrics
        self.keys = RedisKeys(settings.redis_namespace)
        self.redis: aioredis.Redis | None = (
            # No client-side retries: a reconnect hidden inside redis-py would skip the key read
            # that follows every (re)connect here, and a message lost meanwhile would stay lost.
            aioredis.from_url(settings.redis_url, socket_connect_timeout=2,
                              socket_timeout=None, health_check_interval=5,
                              retry=Retry(NoBackoff(), 0))
            if settings.redis_url else None
        )
        self.redis_connected = False
        self._lock = asyncio.Lock()
        self._refused: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="policy-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        if self.redis is not None:
            await self.redis.aclose()

    async def publish(self, message: PolicyMessage) -> bool:
        """Announce a new active version to every replica; False when Redis is not reachable."""
        if self.redis is None:
            return False
        try:
            await publish_policy_async(self.redis, self.keys, message)
            return True
        except (RedisError, OSError) as exc:
            log.warning("could not publish %s: %s (replicas will find it in SQL)",
                        message.version, exc)
            return False

    async def apply(self, message: PolicyMessage) -> bool:
        """Verify and swap to ``message``; True when the engine now serves it."""
        async with self._lock:
            if message.version == self.engine.policy_version:
                return True
            key = (message.version, message.sha256)
            refused_at = self._refused.get(key)
            if refused_at is not None and time.monotonic() - refused_at < REFUSED_RETRY_SECONDS:
                return False
            try:
                await to_thread.run_sync(lambda: verify(message.path, message.sha256 or None,
                                                        message.version))
                await self.engine.swap_weights(message.path, message.version)
            except (CheckpointError, SwapError, OSError) as exc:
                self._refused[key] = time.monotonic()
                self.metrics.swaps.labels("refused").inc()
                log.error("refused policy %s from %s: %s; still serving %s", message.version,
                          message.path, exc, self.engine.policy_version)
                return False
            self.metrics.swaps.labels("ok").inc()
            self.metrics.set_policy(message.version)
            log.info("now serving %s", message.version)
            return True

    async def _apply_raw(self, raw: str | bytes | None, *, from_key: bool = False) -> None:
        """Apply a message; one read from the key is checked against SQL first.

        A PUBLISHed message is fresh (SQL is written before it), but the key may have outlived
        an activation made while Redis was away: SQL wins then. Messages skip the SQL read, so
        a swap never waits on the database.
        """
        if raw is None:
            return
        try:
            message = PolicyMessage.from_json(raw)
        except ValueError as exc:
            log.error("ignoring policy message: %s", exc)
            return
        if from_key and message.version != self.engine.policy_version:
            active = await to_thread.run_sync(superseded_by, self.store, message.version)
            if active is not None:
                log.warning("Redis key names %s, which SQL has since replaced by %s; "
                            "following SQL", message.version, active["id"])
                message = message_from_row(active)
        await self.apply(message)

    async def check_sql(self) -> None:
        try:
            row = await to_thread.run_sync(self.store.active_policy)
        except StoreError as exc:
            log.debug("active policy not readable from SQL: %s", exc)
            return
        if row is not None and row.get("path"):
            await self.apply(message_from_row(row))

    async def _run(self) -> None:
        if self.redis is None:
            while True:
                await self.check_sql()
                await asyncio.sleep(SQL_POLL_SECONDS)
        backoff = Backoff()
        while True:
            try:
                await self._follow_redis(backoff)
            except (RedisError, OSError) as exc:
                if self.redis_connected:
                    log.warning("lost Redis (%s); polling SQL until it is back", exc)
                self.redis_connected = False
            await self.check_sql()
            await asyncio.sleep(min(backoff.next(), SQL_POLL_SECONDS))

    async def _follow_redis(self, backoff: Backoff) -> None:
        assert self.redis is not None
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(self.keys.policy_channel)
            # Read the key only after subscribing: nothing can slip between the two.
            await self._apply_raw(await self.redis.get(self.keys.active_policy), from_key=True)
            if not self.redis_connected:
                log.info("following policy updates on Redis")
            self.redis_connected = True
            backoff.reset()
            last_sql = time.monotonic()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    await self._apply_raw(message["data"])
                if time.monotonic() - last_sql > SQL_RECHECK_SECONDS:
                    await self.check_sql()
                    last_sql = time.monotonic()
