"""The HTTP API on a fake engine and a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from tests.helpers import feedback_counts

CHAT = {"model": "flywheel", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def chat(client: TestClient, **overrides: object) -> dict:
    response = client.post("/v1/chat/completions", json={**CHAT, **overrides})
    assert response.status_code == 200, response.text
    return response.json()


def rows(store: Store) -> dict[str, int]:
    return feedback_counts(store)


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_models(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "flywheel"
    assert body["data"][0]["object"] == "model"


def test_chat_completion_is_labelled_and_stored(client: TestClient, store: Store) -> None:
    response = client.post("/v1/chat/completions", json=CHAT)
    body = response.json()
    assert response.headers["X-Flywheel-Policy"] == "policy-0"
    assert body["object"] == "chat.completion"
    assert body["system_fingerprint"] == "policy-0"
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] > 0
    feedback = client.post("/v1/feedback", json={"completion_id": body["id"], "rating": "up"})
    assert feedback.status_code == 201


def test_chat_stream_with_usage(client: TestClient) -> None:
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["X-Flywheel-Policy"] == "policy-0"
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["system_fingerprint"] == "policy-0" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_n_choices_and_logprobs(client: TestClient) -> None:
    body = chat(client, n=3, logprobs=True, top_logprobs=2, seed=7)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    content = body["choices"][0]["logprobs"]["content"]
    assert content and all("logprob" in t and "top_logprobs" in t for t in content)


def test_text_completion(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 5})
    body = response.json()
    assert response.status_code == 200
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert len(body["choices"][0]["text"]) <= 5
    assert body["choices"][0]["finish_reason"] == "length"


def test_stop_sequence(client: TestClient) -> None:
    body = chat(client, max_tokens=50, stop=["."], seed=1)
    assert "." not in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "n": 100}, "n"),
        ({**CHAT, "max_tokens": -5}, "max_tokens"),
        ({**CHAT, "max_tokens": 10**9}, "max_tokens"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": "hi"}, "messages"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "temperature": 3}, "temperature"),
        ({**CHAT, "top_p": 0}, "top_p"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, None),
        ({**CHAT, "stream_options": {"include_usage": True}}, None),
        ({**CHAT, "top_logprobs": 3}, None),
        ({**CHAT, "messages": [{"role": "user", "content": "x" * 600}]}, "messages"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
    ],
)
def test_bad_completion_requests(client: TestClient, payload: dict, param: str | None) -> None:
    route = "/v1/completions" if "prompt" in payload else "/v1/chat/completions"
    assert_error(client.post(route, json=payload), 400, param)


def test_unknown_model(client: TestClient) -> None:
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404,
                 "model")


def test_malformed_json(client: TestClient, store: Store) -> None:
    for route in ("/v1/chat/completions", "/v1/feedback", "/v1/rankings"):
        response = client.post(route, content=b"{not json",
                                headers={"content-type": "application/json"})
        assert_error(response, 400)
    assert rows(store) == {"up": 0, "down": 0, "rankings": 0}


def test_feedback_errors_store_nothing(client: TestClient, store: Store) -> None:
    cid = chat(client, n=2)["id"]
    cases = [
        ({"completion_id": "chatcmpl-nope", "rating": "up"}, 404, "completion_id"),
        ({"completion_id": cid, "choice_index": 5, "rating": "up"}, 404, "choice_index"),
        ({"completion_id": cid, "choice_index": -1, "rating": "up"}, 400, "choice_index"),
        ({"completion_id": cid, "rating": "meh"}, 400, "rating"),
        ({"completion_id": cid, "rating": 1}, 400, "rating"),
        ({"rating": "up"}, 400, "completion_id"),
    ]
    for payload, status, param in cases:
        assert_error(client.post("/v1/feedback", json=payload), status, param)
    assert rows(store) == {"up": 0, "down": 0, "rankings": 0}


def test_feedback_idempotency(client: TestClient, store: Store) -> None:
    cid = chat(client)["id"]
    payload = {"completion_id": cid, "rating": "down", "comment": "rude", "user": "u1"}
    headers = {"Idempotency-Key": "k-1"}
    first = client.post("/v1/feedback", json=payload, headers=headers)
    again = client.post("/v1/feedback", json=payload, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    changed = client.post("/v1/feedback", json={**payload, "rating": "up"}, headers=headers)
    assert_error(changed, 422)
    assert rows(store)["down"] == 1 and rows(store)["up"] == 0


def test_rankings(client: TestClient, store: Store) -> None:
    first = chat(client, n=3, seed=3)
    second = chat(client, seed=4)
    response = client.post("/v1/rankings", json={"completion_id": first["id"],
                                                   "ranking": [2, 0, 1], "user": "u1"})
    assert response.status_code == 201, response.text
    items = [{"completion_id": first["id"], "choice_index": 1},
             {"completion_id": second["id"], "choice_index": 0}]
    # Another rater: u1 ranking answer 1 again would replace its first ranking (one vote each).
    assert client.post("/v1/rankings", json={"items": items, "user": "u2"}).status_code == 201
    assert rows(store)["rankings"] == 2
    export = client.get("/v1/feedback/export")
    lines = [json.loads(line) for line in export.text.splitlines()]
    pairs = [row for row in lines if "chosen" in row]
    assert len(pairs) == 3 + 1  # C(3,2) from the first ranking, one from the pair


def test_bad_rankings_store_nothing(client: TestClient, store: Store) -> None:
    one = chat(client, n=3)["id"]
    other = client.post("/v1/chat/completions",
                        json={**CHAT, "messages": [{"role": "user", "content": "other"}]}).json()
    cases = [
        ({"completion_id": one, "ranking": [0, 0]}, 400),
        ({"completion_id": one, "ranking": [0, 7]}, 404),
        ({"completion_id": one, "ranking": [1]}, 400),
        ({"completion_id": "chatcmpl-nope", "ranking": [0, 1]}, 404),
        ({"items": [{"completion_id": one, "choice_index": 0},
                    {"completion_id": other["id"], "choice_index": 0}]}, 400),
        ({"completion_id": one, "ranking": [0, 1],
          "items": [{"completion_id": one}, {"completion_id": one, "choice_index": 1}]}, 400),
        ({}, 400),
    ]
    for payload, status in cases:
        assert_error(client.post("/v1/rankings", json=payload), status)
    assert rows(store)["rankings"] == 0


def test_policies_and_admin_errors(client: TestClient, store: Store) -> None:
    store.ensure_base_policy("/nowhere/base", None)
    store.add_policy(id="policy-1", parent="policy-0", path="/nowhere/p1", sha256="x",
                     status="rejected", metrics={"eval/score_mean": 0.1})
    listed = client.get("/v1/policies").json()["data"]
    assert [p["id"] for p in listed] == ["policy-1", "policy-0"]
    assert listed[0]["status"] == "rejected"
    assert_error(client.post("/v1/policies/policy-99/activate"), 404)
    error = assert_error(client.post("/v1/policies/policy-1/activate"), 400)
    assert error["code"] == "policy_rejected"
    forced = client.post("/v1/policies/policy-1/activate", json={"force": True})
    assert assert_error(forced, 409)["code"] == "checkpoint_invalid"  # no such files
    assert store.active_policy()["id"] == "policy-0"


def test_training_runs_route(client: TestClient) -> None:
    created = client.post("/v1/training/runs")
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "queued"
    listed = client.get("/v1/training/runs").json()["data"]
    assert listed[0]["id"] == created.json()["id"]


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    chat(client)
    text = client.get("/metrics").text
    for name in ("flywheel_requests_total", "flywheel_time_to_first_token_seconds_bucket",
                 "flywheel_request_latency_seconds_bucket", "flywheel_generation_tokens_total",
                 "flywheel_requests_in_flight", 'flywheel_policy_version_info{version="policy-0"}'):
        assert name in text
