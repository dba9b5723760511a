"""Progress bars for terminals, progress lines for logs; and transformers' own bars quieted.

On a terminal `tqdm` draws in place as usual. Anywhere else (a log file, a pipe, JSON logs) a
bar would write a carriage-return frame per refresh, thousands a minute in a log; there progress
is instead one log line at most every LOG_INTERVAL_S seconds in the whole process, with the rate
and the time left, and a bar that ends before its first line (most of a cycle's) writes none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm as _tqdm

from flywheel.logs import is_terminal

log = logging.getLogger("flywheel.progress")

LOG_INTERVAL_S = 10.0  # a log line per bar at most this often
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) {elapsed}<{remaining}, {rate_fmt}" \
             "{postfix}"


_last_line = -float("inf")  # when the process last logged a progress line (monotonic)


def _line_due() -> bool:
    """Whether a progress line may be logged now: at most one every LOG_INTERVAL_S, across all
    bars (a cycle runs dozens of short ones)."""
    global _last_line
    now = time.monotonic()
    if now - _last_line < LOG_INTERVAL_S:
        return False
    _last_line = now
    return True


class _Discard:
    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class tqdm(_tqdm):  # a drop-in for `from tqdm import tqdm`, hence the name
    """tqdm on a terminal; elsewhere progress as log lines, never a carriage return."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._as_log = not is_terminal(kwargs.get("file"))
        if self._as_log:
            kwargs.update(file=_Discard(), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
                          bar_format=LOG_FORMAT, dynamic_ncols=False)
        self._logged_n = -1
        self._started = time.monotonic()
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool | None:
        if not self._as_log:
            return super().display(msg, pos)
        if (self.n != self._logged_n and self.n > 0
                and time.monotonic() - self._started >= LOG_INTERVAL_S and _line_due()):
            self._logged_n = self.n
            log.info("%s", self.format_meter(**self.format_dict))
        return None

    def close(self) -> None:
        # A bar that showed progress ends with its final line; one too short to show any, silent.
        if (self._as_log and not self.disable and self._logged_n >= 0
                and self.n != self._logged_n):
            self._logged_n = self.n
            log.info("%s", self.format_meter(**self.format_dict))
        super().close()


@contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """Show transformers' own progress bars only when ``enabled`` and on a terminal; restore
    them afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = enabled and is_terminal()
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()
