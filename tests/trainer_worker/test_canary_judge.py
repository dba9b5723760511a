"""The judge on its own clock, on SQLite and PostgreSQL: canaries decided while a training cycle
runs, races with operators that end nothing, failed ticks and steps that stop nothing, and the
rule for candidates that wait for a canary to end."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import redis

from feedback_store import Store, migrate
from feedback_store.errors import InvalidInputError, NotFoundError, StoreError
from feedback_store.policy_versions import WAITING
from flywheel.serving_plan import Publisher, RedisKeys
from flywheel.settings import CanarySettings, Settings, TrainSettings
from tests.feedback_store.conftest import _empty_postgres
from tests.feedback_store.conftest import migrated_postgres_url as migrated_postgres_url
from tests.helpers import set_policy_status
from tests.trainer_worker.test_promotion import rate
from trainer_worker import worker as worker_module
from trainer_worker.cycle import CycleResult
from trainer_worker.judge import Judge
from trainer_worker.leader import LeaderLock, LocalLock
from trainer_worker.promotion import Promotion
from trainer_worker.worker import Worker


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[Store]:
    """policy-0 active and candidates policy-1..4, on an empty migrated database of each kind."""
    if request.param == "postgres":
        url = request.getfixturevalue("migrated_postgres_url")
        _empty_postgres(url)
    else:
        url = sqlite_url
        migrate.upgrade(url)
    s = Store(url)
    s.ensure_base_policy("/models/base", None)
    for n in (1, 2, 3, 4):
        s.add_policy(id=f"policy-{n}", parent="policy-0", path=f"/ckpt/policy-{n}",
                     sha256="ab" * 32)
    yield s
    s.close()


def canary_settings(**canary: object) -> CanarySettings:
    return CanarySettings(**{"min_ratings": 50, "min_rollback_ratings": 50, "auto": True,
                             "judge_seconds": 0.05, **canary})  # type: ignore[arg-type]


def make_judge(store: Store, **canary: object) -> Judge:
    promotion = Promotion(Settings(canary=canary_settings(**canary)), store,
                          Publisher(None, RedisKeys("unused")))
    return Judge(promotion, LocalLock(), threading.Event(), interval=0.02)


def rate_for(store: Store, verdict: str, active: str, canary: str) -> None:
    """Thumbs during the canary that make `decide_canary` return `verdict` (min_ratings 50)."""
    if verdict == "reject":  # 70% against 33%
        rate(store, active, 175, 75)
        rate(store, canary, 20, 40)
    else:  # 48% against 72%
        rate(store, active, 120, 130)
        rate(store, canary, 130, 50)


def statuses(store: Store) -> dict[str, str]:
    return {p["id"]: p["status"] for p in store.list_policies()}


def consistent(store: Store) -> dict[str, str]:
    found = statuses(store)
    serving = sorted(found.values())
    assert serving.count("active") == 1 and serving.count("canary") <= 1, found
    return found


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# --- the judge does not wait for the trainer --------------------------------------------------


def test_a_worse_canary_is_rejected_while_a_cycle_runs(
        store: Store, tmp_path: Path, redis_url: str, redis_namespace: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cycle that blocks until the test lets it go: the judge rejects the canary users rate 37
    points worse while the cycle still runs (not after it: how soon is bench work, not a timed
    assertion); the cycle's candidate, released when it ends, goes on canary at once. SIGTERM
    then stops the worker and its judge."""
    url = store.engine.url.render_as_string(hide_password=False)
    settings = Settings(
        data_dir=tmp_path, database_url=url, model="/models/base", redis_url=redis_url,
        redis_namespace=redis_namespace, canary=canary_settings(judge_seconds=0.1),
        train=TrainSettings(min_new_feedback=10**6, poll_seconds=0.05, device="cpu"))
    started, finish = threading.Event(), threading.Event()

    def slow_cycle(ctx: object, run_id: int) -> CycleResult:
        started.set()
        while not finish.wait(0.02):
            if ctx.should_stop():  # type: ignore[attr-defined]
                raise InterruptedError("stopped")
        return CycleResult("succeeded", {"cycle/seconds": 1.0}, "policy-2", None)

    monkeypatch.setattr(worker_module, "run_cycle", slow_cycle)
    store.start_canary("policy-1", 0.2)
    run = store.create_training_run(trigger="manual")
    worker = Worker(settings, store=store)
    assert isinstance(worker.lock, LeaderLock)
    exit_code: list[int] = []
    thread = threading.Thread(target=lambda: exit_code.append(worker.run()), daemon=True)
    thread.start()
    try:
        assert started.wait(20), "the cycle never started"
        rate_for(store, "reject", "policy-0", "policy-1")
        assert wait_for(lambda: statuses(store)["policy-1"] == "rejected", 30)
        assert not finish.is_set() and store.get_training_run(run["id"])["status"] == "running"
        evidence = store.get_policy("policy-1")["metrics"]
        assert evidence["canary/decision"] == "rejected"
        assert evidence["canary/canary_ratings"] <= 60  # no thumb beyond those stored
        finish.set()
        assert wait_for(lambda: store.get_training_run(run["id"])["status"] == "succeeded", 10)
        done = store.get_training_run(run["id"])
        assert done["metrics"]["cycle/release"] == "canary"
        assert done["metrics"]["worker/judge_errors"] == 0
        assert consistent(store)["policy-2"] == "canary"
    finally:
        finish.set()
        worker._on_signal(signal.SIGTERM, None)  # what the handler does on SIGTERM
        thread.join(30)
    assert not thread.is_alive() and exit_code == [0]
    assert not worker.judge.alive
    assert worker.judge.errors == 0 and worker.judge.decisions >= 1


