"""Errors the store raises; the server maps each to an HTTP status and the OpenAI envelope."""

from __future__ import annotations


class StoreError(Exception):
    """Base class: a message for humans plus the OpenAI-style `param` and `code`."""

    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r})"


class NotFoundError(StoreError):
    """A referenced record does not exist (HTTP 404)."""

    default_code = "not_found"


class ForbiddenError(StoreError):
    """The caller may not touch this record, e.g. rate an answer served to another key (403)."""

    default_code = "forbidden"


class InvalidInputError(StoreError):
    """The request is well-formed but not acceptable (HTTP 400)."""

    default_code = "invalid_input"


class ConflictError(StoreError):
    """The request conflicts with the current state, e.g. a second canary (HTTP 409)."""

    default_code = "conflict"


class IdempotencyMismatchError(StoreError):
    """An idempotency key was reused with a different request body (HTTP 422)."""

    default_code = "idempotency_key_reused"


class StoreUnavailableError(StoreError):
    """The database cannot be reached or dropped the connection; retry later (HTTP 503)."""

    default_code = "database_unavailable"
