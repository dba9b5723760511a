"""The transformers engine's core in an engine process of its own (``engine_core.py``): the API
side of its two pipes.

The engine (``transformers_engine.py``) keeps what is cheap and per request: validation,
tokenisation (``PromptEncoder``, with the tokenizer the engine process loaded and sent) and the
streams; this side never imports torch (about 240 MiB per replica), nor any module that does. It
sends commands down one pipe; one reader thread takes the engine process's ``step`` messages
(every row's output of one decode step) and hands them to the requests' event loops through
``bridge.Mailbox``, one wake-up per loop per step, as the in-process decode thread does. vLLM
splits ``AsyncLLM`` and ``EngineCoreProc`` the same way.

If the engine process dies, every pending request fails with ``EngineError``, ``stats()`` says
``degraded`` (``/readyz`` answers 503) and the server exits 1 (``core_death.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from server.engines.base import EngineError, EngineStats, SamplingParams, SwapError
from server.engines.bridge import Mailbox
from server.engines.core_death import watch_engine_core
from server.engines.core_protocol import (
    CoreConfig,
    CoreInfo,
    CoreStats,
    Row,
    engine_stats,
    row_delta,
)
from server.engines.core_transport import LoadKind, SwitchKind, load_failed
from server.engines.request import DeltaOrError, Request

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 900.0  # loading a large model from a slow disk; a dead process fails at once
STOP_TIMEOUT_S = 30.0  # for the engine process to abort what is left and exit
ROOT = Path(__file__).resolve().parents[2]  # the checkout holding ``server``


def spawn_core(config: CoreConfig) -> tuple[subprocess.Popen[bytes], Connection, Connection]:
    """Start the engine process on two fresh pipes and send it ``config``.

    A plain ``python -c`` rather than ``multiprocessing``'s spawn, which re-runs the parent's
    main module in the child (every script that builds an engine would need a main guard). The
    engine process's stdout and stderr are the server's.
    """
    commands_in, commands_out = os.pipe()
    events_in, events_out = os.pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    code = "from server.engines.engine_core import main; main()"
    try:
        process = subprocess.Popen([sys.executable, "-c", code, str(commands_in), str(events_out)],
                                   pass_fds=(commands_in, events_out), env=env)
    except BaseException:
        for fd in (commands_out, events_in):
            os.close(fd)
        raise
    finally:
        os.close(commands_in)  # only the child's copies stay open: its death reads as EOF here
        os.close(events_out)
    commands = Connection(commands_out, readable=False)
    commands.send(config)
    return process, commands, Connection(events_in, writable=False)


@dataclass
class _Pending:
    request: Request
    unfinished: int  # choices without their final delta yet


class ProcessCore:
    """``core_transport.CoreTransport`` over a spawned engine process."""

    def __init__(self, config: CoreConfig) -> None:
        """Start the engine process and wait until it has loaded the model (as the in-process
        core loads it); ``EngineError`` when it cannot."""
        self._process, self._commands, self._events = spawn_core(config)
        try:
            self.info = self._await_ready(config.model_path)
        except BaseException:
            self._process.kill()
            self._process.wait()
            raise
        version = config.policy_version
        self._stats = CoreStats(versions=(version,), active=version,
                                requests_by_version=((version, 0),))
        self._send_lock = threading.Lock()
        self._keys = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._changes: dict[int, Future[None]] = {}
        self._mailboxes: dict[asyncio.AbstractEventLoop, Mailbox[DeltaOrError]] = {}
        self._submitted = 0
        self._stopping = False
        self._gone = False  # the reader has ended: nothing more will come from the process
        self._dead: str | None = None  # why the engine process is gone (the server must exit)
        self._watchdog: asyncio.Task[None] | None = None
        self._reader = threading.Thread(target=self._read, name="flywheel-core-reader",
                                        daemon=True)
        self._reader.start()

    def _await_ready(self, model_path: str) -> CoreInfo:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._events.poll(0.5):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise EngineError(f"the engine process did not load {model_path} "
                                  f"(exit code {self._process.returncode})")
        try:
            message = self._events.recv()
        except (EOFError, OSError) as exc:
            raise EngineError(f"the engine process exited while loading {model_path}") from exc
        if message[0] != "ready":
            raise EngineError(f"the engine process could not load {model_path}: {message[1]}")
        return message[1]

    @property
    def version(self) -> str:
        return self._stats.active

    @property
    def canary_version(self) -> str | None:
        return self._stats.canary

    @property
    def model(self) -> Any:
        raise AttributeError("the model lives in the engine process")

    @property
    def canary_model(self) -> Any:
        raise AttributeError("the model lives in the engine process")

    @property
    def pid(self) -> int:
        """The engine process's pid."""
        return self._process.pid

    def refusal(self) -> str | None:
        if self._dead is not None:
            return f"The engine is not serving: {self._dead}."
        return "The engine is shutting down." if self._gone else None

    async def start(self, died: Callable[[str], None]) -> None:
        """Watch the engine process: its death ends this server (``core_death``)."""
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(watch_engine_core(lambda: self._dead, died))

    def busy(self) -> bool:
        return not self._gone and bool(self._pending)

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._stopping = True
        self._send(("stop",))
        await asyncio.to_thread(self._join)

    def _join(self) -> None:
        self._reader.join(STOP_TIMEOUT_S)
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("the engine process did not stop; killing it")
            self._process.kill()
            self._process.wait()
        self._commands.close()
        self._events.close()

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, max_new: int,
               canary: bool, tenant: str = "") -> Request:
        """The request goes by a key of this side's (``request_id`` stays with the engine);
        ``tenant`` travels with it, for the scheduler's fair share."""
        key = next(self._keys)
        request = Request(str(key), prompt, params, max_new, asyncio.get_running_loop(),
                          canary=canary, tenant=tenant)
        self._pending[key] = _Pending(request, params.n)
        if self._gone:  # checked after registering: ``_end`` fails what it finds registered
            self._pending.pop(key, None)
            raise EngineError(f"The engine is not serving: {self._dead or 'stopped'}.")
        self._submitted += 1
        self._send(("submit", key, prompt, params, max_new, canary, tenant))
        return request

    def cancel(self, request: Request) -> None:
        key = int(request.id)
        self._pending.pop(key, None)
        self._send(("cancel", key))

    async def load(self, kind: LoadKind, path: str, version: str,
                   sha256: str | None = None) -> None:
        try:
            await self._change("load", kind, path, version, sha256)
        except SwapError as exc:
            raise load_failed(path, version, exc) from exc

    async def switch(self, kind: SwitchKind) -> None:
        await self._change("change", kind)

    async def _change(self, command: str, *args: str | None) -> None:
        """Send a weight change; returns once the engine process applied it (``SwapError`` when
        it could not: it keeps serving what it served)."""
        key = next(self._keys)
        done: Future[None] = Future()
        self._changes[key] = done
        if self._gone:
            self._changes.pop(key, None)
            raise SwapError(f"the engine is not serving: {self._dead or 'stopped'}")
        self._send((command, key, *args))
        await asyncio.wrap_future(done)

    def stats(self) -> EngineStats:
        s = self._stats
        in_pipe = max(0, self._submitted - s.received)  # submits the core has not read yet
        return engine_stats(s, in_pipe, engine_process=self._process.pid, degraded=self._dead,
                            dead=self._dead)

    # -- the reader thread ----------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        # OSError: the engine process is gone (the reader says so)
        with self._send_lock, contextlib.suppress(OSError):
            self._commands.send(message)

    def _read(self) -> None:
        try:
            while True:
                message = self._events.recv()
                if message[0] == "step":
                    self._stats = message[2]  # first: ``stats()`` is current when a stream ends
                    self._deliver(message[1])
                    self._ack(message[3])
                elif message[0] == "acks":
                    self._stats = message[2]
                    self._ack(message[1])
                elif message[0] == "stopped":
                    break
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("the engine process's events could not be read")
        finally:
            self._end()

    def _deliver(self, rows: list[Row]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, DeltaOrError]]] = {}
        for row in rows:
            key = row[0]
            pending = self._pending.get(key)
            if pending is None:  # cancelled meanwhile
                continue
            item: DeltaOrError
            if len(row) == 2:
                item = EngineError(row[1])
                self._pending.pop(key, None)
            else:
                item = row_delta(row)
                if item.finish_reason is not None:
                    pending.unfinished -= 1
                    if not pending.unfinished:
                        self._pending.pop(key, None)
            request = pending.request
            by_loop.setdefault(request.loop, []).append((request.inbox, item))
        for loop, items in by_loop.items():
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                mailbox = self._mailboxes[loop] = Mailbox(loop)
            if not mailbox.post(items):  # the loop is closed: nobody is listening any more
                del self._mailboxes[loop]
                for key, pending in list(self._pending.items()):
                    if pending.request.loop is loop:
                        self._pending.pop(key, None)
                        self._send(("cancel", key))

    def _ack(self, acks: list[tuple[int, str | None]]) -> None:
        for key, error in acks:
            done = self._changes.pop(key, None)
            if done is None:
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(SwapError(error))

    def _end(self) -> None:
        """Nothing more comes from the engine process: fail whatever still waits for it."""
        if not self._stopping:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5.0)
            self._dead = f"the engine process died (exit code {self._process.returncode})"
            logger.critical("%s", self._dead)
        self._gone = True  # before the snapshot below: see ``_stream`` and ``_change``
        message = self._dead or "The engine stopped before the request finished."
        failed = [(key, message) for key in list(self._pending)]
        self._deliver(failed)
        for key in list(self._changes):
            self._ack([(key, f"the engine is not serving: {self._dead or 'stopped'}")])
