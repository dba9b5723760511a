"""A cycle's bounded window: new events, a replay sample, a held-out sample, duplicates once."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import sqlalchemy as sa

from feedback_store import Store, ThumbExample
from feedback_store.feedback_reads import sample_by_id
from feedback_store.models import Prompt
from feedback_store.preference_groups import balance_thumbs

from .conftest import add_completion
from .test_training_data import _prompt


def _seed(store: Store, n: int, *, holdout: bool = False, user: str | None = None) -> None:
    """n requests on distinct prompts, each ranked best-first: n ranking events."""
    for i in range(n):
        cid = f"cmpl-{holdout}-{user}-{i}"
        add_completion(store, cid, prompt=_prompt(f"p{i}-{user}", holdout=holdout),
                       texts=(f"good {i}", f"bad {i}"), kind="text")
        store.add_ranking(items=[(cid, 0), (cid, 1)], user=user)


def test_new_events_and_a_replay_sample(store: Store) -> None:
    _seed(store, 30)
    since = store.feedback_watermark()
    _seed(store, 10, user="late")
    until = store.feedback_watermark()
    data = store.cycle_reward_data(since=since, until=until, new=4, replay=6, seed=1)
    new = [g for g in data.groups if g.new]
    old = [g for g in data.groups if not g.new]
    assert len(new) == 4 and {g.identity for g in new} == {"user:late"}
    assert [g.answers[0] for g in new] == [[ord(c) for c in f"good {i}"] for i in range(6, 10)]
    assert len(old) == 6 and {g.identity for g in old} == {"anonymous"}
    again = store.cycle_reward_data(since=since, until=until, new=4, replay=6, seed=1)
    assert again == data  # the same seed and data, the same sample
    other = store.cycle_reward_data(since=since, until=until, new=4, replay=6, seed=2)
    assert [g.answers for g in other.groups if not g.new] != [g.answers for g in old]
    _seed(store, 3, user="after")  # beyond `until`: not this cycle's
    assert store.cycle_reward_data(since=since, until=until, new=100, replay=0, seed=1) == \
        store.cycle_reward_data(since=since, until=until, new=10, replay=0, seed=1)


def test_replay_larger_than_history_takes_all_of_it(store: Store) -> None:
    _seed(store, 5)
    until = store.feedback_watermark()
    data = store.cycle_reward_data(since=until, until=until, new=10, replay=50, seed=0)
    assert len(data.groups) == 5 and not any(g.new for g in data.groups)


def test_holdout_sample_is_bounded_and_held_out(store: Store) -> None:
    _seed(store, 12, holdout=True)
    _seed(store, 4)
    until = store.feedback_watermark()
    sample = store.holdout_reward_data(until=until, size=5, seed=0)
    assert len(sample.groups) == 5
    held = {tuple(g.prompt_token_ids) for g in store.reward_data("holdout").groups}
    assert {tuple(g.prompt_token_ids) for g in sample.groups} <= held
    assert len(store.holdout_reward_data(until=until, size=100, seed=0).groups) == 12


def test_thumbs_that_repeat_a_ranking_count_once(store: Store) -> None:
    add_completion(store, "cmpl-1", prompt="Q1", texts=("good", "bad"), kind="text")
    store.add_ranking(items=[("cmpl-1", 0), ("cmpl-1", 1)], user="a")
    for user in ("a", "b"):
        store.add_feedback(completion_id="cmpl-1", choice_index=0, rating="up", user=user)
        store.add_feedback(completion_id="cmpl-1", choice_index=1, rating="down", user=user)
    data = store.reward_data()
    # a's up/down pair repeats a's ranking; b's pair is b's own statement.
    assert [(g.source, g.identity) for g in data.groups] == [
        ("ranking", "user:a"), ("thumbs", "user:b")]
    assert data.thumbs == []


def test_thumbs_pair_only_within_one_identity(store: Store) -> None:
    add_completion(store, "cmpl-1", prompt="Q1", texts=("good", "bad"), kind="text")
    store.add_feedback(completion_id="cmpl-1", choice_index=0, rating="up", user="a")
    store.add_feedback(completion_id="cmpl-1", choice_index=1, rating="down", user="b")
    data = store.reward_data()
    assert data.groups == [] and [t.identity for t in data.thumbs] == ["user:a", "user:b"]


def test_lone_thumbs_are_class_balanced() -> None:
    thumbs = [ThumbExample([1], [2], True)] * 3 + [ThumbExample([1], [3], False)]
    balanced = balance_thumbs(thumbs)
    assert [t.weight for t in balanced] == [4 / 6] * 3 + [2.0]
    assert sum(t.weight for t in balanced if t.label) == sum(
        t.weight for t in balanced if not t.label)
    assert balance_thumbs(thumbs[:3]) == thumbs[:3]  # one class: nothing to balance


def test_sample_by_id_draws_uniformly_without_reading_everything() -> None:
    """A million ids of which a fifth exist on the wanted side: 50 drawn, a few hundred read."""
    asked: list[int] = []

    def read(where: sa.ColumnElement[bool]) -> list[int]:
        ids = list(where.right.value)  # type: ignore[attr-defined]
        asked.extend(ids)
        return [i for i in ids if i % 5 == 0]

    column = sa.column("id")
    sample = sample_by_id(read, column, lambda i: i, 1_000_000, 50, random.Random(0))
    assert len(sample) == len(set(sample)) == 50 and all(i % 5 == 0 for i in sample)
    assert len(asked) < 1_000
    assert sample == sample_by_id(read, column, lambda i: i, 1_000_000, 50, random.Random(0))


def test_prompts_sample_within_a_large_id_range(store: Store) -> None:
    """Gaps in the ids (deleted or never committed rows) cost draws, not correctness."""
    for n in range(6):
        add_completion(store, f"cmpl-{n}", prompt=_prompt(f"question {n}", holdout=False),
                       kind="text")
    with store.engine.begin() as conn:  # six more far up the id range
        conn.execute(sa.insert(Prompt), [
            {"id": 5000 + n, "sha256": f"{n:064d}", "messages": None, "prompt_text": f"far {n}",
             "prompt_token_ids": [n], "holdout": False, "created_at": datetime.now(timezone.utc)}
            for n in range(6)])
    picked = store.sample_prompts(4, seed=3)
    assert len({p.id for p in picked}) == 4
    assert picked == store.sample_prompts(4, seed=3)
    assert len(store.sample_prompts(100, seed=3)) == 12
    assert store.sample_prompts(100, seed=3, holdout=True) == []


def test_sampled_thumbs_keep_their_request_pairs(store: Store) -> None:
    """Thumbs are drawn with the other thumbs on their request: the up/down pairs survive."""
    for i in range(30):
        cid = f"cmpl-{i}"
        add_completion(store, cid, prompt=_prompt(f"q{i}", holdout=False),
                       texts=(f"good {i}", f"bad {i}"), kind="text")
        store.add_feedback(completion_id=cid, choice_index=0, rating="up")
        store.add_feedback(completion_id=cid, choice_index=1, rating="down")
    until = store.feedback_watermark()
    data = store.cycle_reward_data(since=until, until=until, new=20, replay=20, seed=0)
    assert len(data.groups) == 10 and data.thumbs == []
    assert all(g.source == "thumbs" and not g.new for g in data.groups)
