"""A server whose event loop stops turning exits, so that its supervisor restarts it.

A replica that hangs (a deadlock, a call that blocks the event loop) keeps its port open and
answers nothing: Docker's restart policy restarts only containers that exit, and a failing
healthcheck only marks them unhealthy. A thread outside the loop asks the loop every
``interval`` seconds to note the time; when the loop has not done so for ``timeout`` seconds,
the thread writes every thread's stack to stderr (what was it stuck on?) and exits the process
with ``EXIT_HUNG``.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_HUNG = 70  # EX_SOFTWARE: an internal error, and not the engine's EXIT_ENGINE_DEAD (1)


def exit_hung(stalled: float) -> None:
    log.critical("the event loop has not turned for %.0f s: exiting %d so that the supervisor "
                 "restarts this server (every thread's stack follows)", stalled, EXIT_HUNG)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(EXIT_HUNG)


class LoopWatchdog:
    """Calls ``on_hang(seconds stalled)`` once ``loop`` has not run a callback for ``timeout``
    seconds (``exit_hung`` by default); checks every ``timeout / 4`` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 on_hang: Callable[[float], None] = exit_hung) -> None:
        self.loop, self.timeout, self.on_hang = loop, timeout, on_hang
        self.interval = timeout / 4
        self._turned = time.monotonic()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)

    def start(self) -> None:
        self._turned = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _beat(self) -> None:
        self._turned = time.monotonic()

    def _watch(self) -> None:
        while not self._stopping.wait(self.interval):
            stalled = time.monotonic() - self._turned
            if stalled > self.timeout:
                self.on_hang(stalled)
                return
            try:
                self.loop.call_soon_threadsafe(self._beat)
            except RuntimeError:  # the loop is closed: nothing left to watch
                return
