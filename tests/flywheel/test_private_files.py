"""What Flywheel writes is its user's alone: the database and its WAL 0600, folders 0700, and a
data folder made earlier with wider rights is closed when a command uses it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_database_and_the_data_folder_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    subprocess.run([sys.executable, "-m", "flywheel.cli", "db", "upgrade"], cwd=ROOT,
                   env={**env, "FLYWHEEL_DATA_DIR": str(data)}, check=True, timeout=120,
                   capture_output=True)
    assert _mode(data) == 0o700
    written = [p for p in data.rglob("*")]
    assert any(p.name == "flywheel.db" for p in written)
    for path in written:
        assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))
