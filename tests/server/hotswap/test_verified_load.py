"""What the transformers engine loads is what was hashed: a weight file replaced between the
server's check of a checkpoint and its load is refused, never served (a real engine, a real
Redis, SQLite)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from feedback_store import Store
from flywheel import checkpoints
from flywheel.checkpoints import digest_of
from flywheel.engine_types import EngineError
from flywheel.serving_plan import PolicyMessage, record_base_policy
from flywheel.settings import Settings
from server import hotswap
from server.app import create_app
from tests.helpers import WEIGHTS, make_checkpoint
from tests.server.hotswap.conftest import redis_followed, served, swaps, wait_for


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str, redis_url: str, redis_namespace: str,
             tiny_model_dir: Path) -> Settings:
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    return Settings(data_dir=tmp_path, database_url=sqlite_url, model=str(base),
                    redis_url=redis_url, redis_namespace=redis_namespace, device="cpu")


def _served_weights(client: TestClient) -> dict[str, torch.Tensor]:
    model: Any = client.app.state.flywheel.engine.model  # type: ignore[attr-defined]
    return model.state_dict()


@contextlib.contextmanager
def _transformers_server(settings: Settings, store: Store) -> Iterator[TestClient]:
    """A server on the transformers engine (the base policy recorded), following Redis."""
    from server.engines.transformers_engine import TransformersEngine

    record_base_policy(settings, store)
    engine = TransformersEngine(settings.model, device="cpu", max_batch_size=4)
    with TestClient(create_app(settings, engine=engine, store=store, watch=True)) as client:
        assert redis_followed(client)
        yield client


@pytest.mark.slow
def test_weights_replaced_after_the_check_are_refused(
    settings: Settings, store: Store, tmp_path: Path, publish: Callable[[PolicyMessage], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = Path(settings.model)
    root = tmp_path / "checkpoints"
    other = make_checkpoint(base, root / "other", "other", perturb_seed=9, perturb_scale=1.0)
    real_check = hotswap.check_servable

    def check_then_replace(message: PolicyMessage, settings: Settings, **how: Any) -> Any:
        """The check passes; then the weights change on disk before the engine reads them."""
        manifest = real_check(message, settings, **how)
        if message.version == "policy-1":
            shutil.copyfile(Path(other.path) / WEIGHTS, Path(message.path) / WEIGHTS)
        return manifest

    monkeypatch.setattr(hotswap, "check_servable", check_then_replace)
    with _transformers_server(settings, store) as client:
        swapped = make_checkpoint(base, root / "policy-1", "policy-1", parent="policy-0",
                                  perturb_seed=1, store=store, status="active")
        publish(swapped)
        assert wait_for(lambda: swaps(client, "refused"), lambda n: n >= 1) == 1
        assert served(client) == "policy-0"
        base_weights = load_file(base / WEIGHTS)
        assert all(torch.equal(t, base_weights[k]) for k, t in _served_weights(client).items()
                   if k in base_weights)

        good = make_checkpoint(base, root / "policy-2", "policy-2", parent="policy-0",
                               perturb_seed=2, store=store, status="active")
        publish(good)
        assert wait_for(lambda: served(client), lambda v: v == "policy-2") == "policy-2"
        sealed = load_file(Path(good.path) / WEIGHTS)
        assert all(torch.equal(t, sealed[k]) for k, t in _served_weights(client).items()
                   if k in sealed)


@pytest.mark.slow
def test_a_swap_hashes_each_weight_file_once(
    settings: Settings, store: Store, tmp_path: Path, publish: Callable[[PolicyMessage], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine hashes what it loads, so the server's check before it reads no weights: a
    checkpoint whose weights were replaced before the check is still refused, by the engine."""
    base = Path(settings.model)
    root = tmp_path / "checkpoints"
    hashed: list[str] = []
    real_hash = checkpoints.file_sha256

    def counted(path: Path) -> str:
        hashed.append(Path(path).name)
        return real_hash(path)

    monkeypatch.setattr(checkpoints, "file_sha256", counted)
    with _transformers_server(settings, store) as client:
        tampered = make_checkpoint(base, root / "policy-1", "policy-1", parent="policy-0",
                                   perturb_seed=1, store=store, status="active")
        other = make_checkpoint(base, root / "other", "other", perturb_seed=9)
        shutil.copyfile(Path(other.path) / WEIGHTS, Path(tampered.path) / WEIGHTS)
        hashed.clear()
        publish(tampered)
        assert wait_for(lambda: swaps(client, "refused"), lambda n: n >= 1) == 1
        assert served(client) == "policy-0"
        good = make_checkpoint(base, root / "policy-2", "policy-2", parent="policy-0",
                               perturb_seed=2, store=store, status="active")
        hashed.clear()
        publish(good)
        assert wait_for(lambda: served(client), lambda v: v == "policy-2") == "policy-2"
        assert WEIGHTS not in hashed  # read and hashed once, by the engine's CheckpointReader


@pytest.mark.slow
async def test_the_engine_starts_on_what_the_recorded_digest_covers(settings: Settings,
                                                                   tmp_path: Path) -> None:
    """At start too (``initial_plan`` checks, then the engine process loads): weights replaced
    since the digest was recorded stop the engine from starting on them."""
    from server.engines import create_engine

    settings = settings.model_copy(update={"engine_process": True})
    base = Path(settings.model)
    recorded = digest_of(base)
    engine = create_engine(settings, sha256=recorded)
    await engine.start()
    await engine.stop()
    other = make_checkpoint(base, tmp_path / "other", "other", perturb_seed=9)
    shutil.copyfile(Path(other.path) / WEIGHTS, base / WEIGHTS)
    with pytest.raises(EngineError, match="differ from the ones checked"):
        create_engine(settings, sha256=recorded)
