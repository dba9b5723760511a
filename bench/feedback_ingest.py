"""Feedback ingest through HTTP on PostgreSQL: writes/s, latency, and no lost writes.

    python bench/feedback_ingest.py [--requests 20000] [--concurrency 32] [--rounds 1]
                                    [--modes plain,keyed] [--gc-freeze] [--postgres URL]

Creates a fresh database next to ``--postgres``, starts one server process on a fake engine
(``bench/_feedback_server.py``, uvicorn as `flywheel serve` runs it), stores a few completions
through ``/v1/chat/completions``, then posts ``--requests`` ratings of their choices from
``--concurrency`` keep-alive HTTP/1.1 connections in this process (asyncio protocols on uvloop,
every request body prepared before the clock starts). Two modes:

- ``plain``: no Idempotency-Key; every 201 must be one row.
- ``keyed``: a fresh Idempotency-Key on each post, and one post in 20 a retry (same key, same body)
  of a post 100 earlier; a retry answers 201 with ``Idempotent-Replayed`` and adds no row.

After each mode the rows are counted in the database: lost = created 201s - rows. Targets: at
least 1,500 writes/s and p99 under 50 ms on 2 cores. With a fixed number of connections the mean
latency is connections / throughput (Little's law): 1,500 writes/s is a 21 ms mean at 32
connections but 43 ms at 64, which leaves a 50 ms p99 no room; hence 32 by default. The CPU per
request of the server, of its PostgreSQL backends and of this client, and the load average, are
printed too: other processes on the machine distort the figures. ``--gc-freeze`` freezes the
server's start-up heap, a change proposed for `flywheel serve` (see ``_feedback_server.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path

import sqlalchemy as sa
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._databases import create_database, drop_database  # noqa: E402

TARGET_WRITES = 1500.0  # writes/s on 2 cores
TARGET_P99_MS = 50.0
COMPLETIONS = 8  # stored completions to rate, 2 choices each
RETRY_EVERY = 20  # keyed mode: one post in 20 repeats an earlier one
RETRY_LAG = 100  # ... the post this many before it
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- database and server ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(db_url: str, port: int, gc_freeze: bool) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "_feedback_server.py"),
         "--database-url", db_url, "--port", str(port), *(["--gc-freeze"] if gc_freeze else [])],
        cwd=ROOT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            status, _ = http_json(port, "GET", "/readyz")
            if status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise RuntimeError("the server did not become ready in 60 s")


def http_json(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = None if body is None else json.dumps(body)
        conn.request(method, path, payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def store_completions(port: int) -> list[tuple[str, int]]:
    """(completion id, choices) of a few chat completions served and stored by the server."""
    found = []
    for i in range(COMPLETIONS):
        status, body = http_json(port, "POST", "/v1/chat/completions", {
            "model": "flywheel", "n": 2, "max_tokens": 8,
            "messages": [{"role": "user", "content": f"Question number {i}?"}],
        })
        if status != 200:
            raise RuntimeError(f"chat completion failed: {status} {body}")
        found.append((body["id"], len(body["choices"])))
    return found


def count_rows(db_url: str, tag: str) -> int:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.scalar(sa.text('SELECT count(*) FROM feedback WHERE "user" LIKE :p'),
                           {"p": f"{tag}-%"})
    engine.dispose()
    return int(rows or 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def backend_pids(db_url: str) -> list[int]:
    """PostgreSQL backends serving the bench database (the server's pooled connections)."""
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        pids = conn.scalars(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = "
                                    "current_database() AND pid <> pg_backend_pid()")).all()
    engine.dispose()
    return list(pids)


# --- requests ----------------------------------------------------------------------------------

def build_requests(port: int, completions: list[tuple[str, int]], n: int, tag: str,
                   keyed: bool) -> tuple[list[bytes], int]:
    """Raw HTTP/1.1 requests with varied completions, choices, ratings, comments and users;
    returns them with the number of retries among them (keyed mode)."""
    requests: list[bytes] = []
    retries = 0
    for i in range(n):
        if keyed and i >= RETRY_LAG and i % RETRY_EVERY == RETRY_EVERY - 1:
            requests.append(requests[i - RETRY_LAG])
            retries += 1
            continue
        cid, choices = completions[i % len(completions)]
        body = {"completion_id": cid, "choice_index": (i // len(completions)) % choices,
                "rating": "up" if i % 3 else "down", "user": f"{tag}-u{i % 97}"}
        if i % 7 == 0:
            body["comment"] = f"comment {i}: " + "fine " * (i % 5)
        data = json.dumps(body).encode()
        head = (f"POST /v1/feedback HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n")
        if keyed:
            head += f"Idempotency-Key: {tag}-{i}\r\n"
        requests.append(head.encode() + b"\r\n" + data)
    return requests, retries


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; parses just status and headers."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bool]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        start = head.find(b"content-length:") + 15
        stop = head.find(b"\r\n", start)
        length = int(head[start:stop if stop >= 0 else len(head)])
        if len(self.buffer) < end + 4 + length:
            return
        status = int(self.buffer[9:12])
        del self.buffer[:end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, b"idempotent-replayed" in head))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bool]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter


