"""A web page cannot drive a keyless server through its visitor's browser: a foreign `Host`
(DNS rebinding), a cross-origin POST and a form's content type are refused, before any route
runs; the server's own pages and API clients are answered as before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.browser_guard import LOOPBACK, allowed_hosts, host_name
from server.engines.fake import FakeEngine
from tests.server.conftest import make_settings

LOCAL = "http://127.0.0.1:8000"


@pytest.fixture
def local(tmp_path: Path, db_url: str, store: Store) -> Iterator[TestClient]:
    """A keyless server with the default allow-lists, reached as http://127.0.0.1:8000."""
    settings = make_settings(tmp_path, db_url, allowed_hosts="", allowed_origins="")
    app = create_app(settings, engine=FakeEngine(), store=store, watch=False)
    with TestClient(app, base_url=LOCAL) as client:
        yield client


def _runs(client: TestClient) -> int:
    return len(client.get("/v1/training/runs").json()["data"])


def test_a_foreign_host_is_refused(local: TestClient) -> None:
    """DNS rebinding: attacker.example resolved to 127.0.0.1 reads nothing."""
    refused = local.get("/v1/policies", headers={"Host": "attacker.example"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "host_not_allowed"
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"):
        assert local.get("/v1/policies", headers={"Host": host}).status_code == 200, host


def test_a_cross_origin_post_changes_nothing(local: TestClient) -> None:
    """A no-cors fetch from another site: no body, no content type, a foreign Origin."""
    before = _runs(local)
    for origin in ("http://attacker.example", "null", "http://127.0.0.1:9999"):
        refused = local.post("/v1/training/runs", headers={"Origin": origin})
        assert refused.status_code == 403, origin
        assert refused.json()["error"]["code"] == "origin_not_allowed"
    refused = local.post("/v1/policies/policy-0/activate",
                         headers={"Origin": "http://attacker.example"})
    assert refused.status_code == 403
    assert _runs(local) == before
    # The server's own pages (the console) send their own origin.
    assert local.post("/v1/training/runs", headers={"Origin": LOCAL}).status_code == 201
    assert local.post("/v1/training/runs").status_code in (201, 409)  # API clients send none


def test_a_form_post_is_refused(local: TestClient) -> None:
    """An HTML form's content types, even without an Origin (an old browser, a privacy mode)."""
    for content_type in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "text/plain;charset=UTF-8"):
        refused = local.post("/v1/feedback", content=b"rating=up",
                             headers={"Content-Type": content_type})
        assert refused.status_code == 415, content_type
        assert refused.json()["error"]["code"] == "unsupported_media_type"


def test_allowed_origins_and_hosts_are_settings(tmp_path: Path, db_url: str,
                                                store: Store) -> None:
    settings = make_settings(tmp_path, db_url, allowed_hosts="flywheel.internal",
                             allowed_origins="https://console.internal/")
    app = create_app(settings, engine=FakeEngine(), store=store, watch=False)
    with TestClient(app, base_url="http://flywheel.internal") as client:
        assert client.get("/v1/policies").status_code == 200
        assert client.get("/v1/policies", headers={"Host": "127.0.0.1"}).status_code == 400
        allowed = client.post("/v1/training/runs",
                              headers={"Origin": "https://console.internal"})
        assert allowed.status_code == 201


def test_default_hosts(tmp_path: Path) -> None:
    def hosts(**overrides: object) -> frozenset[str] | None:
        return allowed_hosts(make_settings(tmp_path, "sqlite://", allowed_hosts="",
                                           **overrides))

    assert hosts() == LOOPBACK  # bound to 127.0.0.1
    assert hosts(host="10.0.0.5") == LOOPBACK | {"10.0.0.5"}
    assert hosts(host="0.0.0.0") == LOOPBACK  # unknown names: set FLYWHEEL_ALLOWED_HOSTS
    assert hosts(api_keys="k") is None  # a page cannot send the bearer key
    assert allowed_hosts(make_settings(tmp_path, "sqlite://", allowed_hosts="*")) is None
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM:80") == "example.com"
