"""The demo model, built once per user: every later clone or data directory copies it.

Built models are kept under ``$FLYWHEEL_CACHE_DIR`` (default ``~/.cache/flywheel``) in
``demo-models/<preset>-<recipe>``, where the recipe is a digest of the code that builds the model,
the preset, the seed and the steps: change any of them and the next start builds anew. A copy
(not a link) lands in the data directory, so each data directory's base model is its own and its
recorded digest never changes under it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

from flywheel.demo_model.build import build_demo_model
from flywheel.demo_model.train import PRESETS, resolve_steps

log = logging.getLogger(__name__)

CACHE_ENV = "FLYWHEEL_CACHE_DIR"


def cache_root() -> Path:
    explicit = os.environ.get(CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flywheel"


def recipe(preset: str, seed: int) -> str:
    """A digest of everything the model depends on: this package's code and the settings."""
    digest = hashlib.sha256(f"{preset}\0{seed}\0{resolve_steps(PRESETS[preset])}".encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def cached_demo_model(out_dir: str | Path, *, preset: str = "demo", seed: int = 0,
                      progress: bool = True) -> tuple[Path, bool]:
    """The demo model at ``out_dir``, copied from this user's cache, built into it first when
    missing; returns (``out_dir``, whether it was built now)."""
    cached = cache_root() / "demo-models" / f"{preset}-{recipe(preset, seed)}"
    built = not (cached / "config.json").exists()
    if built:
        log.info("first start on this machine: building the demo model into %s (a few "
                 "minutes, once per user: later data directories copy it)", cached)
        build_demo_model(cached, preset=preset, seed=seed, progress=progress)
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.copy-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(cached, tmp)
        if out.exists():  # a model directory without config.json: what a crash left
            shutil.rmtree(out)
        tmp.rename(out)  # whole or absent, like a build
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, built
