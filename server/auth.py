"""Bearer API keys on /v1/* and the admin key on admin routes (keys compared as SHA-256 digests).

A missing or unknown key is 401 with ``WWW-Authenticate: Bearer`` (RFC 6750 section 3); a key the
server knows that lacks the right (a user key on an admin route) is 403.
"""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Request

from feedback_store.feedback import SCOPE_LENGTH
from feedback_store.types import Rater
from flywheel.settings import Settings
from server.errors import APIError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def keys_configured(settings: Settings) -> bool:
    return bool(settings.api_key_list or settings.admin_key)


def exposed(flag: bool | None, settings: Settings) -> bool:
    """Whether an operator page (docs, metrics) is served: as the setting says, else only on a
    server without keys (a keyed server is reachable by others; its pages stay closed)."""
    return flag if flag is not None else not keys_configured(settings)


def _unauthorized(token: str | None, message: str, code: str) -> APIError:
    # RFC 6750: no error attribute when the request carried no credentials.
    challenge = "Bearer" if token is None else 'Bearer error="invalid_token"'
    return APIError(401, message, code=code, headers={"WWW-Authenticate": challenge})


class Authenticator:
    """Checks keys; with no keys configured every route is open (the local default)."""

    def __init__(self, settings: Settings) -> None:
        self._user_keys = [_digest(k) for k in settings.api_key_list]
        self._admin_key = _digest(settings.admin_key) if settings.admin_key else None
        self._trusted_scopes = {_digest(k).hex()[:SCOPE_LENGTH]
                                for k in settings.trusted_key_list}

    def _matches(self, token: str | None, keys: list[bytes]) -> bool:
        if token is None:
            return False
        digest = _digest(token)
        return any(secrets.compare_digest(digest, k) for k in keys)

    def check_user(self, request: Request) -> None:
        if not self._user_keys:
            return
        token = _bearer(request)
        admin = [self._admin_key] if self._admin_key else []
        if not self._matches(token, self._user_keys + admin):
            raise _unauthorized(token, "Missing or invalid API key: send "
                                "'Authorization: Bearer <key>'.", "invalid_api_key")

    def check_admin(self, request: Request) -> None:
        if self._admin_key is None and not self._user_keys:
            return
        token = _bearer(request)
        if self._admin_key is not None and self._matches(token, [self._admin_key]):
            return
        if not self._matches(token, self._user_keys):
            raise _unauthorized(token, "This route needs the admin key.", "invalid_api_key")
        if self._admin_key is None:
            raise APIError(403, "Admin routes are closed: set FLYWHEEL_ADMIN_KEY to open them.",
                           code="admin_disabled")
        raise APIError(403, "This route needs the admin key.", code="admin_required")

    def rater(self, request: Request, user: str | None) -> Rater:
        """Who this request speaks for: its key (untrusted unless listed in `trusted_keys` or the
        admin key) and its `user`; on a server without user keys, `user` alone (trusted)."""
        scope = self.idempotency_scope(request)
        if scope is None:
            return Rater(user=user, trusted=True, admin=True)
        token = _bearer(request)
        admin = self._admin_key is not None and self._matches(token, [self._admin_key])
        return Rater(key_scope=scope, user=user, trusted=admin or scope in self._trusted_scopes,
                     admin=admin)

    def tenant(self, request: Request) -> str:
        """Whom the fair shares of the queue and the batch count this request to: its key's
        scope, or on a server without user keys (or a keyless request) the client's address."""
        scope = self.idempotency_scope(request)
        if scope is not None:
            return f"key:{scope}"
        return f"addr:{request.client.host if request.client else ''}"

    def idempotency_scope(self, request: Request) -> str | None:
        """The caller's share of the idempotency-key space: a digest prefix of its key, so that
        two keys never replay each other's answers; None on a server without user keys."""
        if not self._user_keys:
            return None
        token = _bearer(request)
        return None if token is None else _digest(token).hex()[:SCOPE_LENGTH]
