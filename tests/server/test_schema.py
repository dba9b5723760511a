"""The OpenAPI schema documents what the server sends; schemathesis, all checks, agrees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.server.conftest import ThreadServer, free_port, make_settings

ERROR_REF = "#/components/schemas/ErrorResponse"


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, ops in schema["paths"].items()
            for method, op in ops.items()]


def _error_ref(response: dict[str, Any]) -> str | None:
    return response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")


def test_validation_errors_are_documented_as_400_envelopes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    envelope = schema["components"]["schemas"]["ErrorResponse"]
    assert envelope["required"] == ["error"]
    for path, method, op in _operations(schema):
        responses = op["responses"]
        assert _error_ref(responses["default"]) == ERROR_REF, (path, method)
        if op.get("parameters") or op.get("requestBody"):
            assert _error_ref(responses["400"]) == ERROR_REF, (path, method)
        if "422" in responses:  # only the real one: an Idempotency-Key reused
            assert path in ("/v1/feedback", "/v1/rankings")
            assert _error_ref(responses["422"]) == ERROR_REF
    # And the server does answer a validation error so.
    response = client.post("/v1/chat/completions", json={"messages": []})
    assert response.status_code == 400
    assert set(response.json()["error"]) == set(
        schema["components"]["schemas"]["ErrorDetail"]["properties"])


def test_content_types_are_documented(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/v1/chat/completions", "/v1/completions"):
        content = paths[route]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
    export = paths["/v1/feedback/export"]["get"]["responses"]["200"]["content"]
    assert set(export) == {"application/jsonl"}
    assert client.get("/v1/feedback/export").headers["content-type"].startswith(
        "application/jsonl")
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_key_checks_are_documented_only_where_keys_are_set(tmp_path: Path,
                                                           sqlite_url: str) -> None:
    store = Store(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url, api_keys="k1", admin_key="root",
                             expose_docs=True)
    with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as c:
        schema = c.get("/openapi.json").json()
    store.close()
    paths = schema["paths"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert {"401"} <= set(paths["/v1/chat/completions"]["post"]["responses"])
    assert "403" not in paths["/v1/chat/completions"]["post"]["responses"]
    assert {"401", "403"} <= set(paths["/v1/training/runs"]["post"]["responses"])
    assert "security" not in paths["/healthz"]["get"]


# Statuses a schema-valid request may still get, for reasons no JSON Schema can state: a prompt
# plus max_tokens over the model's context (400), tie groups naming an answer twice or answers
# to different prompts (400), and an Idempotency-Key reused with another body (422, as the IETF
# draft has it). Everything else is schemathesis' default.
SCHEMATHESIS_CONFIG = """
[[operations]]
include-path = ["/v1/chat/completions", "/v1/completions"]
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 403, 404, 409, 429, "5xx"]

[[operations]]
include-path = "/v1/feedback"
checks.positive_data_acceptance.expected-statuses = ["2xx", 401, 403, 404, 409, 422, 429, "5xx"]

[[operations]]
include-path = "/v1/rankings"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 403, 404, 409, 422, 429,
                                                     "5xx"]
"""
MAX_EXAMPLES = 25  # per operation and phase: about 15 s on two cores


@pytest.mark.slow
def test_schemathesis_all_checks_pass(tmp_path: Path, sqlite_url: str) -> None:
    """Keys set (so `ignored_auth` has something to check), docs and metrics exposed."""
    store = Store(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url, api_keys="k1", admin_key="root",
                             expose_docs=True, expose_metrics=True)
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    app = create_app(settings, engine=FakeEngine(), store=store, watch=False)
    with ThreadServer(app, free_port()) as server:
        run = subprocess.run(
            [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
             "--config-file", str(config), "--no-color", "run", server.url + "/openapi.json",
             "--checks", "all", "--max-examples", str(MAX_EXAMPLES),
             "--generation-deterministic", "--workers", "1",
             "--header", "Authorization: Bearer root"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
    store.close()
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
