"""One leader among the workers: a Redis lock with a TTL, renewed in the background.

Acquire is ``SET key id NX PX ttl``; renew and release only touch the key while it still holds our
id (Lua, atomically). If a renewal finds the lock gone or taken, ``lost`` is set and the running
cycle abandons its work, so two workers never train at once.

Every write of ours sets a TTL, so a holder that dies without releasing is replaced one TTL later.
A key with no TTL (someone ran a plain ``SET``) would otherwise pin the leadership forever: a failed
acquire that finds one gives it our TTL, so it is treated as a stale owner and taken over after it.
"""

from __future__ import annotations

import logging
import threading

import redis

log = logging.getLogger(__name__)

_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('pttl', KEYS[1]) == -1 then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return -1
end
return 0
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LeaderLock:
    def __init__(self, client: redis.Redis, key: str, owner: str, ttl_seconds: float) -> None:
        self.client, self.key, self.owner = client, key, owner
        self.ttl_ms = int(ttl_seconds * 1000)
        self.lost = threading.Event()
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def held(self) -> bool:
        return self._held and not self.lost.is_set()

    def acquire(self) -> bool:
        """Try once; on success start renewing every third of the TTL."""
        if self.held:
            return True
        try:
            taken = self._acquire(keys=[self.key], args=[self.owner, self.ttl_ms])
        except redis.RedisError as exc:
            log.warning("leader lock not reachable: %s", exc)
            return False
        if taken == -1:
            log.warning("leader lock %s had no TTL (pinned by hand?); it now expires in %.1f s",
                        self.key, self.ttl_ms / 1000)
        if taken != 1:
            return False
        self._held = True
        self.lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep, name="leader-lock", daemon=True)
        self._thread.start()
        log.info("leader lock %s taken by %s", self.key, self.owner)
        return True

    def _keep(self) -> None:
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                renewed = self._renew(keys=[self.key], args=[self.owner, self.ttl_ms])
            except redis.RedisError as exc:
                log.warning("leader lock renewal failed: %s", exc)
                renewed = 0
            if not renewed:
                log.error("leader lock lost; abandoning the current work")
                self.lost.set()
                self._held = False
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._held:
            try:
                self._release(keys=[self.key], args=[self.owner])
            except redis.RedisError as exc:
                log.warning("leader lock release failed (it will expire): %s", exc)
        self._held = False


class LocalLock:
    """Without Redis there is one worker by assumption; the lock always succeeds."""

    def __init__(self) -> None:
        self.lost = threading.Event()

    @property
    def held(self) -> bool:
        return True

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        return None
