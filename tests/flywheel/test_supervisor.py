"""`flywheel up` supervision: children that die are restarted with a backoff until one keeps dying
at start, children die with it however it dies, and a start that finds the data dir or the port
taken says who holds it."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
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

from flywheel.supervisor import DataDirLock, RestartPolicy, describe_exit
from tests.helpers import up_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up_env(model_dir: Path) -> dict[str, str]:
    return up_env(model_dir)


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


# --- restarts (fast: throwaway `python -c` children under a Supervisor in its own process) ------

# Runs a Supervisor over {name: python code} with RestartPolicy(**policy), logging to stderr with
# the time; exits with wait()'s status. Creating the file ``stop_file`` makes a thread call stop().
_DRIVER = """\
import json, logging, os, sys, threading, time
from pathlib import Path
from flywheel.supervisor import RestartPolicy, Supervisor
logging.basicConfig(level=logging.INFO, format="%(created).3f %(levelname)s %(message)s")
children, policy, stop_file = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
supervisor = Supervisor(dict(os.environ), policy=RestartPolicy(**policy), poll_s=0.02)
def stop_when_asked():
    while not Path(stop_file).exists():
        time.sleep(0.02)
    supervisor.stop()
threading.Thread(target=stop_when_asked, daemon=True).start()
for name, code in children.items():
    supervisor.spawn(name, [sys.executable, "-c", code])
