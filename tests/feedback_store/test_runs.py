"""Training runs: the queue, claims by racing workers, updates, stale runs, watermarks."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from feedback_store import Store
from feedback_store.errors import InvalidInputError, NotFoundError

from .conftest import add_completion


def test_create_claim_update(store: Store) -> None:
    assert not store.has_open_run()
    assert store.claim_next_run("w1") is None
    run = store.create_training_run(trigger="feedback")
    assert run["object"] == "training.run"
    assert (run["status"], run["trigger"], run["started_at"]) == ("queued", "feedback", None)
    assert store.has_open_run()
    claimed = store.claim_next_run("w1")
    assert claimed is not None and claimed["id"] == run["id"]
    assert claimed["status"] == "running" and isinstance(claimed["started_at"], int)
    store.update_training_run(run["id"], metrics={"reward/accuracy": 0.6})
    store.add_policy(id="policy-1", parent=None, path="/p1", sha256=None, status="candidate")
    done = store.update_training_run(
        run["id"], status="succeeded", metrics={"ppo/kl": 0.02}, policy_id="policy-1"
    )
    assert done["metrics"] == {"reward/accuracy": 0.6, "ppo/kl": 0.02}
    assert done["policy_id"] == "policy-1" and isinstance(done["finished_at"], int)
    assert store.get_training_run(run["id"]) == done
    assert not store.has_open_run()


def test_update_errors(store: Store) -> None:
    run = store.create_training_run(trigger="manual")
    with pytest.raises(NotFoundError):
        store.update_training_run(run["id"] + 1, status="failed")
    with pytest.raises(NotFoundError):
        store.update_training_run(run["id"], policy_id="policy-404")
    with pytest.raises(InvalidInputError):
        store.update_training_run(run["id"], status="exploded")
    with pytest.raises(InvalidInputError):
        store.create_training_run(trigger="cron")
    assert store.get_training_run(run["id"])["status"] == "queued"


def test_two_workers_claim_one_run(store: Store) -> None:
    run = store.create_training_run(trigger="manual")
    start = threading.Barrier(2)
    claims: list[dict[str, Any] | None] = []

    def claim(worker: str) -> None:
        start.wait()
        claims.append(store.claim_next_run(worker))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1 and winners[0]["id"] == run["id"]


def test_claims_oldest_first_and_lists_newest_first(store: Store) -> None:
    ids = [store.create_training_run(trigger="manual")["id"] for _ in range(3)]
    assert store.claim_next_run("w")["id"] == ids[0]  # type: ignore[index]
    assert [r["id"] for r in store.list_training_runs()] == ids[::-1]
    assert [r["id"] for r in store.list_training_runs(limit=2)] == ids[:0:-1]


def test_fail_stale_runs(store: Store) -> None:
    first = store.create_training_run(trigger="manual")
    second = store.create_training_run(trigger="manual")
    store.claim_next_run("dead-worker")
    assert store.fail_stale_runs("worker restarted") == 1
    failed = store.get_training_run(first["id"])
    assert (failed["status"], failed["error"]) == ("failed", "worker restarted")
    assert failed["finished_at"] is not None
    assert store.get_training_run(second["id"])["status"] == "queued"
    assert store.fail_stale_runs("again") == 0


def test_watermark_and_new_feedback_count(store: Store) -> None:
    assert store.feedback_watermark() == {"feedback": 0, "rankings": 0, "implicit": 0}
    add_completion(store, "chatcmpl-a")
    store.add_feedback(completion_id="chatcmpl-a", choice_index=0, rating="up")
    store.add_ranking(items=[("chatcmpl-a", 0), ("chatcmpl-a", 1)])
    assert store.new_feedback_count() == 2
    mark = store.feedback_watermark()
    store.add_implicit(completion_id="chatcmpl-a", choice_index=0, signal="copy")
    assert store.new_feedback_count() == 2  # implicit signals trigger no cycle
    mark = store.feedback_watermark()
    assert mark == {"feedback": 1, "rankings": 1, "implicit": 1}

    run = store.create_training_run(trigger="feedback")
    store.claim_next_run("w")
    store.update_training_run(run["id"], watermark=mark)
    assert store.new_feedback_count() == 2  # a running run's watermark does not count yet
    store.update_training_run(run["id"], status="succeeded")
    assert store.new_feedback_count() == 0
    store.add_feedback(completion_id="chatcmpl-a", choice_index=1, rating="down")
    assert store.new_feedback_count() == 1
