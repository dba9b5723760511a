"""Thumbs on served completions, with idempotent retries (rankings: ``rankings.py``)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from feedback_store.base import StoreBase, public_id, request_hash, storable, unix, utcnow
from feedback_store.errors import (
    ForbiddenError,
    IdempotencyMismatchError,
    InvalidInputError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
)
from feedback_store.models import (
    Choice,
    Completion,
    Feedback,
    PolicyRatings,
    Ranking,
    answer_version,
)
from feedback_store.types import Rater

RATINGS = ("up", "down")
MAX_KEY_LENGTH = 255  # the width of the idempotency_key columns
SCOPE_LENGTH = 16  # a caller's scope: hex of its API key's SHA-256 (server/auth.py)
# The longest key a client may send: the column holds "<scope>:<key>".
MAX_CLIENT_KEY_LENGTH = MAX_KEY_LENGTH - SCOPE_LENGTH - 1
MAX_INDEX = 2**31 - 1  # INTEGER columns; larger indices cannot exist


class FeedbackMixin(StoreBase):
    """Thumbs up and down on the choices of stored completions."""

    def add_feedback(
        self,
        *,
        completion_id: str,
        choice_index: int,
        rating: str,
        comment: str | None = None,
        user: str | None = None,
        idempotency_key: str | None = None,
        idempotency_scope: str | None = None,
        rater: Rater | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store a thumbs rating; returns (record, created), created=False for a replayed retry.
        A key is unique within its scope (the caller's API key, see `scoped_key`).

        `rater` says who rates (default: `user` under the idempotency scope's key, untrusted).
        An answer served to another key is ForbiddenError, unless the rater is an admin. The
        rater's earlier vote on the same answer, if any, is replaced: kept, counted nowhere.

        One INSERT ... SELECT finds the choice and skips a used key; only when it inserts nothing
        do we look at why (an unknown choice, or a retried key).
        """
        row = _feedback_row(
            {
                "completion_id": completion_id,
                "choice_index": choice_index,
                "rating": rating,
                "comment": comment,
                "user": user,
                "idempotency_key": idempotency_key,
                "idempotency_scope": idempotency_scope,
                "rater": rater,
            }
        )
        for _ in range(3):
            if 0 <= choice_index <= MAX_INDEX and self._insert_feedback_rows([row]):
                return _new_feedback_record(row), True
            outcome = self._explain_feedback({0: row}).get(0)
            if isinstance(outcome, StoreError):
                raise outcome
            if outcome is not None:
                return outcome
            # The choice exists and the key is free: both changed since the insert; try again.
            row = {**row, "public_id": public_id("fb"), "created_at": utcnow()}
        raise StoreUnavailableError("The feedback could not be stored; retry")

    def add_feedbacks(
        self, requests: list[dict[str, Any]]
    ) -> list[tuple[dict[str, Any], bool] | StoreError]:
        """`add_feedback` for several requests (its keyword arguments as dicts) at once: their rows
        go in one statement and one commit. Each request gets its (record, created) or the
        StoreError that `add_feedback` would raise; StoreUnavailableError is raised when the
        database is unavailable before anything was stored."""
        outcomes: list[tuple[dict[str, Any], bool] | StoreError | None] = [None] * len(requests)
        rows: dict[int, dict[str, Any]] = {}
        for i, request in enumerate(requests):
            try:
                rows[i] = _feedback_row(request)
            except InvalidInputError as error:
                outcomes[i] = error
        batch = [row for row in rows.values() if 0 <= row["choice_index"] <= MAX_INDEX]
        try:
            inserted = self._insert_feedback_rows(batch) if batch else set()
        except (InvalidInputError, exc.IntegrityError):
            inserted = set()  # a row spoiled the statement: each request on its own, below
        for i, row in rows.items():
            if row["public_id"] in inserted:
                outcomes[i] = (_new_feedback_record(row), True)
        try:
            self._settle_feedback(requests, rows, outcomes)
        except StoreUnavailableError as error:  # the rows stored above are still answered
            outcomes = [error if outcome is None else outcome for outcome in outcomes]
        return outcomes  # type: ignore[return-value]

    def _settle_feedback(self, requests: list[dict[str, Any]], rows: dict[int, dict[str, Any]],
                         outcomes: list[Any]) -> None:
        """The outcomes of the requests whose rows the batch did not insert."""
        left = {i: row for i, row in rows.items() if outcomes[i] is None}
        if left:
            try:
                for i, outcome in self._explain_feedback(left).items():
                    outcomes[i] = outcome
            except InvalidInputError:
                pass  # a value the database refuses: add_feedback finds which, one by one
        for i, outcome in enumerate(outcomes):
            if outcome is None:  # the choice exists and the key is free now, or a failed batch
                try:
                    outcomes[i] = self.add_feedback(**requests[i])
                except StoreUnavailableError:
                    raise
                except StoreError as error:
                    outcomes[i] = error

    def _explain_feedback(
        self, rows: dict[int, dict[str, Any]]
    ) -> dict[int, tuple[dict[str, Any], bool] | StoreError]:
        """Why rows were not inserted, in one read transaction: the record stored under the key
        (a replayed retry), or IdempotencyMismatchError, or NotFoundError for the choice. A row
        left out may be tried again: its choice exists and its key is free."""
        keys = [row["idempotency_key"] for row in rows.values()]
        keys = [key for key in keys if key is not None]
        explained: dict[int, tuple[dict[str, Any], bool] | StoreError] = {}
        with self._tx(write=False) as s:
            found = s.execute(_STORED_FEEDBACK, {"keys": keys}) if keys else []
            stored = {r.idempotency_key: r for r in found}
            for i, row in rows.items():
                previous = stored.get(row["idempotency_key"])
                try:
                    if previous is None:
                        completion, _ = _find_choice(s, row["completion_id"],
                                                     row["choice_index"])
                        _check_owner(completion, row["owner_scope"])
                        continue
                    if previous.request_hash != row["request_hash"]:
                        raise _key_reused()
                    explained[i] = (_feedback_record(previous), False)
                except (NotFoundError, ForbiddenError, IdempotencyMismatchError) as error:
                    explained[i] = error
        return explained

    def _insert_feedback_rows(self, rows: list[dict[str, Any]]) -> set[str]:
        """The public ids of the rows inserted; no row for an unknown choice or a taken key.

        Each inserted row also counts in `policy_ratings` (live approval per version), in the
        same statement on PostgreSQL and the same transaction on SQLite, and replaces its
        voter's earlier vote on the same answer (`_replace_earlier_votes`).
        """
        with self._statement() as conn:
            if self.dialect == "postgresql":
                params = {name: [row[name] for row in rows]
                          for name in (*_ROW_COLUMNS, "owner_scope")}
                votes = conn.execute(_INSERT_FEEDBACK_ROWS, params).all()
            else:
                votes = []
                for row in rows:
                    vote = conn.execute(self._insert_one_feedback, row).first()
                    if vote is not None:
                        votes.append(vote)
                        conn.execute(_COUNT_ONE_RATING, {
                            "choice_id": vote.choice_id,
                            "up": int(row["rating"] == "up"),
                            "down": int(row["rating"] == "down"),
                        })
            if votes:
                _replace_earlier_votes(conn, [(v.id, v.choice_id, v.voter) for v in votes])
            return {vote.public_id for vote in votes}

    @cached_property
    def _insert_one_feedback(self) -> sa.Insert:
        """SQLite: INSERT INTO feedback ... SELECT choices.id, <values> FROM choices WHERE <the
        choice, served to the rater's key> ON CONFLICT (idempotency_key) DO NOTHING: no row when
        the choice does not exist, belongs to another key, or the key is taken (a NULL key never
        conflicts)."""
        table, choices = Feedback.__table__, Choice.__table__
        completions = Completion.__table__
        names = _ROW_COLUMNS[2:]
        owner = sa.bindparam("owner_scope", type_=sa.String())
        values = sa.select(
            choices.c.id, *(sa.bindparam(name, type_=table.c[name].type) for name in names)
        ).join(completions, completions.c.id == choices.c.completion_id).where(
            choices.c.completion_id == sa.bindparam("completion_id"),
            choices.c.index == sa.bindparam("choice_index"),
            sa.or_(owner.is_(None), completions.c.key_scope.is_(None),
                   completions.c.key_scope == owner),
        )
        return (
            sqlite.insert(table)
            .from_select(["choice_id", *names], values)
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
            .returning(table.c.public_id, table.c.id, table.c.choice_id, table.c.voter)
        )


