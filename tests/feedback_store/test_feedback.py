"""Completions, thumbs and rankings: records, validation, idempotency and concurrency."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa

from feedback_store import Store
from feedback_store.base import request_hash
from feedback_store.errors import IdempotencyMismatchError, InvalidInputError, NotFoundError
from feedback_store.models import Choice, RankingItem
from feedback_store.types import Rater
from tests.helpers import feedback_counts

from .conftest import add_completion, count

A = "chatcmpl-a"


def test_record_completion_dedupes_prompts(store: Store) -> None:
    add_completion(store, "chatcmpl-a")
    add_completion(store, "chatcmpl-b")
    add_completion(store, "cmpl-c", prompt="Other", kind="text")
    assert (count(store, "prompts"), count(store, "completions")) == (2, 3)
    assert count(store, "choices") == 6


def test_duplicate_completion_id_writes_nothing(store: Store) -> None:
    add_completion(store, "chatcmpl-a")
    with pytest.raises(InvalidInputError) as caught:
        add_completion(store, "chatcmpl-a", prompt="New prompt")
    assert caught.value.param == "id"
    assert (count(store, "prompts"), count(store, "choices")) == (1, 2)


def test_values_the_database_refuses_are_invalid_input(store: Store) -> None:
    """PostgreSQL refuses a version name longer than its column; that is the client's 400, not
    a 500, and nothing is half-written (SQLite does not enforce lengths and stores it)."""
    too_long = "v" * 100
    if store.dialect == "postgresql":
        with pytest.raises(InvalidInputError):
            add_completion(store, "chatcmpl-a", policy_version=too_long)
        assert count(store, "prompts") == count(store, "completions") == 0
    else:
        add_completion(store, "chatcmpl-a", policy_version=too_long)


def test_add_feedback_record(store: Store) -> None:
    add_completion(store, "chatcmpl-a")
    record, created = store.add_feedback(
        completion_id="chatcmpl-a", choice_index=1, rating="down", comment="rude", user="u1"
    )
    assert created
    assert record["id"].startswith("fb-")
    assert isinstance(record.pop("created_at"), int)
    assert {k: v for k, v in record.items() if k != "id"} == {
        "object": "feedback",
        "completion_id": "chatcmpl-a",
        "choice_index": 1,
        "rating": "down",
        "comment": "rude",
        "user": "u1",
    }


@pytest.mark.parametrize(
    ("completion_id", "choice_index", "rating", "error", "param"),
    [
        ("chatcmpl-nope", 0, "up", NotFoundError, "completion_id"),
        ("chatcmpl-a", 5, "up", NotFoundError, "choice_index"),
        ("chatcmpl-a", 2**40, "up", NotFoundError, "choice_index"),
        ("chatcmpl-a", 0, "meh", InvalidInputError, "rating"),
    ],
)
def test_add_feedback_errors(
    store: Store,
    completion_id: str,
    choice_index: int,
    rating: str,
    error: type[Exception],
    param: str,
) -> None:
    add_completion(store, "chatcmpl-a")
    with pytest.raises(error) as caught:
        store.add_feedback(completion_id=completion_id, choice_index=choice_index, rating=rating)
    assert caught.value.param == param  # type: ignore[attr-defined]
    assert count(store, "feedback") == 0


def test_feedback_idempotency(store: Store) -> None:
    add_completion(store, "chatcmpl-a")
    body: dict[str, Any] = {"completion_id": "chatcmpl-a", "choice_index": 0, "rating": "up"}
    first, created = store.add_feedback(**body, idempotency_key="key-1")
    again, created_again = store.add_feedback(**body, idempotency_key="key-1")
    assert (created, created_again) == (True, False)
    assert again == first
    with pytest.raises(IdempotencyMismatchError):
        store.add_feedback(**{**body, "rating": "down"}, idempotency_key="key-1")
    with pytest.raises(InvalidInputError) as caught:
        store.add_feedback(**body, idempotency_key="k" * 256)
    assert caught.value.param == "idempotency_key"
    assert count(store, "feedback") == 1
    assert feedback_counts(store) == {"up": 1, "down": 0, "rankings": 0}


def test_200_concurrent_feedback_calls(store: Store) -> None:
    add_completion(store, "chatcmpl-a")

    def rate(i: int) -> tuple[dict[str, Any], bool]:
        return store.add_feedback(
            completion_id="chatcmpl-a",
            choice_index=i % 2,
            rating="up" if i % 3 else "down",
            idempotency_key=f"key-{i}" if i % 2 else None,
        )

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(rate, range(200)))
    assert all(created for _, created in results)
    assert len({record["id"] for record, _ in results}) == 200
    assert count(store, "feedback") == 200


def test_racing_retries_store_one_row(store: Store) -> None:
    add_completion(store, "chatcmpl-a")
    start = threading.Barrier(12)

    def retry(_: int) -> tuple[dict[str, Any], bool]:
        start.wait()
        return store.add_feedback(
            completion_id="chatcmpl-a", choice_index=0, rating="up", idempotency_key="same"
        )

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(retry, range(12)))
    assert sum(created for _, created in results) == 1
    assert len({record["id"] for record, _ in results}) == 1
    assert count(store, "feedback") == 1


def test_add_ranking_record_and_idempotency(store: Store) -> None:
    add_completion(store, "chatcmpl-a", texts=("A", "B", "C"))
    add_completion(store, "chatcmpl-b", texts=("D",))
    items = [("chatcmpl-a", 2), ("chatcmpl-b", 0), ("chatcmpl-a", 0)]
    record, created = store.add_ranking(items=items, user="u", idempotency_key="rk-key")
    assert created and record["id"].startswith("rk-")
    assert record["object"] == "ranking" and record["user"] == "u"
    assert record["items"] == [
        {"completion_id": cid, "choice_index": index} for cid, index in items
    ]
    again, created_again = store.add_ranking(items=items, user="u", idempotency_key="rk-key")
    assert (again, created_again) == (record, False)
    with pytest.raises(IdempotencyMismatchError):
        store.add_ranking(items=items[:2], user="u", idempotency_key="rk-key")
    assert (count(store, "rankings"), count(store, "ranking_items")) == (1, 3)
    assert feedback_counts(store) == {"up": 0, "down": 0, "rankings": 1}


@pytest.mark.parametrize(
    ("items", "error", "param"),
    [
        ([("chatcmpl-a", 0)], InvalidInputError, "items"),
        ([("chatcmpl-a", 0), ("chatcmpl-a", 0)], InvalidInputError, "items"),
        ([("chatcmpl-a", 0), ("chatcmpl-other", 0)], InvalidInputError, "items"),
        ([("chatcmpl-a", 0), ("chatcmpl-nope", 0)], NotFoundError, "completion_id"),
        ([("chatcmpl-a", 0), ("chatcmpl-a", 7)], NotFoundError, "choice_index"),
        ([[(A, 0), (A, 0)], (A, 1)], InvalidInputError, "items"),  # an index twice in a group
        ([[(A, 0), (A, 1)], (A, 0)], InvalidInputError, "items"),  # in a group and outside
        ([[], (A, 0), (A, 1)], InvalidInputError, "items"),  # an empty group
        ([[(A, 0)]], InvalidInputError, "items"),  # one answer in all
        ([[(A, 0), (A, 1)]], InvalidInputError, "items"),  # all tied: no pair
        ([[(A, 0), (A, 1)], []], InvalidInputError, "items"),
        ([[(A, 0), (A, 7)], (A, 1)], NotFoundError, "choice_index"),
        ([[(A, 0), ("chatcmpl-other", 0)], (A, 1)], InvalidInputError, "items"),
    ],
)
def test_invalid_rankings_write_nothing(
    store: Store, items: list[Any], error: type[Exception], param: str
) -> None:
    add_completion(store, "chatcmpl-a")
    add_completion(store, "chatcmpl-other", prompt="A different question")
    with pytest.raises(error) as caught:
        store.add_ranking(items=items, idempotency_key="k")
    assert caught.value.param == param  # type: ignore[attr-defined]
    assert (count(store, "rankings"), count(store, "ranking_items")) == (0, 0)


def _stored_tiers(store: Store) -> list[tuple[int, int, int]]:
    """(position, tier, choice index) of every stored ranking item, in order."""
    query = (
        sa.select(RankingItem.position, RankingItem.tier, Choice.index)
        .join(Choice, Choice.id == RankingItem.choice_id)
        .order_by(RankingItem.ranking_id, RankingItem.position)
    )
    with store.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def test_add_ranking_with_ties(store: Store) -> None:
    add_completion(store, A, texts=("A", "B", "C", "D"))
    record, created = store.add_ranking(
        items=[[(A, 0), (A, 2)], (A, 1), [(A, 3)]], idempotency_key="tied"
    )
    assert created
    assert record["items"] == [
        [{"completion_id": A, "choice_index": 0}, {"completion_id": A, "choice_index": 2}],
        {"completion_id": A, "choice_index": 1},
        {"completion_id": A, "choice_index": 3},  # a group of one is a plain answer
    ]
    assert _stored_tiers(store) == [(0, 0, 0), (1, 0, 2), (2, 1, 1), (3, 2, 3)]
    again, created_again = store.add_ranking(
        items=[[(A, 0), (A, 2)], [(A, 1)], (A, 3)], idempotency_key="tied"
    )
    assert (again, created_again) == (record, False)
    for regrouped in (
        [(A, 0), (A, 2), (A, 1), (A, 3)],  # the same order, no tie
        [(A, 0), [(A, 2), (A, 1)], (A, 3)],
        [[(A, 0), (A, 2), (A, 1)], (A, 3)],
    ):
        with pytest.raises(IdempotencyMismatchError):
            store.add_ranking(items=regrouped, idempotency_key="tied")
    assert (count(store, "rankings"), count(store, "ranking_items")) == (1, 4)


def test_untied_ranking_keeps_its_request_hash(store: Store) -> None:
    """Retries of rankings stored before ties existed still replay: plain answers hash as before."""
    add_completion(store, A)
    store.add_ranking(items=[(A, 0), (A, 1)], user="u", idempotency_key="old")
    with store.engine.connect() as conn:
        stored = conn.scalar(sa.text("SELECT request_hash FROM rankings"))
    assert stored == request_hash({"items": [[A, 0], [A, 1]], "user": "u"})
    assert _stored_tiers(store) == [(0, 0, 0), (1, 1, 1)]


def test_a_new_ranking_replaces_the_voters_earlier_one(store: Store) -> None:
    """One vote per voter on a prompt's answers: a re-ranking replaces the earlier ranking (kept,
    training nothing); another voter's, or the same user's under another key, stays."""
    add_completion(store, "chatcmpl-a", texts=("A", "B", "C"))
    first = [("chatcmpl-a", 0), ("chatcmpl-a", 1), ("chatcmpl-a", 2)]
    store.add_ranking(items=first, user="u")
    store.add_ranking(items=first, user="v")
    store.add_ranking(items=first, rater=Rater(key_scope="k1", user="u"))
    store.add_ranking(items=list(reversed(first)), user="u")  # u changed its mind
    assert count(store, "rankings") == 4
    groups = [g for g in store.reward_data().groups if g.source == "ranking"]
    orders = sorted((g.identity, tuple(tuple(a) for a in g.answers)) for g in groups)
    tokens = [[ord(ch) for ch in text] for text in ("A", "B", "C")]
    assert [identity for identity, _ in orders] == ["key:k1", "user:u", "user:v"]
    assert dict(orders)["user:u"] == tuple(tuple(t) for t in reversed(tokens))
