"""Helpers that store served completions (`store`, `migrated_postgres_url`: tests/conftest.py)."""

from __future__ import annotations

import sqlalchemy as sa

from feedback_store import NewChoice, NewCompletion, Store
from tests.conftest import migrated_postgres_url as migrated_postgres_url
from tests.databases import empty_postgres as _empty_postgres

__all__ = ["_empty_postgres", "add_completion", "count", "migrated_postgres_url"]


def add_completion(
    store: Store,
    cid: str,
    *,
    prompt: str = "Hello?",
    texts: tuple[str, ...] = ("Hi!", "Go away."),
    kind: str = "chat",
    policy_version: str = "policy-0",
    versions: tuple[str, ...] | None = None,
) -> None:
    """Store a completion of `prompt` with one choice per text (token ids from the text), by
    `policy_version`, or each by its version in `versions` (a request split between arms)."""
    store.record_completion(
        NewCompletion(
            id=cid,
            kind=kind,  # type: ignore[arg-type]
            prompt_text=prompt,
            prompt_token_ids=[ord(ch) for ch in prompt],
            messages=[{"role": "user", "content": prompt}] if kind == "chat" else None,
            model="flywheel",
            policy_version=policy_version,
            params={"n": len(texts), "temperature": 1.0},
            choices=[
                NewChoice(i, text, [ord(ch) for ch in text], [-0.5] * len(text), "stop",
                          None if versions is None else versions[i])
                for i, text in enumerate(texts)
            ],
        )
    )


def count(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return conn.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0
