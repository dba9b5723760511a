"""Inputs no client should be able to turn into a 500 or into invalid JSON."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.completions.protocol import MAX_MESSAGES, MAX_STOP_CHARS
from server.engines.fake import FakeEngine
from server.engines.sampling import MASKED_LOGPROB, RowParams, RowSampler
from tests.helpers import feedback_counts
from tests.server.conftest import make_settings

S = "@surrogate@"  # where a body gets "a\\ud800": a lone surrogate, which is no Unicode text


def _strict_json(text: str) -> Any:
    """JSON as RFC 8259 has it: NaN and Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in JSON")
    return json.loads(text, parse_constant=refuse)


def _post_raw(client: TestClient, path: str, body: dict[str, Any]) -> Any:
    """POST `body` as JSON with `S` spelled as a lone surrogate (and NaN as NaN): what httpx's
    encoder cannot send."""
    text = json.dumps(body).replace(S, "a\\ud800")
    return client.post(path, content=text.encode("ascii"),
                       headers={"Content-Type": "application/json"})


def _assert_400(response: Any, param: str) -> None:
    assert response.status_code == 400, response.text
    error = _strict_json(response.text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


HI = [{"role": "user", "content": "hi"}]
CHAT_CASES = [
    ({"messages": [{"role": "user", "content": S}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": S}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi", "name": S}]}, "messages.0.name"),
    ({"messages": HI, "stop": S}, "stop"),
    ({"messages": HI, "stop": ["x", S]}, "stop"),
    ({"messages": HI, "user": S}, "user"),
    ({"messages": HI, "model": S}, "model"),
]
TEXT_CASES = [
    ({"prompt": S}, "prompt"),
    ({"prompt": [S]}, "prompt"),
    ({"prompt": "hi", "stop": S}, "stop"),
    ({"prompt": "hi", "user": S}, "user"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_CASES)
def test_invalid_unicode_in_chat_is_400(client: TestClient, body: dict, param: str) -> None:
    _assert_400(_post_raw(client, "/v1/chat/completions", body), param)


@pytest.mark.parametrize(("body", "param"), TEXT_CASES)
def test_invalid_unicode_in_completions_is_400(client: TestClient, body: dict,
                                               param: str) -> None:
    _assert_400(_post_raw(client, "/v1/completions", body), param)


def test_invalid_unicode_in_feedback_is_400(client: TestClient, store: Store) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2}
    cid = client.post("/v1/chat/completions", json=chat).json()["id"]
    for field in ("comment", "user"):
        body = {"completion_id": cid, "rating": "up", field: S}
        _assert_400(_post_raw(client, "/v1/feedback", body), field)
    _assert_400(_post_raw(client, "/v1/feedback", {"completion_id": S, "rating": "up"}),
                "completion_id")
    body = {"completion_id": cid, "ranking": [0, 1], "user": S}
    _assert_400(_post_raw(client, "/v1/rankings", body), "user")
    assert feedback_counts(store)["up"] == 0


# -- temperature near zero ----------------------------------------------------------------------


def test_sampler_treats_tiny_temperatures_as_greedy() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5], [0.1, 3.0, 0.2, -2.0]])
    rows = [RowParams(temperature=1e-40, top_p=1.0, top_logprobs=4, generator=None),
            RowParams(temperature=1e-6, top_p=0.5, top_logprobs=4, generator=None)]
    sampled = RowSampler(rows, torch.device("cpu")).sample(logits, torch.Generator())
    assert sampled.tokens == [0, 1]  # the argmax, as temperature 0
    expected = torch.log_softmax(logits, dim=-1)
    assert sampled.logprobs == pytest.approx([expected[0, 0].item(), expected[1, 1].item()])
    assert sampled.top_logprobs is not None
    assert all(math.isfinite(v) for row in sampled.top_logprobs for v in row)


def test_sampler_reports_masked_logprobs_as_finite() -> None:
    logits = torch.tensor([[5.0, 0.0, float("-inf"), float("nan")]])
    rows = [RowParams(temperature=0.7, top_p=0.1, top_logprobs=4, generator=None)]
    sampled = RowSampler(rows, torch.device("cpu")).sample(logits, torch.Generator())
    assert sampled.top_logprobs is not None
    assert all(math.isfinite(v) and v >= MASKED_LOGPROB for v in sampled.top_logprobs[0])
    assert all(math.isfinite(v) for v in sampled.logprobs)


