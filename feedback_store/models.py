"""SQLAlchemy 2 typed models; migrations/versions must create exactly this schema."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from feedback_store.types import IMPLICIT_SIGNALS, Marks

# Deterministic constraint names, so that migrations can refer to them (Alembic "naming
# conventions" recipe).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

POLICY_STATUSES = ("active", "canary", "candidate", "rejected", "retired")
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "rejected", "skipped", "cancelled")
RUN_FINISHED = ("succeeded", "failed", "rejected", "skipped", "cancelled")
RUN_TRIGGERS = ("feedback", "manual")


def json_type() -> sa.types.TypeEngine[Any]:
    """Portable JSON: JSONB on PostgreSQL, JSON text elsewhere; Python None is SQL NULL."""
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: json_type(),
    }


class Prompt(Base):
    """A rendered prompt, stored once however often it is asked."""

    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(json_type())
    prompt_text: Mapped[str] = mapped_column(sa.Text)
    prompt_token_ids: Mapped[list[int]] = mapped_column(json_type())
    # In the stable held-out split (from `sha256`, see training_data.is_holdout_hash): feedback
    # on these prompts never trains the reward model or PPO; it judges them.
    holdout: Mapped[bool] = mapped_column(sa.Boolean, index=True, default=False)
    created_at: Mapped[datetime]


class Completion(Base):
    """One served request; `id` is the public response id that feedback refers to. Its
    `policy_version` is its first answer's (`Choice.policy_version` is each answer's)."""

    __tablename__ = "completions"
    __table_args__ = (sa.CheckConstraint(_in("kind", ("chat", "text")), name="kind"),)

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    prompt_id: Mapped[int] = mapped_column(sa.ForeignKey("prompts.id"), index=True)
    kind: Mapped[str] = mapped_column(sa.String(8))
    model: Mapped[str] = mapped_column(sa.String(255))
    policy_version: Mapped[str] = mapped_column(sa.String(64))
    params: Mapped[dict[str, Any]]
    user: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime]
    # The API key that received the answer (its scope, server/auth.py); only that key (or the
    # admin key) may rate it. None on a server without keys.
    key_scope: Mapped[str | None] = mapped_column(sa.String(16))


class Choice(Base):
    """One sampled answer of a completion, with its token ids and sampling logprobs."""

    __tablename__ = "choices"
    __table_args__ = (sa.UniqueConstraint("completion_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    completion_id: Mapped[str] = mapped_column(sa.ForeignKey("completions.id", ondelete="CASCADE"))
    index: Mapped[int]
    text: Mapped[str] = mapped_column(sa.Text)
    token_ids: Mapped[list[int]] = mapped_column(json_type())
    logprobs: Mapped[list[float]] = mapped_column(json_type())
    finish_reason: Mapped[str] = mapped_column(sa.String(16))
    # The version that wrote it (`answer_version`, below, reads it): every thumb, signal and
    # canary comparison is counted by it. A canary assigned per request answers one request
    # from both versions. NULL on answers stored before migration 0012v: their completion's.
    policy_version: Mapped[str | None] = mapped_column(sa.String(64), default=None)


class Feedback(Base):
    """A thumbs rating of one choice; the integer id orders events for watermarks."""

    __tablename__ = "feedback"
    __table_args__ = (
        sa.CheckConstraint(_in("rating", ("up", "down")), name="rating"),
        # A rater's live vote on a choice: what a new vote looks up to replace (feedback.py).
        sa.Index("ix_feedback_live_vote", "choice_id", "voter",
                 sqlite_where=sa.text("replaced_by IS NULL"),
                 postgresql_where=sa.text("replaced_by IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(sa.String(40), unique=True)
    choice_id: Mapped[int] = mapped_column(sa.ForeignKey("choices.id"), index=True)
    rating: Mapped[str] = mapped_column(sa.String(4))
    comment: Mapped[str | None] = mapped_column(sa.Text)
    user: Mapped[str | None] = mapped_column(sa.Text)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    request_hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(index=True)  # hourly charts (history.py)
    # The rater's identity as pooled (feedback_store/identities.py `identity_of`); NULL on rows
    # stored before identities were written with every row: "user:<user>" or anonymous.
    identity: Mapped[str | None] = mapped_column(sa.Text)
    key_scope: Mapped[str | None] = mapped_column(sa.String(16))  # the key that gave it
    # Who has one vote per answer: the key with `user` (flywheel/raters.py `Rater.voter`).
    voter: Mapped[str | None] = mapped_column(sa.Text)
    # A later vote of the same voter on the same answer replaced this one: it stays as history
    # and counts nowhere.
    replaced_by: Mapped[int | None] = mapped_column(default=None)


class ImplicitFeedback(Base):
    """What a user did with an answer without rating it: asked again (`regenerate`), edited
    the question and sent it again (`edit`), or copied the answer (`copy`)."""

    __tablename__ = "implicit_feedback"
    __table_args__ = (sa.CheckConstraint(_in("signal", IMPLICIT_SIGNALS), name="signal"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(sa.String(40), unique=True)
    choice_id: Mapped[int] = mapped_column(sa.ForeignKey("choices.id"), index=True)
    signal: Mapped[str] = mapped_column(sa.String(16))
    user: Mapped[str | None] = mapped_column(sa.Text)
    identity: Mapped[str | None] = mapped_column(sa.Text)  # as Feedback.identity
    key_scope: Mapped[str | None] = mapped_column(sa.String(16))  # the key that sent it
    created_at: Mapped[datetime]


class Ranking(Base):
    """An ordering, best first, of answers to one prompt."""

    __tablename__ = "rankings"
    __table_args__ = (
        # A voter's live ranking of a prompt's answers: what a new one looks up to replace.
        sa.Index("ix_rankings_live_vote", "prompt_id", "voter",
                 sqlite_where=sa.text("replaced_by IS NULL"),
                 postgresql_where=sa.text("replaced_by IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(sa.String(40), unique=True)
    prompt_id: Mapped[int] = mapped_column(sa.ForeignKey("prompts.id"), index=True)
    user: Mapped[str | None] = mapped_column(sa.Text)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    request_hash: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime]
    identity: Mapped[str | None] = mapped_column(sa.Text)  # as Feedback.identity
    key_scope: Mapped[str | None] = mapped_column(sa.String(16))
    voter: Mapped[str | None] = mapped_column(sa.Text)  # as Feedback.voter
    # A later ranking by the same voter of any of the same answers replaced this one: kept as
    # history, it trains nothing.
    replaced_by: Mapped[int | None] = mapped_column(default=None)


class RankingItem(Base):
    """One ranked answer; position 0 is the best, items of one `tier` are tied (no pair)."""

    __tablename__ = "ranking_items"

    ranking_id: Mapped[int] = mapped_column(
        sa.ForeignKey("rankings.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(primary_key=True)
    tier: Mapped[int]
    choice_id: Mapped[int] = mapped_column(sa.ForeignKey("choices.id"), index=True)


class PolicyRatings(Base):
    """Thumbs on the answers each version produced, counted as feedback is stored."""

    __tablename__ = "policy_ratings"

    policy_version: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    up: Mapped[int] = mapped_column(default=0)
    down: Mapped[int] = mapped_column(default=0)
    # The same thumbs pooled across raters (flywheel/rater_pooling.py), as the worker last
    # computed them: weighted counts, the variance of their approval, distinct raters.
    pooled_up: Mapped[float | None] = mapped_column(sa.Float, default=None)
    pooled_down: Mapped[float | None] = mapped_column(sa.Float, default=None)
    pooled_variance: Mapped[float | None] = mapped_column(sa.Float, default=None)
    raters: Mapped[int | None] = mapped_column(default=None)
    pooled_at: Mapped[datetime | None] = mapped_column(default=None)


class PolicyVersion(Base):
    """A policy checkpoint; at most one row is `active` and one `canary` (partial unique
    indexes). A canary records its share of traffic and where its live evidence starts."""

    __tablename__ = "policy_versions"
    __table_args__ = (
        sa.CheckConstraint(_in("status", POLICY_STATUSES), name="status"),
        sa.Index(
            "uq_policy_versions_one_active",
            "status",
            unique=True,
            sqlite_where=sa.text("status = 'active'"),
            postgresql_where=sa.text("status = 'active'"),
        ),
        sa.Index(
            "uq_policy_versions_one_canary",
            "status",
            unique=True,
            sqlite_where=sa.text("status = 'canary'"),
            postgresql_where=sa.text("status = 'canary'"),
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    parent: Mapped[str | None] = mapped_column(sa.String(64))
    path: Mapped[str | None] = mapped_column(sa.Text)
    sha256: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16))
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    activated_at: Mapped[datetime | None]
    canary_fraction: Mapped[float | None] = mapped_column(sa.Float)
    canary_started_at: Mapped[datetime | None]
    canary_feedback_after: Mapped[int | None]  # feedback ids above this are canary evidence
    # What the canary assigns to an arm: "request" (each rater sees both) or "user" (sticky).
    canary_unit: Mapped[str | None] = mapped_column(sa.String(8))
    # The coefficient its adaptive KL controller ended PPO with, where the next cycle's
    # controller starts (trainer_worker/cycle.py); None when PPO ran with a fixed one.
    kl_coef: Mapped[float | None] = mapped_column(sa.Float)
    # A candidate waiting for the running canary to end, since when (policy_versions.py).
    waiting_since: Mapped[datetime | None]


class Watermarked:
    """The last feedback, ranking and implicit-signal ids a window of training data reached, the
    one owner of the watermarks: a training run's (what it consumed; new feedback counts from the
    newest finished run's) and a reward model's (the next RM's "new" examples lie above it)."""

    feedback_watermark: Mapped[int | None]
    rankings_watermark: Mapped[int | None]
    implicit_watermark: Mapped[int | None]

    @property
    def watermark(self) -> Marks:
        """{"feedback": id, "rankings": id, "implicit": id}, 0 where none is recorded."""
        return {"feedback": self.feedback_watermark or 0,
                "rankings": self.rankings_watermark or 0,
                "implicit": self.implicit_watermark or 0}

    @watermark.setter
    def watermark(self, marks: Marks) -> None:
        self.feedback_watermark = int(marks.get("feedback", 0))
        self.rankings_watermark = int(marks.get("rankings", 0))
        self.implicit_watermark = int(marks.get("implicit", 0))


class RewardModel(Watermarked, Base):
    """A reward model checkpoint, with the watermarks of the window it was trained on."""

    __tablename__ = "reward_models"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    parent: Mapped[str | None] = mapped_column(sa.String(64))
    path: Mapped[str | None] = mapped_column(sa.Text)
    sha256: Mapped[str | None] = mapped_column(sa.String(64))
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    # Trained on the train split only (feedback on held-out prompts never reached it, as
    # training_data.py splits them): the next RM may start from its weights.
    trained_on_train_split: Mapped[bool] = mapped_column(server_default=sa.false(),
                                                         default=False)


class TrainingRun(Watermarked, Base):
    """One training cycle; its watermark records the last feedback ids it consumed."""

    __tablename__ = "training_runs"
    __table_args__ = (
        sa.CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        sa.CheckConstraint(_in("trigger", RUN_TRIGGERS), name="trigger"),
        sa.Index("ix_training_runs_status_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(16))
    trigger: Mapped[str] = mapped_column(sa.String(16))
    worker_id: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    policy_id: Mapped[str | None] = mapped_column(sa.ForeignKey("policy_versions.id"))
    reward_model_id: Mapped[str | None] = mapped_column(sa.ForeignKey("reward_models.id"))
    metrics: Mapped[dict[str, Any]]
    error: Mapped[str | None] = mapped_column(sa.Text)


class Identity(Base):
    """One rater's standing: how often its new feedback agreed with the RM in service (scored by
    the trainer when it reads the feedback), and the loss weight that follows from it."""

    __tablename__ = "identities"

    identity: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    events: Mapped[int] = mapped_column(default=0)  # new feedback events cycles have read
    scored: Mapped[int] = mapped_column(default=0)  # pairs and thumbs judged against the RM
    agreed: Mapped[int] = mapped_column(default=0)  # of them, where the RM agreed
    weight: Mapped[float] = mapped_column(sa.Float, default=1.0)
    updated_at: Mapped[datetime]


# The version that wrote an answer, in a query that joins Choice to its Completion.
answer_version = sa.func.coalesce(Choice.policy_version, Completion.policy_version)
