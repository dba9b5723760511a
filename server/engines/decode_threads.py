"""How many intra-op threads the decode thread runs a step on: chosen by measuring.

On CPU the decode thread keeps one core free for the API (``model_loading.decode_threads``). In
an engine process of its own the API needs far less than a core (under a tenth at 16 streaming
clients), and whether a step gains from the last core depends on the model, the batch and the
machine: on a 2-core AVX2 machine a 28M Llama's decode step at 16 rows streams its weights from
memory, which two cores do faster (two threads throughout: 1.13x the tokens/s at 16 streaming
clients, 0.89x at one), while on an AVX-512 machine two threads gave the demo model's small
products 0.68x. So the engine process measures instead of guessing: for each size of batch
(rows, in powers of two), its first steps alternate the candidate thread counts, and the count
whose median step took less wall time runs the next ``REPROBE`` steps of that size, after which
they are measured again (the machine's load changes). Buckets are by rows and by how many
versions share the step: a canary's routed step adds small products beside the large ones, which
may want another count than one version's step of as many rows (two lanes of one size, a canary
of another architecture beside the active version, still share one).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

SAMPLES = 8  # steps measured per candidate
REPROBE = 2048  # steps of one batch size on the chosen count before measuring again


class _Size:
    """One batch size's measurements and choice."""

    def __init__(self, candidates: Sequence[int]) -> None:
        self.candidates = tuple(candidates)
        self.times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.chosen: int | None = None
        self.steps = 0  # since the choice

    def next(self) -> int:
        if self.chosen is not None:
            self.steps += 1
            if self.steps <= REPROBE:
                return self.chosen
            self.chosen, self.times = None, {c: [] for c in self.candidates}
        return min(self.candidates, key=lambda c: len(self.times[c]))  # in turn

    def record(self, threads: int, seconds: float) -> None:
        if self.chosen is not None:
            return
        self.times[threads].append(seconds)
        if all(len(times) >= SAMPLES for times in self.times.values()):
            self.chosen = min(self.candidates, key=lambda c: statistics.median(self.times[c]))
            self.steps = 0


class DecodeThreads:
    """The decode thread's OpenMP thread count: one of ``candidates``, the faster measured per
    batch size when there are several (`torch.set_num_threads` sets the calling thread's
    team, so only the decode thread calls these)."""

    def __init__(self, candidates: Sequence[int],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        assert candidates and all(c >= 1 for c in candidates)
        self.candidates = tuple(dict.fromkeys(candidates))
        self._clock = clock
        self._sizes: dict[tuple[int, int], _Size] = {}
        self._current: int | None = None

    def start(self) -> None:
        """On the decode thread, before its first step."""
        self._current = None
        self._use(self.candidates[0])

    def chosen(self) -> dict[tuple[int, int], int]:
        """Per batch size measured (its largest row count, and the versions sharing the step)
        the count chosen so far."""
        return {((1 << bucket) - 1, versions): size.chosen
                for (bucket, versions), size in self._sizes.items() if size.chosen is not None}

    @contextmanager
    def step(self, rows: int, versions: int = 1) -> Iterator[None]:
        """Runs the step in the block on the count of its batch size (``rows`` over
        ``versions`` sharing the forward pass), and times it."""
        if len(self.candidates) == 1:
            yield
            return
        size = self._sizes.setdefault((rows.bit_length(), versions), _Size(self.candidates))
        threads = size.next()
        self._use(threads)
        start = self._clock()
        yield
        size.record(threads, self._clock() - start)
        if size.chosen is not None and size.steps == 0:
            medians = ", ".join(f"{statistics.median(times) * 1e3:.1f} ms on {count}"
                                for count, times in size.times.items())
            logger.info("decode steps of up to %d rows over %d version(s): %d threads "
                        "(median step %s)", (1 << rows.bit_length()) - 1, versions, size.chosen,
                        medians)

    def _use(self, threads: int) -> None:
        if threads != self._current:
            torch.set_num_threads(threads)
            self._current = threads
