"""Policy checkpoint directories: written atomically, sealed with a manifest, verified on load.

A checkpoint is a complete Hugging Face model directory plus ``flywheel_manifest.json``::

    {"version": "policy-3", "parent": "policy-2", "sha256": "<digest of every other file>",
     "files": {"model.safetensors": "<sha256>", ...}, "created_at": "...", "base_model": "..."}

It is written under a temporary name in the same parent directory and renamed into place, so a
reader sees either nothing or the whole directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MANIFEST_NAME = "flywheel_manifest.json"
# A LoRA policy's adapter (peft's files, relative to the base model) beside its merged weights.
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = f"{ADAPTER_DIR}/adapter_config.json"
ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/adapter_model.safetensors"
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its digest."""


@dataclass(frozen=True)
class Manifest:
    version: str
    sha256: str
    files: dict[str, str]
    parent: str | None = None
    created_at: str = ""
    base_model: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def lora_adapter_dir(checkpoint: str | Path) -> Path | None:
    """``<checkpoint>/adapter`` when the checkpoint is a LoRA policy, else None."""
    adapter = Path(checkpoint) / ADAPTER_DIR
    return adapter if (Path(checkpoint) / ADAPTER_CONFIG).is_file() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _payload_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )


def directory_digest(files: dict[str, str]) -> str:
    """One digest over (relative path, file digest) pairs, in path order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(files[name].encode())
        digest.update(b"\n")
    return digest.hexdigest()


def seal(directory: Path, version: str, parent: str | None = None,
         base_model: str | None = None) -> Manifest:
    """Hash every file of ``directory`` and write its manifest; returns the manifest."""
    files = {str(p.relative_to(directory)): file_sha256(p) for p in _payload_files(directory)}
    manifest = Manifest(
        version=version,
        sha256=directory_digest(files),
        files=files,
        parent=parent,
        created_at=datetime.now(timezone.utc).isoformat(),
        base_model=base_model,
    )
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def digest_of(directory: str | Path) -> str:
    """The digest of a directory as it is (for a base model, which has no manifest)."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): file_sha256(p) for p in _payload_files(directory)}
    return directory_digest(files)


class CheckpointReader:
    """A directory's files read for loading, each once, and held to the digest ``sha256`` that
    ``verify`` checked: ``read`` returns the bytes it hashed, and ``check`` refuses the directory
    unless the (name, digest) pairs of its files, those read as they were read, make ``sha256``.
    What is loaded from ``read`` is then what was hashed, whatever happens to the files after the
    check; loading by path after ``verify`` leaves a window in which a replaced file is loaded
    unchecked. ``sha256`` None: nothing to hold them to (read once all the same)."""

    def __init__(self, directory: str | Path, sha256: str | None) -> None:
        self.directory = Path(directory)
        self.sha256 = sha256
        self.names = [str(p.relative_to(self.directory)) for p in _payload_files(self.directory)]
        self._read: dict[str, str] = {}

    def read(self, name: str) -> bytes:
        """The bytes of ``name``, hashed; keep one file's at a time for large weights."""
        data = (self.directory / name).read_bytes()
        self._read[name] = hashlib.sha256(data).hexdigest()
        return data

    def check(self) -> None:
        """Raise ``CheckpointError`` unless the files, those read as read, match ``sha256``."""
        if self.sha256 is None:
            return
        files = {str(p.relative_to(self.directory)): p for p in _payload_files(self.directory)}
        digests = {name: self._read.get(name) or file_sha256(p) for name, p in files.items()}
        if directory_digest({**digests, **self._read}) != self.sha256:
            raise CheckpointError(f"{self.directory}: the files read differ from the ones "
                                  "checked (changed since?)")


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        return Manifest(**data)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{directory}: no {MANIFEST_NAME}") from exc
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{directory}: unreadable manifest: {exc}") from exc


