"""The decode thread's thread count, chosen per batch size by timing both candidates."""

from __future__ import annotations

import pytest
import torch

from server.engines import decode_threads
from server.engines.decode_threads import DecodeThreads
from server.engines.model_loading import decode_threads as threads_for


class _Clock:
    """A step's wall time as a function of (threads, rows): what the machine would do."""

    def __init__(self, cost: dict[tuple[int, int], float]) -> None:
        self.cost, self.now, self.pending = cost, 0.0, 0.0

    def __call__(self) -> float:
        self.now += self.pending
        self.pending = 0.0
        return self.now


def _run(threads: DecodeThreads, clock: _Clock, rows: int, steps: int) -> list[int]:
    used = []
    for _ in range(steps):
        with threads.step(rows):
            used.append(torch.get_num_threads())
            clock.pending = clock.cost[(used[-1], rows)]
    return used


@pytest.fixture(autouse=True)
def _restore_threads() -> object:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_each_batch_size_runs_on_the_count_that_measured_faster() -> None:
    # Two threads pay at 16 rows, not at one (as a 28M Llama's steps did on 2 cores).
    clock = _Clock({(1, 16): 0.050, (2, 16): 0.040, (1, 1): 0.020, (2, 1): 0.024})
    threads = DecodeThreads([1, 2], clock=clock)
    threads.start()
    probe = 2 * decode_threads.SAMPLES
    big = _run(threads, clock, 16, probe + 100)
    assert sorted(set(big[:probe])) == [1, 2] and set(big[probe:]) == {2}
    small = _run(threads, clock, 1, probe + 100)
    assert set(small[probe:]) == {1}
    assert threads.chosen() == {(31, 1): 2, (1, 1): 1}


def test_a_step_shared_by_two_versions_is_timed_apart_from_one_versions() -> None:
    # A canary's routed step of 16 rows runs its small products best on one thread here, while
    # one version's step of 16 rows gains from two.
    cost = {(1, 16, 1): 0.050, (2, 16, 1): 0.040, (1, 16, 2): 0.055, (2, 16, 2): 0.060}
    now = [0.0]
    threads = DecodeThreads([1, 2], clock=lambda: now[0])
    threads.start()
    probe = 2 * decode_threads.SAMPLES
    for versions in (1, 2, 1):
        used = []
        for _ in range(probe + 50):
            with threads.step(16, versions):
                used.append(torch.get_num_threads())
                now[0] += cost[(used[-1], 16, versions)]
        assert set(used[-50:]) == {2 if versions == 1 else 1}
    assert threads.chosen() == {(31, 1): 2, (31, 2): 1}


def test_a_choice_is_measured_again_after_reprobe_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_threads, "REPROBE", 20)
    clock = _Clock({(1, 16): 0.050, (2, 16): 0.040})
    threads = DecodeThreads([1, 2], clock=clock)
    probe = 2 * decode_threads.SAMPLES
    _run(threads, clock, 16, probe + 20)
    assert threads.chosen() == {(31, 1): 2}
    clock.cost = {(1, 16): 0.030, (2, 16): 0.040}  # the machine got busier: one is faster now
    again = _run(threads, clock, 16, probe + 20)
    assert set(again[probe:]) == {1}


def test_one_candidate_is_never_timed() -> None:
    threads = DecodeThreads([1, 1])
    assert threads.candidates == (1,)
    threads.start()
    with threads.step(16):
        assert torch.get_num_threads() == 1
    assert threads.chosen() == {}


def test_only_an_engine_process_tries_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu = torch.device("cpu")
    assert threads_for(cpu, None).candidates == (3,)
    assert threads_for(cpu, None, own_process=True).candidates == (3, 4)
    assert threads_for(cpu, 2, own_process=True).candidates == (2,)
    assert threads_for(torch.device("meta"), None) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads_for(cpu, None, own_process=True) is None
