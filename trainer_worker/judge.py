"""The judge: canary decisions, releases of waiting candidates, live pooling and rollback, on a
clock of their own instead of between training cycles.

A thread of the worker calls `Promotion.tick` every `canary.judge_seconds` (1 s), whether or not
a training cycle runs, so a canary is decided about that long after its evidence suffices (a
cycle takes a minute on a CPU, hours on a GPU; the judge used to wait for it). Only the leader
judges: before each tick the judge checks the leader lock, which its own thread renews
(trainer_worker/leader.py), so a long cycle never keeps it from being renewed, and a worker that
lost it stops judging. A tick that overlaps the loss of the lock cannot do harm either: every
change it makes is a conditional update in SQL that applies only while the state it was decided
on still holds (feedback_store/policy_versions.py, `Transition`), so two judges, or a judge and
an operator, never both apply a change to the same state.

The judge shares the worker's Store (an SQLAlchemy engine is thread-safe and every store call
opens its own session), Publisher (a redis-py client is thread-safe: a connection pool) and
Promotion: only the judge calls `tick`, whose pooling state it alone touches; the worker's
thread calls `release` after a cycle, which keeps no state. An unexpected error in one tick is
logged with its traceback and counted (`errors`, which the worker logs and writes into each
training run's metrics as `worker/judge_errors`); the next tick runs as usual.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from feedback_store.errors import StoreUnavailableError
from trainer_worker.promotion import Promotion

log = logging.getLogger(__name__)


class Lock(Protocol):
    @property
    def held(self) -> bool: ...


class Judge:
    """Calls `promotion.tick` every `interval` seconds in a thread while `lock` is held, until
    `stopping` is set."""

    def __init__(self, promotion: Promotion, lock: Lock, stopping: threading.Event,
                 interval: float) -> None:
        self.promotion, self.lock, self.stopping = promotion, lock, stopping
        self.interval = interval
        self.ticks = 0  # ticks run while leading
        self.decisions = 0  # ticks that changed something (promoted, rejected, released, ...)
        self.errors = 0  # ticks that failed unexpectedly (logged with their traceback)
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        self._thread = threading.Thread(target=self._run, name="judge", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current tick (its SQL calls are short; a rater review may take
        seconds on a CPU)."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("judge still busy after %.0f s; leaving it behind", timeout)

    def _run(self) -> None:
        log.info("judge: every %.1f s while this worker leads", self.interval)
        while not self.stopping.is_set():
            self.tick()
            self.stopping.wait(self.interval)
        log.info("judge stopped after %d tick(s), %d change(s), %d failed tick(s)",
                 self.ticks, self.decisions, self.errors)

    def tick(self) -> str | None:
        """One tick, only while this worker leads; returns what `Promotion.tick` did. Never
        raises an Exception: a failure is logged, counted, and the next tick runs as usual."""
        if not self.lock.held:
            return None
        try:
            outcome = self.promotion.tick()
        except StoreUnavailableError as exc:
            log.warning("judge: database unavailable: %s", exc.message)
            return None
        except Exception as exc:
            self.errors += 1
            log.error("judge tick failed (%d failed tick(s) so far); the judge carries on",
                      self.errors, exc_info=exc)
            return None
        self.ticks += 1
        if outcome is not None:
            self.decisions += 1
        return outcome