_HASHED = ("completion_id", "choice_index", "rating", "comment", "user")  # the request body
_ROW_COLUMNS = ("completion_id", "choice_index", "public_id", "rating", "comment", "user",
                "idempotency_key", "request_hash", "created_at", "identity", "key_scope",
                "voter")

# The rows as parallel arrays: the same SQL whatever their number, so psycopg prepares it once per
# connection. Rows whose choice does not exist find nothing to join; rows whose key is taken, by
# a stored row or by another row of the same batch, are skipped by ON CONFLICT DO NOTHING. The
# second CTE adds the inserted rows to their versions' counters in the same statement.
_INSERT_FEEDBACK_ROWS = sa.text("""
WITH inserted AS (
INSERT INTO feedback (choice_id, public_id, rating, comment, "user", idempotency_key,
                      request_hash, created_at, identity, key_scope, voter)
SELECT choices.id, v.public_id, v.rating, v.comment, v."user", v.idempotency_key,
       v.request_hash, v.created_at, v.identity, v.key_scope, v.voter
FROM unnest(CAST(:completion_id AS varchar[]), CAST(:choice_index AS integer[]),
            CAST(:public_id AS varchar[]), CAST(:rating AS varchar[]), CAST(:comment AS text[]),
            CAST(:user AS text[]), CAST(:idempotency_key AS varchar[]),
            CAST(:request_hash AS varchar[]), CAST(:created_at AS timestamptz[]),
            CAST(:identity AS text[]), CAST(:key_scope AS varchar[]), CAST(:voter AS text[]),
            CAST(:owner_scope AS varchar[]))
     AS v(completion_id, choice_index, public_id, rating, comment, "user", idempotency_key,
          request_hash, created_at, identity, key_scope, voter, owner_scope)
JOIN choices ON choices.completion_id = v.completion_id AND choices.index = v.choice_index
JOIN completions ON completions.id = v.completion_id
 AND (v.owner_scope IS NULL OR completions.key_scope IS NULL
      OR completions.key_scope = v.owner_scope)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING feedback.public_id, feedback.id, feedback.choice_id, feedback.voter, feedback.rating
), counted AS (
INSERT INTO policy_ratings (policy_version, up, down)
SELECT COALESCE(choices.policy_version, completions.policy_version) AS version,
       SUM(CASE WHEN inserted.rating = 'up' THEN 1 ELSE 0 END),
       SUM(CASE WHEN inserted.rating = 'down' THEN 1 ELSE 0 END)
FROM inserted
JOIN choices ON choices.id = inserted.choice_id
JOIN completions ON completions.id = choices.completion_id
GROUP BY version
ORDER BY version
ON CONFLICT (policy_version) DO UPDATE
SET up = policy_ratings.up + excluded.up, down = policy_ratings.down + excluded.down
)
SELECT public_id, id, choice_id, voter FROM inserted
""")

