"""POST /v1/rankings with tie groups, through the app on a fake engine (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from feedback_store import Store
from tests.helpers import feedback_counts
from tests.server.test_api import assert_error, chat


def _completion(client: TestClient, n: int) -> tuple[str, list[str]]:
    """A chat completion with n choices of distinct texts: (its id, the texts)."""
    body = chat(client, n=n, seed=3)
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(set(texts)) == n, texts
    return body["id"], texts


def _export_pairs(client: TestClient) -> list[tuple[str, str]]:
    lines = [json.loads(line) for line in client.get("/v1/feedback/export").text.splitlines()]
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in lines
            if "chosen" in r]


def _item(cid: str, index: int) -> dict[str, Any]:
    return {"completion_id": cid, "choice_index": index}


def test_tied_ranking_by_index(client: TestClient, store: Store) -> None:
    cid, texts = _completion(client, 3)
    response = client.post("/v1/rankings", json={"completion_id": cid, "ranking": [[0, 2], 1]})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["object"] == "ranking" and body["id"].startswith("rk-")
    assert body["completion_id"] == cid and body["ranking"] == [[0, 2], 1]
    assert body["items"] == [[_item(cid, 0), _item(cid, 2)], _item(cid, 1)]
    assert sorted(_export_pairs(client)) == sorted([(texts[0], texts[1]), (texts[2], texts[1])])
    (group,) = store.reward_data("all").groups
    assert group.tiers == [0, 0, 1]


def test_tied_ranking_by_items(client: TestClient, store: Store) -> None:
    first, _ = _completion(client, 2)
    second = chat(client, seed=4)
    items = [[_item(first, 1), _item(second["id"], 0)], _item(first, 0)]
    response = client.post("/v1/rankings", json={"items": items, "user": "u1"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["items"] == items and body["user"] == "u1"
    assert "ranking" not in body
    assert feedback_counts(store)["rankings"] == 1


def test_plain_rankings_still_work(client: TestClient) -> None:
    cid, _ = _completion(client, 3)
    response = client.post("/v1/rankings", json={"completion_id": cid, "ranking": [2, 0, 1]})
    assert response.status_code == 201, response.text
    assert response.json()["ranking"] == [2, 0, 1]
    assert response.json()["items"] == [_item(cid, 2), _item(cid, 0), _item(cid, 1)]
    assert len(_export_pairs(client)) == 3


def test_bad_tie_groups_store_nothing(client: TestClient, store: Store) -> None:
    one, _ = _completion(client, 3)
    other = chat(client, seed=5)["id"]
    by_index: list[tuple[Any, str]] = [
        ([[0, 0], 1], "duplicate_items"),  # an index twice in one group
        ([[0, 1], 0], "duplicate_items"),  # an answer in a group and outside it
        ([[0, 1], [2, 1]], "duplicate_items"),
        ([[], 0, 1], "empty_tie_group"),
        ([[0]], "too_few_items"),
        ([[0], 0], "duplicate_items"),
        ([[0, 1, 2]], "all_tied"),  # everything tied: no pair
        ([[0, 1]], "all_tied"),
    ]
    for ranking, code in by_index:
        response = client.post("/v1/rankings", json={"completion_id": one, "ranking": ranking})
        assert assert_error(response, 400, "ranking")["code"] == code, ranking
    by_items: list[tuple[Any, str]] = [
        ([[_item(one, 0), _item(one, 0)], _item(one, 1)], "duplicate_items"),
        ([[_item(one, 0), _item(other, 0)]], "all_tied"),
        ([[], _item(one, 0), _item(one, 1)], "empty_tie_group"),
        ([[_item(one, 0)], [_item(one, 0)]], "duplicate_items"),
    ]
    for items, code in by_items:
        response = client.post("/v1/rankings", json={"items": items})
        assert assert_error(response, 400, "items")["code"] == code, items
    malformed: list[dict[str, Any]] = [
        {"completion_id": one, "ranking": [[0, 1], [2, "x"]]},
        {"completion_id": one, "ranking": [[0, [1]], 2]},
        {"completion_id": one, "ranking": []},
        {"completion_id": one, "ranking": [list(range(10)), list(range(10, 17))]},  # > 16 answers
        {"items": [[{"choice_index": 0}], _item(one, 1)]},
    ]
    for payload in malformed:
        assert_error(client.post("/v1/rankings", json=payload), 400)
    assert feedback_counts(store)["rankings"] == 0
    assert store.reward_data("all").groups == []


def test_tie_grouping_is_part_of_the_idempotent_request(client: TestClient,
                                                        store: Store) -> None:
    cid, _ = _completion(client, 3)
    headers = {"Idempotency-Key": "tie-key"}
    payload = {"completion_id": cid, "ranking": [[0, 2], 1]}
    first = client.post("/v1/rankings", json=payload, headers=headers)
    again = client.post("/v1/rankings", json=payload, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    for regrouped, status in (([0, 2, 1], 422), ([0, [2, 1]], 422), ([[0, 2, 1]], 400)):
        response = client.post("/v1/rankings", json={"completion_id": cid, "ranking": regrouped},
                               headers=headers)
        assert_error(response, status)
    assert feedback_counts(store)["rankings"] == 1


def test_reward_data_follows_the_prompts_split(client: TestClient, store: Store) -> None:
    """The app's prompt lands on one side of the held-out split; reward_data() follows it."""
    cid, _ = _completion(client, 3)
    response = client.post("/v1/rankings", json={"completion_id": cid, "ranking": [[0, 1], 2]})
    assert response.status_code == 201, response.text
    held = store.holdout_prompt_count() == 1
    assert len(store.reward_data("holdout").groups) == int(held)
    assert len(store.reward_data("train").groups) == int(not held)
