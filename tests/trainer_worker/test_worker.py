"""The worker service on a tiny real model: cycles, the gate, publication, faults."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from transformers import AutoTokenizer

from feedback_store import NewChoice, NewCompletion, Store
from flywheel.checkpoints import verify
from flywheel.serving_plan import RedisKeys
from flywheel.settings import PPOConfig, RewardConfig, Settings, TrainSettings
from tests.conftest import POSTGRES_URL
from trainer_worker.leader import LeaderLock
from trainer_worker.worker import Worker

pytestmark = pytest.mark.slow

GOOD = ["Sure! 2 plus 3 is 5.", "Sure! The capital of France is Paris.",
        "Sure! 3 plus 3 is 6.", "Sure! The capital of Italy is Rome."]
BAD = ["Ugh. Look it up yourself.", "Well, well, well, well, numbers are numbers.",
       "Whatever. Count it yourself.", "Cities, cities, cities, cities are cities."]
# The first two fall in the training split, the last two in the held-out split (by text hash).
PROMPTS = ["What is 2 plus 3?", "What is the capital of France?", "What is 3 plus 3?",
           "What is the capital of Italy?"]


def tiny_settings(tmp_path: Path, db_url: str, model: Path, redis_url: str, namespace: str,
                  **train: object) -> Settings:
    return Settings(
        data_dir=tmp_path, database_url=db_url, model=str(model), redis_url=redis_url,
        redis_namespace=namespace,
        # One epoch on this data cannot clear the reward model's accuracy floor; a few gate samples
        # keep the test fast (the floor and the gate have tests of their own in test_cycle.py).
        train=TrainSettings(**{"min_new_feedback": 4, "poll_seconds": 0.1, "eval_prompts": 4,
                               "device": "cpu", "min_holdout_pairs": 4,
                               "reward_accuracy_floor": 0.0, "gate_samples": 8,
                               **train}),  # type: ignore[arg-type]
        ppo=PPOConfig(steps=1, rollout_batch_size=4, num_minibatches=1, ppo_epochs=1,
                      max_new_tokens=8),
        reward=RewardConfig(epochs=1, batch_size=4),
    )


def seed_feedback(store: Store, model: Path, rounds: int = 3) -> None:
    """Completions with a good and a bad answer each, rated and ranked."""
    tok = AutoTokenizer.from_pretrained(model)
    for r in range(rounds):
        for p, prompt in enumerate(PROMPTS):
            messages = [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok.encode(text, add_special_tokens=False)
            choices = [NewChoice(i, answer,
                                 [*tok.encode(answer, add_special_tokens=False), tok.eos_token_id],
                                 [-1.0], "stop")
                       for i, answer in enumerate((GOOD[p], BAD[p]))]
            cid = f"chatcmpl-{r}-{p}"
            store.record_completion(NewCompletion(
                id=cid, kind="chat", prompt_text=prompt, prompt_token_ids=ids,
                messages=messages, model="flywheel", policy_version="policy-0", params={},
                choices=choices))
            store.add_feedback(completion_id=cid, choice_index=0, rating="up")
            store.add_feedback(completion_id=cid, choice_index=1, rating="down")
            store.add_ranking(items=[(cid, 0), (cid, 1)])


@pytest.fixture
def worker_env(tmp_path: Path, sqlite_url: str, tiny_model_dir: Path, redis_url: str,
               redis_namespace: str) -> Iterator[tuple[Store, redis.Redis]]:
    store = Store(sqlite_url)
    store.upgrade()
    seed_feedback(store, tiny_model_dir)
    client = redis.Redis.from_url(redis_url)
    yield store, client
    client.delete(*[k for k in client.keys(f"{redis_namespace}:*")] or ["-"])
    client.close()
    store.close()


def make_worker(tmp_path: Path, store: Store, tiny_model_dir: Path, redis_url: str,
                namespace: str, **train: object) -> Worker:
    url = str(store.engine.url.render_as_string(hide_password=False))
    return Worker(tiny_settings(tmp_path, url, tiny_model_dir, redis_url, namespace, **train),
                  store=store)


def run_until_done(worker: Worker, store: Store) -> dict:
    worker.store.upgrade()
    try:
        for _ in range(4):
            worker.step("cpu")
            runs = store.list_training_runs()
            if runs and runs[0]["status"] not in ("queued", "running"):
                return runs[0]
    finally:
        worker.lock.release()
    raise AssertionError(f"no finished run: {store.list_training_runs()}")


def test_cycle_publishes_a_sealed_policy(tmp_path: Path, worker_env, tiny_model_dir: Path,
                                         redis_url: str, redis_namespace: str) -> None:
    store, client = worker_env
    worker = make_worker(tmp_path, store, tiny_model_dir, redis_url, redis_namespace,
                         min_improvement=-1e9, kl_budget=1e9)
    from flywheel.serving_plan import record_base_policy

    record_base_policy(worker.settings, store)
    run = run_until_done(worker, store)
    assert run["status"] == "succeeded", run
    assert run["trigger"] == "feedback"
    assert run["metrics"]["reward/pairs"] > 0
    assert "ppo/kl_ref" in run["metrics"] and "gate/score_gain" in run["metrics"]
    active = store.active_policy()
    assert active["id"] == run["policy_id"] == "policy-1"
    manifest = verify(active["path"], active["sha256"], "policy-1")
    assert manifest.parent == "policy-0"
    announced = json.loads(client.get(RedisKeys(redis_namespace).active_policy))
    assert announced == {"version": "policy-1", "path": active["path"],
                         "sha256": active["sha256"]}
    assert store.new_feedback_count() == 0
    assert store.latest_reward_model()["id"] == run["reward_model_id"]


def test_gate_rejects_and_publishes_nothing(tmp_path: Path, worker_env, tiny_model_dir: Path,
                                            redis_url: str, redis_namespace: str) -> None:
    store, client = worker_env
    worker = make_worker(tmp_path, store, tiny_model_dir, redis_url, redis_namespace,
                         kl_budget=-1.0)
    from flywheel.serving_plan import record_base_policy

    record_base_policy(worker.settings, store)
    run = run_until_done(worker, store)
    assert run["status"] == "rejected"
    rejected = store.get_policy(run["policy_id"])
    assert rejected["status"] == "rejected" and "gate/candidate_kl_ref" in rejected["metrics"]
    assert store.active_policy()["id"] == "policy-0"
    assert client.get(RedisKeys(redis_namespace).active_policy) is None


def test_interrupted_cycle_leaves_nothing_and_next_runs(tmp_path: Path, worker_env,
                                                        tiny_model_dir: Path, redis_url: str,
                                                        redis_namespace: str) -> None:
    store, client = worker_env
    worker = make_worker(tmp_path, store, tiny_model_dir, redis_url, redis_namespace,
                         min_improvement=-1e9, kl_budget=1e9)
    from flywheel.serving_plan import record_base_policy

    record_base_policy(worker.settings, store)
    original = worker.should_stop

    def stop_during_ppo() -> bool:  # as if SIGTERM came once the reward model was stored
        return store.latest_reward_model() is not None or original()

    worker.should_stop = stop_during_ppo  # type: ignore[method-assign]
    run = run_until_done(worker, store)
    assert run["status"] == "cancelled" and "interrupted" in run["error"]
    assert [p["id"] for p in store.list_policies()] == ["policy-0"]
    policies_dir = Path(worker.settings.checkpoint_dir) / "policies"
    assert not policies_dir.exists() or list(policies_dir.iterdir()) == []
    assert client.get(RedisKeys(redis_namespace).active_policy) is None

    worker.should_stop = original  # type: ignore[method-assign]
    store.create_training_run(trigger="manual")
    run = run_until_done(worker, store)
    assert run["status"] == "succeeded" and run["trigger"] == "manual"


def test_stale_running_run_is_failed_by_the_next_leader(tmp_path: Path, worker_env,
                                                         tiny_model_dir: Path, redis_url: str,
                                                         redis_namespace: str) -> None:
    store, _ = worker_env
    store.create_training_run(trigger="manual")
    dead = store.claim_next_run("dead-worker")
    leftover = tmp_path / "checkpoints" / "policies" / ".tmp-policy-1-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    worker = make_worker(tmp_path, store, tiny_model_dir, redis_url, redis_namespace,
                         min_new_feedback=10**6)
    assert worker.step("cpu") is False  # leads, cleans up, finds nothing to do
    failed = store.get_training_run(dead["id"])
    assert failed["status"] == "failed" and "abandoned" in failed["error"]
    assert not leftover.exists()
    worker.lock.release()


def test_database_down_mid_cycle_marks_run_failed(tmp_path: Path, postgres_url: str,
                                                  tiny_model_dir: Path, redis_url: str,
                                                  redis_namespace: str) -> None:
    store = Store(postgres_url)
    store.upgrade()
    seed_feedback(store, tiny_model_dir, rounds=2)
    worker = Worker(tiny_settings(tmp_path, postgres_url, tiny_model_dir, redis_url,
                                  redis_namespace, min_improvement=-1e9, kl_budget=1e9),
                    store=store)
    from flywheel.serving_plan import record_base_policy

    record_base_policy(worker.settings, store)
    name = postgres_url.rsplit("/", 1)[1]
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    state = {"down": False}

    def take_db_down_once() -> bool:
        if not state["down"] and store.latest_reward_model() is not None:
            state["down"] = True
            with admin.connect() as conn:
                conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
                conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE datname = :n"), {"n": name})
        return False

    mark_failed = worker._mark_failed

    def restore_then_mark(*args: object) -> None:
        # The database comes back a little after the worker first tries to record the failure.
        def restore() -> None:
            time.sleep(1.5)
            with admin.connect() as conn:
                conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))

        threading.Thread(target=restore, daemon=True).start()
        mark_failed(*args)  # type: ignore[arg-type]

    worker.should_stop = take_db_down_once  # type: ignore[method-assign]
    worker._mark_failed = restore_then_mark  # type: ignore[method-assign]
    run = run_until_done(worker, store)
    assert state["down"]
    assert run["status"] == "failed"
    assert [p["id"] for p in store.list_policies()] == ["policy-0"]
    policies_dir = Path(worker.settings.checkpoint_dir) / "policies"
    assert not policies_dir.exists() or list(policies_dir.iterdir()) == []
    store.close()
    admin.dispose()


def test_leader_lock_is_exclusive_and_renewed(redis_url: str, redis_namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = RedisKeys(redis_namespace).trainer_lock
    first = LeaderLock(client, key, "a", ttl_seconds=0.6)
    second = LeaderLock(client, key, "b", ttl_seconds=0.6)
    assert first.acquire()
    assert not second.acquire()
    time.sleep(1.5)  # several TTLs: renewal keeps it
    assert not second.acquire() and first.held
    client.delete(key)  # someone broke the lock: the holder notices
    deadline = time.monotonic() + 3
    while first.held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.lost.is_set()
    assert second.acquire()
    first.release()
    assert client.get(key) == b"b"  # releasing a lost lock never deletes another's
    second.release()
    assert client.get(key) is None
    client.close()
