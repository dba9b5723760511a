"""Replica reports are read from a Redis hash that anyone with Redis access can write: what does
not parse is skipped (and logged once), and `GET /v1/policies` stays 200."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import redis

from feedback_store import Store
from flywheel.serving_plan import RedisKeys, replica_report
from flywheel.settings import Settings
from tests.server.hotswap.conftest import checkpoint, redis_followed, serving


def test_malformed_reports_are_skipped(settings: Settings, store: Store, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    checkpoint(settings, store, tmp_path, "policy-0", status="active")
    client = redis.Redis.from_url(settings.redis_url)
    servers = RedisKeys(settings.redis_namespace).servers
    try:
        with serving(settings, store) as (http, _):
            assert redis_followed(http)
            client.hset(servers, mapping={
                "evil": '{"at": "soon"}', "list": "[1, 2]", "text": "not json",
                "no-active": json.dumps({"at": time.time()}),
                "odd-active": json.dumps({"active": 3, "at": time.time()})})
            with caplog.at_level(logging.WARNING, logger="flywheel.serving_plan"):
                for _ in range(3):
                    listed = http.get("/v1/policies")
                    assert listed.status_code == 200, listed.text
                    assert [r["id"] for r in listed.json()["replicas"]] != []
                    assert {"evil", "list", "text", "no-active", "odd-active"}.isdisjoint(
                        r["id"] for r in listed.json()["replicas"])
            warned = [r for r in caplog.records if "does not parse" in r.getMessage()]
            assert len(warned) == 5  # once per bad entry, not once per poll
    finally:
        client.delete(servers)
        client.close()


def test_a_report_has_one_shape() -> None:
    good = replica_report(json.dumps({"active": "policy-1", "canary": None, "at": 5}))
    assert good == {"active": "policy-1", "canary": None, "at": 5.0}
    for raw in ("", "null", '"x"', '{"active": "p", "at": []}', '{"active": "p", "canary": 1,'
                ' "at": 1}', b"\xff"):
        assert replica_report(raw) is None, raw
