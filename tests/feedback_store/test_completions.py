"""Served completions stored in batches (the serving path's group commit)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from feedback_store import NewChoice, NewCompletion, Store
from feedback_store.errors import InvalidInputError
from feedback_store.models import Choice, Completion, Feedback, Prompt

from .conftest import add_completion, count


def _completion(cid: str, prompt: str, texts: tuple[str, ...] = ("Hi!",)) -> NewCompletion:
    return NewCompletion(
        id=cid, kind="chat", prompt_text=prompt, prompt_token_ids=[ord(c) for c in prompt],
        messages=[{"role": "user", "content": prompt}], model="flywheel",
        policy_version="policy-1", params={"n": len(texts)},
        choices=[NewChoice(i, t, [ord(c) for c in t], [-0.25] * len(t), "stop")
                 for i, t in enumerate(texts)],
    )


def test_a_batch_stores_every_completion_and_each_prompt_once(store: Store) -> None:
    add_completion(store, "chatcmpl-old", prompt="Known?")
    outcomes = store.record_completions([
        _completion("chatcmpl-a", "Known?"),  # a prompt stored before the batch
        _completion("chatcmpl-b", "New?", ("x", "yz")),
        _completion("chatcmpl-c", "New?"),  # a prompt new twice in one batch
    ])
    assert outcomes == [None, None, None]
    assert (count(store, "prompts"), count(store, "completions")) == (2, 4)
    assert count(store, "choices") == 2 + 1 + 2 + 1
    record, created = store.add_feedback(completion_id="chatcmpl-b", choice_index=1,
                                         rating="up")
    assert created and record["completion_id"] == "chatcmpl-b"


def test_a_refused_record_fails_alone(store: Store) -> None:
    add_completion(store, "chatcmpl-taken")
    empty = NewCompletion(id="chatcmpl-empty", kind="chat", prompt_text="p",
                          prompt_token_ids=[1], messages=None, model="flywheel",
                          policy_version="policy-1", params={}, choices=[])
    outcomes = store.record_completions([
        _completion("chatcmpl-a", "One?"),
        _completion("chatcmpl-taken", "Two?"),  # a duplicate id spoils the batch's statement
        empty,
        _completion("chatcmpl-b", "Three?"),
    ])
    assert outcomes[0] is None and outcomes[3] is None
    assert isinstance(outcomes[1], InvalidInputError) and outcomes[1].param == "id"
    assert isinstance(outcomes[2], InvalidInputError) and outcomes[2].param == "choices"
    assert count(store, "completions") == 3  # taken, a, b
    with pytest.raises(InvalidInputError):
        store.record_completion(_completion("chatcmpl-a", "Again?"))


def test_nul_characters_are_stored_as_replacement_characters(store: Store) -> None:
    """PostgreSQL's text and JSON refuse NUL; a byte-level model emits one now and then and a
    user may send one. Stored as U+FFFD on both databases, so the answer can still be rated."""
    nul = _completion("chatcmpl-nul", "a\x00b", ("x\x00y",))
    nul = NewCompletion(**{**nul.__dict__, "user": "u\x00"})
    assert store.record_completions([nul]) == [None]
    _, created = store.add_feedback(completion_id="chatcmpl-nul", choice_index=0, rating="up",
                                    comment="fine\x00", user="v\x00")
    assert created
    with store._tx(write=False) as s:
        text = s.scalar(sa.select(Choice.text).where(Choice.completion_id == "chatcmpl-nul"))
        prompt = s.scalar(sa.select(Prompt.prompt_text))
        comment, user = s.execute(sa.select(Feedback.comment, Feedback.user)).one()
    assert (text, prompt, comment, user) == ("x\ufffdy", "a\ufffdb", "fine\ufffd", "v\ufffd")


def _prompt_of(store: Store, completion_id: str) -> str:
    with store._tx(write=False) as s:
        return s.scalar(sa.select(Prompt.prompt_text).join(Completion)
                        .where(Completion.id == completion_id))


def test_a_known_prompt_costs_no_statement_on_the_prompts_table(store: Store) -> None:
    """The serving path remembers the ids of prompts it stored (they are never deleted)."""
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *_: statements.append(statement))
    assert store.record_completions([_completion("chatcmpl-a", "Again?")]) == [None]
    assert any("prompts" in s for s in statements)
    statements.clear()
    assert store.record_completions([_completion("chatcmpl-b", "Again?")]) == [None]
    assert statements and not any("prompts" in s for s in statements)
    assert _prompt_of(store, "chatcmpl-b") == "Again?"
    assert count(store, "prompts") == 1


def test_a_rolled_back_prompt_is_not_remembered(store: Store) -> None:
    """A prompt inserted by a transaction that then failed is gone; its id must not be reused
    (PostgreSQL does not hand the same id out again)."""
    add_completion(store, "chatcmpl-taken")
    with pytest.raises(InvalidInputError):
        store.record_completion(_completion("chatcmpl-taken", "Rolled back?"))
    assert count(store, "prompts") == 1
    store.record_completion(_completion("chatcmpl-new", "Rolled back?"))
    assert _prompt_of(store, "chatcmpl-new") == "Rolled back?"


@pytest.mark.parametrize("returning", [True, False], ids=["returning", "no-returning"])
def test_replicas_storing_one_new_prompt_share_its_row(store: Store, returning: bool) -> None:
    """Each replica has its own memory of prompt ids; the second to insert a prompt finds the
    first one's row (with INSERT ... RETURNING, and without, as on SQLite before 3.35)."""
    other = Store(store.url)
    try:
        for s in (store, other):
            s.engine.dialect.insert_executemany_returning = returning
        assert store.record_completions([_completion("chatcmpl-a", "Shared?")]) == [None]
        assert other.record_completions([_completion("chatcmpl-b", "Shared?"),
                                         _completion("chatcmpl-c", "Own?")]) == [None, None]
        assert store.record_completions([_completion("chatcmpl-d", "Own?")]) == [None]
    finally:
        other.close()
    assert count(store, "prompts") == 2
    assert [_prompt_of(store, f"chatcmpl-{c}") for c in "abcd"] == ["Shared?", "Shared?",
                                                                     "Own?", "Own?"]
