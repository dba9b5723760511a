"""/docs, /redoc, /openapi.json and /metrics: open without keys, closed (404) with keys, unless
FLYWHEEL_EXPOSE_DOCS / FLYWHEEL_EXPOSE_METRICS say otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.server.conftest import make_settings

DOCS = ("/docs", "/redoc", "/openapi.json")
ROOT = {"Authorization": "Bearer root"}


@pytest.mark.parametrize(("keys", "expose_docs", "expose_metrics", "docs_open", "metrics_open"), [
    ({}, None, None, True, True),
    ({"api_keys": "k1", "admin_key": "root"}, None, None, False, False),
    ({"admin_key": "root"}, None, None, False, False),
    ({"api_keys": "k1"}, None, None, False, False),
    ({"api_keys": "k1", "admin_key": "root"}, True, None, True, False),
    ({"api_keys": "k1", "admin_key": "root"}, None, True, False, True),
    ({}, False, False, False, False),
    ({}, False, None, False, True),
])
def test_docs_and_metrics_exposure(tmp_path: Path, sqlite_url: str, keys: dict[str, str],
                                   expose_docs: bool | None, expose_metrics: bool | None,
                                   docs_open: bool, metrics_open: bool) -> None:
    store = Store(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url, expose_docs=expose_docs,
                             expose_metrics=expose_metrics, **keys)
    with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as c:
        for path in DOCS:
            # A closed page is absent, even to the admin key: a browser cannot send one to /docs.
            response = c.get(path, headers=ROOT)
            assert response.status_code == (200 if docs_open else 404), path
            if not docs_open:
                assert response.json()["error"]["type"] == "not_found_error"
        metrics = c.get("/metrics", headers=ROOT)
        assert metrics.status_code == (200 if metrics_open else 404)
        if metrics_open:
            assert metrics.headers["content-type"].startswith("text/plain")
            assert "flywheel" in metrics.text
        else:
            assert metrics.json()["error"]["type"] == "not_found_error"
        assert c.get("/healthz").status_code == 200  # probes stay open
        assert c.get("/readyz").status_code == 200
    store.close()
