"""Bearer API keys on /v1/* and the admin key on admin routes (keys compared as SHA-256 digests)."""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Request

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


class Authenticator:
    """Checks keys; with no keys configured every route is open (the local default)."""

    def __init__(self, settings: Settings) -> None:
        self._user_keys = [_digest(k) for k in settings.api_key_list]
        self._admin_key = _digest(settings.admin_key) if settings.admin_key else None

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
            raise APIError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def check_admin(self, request: Request) -> None:
        token = _bearer(request)
        if self._admin_key is not None:
            if not self._matches(token, [self._admin_key]):
                status = 401 if token is None else 403
                raise APIError(status, "This route needs the admin key.", code="admin_required")
            return
        if self._user_keys:
            raise APIError(403, "Admin routes are closed: set FLYWHEEL_ADMIN_KEY to open them.",
                           code="admin_disabled")
