"""A cycle's reward data with implicit signals: unchanged while the setting is off (the
default), weak balanced lone thumbs under the caps when it is on."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedback_store import Store
from flywheel.settings import FeedbackLimits
from tests.trainer_worker.test_cycle import make_ctx, prompts_on_side, seed
from trainer_worker.cycle import CycleContext, reward_window


@pytest.fixture
def store(sqlite_store: Store) -> Store:
    return sqlite_store


def _signal(store: Store) -> None:
    """Per rated request, the good answer copied twice and the bad one regenerated, by a user
    who did not rate them; and one regenerate by the anonymous rater who rated them."""
    with store.engine.connect() as conn:
        cids = [row[0] for row in conn.exec_driver_sql("SELECT id FROM completions ORDER BY id")]
    for cid in cids:
        for _ in range(2):
            store.add_implicit(completion_id=cid, choice_index=0, signal="copy", user="u")
        store.add_implicit(completion_id=cid, choice_index=1, signal="regenerate", user="u")
        store.add_implicit(completion_id=cid, choice_index=0, signal="regenerate")


def _window(ctx: CycleContext, weight: float) -> tuple[list, list, dict]:
    feedback = FeedbackLimits(implicit_weight=weight)
    ctx.settings = ctx.settings.model_copy(update={"feedback": feedback})
    window = reward_window(ctx, None, ctx.store.feedback_watermark(), 0,
                           holdout=None, cold=False)  # type: ignore[arg-type]
    return window.data.groups, window.data.thumbs, window.metrics


def test_signals_train_only_when_the_setting_says(tmp_path: Path, store: Store,
                                                  tiny_model_dir: Path) -> None:
    seed(store, tiny_model_dir, prompts_on_side(False, 3), rounds=2)
    ctx = make_ctx(tmp_path, store, tiny_model_dir)
    assert ctx.settings.feedback.implicit_weight == 0.0
    before = _window(ctx, 0.0)
    _signal(store)
    groups, thumbs, metrics = _window(ctx, 0.0)
    assert (groups, thumbs) == before[:2] and "reward/implicit_examples" not in metrics

    groups, thumbs, metrics = _window(ctx, 0.2)
    assert groups == before[0] and [t for t in thumbs if t.source == "thumbs"] == before[1]
    signals = [t for t in thumbs if t.source == "implicit"]
    # Six requests: one copy (of two) and one regenerate each by "u"; the rater's own
    # regenerate on an answer it rated is left to its thumb.
    assert len(signals) == 12 and {t.identity for t in signals} == {"user:u"}
    assert sum(t.label for t in signals) == 6
    assert all(abs(t.weight - 0.2) < 1e-9 for t in signals)  # balanced: already equal classes
    assert metrics["reward/implicit_examples"] == 12
    assert metrics["reward/implicit_watermark"] == 24
