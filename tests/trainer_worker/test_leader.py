"""The leader lock can be neither pinned forever nor kept by a dead worker (real Redis)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import redis

from flywheel.serving_plan import RedisKeys
from trainer_worker.leader import LeaderLock

TTL = 0.5


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def _acquire_within(lock: LeaderLock, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if lock.acquire():
            return True
        time.sleep(0.05)
    return False


def test_a_key_pinned_without_ttl_is_taken_over_after_one_ttl(client: redis.Redis,
                                                               redis_namespace: str) -> None:
    key = RedisKeys(redis_namespace).trainer_lock
    client.set(key, "squatter")  # no expiry: before the fix nobody could ever lead again
    lock = LeaderLock(client, key, "worker-a", ttl_seconds=TTL)
    try:
        assert not lock.acquire()  # the squatter holds it for now ...
        assert 0 < client.pttl(key) <= TTL * 1000  # ... but only for one more TTL
        assert _acquire_within(lock, 10 * TTL)
        assert client.get(key) == b"worker-a"
        assert client.pttl(key) > 0
    finally:
        lock.release()
        client.delete(key)


def test_a_dead_holders_lock_is_taken_over_and_keeps_a_ttl(redis_url: str, client: redis.Redis,
                                                           redis_namespace: str) -> None:
    key = RedisKeys(redis_namespace).trainer_lock
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, redis
        from trainer_worker.leader import LeaderLock
        lock = LeaderLock(redis.Redis.from_url({redis_url!r}), {key!r}, "dead", {TTL})
        assert lock.acquire()
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert 0 < client.pttl(key) <= TTL * 1000
        holder.kill()  # dies without releasing
        holder.wait(timeout=10)
        lock = LeaderLock(client, key, "worker-b", ttl_seconds=TTL)
        assert _acquire_within(lock, 10 * TTL)
        time.sleep(2 * TTL)  # several renewals later the key still expires on its own
        assert lock.held and client.get(key) == b"worker-b"
        assert 0 < client.pttl(key) <= TTL * 1000
        lock.release()
        assert client.get(key) is None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        client.delete(key)
