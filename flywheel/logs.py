"""One log format for every Flywheel process: time, level, the process's name, the policy version
it serves or trains, the logger and the message; JSON lines with FLYWHEEL_LOG_FORMAT=json.

Quiet by default: Alembic's set-up chatter, and library deprecation notices meant for developers,
show only at debug level. Progress bars are for terminals (`flywheel.hf_progress`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(flywheel_process)s[%(flywheel_policy)s] %(name)s: " \
              "%(message)s"
# Alembic says these once per upgrade, i.e. in every process at every start.
_ALEMBIC_CHATTER = ("Context impl ", "Will assume ")

_process = os.environ.get("FLYWHEEL_PROCESS", "flywheel")
_policy: Callable[[], str | None] = lambda: None  # noqa: E731


def set_policy(version: str | Callable[[], str | None] | None) -> None:
    """The policy version this process serves or trains, or a function that tells it."""
    global _policy
    _policy = version if callable(version) else (lambda: version)


def policy() -> str:
    try:
        return _policy() or "-"
    except Exception:  # a log line must never fail because the app is half built
        return "-"


class _Context(logging.Filter):
    """Adds the process name and policy version to every record the handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.flywheel_process = _process
        record.flywheel_policy = policy()
        return True


class _NoAlembicChatter(logging.Filter):
    """Alembic without its set-up lines, and each migration applied on one line: its
    docstring's first line, not the whole docstring spilling over unprefixed lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\n" in message:
            record.msg, record.args = message.split("\n", 1)[0], None
        return not (record.levelno <= logging.INFO and
                    str(record.msg).startswith(_ALEMBIC_CHATTER))


class _NoQueryStrings(logging.Filter):
    """Access lines without query strings: a key sent as `?api_key=...` (refused, but sent) must
    not reach the logs. uvicorn's access records carry (client, method, path, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (args[0], args[1], args[2].split("?", 1)[0], *args[3:])
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": getattr(record, "flywheel_process", _process),
            "policy": getattr(record, "flywheel_policy", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether progress may be drawn in place (a TTY, and text logs)."""
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and os.environ.get("FLYWHEEL_LOG_FORMAT", "text").lower() != "json"


def configure(level: str, fmt: str = "text", process: str | None = None,
              stream: TextIO | None = None) -> None:
    """Route every logger (uvicorn's too: run it with ``log_config=None``) through one handler
    in one format. ``process``: the name in each line (server, worker, up)."""
    global _process
    if process is not None:
        _process = process
        os.environ["FLYWHEEL_PROCESS"] = process
    fmt = fmt.lower()
    os.environ["FLYWHEEL_LOG_FORMAT"] = fmt  # children and progress bars follow it
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _NoQueryStrings) for f in access.filters):
        access.addFilter(_NoQueryStrings())
    _quiet_libraries(debug=level.lower() == "debug", terminal=is_terminal(stream))


def _quiet_libraries(*, debug: bool, terminal: bool) -> None:
    if not terminal:
        # transformers' and huggingface_hub's own bars ("Loading weights") read this at import.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if debug:
        return
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _NoAlembicChatter) for f in migration.filters):
        migration.addFilter(_NoAlembicChatter())
    # Deprecation notices are for the developers of the code that calls the library (e.g.
    # transformers' `past_key_values` on the first request); operators cannot act on them.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # imported already: the variable above came too late
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
