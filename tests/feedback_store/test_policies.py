"""Policy versions (activation, rollback, pruning) and reward model checkpoints."""

from __future__ import annotations

import threading

import pytest

from feedback_store import Store
from feedback_store.errors import InvalidInputError, NotFoundError


def _add(store: Store, n: int, status: str = "candidate") -> dict[str, object]:
    return store.add_policy(
        id=f"policy-{n}",
        parent=f"policy-{n - 1}",
        path=f"/ckpt/policy-{n}",
        sha256="ab" * 32,
        status=status,
        metrics={"ppo/kl": 0.1},
    )


def _statuses(store: Store) -> dict[str, str]:
    return {p["id"]: p["status"] for p in store.list_policies()}


def test_ensure_base_policy(store: Store) -> None:
    assert store.active_policy() is None
    assert store.next_policy_id() == "policy-0"
    base = store.ensure_base_policy("/models/base", "cd" * 32)
    assert base["id"] == "policy-0" and base["status"] == "active"
    assert base["path"] == "/models/base" and base["parent"] is None
    assert store.ensure_base_policy("/elsewhere", None) == base
    assert store.active_policy() == base
    assert store.next_policy_id() == "policy-1"


def test_add_list_get(store: Store) -> None:
    store.ensure_base_policy("/models/base", None)
    for n in (1, 2, 10):
        _add(store, n)
    listed = store.list_policies()
    assert [p["id"] for p in listed] == ["policy-10", "policy-2", "policy-1", "policy-0"]
    assert set(listed[0]) >= {"id", "parent", "created_at", "status", "metrics", "path", "sha256"}
    assert store.get_policy("policy-2")["metrics"] == {"ppo/kl": 0.1}
    assert store.next_policy_id() == "policy-11"
    with pytest.raises(NotFoundError):
        store.get_policy("policy-99")
    with pytest.raises(InvalidInputError):
        _add(store, 2)


def test_activate_and_roll_back(store: Store) -> None:
    store.ensure_base_policy("/models/base", None)
    _add(store, 1)
    assert store.activate_policy("policy-1")["status"] == "active"
    assert _statuses(store) == {"policy-1": "active", "policy-0": "retired"}
    store.activate_policy("policy-0")
    assert _statuses(store) == {"policy-1": "retired", "policy-0": "active"}
    assert store.active_policy()["id"] == "policy-0"  # type: ignore[index]
    with pytest.raises(NotFoundError):
        store.activate_policy("policy-7")


def test_rejected_policy_needs_force(store: Store) -> None:
    store.ensure_base_policy("/models/base", None)
    _add(store, 1, status="rejected")
    with pytest.raises(InvalidInputError) as caught:
        store.activate_policy("policy-1")
    assert caught.value.code == "policy_rejected"
    assert _statuses(store)["policy-0"] == "active"
    assert store.activate_policy("policy-1", force=True)["status"] == "active"


def test_concurrent_activations_leave_one_active(store: Store) -> None:
    store.ensure_base_policy("/models/base", None)
    for n in range(1, 5):
        _add(store, n)
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def activate(n: int) -> None:
        start.wait()
        try:
            store.activate_policy(f"policy-{n}")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=activate, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list(_statuses(store).values()).count("active") == 1


def test_prunable_policies(store: Store) -> None:
    store.ensure_base_policy("/models/base", None)
    for n in range(1, 6):
        _add(store, n)
    store.activate_policy("policy-2")
    prunable = [p["id"] for p in store.prunable_policies(keep=2)]
    assert prunable == ["policy-3", "policy-1"]
    store.mark_policy_pruned("policy-3")
    assert [p["id"] for p in store.prunable_policies(keep=2)] == ["policy-1"]
    with pytest.raises(InvalidInputError) as caught:
        store.activate_policy("policy-3")
    assert caught.value.code == "policy_pruned"


def test_reward_models(store: Store) -> None:
    assert store.latest_reward_model() is None
    assert store.next_reward_model_id() == "rm-1"
    store.add_reward_model(id="rm-1", parent=None, path="/rm/1", sha256=None, metrics={})
    record = store.add_reward_model(
        id="rm-2", parent="rm-1", path="/rm/2", sha256="ef" * 32, metrics={"reward/accuracy": 0.7}
    )
    assert store.latest_reward_model() == record
    assert record["metrics"] == {"reward/accuracy": 0.7} and record["parent"] == "rm-1"
    assert store.next_reward_model_id() == "rm-3"


def test_reward_model_state(store: Store) -> None:
    """What the next cycle starts from: the newest RM's watermark (0 where none) and split mark,
    from their columns, whatever its metrics say."""
    assert store.latest_reward_model_state() is None
    store.add_reward_model(id="rm-1", parent=None, path="/rm/1", sha256=None,
                           watermark={"feedback": 7, "rankings": 2, "implicit": 5},
                           trained_on_train_split=True)
    state = store.latest_reward_model_state()
    assert state is not None and (state.id, state.path) == ("rm-1", "/rm/1")
    assert state.watermark == {"feedback": 7, "rankings": 2, "implicit": 5}
    assert state.trained_on_train_split
    store.add_reward_model(id="rm-2", parent="rm-1", path="/rm/2", sha256=None,
                           metrics={"reward/feedback_watermark": 9.0})
    state = store.latest_reward_model_state()
    assert state is not None and state.id == "rm-2"
    assert state.watermark == {"feedback": 0, "rankings": 0, "implicit": 0}
    assert not state.trained_on_train_split


def test_latest_kl_coef_skips_versions_without_one(store: Store) -> None:
    store.ensure_base_policy("/base", None)
    assert store.latest_kl_coef() is None
    store.add_policy(id="policy-1", parent="policy-0", path=None, sha256=None, kl_coef=0.08)
    store.add_policy(id="policy-2", parent="policy-1", path=None, sha256=None, kl_coef=0.03,
                     status="rejected")
    store.add_policy(id="policy-3", parent="policy-2", path=None, sha256=None,
                     metrics={"ppo/kl_coef": 0.5})  # a fixed coefficient: nothing carried
    assert store.latest_kl_coef() == 0.03
