"""Cooperative cancellation shared by reward training, PPO and the worker that runs them
(torch-free, so the worker catches ``TrainingInterrupted`` by type without importing torch)."""

from __future__ import annotations

from collections.abc import Callable


class TrainingInterrupted(Exception):
    """``should_stop()`` asked a training run to end; nothing was written to its output dir."""


def check_stop(should_stop: Callable[[], bool] | None) -> None:
    """Raise ``TrainingInterrupted`` when the caller asks to stop (checked once per step)."""
    if should_stop is not None and should_stop():
        raise TrainingInterrupted("training interrupted by should_stop()")
