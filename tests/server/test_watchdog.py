"""The event-loop watchdog (server/watchdog.py): a loop that stops turning is reported, a busy
but turning one is not; and a real server whose loop hangs exits with EXIT_HUNG."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.watchdog import EXIT_HUNG, LoopWatchdog
from tests.server.conftest import free_port

# A server on the fake engine with a route that blocks its event loop, as a deadlock would.
HANGING_SERVER = """
import sys, time
from pathlib import Path
import uvicorn
from flywheel.settings import Settings
from server.app import create_app
from server.engines.fake import FakeEngine

data, port = Path(sys.argv[1]), int(sys.argv[2])
settings = Settings(data_dir=data, database_url=f"sqlite:///{data}/flywheel.db",
                    model=str(data / "no-model"), watchdog_seconds=1.0)
app = create_app(settings, engine=FakeEngine(), watch=False)

@app.get("/hang")
async def hang() -> None:
    time.sleep(120)

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def test_a_blocked_loop_is_reported_and_a_turning_one_is_not() -> None:
    hung: list[float] = []
    reported = threading.Event()

    def on_hang(stalled: float) -> None:
        hung.append(stalled)
        reported.set()

    async def main() -> None:
        dog = LoopWatchdog(asyncio.get_running_loop(), timeout=0.4, on_hang=on_hang)
        dog.start()
        try:
            for _ in range(20):  # 1 s of short awaits: the loop turns, nothing is reported
                await asyncio.sleep(0.05)
            assert hung == []
            time.sleep(0.2)  # blocking, but for less than the timeout
            await asyncio.sleep(0.3)
            assert hung == []
            started = time.monotonic()
            while not reported.is_set() and time.monotonic() - started < 5:
                time.sleep(0.01)  # the loop blocked: no callback runs
            assert hung and hung[0] > 0.4
        finally:
            dog.stop()

    asyncio.run(main())


def test_stop_ends_the_thread_without_a_report() -> None:
    async def main() -> None:
        dog = LoopWatchdog(asyncio.get_running_loop(), timeout=0.2,
                           on_hang=lambda s: (_ for _ in ()).throw(AssertionError(s)))
        dog.start()
        await asyncio.sleep(0.3)
        dog.stop()
        assert not dog._thread.is_alive()

    asyncio.run(main())


@pytest.mark.slow
def test_a_server_whose_loop_hangs_exits_for_its_supervisor(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", HANGING_SERVER, str(tmp_path), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.communicate()[1][-3000:]
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/hang", timeout=30)  # the process exits under this request
        assert server.wait(timeout=30) == EXIT_HUNG
        stderr = server.communicate()[1]
        assert "event loop has not turned" in stderr
        assert "in hang" in stderr  # the stack of the thread stuck in the route
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