# SQLite: one stored row's thumb added to its version's counter.
_COUNT_ONE_RATING = sa.text("""
INSERT INTO policy_ratings (policy_version, up, down)
SELECT COALESCE(choices.policy_version, completions.policy_version), :up, :down
FROM choices JOIN completions ON completions.id = choices.completion_id
WHERE choices.id = :choice_id
ON CONFLICT (policy_version) DO UPDATE
SET up = policy_ratings.up + excluded.up, down = policy_ratings.down + excluded.down
""")


# The stored ratings under some idempotency keys, with their choices.
_STORED_FEEDBACK = (
    sa.select(
        Feedback.idempotency_key,
        Feedback.request_hash,
        Feedback.public_id,
        Feedback.rating,
        Feedback.comment,
        Feedback.user,
        Feedback.created_at,
        Choice.completion_id,
        Choice.index,
    )
    .join(Choice, Choice.id == Feedback.choice_id)
    .where(Feedback.idempotency_key.in_(sa.bindparam("keys", expanding=True)))
)


def _replayed(
    s: Session, model: type[Feedback] | type[Ranking], key: str, digest: str
) -> Any | None:
    """The row stored under this idempotency key, None when new; a different body is an error."""
    row = s.scalar(sa.select(model).where(model.idempotency_key == key))
    if row is not None and row.request_hash != digest:
        raise _key_reused()
    return row


def _key_reused() -> IdempotencyMismatchError:
    return IdempotencyMismatchError(
        "This Idempotency-Key was already used with a different request body"
    )


def _feedback_row(request: dict[str, Any]) -> dict[str, Any]:
    """The feedback row of one request (add_feedback's arguments), checked and fingerprinted."""
    if request["rating"] not in RATINGS:
        raise InvalidInputError("rating must be 'up' or 'down'", param="rating")
    key = scoped_key(request.get("idempotency_key"), request.get("idempotency_scope"))
    rater: Rater = request.get("rater") or Rater(key_scope=request.get("idempotency_scope"),
                                                 user=request.get("user"))
    body = {name: storable(request.get(name)) for name in _HASHED}
    body["user"] = storable(rater.user)
    return {
        **body,
        "identity": storable(rater.identity),
        "key_scope": rater.key_scope,
        "voter": storable(rater.voter),
        "owner_scope": rater.owner_scope,
        "idempotency_key": key,
        "request_hash": request_hash(body),
        "public_id": public_id("fb"),
        "created_at": utcnow(),
    }


def _new_feedback_record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["public_id"],
        "object": "feedback",
        **{name: row[name] for name in _HASHED},
        "created_at": unix(row["created_at"]),
    }


