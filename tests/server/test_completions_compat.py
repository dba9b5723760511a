"""`/v1/completions` as OpenAI's and vLLM's: prompt lists, token-id prompts, `echo`; sampled
tokens spelled as their alternatives; validation errors that name their parameter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from tests.server.conftest import make_settings


def post(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/completions", json={"max_tokens": 4, **body})
    assert response.status_code == 200, response.text
    return response.json()


def events(client: TestClient, **body: object) -> list[dict]:
    with client.stream("POST", "/v1/completions",
                       json={"max_tokens": 4, "stream": True, **body}) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_list_of_prompts_gets_n_choices_each(client: TestClient, store: Store) -> None:
    body = post(client, prompt=["Once", "Twice", "Thrice"], n=2, seed=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3, 4, 5]
    assert body["usage"]["prompt_tokens"] == len("Once") + len("Twice") + len("Thrice")
    # Stored one completion per prompt, `<id>-<i>`, choices numbered within it.
    feedback = client.post("/v1/feedback", json={"completion_id": f"{body['id']}-2",
                                                 "choice_index": 1, "rating": "up"})
    assert feedback.status_code == 201, feedback.text
    assert client.post("/v1/feedback", json={"completion_id": f"{body['id']}-2",
                                             "choice_index": 2, "rating": "up"}).status_code == 404


def test_a_list_of_prompts_streams_every_choice(client: TestClient) -> None:
    chunks = events(client, prompt=["Once", "Twice"], n=2, stream_options={"include_usage": True})
    finished = {c["choices"][0]["index"] for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"]}
    assert finished == {0, 1, 2, 3}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["usage"]["prompt_tokens"] == len("Once") + len("Twice")


def test_token_id_prompts(client: TestClient) -> None:
    one = post(client, prompt=[ord(c) for c in "Once"], seed=1)
    assert one == {**one, "choices": post(client, prompt="Once", seed=1)["choices"]}
    many = post(client, prompt=[[ord("a")], [ord("b"), ord("c")]])
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["usage"]["prompt_tokens"] == 3


def test_echo_starts_each_answer_with_its_prompt(client: TestClient) -> None:
    plain = post(client, prompt=["Once", "Twice"], seed=5)
    echoed = post(client, prompt=["Once", "Twice"], seed=5, echo=True)
    assert [c["text"] for c in echoed["choices"]] == [
        p + c["text"] for p, c in zip(["Once", "Twice"], plain["choices"], strict=True)]
    chunks = events(client, prompt="Once", seed=5, echo=True)
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed["choices"][0]["text"]
    assert chunks[0]["choices"][0]["text"].startswith("Once")


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options",
     "stream_options: only allowed when stream is true"),
    ({"prompt": "a", "echo": True, "logprobs": 1}, "echo", "echo: cannot be combined"),
    ({"prompt": [[]]}, "prompt", None),
    ({"prompt": [-1]}, "prompt", None),
    ({"prompt": ["a"] * 17}, "prompt", None),
])
def test_validation_errors_name_their_parameter(client: TestClient, body: dict, param: str,
                                                message: str | None) -> None:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert "Value error" not in error["message"] and not error["message"].startswith("body")
    if message is not None:
        assert error["message"].startswith(message)


def test_invalid_unicode_is_named_without_a_prefix(client: TestClient) -> None:
    response = client.post("/v1/completions", content=b'{"prompt": "a\\ud800"}',
                           headers={"content-type": "application/json"})
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (400, "prompt")
    assert error["message"].startswith("prompt: ") and "Value error" not in error["message"]


def test_chat_validation_errors_name_their_parameter(client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    error = client.post("/v1/chat/completions", json=body).json()["error"]
    assert (error["param"], error["message"]) == (
        "top_logprobs", "top_logprobs: requires logprobs to be true")


@pytest.fixture(scope="module")
def real_client(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[TestClient]:
    """The transformers engine on the tiny model: a real tokenizer with special tokens."""
    from server.engines.transformers_engine import TransformersEngine

    tmp = tmp_path_factory.mktemp("compat")
    url = f"sqlite:///{tmp / 'compat.db'}"
    store = Store(url)
    engine = TransformersEngine(str(tiny_model_dir), device="cpu", max_batch_size=4)
    app = create_app(make_settings(tmp, url), engine=engine, store=store, watch=False)
    with TestClient(app) as c:
        yield c
    store.close()


def test_end_of_text_is_spelled_alike_in_tokens_and_top_logprobs(real_client: TestClient
                                                                  ) -> None:
    """The sampled EOS reads as its alternatives do (`<|end|>`), not as "" beside them."""
    engine = real_client.app.state.flywheel.engine  # type: ignore[attr-defined]
    eos = engine.tokenizer.decode([engine.eos_token_ids[0]])
    assert eos
    for seed in range(40):
        body = post(real_client, prompt="Hello", max_tokens=64, logprobs=5, seed=seed)
        logprobs = body["choices"][0]["logprobs"]
        if body["choices"][0]["finish_reason"] == "stop":
            break
    else:
        pytest.skip("no answer ended on EOS in 40 seeds")
    assert logprobs["tokens"][-1] == eos
    assert eos in logprobs["top_logprobs"][-1]  # the most likely tokens, EOS among them
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        assert token in top or len(top) == 5


def test_out_of_vocabulary_token_ids_are_refused(real_client: TestClient) -> None:
    response = real_client.post("/v1/completions", json={"prompt": [1, 10**6], "max_tokens": 2})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "out of vocabulary" in error["message"]
    ok = post(real_client, prompt=[5, 6, 7], max_tokens=2, echo=True)
    assert ok["choices"][0]["text"].startswith(real_client.app.state.flywheel.engine.decode(
        [5, 6, 7]))  # type: ignore[attr-defined]