status = supervisor.wait()
supervisor.stop()
sys.exit(status)
"""
SLEEP = "import time; time.sleep(120)"
EXIT_3 = "import sys; sys.exit(3)"


class Supervised:
    """A Supervisor process over throwaway children; its log read back as it grows."""

    def __init__(self, tmp_path: Path, children: dict[str, str], **policy: float) -> None:
        self.log_path, self.stop_file = tmp_path / "supervisor.log", tmp_path / "stop"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, json.dumps(children), json.dumps(policy),
             str(self.stop_file)], stderr=self.log_path.open("wb"), cwd=tmp_path)

    def log(self) -> str:
        return self.log_path.read_text()

    def pids(self, name: str) -> list[int]:
        """Every pid ``name`` was started with, in order."""
        return [int(p) for p in re.findall(rf"started {name} \(pid (\d+)\)", self.log())]

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30) -> list[re.Match]:
        """The first ``count`` matches of ``pattern`` in the log, once there are that many."""
        deadline = time.monotonic() + timeout
        while True:
            matches = list(re.finditer(pattern, self.log()))
            if len(matches) >= count:
                return matches[:count]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {pattern!r} (exit {self.proc.poll()}):\n"
                                     + self.log()[-3000:])
            time.sleep(0.02)

    def close(self) -> None:
        children = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(self.proc.pid).children(recursive=True)
        _stop(self.proc)
        _kill_all(children)


@pytest.fixture
def supervised(tmp_path: Path):
    made: list[Supervised] = []

    def make(children: dict[str, str], **policy: float) -> Supervised:
        made.append(Supervised(tmp_path, children, **policy))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_child_that_dies_is_restarted_alone_and_the_restart_is_logged(
        tmp_path: Path, supervised) -> None:
    """Killed by a signal, or exiting even with status 0: started again; its sibling untouched."""
    once = (f"import pathlib, sys, time; p = pathlib.Path({str(tmp_path / 'ran')!r})\n"
            "if not p.exists(): p.touch(); sys.exit(0)\ntime.sleep(120)")
    s = supervised({"victim": SLEEP, "sibling": SLEEP, "once": once}, initial_s=0.05)
    s.wait_for(r"once \(pid \d+\) exited with status 0 after [\d.]+ s; restarting it in")
    s.wait_for(r"started once", count=2)
    s.wait_for(r"started sibling")
    [victim] = s.pids("victim")
    [sibling] = s.pids("sibling")
    os.kill(victim, signal.SIGKILL)
    s.wait_for(rf"victim \(pid {victim}\) killed by SIGKILL after [\d.]+ s; "
               r"restarting it in [\d.]+ s \(restart 1 in a row\)")
    s.wait_for(r"started victim", count=2)
    assert s.pids("victim")[1] != victim and not _gone(s.pids("victim")[1])
    assert s.pids("sibling") == [sibling] and not _gone(sibling)
    assert s.proc.poll() is None
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0


@pytest.mark.parametrize(("code", "status", "said"), [
    (EXIT_3, 3, "exited with status 3"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 1, "killed by SIGKILL"),
])
def test_fast_crashes_in_a_row_end_the_supervisor(
        supervised, code: str, status: int, said: str) -> None:
    s = supervised({"crasher": code, "sibling": SLEEP}, initial_s=0.01, fast_exits=3)
    assert s.proc.wait(timeout=30) == status
    log = s.log()
    assert re.search(rf"ERROR crasher keeps exiting at start: it {said} after [\d.]+ s, its 3rd "
                     r"exit in a row within 30 s of starting; giving up and stopping the rest "
                     r"\(the crasher's own log lines above say why it exits\)", log), log
    assert len(s.pids("crasher")) == 3
    assert all(_gone(pid) for pid in s.pids("sibling") + s.pids("crasher"))


def test_a_child_whose_configuration_cannot_run_ends_the_supervisor_at_once(supervised) -> None:
    """Status 2 (`flywheel serve` or `worker` saying its engine cannot run) is not retried."""
    s = supervised({"misconfigured": "import sys; sys.exit(2)", "sibling": SLEEP},
                   initial_s=0.01, fast_exits=5)
    assert s.proc.wait(timeout=30) == 2
    log = s.log()
    assert re.search(r"ERROR misconfigured exited with status 2 after [\d.]+ s: its configuration "
                     r"cannot run", log), log
    assert len(s.pids("misconfigured")) == 1
    assert all(_gone(pid) for pid in s.pids("sibling") + s.pids("misconfigured"))


def test_a_steady_run_between_crashes_keeps_the_supervisor_going(supervised) -> None:
    """Only exits in a row within fast_s of the start count; one longer run starts over."""
    s = supervised({"slow_crasher": "import sys, time; time.sleep(0.3); sys.exit(3)"},
                   initial_s=0.01, fast_s=0.2, fast_exits=2)
    s.wait_for(r"started slow_crasher", count=4)
    assert s.proc.poll() is None
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0


def test_sigterm_stops_without_restarting(supervised) -> None:
    """Neither the child that SIGTERM stops nor the one waiting out its backoff starts again."""
    s = supervised({"sleeper": SLEEP, "crasher": EXIT_3}, initial_s=60)
    s.wait_for(r"crasher \(pid \d+\) exited with status 3 .* restarting it in")
    [sleeper] = s.pids("sleeper")
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0
    assert len(s.pids("sleeper")) == 1 and len(s.pids("crasher")) == 1
    assert "WARNING sleeper" not in s.log() and _gone(sleeper)  # no exit noted, no restart
    assert "stopped sleeper, crasher" in s.log()


def test_stop_does_not_restart(supervised) -> None:
    """stop() from another thread while wait() runs: the children it SIGTERMs stay down."""
    s = supervised({"a": SLEEP, "b": SLEEP}, initial_s=0.01)
    s.wait_for(r"started b")
    s.stop_file.touch()
    assert s.proc.wait(timeout=30) == 0
    assert len(s.pids("a")) == 1 and len(s.pids("b")) == 1
    assert "restarting" not in s.log()


def test_backoff_doubles_up_to_its_cap(supervised) -> None:
    """The logged delays double to the cap, less at most the jitter, and are waited out."""
    s = supervised({"crasher": EXIT_3}, initial_s=0.1, max_s=0.4, fast_exits=100)
    lines = s.wait_for(r"([\d.]+) WARNING crasher .* restarting it in ([\d.]+) s "
                       r"\(restart (\d+) in a row\)", count=5, timeout=60)
    starts = [float(m.group(1)) for m in
              s.wait_for(r"([\d.]+) INFO started crasher", count=6, timeout=60)]
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0
    delays = [float(m.group(2)) for m in lines]
    assert [int(m.group(3)) for m in lines] == [1, 2, 3, 4, 5]
    for delay, ceiling in zip(delays, [0.1, 0.2, 0.4, 0.4, 0.4], strict=True):
        assert ceiling * 0.75 - 1e-3 <= delay <= ceiling + 1e-3, delays
    for exited, delay, started in zip([float(m.group(1)) for m in lines], delays, starts[1:],
                                      strict=True):
        assert started - exited >= delay - 5e-3, (delays, starts)


def test_backoff_starts_over_after_a_steady_run(supervised) -> None:
    s = supervised({"steady": "import sys, time; time.sleep(0.3); sys.exit(3)"},
                   initial_s=0.01, steady_s=0.2, fast_exits=100)
    lines = s.wait_for(r"steady .* \(restart (\d+) in a row\)", count=3)
    assert [m.group(1) for m in lines] == ["1", "1", "1"]


def test_restart_policy_delays() -> None:
    policy = RestartPolicy(initial_s=1, max_s=30, jitter=0.25)
    rng = random.Random(0)
    for restart, ceiling in enumerate([1, 2, 4, 8, 16, 30, 30], start=1):
        delays = [policy.delay(restart, rng) for _ in range(200)]
        assert all(0.75 * ceiling <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > 0.1 * ceiling  # jittered
    assert policy.delay(10_000, rng) <= 30
    assert RestartPolicy(jitter=0).delay(3, rng) == 4


def test_exit_statuses_in_words() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(2) == "exited with status 2"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGTERM) == "killed by SIGTERM"


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
        from flywheel.supervisor import DataDirLock, RestartPolicy, describe_exit
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
        from flywheel.supervisor import DataDirLock, RestartPolicy, describe_exit
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
