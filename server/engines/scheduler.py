"""The decode thread: continuous batching over the model groups of ``groups.py``.

Each loop iteration (1) applies queued weight changes, (2) admits waiting requests up to
``max_batch_size`` sequences (once a few have gathered, see ``_join_due``), taking the keys'
queues in turn and holding each key to its share of the batch (``fair_queue.py``), each to its arm's
group (the active policy, or the canary when it asked for one and one is loaded), then for every
lane (``lanes.py``: the groups whose models share an architecture, usually all) (3) prefills the
joiners and merges them into the running batch, (4) runs one decode step for all rows, in one
forward pass however many groups have rows (``routing.py``), and (5) drops finished and
cancelled rows. A group that lost its role (after a hot swap, a promotion or the end of a canary)
admits nothing and is dropped once its last sequence finishes, so in-flight requests end on the
weights they started with.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from server.engines.base import ChoiceDelta, EngineError
from server.engines.batch import PaddedBatch
from server.engines.bridge import Mailbox
from server.engines.core_protocol import CoreStats
from server.engines.decode_threads import DecodeThreads
from server.engines.fair_queue import BatchShare, FairQueue
from server.engines.groups import Change, ChangeKind, Group, Groups
from server.engines.lanes import Lane, Lanes
from server.engines.request import DeltaOrError, Request
from server.engines.sampling import RowSampler, Sampled
from server.engines.sequence import Sequence

logger = logging.getLogger(__name__)

Outgoing = tuple[Request, DeltaOrError]
Deliver = Callable[[list[Outgoing]], None]  # the engine process: one step's items, no event loop

JOIN_RATIO = 0.25  # join waiting requests once they number a quarter of the running sequences
MAX_JOIN_WAIT_STEPS = 4  # ... or once the oldest has waited this many decode steps


class Scheduler:
    """Owns the models and the decode thread; the engine talks to it from the event loop."""

    def __init__(
        self,
        model: Any,
        version: str,
        tokenizer: Any,
        *,
        eos_token_ids: frozenset[int],
        pad_token_id: int,
        max_batch_size: int,
        stream_interval_s: float,
        threads: DecodeThreads | None = None,
        deliver: Deliver | None = None,
        fair_share: bool = True,
        max_batch_share: float = 1.0,
    ) -> None:
        """``deliver``: where each step's items go instead of their requests' event loops (the
        engine process sends them to the API process); also called, maybe with no items, after
        every iteration, so that it can pass on changed counts. ``fair_share``: waiting requests
        are taken round robin by key, each key held to ``max_batch_share`` of the batch while
        others are active (``fair_queue.py``); off, one FIFO queue and no share."""
        self._groups = Groups(model, version)
        self._lanes = Lanes()
        self._tokenizer = tokenizer
        self._eos = eos_token_ids
        self._pad_id = pad_token_id
        self._max_batch = max_batch_size
        self._interval = stream_interval_s
        self._threads = threads
        self._cond = threading.Condition()
        self._waiting: FairQueue[Request] = FairQueue(fair_share)
        self._share = BatchShare(max_batch_size, max_batch_share if fair_share else 1.0)
        self._changes: list[Change] = []
        self._stopping = False
        self._cancelled = False  # some request was cancelled since the last iteration
        self._thread: threading.Thread | None = None
        self._shared_gen = torch.Generator()
        self._shared_gen.manual_seed(random.SystemRandom().getrandbits(63))
        self._outbox: dict[asyncio.AbstractEventLoop | None, list[Outgoing]] = {}
        self._mailboxes: dict[asyncio.AbstractEventLoop, Mailbox[DeltaOrError]] = {}
        self._deliver = deliver
        self._token_text: dict[int, str] = {}
        self.running_requests = 0
        self.running_sequences = 0
        self.steps = 0
        self.requests_by_version: dict[str, int] = {version: 0}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def version(self) -> str:
        return self._groups.active.version

    @property
    def model(self) -> Any:
        return self._groups.active.model

    @property
    def canary_version(self) -> str | None:
        canary = self._groups.canary
        return canary.version if canary is not None else None

    @property
    def canary_model(self) -> Any:
        canary = self._groups.canary
        return canary.model if canary is not None else None

    def group_versions(self) -> list[str]:
        return self._groups.versions()

    def counts(self, received: int = 0) -> CoreStats:
        """What ``Engine.stats()`` reports (``received``: submits the engine process has read)."""
        return CoreStats(self.running_requests, self.running_sequences, self.waiting, received,
                         tuple(self.group_versions()), self.version, self.canary_version,
                         tuple(self.requests_by_version.items()), self.steps)

    # -- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="flywheel-decode", daemon=True)
            self._thread.start()

    def submit(self, request: Request) -> None:
        with self._cond:
            request.submitted_step = self.steps
            self._share.saw(request.tenant)
            self._waiting.append(request)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """The consumer is gone: its rows go at the next step, a waiting request at once."""
        request.cancelled = True
        with self._cond:
            self._cancelled = True
            self._cond.notify()

    def install(self, model: Any, version: str) -> Future[None]:
        """Queue new active weights; the future resolves once new requests run on them."""
        return self.change("activate", model, version)

    def change(self, kind: ChangeKind, model: Any = None, version: str = "") -> Future[None]:
        """Queue a weight change (``groups.Change``) for the decode thread; the future resolves
        once it is applied, that is once new requests are admitted accordingly. A new model is
        first probed beside the lanes' models (``Lanes.probe``): call this where the model was
        loaded, off the event loop, as the probe is a pass over its weights that would otherwise
        hold up every stream between two steps when its first request joins."""
        probed = None
        if model is not None:
            try:
                probed = self._lanes.probe(model, list(self._groups.all))
            except Exception:  # the decode thread probes when the group is placed, as before
                logger.exception("probing policy %s beside the served ones failed", version)
        change = Change(kind, model, version, probed)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._apply(change)
            else:
                self._changes.append(change)
                self._cond.notify()
        return change.done

    def stop(self) -> None:
        """Abort whatever is still outstanding and join the thread (blocking)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- the decode thread -------------------------------------------------------------------

    def _run(self) -> None:
        if self._threads is not None:
            self._threads.start()  # this thread's OpenMP team (``decode_threads.py``)
        try:
            with torch.inference_mode():
                while self._next_iteration():
                    for group in self._groups.all:
                        if group.joining:
                            self._lanes.place(group)
                    for lane in self._lanes:
                        self._step(lane)
                    self._retire()
                    self._count()
                    if self._deliver is not None:
                        self._flush()  # counts changed by the iteration, maybe with no items
        finally:
            self._abort_all(EngineError("The engine stopped before the request finished."))

    def _next_iteration(self) -> bool:
        """Wait for work, install queued weights and admit requests; False when stopping."""
        with self._cond:
            while not (self._waiting or self._changes or self._stopping
                       or self.running_sequences):
                self._cond.wait()
            if self._stopping:
                return False
            changes, self._changes = self._changes, []
            for change in changes:
                self._apply(change)
            if self._cancelled:  # abandoned requests leave the queue (and ``stats()``) now
                self._cancelled = False
                self._waiting.drop_cancelled()
            self._admit()
        return True

    def _apply(self, change: Change) -> None:
        self._groups.apply(change)
        self._retire()
        self._count()

    def _retire(self) -> None:
        self._groups.retire()
        self._lanes.prune(self._groups.all)

    def _admit(self) -> None:
        if not self._waiting or (self.running_sequences and not self._join_due()):
            return
        free = self._max_batch - self.running_sequences
        held = self._rows_by_tenant()
        limit = self._share.limit(set(held) | set(self._waiting.keys()))

        def allowed(request: Request) -> bool:
            return BatchShare.fits(held.get(request.tenant, 0), request.params.n, limit)

        joined = False
        while (request := self._waiting.peek_next(allowed)) is not None:
            n = request.params.n
            if n > free and (free < self._max_batch or joined):
                break  # full; a request wider than the whole batch runs alone
            self._waiting.take(request)
            group = self._groups.for_request(request)
            request.policy_version = group.version  # the weights it will actually run on
            group.joining.append(request)
            joined = True
            free -= n
            held[request.tenant] = held.get(request.tenant, 0) + n
            self.running_sequences += n

    def _rows_by_tenant(self) -> dict[str, int]:
        """The running batch's rows (joining ones included) by key."""
        held: dict[str, int] = {}
        for group in self._groups.all:
            for seq in group.seqs:
                held[seq.request.tenant] = held.get(seq.request.tenant, 0) + 1
            for request in group.joining:
                held[request.tenant] = held.get(request.tenant, 0) + request.params.n
        return held

    def _join_due(self) -> bool:
        """Whether to prefill waiting requests into a running batch now.

        Every join costs a forward pass of its own, about one decode step. Under steady traffic
        requests arrive nearly every step, so joining each one at once spends half the passes on
        prefill; letting a few gather (a quarter of the running count, TGI's
        ``waiting_served_ratio`` idea, made milder) or wait a few steps halves that cost for a few
        steps of time to first token (demo model, 16 closed-loop clients on 2 CPU cores: +25 to
        +65% tokens/s, +10 ms TTFT p50, against joining at once).
        """
        waited = self.steps - self._waiting.oldest_step()
        gathered = len(self._waiting) >= math.ceil(self.running_sequences * JOIN_RATIO)
        return gathered or waited >= MAX_JOIN_WAIT_STEPS

    def _step(self, lane: Lane) -> None:
        try:
            if any(g.joining for g in lane.members):
                self._prefill(lane)
                self._drop_done(lane)
                self._flush()  # first tokens go out before the decode step
            if lane.batch is not None:
                self._decode(lane)
                self._drop_done(lane)
                self._flush()
        except Exception as exc:  # a failed step fails its requests, never the thread
            versions = ", ".join(g.version for g in lane.members)
            logger.exception("decode step failed for policy %s", versions)
            for group in lane.members:  # their rows shared the failed forward pass
                self._fail(group, EngineError(f"Generation failed: {exc}"))
            lane.reset()

    def _prefill(self, lane: Lane) -> None:
        """Prefill every member's joining requests in one forward pass and merge their rows."""
        joining = [[r for r in g.joining if not r.cancelled] for g in lane.members]
        requests = [r for rs in joining for r in rs]
        if not requests:
            for group in lane.members:
                group.joining = []
            return
        model = lane.model_for([len(rs) for rs in joining])
        batch, logits = PaddedBatch.prefill(model, [r.prompt for r in requests], self._pad_id)
        new: list[list[Sequence]] = [[] for _ in joining]  # per member, in member order
        rows: list[int] = []
        row = 0
        for added, group_requests in zip(new, joining, strict=True):
            for request in group_requests:
                for index in range(request.params.n):
                    added.append(Sequence(request, index, self._tokenizer, self._eos))
                    rows.append(row)
                row += 1
        if len(rows) > len(requests):  # n > 1: the choices share the prompt's cache
            batch.select(rows)
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        seqs = [s for added in new for s in added]
        sampled = RowSampler([s.row for s in seqs], logits.device).sample(logits, self._shared_gen)
        batch.tokens = sampled.device_tokens[:, None]
        self._record(seqs, sampled)
        lane.merge(batch, new)
        for group in lane.members:  # only now: a failure above must still reach these requests
            group.joining = []
        self._count()

    def _decode(self, lane: Lane) -> None:
        assert lane.batch is not None
        seqs = lane.seqs()
        model = lane.model_for([len(g.seqs) for g in lane.members])
        if self._threads is None:
            logits = lane.batch.decode(model)
        else:
            versions = sum(1 for g in lane.members if g.seqs)
            with self._threads.step(len(seqs), versions):
                logits = lane.batch.decode(model)
        if lane.sampler is None:
            lane.sampler = RowSampler([s.row for s in seqs], logits.device)
        sampled = lane.sampler.sample(logits, self._shared_gen)
        lane.batch.tokens = sampled.device_tokens[:, None]
        self._record(seqs, sampled)
        self.steps += 1

    def _record(self, seqs: list[Sequence], sampled: Sampled) -> None:
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            if seq.request.cancelled:
                continue
            top = self._top_dict(sampled, i, seq.row.top_logprobs) if seq.row.top_logprobs else None
            seq.append(sampled.tokens[i], sampled.logprobs[i], top)
            delta = seq.take_delta(now, self._interval)
            if delta is not None:
                self._post(seq.request, delta)

    def _top_dict(self, sampled: Sampled, row: int, k: int) -> dict[str, float]:
        assert sampled.top_ids is not None and sampled.top_logprobs is not None
        ids, values = sampled.top_ids[row][:k], sampled.top_logprobs[row][:k]
        return {self._text_of(t): v for t, v in zip(ids, values, strict=True)}

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self._tokenizer.decode([token_id])
        return text

    def _drop_done(self, lane: Lane) -> None:
        if lane.batch is None:
            return
        seqs = lane.seqs()
        keep = [i for i, s in enumerate(seqs) if s.finish_reason is None
                and not s.request.cancelled]
        if len(keep) == len(seqs):
            return
        lane.drop(keep)
        self._count()

    def _count(self) -> None:
        groups = self._groups.all
        self.requests_by_version = self._groups.requests_by_version()
        self.running_requests = sum(self.requests_by_version.values())
        self.running_sequences = sum(
            len(g.seqs) + sum(r.params.n for r in g.joining) for g in groups
        )

    def _fail(self, group: Group, error: BaseException) -> None:
        for request in group.requests():
            self._post(request, type(error)(*error.args))  # one exception object per consumer
        group.seqs, group.joining = [], []
        self._flush()
        self._count()

    def _abort_all(self, error: BaseException) -> None:
        for group in list(self._groups.all):
            self._fail(group, error)
        self._lanes.clear()
        with self._cond:
            waiting = self._waiting.drain()
            changes, self._changes = self._changes, []
        for change in changes:  # nothing runs any more: apply them right away
            self._apply(change)
        for request in waiting:
            self._post(request, type(error)(*error.args))
        self._flush()

    # -- posting to event loops --------------------------------------------------------------

    def _post(self, request: Request, item: ChoiceDelta | BaseException) -> None:
        self._outbox.setdefault(request.loop, []).append((request, item))

    def _flush(self) -> None:
        """Hand this step's items to their event loops (called after finished rows are dropped,
        so ``stats()`` is current when a stream ends)."""
        outbox, self._outbox = self._outbox, {}
        if self._deliver is not None:
            self._deliver([item for items in outbox.values() for item in items])
            return
        for loop, items in outbox.items():
            assert loop is not None  # requests without a loop come only with ``deliver``
            mailbox = self._mailboxes.get(loop)
            if mailbox is None:
                mailbox = self._mailboxes[loop] = Mailbox(loop)
            if not mailbox.post([(request.inbox, item) for request, item in items]):
                del self._mailboxes[loop]  # the loop is closed: nobody is listening any more
                for request, _ in items:
                    request.cancelled = True
