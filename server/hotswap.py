"""The server's side of the hot swap: apply the serving plan to the engine.

``flywheel.serving_plan`` publishes, reads and decides the plan; this watcher only listens and
applies. With Redis: subscribe to the policy channel, and read the plan's keys
(``serving_plan.read_announced``) after every (re)connect, so a message lost while disconnected is
never a lost swap. Without Redis, or while it is unreachable: poll SQL. Every one of these paths
ends in ``refresh``, which decides the plan with ``serving_plan.decide`` (SQL first) and applies
it. Every checkpoint is verified before it is loaded; a corrupt one is refused and logged, and the
old weights keep serving.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress

import redis.asyncio as aioredis
from anyio import to_thread
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from feedback_store import Store
from flywheel.checkpoints import CheckpointError
from flywheel.serving_plan import (
    REPLICA_REPORT_SECONDS,
    CanaryMessage,
    PolicyMessage,
    RedisKeys,
    ServingPlan,
    check_servable,
    decide,
    read_announced,
    read_sql,
)
from flywheel.settings import Settings
from server.canary_split import CanarySplit
from server.engines.base import Engine, SwapError
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

SQL_POLL_SECONDS = 2.0  # while Redis is down or absent
SQL_RECHECK_SECONDS = 30.0  # while Redis is up: SQL stays the record of truth
REFUSED_RETRY_SECONDS = 60.0  # a refused checkpoint is not retried more often than this
IGNORED_LOG_SECONDS = 60.0  # malformed policy messages are logged, counted, this often at most


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


class PolicyWatcher:
    """Keeps one engine on the serving plan: the active version, and the canary beside it."""

    def __init__(self, settings: Settings, engine: Engine, store: Store,
                 metrics: ServerMetrics, split: CanarySplit) -> None:
        self.settings, self.engine, self.store, self.metrics = settings, engine, store, metrics
        self.split = split
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
        self.replica_id = (f"{socket.gethostname()}:{settings.port}:{os.getpid()}:"
                           f"{uuid.uuid4().hex[:6]}")
        self._reported = 0.0
        self._lock = asyncio.Lock()
        self._refused: dict[tuple[str, str], float] = {}
        self._verified: set[tuple[str, str]] = set()  # (version, digest) SQL showed as served
        self._ignored, self._ignored_logged = 0, -IGNORED_LOG_SECONDS
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="policy-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        if self.redis is not None:
            with suppress(RedisError, OSError):
                await self.redis.hdel(self.keys.servers, self.replica_id)
            await self.redis.aclose()

    async def refresh(self, announced: ServingPlan | None = None) -> None:
        """Decide the plan (SQL's rows first, ``announced`` while SQL is away) and apply it."""
        sql = await to_thread.run_sync(read_sql, self.store)
        if sql is not None:
            for row in sql:
                if row is not None and row.get("path"):
                    message = PolicyMessage.from_row(row)
                    self._verified.add((message.version, message.sha256))
        elif announced is not None and not self._known(announced):
            return
        plan = decide(sql, announced)
        if plan is not None:
            await self.apply(plan)

    def _known(self, plan: ServingPlan) -> bool:
        """While SQL cannot be read, Redis alone moves this replica only between versions it
        serves or that SQL showed it before, with the same digest: anyone who can write Redis
        could otherwise have any sealed directory served. Refusals count and log as swaps'."""
        for message in (plan.active, plan.canary):
            if message is None or message.version in (self.engine.policy_version,
                                                      self.engine.canary_version):
                continue
            key = (message.version, message.sha256)
            if key in self._verified:
                continue
            refused_at = self._refused.get(key)
            if refused_at is None or time.monotonic() - refused_at >= REFUSED_RETRY_SECONDS:
                self._refused[key] = time.monotonic()
                self.metrics.swaps.labels("refused").inc()
                log.error("refused policy %s from %s: announced on Redis while SQL cannot be "
                          "read, and not recorded in SQL as seen before; still serving %s",
                          message.version, message.path, self.engine.policy_version)
            return False
        return True

    async def apply(self, plan: ServingPlan) -> None:
        """Bring the engine to ``plan``: the active version first, then the canary."""
        async with self._lock:
            before = self._serving()
            await self._apply_active(plan.active)
            await self._apply_canary(plan.canary)
            changed = self._serving() != before
        if changed:
            await self.report()

    def _serving(self) -> tuple[str, str | None, float, str]:
        return (self.engine.policy_version, self.engine.canary_version, self.split.fraction,
                self.split.unit)

    def _changes_nothing(self, plan: ServingPlan) -> bool:
        """Whether ``plan`` is what this replica serves already."""
        canary = plan.canary
        if canary is None or canary.version == plan.active.version:
            wanted = (plan.active.version, None, 0.0, "user")
        else:
            wanted = (plan.active.version, canary.version, canary.fraction, canary.unit)
        return self._serving() == wanted

    async def report(self) -> None:
        """Tell Redis what this replica serves (shown per replica in ``GET /v1/policies``)."""
        if self.redis is None:
            return
        body = json.dumps({"active": self.engine.policy_version,
                           "canary": self.engine.canary_version, "at": time.time()})
        try:
            await self.redis.hset(self.keys.servers, self.replica_id, body)
            self._reported = time.monotonic()
        except (RedisError, OSError) as exc:
            log.debug("could not report what this replica serves: %s", exc)

    async def _apply_active(self, message: PolicyMessage) -> None:
        if message.version == self.engine.policy_version:
            return
        if message.version == self.engine.canary_version:
            self.split.clear()  # promotion: the loaded canary weights become the active ones
        if await self._load(message, self.engine.swap_weights):
            self.metrics.set_policy(message.version)
            log.info("now serving %s", message.version)

    async def _apply_canary(self, message: CanaryMessage | None) -> None:
        if message is None or message.version == self.engine.policy_version:
            if self.engine.canary_version is not None:
                self.split.clear()
                await self.engine.end_canary()
                log.info("canary ended; serving %s only", self.engine.policy_version)
            self.metrics.set_canary(None, 0.0)
            return
        if message.version != self.engine.canary_version:
            self.split.clear()
            if not await self._load(message, self.engine.set_canary):
                return
            log.info("canary %s on %.0f%% of new requests", message.version,
                     100 * message.fraction)
        self.split.set(message.version, message.fraction, message.unit)
        self.metrics.set_canary(message.version, message.fraction)

    async def _load(self, message: PolicyMessage,
                    load: Callable[[str, str, str | None], Awaitable[None]]) -> bool:
        """Verify the checkpoint and hand it to ``load`` with the digest it matched (the engine
        holds the bytes it loads to it; one that hashes them as it loads them spares this check
        hashing them first); False (logged, counted) on refusal."""
        key = (message.version, message.sha256)
        refused_at = self._refused.get(key)
        if refused_at is not None and time.monotonic() - refused_at < REFUSED_RETRY_SECONDS:
            return False
        try:
            # An engine that hashes what it loads holds it to the digest: this check need not
            # hash the files first, unless there is no digest to hold them to.
            hashed_by_engine = self.engine.hashes_what_it_loads and bool(message.sha256)
            await to_thread.run_sync(functools.partial(
                check_servable, message, self.settings, contents=not hashed_by_engine))
            await load(message.path, message.version, message.sha256 or None)
        except (CheckpointError, SwapError, OSError) as exc:
            self._refused[key] = time.monotonic()
            self.metrics.swaps.labels("refused").inc()
            log.error("refused policy %s from %s: %s; still serving %s", message.version,
                      message.path, exc, self.engine.policy_version)
            return False
        self.metrics.swaps.labels("ok").inc()
        return True

    async def _read_keys(self) -> ServingPlan | None:
        assert self.redis is not None
        try:
            return await read_announced(self.redis, self.keys)
        except ValueError as exc:
            log.error("ignoring the policy keys: %s", exc)
            return None

    async def _on_message(self, raw: str | bytes) -> None:
        """Refresh on a message that would change what this replica serves; one that would not
        costs no SQL read, and malformed ones are logged at most once a minute (anyone who can
        publish on Redis can send thousands)."""
        try:
            plan = ServingPlan.from_json(raw)
        except ValueError as exc:
            self._ignored += 1
            if time.monotonic() - self._ignored_logged >= IGNORED_LOG_SECONDS:
                log.error("ignoring %d malformed policy message(s), the last: %s",
                          self._ignored, exc)
                self._ignored, self._ignored_logged = 0, time.monotonic()
            return
        if not self._changes_nothing(plan):
            await self.refresh(plan)

    async def _run(self) -> None:
        if self.redis is None:
            while True:
                await self.refresh()
                await asyncio.sleep(SQL_POLL_SECONDS)
        backoff = Backoff()
        while True:
            try:
                await self._follow_redis(backoff)
            except (RedisError, OSError) as exc:
                if self.redis_connected:
                    log.warning("lost Redis (%s); polling SQL until it is back", exc)
                self.redis_connected = False
            await self.refresh()
            await asyncio.sleep(min(backoff.next(), SQL_POLL_SECONDS))

    async def _follow_redis(self, backoff: Backoff) -> None:
        assert self.redis is not None
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(self.keys.policy_channel)
            # Read the keys only after subscribing: nothing can slip between the two.
            await self.refresh(await self._read_keys())
            if not self.redis_connected:
                log.info("following policy updates on Redis")
            self.redis_connected = True
            backoff.reset()
            last_sql = time.monotonic()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                # A burst is one refresh: only the newest plan matters.
                while message is not None and (newer := await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=0)) is not None:
                    message = newer
                if message is not None and message.get("type") == "message":
                    await self._on_message(message["data"])
                    last_sql = time.monotonic()
                if time.monotonic() - last_sql > SQL_RECHECK_SECONDS:
                    await self.refresh()
                    last_sql = time.monotonic()
                if time.monotonic() - self._reported > REPLICA_REPORT_SECONDS:
                    await self.report()
