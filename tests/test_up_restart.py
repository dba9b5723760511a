"""`flywheel up` keeps serving when a child dies: a SIGKILLed worker or server is started again,
the other child left alone; only a child that keeps dying at start ends `up` (the restart policy
of flywheel/supervisor.py, live)."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from flywheel.vllm.bindings import vllm_installed
from tests.flywheel.test_supervisor import (
    _alive,
    _free_port,
    _kill_all,
    _stop,
    _up,
    _up_env,
    _wait_all_gone,
    _wait_ready,
)

pytestmark = pytest.mark.slow


@dataclass
class Up:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child(self, command: str) -> psutil.Process | None:
        """The running `flywheel <command>` child (past the trampoline's exec), if any."""
        for child in _alive(psutil.Process(self.proc.pid).children()):
            try:
                if child.cmdline()[1:] == ["-m", "flywheel.cli", command]:
                    return child
            except psutil.NoSuchProcess:
                continue
        return None

    def new_child(self, command: str, old: psutil.Process, timeout: float) -> psutil.Process:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()[-3000:]
            child = self.child(command)
            if child is not None and child.pid != old.pid:
                return child
            time.sleep(0.1)
        raise AssertionError(f"no new {command} after {timeout}s:\n{self.log()[-3000:]}")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Up]:
    """One `flywheel up` on the tiny model for the module; stopped with Ctrl-C, nothing left."""
    tmp = tmp_path_factory.mktemp("up-restart")
    port, log_path = _free_port(), tmp / "up.log"
    proc = _up(port, tmp / "data", _up_env(tiny_model_dir), stdout=log_path.open("wb"),
               stderr=subprocess.STDOUT)
    running = Up(proc, f"http://127.0.0.1:{port}", log_path)
    children: list[psutil.Process] = []
    try:
        _wait_ready(running.url, proc)
        yield running
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, running.log()[-3000:]
        assert not _wait_all_gone(children, timeout=30)
    finally:
        _stop(proc)
        _kill_all(children)


class HealthProbe:
    """GET /healthz every 50 ms in a thread; every answer (or error) kept."""

    def __init__(self, url: str) -> None:
        self.url, self.answers = url, list[object]()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._done.is_set():
                try:
                    self.answers.append(client.get(self.url + "/healthz").status_code)
                except httpx.HTTPError as exc:
                    self.answers.append(repr(exc))
                self._done.wait(0.05)

    def wait_for_answers(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answers) < count:
            assert time.monotonic() < deadline, self.answers
            time.sleep(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)


def test_a_killed_worker_is_restarted_while_the_server_keeps_serving(up: Up) -> None:
    worker, server = up.child("worker"), up.child("serve")
    assert worker is not None and server is not None
    with HealthProbe(up.url) as probe:
        probe.wait_for_answers(5)  # some from before the kill
        worker.kill()
        new = up.new_child("worker", worker, timeout=30)
        started = time.monotonic()
        while time.monotonic() - started < 3:  # the new worker running, not only started
            assert new.is_running() and new.status() != psutil.STATUS_ZOMBIE, up.log()[-3000:]
            time.sleep(0.1)
    assert len(probe.answers) > 20 and set(probe.answers) == {200}, probe.answers
    assert f"worker (pid {worker.pid}) killed by SIGKILL" in up.log()
    assert up.child("serve") == server  # same process, never touched


def test_a_killed_server_is_restarted(up: Up) -> None:
    server, worker = up.child("serve"), up.child("worker")
    assert server is not None and worker is not None
    engine = server.children(recursive=True)  # its engine process, where it has one
    server.kill()
    new = up.new_child("serve", server, timeout=30)
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, f"no /healthz 200 after 120 s:\n{up.log()[-3000:]}"
        try:
            if httpx.get(up.url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    assert up.child("serve") == new and up.child("worker") == worker
    assert f"server (pid {server.pid}) killed by SIGKILL" in up.log()
    assert not _wait_all_gone(engine, timeout=30)  # the dead server's engine process follows it


def test_a_killed_embedded_redis_is_started_again(up: Up) -> None:
    """The embedded Redis comes back on its port; the server reconnects to it and keeps
    serving, and neither child is restarted for it."""
    server, worker = up.child("serve"), up.child("worker")
    assert server is not None and worker is not None
    port = int(re.search(r"embedded Redis at redis://127\.0\.0\.1:(\d+)", up.log()).group(1))

    def redis_server() -> psutil.Process | None:
        return next((p for p in _alive(psutil.Process(up.proc.pid).children())
                     if "redis-server" in " ".join(p.cmdline())), None)

    old = redis_server()
    assert old is not None
    with HealthProbe(up.url) as probe:
        probe.wait_for_answers(5)
        old.kill()
        deadline = time.monotonic() + 30
        while (new := redis_server()) is None or new.pid == old.pid:
            assert time.monotonic() < deadline, up.log()[-3000:]
            time.sleep(0.1)
        assert redis.Redis(port=port).ping()
        while httpx.get(up.url + "/readyz", timeout=5).json().get("redis") is not True:
            assert time.monotonic() < deadline + 30, up.log()[-3000:]
            time.sleep(0.2)
    assert set(probe.answers) == {200}, probe.answers
    assert f"embedded Redis (pid {old.pid}) killed by SIGKILL" in up.log()
    assert up.child("serve") == server and up.child("worker") == worker


@pytest.mark.skipif(vllm_installed(), reason="needs a worker that cannot start: vLLM missing")
def test_a_worker_that_cannot_start_ends_up(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A worker asked for vLLM rollouts without vLLM exits 2 (its configuration cannot run):
    `up` does not start it again, names it, exits 2 and stops everything."""
    env = _up_env(tiny_model_dir) | {"FLYWHEEL_PPO__ROLLOUT_ENGINE": "vllm"}
    log_path = tmp_path / "up.log"
    proc = _up(_free_port(), tmp_path / "data", env, stdout=log_path.open("wb"),
               stderr=subprocess.STDOUT)
    seen: set[psutil.Process] = set()  # every child it ever had
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.NoSuchProcess):
                seen.update(psutil.Process(proc.pid).children(recursive=True))
            time.sleep(0.5)
        log = log_path.read_text(errors="replace")
        assert proc.wait(timeout=60) == 2, log[-3000:]
    finally:
        _stop(proc)
        _kill_all(list(seen))
    assert log.count("started worker") == 1 and log.count("started server") == 1, log[-3000:]
    assert re.search(r"worker exited with status 2 after [\d.]+ s: its configuration cannot run "
                     r"\(its own log lines above say why\); not restarting it", log), log[-3000:]
    assert "stopped server, worker" in log
    assert not _wait_all_gone(list(seen), timeout=30)
