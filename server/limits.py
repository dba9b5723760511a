"""Resource limits of the HTTP layer: body size, the admission queue and each key's share of it,
a request's cost, abandoned requests and slow stream readers (settings ``max_request_bytes``,
``max_waiting_requests``, ``max_waiting_per_key``, ``max_request_tokens``,
``stream_write_timeout_s``)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_body
from server.state import AppState

log = logging.getLogger(__name__)

T = TypeVar("T")

CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the answer


class BodyLimit:
    """Pure ASGI middleware: a body over ``max_bytes`` gets 413 and is not read further; a body
    that stops arriving for ``timeout_s`` gets 408.

    A declared ``Content-Length`` is refused before any of the body is read; a chunked or
    under-declared body is counted as it arrives and refused once past the limit (the app then
    sees the client as gone). The refusal closes the connection, so the rest is never read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, *self._too_large())
            return
        received = 0
        refused = started = complete = False

        async def counting_receive() -> Message:
            nonlocal received, refused, complete
            if refused:
                return {"type": "http.disconnect"}
            try:
                # Only the body is timed: after it, the app waits on receive() to hear the
                # client leave, for as long as it streams.
                message = await (receive() if complete or self.timeout_s is None
                                 else asyncio.wait_for(receive(), self.timeout_s))
            except TimeoutError:
                refused = True
                if not started:
                    await self._refuse(send, 408, "The request body stopped arriving.",
                                       "request_timeout")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send, *self._too_large())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the refusal went out in place of whatever the app answers now
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)

    def _too_large(self) -> tuple[int, str, str]:
        return (413, f"The request body exceeds the limit of {self.max_bytes} bytes.",
                "request_too_large")

    async def _refuse(self, send: Send, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(status, message, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def admit(state: AppState, tenant: str) -> None:
    """429 with ``Retry-After`` while the engine already holds ``max_waiting_requests`` waiting
    (``queue_full``), or ``tenant`` its share of them (``key_queue_full``, ``shares.py``).

    Called before tokenising (no work spent on a request that cannot queue) and again right
    before the engine takes the request, with no await in between, so the bounds hold exactly.
    """
    if state.engine.stats().waiting >= state.settings.max_waiting_requests:
        raise APIError(429, "The server has too many requests waiting; retry shortly.",
                       code="queue_full", retry_after=1)
    state.shares.admit(tenant)


def bound_cost(state: AppState, cost: int, detail: str, param: str) -> None:
    """400 for a request that may generate more than ``max_request_tokens`` tokens in all
    (``cost``: prompts x n x max_tokens; ``detail`` spells that product out)."""
    limit = state.settings.max_request_tokens
    if cost > limit:
        raise APIError(400, f"This request may generate up to {cost} tokens ({detail}), more "
                       f"than the limit of {limit} per request. Lower max_tokens or n, or send "
                       "fewer prompts per request.", param=param, code="request_too_costly")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless the client disconnects first: then cancel it (the engine frees the
    request's slots) and return None. Only for use once the body has been read."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watch):
            if not pending.done():
                pending.cancel()
        if not task.done():  # our own cancellation, or the client left: wait for the clean-up
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class TimedStreamingResponse(StreamingResponse):
    """A stream whose reader must take each chunk within ``write_timeout_s``.

    A reader that stops reading fills the socket buffers, then uvicorn's transport (64 KiB), and
    the next ``send`` waits; past the timeout the stream is closed (its engine request cancelled)
    and the connection dropped, so a stalled client holds neither slots nor growing buffers.
    """

    def __init__(self, content: AsyncIterator[bytes], *, write_timeout_s: float,
                 **kwargs: object) -> None:
        super().__init__(content, **kwargs)  # type: ignore[arg-type]
        self.write_timeout_s = write_timeout_s

    async def stream_response(self, send: Send) -> None:
        # One ``asyncio.timeout`` per stream, armed around each send only (the wait for the next
        # chunk is generation, not the reader): rescheduling it costs a few microseconds a
        # chunk, where an ``anyio.fail_after`` per chunk cost ~50 (a tenth of the event loop's
        # time under 16 streams on 2 cores).
        body, loop, limit = self.body_iterator, asyncio.get_running_loop(), self.write_timeout_s
        try:
            async with asyncio.timeout(limit) as deadline:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                deadline.reschedule(None)
                async for chunk in body:
                    deadline.reschedule(loop.time() + limit)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    deadline.reschedule(None)
                deadline.reschedule(loop.time() + limit)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            # Returning with the response unfinished makes uvicorn close the connection.
            log.warning("dropped a stream reader that took no data for %.1f s", limit)
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:  # now, not at garbage collection: the engine frees the slots
                with anyio.CancelScope(shield=True):
                    await aclose()
