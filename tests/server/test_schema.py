"""The OpenAPI schema documents what the server sends; schemathesis, all checks, agrees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.completions.protocol import MAX_N, MAX_PROMPTS
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


def _validator(schema: dict[str, Any], model: str) -> Any:
    """A validator of one request model of the served ``schema`` (its refs resolved there)."""
    return jsonschema_rs.validator_for({**schema, "$ref": f"#/components/schemas/{model}"})


def test_what_the_schema_allows_the_server_takes(tmp_path: Path, sqlite_url: str) -> None:
    """Cross-field rules and the loaded model's bounds: each body the served schema allows gets
    2xx, each it refuses 400. A context of 30 tokens, a budget of 90 per request (n=4: 22)."""
    store = Store(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url, max_request_tokens=90)
    app = create_app(settings, engine=FakeEngine(max_model_len=30), store=store, watch=False)
    chat = {"messages": [{"role": "user", "content": "hi"}]}  # 19 tokens: "<user>hi<assistant>"
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
        cid = client.post("/v1/chat/completions", json={**chat, "n": 3, "max_tokens": 2}
                          ).json()["id"]
        cases: list[tuple[str, str, dict[str, Any], bool]] = [
            ("/v1/chat/completions", "ChatCompletionRequest", body, ok) for body, ok in (
                ({**chat, "max_tokens": 29}, True),  # past the room the prompt leaves: cut
                ({**chat, "max_tokens": 30}, False),  # past the context
                ({**chat, "max_completion_tokens": 30, "max_tokens": 3}, False),
                ({**chat, "n": 3, "max_tokens": 29}, True),
                ({**chat, "n": 4, "max_tokens": 22}, True),
                ({**chat, "n": 4, "max_completion_tokens": 23}, False),  # past the budget
                ({**chat, "n": 5, "max_tokens": 18}, True),
                ({**chat, "n": 5, "max_tokens": 19}, False),
            )
        ] + [
            ("/v1/completions", "CompletionRequest", body, ok) for body, ok in (
                ({"prompt": "hi", "max_tokens": 29}, True),
                ({"prompt": "hi", "max_tokens": 30}, False),
                ({"prompt": [0x10FFFF], "max_tokens": 2}, True),  # the fake's last token id
                ({"prompt": [0x110000], "max_tokens": 2}, False),
                ({"prompt": [[1], [0x110000]], "max_tokens": 2}, False),
                ({"prompt": "hi", "max_tokens": 2, "echo": True}, True),
                ({"prompt": "hi", "max_tokens": 2, "echo": True, "logprobs": None}, True),
                ({"prompt": "hi", "max_tokens": 2, "echo": False, "logprobs": 1}, True),
                ({"prompt": "hi", "max_tokens": 2, "echo": True, "logprobs": 0}, False),
            )
        ] + [
            ("/v1/rankings", "RankingRequest", body, ok) for body, ok in (
                ({"completion_id": cid, "ranking": [[0, 2], 1]}, True),
                ({"items": [{"completion_id": cid}, {"completion_id": cid, "choice_index": 1}]},
                 True),
                ({"completion_id": cid, "ranking": [0, 1], "items": None}, True),
                ({"completion_id": cid, "ranking": [0, 1], "items": [{"completion_id": cid}]},
                 False),  # both forms
                ({"ranking": [0, 1]}, False),
                ({"completion_id": cid, "ranking": [[0, 1]]}, False),  # one place
                ({"completion_id": cid, "ranking": [[], 0, 1]}, False),  # an empty tie group
                ({"completion_id": cid, "ranking": [[0, 0], 1]}, False),
                ({"completion_id": cid, "ranking": [1, 1]}, False),
            )
        ]
        for path, model, body, ok in cases:
            assert _validator(schema, model).is_valid(body) is ok, body
            response = client.post(path, json=body)
            expected = (201 if path == "/v1/rankings" else 200) if ok else 400
            assert response.status_code == expected, (body, response.text)
        cut = client.post("/v1/chat/completions", json={**chat, "max_tokens": 29}).json()
    store.close()
    assert cut["usage"]["completion_tokens"] == 30 - 19
    assert cut["choices"][0]["finish_reason"] == "length"


MAX_EXAMPLES = 25  # per operation and phase: about 15 s on two cores
# What the schema cannot state of a ranking, checked across its places: no answer twice (in a
# tie group and outside it), at most MAX_RANKED answers in all. JSON Schema compares no items of
# different places and adds up no lengths, so these, alone, may be a 400 to a schema-valid body.
SCHEMATHESIS_CONFIG = """
[[operations]]
include-path = "/v1/rankings"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 403, 404, 409, 429, "5xx"]
"""


@pytest.mark.slow
def test_schemathesis_all_checks_pass(tmp_path: Path, sqlite_url: str) -> None:
    """Keys set (so `ignored_auth` has something to check), docs and metrics exposed. The
    model's context is longer than any body and the budget holds any max_tokens it allows, so
    the two bounds the schema leaves to words (a prompt's length in tokens, the budget's share
    of several prompts) cannot refuse a request here: the test above checks the bounds the
    schema states under a small context and budget."""
    store = Store(sqlite_url)
    context = 2 * 1024 * 1024 + 1  # above the default FLYWHEEL_MAX_REQUEST_BYTES
    settings = make_settings(tmp_path, sqlite_url, api_keys="k1", admin_key="root",
                             expose_docs=True, expose_metrics=True,
                             max_request_tokens=MAX_PROMPTS * MAX_N * context)
    assert settings.max_request_bytes < context
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    app = create_app(settings, engine=FakeEngine(max_model_len=context), store=store,
                     watch=False)
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
