"""The serving plan: which versions every server serves, how it is published, read and decided.

What every server serves is a ``ServingPlan``: the active version and, during a rollout, a canary
with its share of traffic. The one ``Publisher`` ``SET``s the active-version key (a
``PolicyMessage``) and the canary key (a ``CanaryMessage``, deleted when none runs), and
``PUBLISH``es the whole plan on the policy channel, in one MULTI. The published JSON is the active
version's message (``{"version", "path", "sha256"}``, as the contract fixes it) plus a
``"canary"`` field. A server reads both keys on start and on every reconnect (``Publisher.read``,
``read_announced``), so a lost message is never a lost swap.

SQL is the record of truth: every activation and canary is written there before it is announced
on Redis. So a server that can read SQL serves what SQL says, whatever Redis holds (a key Redis
kept through an outage cannot undo a rollback made meanwhile, and a version SQL does not know is
never served). Only while SQL cannot be read does the Redis announcement decide: one decision,
``decide``, used at start-up (``initial_plan``), on every Redis message and on every SQL poll.
Applying a plan to an engine is the server's (``server/hotswap.py``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from feedback_store import Store
from feedback_store.errors import StoreError
from flywheel.checkpoints import CheckpointError, Manifest, digest_of, verify_servable
from flywheel.rater_pooling import CANARY_UNITS
from flywheel.settings import Settings
from flywheel.versions import BASE_POLICY

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

REPLICA_REPORT_SECONDS = 10.0  # each server says what it serves this often (and on every change)
REPLICA_STALE_SECONDS = 3 * REPLICA_REPORT_SECONDS  # older reports are servers that went away


@dataclass(frozen=True)
class RedisKeys:
    """Every Redis key and channel Flywheel uses, under one namespace (``redis_namespace``)."""

    namespace: str = "flywheel"

    @property
    def active_policy(self) -> str:
        """JSON PolicyMessage of the served version."""
        return f"{self.namespace}:policy:active"

    @property
    def canary_policy(self) -> str:
        """JSON CanaryMessage of the version on canary; absent when none runs."""
        return f"{self.namespace}:policy:canary"

    @property
    def policy_channel(self) -> str:
        """PUBLISHed ServingPlan on every change of the active version or the canary."""
        return f"{self.namespace}:policy:updates"

    @property
    def servers(self) -> str:
        """Hash: replica id -> JSON of what it serves (``ReplicaReport``), refreshed by each."""
        return f"{self.namespace}:servers"

    @property
    def trainer_lock(self) -> str:
        """Leader lock of the trainer workers: value = worker id, with a TTL."""
        return f"{self.namespace}:trainer:leader"

    @property
    def plan(self) -> tuple[str, str]:
        """The keys that hold the plan: (active, canary), read together."""
        return self.active_policy, self.canary_policy


def _fields(raw: str | bytes | dict[str, Any]) -> dict[str, Any]:
    try:
        data = raw if isinstance(raw, dict) else json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed policy message: {raw!r}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"malformed policy message: {raw!r}")
    return data


@dataclass(frozen=True)
class PolicyMessage:
    """A version and where its verified checkpoint lies."""

    version: str
    path: str
    sha256: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes | dict[str, Any]) -> PolicyMessage:
        """Parse a message; raises ``ValueError`` on anything malformed."""
        data = _fields(raw)
        try:
            return cls(version=str(data["version"]), path=str(data["path"]),
                       sha256=str(data["sha256"]))
        except KeyError as exc:
            raise ValueError(f"malformed policy message: {raw!r}") from exc

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PolicyMessage:
        """The message of a policy row of the store."""
        return cls(version=row["id"], path=row["path"], sha256=row.get("sha256") or "")


@dataclass(frozen=True)
class CanaryMessage(PolicyMessage):
    """A version on canary, served to ``fraction`` of new requests beside the active one, drawn
    per request or sticky per rater (``unit``: "request" or "user")."""

    fraction: float = 0.0
    unit: str = "user"

    @classmethod
    def from_json(cls, raw: str | bytes | dict[str, Any]) -> CanaryMessage:
        data = _fields(raw)
        base = PolicyMessage.from_json(data)
        try:
            fraction = float(data["fraction"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed canary message: {raw!r}") from exc
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"canary fraction {fraction} outside (0, 1)")
        unit = data.get("unit", "user")  # an older publisher's canaries are sticky per user
        if unit not in CANARY_UNITS:
            raise ValueError(f"canary unit {unit!r} is not one of {CANARY_UNITS}")
        return cls(base.version, base.path, base.sha256, fraction, unit)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CanaryMessage:
        canary = row.get("canary") or {}
        return cls(version=row["id"], path=row["path"], sha256=row.get("sha256") or "",
                   fraction=float(canary.get("fraction") or 0.0),
                   unit=canary.get("unit") or "user")


@dataclass(frozen=True)
class ServingPlan:
    """What every server serves: the active version, and the canary beside it when one runs."""

    active: PolicyMessage
    canary: CanaryMessage | None = None

    def to_json(self) -> str:
        body: dict[str, Any] = asdict(self.active)
        body["canary"] = None if self.canary is None else asdict(self.canary)
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ServingPlan:
        """Parse a channel message. A message without a ``"canary"`` field (an older publisher)
        announces an active version and no canary."""
        data = _fields(raw)
        canary = data.get("canary")
        return cls(PolicyMessage.from_json(data),
                   None if canary is None else CanaryMessage.from_json(canary))


def _plan_of(active: str | bytes | None, canary: str | bytes | None) -> ServingPlan | None:
    """The plan the two keys' values announce; None without an active version."""
    if active is None:
        return None
    return ServingPlan(PolicyMessage.from_json(active),
                       None if canary is None else CanaryMessage.from_json(canary))