@pytest.fixture(scope="module")
def real_client(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[TestClient]:
    """The app on the transformers engine and the tiny model (the fake engine never samples)."""
    from server.engines.transformers_engine import TransformersEngine

    tmp = tmp_path_factory.mktemp("inputs")
    url = f"sqlite:///{tmp / 'inputs.db'}"
    store = Store(url)
    engine = TransformersEngine(str(tiny_model_dir), device="cpu", max_batch_size=4)
    app = create_app(make_settings(tmp, url), engine=engine, store=store, watch=False)
    with TestClient(app) as c:
        yield c
    store.close()


def _finite(value: Any) -> None:
    """Every number in a parsed body is finite."""
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, dict):
        for item in value.values():
            _finite(item)
    elif isinstance(value, list):
        for item in value:
            _finite(item)


TINY_T = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}], "max_tokens": 8,
          "temperature": 1e-40, "logprobs": True, "top_logprobs": 3}


def test_tiny_temperature_with_logprobs_is_greedy_and_finite(real_client: TestClient) -> None:
    response = real_client.post("/v1/chat/completions", json=TINY_T)
    assert response.status_code == 200, response.text
    body = _strict_json(response.text)
    _finite(body)
    content = body["choices"][0]["logprobs"]["content"]
    assert content and all(entry["logprob"] <= 0.0 for entry in content)
    greedy = real_client.post("/v1/chat/completions", json={**TINY_T, "temperature": 0.0})
    assert body["choices"][0]["message"] == greedy.json()["choices"][0]["message"]

    text = real_client.post("/v1/completions", json={
        "prompt": "2 plus 3 is", "max_tokens": 8, "temperature": 1e-40, "logprobs": 3})
    assert text.status_code == 200, text.text
    _finite(_strict_json(text.text))


def test_tiny_temperature_stream_sends_only_json(real_client: TestClient) -> None:
    with real_client.stream("POST", "/v1/chat/completions",
                            json={**TINY_T, "stream": True}) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines()
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [_strict_json(event) for event in events[:-1]]
    assert chunks and all("error" not in chunk for chunk in chunks)
    _finite(chunks)
    assert any(chunk["choices"][0]["logprobs"] for chunk in chunks)


def test_nan_and_infinity_in_a_request_are_400(client: TestClient) -> None:
    # Python's json reads NaN and Infinity; the bounds of the fields refuse them.
    for value in (math.nan, math.inf, -math.inf):
        body = {"messages": HI, "temperature": value}
        _assert_400(_post_raw(client, "/v1/chat/completions", body), "temperature")
        _assert_400(_post_raw(client, "/v1/completions", {"prompt": "hi", "top_p": value}),
                    "top_p")


# -- bodies that cost what they weigh -----------------------------------------------------------


def test_long_stop_strings_are_refused(client: TestClient, store: Store) -> None:
    """A stop string is stored with every answer: four of 500 kB grew the database by 2 MB a
    request."""
    long = "x" * (MAX_STOP_CHARS + 1)
    for path, body in (("/v1/chat/completions", {"messages": HI, "stop": long}),
                       ("/v1/chat/completions", {"messages": HI, "stop": ["a", long]}),
                       ("/v1/completions", {"prompt": "hi", "stop": [long]})):
        _assert_400(client.post(path, json=body), "stop")
    ok = client.post("/v1/completions", json={"prompt": "hi", "stop": ["x" * MAX_STOP_CHARS]})
    assert ok.status_code == 200, ok.text


def test_too_many_messages_are_refused(client: TestClient) -> None:
    empty = [{"role": "user", "content": ""}] * (MAX_MESSAGES + 1)
    _assert_400(client.post("/v1/chat/completions", json={"messages": empty}), "messages")


def test_many_short_messages_are_templated_off_the_loop(
        client: TestClient, fake_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty messages cost the chat template as much as long ones: 63k of them stalled every
    route for seconds when their character count (0) kept the rendering on the event loop."""
    threads: list[str] = []
    encode = fake_engine.encode_chat

    def spy(messages: list[dict[str, str]]) -> list[int]:
        threads.append(threading.current_thread().name)
        return encode(messages)

    monkeypatch.setattr(fake_engine, "encode_chat", spy)
    monkeypatch.setattr(fake_engine, "max_model_len", 4096)  # room for 200 role markers
    short = [{"role": "user", "content": ""}] * 200
    assert client.post("/v1/chat/completions", json={"messages": short, "max_tokens": 1}
                       ).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1}
                       ).status_code == 200
    loop_thread = threads[1]  # one short message: rendered inline, on the loop
    assert threads[0] != loop_thread
