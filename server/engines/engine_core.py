"""The engine process: the transformers engine's model and scheduler, away from the API server.

Decoding in the API server's process shares its GIL (and, on a small CPU, its cores) with HTTP,
SSE framing, JSON and SQL; like vLLM's ``EngineCoreProc`` the core runs in a spawned process of
its own. It reads commands from one pipe (a reader thread) and writes events to another: one
``step`` message per scheduler flush with every row's new output, the counts ``stats()`` needs
and the weight changes it has applied. Detokenisation and stop strings stay here, next to the
tokens, so the API process only forwards finished text.

The messages on the two pipes are ``core_protocol.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import torch

from flywheel import logs
from server.engines.core_protocol import Ack, CoreConfig, CoreStats, Row, delta_row
from server.engines.groups import ChangeKind
from server.engines.model_loading import open_scheduler
from server.engines.request import Request
from server.engines.scheduler import Outgoing

logger = logging.getLogger(__name__)


class Core:
    """The model, its scheduler and the two pipes, in the engine process."""

    def __init__(self, config: CoreConfig, events: Connection) -> None:
        self._events = events
        self._send_lock = threading.Lock()
        self._scheduler, self.info, self._weights = open_scheduler(config, deliver=self._deliver)
        self._requests: dict[int, tuple[Request, list[int]]] = {}  # key: request, [unfinished]
        self._received = 0
        self._acks: list[Ack] = []
        self._last: CoreStats | None = None

    @property
    def version(self) -> str:
        return self._scheduler.version

    def serve(self, commands: Connection) -> None:
        """Run the decode thread and obey ``commands`` until ``stop`` or the API process is gone."""
        self._scheduler.start()
        try:
            while True:
                try:
                    command = commands.recv()
                except (EOFError, OSError):  # the API process died: nothing left to serve
                    return
                if command[0] == "stop":
                    return
                self._obey(command)
        finally:
            self._scheduler.stop()  # aborts what is left; its errors go out with a last flush
            self._send(("stopped",))

    def _obey(self, command: tuple[Any, ...]) -> None:
        kind, key = command[0], command[1]
        if kind == "submit":
            _, _, prompt, params, max_new, canary, tenant = command
            loop: Any = None  # no event loop here: the scheduler hands items to ``deliver``
            request = Request(str(key), prompt, params, max_new, loop, canary=canary,
                              tenant=tenant)
            self._requests[key] = (request, [request.params.n])
            self._scheduler.submit(request)
            self._received += 1
        elif kind == "cancel":
            entry = self._requests.pop(key, None)
            if entry is not None:
                self._scheduler.cancel(entry[0])
        elif kind == "load":
            threading.Thread(target=self._load, args=command[1:], name="flywheel-load",
                             daemon=True).start()
        elif kind == "change":
            self._change(key, command[2])
        else:
            logger.error("unknown engine command %r", kind)

    def _load(self, key: int, kind: ChangeKind, path: str, version: str,
              sha256: str | None) -> None:
        """Load and probe weights beside the served ones (own thread: commands keep flowing)."""
        try:
            model = self._weights.load_checked(path, sha256)
        except Exception as exc:
            self._send(("acks", [(key, f"{type(exc).__name__}: {exc}")], self._stats()))
            return
        self._change(key, kind, model, version)

    def _change(self, key: int, kind: ChangeKind, model: Any = None, version: str = "") -> None:
        done = self._scheduler.change(kind, model, version)
        # Resolved on the decode thread between steps; the ack leaves with its next flush.
        done.add_done_callback(lambda future: self._acks.append((key, _failure(future))))

    def _deliver(self, items: list[Outgoing]) -> None:
        """One flush of the scheduler: each row's output, changed counts, applied changes."""
        rows: list[Row] = []
        for request, item in items:
            key = int(request.id)
            if isinstance(item, BaseException):
                rows.append((key, str(item)))
                self._requests.pop(key, None)
                continue
            rows.append(delta_row(key, item))
            if item.finish_reason is not None:
                entry = self._requests.get(key)
                if entry is not None:
                    entry[1][0] -= 1
                    if not entry[1][0]:
                        del self._requests[key]
        stats = self._stats()
        acks, self._acks = self._acks, []
        if rows or acks or stats[:-1] != (self._last or CoreStats())[:-1]:
            self._last = stats
            self._send(("step", rows, stats, acks))

    def _stats(self) -> CoreStats:
        return self._scheduler.counts(self._received)

    def _send(self, message: tuple[Any, ...]) -> None:
        # OSError: the API process is gone (the command reader ends this one)
        with self._send_lock, contextlib.suppress(OSError):
            self._events.send(message)


def _failure(future: Future[None]) -> str | None:
    error = future.exception()
    return None if error is None else str(error)


def run_core(commands: Connection, events: Connection, config: CoreConfig) -> None:
    """Load the model, say ``ready`` (or ``failed``), then serve until told to stop."""
    # Ctrl-C and a supervisor's SIGTERM reach the whole process group; the API process drains its
    # requests first and then stops this one (or this one sees its pipe close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The server's log format (``configure`` passed it down in the environment), named apart.
    logs.configure(logging.getLevelName(config.log_level),
                   os.environ.get("FLYWHEEL_LOG_FORMAT", "text"),
                   process=os.environ.get("FLYWHEEL_PROCESS", "server") + "-engine")
    torch.set_grad_enabled(False)
    try:
        core = Core(config, events)
    except Exception as exc:
        events.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    logs.set_policy(lambda: core.version)
    events.send(("ready", core.info))
    core.serve(commands)


def main() -> None:
    """The engine process: ``argv`` names the inherited pipe ends; the config comes first."""
    commands = Connection(int(sys.argv[1]), writable=False)
    events = Connection(int(sys.argv[2]), readable=False)
    run_core(commands, events, commands.recv())