async def read_announced(client: aioredis.Redis, keys: RedisKeys) -> ServingPlan | None:
    """``Publisher.read`` on an asyncio client (a server's watcher, after every (re)connect);
    raises as it does."""
    return _plan_of(*await client.mget(*keys.plan))


class Publisher:
    """The one way served versions reach Redis (worker, admin routes, rollbacks).

    Synchronous; async callers run it in a thread. Returns False instead of raising when Redis is
    unreachable: servers poll SQL meanwhile and read the keys when they reconnect.
    """

    def __init__(self, client: redis.Redis | None, keys: RedisKeys) -> None:
        self.client, self.keys = client, keys
        self._malformed: set[str] = set()  # replica ids whose report did not parse, logged once

    @classmethod
    def from_url(cls, url: str, namespace: str) -> Publisher:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5) \
            if url else None
        return cls(client, RedisKeys(namespace))

    def announce(self, plan: ServingPlan) -> bool:
        """SET both keys and PUBLISH the plan, in one MULTI."""
        if self.client is None:
            return False
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.keys.active_policy, plan.active.to_json())
            if plan.canary is None:
                pipe.delete(self.keys.canary_policy)
            else:
                pipe.set(self.keys.canary_policy, plan.canary.to_json())
            pipe.publish(self.keys.policy_channel, plan.to_json())
            pipe.execute()
            return True
        except (redis.RedisError, OSError) as exc:
            log.warning("could not publish %s: %s (servers will find it in SQL)",
                        plan.active.version, exc)
            return False

    def read(self) -> ServingPlan | None:
        """The plan the keys hold (what a server reads on start); raises
        ``redis.RedisError``/``OSError`` when unreachable, ``ValueError`` when malformed."""
        if self.client is None:
            return None
        return _plan_of(*self.client.mget(*self.keys.plan))

    def replicas(self, max_age_s: float = REPLICA_STALE_SECONDS) -> list[dict[str, Any]]:
        """What each replica reported serving within ``max_age_s``; [] when Redis is away."""
        if self.client is None:
            return []
        try:
            raw = self.client.hgetall(self.keys.servers)
        except (redis.RedisError, OSError):
            return []
        now, found = time.time(), []
        for replica, report in raw.items():
            name = replica.decode(errors="replace") if isinstance(replica, bytes) else replica
            data = replica_report(report)
            if data is None:
                if name not in self._malformed:  # once per replica id, not on every poll
                    self._malformed.add(name)
                    log.warning("skipping replica report %r that does not parse: %.200r",
                                name, report)
            elif now - data["at"] <= max_age_s:
                found.append({"id": name, **data})
        return sorted(found, key=lambda r: r["id"])

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def replica_report(raw: bytes | str) -> dict[str, Any] | None:
    """A replica's report (`server/hotswap.py` `report`) as {active, canary, at}; None unless
    it has that shape: anyone who can write Redis can write this hash."""
    try:
        data = json.loads(raw)
        report = {"active": data["active"], "canary": data.get("canary"),
                  "at": float(data["at"])}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not isinstance(report["active"], str) or not isinstance(report["canary"], str | None):
        return None
    return report


