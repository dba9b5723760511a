"""How a canary splits a request's answers: all or none sticky per rater, the fraction of them per
request, as many requests answered by both arms as the fraction allows."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from feedback_store.types import Rater
from server.canary_split import CanarySplit


def _split(fraction: float, unit: str) -> CanarySplit:
    split = CanarySplit()
    split.set("policy-1", fraction, unit)
    return split


@pytest.mark.parametrize(("fraction", "n", "counts"), [
    (0.5, 3, {1, 2}), (0.2, 3, {0, 1}), (0.5, 2, {1}), (0.5, 1, {0, 1}), (0.8, 4, {3, 4})])
def test_per_request_the_canary_writes_its_fraction_of_the_answers(
        fraction: float, n: int, counts: set[int]) -> None:
    random.seed(0)
    split = _split(fraction, "request")
    drawn = Counter(split.canary_answers(Rater(user="ann"), n) for _ in range(4000))
    assert set(drawn) == counts
    mean = sum(k * times for k, times in drawn.items()) / 4000
    assert mean == pytest.approx(n * fraction, abs=0.05)


def test_sticky_per_rater_all_answers_or_none() -> None:
    split = _split(0.3, "user")
    by_rater = {user: {split.canary_answers(Rater(user=user), 3) for _ in range(5)}
                for user in (f"u{i}" for i in range(200))}
    assert all(len(drawn) == 1 for drawn in by_rater.values())  # the same arm every time
    on_canary = sum(drawn == {3} for drawn in by_rater.values())
    assert {d for drawn in by_rater.values() for d in drawn} == {0, 3}
    assert 0.2 < on_canary / 200 < 0.4


def test_no_canary_no_answers() -> None:
    assert CanarySplit().canary_answers(Rater(user="ann"), 3) == 0