def test_only_the_leader_judges(store: Store, redis_url: str, redis_namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    lock = LeaderLock(client, RedisKeys(redis_namespace).trainer_lock, "me", ttl_seconds=0.6)
    judge = make_judge(store)
    judge.lock = lock
    store.start_canary("policy-1", 0.2)
    rate_for(store, "reject", "policy-0", "policy-1")
    try:
        assert judge.tick() is None  # not leading yet
        assert lock.acquire()
        client.delete(lock.key)  # the lock is lost (another worker may lead now)
        assert wait_for(lambda: not lock.held, 3)
        assert judge.tick() is None and statuses(store)["policy-1"] == "canary"
        assert lock.acquire()
        assert judge.tick() == "rejected"
    finally:
        lock.release()
        client.close()


# --- races end nothing ------------------------------------------------------------------------

OPERATOR: dict[str, Callable[[Store], object]] = {
    # What the admin routes call: POST /activate of the base, DELETE /canary, POST /activate.
    "activate_base": lambda s: s.activate_policy("policy-0"),
    "abort": lambda s: s.end_canary(
        "candidate", {"canary/decision": "aborted", "canary/reason": "ended by an operator"},
        id="policy-2"),
    "promote": lambda s: s.activate_policy("policy-2"),
}
# Statuses of policy-0..2 once both acted (policy-1 active and policy-2 on canary before).
OPERATOR_FIRST = {
    "activate_base": ("active", "retired", "candidate"),
    "abort": ("retired", "active", "candidate"),
    "promote": ("retired", "retired", "active"),
}
JUDGE_FIRST = {  # (verdict, operator) -> (statuses, what the operator's call raised)
    ("reject", "activate_base"): (("active", "retired", "rejected"), None),
    ("reject", "abort"): (("retired", "active", "rejected"), NotFoundError),  # 404 as today
    ("reject", "promote"): (("retired", "active", "rejected"), InvalidInputError),  # unforced
    ("promote", "activate_base"): (("active", "retired", "retired"), None),
    ("promote", "abort"): (("retired", "retired", "active"), NotFoundError),
    ("promote", "promote"): (("retired", "retired", "active"), None),  # already active
}


@pytest.mark.parametrize("operator", sorted(OPERATOR))
@pytest.mark.parametrize("verdict", ["reject", "promote"])
@pytest.mark.parametrize("first", ["operator", "judge"])
def test_an_operator_racing_the_judge_ends_nothing(
        store: Store, first: str, verdict: str, operator: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """policy-1 active, policy-2 on canary, thumbs enough for `verdict`. "operator": the operator
    acts after the judge read the state and before it writes its decision, which then changes
    nothing; "judge": the judge's decision lands first and the operator's call answers as it
    always did. Either way: one active, at most one canary, and the judge's next tick runs."""
    store.activate_policy("policy-1")
    store.start_canary("policy-2", 0.2)
    rate_for(store, verdict, "policy-1", "policy-2")
    judge = make_judge(store)
    act = OPERATOR[operator]
    raised: type[Exception] | None = None
    if first == "operator":
        read = store.canary_evidence

        def evidence_then_operator() -> object:
            found = read()
            act(store)  # between the judge's read and its write
            return found

        monkeypatch.setattr(store, "canary_evidence", evidence_then_operator)
        with caplog.at_level(logging.WARNING, logger="trainer_worker.promotion"):
            assert judge.tick() is None
        assert "the state changed first" in caplog.text
        monkeypatch.undo()
        expected = OPERATOR_FIRST[operator]
    else:
        assert judge.tick() == {"reject": "rejected", "promote": "promoted"}[verdict]
        expected, error = JUDGE_FIRST[(verdict, operator)]
        try:
            act(store)
        except StoreError as exc:
            raised = type(exc)
        assert raised is error
    found = consistent(store)
    assert (found["policy-0"], found["policy-1"], found["policy-2"]) == expected
    assert judge.errors == 0
    assert judge.tick() is None and judge.errors == 0  # the next tick works
    assert consistent(store) == found


def test_operators_and_the_judge_at_full_speed(store: Store) -> None:
    """The judge thread ticking every 20 ms while an operator starts canaries, rates them to a
    decision and activates, aborts or promotes at random moments: every state seen is
    consistent and no tick fails."""
    judge = make_judge(store)
    rng = random.Random(7)
    judge.start()
    try:
        for _ in range(12):
            versions = [v for v, s in statuses(store).items() if s not in ("active", "canary")]
            with suppress(StoreError):  # a race: as the route would answer 409
                store.start_canary(rng.choice(versions), 0.2, force=True)
            active, canary = store.serving_state()
            if active is not None and canary is not None:
                rate_for(store, rng.choice(["reject", "promote"]), active["id"], canary["id"])
            time.sleep(rng.uniform(0.0, 0.05))
            target = rng.choice(["policy-0", "policy-1", "policy-2", "policy-3"])
            action = rng.choice(["activate", "abort", "promote"])
            try:
                if action == "activate":
                    store.activate_policy(target, force=True)
                elif action == "abort":
                    store.end_canary("candidate", id=target)
                else:
                    store.activate_policy(target)
            except StoreError:
                pass  # 404/409/400, as today
            consistent(store)
        time.sleep(0.1)
        assert judge.alive
    finally:
        judge.stop()
    assert judge.errors == 0 and judge.ticks > 0 and not judge.alive
    consistent(store)


def test_release_never_raises_on_a_race(store: Store) -> None:
    judge = make_judge(store, auto=False)
    set_policy_status(store, "policy-1", "retired")  # an operator retired it meanwhile
    assert judge.promotion.release("policy-1").startswith("not released: policy-1 is retired")
    assert judge.promotion.release("policy-2") == "active"
    assert consistent(store)["policy-2"] == "active"


def test_a_rollback_decided_on_a_state_that_changed_does_nothing(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.activate_policy("policy-1")
    rate(store, "policy-1", 170, 30)
    store.activate_policy("policy-2")
    rate(store, "policy-2", 90, 110)
    judge = make_judge(store, auto_rollback=True)
    read = store.list_policies

    def read_then_activate() -> list[dict]:
        rows = read()
        store.activate_policy("policy-3")  # an operator's roll-forward after the judge read
        return rows

    monkeypatch.setattr(store, "list_policies", read_then_activate)
    assert judge.promotion._roll_back_if_forgotten() is None
    monkeypatch.undo()
    assert consistent(store)["policy-3"] == "active"


# --- failures stop nothing --------------------------------------------------------------------


def test_a_failed_tick_is_logged_and_the_judge_carries_on(
        store: Store, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    judge = make_judge(store)
    real_tick = judge.promotion.tick
    calls = {"n": 0}

    def tick_that_fails_once() -> str | None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom in one tick")
        return real_tick()

    monkeypatch.setattr(judge.promotion, "tick", tick_that_fails_once)
    store.start_canary("policy-1", 0.2)
    rate_for(store, "reject", "policy-0", "policy-1")
    with caplog.at_level(logging.ERROR, logger="trainer_worker.judge"):
        judge.start()
        try:
            assert wait_for(lambda: statuses(store)["policy-1"] == "rejected", 10)
        finally:
            judge.stop()
    assert judge.errors == 1 and calls["n"] >= 2 and not judge.alive
    failed = [r for r in caplog.records if "judge tick failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert "boom in one tick" in caplog.text and "Traceback" in caplog.text


def test_a_failed_step_is_logged_and_the_worker_carries_on(
        tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url, model="/models/base",
                        train=TrainSettings(poll_seconds=0.02, device="cpu"),
                        canary=canary_settings())
    store = Store(sqlite_url)
    store.upgrade()
    store.ensure_base_policy("/models/base", None)
    worker = Worker(settings, store=store)
    again = threading.Event()
    calls = {"n": 0}

    def step(device: str) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("boom in one step")
        again.set()
        return False

    monkeypatch.setattr(worker, "step", step)
    exit_code: list[int] = []
    with caplog.at_level(logging.ERROR, logger="trainer_worker.worker"):
        thread = threading.Thread(target=lambda: exit_code.append(worker.run()), daemon=True)
        thread.start()
        try:
            assert again.wait(10)
            assert worker.judge.alive
        finally:
            worker._on_signal(signal.SIGTERM, None)
            thread.join(30)
    assert exit_code == [0] and worker.step_errors == 1 and not worker.judge.alive
    failed = [r for r in caplog.records if "worker step failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None


# --- candidates waiting for the canary --------------------------------------------------------


@pytest.mark.parametrize("ending", ["reject", "promote", "timeout"])
def test_the_newest_waiting_candidate_goes_next_and_older_ones_retire(
        store: Store, ending: str) -> None:
    """Two cycles finish while policy-1 is on canary: both wait. The tick that ends the canary
    puts the newer one (policy-3) on canary and retires policy-2, saying why."""
    judge = make_judge(store, max_hours=0.0 if ending == "timeout" else 24.0)
    promotion = judge.promotion
    assert promotion.release("policy-1") == "canary"
    assert promotion.release("policy-2") == "waiting"
    assert promotion.release("policy-3") == "waiting"
    assert WAITING in store.get_policy("policy-3")["metrics"]
    assert consistent(store) == {"policy-0": "active", "policy-1": "canary",
                                 "policy-2": "candidate", "policy-3": "candidate",
                                 "policy-4": "candidate"}
    if ending != "timeout":
        rate_for(store, ending, "policy-0", "policy-1")
    assert judge.tick() == {"reject": "rejected", "promote": "promoted",
                            "timeout": "timeout"}[ending]
    found = consistent(store)
    assert found["policy-1"] == {"reject": "rejected", "promote": "active",
                                 "timeout": "candidate"}[ending]
    assert found["policy-3"] == "canary" and found["policy-2"] == "retired"
    assert found["policy-4"] == "candidate"  # never released by the worker: not touched
    retired = store.get_policy("policy-2")["metrics"]
    assert "superseded by policy-3" in retired["release/retired"] and WAITING not in retired
    released = store.get_policy("policy-3")["metrics"]
    assert WAITING not in released and released["release/waited_seconds"] >= 0
    if ending == "timeout":  # a canary out of time is a candidate again, not a waiting one
        assert WAITING not in store.get_policy("policy-1")["metrics"]
    else:
        assert judge.tick() is None  # nothing waits now


def test_a_waiting_candidate_goes_next_when_an_operator_ends_the_canary(store: Store) -> None:
    judge = make_judge(store)
    promotion = judge.promotion
    assert promotion.release("policy-1") == "canary"
    assert promotion.release("policy-2") == "waiting"
    store.end_canary("candidate", id="policy-1")  # DELETE /v1/policies/policy-1/canary
    assert judge.tick() == "released"
    assert consistent(store)["policy-2"] == "canary"
    assert statuses(store)["policy-1"] == "candidate"  # aborted: not waiting, not re-released
    store.end_canary("candidate", id="policy-2")
    assert judge.tick() is None and store.serving_state()[1] is None


def test_a_candidate_released_with_no_canary_retires_older_waiting_ones(store: Store) -> None:
    judge = make_judge(store)
    promotion = judge.promotion
    store.start_canary("policy-4", 0.2)  # an operator's canary
    assert promotion.release("policy-1") == "waiting"
    store.end_canary("candidate", id="policy-4")
    # policy-2's cycle ends before the judge's next tick: it goes on canary, policy-1 retires
    assert promotion.release("policy-2") == "canary"
    found = consistent(store)
    assert found["policy-2"] == "canary" and found["policy-1"] == "retired"
    # an operator canaries a waiting candidate by hand: it waits no more
    assert promotion.release("policy-3") == "waiting"
    store.end_canary("candidate", id="policy-2")
    store.start_canary("policy-3", 0.2)
    assert WAITING not in store.get_policy("policy-3")["metrics"]
    store.end_canary("candidate", id="policy-3")
    assert judge.tick() is None and store.serving_state()[1] is None
