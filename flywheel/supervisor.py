"""Child processes of `flywheel up`: start them, restart them when they die, stop them all
however `up` ends.

Also the two start-up checks that name who is in the way: the data dir's lock and the port.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 30.0
DEATH_SIGNAL = signal.SIGTERM  # the children's own clean stop, as after Ctrl-C
LOCK_NAME = "up.lock"
# A child's exit status for "this configuration cannot run" (`flywheel serve` without its
# engine, `flywheel worker` without its rollout engine): restarting it would only say it again.
CANNOT_RUN = 2

# Run as `python -I -S -c _TRAMPOLINE <parent pid> <signal> argv...`: ask the kernel to send us
# <signal> when our parent dies (prctl(2) PR_SET_PDEATHSIG = 1, kept across execve), give up if
# the parent already died before that (we were re-parented), then become argv. Doing this in a
# fresh interpreter rather than in Popen's preexec_fn keeps fork safe while `up` has threads.
_TRAMPOLINE = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[2]), 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):  # Python ignores these; exec would keep that
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
os.execvp(sys.argv[3], sys.argv[3:])
"""


def with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """argv wrapped so that on Linux the process gets DEATH_SIGNAL when this one dies.

    The kernel sends it when the *thread* that spawned the child exits: spawn from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()),
            str(int(DEATH_SIGNAL)), *argv]


@dataclass(frozen=True)
class RestartPolicy:
    """When `up` restarts a child that exited, and when it gives up instead.

    The n-th restart in a row waits ``initial_s * 2**(n-1)``, at most ``max_s``, less a random
    ``jitter`` share of it; a child that ran ``steady_s`` before exiting starts over at
    ``initial_s``. ``fast_exits`` exits in a row, each within ``fast_s`` of its start, end `up`.
    """

    initial_s: float = 1.0
    max_s: float = 30.0
    jitter: float = 0.25
    steady_s: float = 60.0
    fast_s: float = 30.0  # `flywheel worker` takes 7-10 s on 2 cores to import torch and fail
    fast_exits: int = 5

    def delay(self, restart: int, rng: random.Random) -> float:
        """Seconds to wait before restart number ``restart`` (1, 2, ...) in a row."""
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(restart - 1, 62))
        return ceiling * (1.0 - self.jitter * rng.random())


@dataclass
class _Child:
    """One supervised command: its current process and its run of restarts."""

    argv: list[str]
    process: subprocess.Popen[bytes]
    started: float  # time.monotonic() of the current process's start
    restarts: int = 0  # in a row, since it last ran steadily: the backoff's exponent
    fast_exits: int = 0  # in a row, each within RestartPolicy.fast_s of its start
    restart_at: float | None = None  # while down: when to start it again


def describe_exit(code: int) -> str:
    """``Popen.returncode`` in words: "exited with status 1", "killed by SIGKILL"."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


