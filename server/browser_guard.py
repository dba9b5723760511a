"""What a web page must not make a visitor's browser do to a Flywheel server.

A server without keys (the `flywheel up` default) trusts whoever can reach it. A page on another
site can reach it too, through its visitor's browser: a form or a no-cors fetch sends a POST
without any preflight ("simple requests"), and DNS rebinding points the page's own host name at
127.0.0.1 so that even its reads are answered. `BrowserGuard` refuses:

- a `Host` off the allow-list (`FLYWHEEL_ALLOWED_HOSTS`): 400 `host_not_allowed`. By default,
  without keys, the loopback names and the bind address; with keys, any host (a stolen page
  cannot send a bearer key);
- on a state-changing method, an `Origin` that is neither this server's own (its netloc equal to
  `Host`) nor on `FLYWHEEL_ALLOWED_ORIGINS`: 403 `origin_not_allowed`; browsers send `Origin` with
  every cross-origin POST, forms and no-cors fetches included;
- on a state-changing method, a form's content type (urlencoded, multipart, text/plain): 415
  `unsupported_media_type`. The API takes JSON, which a page can send cross-origin only after a
  CORS preflight that this server never grants.

Behind a reverse proxy, list the names clients use in `FLYWHEEL_ALLOWED_HOSTS` (or `*`).
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from flywheel.settings import Settings
from server.errors import error_body

log = logging.getLogger(__name__)

ANY = "*"
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data",
                        "text/plain"})


def _names(setting: str) -> list[str]:
    return [name.strip().lower() for name in setting.split(",") if name.strip()]


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The host names a request may name in `Host`; None: any."""
    names = _names(settings.allowed_hosts)
    if ANY in names:
        return None
    if names:
        return frozenset(names)
    if settings.api_key_list:
        return None
    bind = settings.host.strip("[]").lower()
    if bind in WILDCARD_BINDS:
        log.warning("serving on %r without keys: only loopback names are answered; set "
                    "FLYWHEEL_ALLOWED_HOSTS to the names clients use", settings.host)
        return LOOPBACK
    return LOOPBACK | {bind}


def host_name(host: str) -> str:
    """`Host` without its port, lower case: "[::1]:8000" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BrowserGuard:
    """Pure ASGI middleware; see the module's docstring."""

    def __init__(self, app: ASGIApp, *, hosts: frozenset[str] | None,
                 origins: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = origins

    @classmethod
    def for_settings(cls, app: ASGIApp, settings: Settings) -> BrowserGuard:
        return cls(app, hosts=allowed_hosts(settings),
                   origins=frozenset(o.rstrip("/") for o in _names(settings.allowed_origins)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await _refuse(send, *refusal)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        """(status, code, message) when the request is refused, else None."""
        headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                   for name, value in scope.get("headers", ())}
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return 400, "host_not_allowed", (
                f"Host '{host}' is not served here; list it in FLYWHEEL_ALLOWED_HOSTS")
        if scope["method"] in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host):
            return 403, "origin_not_allowed", (
                f"Requests from origin '{origin}' may not change anything here; list it in "
                "FLYWHEEL_ALLOWED_ORIGINS")
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type in FORM_TYPES:
            return 415, "unsupported_media_type", (
                f"Content type '{content_type}' is not accepted; send application/json")
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if ANY in self.origins or origin in self.origins:
            return True
        return origin != "null" and urlsplit(origin).netloc == host.strip().lower()


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
