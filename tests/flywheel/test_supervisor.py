"""`flywheel up` supervision: children die with it however it dies, and a start that finds the
data dir or the port taken says who holds it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from flywheel.supervisor import DataDirLock


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up_env(model_dir: Path) -> dict[str, str]:
    env = dict(os.environ, FLYWHEEL_MODEL=str(model_dir), FLYWHEEL_TRAIN__DEVICE="cpu",
               FLYWHEEL_LOG_LEVEL="info")
    for name in ("FLYWHEEL_REDIS_URL", "FLYWHEEL_DATABASE_URL", "FLYWHEEL_DATA_DIR",
                 "FLYWHEEL_PORT", "FLYWHEEL_HOST"):
        env.pop(name, None)
    return env


def _up(port: int, data_dir: Path, env: dict[str, str], **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flywheel.cli", "up", "--port", str(port),
                             "--data-dir", str(data_dir)], env=env, **kwargs)  # type: ignore[call-overload]


def _run_up(port: int, data_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flywheel.cli", "up", "--port", str(port),
                           "--data-dir", str(data_dir)], env=env, capture_output=True, text=True,
                          timeout=60)


def _hold(code: str) -> subprocess.Popen:
    """A Python process that runs ``code``, prints "ready", and then waits to be killed."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code) +
                             "\nprint('ready', flush=True)\nimport time\ntime.sleep(120)\n"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_all_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(procs)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"flywheel up exited with {proc.returncode}"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout}s")


def _children(proc: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(proc.pid).children(recursive=True)
    names = " ".join(" ".join(c.cmdline()) for c in children)
    assert "redis-server" in names and " serve" in names and " worker" in names, names
    return children


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in _alive(procs):
        p.kill()


# --- start-up checks (fast: they refuse before anything is built) -------------------------------

def test_up_refuses_a_port_in_use_and_names_the_listener(tmp_path: Path) -> None:
    port = _free_port()
    listener = _hold(f"""
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", {port}))
        s.listen()
    """)
    try:
        result = _run_up(port, tmp_path / "data", _up_env(tmp_path / "no-model"))
    finally:
        _stop(listener)
    assert result.returncode != 0
    assert f"port {port}" in result.stderr and f"pid {listener.pid}" in result.stderr
    assert "s.listen()" in result.stderr  # its command line


def test_up_refuses_a_data_dir_in_use_and_names_its_holder(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    holder = _hold(f"""
        from pathlib import Path
        from flywheel.supervisor import DataDirLock
        lock = DataDirLock(Path({str(data_dir)!r}))
        lock.acquire()
    """)
    try:
        result = _run_up(_free_port(), data_dir, _up_env(tmp_path / "no-model"))
    finally:
        _stop(holder)
    assert result.returncode != 0
    assert "data dir" in result.stderr and f"pid {holder.pid}" in result.stderr
    assert "DataDirLock" in result.stderr  # its command line


def test_the_data_dir_lock_dies_with_its_holder(tmp_path: Path) -> None:
    """A lock file left by a killed `up` (its PID written in it) does not block the next start."""
    holder = _hold(f"""
        from pathlib import Path
        from flywheel.supervisor import DataDirLock
        DataDirLock(Path({str(tmp_path)!r})).acquire()
    """)
    assert (tmp_path / "up.lock").read_text().split() == [str(holder.pid)]
    holder.kill()
    holder.wait(timeout=30)
    lock = DataDirLock(tmp_path)
    lock.acquire()
    assert (tmp_path / "up.lock").read_text().split() == [str(os.getpid())]
    lock.release()


def test_children_get_the_parent_death_signal(tmp_path: Path) -> None:
    """The mechanism alone, fast: SIGKILL a parent holding a supervised child and Redis."""
    parent = _hold(f"""
        from pathlib import Path
        import sys
        from flywheel.embedded_redis import EmbeddedRedis
        from flywheel.supervisor import Supervisor
        redis_server = EmbeddedRedis(Path({str(tmp_path)!r}))
        redis_server.start()
        supervisor = Supervisor({{}})
        supervisor.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
    """)
    try:
        children = psutil.Process(parent.pid).children(recursive=True)
        assert len(children) == 2
        parent.kill()
        assert not _wait_all_gone(children, timeout=30)
    finally:
        _stop(parent)
        _kill_all(children)


# --- the whole of `flywheel up` ------------------------------------------------------------------

@pytest.mark.slow
def test_sighup_stops_up_and_every_child(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Closing the terminal stops everything cleanly; meanwhile a second `up` is refused."""
    port, data_dir, env = _free_port(), tmp_path / "data", _up_env(tiny_model_dir)
    proc = _up(port, data_dir, env, stdout=(tmp_path / "up.log").open("wb"),
               stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc)
        children = _children(proc)
        same_dir = _run_up(_free_port(), data_dir, env)
        assert same_dir.returncode != 0 and f"pid {proc.pid}" in same_dir.stderr
        same_port = _run_up(port, tmp_path / "other", env)
        server = next(c for c in children if " serve" in " ".join(c.cmdline()))
        assert same_port.returncode != 0 and f"pid {server.pid}" in same_port.stderr
        proc.send_signal(signal.SIGHUP)
        code = proc.wait(timeout=60)
        assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
        assert not _wait_all_gone(children, timeout=30)
    finally:
        _stop(proc)
        _kill_all(children)


@pytest.mark.slow
def test_sigkill_of_up_takes_every_child_down(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = _free_port()
    proc = _up(port, tmp_path / "data", _up_env(tiny_model_dir),
               stdout=(tmp_path / "up.log").open("wb"), stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc)
        children = _children(proc)
        proc.kill()
        proc.wait(timeout=30)
        assert not _wait_all_gone(children, timeout=30), (tmp_path / "up.log").read_text()[-3000:]
    finally:
        _stop(proc)
        _kill_all(children)
