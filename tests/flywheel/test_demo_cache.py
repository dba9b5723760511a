"""The demo model is built once per user and copied into each data directory after that."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.checkpoints import digest_of
from flywheel.demo_model import cache


def test_built_once_then_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("FLYWHEEL_DEMO_STEPS", "2")
    builds: list[Path] = []
    build = cache.build_demo_model

    def counted(out: Path, **kwargs: object) -> Path:
        builds.append(Path(out))
        return build(out, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache, "build_demo_model", counted)
    first, built = cache.cached_demo_model(tmp_path / "a" / "models" / "base", preset="tiny",
                                           progress=False)
    assert built and len(builds) == 1 and builds[0].is_relative_to(tmp_path / "cache")
    (tmp_path / "b" / "models" / "base").mkdir(parents=True)  # left empty by a crash
    second, built = cache.cached_demo_model(tmp_path / "b" / "models" / "base", preset="tiny",
                                            progress=False)
    assert not built and len(builds) == 1
    assert (second / "config.json").exists() and not second.is_symlink()
    assert digest_of(first) == digest_of(second)
    monkeypatch.setenv("FLYWHEEL_DEMO_STEPS", "3")  # another recipe: built anew
    cache.cached_demo_model(tmp_path / "c", preset="tiny", progress=False)
    assert len(builds) == 2
