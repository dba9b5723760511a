"""An engine core that dies: readiness fails (503) and the server exits non-zero, no hang.

An engine whose model runs in another process (vLLM's engine core) cannot serve once that process
is gone, and does not come back by itself: the engine marks itself dead (its ``stats()`` say
``degraded``, so ``/readyz`` answers 503) and the server process exits 1 so that a supervisor
restarts it, as vLLM's own server does (vllm/entrypoints/launcher.py ``terminate_if_errored``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

DEATH_POLL_SECONDS = 0.5  # how often the engine core's liveness is checked
DEATH_GRACE_SECONDS = 2.0  # from its death to the exit of the server
EXIT_ENGINE_DEAD = 1


async def watch_engine_core(dead: Callable[[], str | None], died: Callable[[str], None]) -> None:
    """Poll ``dead`` (why the core is gone, or None) until it answers, then call ``died``."""
    while (reason := dead()) is None:
        await asyncio.sleep(DEATH_POLL_SECONDS)
    log.critical("%s: exiting in %.0f s", reason, DEATH_GRACE_SECONDS)
    died(reason)


def exit_soon() -> None:
    """Exit 1 after ``DEATH_GRACE_SECONDS`` (running streams send their error events, probes
    see 503). Not a SIGTERM: uvicorn re-raises it after its graceful stop, and a supervisor
    counts that as a clean exit."""
    asyncio.get_running_loop().call_later(DEATH_GRACE_SECONDS, os._exit, EXIT_ENGINE_DEAD)
