"""`FLYWHEEL_ENGINE=vllm flywheel up` on CPU end to end: feedback, a worker cycle, the new policy
published and served by vLLM, a clean stop. Runs where vLLM is importable
(scripts/vllm-venv.sh)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.vllm.bindings import vllm_installed
from tests.test_up import close_the_loop

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not vllm_installed(),
    reason="vLLM is not installed (scripts/test.sh runs this in a venv with it)")]


def test_up_on_vllm_closes_the_loop_and_stops_cleanly(tmp_path: Path, tiny_model_dir: Path) -> None:
    log = close_the_loop(
        tmp_path, tiny_model_dir, ready_s=400, train_s=500, stop_s=120, FLYWHEEL_ENGINE="vllm",
        # Tests start vLLM small: eager (no compile), a 64 MiB KV cache.
        FLYWHEEL_VLLM_ENFORCE_EAGER="true", FLYWHEEL_VLLM_KV_CACHE_BYTES=str(64 << 20))
    assert "vLLM engine serving policy-0" in log