def scoped_key(idempotency_key: str | None, scope: str | None) -> str | None:
    """The stored form of a client's key: `<scope>:<key>`, so that one key sent with two API
    keys is two requests; the bare key without a scope (a server without API keys)."""
    if idempotency_key is None:
        return None
    if not idempotency_key.strip():
        raise InvalidInputError("idempotency_key must not be empty", param="idempotency_key")
    if len(idempotency_key) > MAX_CLIENT_KEY_LENGTH:
        raise InvalidInputError(
            f"idempotency_key is longer than {MAX_CLIENT_KEY_LENGTH} characters",
            param="idempotency_key",
        )
    if scope is None:
        return idempotency_key
    if not 0 < len(scope) <= SCOPE_LENGTH:
        raise ValueError(f"an idempotency scope has 1 to {SCOPE_LENGTH} characters")
    return f"{scope}:{idempotency_key}"


def _find_choice(s: Session, completion_id: str, choice_index: int) -> tuple[Completion, Choice]:
    completion = s.get(Completion, completion_id)
    if completion is None:
        raise NotFoundError(
            f"No completion with id '{completion_id}'",
            param="completion_id",
            code="completion_not_found",
        )
    choice = None
    if 0 <= choice_index <= MAX_INDEX:
        choice = s.scalar(
            sa.select(Choice).where(
                Choice.completion_id == completion_id, Choice.index == choice_index
            )
        )
    if choice is None:
        raise NotFoundError(
            f"Completion '{completion_id}' has no choice {choice_index}",
            param="choice_index",
            code="choice_not_found",
        )
    return completion, choice


def _check_owner(completion: Completion, owner_scope: str | None) -> None:
    """ForbiddenError unless the answer was served to the rater's key (or either has none)."""
    if owner_scope is not None and completion.key_scope not in (None, owner_scope):
        raise ForbiddenError(
            f"Completion '{completion.id}' was served to another API key; only that key may "
            "rate it", param="completion_id", code="not_your_completion")


# The live votes of some (choice id, voter) pairs, with their versions.
_LIVE_VOTES = (
    sa.select(Feedback.id, Feedback.choice_id, Feedback.voter, Feedback.rating, answer_version)
    .join(Choice, Choice.id == Feedback.choice_id)
    .join(Completion, Completion.id == Choice.completion_id)
    .where(sa.tuple_(Feedback.choice_id, Feedback.voter).in_(sa.bindparam("pairs", expanding=True)),
           Feedback.replaced_by.is_(None))
)


def _replace_earlier_votes(conn: sa.Connection, votes: list[tuple[int, int, str]]) -> None:
    """One vote per voter (key, user) per answer: the votes just inserted, (id, choice id,
    voter) each, replace the same voters' earlier live votes on the same choices, which leave
    their versions' counters.

    The live votes are looked up by their (choice, voter) pairs alone, through the partial index
    `ix_feedback_live_vote`: an index lookup whatever the planner's statistics say (a join of
    new rows to old ones was planned from a stale estimate of the live votes, and scanned every
    vote of an answer for each new one).
    """
    table, counters = Feedback.__table__, PolicyRatings.__table__
    latest: dict[tuple[int, str], int] = {}  # (choice, voter) -> the newest vote just inserted
    for id_, choice_id, voter in votes:
        latest[choice_id, voter] = max(id_, latest.get((choice_id, voter), id_))
    live = conn.execute(_LIVE_VOTES, {"pairs": sorted(latest)}).all()
    # Each live vote older than its voter's newest one is replaced by it; newer ones come from a
    # batch committed meanwhile and stay.
    replacing = {old_id: latest[choice_id, voter] for old_id, choice_id, voter, *_ in live
                 if old_id < latest[choice_id, voter]}
    if not replacing:
        return
    # Conditional: a concurrent batch that replaced a vote first (it waited on the row lock)
    # leaves it to that batch, which took it off the counters already.
    replaced = set(conn.scalars(
        sa.update(table)
        .where(table.c.id.in_(sorted(replacing)), table.c.replaced_by.is_(None))
        .values(replaced_by=sa.case(replacing, value=table.c.id))
        .returning(table.c.id)
    ))
    taken_off: dict[str, list[int]] = {}  # version -> [up, down] leaving its counters
    for old_id, _, _, rating, version in live:
        if old_id in replaced:
            counts = taken_off.setdefault(version, [0, 0])
            counts[rating == "down"] += 1
    for version, (up, down) in sorted(taken_off.items()):
        conn.execute(counters.update().where(counters.c.policy_version == version)
                     .values(up=counters.c.up - up, down=counters.c.down - down))


def _feedback_record(row: sa.Row[Any]) -> dict[str, Any]:
    """The record of a stored rating, from a row of _STORED_FEEDBACK."""
    return {
        "id": row.public_id,
        "object": "feedback",
        "completion_id": row.completion_id,
        "choice_index": row.index,
        "rating": row.rating,
        "comment": row.comment,
        "user": row.user,
        "created_at": unix(row.created_at),
    }
