"""Connections that send too slowly are closed: uvicorn bounds the idle time between requests
(keep-alive) but not the time a request's line and headers take to arrive, so 600 connections
sending a header byte now and then held 600 sockets for as long as they liked.

`header_timeout_protocol` makes uvicorn's HTTP protocol (httptools or h11, whichever it would
pick) close a connection whose next request has not finished its headers within a bound, counted
from the connection's start or the end of its previous response. A body that stops arriving is
`server.limits.BodyLimit`'s (`body_timeout_s`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string


def _auto_protocol() -> type[asyncio.Protocol]:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return import_from_string(HTTP_PROTOCOLS["h11"])  # type: ignore[no-any-return]
    return import_from_string(HTTP_PROTOCOLS["httptools"])  # type: ignore[no-any-return]


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, closing connections whose headers take over `timeout_s`."""
    base: Any = _auto_protocol()

    class HeaderTimeout(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._waited_cycle:  # a new request's headers are complete
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not getattr(self, "pipeline", None):
                self._arm_header_timer()  # the next request's headers, on a kept-alive socket

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._waited_cycle = self.cycle
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is self._waited_cycle and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeout
