"""Helpers shared by tests and benchmarks: sealed policy checkpoints recorded in SQL, and what
tests read or change in the database behind the store's back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import sqlalchemy as sa

from feedback_store import Store
from feedback_store.models import Feedback, PolicyVersion, Ranking
from flywheel.checkpoints import atomic_directory, seal
from flywheel.serving_plan import PolicyMessage

WEIGHTS = "model.safetensors"


def perturb_weights(path: Path, seed: int, scale: float = 0.01) -> None:
    """Add seeded Gaussian noise (``scale`` x each tensor's std) to a safetensors file in place."""
    import torch
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(path)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            std = float(tensor.float().std())
            tensors[name] = (tensor.float() + noise * std * scale).to(tensor.dtype).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def make_checkpoint(base_dir: Path, out_dir: Path, version: str, parent: str | None = None,
                    perturb_seed: int | None = None, store: Store | None = None,
                    status: str = "candidate", perturb_scale: float = 0.01) -> PolicyMessage:
    """Copy ``base_dir`` to ``out_dir`` atomically, perturb its weights, seal it, record it.

    Weights are perturbed only when ``perturb_seed`` is given and the copy has a
    ``model.safetensors``; returns the hot-swap message that announces the checkpoint.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        shutil.copytree(base_dir, tmp, dirs_exist_ok=True)
        if perturb_seed is not None and (tmp / WEIGHTS).exists():
            perturb_weights(tmp / WEIGHTS, perturb_seed, perturb_scale)
        manifest = seal(tmp, version, parent=parent, base_model=str(base_dir))
    if store is not None:
        store.add_policy(id=version, parent=parent, path=str(out_dir), sha256=manifest.sha256,
                         status=status)
    return PolicyMessage(version=version, path=str(out_dir), sha256=manifest.sha256)


def feedback_counts(store: Store) -> dict[str, int]:
    """Stored thumbs up, thumbs down and rankings (plain SQL on the store's engine, read as the
    store reads: on SQLite a plain BEGIN, which a writer holding the lock does not block)."""
    with store.engine.execution_options(flywheel_write=False).connect() as conn:
        by_rating = dict(conn.execute(
            sa.select(Feedback.rating, sa.func.count()).group_by(Feedback.rating)).all())
        rankings = conn.scalar(sa.select(sa.func.count()).select_from(Ranking)) or 0
    return {"up": by_rating.get("up", 0), "down": by_rating.get("down", 0), "rankings": rankings}


def set_policy_status(store: Store, version: str, status: str) -> None:
    """Change a version's status as an operator's SQL would, past the store's transitions."""
    with store.engine.begin() as conn:
        conn.execute(sa.update(PolicyVersion).where(PolicyVersion.id == version)
                     .values(status=status))


def up_env(model_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a `flywheel up` test: this one, less what would point it at another
    database, Redis, data directory, address or keys, with the model, the CPU, quick polls,
    info logs and `settings` (FLYWHEEL_* names)."""
    env = {name: value for name, value in os.environ.items() if name not in (
        "FLYWHEEL_REDIS_URL", "FLYWHEEL_DATABASE_URL", "FLYWHEEL_DATA_DIR", "FLYWHEEL_PORT",
        "FLYWHEEL_HOST", "FLYWHEEL_API_KEYS", "FLYWHEEL_ADMIN_KEY")}
    return {**env, "FLYWHEEL_MODEL": str(model_dir), "FLYWHEEL_TRAIN__DEVICE": "cpu",
            "FLYWHEEL_TRAIN__POLL_SECONDS": "0.5", "FLYWHEEL_LOG_LEVEL": "info", **settings}
