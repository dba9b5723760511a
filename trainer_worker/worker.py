"""`flywheel worker`: wait for feedback, lead, train, publish; stop cleanly on SIGTERM.

Two loops while this worker leads: the training loop here (queue a cycle once enough feedback
came, run it, release its candidate) and the judge (trainer_worker/judge.py), a thread that
decides the canary, releases waiting candidates, pools live thumbs and rolls back every
`canary.judge_seconds`, whether or not a cycle runs. Cycles run during a canary too: a candidate
that passes the gate then waits, and when the canary ends the judge puts the newest waiting one
on canary and retires the older ones (trainer_worker/promotion.py).

An unexpected error in one step of either loop is logged with its traceback and counted
(`step_errors`, `judge.errors`: in the log line, and in each training run's metrics as
`worker/step_errors` and `worker/judge_errors`); the loop carries on.

The first SIGTERM (or Ctrl-C) stops taking work and abandons the current step at its next check,
publishing nothing, and stops the judge after its current tick; a second one exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from types import FrameType
from typing import TYPE_CHECKING

import redis

from feedback_store import Store
from feedback_store.errors import StoreError, StoreUnavailableError
from flywheel import logs
from flywheel.serving_plan import Publisher, RedisKeys, record_base_policy
from flywheel.settings import Settings
from trainer_worker.cycle import CycleContext, prune, remove_temporaries, run_cycle
from trainer_worker.judge import Judge
from trainer_worker.leader import LeaderLock, LocalLock
from trainer_worker.promotion import Promotion
from trainer_worker.stopping import TrainingInterrupted

if TYPE_CHECKING:
    from trainer_worker.ppo.rollout_engines import KeptRollouts

log = logging.getLogger(__name__)

DB_RETRY_SECONDS = 2.0


def resolve_device(setting: str) -> str:
    """"auto" is CUDA when there is one; on CPU, leave a core to the server next door."""
    import torch

    device = setting if setting != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Measured: on 2 shared cores PPO ran 6-15x slower with 2 torch threads than with 1.
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    return device


class Worker:
    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store(settings.database_url)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.keys = RedisKeys(settings.redis_namespace)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                          socket_timeout=5) if settings.redis_url else None
        self.lock: LeaderLock | LocalLock = (
            LeaderLock(self.redis, self.keys.trainer_lock, self.id,
                       settings.train.lock_ttl_seconds)
            if self.redis is not None else LocalLock()
        )
        self.publisher = Publisher(self.redis, self.keys)
        self.promotion = Promotion(settings, self.store, self.publisher)
        self.stopping = threading.Event()
        self.judge = Judge(self.promotion, self.lock, self.stopping,
                           settings.canary.judge_seconds)
        self.step_errors = 0  # steps that failed unexpectedly (logged with their traceback)
        self._was_leader = False
        # vLLM rollouts: one engine start for all cycles (made at the first, torch imported then)
        self.rollouts: KeptRollouts | None = None

    # --- signals -------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping.is_set():
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("%s: finishing or abandoning the current step, then stopping",
                 signal.Signals(signum).name)
        self.stopping.set()

    def should_stop(self) -> bool:
        return self.stopping.is_set() or self.lock.lost.is_set()

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        self._wait_for_database()
        self.store.upgrade()
        record_base_policy(self.settings, self.store)
        device = resolve_device(self.settings.train.device)
        log.info("worker %s on %s; training after %d new feedback events", self.id, device,
                 self.settings.train.min_new_feedback)
        self.promotion.device = device
        self.judge.start()
        try:
            while not self.stopping.is_set():
                try:
                    if not self.step(device):
                        self.stopping.wait(self.settings.train.poll_seconds)
                except StoreUnavailableError as exc:
                    log.warning("database unavailable: %s", exc.message)
                    self.stopping.wait(DB_RETRY_SECONDS)
                except Exception as exc:
                    self.step_errors += 1
                    log.error("worker step failed (%d failed step(s), %d failed judge tick(s) so "
                              "far); carrying on", self.step_errors, self.judge.errors,
                              exc_info=exc)
                    self._was_leader = False  # next step: fail what it left running, clean up
                    self.stopping.wait(self.settings.train.poll_seconds)
        finally:
            self.judge.stop()
            if self.rollouts is not None:
                self.rollouts.close()
            self.lock.release()
            self.store.close()
        log.info("worker stopped")
        return 0

    def _wait_for_database(self) -> None:
        while not self.stopping.is_set():
            try:
                self.store.ping()
                return
            except StoreUnavailableError:
                log.info("waiting for the database ...")
                self.stopping.wait(DB_RETRY_SECONDS)

    def step(self, device: str) -> bool:
        """Lead, then run one queued cycle or queue one; False when there was nothing to do.
        A canary does not hold cycles back (the judge decides it meanwhile)."""
        if not self.lock.acquire():
            self._was_leader = False
            return False
        if not self._was_leader:
            failed = self.store.fail_stale_runs("abandoned: its worker stopped or died")
            if failed:
                log.warning("marked %d abandoned run(s) failed", failed)
            remove_temporaries(self.settings)
            self._was_leader = True
        self.promotion.device = device
        run = self.store.claim_next_run(self.id)
        if run is None:
            new = self.store.new_feedback_count()
            if new >= self.settings.train.min_new_feedback and not self.store.has_open_run():
                log.info("%d new feedback events: queueing a training cycle", new)
                self.store.create_training_run(trigger="feedback")
                return True
            return False
        self.execute(run, device)
        return True

    def execute(self, run: dict, device: str) -> None:
        # Its log lines name the version it trains (flywheel/logs.py).
        logs.set_policy(f"{self.store.next_policy_id()} (run {run['id']})")
        try:
            self._execute(run, device)
        finally:
            logs.set_policy(None)

    def _execute(self, run: dict, device: str) -> None:
        run_id = int(run["id"])
        watermark = self.store.feedback_watermark()
        if self.rollouts is None:
            from trainer_worker.ppo.rollout_engines import KeptRollouts

            self.rollouts = KeptRollouts()
        ctx = CycleContext(settings=self.settings, store=self.store, device=device,
                           should_stop=self.should_stop, rollouts=self.rollouts)
        log.info("training run %d started", run_id)
        try:
            result = run_cycle(ctx, run_id)
        except BaseException as exc:
            reason = _describe(exc)
            if reason.startswith("interrupted") or isinstance(exc, KeyboardInterrupt):
                # A stop asked for (Ctrl-C, SIGTERM, a lost lock) is no failure: `cancelled`,
                # and its feedback stays new for the next run.
                log.info("training run %d cancelled: %s", run_id, reason)
                self._mark_failed(run_id, reason, None, status="cancelled")
            else:
                log.error("training run %d failed: %s", run_id, reason, exc_info=exc)
                self._mark_failed(run_id, reason, watermark)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return
        metrics = dict(result.metrics)
        if result.status == "succeeded" and result.policy_id is not None:
            try:  # "waiting" while a canary runs: the judge releases it when the canary ends
                metrics["cycle/release"] = self.promotion.release(result.policy_id)
            except StoreError as exc:  # e.g. the database went away; races raise nothing
                log.warning("%s stays a candidate: %s", result.policy_id, exc)
                metrics["cycle/release"] = f"not released: {exc}"
        metrics["worker/step_errors"] = self.step_errors
        metrics["worker/judge_errors"] = self.judge.errors
        self.store.update_training_run(run_id, status=result.status, metrics=metrics,
                                       policy_id=result.policy_id,
                                       reward_model_id=result.reward_model_id,
                                       watermark=watermark)
        log.info("training run %d %s (%s)", run_id, result.status,
                 result.policy_id or result.metrics.get("cycle/skip_reason"))
        try:
            prune(self.settings, self.store)
        except (OSError, StoreError) as exc:
            log.warning("pruning failed: %s", exc)

    def _mark_failed(self, run_id: int, reason: str, watermark: dict | None,
                     status: str = "failed") -> None:
        """Record the failure or cancellation, retrying while the database is away (unless we
        are stopping)."""
        while True:
            try:
                self.store.update_training_run(run_id, status=status, error=reason,
                                               watermark=watermark)
                return
            except StoreUnavailableError:
                if self.stopping.is_set():
                    log.warning("run %d stays 'running'; the next leader marks it failed", run_id)
                    return
                time.sleep(DB_RETRY_SECONDS)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (TrainingInterrupted, InterruptedError)):
        return "interrupted: the worker was stopping or lost the leader lock"
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text[:2000]


def run_worker(settings: Settings) -> int:
    """Entry point of `flywheel worker`; 2 when the configured rollout engine cannot run."""
    from trainer_worker.ppo.rollout_engines import rollout_engine_problem

    if problem := rollout_engine_problem(settings.ppo):
        log.error("flywheel worker: %s", problem)
        return 2
    worker = Worker(settings)
    worker.install_signal_handlers()
    return worker.run()
