"""A cycle whose streamed read loses the database: the run fails, nothing is published, and the
next cycle runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from feedback_store import Store, feedback_reads
from flywheel.serving_plan import record_base_policy
from flywheel.settings import PPOConfig, RewardConfig, Settings, TrainSettings
from tests.trainer_worker.test_cycle import prompts_on_side, seed
from trainer_worker.worker import Worker

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[Store]:
    store = Store(postgres_url)
    store.upgrade()
    yield store
    store.close()


def _settings(tmp_path: Path, store: Store, model: Path) -> Settings:
    return Settings(
        data_dir=tmp_path, database_url=str(store.engine.url), model=str(model),
        # A floor no RM reaches: the second cycle ends right after training its RM, "skipped".
        train=TrainSettings(device="cpu", min_holdout_pairs=4, reward_accuracy_floor=1.0),
        ppo=PPOConfig(steps=1, rollout_batch_size=4, num_minibatches=1, ppo_epochs=1,
                      max_new_tokens=8),
        reward=RewardConfig(epochs=1, batch_size=4),
    )


def _cut_after_first_row(monkeypatch: pytest.MonkeyPatch, url: str) -> list[int]:
    """Streamed reads fetch one row at a time; the first stream's connection is terminated
    after its first row (what a database restart does to it)."""
    real, cut = feedback_reads._stream, []
    admin = sa.create_engine(url)

    def stream(s: Any, query: Any) -> Iterator[Any]:
        rows = real(s, query)
        first = next(rows, None)
        if first is None:
            return
        yield first
        if not cut:
            pid = s.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            with admin.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            cut.append(pid)
        yield from rows

    monkeypatch.setattr(feedback_reads, "BATCH", 1)
    monkeypatch.setattr(feedback_reads, "_stream", stream)
    return cut


@pytest.mark.slow
def test_a_read_cut_by_a_restart_fails_the_run_and_the_next_runs(
        tmp_path: Path, pg_store: Store, tiny_model_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    seed(pg_store, tiny_model_dir, prompts_on_side(True, 2) + prompts_on_side(False, 2), rounds=2)
    worker = Worker(_settings(tmp_path, pg_store, tiny_model_dir), pg_store)
    record_base_policy(worker.settings, pg_store)
    cut = _cut_after_first_row(monkeypatch, str(pg_store.engine.url))
    pg_store.create_training_run(trigger="manual")
    run = pg_store.claim_next_run(worker.id)
    worker.execute(run, "cpu")
    failed = pg_store.get_training_run(run["id"])
    assert cut and failed["status"] == "failed"
    assert "unavailable" in failed["error"] or "lost" in failed["error"]
    assert pg_store.latest_reward_model() is None
    assert [p["id"] for p in pg_store.list_policies()] == ["policy-0"]
    assert pg_store.list_identities() == []  # no tallies from a cycle that kept nothing
    assert not any((tmp_path / "checkpoints").rglob("*.safetensors"))

    monkeypatch.undo()  # the database is back
    pg_store.create_training_run(trigger="manual")
    run = pg_store.claim_next_run(worker.id)
    worker.execute(run, "cpu")
    after = pg_store.get_training_run(run["id"])
    assert after["status"] == "skipped", after
    assert "accuracy floor" in after["metrics"]["cycle/skip_reason"]
    assert after["metrics"]["reward/new_examples"] > 0
