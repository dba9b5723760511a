"""The Store: one object the server and the worker share, one transaction per method call."""

from __future__ import annotations

import sqlalchemy as sa

from feedback_store.base import _store_errors
from feedback_store.completions import CompletionsMixin
from feedback_store.errors import StoreUnavailableError
from feedback_store.feedback import FeedbackMixin
from feedback_store.history import HistoryMixin
from feedback_store.identities import IdentitiesMixin
from feedback_store.implicit import ImplicitFeedbackMixin
from feedback_store.policy_versions import PoliciesMixin
from feedback_store.rankings import RankingsMixin
from feedback_store.reward_models import RewardModelsMixin
from feedback_store.rollout import RolloutMixin
from feedback_store.runs import RunsMixin
from feedback_store.training_data import TrainingDataMixin


class Store(IdentitiesMixin, CompletionsMixin, FeedbackMixin, RankingsMixin, PoliciesMixin,
            RewardModelsMixin, RolloutMixin, RunsMixin, TrainingDataMixin, HistoryMixin,
            ImplicitFeedbackMixin):
    """Synchronous and thread-safe; records come back as plain dicts, timestamps as unix seconds.

    Connection failures raise StoreUnavailableError; a failed call writes nothing.
    """

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def ping(self, *, write: bool = False) -> None:
        """Raise StoreUnavailableError unless the database answers a query (``write``: and
        would take a write, checked by a write that is rolled back)."""
        if not write:
            with self._tx(write=False) as s:
                s.execute(sa.text("SELECT 1"))
            return
        with _store_errors(), self.engine.connect() as conn:
            if self.dialect == "sqlite":
                version = conn.exec_driver_sql("PRAGMA user_version").scalar()
                conn.exec_driver_sql(f"PRAGMA user_version = {int(version or 0)}")
            elif self.dialect == "postgresql" and conn.exec_driver_sql(
                    "SHOW transaction_read_only").scalar() == "on":
                raise StoreUnavailableError("The database is read-only")
            else:
                conn.exec_driver_sql("SELECT 1")
            conn.rollback()

    def upgrade(self) -> None:
        """Migrate this database to the newest schema (`alembic upgrade head`)."""
        from feedback_store import migrate

        migrate.upgrade(self.url)
