"""Resource limits against real sockets: body size, tokenising, the queue, abandoned requests and
stream readers that never read."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.completions.serving import INLINE_TOKENIZE_CHARS
from server.engines.base import ChoiceDelta, EngineStats, SamplingParams
from server.engines.fake import FakeEngine
from server.engines.request import Request, coalesce
from tests.server.conftest import live_app, make_settings

BIG = 20 * 1024 * 1024


def _head(path: str, port: int, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def _read_response(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict, dict]:
    """Status, headers and JSON body of one HTTP/1.1 response with a Content-Length."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body)


# -- 1. body size ------------------------------------------------------------------------------


def test_declared_oversized_body_is_refused_unread(tmp_path: Path,
                                                   sqlite_store: Store) -> None:
    with live_app(tmp_path, sqlite_store, FakeEngine()) as server, \
            socket.create_connection(("127.0.0.1", server.port)) as sock:
        # Only the headers go out: the answer cannot depend on reading the 20 MB.
        sock.sendall(_head("/v1/chat/completions", server.port, f"Content-Length: {BIG}\r\n"))
        status, headers, body = _read_response(sock, timeout=10)
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert body["error"]["type"] == "invalid_request_error"
    assert headers["connection"] == "close"


def test_chunked_20mb_upload_is_refused_while_healthz_answers(tmp_path: Path,
                                                              sqlite_store: Store) -> None:
    payload = json.dumps({"messages": [{"role": "user", "content": "x" * BIG}]}).encode()
    paused, resume = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def upload(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(_head("/v1/chat/completions", port, "Transfer-Encoding: chunked\r\n"))
            sent = 0
            try:
                for start in range(0, len(payload), 64 * 1024):
                    if sent >= 1024 * 1024 and not paused.is_set():
                        paused.set()  # mid-upload: the test asks /healthz now
                        resume.wait(30)
                    piece = payload[start:start + 64 * 1024]
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
                    if select.select([sock], [], [], 0)[0]:
                        break  # the answer came before the end of the body
                else:
                    sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the server closed the connection: the 413 is already on its way
            outcome["sent"] = sent
            outcome["response"] = _read_response(sock, timeout=30)

    with live_app(tmp_path, sqlite_store, FakeEngine()) as server:
        thread = threading.Thread(target=upload, args=(server.port,))
        thread.start()
        assert paused.wait(30), "the upload did not start"
        started = time.perf_counter()
        health = httpx.get(server.url + "/healthz", timeout=30)
        latency = time.perf_counter() - started
        resume.set()
        thread.join(60)
    print(f"/healthz answered in {latency * 1000:.1f} ms during the upload")
    assert health.status_code == 200  # answered while the upload ran
    status, _, body = outcome["response"]  # type: ignore[misc]
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert outcome["sent"] < len(payload)  # refused before the end of the body


def test_small_bodies_still_pass(client: TestClient) -> None:
    answer = client.post("/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert answer.status_code == 200


# -- 2. tokenising: bounded by the context first, then off the event loop ------------------------


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Path):
    from server.engines.transformers_engine import TransformersEngine

    return TransformersEngine(str(tiny_model_dir), device="cpu", max_batch_size=32,
                              ignore_eos=True)


def test_max_token_bytes_bounds_byte_level_bpe_only(tiny_engine) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from server.engines.prompts import max_token_bytes

    vocab = tiny_engine.tokenizer.get_vocab()
    assert max_token_bytes(tiny_engine.tokenizer) == max(len(t.encode()) for t in vocab)
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    assert max_token_bytes(PreTrainedTokenizerFast(tokenizer_object=wordpiece)) is None
    spaces_dropped = Tokenizer(models.BPE({"a": 0, "b": 1}, []))
    spaces_dropped.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert max_token_bytes(PreTrainedTokenizerFast(tokenizer_object=spaces_dropped)) is None


def test_unfittable_prompt_is_refused_before_tokenising(tmp_path: Path, sqlite_store: Store,
                                                        tiny_engine) -> None:
    tokenizer = tiny_engine.tokenizer
    original = tokenizer.encode
    calls: list[tuple[int, bool]] = []

    def spy(text, *args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        calls.append((len(text), on_loop))
        return original(text, *args, **kwargs)

    tokenizer.encode = spy
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'flywheel.db'}")
    app = create_app(settings, engine=tiny_engine, store=sqlite_store, watch=False)
    huge = "word " * 200_000  # 1 MB: no tokenisation of it could fit 512 positions
    try:
        with TestClient(app) as client:
            for path, body in (("/v1/completions", {"prompt": huge}),
                               ("/v1/chat/completions",
                                {"messages": [{"role": "user", "content": huge}]})):
                refused = client.post(path, json=body)
                assert refused.status_code == 400, refused.text
                assert refused.json()["error"]["code"] == "context_length_exceeded"
                assert "at least" in refused.json()["error"]["message"]
            assert all(length < 10_000 for length, _ in calls), "the huge prompt was tokenised"
            served = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
            assert served.status_code == 200
            long = "word " * (INLINE_TOKENIZE_CHARS // 5 + 20)  # fits no 512 positions either
            assert client.post("/v1/completions", json={"prompt": long}).status_code == 400
    finally:
        del tokenizer.encode
    # Short prompts are tokenised on the loop (cheaper than the thread hop), long ones never.
    assert (5, True) in calls
    long_calls = [on_loop for length, on_loop in calls if length > INLINE_TOKENIZE_CHARS]
    assert long_calls and not any(long_calls), "a long prompt was tokenised on the event loop"


# -- 3. the admission queue ----------------------------------------------------------------------


class BusyEngine(FakeEngine):
    """Reports a queue of ``waiting`` requests (the real engine's queue is filled elsewhere)."""

    waiting = 0

    def stats(self) -> EngineStats:
        stats = super().stats()
        stats.waiting = self.waiting
        return stats


def test_full_queue_answers_429_with_retry_after(tmp_path: Path, sqlite_store: Store) -> None:
    engine = BusyEngine()
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'flywheel.db'}",
                             max_waiting_requests=3)
    app = create_app(settings, engine=engine, store=sqlite_store, watch=False)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with TestClient(app) as client:
        engine.waiting = 3
        for path, body in (("/v1/chat/completions", chat),
                           ("/v1/completions", {"prompt": "hi", "stream": True})):
            full = client.post(path, json=body)
            assert full.status_code == 429
            assert full.headers["retry-after"] == "1"
            assert full.json()["error"]["type"] == "rate_limit_error"
            assert full.json()["error"]["code"] == "queue_full"
        assert engine.running == {}  # nothing reached the engine
        engine.waiting = 2
        assert client.post("/v1/chat/completions", json=chat).status_code == 200


