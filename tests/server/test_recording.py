"""Group commit (server/group_commit.py) of served completions and of ratings, on a real store
(`store` of tests/server/conftest.py: SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

from feedback_store import NewChoice, NewCompletion, Store
from feedback_store.errors import (
    InvalidInputError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
)
from server.completions.recording import completion_writes
from server.feedback.recording import feedback_writes
from tests.helpers import feedback_counts


def _record(cid: str) -> NewCompletion:
    return NewCompletion(id=cid, kind="text", prompt_text="Q", prompt_token_ids=[1],
                         messages=None, model="flywheel", policy_version="policy-0", params={},
                         choices=[NewChoice(0, "A", [2], [-0.5], "stop")])


async def test_completions_ending_during_a_write_go_in_one_batch(store: Store) -> None:
    batches: list[list[str]] = []
    write = store.record_completions

    def spy(records: list[NewCompletion]) -> list[StoreError | None]:
        batches.append([r.id for r in records])
        return write(records)

    store.record_completions = spy  # type: ignore[method-assign]
    writes = completion_writes(store)
    try:
        outcomes = await asyncio.gather(*(writes.add(_record(f"cmpl-{i}")) for i in range(5)))
        assert outcomes == [None] * 5
        # The first found the writer free; the rest came while it wrote, and waited together.
        assert batches == [["cmpl-0"], ["cmpl-1", "cmpl-2", "cmpl-3", "cmpl-4"]]
        refused = await writes.add(_record("cmpl-3"))  # a duplicate id: refused, on its own
        assert isinstance(refused, InvalidInputError)
    finally:
        writes.close()
    record, created = store.add_feedback(completion_id="cmpl-4", choice_index=0, rating="up")
    assert created and record["completion_id"] == "cmpl-4"


async def test_an_unavailable_database_answers_every_completion_of_the_batch(
        store: Store) -> None:
    def down(records: list[NewCompletion]) -> list[StoreError | None]:
        raise StoreUnavailableError("The database is unavailable")

    store.record_completions = down  # type: ignore[method-assign]
    writes = completion_writes(store)
    try:
        outcomes = await asyncio.gather(*(writes.add(_record(f"cmpl-{i}")) for i in range(3)),
                                        return_exceptions=True)
    finally:
        writes.close()
    assert all(isinstance(o, StoreUnavailableError) for o in outcomes)


async def test_ratings_arriving_during_a_write_wait_and_go_together(store: Store) -> None:
    completions = completion_writes(store)
    try:
        await asyncio.gather(*(completions.add(_record(f"cmpl-{i}")) for i in range(6)))
    finally:
        completions.close()
    batches: list[int] = []
    write = store.add_feedbacks

    def spy(requests: list[dict]) -> list:
        batches.append(len(requests))
        return write(requests)

    store.add_feedbacks = spy  # type: ignore[method-assign]
    writes = feedback_writes(store)
    try:
        outcomes = await asyncio.gather(*(writes.add({
            "completion_id": f"cmpl-{i}", "choice_index": 0, "rating": "up"})
            for i in range(6)))
        unknown = await writes.add({"completion_id": "cmpl-x", "choice_index": 0,
                                    "rating": "up"})
    finally:
        writes.close()
    # Two writers: the first two ratings found one free each, the other four waited together.
    assert batches == [1, 1, 4, 1]
    assert [record["completion_id"] for record, created in outcomes] == \
        [f"cmpl-{i}" for i in range(6)]
    assert isinstance(unknown, NotFoundError)
    assert feedback_counts(store)["up"] == 6
