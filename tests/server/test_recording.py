"""Group commit of served completions (server/completions/recording.py) on a real store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from feedback_store import NewChoice, NewCompletion, Store
from feedback_store.errors import InvalidInputError, StoreError, StoreUnavailableError
from server.completions.recording import CompletionWrites


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    s = Store(sqlite_url)
    s.upgrade()
    yield s
    s.close()


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
    writes = CompletionWrites(store)
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
    writes = CompletionWrites(store)
    try:
        outcomes = await asyncio.gather(*(writes.add(_record(f"cmpl-{i}")) for i in range(3)))
    finally:
        writes.close()
    assert all(isinstance(o, StoreUnavailableError) for o in outcomes)
