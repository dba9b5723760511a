"""Print pyproject.toml's dependencies, plus those of the extras named in argv[1] (a,b,...).

The Dockerfile and scripts/compose-images.sh install exactly this list, so the image and its
wheelhouse never drift from pyproject.toml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    return [*project["dependencies"], *(dep for name in extras for dep in optional[name])]


if __name__ == "__main__":
    names = [name for name in (sys.argv[1] if len(sys.argv) > 1 else "").split(",") if name]
    path = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("pyproject.toml")
    print("\n".join(requirements(path, names)))