@dataclass
class Result:
    seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    replayed: int = 0
    errors: int = 0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    database_cpu: float = 0.0

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6 if ordered else 0.0


async def post_all(port: int, requests: list[bytes], concurrency: int, server_pid: int,
                   db_url: str) -> Result:
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(Connection, "127.0.0.1", port))[1]
             for _ in range(concurrency)]
    result = Result()
    order = iter(range(len(requests)))

    async def drive(conn: Connection) -> None:
        for i in order:
            sent = time.perf_counter_ns()
            try:
                status, replayed = await conn.send(requests[i])
            except ConnectionError:
                result.errors += 1
                return
            result.latencies_ns.append(time.perf_counter_ns() - sent)
            result.statuses[status] += 1
            result.replayed += replayed

    backends = backend_pids(db_url)
    database_cpu = [cpu_seconds(pid) for pid in backends]
    cpu, server_cpu, start = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
    await asyncio.gather(*(drive(c) for c in conns))
    result.seconds = time.perf_counter() - start
    result.client_cpu = time.process_time() - cpu
    result.server_cpu = cpu_seconds(server_pid) - server_cpu
    result.database_cpu = sum(cpu_seconds(pid) - before
                              for pid, before in zip(backends, database_cpu, strict=True))
    opened = set(backend_pids(db_url)) - set(backends)  # during the run: all of their CPU
    result.database_cpu += sum(cpu_seconds(pid) for pid in opened)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return result


# --- modes -------------------------------------------------------------------------------------

def run_mode(name: str, tag: str, port: int, db_url: str, server_pid: int,
             completions: list[tuple[str, int]], args: argparse.Namespace) -> bool:
    keyed = name == "keyed"
    requests, retries = build_requests(port, completions, args.requests, tag, keyed)
    load_before = os.getloadavg()[0]
    result = uvloop.run(post_all(port, requests, args.concurrency, server_pid, db_url))
    load_after = os.getloadavg()[0]
    rows = count_rows(db_url, tag)
    answered = result.statuses[201]
    created = answered - result.replayed
    lost = created - rows
    rate = created / result.seconds
    p50, p99 = result.percentile_ms(0.50), result.percentile_ms(0.99)
    others = {s: c for s, c in result.statuses.items() if s != 201}
    ok = rate >= TARGET_WRITES and p99 < TARGET_P99_MS and lost == 0 and answered == args.requests
    expected_rows = args.requests - retries
    replay_note = f" replayed {result.replayed}/{retries}" if keyed else ""
    print(f"{name}: {rate:.0f} writes/s (target >= {TARGET_WRITES:.0f}) p50 {p50:.1f} ms "
          f"p99 {p99:.1f} ms (target < {TARGET_P99_MS:.0f}) 201s {answered}/{args.requests}"
          f"{replay_note} rows {rows}/{expected_rows} lost {lost}"
          f"{'' if ok else '  <-- MISSED'}")
    total = max(1, sum(result.statuses.values()))
    server_ms, core = 1e3 * result.server_cpu / total, 100 * result.server_cpu / result.seconds
    print(f"  {result.seconds:.2f} s, p90 {result.percentile_ms(0.90):.1f} ms, max "
          f"{result.percentile_ms(1.0):.1f} ms; CPU per request: server {server_ms:.2f} ms "
          f"({core:.0f}% of a core), database {1e3 * result.database_cpu / total:.2f} ms, client "
          f"{1e3 * result.client_cpu / total:.2f} ms; load average "
          f"{load_before:.2f} -> {load_after:.2f}"
          + (f", other statuses {others}" if others else "")
          + (f", connection errors {result.errors}" if result.errors else ""))
    return ok and rows == expected_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="posts per mode")
    parser.add_argument("--concurrency", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--rounds", type=int, default=1, help="repeat both modes")
    parser.add_argument("--warmup", type=int, default=1_000, help="posts before measuring")
    parser.add_argument("--modes", default="plain,keyed", help="comma-separated: plain, keyed")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() in the server once started (see _feedback_server.py)")
    parser.add_argument("--postgres", default=os.environ.get(
        "FLYWHEEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="a database on the server to bench; a fresh one is created beside it")
    args = parser.parse_args()

    db_url = create_database(args.postgres, "bench_feedback")
    server = None
    try:
        port = free_port()
        server = start_server(db_url, port, args.gc_freeze)
        completions = store_completions(port)
        print(f"feedback ingest: {args.requests} posts per mode, {args.concurrency} connections, "
              f"{len(completions)} completions, {os.cpu_count()} CPUs, "
              f"{'gc.freeze() after start-up, ' if args.gc_freeze else ''}"
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        warm, _ = build_requests(port, completions, args.warmup, "warm", keyed=False)
        uvloop.run(post_all(port, warm, args.concurrency, server.pid, db_url))
        ok = True
        for round_ in range(args.rounds):
            for mode in args.modes.split(","):
                ok &= run_mode(mode, f"{mode}{round_}", port, db_url, server.pid, completions,
                               args)
        return 0 if ok else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        drop_database(args.postgres, db_url)


if __name__ == "__main__":
    sys.exit(main())
