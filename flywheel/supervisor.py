"""Child processes of `flywheel up`: start them, watch them, stop them all on Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from types import FrameType

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 30.0


class Supervisor:
    """Children run in their own sessions: only we get the Ctrl-C, and we pass it on once."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._stopping = False
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stopping:
            log.warning("second signal: killing children")
            for child in self.children.values():
                if child.poll() is None:
                    child.kill()
            return
        log.info("%s received: stopping", signal.Signals(signum).name)
        self._stopping = True

    def spawn(self, name: str, argv: list[str]) -> None:
        self.children[name] = subprocess.Popen(argv, env=self.env, start_new_session=True)
        log.info("started %s (pid %d)", name, self.children[name].pid)

    def wait(self) -> int:
        """Block until a signal arrives or a child exits; returns the exit status for `up`."""
        while not self._stopping:
            for name, child in self.children.items():
                code = child.poll()
                if code is not None:
                    log.error("%s exited with status %d; stopping the rest", name, code)
                    return code or 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        """SIGTERM every child (each finishes its current step), then wait; SIGKILL stragglers."""
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
        log.info("all stopped")