class Supervisor:
    """Children run in their own sessions: only we get Ctrl-C or a hang-up, and we pass it on once.

    A child that exits while we are not stopping is started again after a backoff (RestartPolicy);
    the others keep running. Only one that keeps exiting right after its start, or one that
    exits with `CANNOT_RUN`, ends `wait()`.
    SIGHUP (the terminal closed) stops like SIGTERM. A second SIGINT or SIGTERM kills the children;
    a second SIGHUP does not, since a closing terminal and its shell each send one.
    """

    def __init__(self, env: dict[str, str], keep_fds: Sequence[int] = (),
                 policy: RestartPolicy | None = None, poll_s: float = 0.2) -> None:
        self.env = env
        self.keep_fds = tuple(keep_fds)
        self.policy = policy or RestartPolicy()
        self.poll_s = poll_s
        self._children: dict[str, _Child] = {}
        self._stopping = False
        self._lock = threading.Lock()  # a start and stop()'s SIGTERMs never interleave
        self._rng = random.Random()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def children(self) -> dict[str, subprocess.Popen[bytes]]:
        """Each child's current (or last) process, by name."""
        return {name: child.process for name, child in self._children.items()}

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stopping:
            if signum != signal.SIGHUP:
                log.warning("second signal: killing children")
                for child in self.children.values():
                    if child.poll() is None:
                        child.kill()
            return
        log.info("%s received: stopping", signal.Signals(signum).name)
        self._stopping = True

    def _popen(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` so that it also dies when we die, whatever kills us (even SIGKILL)."""
        process = subprocess.Popen(
            with_parent_death_signal(argv), env=self.env, start_new_session=True,
            pass_fds=self.keep_fds)
        log.info("started %s (pid %d)", name, process.pid)
        return process

    def spawn(self, name: str, argv: list[str]) -> None:
        """Start a child; call from the main thread (see with_parent_death_signal)."""
        self._children[name] = _Child(list(argv), self._popen(name, argv), time.monotonic())

    def wait(self, also: Sequence[Callable[[], None]] = ()) -> int:
        """Restart children that exit until a signal arrives (0) or one keeps exiting at once
        (its status, or 1 if it was killed: the status for `up`). Call from the main thread.
        ``also``: called at every poll, from the main thread too (what keeps a process of its
        own running, as the embedded Redis does with ``restart_if_exited``)."""
        while not self._stopping:
            for name, child in self._children.items():
                code = self._step(name, child)
                if code is not None:
                    return code
            for keep in also if not self._stopping else ():
                keep()
            time.sleep(self.poll_s)
        return 0

    def _step(self, name: str, child: _Child) -> int | None:
        """Start ``child`` if its backoff is over, or note its exit; a status once we give up."""
        if child.restart_at is not None:
            if time.monotonic() >= child.restart_at:
                self._restart(name, child)
            return None
        code = child.process.poll()
        if code is None or self._stopping:
            return None
        return self._exited(name, child, code)

    def _exited(self, name: str, child: _Child, code: int) -> int | None:
        """Schedule the restart of a child that exited with ``code``, or give up on it."""
        ran = time.monotonic() - child.started
        if code == CANNOT_RUN:
            log.error("%s %s after %.1f s: its configuration cannot run (its own log lines above "
                      "say why); not restarting it, stopping the rest", name, describe_exit(code),
                      ran)
            return code
        child.fast_exits = child.fast_exits + 1 if ran < self.policy.fast_s else 0
        if child.fast_exits >= self.policy.fast_exits:
            log.error("%s keeps exiting at start: it %s after %.1f s, its %s exit in a row "
                      "within %g s of starting; giving up and stopping the rest (the %s's own "
                      "log lines above say why it exits)", name, describe_exit(code), ran,
                      _ordinal(child.fast_exits), self.policy.fast_s, name)
            return code if code > 0 else 1
        child.restarts = 1 if ran >= self.policy.steady_s else child.restarts + 1
        delay = self.policy.delay(child.restarts, self._rng)
        child.restart_at = time.monotonic() + delay
        log.warning("%s (pid %d) %s after %.1f s; restarting it in %.3g s (restart %d in a row)",
                    name, child.process.pid, describe_exit(code), ran, delay, child.restarts)
        return None

    def _restart(self, name: str, child: _Child) -> None:
        with self._lock:
            if self._stopping:
                return
            child.process = self._popen(name, child.argv)
            child.started = time.monotonic()
            child.restart_at = None

    def stop(self) -> None:
        """SIGTERM every child (each finishes its current step), then wait; SIGKILL stragglers."""
        with self._lock:
            self._stopping = True
            for child in self.children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for name, child in self.children.items():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", name)
                child.kill()
                child.wait()
        log.info("stopped %s", ", ".join(self._children) or "nothing")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class InUseError(RuntimeError):
    """The data dir or the port belongs to another process; the message names it."""


class DataDirLock:
    """An exclusive flock(2) on ``<data dir>/up.lock``, which holds the PID of its `up`.

    The kernel drops the lock when every holder is gone, however it died, so a stale file never
    blocks a start. Children given ``fileno()`` (Supervisor's ``keep_fds``) hold it as well: a
    new `up` waits for the last worker of the old one, not only for the old `up`.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def fileno(self) -> int:
        if self._fd is None:
            raise RuntimeError("the data dir lock is not held")
        return self._fd

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InUseError(f"the data dir {self.path.parent} is in use by "
                             f"{_describe(self._holders())}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # the file stays: unlinking it would race with the next locker
            self._fd = None

    def _holders(self) -> list[int]:
        target = str(self.path.resolve())
        holders = _pids_with_fd(lambda link: link == target)
        try:
            recorded = int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return holders
        if _alive(recorded) and (recorded in holders or not holders):
            holders = [recorded] + [p for p in holders if p != recorded]
        return holders


def check_port_free(host: str, port: int) -> None:
    """Raise InUseError naming the listener when ``host:port`` cannot be bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        return  # the server reports an unknown host itself
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return
            raise InUseError(f"port {port} on {host} is in use by "
                             f"{_describe(_pids_listening_on(port))}") from None


def _pids_listening_on(port: int) -> list[int]:
    """Processes with a listening TCP socket on ``port`` (Linux /proc; [] elsewhere)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st ... inode (proc_net_tcp.rst); 0A is LISTEN
            listening = len(fields) > 9 and fields[3] == "0A"
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    return _pids_with_fd(inodes.__contains__) if inodes else []


def _pids_with_fd(matches: Callable[[str], bool]) -> list[int]:
    """PIDs (other than ours) with an open fd whose /proc link target ``matches``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid == os.getpid():
            continue
        try:
            if any(matches(os.readlink(fd)) for fd in (proc / "fd").iterdir()):
                found.append(pid)
        except OSError:  # another user's process, or gone meanwhile
            continue
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command_line(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return text if len(text) <= 200 else text[:197] + "..."


def _describe(pids: Sequence[int]) -> str:
    if not pids:
        return "a process this user cannot see (try `ss -ltnp` or `lsof` as root)"
    described = []
    for pid in pids[:4]:
        command = _command_line(pid)
        described.append(f"pid {pid} ({command})" if command else f"pid {pid}")
    more = f" and {len(pids) - 4} more" if len(pids) > 4 else ""
    return ", ".join(described) + more