def verify(directory: str | Path, expected_sha256: str | None = None,
           expected_version: str | None = None, max_bytes: int | None = None, *,
           contents: bool = True) -> Manifest:
    """Check that ``directory`` is complete and matches its manifest (and the announced digest).

    ``max_bytes`` bounds the hashing: a directory holding more is refused before any file is read.
    ``contents=False`` checks everything but the files' bytes, for a caller that loads them
    through ``CheckpointReader`` (which hashes what it reads and holds it to the digest).
    Raises ``CheckpointError`` naming the first mismatch.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not (directory / MANIFEST_NAME).exists() and expected_sha256:
        # A base model directory carries no manifest: it must match the recorded digest.
        if contents and digest_of(directory) != expected_sha256:
            raise CheckpointError(f"{directory}: contents do not match the recorded digest")
        return Manifest(version=expected_version or "", sha256=expected_sha256, files={})
    manifest = read_manifest(directory)
    if max_bytes is not None:
        size = sum(p.stat().st_size for p in _payload_files(directory))
        if size > max_bytes:
            raise CheckpointError(f"{directory}: {size} bytes, more than a policy of this base "
                                  f"model can hold ({max_bytes})")
    if expected_version is not None and manifest.version != expected_version:
        raise CheckpointError(
            f"{directory}: manifest is for {manifest.version}, expected {expected_version}"
        )
    if expected_sha256 is not None and manifest.sha256 != expected_sha256:
        raise CheckpointError(f"{directory}: manifest digest differs from the announced one")
    actual = {str(p.relative_to(directory)) for p in _payload_files(directory)}
    if actual != set(manifest.files):
        missing = sorted(set(manifest.files) - actual)
        extra = sorted(actual - set(manifest.files))
        raise CheckpointError(f"{directory}: files differ from manifest (missing {missing}, "
                              f"unexpected {extra})")
    for name, sha in manifest.files.items() if contents else ():
        if file_sha256(directory / name) != sha:
            raise CheckpointError(f"{directory}: {name} does not match its digest")
    if directory_digest(manifest.files) != manifest.sha256:
        raise CheckpointError(f"{directory}: manifest digest is inconsistent")
    return manifest


# Config fields a policy must share with the base model for the server's engine to serve it.
_SAME_CONFIG = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads")


def verify_servable(directory: str | Path, *, version: str, sha256: str | None,
                    root: str | Path, base_model: str | Path, contents: bool = True) -> Manifest:
    """Everything a server checks before it loads a policy (raises ``CheckpointError``).

    The base model itself passes on its recorded digest. Any other directory must resolve
    (symlinks included) inside the checkpoint ``root``, carry a recorded digest, match its
    manifest, hold no more than the base model's size allows (so hashing stays bounded), and have
    the base model's architecture, vocabulary and at least its context. ``contents``: as in
    ``verify``.
    """
    path, base = Path(directory).resolve(), Path(base_model).resolve()
    if path == base:
        return verify(path, sha256 or None, version, contents=contents)
    if not path.is_relative_to(Path(root).resolve()):
        raise CheckpointError(f"{directory}: outside the checkpoint directory {root}")
    if not sha256:
        raise CheckpointError(f"{directory}: no recorded digest to check it against")
    base_bytes = sum(p.stat().st_size for p in _payload_files(base))
    manifest = verify(path, sha256, version, max_bytes=2 * base_bytes + (64 << 20),
                      contents=contents)
    check_compatible(path, base)
    return manifest


def _config(directory: Path) -> dict[str, object]:
    try:
        data = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}: no readable config.json ({exc})") from exc
    return data if isinstance(data, dict) else {}


def check_compatible(directory: Path, base_model: Path) -> None:
    """The policy has the base model's architecture and vocabulary, and at least its context."""
    mine, base = _config(Path(directory)), _config(Path(base_model))
    for key in _SAME_CONFIG:
        if mine.get(key) != base.get(key):
            raise CheckpointError(f"{directory}: config {key} {mine.get(key)!r} differs from the "
                                  f"base model's {base.get(key)!r}")
    context, base_context = mine.get("max_position_embeddings"), base.get(
        "max_position_embeddings")
    if isinstance(base_context, int) and not (isinstance(context, int)
                                              and context >= base_context):
        raise CheckpointError(f"{directory}: context {context!r} shorter than the base model's "
                              f"{base_context}")


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to fill; rename it into place on success.

    On any exception the temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    if final.exists():
        raise CheckpointError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
