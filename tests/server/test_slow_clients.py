"""Slow senders hold no sockets: a request whose headers do not arrive in time is closed, one
whose body stops arriving gets 408; a slow *response* (a stream) is never cut. On a real uvicorn
server and sockets, with the protocol and middleware `flywheel serve` runs."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from server.limits import BodyLimit
from server.slow_clients import header_timeout_protocol

TIMEOUT_S = 0.5


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if scope["path"] == "/stream":  # a response slower than every timeout
        for _ in range(4):
            await asyncio.sleep(TIMEOUT_S)
            await send({"type": "http.response.body", "body": b"tick ", "more_body": True})
    await send({"type": "http.response.body", "body": b"got %d" % len(body)})


@pytest.fixture
def port() -> Iterator[int]:
    config = uvicorn.Config(BodyLimit(_app, 10_000, timeout_s=TIMEOUT_S), port=0,
                            log_level="warning", lifespan="off",
                            http=header_timeout_protocol(TIMEOUT_S))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.settimeout(10 * TIMEOUT_S)  # a server that never closes fails the test, not hangs it
    return conn


def _read_all(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def test_headers_that_never_finish_close_the_connection(port: int) -> None:
    with _connect(port) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert _read_all(conn) == b""  # closed: recv would time out otherwise


def test_a_kept_alive_connection_gets_the_same_bound(port: int) -> None:
    with _connect(port) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        conn.sendall(b"GET / HTTP/1.1\r\nHo")
        assert _read_all(conn) == b""


def test_a_body_that_stops_arriving_is_408(port: int) -> None:
    with _connect(port) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        answer = _read_all(conn)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


def test_slow_responses_and_whole_bodies_are_answered(port: int) -> None:
    with _connect(port) as conn:
        conn.sendall(b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Connection: close\r\n\r\nhello")
        answer = _read_all(conn)
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"tick") == 4
    assert b"got 5" in answer
