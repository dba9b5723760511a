"""Checkpoint files are loaded from the bytes that were hashed (``CheckpointReader``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flywheel.checkpoints import CheckpointError, CheckpointReader, digest_of, seal, verify


def _directory(path: Path, weights: bytes) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text("{}")
    return path


def test_a_file_replaced_after_the_check_is_refused_when_read(tmp_path: Path) -> None:
    policy = _directory(tmp_path / "policy-1", b"checked weights")
    manifest = seal(policy, "policy-1")
    verify(policy, manifest.sha256, "policy-1")
    (policy / "model.safetensors").write_bytes(b"swapped weights")  # after the check
    reader = CheckpointReader(policy, manifest.sha256)
    assert reader.read("model.safetensors") == b"swapped weights"
    with pytest.raises(CheckpointError, match="differ from the ones checked"):
        reader.check()


def test_what_was_read_is_what_the_digest_covers(tmp_path: Path) -> None:
    """Files replaced once read change nothing: the bytes read are the ones held to it."""
    policy = _directory(tmp_path / "policy-1", b"checked weights")
    manifest = seal(policy, "policy-1")
    reader = CheckpointReader(policy, manifest.sha256)
    assert set(reader.names) == {"config.json", "model.safetensors", "tokenizer.json"}
    weights = reader.read("model.safetensors")
    (policy / "model.safetensors").write_bytes(b"swapped weights")
    reader.check()
    assert weights == b"checked weights"


def test_a_base_model_is_held_to_its_recorded_digest(tmp_path: Path) -> None:
    """No manifest: every file counts, those not read (the tokenizer) as they are on disk."""
    base = _directory(tmp_path / "base", b"base weights")
    recorded = digest_of(base)
    CheckpointReader(base, recorded).check()
    reader = CheckpointReader(base, recorded)
    reader.read("model.safetensors")
    (base / "tokenizer.json").write_text('{"changed": true}')
    with pytest.raises(CheckpointError):
        reader.check()
    shutil.rmtree(base)
    CheckpointReader(_directory(base, b"other weights"), None).check()  # nothing to hold to