# -- 4. abandoned requests -----------------------------------------------------------------------


@pytest.mark.slow
def test_abandoned_requests_free_their_slots(tmp_path: Path, sqlite_store: Store,
                                             tiny_engine) -> None:
    max_tokens = 400
    body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "n": 8,
                       "max_tokens": max_tokens}).encode()
    with live_app(tmp_path, sqlite_store, tiny_engine) as server:
        head = _head("/v1/chat/completions", server.port, f"Content-Length: {len(body)}\r\n")
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(150)]
        for sock in socks:
            sock.sendall(head + body)
        _wait(lambda: _held(tiny_engine) == 150, "the 150 requests never all reached the engine")
        steps_before = tiny_engine.stats().extra["decode_steps"]
        for sock in socks:
            sock.close()
        _wait(lambda: _held(tiny_engine) == 0, "abandoned requests still hold their slots")
        steps = tiny_engine.stats().extra["decode_steps"] - steps_before
        # Finishing them: 1,200 sequences of 400 tokens, 32 rows at a time, 15,000 steps.
        print(f"slots freed after {steps} decode steps")
        assert steps < 150 * 8 * max_tokens // 32 // 10
        normal = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4})
        assert normal.status_code == 200


def _held(engine) -> int:
    stats = engine.stats()
    return stats.running + stats.waiting


def _wait(condition, message: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


# -- 5. stream readers that never read -----------------------------------------------------------


def test_stream_reader_that_never_reads_is_dropped(tmp_path: Path,
                                                  sqlite_store: Store) -> None:
    engine = FakeEngine(max_model_len=10_000_000, answer_words=200_000)
    body = json.dumps({"prompt": "Hello", "stream": True, "n": 2,
                       "max_tokens": 5_000_000}).encode()
    # 10M tokens: far past the cost bound, which this endless answer is not about.
    with live_app(tmp_path, sqlite_store, engine, stream_write_timeout_s=0.5,
                 max_request_tokens=10**8) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        try:
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(_head("/v1/completions", server.port,
                               f"Content-Length: {len(body)}\r\n") + body)
            _wait(lambda: engine.stats().running == 1, "the stream never started")
            # Never read: once the buffers are full the server waits on the write, then drops us.
            _wait(lambda: engine.stats().running == 0, "the stalled stream still runs")
            normal = httpx.post(server.url + "/v1/completions", timeout=30,
                                json={"prompt": "Hi", "max_tokens": 3})
            assert normal.status_code == 200
        finally:
            sock.close()


async def test_inbox_merges_what_a_slow_reader_has_not_taken() -> None:
    params = SamplingParams(max_tokens=10_000, n=2)
    request = Request("r", [1, 2], params, 10_000, asyncio.get_running_loop())
    for step in range(10_000):
        for index in range(2):
            request.inbox.put(ChoiceDelta(index, f"{step % 10}", [step], [-1.0], "policy-0"))
        assert len(request.inbox) <= 2 * (params.n + 1)
    merged = coalesce(await request.inbox.take_all())
    expected = "".join(str(step % 10) for step in range(10_000))
    assert [d.text for d in merged] == [expected, expected]  # type: ignore[union-attr]
    assert merged[0].token_ids == list(range(10_000))  # type: ignore[union-attr]
