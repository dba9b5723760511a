"""Quiet transformers' own load/save progress bars when ours are off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transformers.utils import logging as hf_logging


@contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """Show transformers' own progress bars only when ``enabled``; restore them afterwards."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()
