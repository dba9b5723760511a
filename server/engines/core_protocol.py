"""What the API process and the engine process (``engine_core.py``) say to each other.

Torch-free, as the API side that imports it: the engine process's model, tokenizer and scheduler
stay on its side of the pipes.

Commands (tuples, pickled): ``submit key prompt params max_new canary tenant``, ``cancel key``,
``load key kind path version sha256`` (kind ``activate`` or ``canary``), ``change key kind``
(``promote`` or ``end_canary``), ``stop``. Events: ``ready info``, ``failed reason``, ``step rows
stats acks``, ``acks acks stats``, ``stopped``. A row is ``(key, index, text, token_ids,
logprobs, version, top_logprobs, finish_reason)``, or ``(key, message)`` when the request failed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

from flywheel.versions import BASE_POLICY
from server.engines.base import ChoiceDelta, EngineStats

Row = tuple[Any, ...]
Ack = tuple[int, str | None]  # a weight change's key and why it failed (None: applied)


@dataclass(frozen=True)
class CoreConfig:
    """What the engine process is started with (the engine's constructor arguments)."""

    model_path: str
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 32
    max_model_len: int | None = None
    policy_version: str = BASE_POLICY
    stream_interval_ms: float = 0.0
    ignore_eos: bool = False
    cpu_threads: int | None = None
    log_level: int = logging.WARNING
    fair_share: bool = True  # round robin by key and a share of the batch (``fair_queue.py``)
    max_batch_share: float = 0.75  # of the batch, one key's most while other keys are active
    sha256: str | None = None  # the digest model_path's files were checked against, if any


class CoreInfo(NamedTuple):
    """The loaded model, as the API side must know it before serving."""

    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    pad_token_id: int
    # The engine process's own tokenizer, pickled: the API side tokenises with the very same one,
    # and without ``AutoTokenizer``, whose import brings torch (transformers 5).
    tokenizer: Any


class CoreStats(NamedTuple):
    """The scheduler's counts after a flush (what ``Engine.stats()`` reports)."""

    running_requests: int = 0
    running_sequences: int = 0
    waiting: int = 0
    received: int = 0  # submits the core has read (the API side adds those still in the pipe)
    versions: tuple[str, ...] = ()  # loaded, oldest first (draining ones too)
    active: str = ""
    canary: str | None = None
    requests_by_version: tuple[tuple[str, int], ...] = ()
    steps: int = 0


def engine_stats(s: CoreStats, in_pipe: int = 0, **extra: Any) -> EngineStats:
    """``Engine.stats()`` of a core's counts; ``in_pipe``: submits on their way to the core."""
    return EngineStats(
        running=s.running_requests,
        waiting=s.waiting + in_pipe,
        extra={
            "running_sequences": s.running_sequences,
            "decode_steps": s.steps,
            "policy_versions": list(s.versions),  # loaded, oldest first (draining too)
            "active_version": s.active,
            "canary_version": s.canary,
            "requests_by_version": dict(s.requests_by_version),
            **extra,
        },
    )


def delta_row(key: int, delta: ChoiceDelta) -> Row:
    return (key, delta.index, delta.text, delta.token_ids, delta.logprobs, delta.policy_version,
            delta.top_logprobs, delta.finish_reason)


def row_delta(row: Row) -> ChoiceDelta:
    return ChoiceDelta(row[1], row[2], row[3], row[4], row[5], row[6], row[7])
