"""Served completions in: each request with its prompt (deduplicated) and all its choices."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite

from feedback_store.base import StoreBase, storable, utcnow
from feedback_store.errors import InvalidInputError, StoreError, StoreUnavailableError
from feedback_store.models import Choice, Completion, Prompt
from feedback_store.training_data import is_holdout_hash
from feedback_store.types import NewCompletion

# The serving path writes through Core on the tables: the ORM's bulk-insert layers cost more CPU
# than the statements themselves (and the API server's event loop shares that GIL).
COMPLETIONS, CHOICES, PROMPTS = (sa.inspect(m).local_table for m in (Completion, Choice, Prompt))
PROMPT_IDS_CACHED = 50_000  # prompt ids kept per store (about 8 MB); all dropped when full


class CompletionsMixin(StoreBase):
    """Writes of the serving path's answers (read back by feedback, rankings and training)."""

    def record_completion(self, c: NewCompletion) -> None:
        """Store a served request with its prompt (deduplicated) and all its choices."""
        _check(c)
        try:
            self._write([c])
        except exc.IntegrityError as error:
            raise _duplicate(c) from error

    def record_completions(self, records: list[NewCompletion]) -> list[StoreError | None]:
        """``record_completion`` for several at once, in one transaction (group commit of the
        serving path): None for each stored, or the StoreError that ``record_completion`` would
        raise. StoreUnavailableError is raised when the database is unavailable (nothing stored).
        """
        outcomes: list[StoreError | None] = [None] * len(records)
        valid = []
        for i, c in enumerate(records):
            try:
                _check(c)
                valid.append(i)
            except InvalidInputError as error:
                outcomes[i] = error
        if not valid:
            return outcomes
        try:
            self._write([records[i] for i in valid])
            return outcomes
        except (exc.IntegrityError, InvalidInputError):
            pass  # one record spoiled the batch (a duplicate id, a refused value): one by one
        for i in valid:
            try:
                self.record_completion(records[i])
            except StoreUnavailableError:
                raise
            except StoreError as error:
                outcomes[i] = error
        return outcomes

    @functools.cached_property
    def _prompt_ids_committed(self) -> dict[str, int]:
        """Prompt row ids by sha256, filled only after the transaction that found or inserted
        them committed: prompts are never deleted, so a committed id stays right."""
        return {}

    def _write(self, records: list[NewCompletion]) -> None:
        """Insert ``records`` in one transaction."""
        try:
            with self._writes() as conn:
                prompt_ids = self._insert(conn, records)
        except exc.IntegrityError:
            self._prompt_ids_committed.clear()  # in case a cached id went stale after all
            raise
        known = self._prompt_ids_committed
        if len(known) + len(prompt_ids) > PROMPT_IDS_CACHED:
            known.clear()
        known.update(prompt_ids)

    def _insert(self, s: sa.Connection, records: list[NewCompletion]) -> dict[str, int]:
        """Insert ``records``; returns their prompts' row ids by sha256."""
        records = [_storable(c) for c in records]
        created = [_created(c) for c in records]
        digests = [hashlib.sha256(c.prompt_text.encode()).hexdigest() for c in records]
        prompt_ids = self._prompt_ids(s, records, digests, created)
        s.execute(COMPLETIONS.insert(), [
            {"id": c.id, "prompt_id": prompt_ids[digests[i]], "kind": c.kind, "model": c.model,
             "policy_version": c.policy_version, "params": c.params, "user": c.user,
             "created_at": created[i], "key_scope": c.key_scope}
            for i, c in enumerate(records)
        ])
        s.execute(CHOICES.insert(), [
            {"completion_id": c.id, "index": ch.index, "text": ch.text,
             "token_ids": list(ch.token_ids), "logprobs": list(ch.logprobs),
             "finish_reason": ch.finish_reason,
             "policy_version": ch.policy_version or c.policy_version}
            for c in records for ch in c.choices
        ])
        return prompt_ids

    def _prompt_ids(self, s: sa.Connection, records: list[NewCompletion], digests: list[str],
                    created: list[datetime]) -> dict[str, int]:
        """The prompt row id of each digest: known ones from the cache, new texts inserted (one
        statement, ``RETURNING`` their ids), the rest read (a row another writer inserts
        meanwhile is skipped by the insert, then read)."""
        known = self._prompt_ids_committed
        found = {d: known[d] for d in digests if d in known}
        new: dict[str, dict[str, Any]] = {}
        for c, digest, at in zip(records, digests, created, strict=True):
            if digest not in found and digest not in new:
                new[digest] = {"sha256": digest, "messages": c.messages,
                               "prompt_text": c.prompt_text,
                               "prompt_token_ids": list(c.prompt_token_ids),
                               "holdout": is_holdout_hash(digest), "created_at": at}
        if not new:
            return found
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        statement = insert(PROMPTS).on_conflict_do_nothing(index_elements=["sha256"])
        if self.engine.dialect.insert_executemany_returning:
            rows = s.execute(statement.returning(PROMPTS.c.sha256, PROMPTS.c.id),
                             list(new.values()))
            found.update(rows.all())
        else:  # SQLite before 3.35
            s.execute(statement, list(new.values()))
        if unread := set(new) - found.keys():
            sha256 = PROMPTS.c.sha256
            found.update(s.execute(sa.select(sha256, PROMPTS.c.id).where(sha256.in_(unread))).all())
        return found


def _check(c: NewCompletion) -> None:
    if not c.choices:
        raise InvalidInputError("A completion needs at least one choice", param="choices")


def _storable(c: NewCompletion) -> NewCompletion:
    """The completion with its texts fit for either database (`storable`)."""
    return replace(c, prompt_text=storable(c.prompt_text), messages=storable(c.messages),
                   params=storable(c.params), user=storable(c.user),
                   choices=[replace(ch, text=storable(ch.text)) for ch in c.choices])


def _created(c: NewCompletion) -> datetime:
    if c.created_at is None:
        return utcnow()
    return datetime.fromtimestamp(c.created_at, timezone.utc)


def _duplicate(c: NewCompletion) -> InvalidInputError:
    return InvalidInputError(
        f"Completion '{c.id}' is already stored or has duplicate choice indices",
        param="id",
        code="duplicate_completion",
    )
