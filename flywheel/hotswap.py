"""The hot-swap protocol's names and message, shared by the worker (publisher) and the servers.

The worker ``SET``s the active-policy key to the JSON message and ``PUBLISH``es the same JSON on the
policy channel. A server applies a message whose version differs from the one it
serves; on start and on every reconnect it reads the key, so a lost message is never a lost swap.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RedisKeys:
    """Every Redis key and channel Flywheel uses, under one namespace (``redis_namespace``)."""

    namespace: str = "flywheel"

    @property
    def active_policy(self) -> str:
        """JSON PolicyMessage of the served version."""
        return f"{self.namespace}:policy:active"

    @property
    def policy_channel(self) -> str:
        """PUBLISHed PolicyMessage on every activation."""
        return f"{self.namespace}:policy:updates"

    @property
    def trainer_lock(self) -> str:
        """Leader lock of the trainer workers: value = worker id, with a TTL."""
        return f"{self.namespace}:trainer:leader"

    @property
    def training_requests(self) -> str:
        """Channel that nudges the worker to look for work now."""
        return f"{self.namespace}:training:requests"


@dataclass(frozen=True)
class PolicyMessage:
    version: str
    path: str
    sha256: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> PolicyMessage:
        """Parse a message; raises ``ValueError`` on anything malformed."""
        try:
            data = json.loads(raw)
            return cls(version=str(data["version"]), path=str(data["path"]),
                       sha256=str(data["sha256"]))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed policy message: {raw!r}") from exc


def publish_policy(client: Any, keys: RedisKeys, message: PolicyMessage) -> None:
    """SET the active version, then PUBLISH it, in one MULTI (a sync ``redis.Redis`` client)."""
    payload = message.to_json()
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.active_policy, payload)
    pipe.publish(keys.policy_channel, payload)
    pipe.execute()


async def publish_policy_async(client: Any, keys: RedisKeys, message: PolicyMessage) -> None:
    """The same with a ``redis.asyncio.Redis`` client."""
    payload = message.to_json()
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(keys.active_policy, payload)
        pipe.publish(keys.policy_channel, payload)
        await pipe.execute()
