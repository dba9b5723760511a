"""The transformers engine with its model in a process of its own, by its old name.

``TransformersEngine(..., own_process=True)`` is the engine; its core is ``process_core.py`` and
the engine process itself ``engine_core.py``. If the engine process dies, every pending request
fails with ``EngineError``, ``stats()`` says ``degraded`` (``/readyz`` answers 503) and the server
exits 1 (``core_death.py``).
"""

from __future__ import annotations

from typing import Any

from server.engines.process_core import ProcessCore
from server.engines.transformers_engine import TransformersEngine


class TransformersProcessEngine(TransformersEngine):
    """``TransformersEngine`` with ``own_process=True``.

    Kept as the old name of that mode (a subclass rather than a bare alias, so that it fixes the
    transport): ``create_engine``, tests and benchmarks build it and check ``isinstance`` of it.
    """

    def __init__(self, model_path: str, **options: Any) -> None:
        super().__init__(model_path, **{**options, "own_process": True})

    @property
    def pid(self) -> int:
        """The engine process's pid."""
        core = self._core
        assert isinstance(core, ProcessCore)
        return core.pid
