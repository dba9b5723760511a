"""The hot-swap protocol: Redis names, the messages, and the one publisher of served versions.

What every server serves is a ``ServingPlan``: the active version and, during a rollout, a canary
with its share of traffic. The publisher ``SET``s the active-version key (a ``PolicyMessage``) and
the canary key (a ``CanaryMessage``, deleted when none runs), and ``PUBLISH``es the whole plan on
the policy channel, in one MULTI. The published JSON is the active version's message
(``{"version", "path", "sha256"}``, as the contract fixes it) plus a ``"canary"`` field. A server
reads both keys on start and on every reconnect, so a lost message is never a lost swap. SQL is
written before Redis, and servers take SQL's word whenever they can read it
(``flywheel.serving_plan.decide``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from flywheel.rater_pooling import CANARY_UNITS

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


class Publisher:
    """The one way served versions reach Redis (worker, admin routes, rollbacks).

    Synchronous; async callers run it in a thread. Returns False instead of raising when Redis is
    unreachable: servers poll SQL meanwhile and read the keys when they reconnect.
    """

    def __init__(self, client: redis.Redis | None, keys: RedisKeys) -> None:
        self.client, self.keys = client, keys

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
        """The plan the keys hold (what a server reads on start and reconnect); raises
        ``redis.RedisError``/``OSError`` when unreachable, ``ValueError`` when malformed."""
        if self.client is None:
            return None
        active, canary = self.client.mget(self.keys.active_policy, self.keys.canary_policy)
        if active is None:
            return None
        return ServingPlan(PolicyMessage.from_json(active),
                           None if canary is None else CanaryMessage.from_json(canary))

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
            try:
                data = json.loads(report)
            except ValueError:
                continue
            if isinstance(data, dict) and now - float(data.get("at", 0)) <= max_age_s:
                found.append({"id": replica.decode() if isinstance(replica, bytes) else replica,
                              **data})
        return sorted(found, key=lambda r: r["id"])

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
