"""Migrations go up, down and up on both databases, and create exactly the models' schema."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import migrations
from feedback_store import Store, migrate
from feedback_store.models import Base
from flywheel.raters import Rater

from .conftest import add_completion, count

TABLES = {
    "prompts",
    "completions",
    "choices",
    "feedback",
    "identities",
    "implicit_feedback",
    "rankings",
    "ranking_items",
    "policy_versions",
    "policy_ratings",
    "reward_models",
    "training_runs",
}


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _schema_diff(url: str, metadata: sa.MetaData) -> list[object]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_scripts_are_found_from_the_package() -> None:
    assert Path(migrations.__file__).parent == migrate.MIGRATIONS_DIR
    assert (migrate.MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    migrate.upgrade(db_url)
    assert _tables(db_url) == TABLES
    migrate.downgrade(db_url)
    assert _tables(db_url) == set()
    migrate.upgrade(db_url)
    assert _tables(db_url) == TABLES
    store = Store(db_url)
    add_completion(store, "chatcmpl-1")
    assert count(store, "choices") == 2
    store.close()


def test_schema_matches_models(db_url: str) -> None:
    migrate.upgrade(db_url)
    assert _schema_diff(db_url, Base.metadata) == []


def test_schema_check_sees_drift(sqlite_url: str) -> None:
    """The comparison above can fail: a column the migration lacks shows up as a diff."""
    migrate.upgrade(sqlite_url)
    drifted = sa.MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["feedback"].append_column(sa.Column("extra", sa.Integer()))
    diff = _schema_diff(sqlite_url, drifted)
    assert [d[0] for d in diff] == ["add_column"]  # type: ignore[index]


def test_concurrent_upgrades_serialize(db_url: str) -> None:
    """Replicas starting together each run `upgrade head`; the second waits, then finds it done.

    Processes, not threads: Alembic's `context` is process-global.
    """
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=migrate.upgrade, args=(db_url,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _tables(db_url) == TABLES


def test_voters_are_filled_in_for_earlier_thumbs(db_url: str) -> None:
    """Thumbs stored before 0007v, and rankings before 0010k, get the voter their key and `user`
    make (`Rater.voter`)."""
    migrate.upgrade(db_url)
    store = Store(db_url)
    add_completion(store, "chatcmpl-1")
    raters = [Rater(), Rater(user="alice"), Rater(key_scope="k1"),
              Rater(key_scope="k1", user="bob"), Rater(key_scope="k2", user="", trusted=True)]
    for rater in raters:
        store.add_feedback(completion_id="chatcmpl-1", choice_index=0, rating="up", rater=rater)
        store.add_ranking(items=[("chatcmpl-1", 0), ("chatcmpl-1", 1)], rater=rater)
    store.close()
    migrate.downgrade(db_url, "0006r")
    migrate.upgrade(db_url)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        voters = conn.scalars(sa.text("SELECT voter FROM feedback ORDER BY id")).all()
        ranked = conn.scalars(sa.text("SELECT voter FROM rankings ORDER BY id")).all()
    engine.dispose()
    assert voters == ranked == [rater.voter for rater in raters]
    assert len(set(voters)) == len(raters)


def test_controller_state_is_filled_in_from_metrics(db_url: str) -> None:
    """Versions and reward models stored before 0008c get the controller state their metrics
    held: a KL coefficient only where an adaptive controller wrote its target, since when a
    candidate waits, watermarks and the split mark only where recorded."""
    migrate.upgrade(db_url)
    store = Store(db_url)
    for n, metrics in enumerate([{"ppo/kl_coef": 0.07, "ppo/kl_target": 4.0},
                                 {"ppo/kl_coef": 0.05},  # a fixed coefficient
                                 {"ppo/kl_target": 4.0, "ppo/kl_coef": None}, {}], start=1):
        store.add_policy(id=f"policy-{n}", parent=None, path=None, sha256=None,
                         status="rejected", metrics=metrics)
    store.add_policy(id="policy-5", parent=None, path=None, sha256=None,
                     metrics={"release/waiting_since": 1_700_000_000.25})
    for n, metrics in enumerate([{"reward/accuracy": 0.8},  # from before the split
                                 {"reward/trained_on_train_split": 1.0,
                                  "reward/feedback_watermark": 12.0,
                                  "reward/rankings_watermark": 3.0},
                                 {"reward/trained_on_train_split": 0.0,
                                  "reward/feedback_watermark": 20.0,
                                  "reward/rankings_watermark": None}], start=1):
        store.add_reward_model(id=f"rm-{n}", parent=None, path=None, sha256=None,
                               metrics=metrics)
    store.close()
    migrate.downgrade(db_url, "0007v")
    migrate.upgrade(db_url)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        coefs = conn.execute(sa.text("SELECT id, kl_coef FROM policy_versions ORDER BY id")).all()
        waiting = conn.scalars(sa.text("SELECT id FROM policy_versions "
                                       "WHERE waiting_since IS NOT NULL")).all()
        states = conn.execute(sa.text(
            "SELECT id, trained_on_train_split, feedback_watermark, rankings_watermark "
            "FROM reward_models ORDER BY id")).all()
    engine.dispose()
    assert [tuple(row) for row in coefs] == [("policy-1", 0.07), ("policy-2", None),
                                             ("policy-3", None), ("policy-4", None),
                                             ("policy-5", None)]
    assert waiting == ["policy-5"]
    assert [(id, bool(split), f, r) for id, split, f, r in states] == [
        ("rm-1", False, None, None), ("rm-2", True, 12, 3), ("rm-3", False, 20, None)]
    store = Store(db_url)
    assert store.latest_kl_coef() == 0.07
    assert store.get_policy("policy-5")["reason"].startswith("passed the offline gate")
    state = store.latest_reward_model_state()
    assert state is not None and state.id == "rm-3"
    assert state.watermark == {"feedback": 20, "rankings": 0, "implicit": 0}
    assert not state.trained_on_train_split
    store.close()


def test_answers_stored_before_0012v_count_for_their_completions_version(db_url: str) -> None:
    """0012v adds each answer's version without a backfill: answers stored before it (NULL) count
    for their completion's version, and answers stored after it for their own."""
    migrate.upgrade(db_url, "0011s")
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:  # what the code before 0012v stored: no version per answer
        conn.execute(sa.text(
            "INSERT INTO prompts (sha256, prompt_text, prompt_token_ids, holdout, created_at)"
            " VALUES ('ab', 'Hi?', '[1]', false, CURRENT_TIMESTAMP)"))
        conn.execute(sa.text(
            "INSERT INTO completions (id, prompt_id, kind, model, policy_version, params,"
            " created_at) SELECT 'chatcmpl-1', id, 'chat', 'flywheel', 'policy-1', '{}',"
            " CURRENT_TIMESTAMP FROM prompts"))
        conn.execute(sa.text(
            'INSERT INTO choices (completion_id, "index", text, token_ids, logprobs,'
            " finish_reason) VALUES ('chatcmpl-1', 0, 'Hello', '[2]', '[-0.1]', 'stop')"))
    engine.dispose()
    migrate.upgrade(db_url)
    store = Store(db_url)
    add_completion(store, "chatcmpl-2", policy_version="policy-2",
                   versions=("policy-2", "policy-3"))
    for completion, index in (("chatcmpl-1", 0), ("chatcmpl-2", 0), ("chatcmpl-2", 1)):
        store.add_feedback(completion_id=completion, choice_index=index, rating="up",
                           rater=Rater(user="ann"))
    assert store.live_ratings() == {"policy-1": (1, 0), "policy-2": (1, 0), "policy-3": (1, 0)}
    assert {v: sum(u for u, _ in raters.values())
            for v, raters in store.thumbs_by_rater(["policy-1", "policy-3"]).items()} == {
        "policy-1": 1, "policy-3": 1}
    store.close()
    migrate.downgrade(db_url, "0011s")
    migrate.upgrade(db_url)
