"""The `flywheel` command's process set-up (flywheel/cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import os, sys
from flywheel.cli import main
assert "torch" not in sys.modules, "torch loaded before main could set its OpenMP spin count"
main(["db", "upgrade"])
print(os.environ.get("GOMP_SPINCOUNT"))
"""


@pytest.mark.parametrize(("given", "expected"), [(None, "1000"), ("5", "5")])
def test_openmp_threads_spin_briefly_unless_told(tmp_path: Path, given: str | None,
                                                 expected: str) -> None:
    """Every `flywheel` command sets GOMP_SPINCOUNT before torch loads (its children inherit
    it); an operator's own value stands."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env["FLYWHEEL_DATABASE_URL"] = f"sqlite:///{tmp_path / 'f.db'}"
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected, out.stderr