Rows = tuple[dict[str, Any] | None, dict[str, Any] | None]  # (active, canary) rows of the store


def plan_from_rows(active: dict[str, Any], canary: dict[str, Any] | None) -> ServingPlan:
    """The plan SQL records (the active row must have stored files)."""
    on_canary = canary if canary is not None and canary.get("path") else None
    return ServingPlan(PolicyMessage.from_row(active),
                       None if on_canary is None else CanaryMessage.from_row(on_canary))


def decide(sql: Rows | None, announced: ServingPlan | None) -> ServingPlan | None:
    """The plan to serve, from SQL's rows (None: unreadable) and Redis's announcement (None:
    absent or unreadable); None means keep serving what is loaded."""
    if sql is None:
        return announced
    active, canary = sql
    if active is None or not active.get("path"):
        return None  # nothing recorded yet: a version SQL does not know is never served
    if announced is not None and announced.active.version != active["id"]:
        log.info("Redis announces %s, SQL records %s as active: following SQL",
                 announced.active.version, active["id"])
    return plan_from_rows(active, canary)


def check_servable(message: PolicyMessage, settings: Settings, *,
                   contents: bool = True) -> Manifest:
    """What every server checks before loading a version, and what activation checks before
    recording one (raises ``CheckpointError``): see ``flywheel.checkpoints.verify_servable``.
    ``contents=False`` for a loader that hashes the files as it reads them."""
    root = settings.checkpoint_dir or settings.data_dir / "checkpoints"
    return verify_servable(message.path, version=message.version, sha256=message.sha256 or None,
                           root=root, base_model=settings.model, contents=contents)


def read_sql(store: Store) -> Rows | None:
    """(active, canary) rows, or None when the database cannot be read."""
    try:
        return store.serving_state()
    except StoreError as exc:
        log.debug("serving state not readable from SQL: %s", exc)
        return None


def record_base_policy(settings: Settings, store: Store) -> dict[str, Any]:
    """Record the base model as ``policy-0`` on first start; returns the active policy row."""
    active = store.active_policy()
    if active is not None:
        return active
    return store.ensure_base_policy(settings.model, digest_of(settings.model))


def announce(store: Store, publisher: Publisher) -> tuple[ServingPlan | None, bool]:
    """Publish what SQL now records (call after every change of the active version or canary);
    returns the plan and whether Redis took it."""
    active, canary = store.serving_state()
    if active is None or not active.get("path"):
        return None, False
    plan = plan_from_rows(active, canary)
    return plan, publisher.announce(plan)


def initial_plan(settings: Settings, store: Store, publisher: Publisher) -> ServingPlan:
    """The plan a server starts on (blocking): decided like every later one, its active version
    verified (its ``sha256`` the digest checked, "" when none was); the base model when nothing
    verifiable is recorded. The canary, if any, is loaded
    by the watcher's first refresh, once the engine serves."""
    record_base_policy(settings, store)
    try:
        announced = publisher.read()
    except (redis.RedisError, OSError, ValueError) as exc:
        log.warning("serving plan not readable from Redis (%s); using SQL", exc)
        announced = None
    sql = read_sql(store)
    # While SQL cannot be read, nothing is started on Redis's word (as server/hotswap.py follows).
    plan = decide(sql, announced if sql is not None else None)
    if plan is not None and not (plan.active.version == BASE_POLICY
                                 and plan.active.path == settings.model):
        try:
            check_servable(plan.active, settings)
            return plan
        except CheckpointError as exc:
            log.error("cannot start on %s: %s; starting on the base model", plan.active.version,
                      exc)
    return ServingPlan(verified_base(settings, store), None if plan is None else plan.canary)


def verified_base(settings: Settings, store: Store) -> PolicyMessage:
    """The base model, checked like any version against the digest recorded on its first start
    (raises ``CheckpointError`` when its files changed), with that digest for the engine to hold
    what it loads to. A base model at another path than the recorded one (the operator moved it)
    is not checked here and comes without a digest: its contents are checked when a swap serves
    it again."""
    row = store.get_policy(BASE_POLICY)
    message = PolicyMessage(BASE_POLICY, settings.model, row.get("sha256") or "")
    recorded = row.get("path")
    if message.sha256 and recorded and Path(recorded).resolve() == Path(settings.model).resolve():
        check_servable(message, settings)
        return message
    return PolicyMessage(BASE_POLICY, settings.model, "")
