"""The packages' levels (docs/architecture.md): a module imports only modules of its own level
or of a level below, and ``server`` and ``trainer_worker``, on one level, never import each other.

Every import counts, wherever it stands in a module (inside a function, under ``TYPE_CHECKING``):
a lazy import is a dependency all the same. Read with ``ast``, nothing is imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flywheel", "feedback_store", "server", "trainer_worker")

# Bottom to top. Each entry is a module or a package (then every module in it); the most specific
# entry places a module. "flywheel" spans several levels: its bare name places only its
# __init__, and each other module of it must be named here.
LEVELS: list[tuple[str, tuple[str, ...]]] = [
    ("flywheel core: pure settings, statistics and messages", (
        "flywheel", "flywheel.approval", "flywheel.checkpoints", "flywheel.demo_model",
        "flywheel.engine_types", "flywheel.hf_compat", "flywheel.hf_progress", "flywheel.logs",
        "flywheel.rater_pooling", "flywheel.raters", "flywheel.settings", "flywheel.versions",
    )),
    ("the store", ("feedback_store",)),
    ("flywheel services: on the store, shared by server and trainer", (
        "flywheel.live_approval", "flywheel.serving_plan", "flywheel.vllm",
    )),
    ("the two sides", ("server", "trainer_worker")),
    ("composition: `flywheel` commands and the processes of `up`", (
        "flywheel.cli", "flywheel.embedded_redis", "flywheel.supervisor",
    )),
]
SPLIT = ("flywheel",)
# Groups on one level that never import each other (in either direction).
INDEPENDENT = (("server", "trainer_worker"),)


@dataclass(frozen=True)
class Import:
    path: str  # of the importing file, relative to the repository
    line: int
    module: str  # the importer
    target: str  # the module it imports


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    return {module_name(path): path
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _entry_matches(entry: str, module: str) -> bool:
    if module == entry:
        return True
    return entry not in SPLIT and module.startswith(entry + ".")


def placement(module: str) -> tuple[int, str] | None:
    """(level, entry) of the most specific entry of LEVELS that places ``module``; None: none."""
    found = [(len(entry), level, entry) for level, (_, entries) in enumerate(LEVELS)
             for entry in entries if _entry_matches(entry, module)]
    if not found:
        return None
    _, level, entry = max(found)
    return level, entry


def imports_of(module: str, source: str, path: str, known: set[str]) -> list[Import]:
    """The imports of the four packages anywhere in ``source`` (the module ``module``).

    ``from a import b`` imports ``a.b`` when that is a module, else ``a``.
    """
    is_package = path.endswith("__init__.py")
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        found.extend(Import(path, node.lineno, module, target) for target in dict.fromkeys(targets)
                     if target.split(".")[0] in PACKAGES)
    return found


def _group(module: str) -> str | None:
    for pair in INDEPENDENT:
        for group in pair:
            if module == group or module.startswith(group + "."):
                return group
    return None


def violation(imp: Import) -> str | None:
    """Why ``imp`` breaks the levels, or None."""
    source, target = placement(imp.module), placement(imp.target)
    if source is None or target is None:
        return None  # test_every_module_has_a_level reports these
    if target[0] > source[0]:
        return (f"upward: {imp.module} ({LEVELS[source[0]][0]}) imports {imp.target} "
                f"({LEVELS[target[0]][0]})")
    ours, theirs = _group(imp.module), _group(imp.target)
    if ours and theirs and ours != theirs and (
            (ours, theirs) in INDEPENDENT or (theirs, ours) in INDEPENDENT):
        return f"across: {imp.module} imports {imp.target} ({ours} and {theirs} are independent)"
    return None


def all_imports() -> list[Import]:
    modules = all_modules()
    known = set(modules)
    return [imp for module, path in modules.items()
            for imp in imports_of(module, path.read_text(), str(path.relative_to(ROOT)), known)]


def test_every_module_has_a_level() -> None:
    modules = all_modules()
    unplaced = sorted(module for module in modules if placement(module) is None)
    assert not unplaced, ("modules on no level: add them to LEVELS in tests/test_layers.py "
                          "(and to docs/architecture.md): " + ", ".join(unplaced))
    stale = sorted(entry for _, entries in LEVELS for entry in entries
                   if not any(_entry_matches(entry, module) for module in modules))
    assert not stale, "LEVELS names modules that do not exist: " + ", ".join(stale)


def test_imports_run_downwards() -> None:
    imports = all_imports()
    assert len(imports) > 100  # the walk found the packages' imports
    broken = [f"{imp.path}:{imp.line}: {why}" for imp in imports if (why := violation(imp))]
    assert not broken, "imports against the levels:\n" + "\n".join(broken)
    unknown = sorted({f"{imp.path}:{imp.line}: {imp.target}" for imp in imports
                      if placement(imp.target) is None})
    assert not unknown, "imports of modules on no level:\n" + "\n".join(unknown)


def test_the_check_sees_lazy_upward_and_cross_imports() -> None:
    known = set(all_modules())
    lazy = "def f():\n    if True:\n        from flywheel.serving_plan import ServingPlan\n"
    [upward] = imports_of("flywheel.settings", lazy, "flywheel/settings.py", known)
    assert (upward.target, upward.line) == ("flywheel.serving_plan", 3)
    assert "upward" in (violation(upward) or "")
    cross = "from server.engines import base\nimport trainer_worker.ppo.rollout\n"
    from_trainer, _ = imports_of("trainer_worker.ppo.x", cross, "trainer_worker/ppo/x.py", known)
    assert from_trainer.target == "server.engines.base"
    assert "independent" in (violation(from_trainer) or "")
    relative = "from . import logs\nfrom .vllm import swap\n"
    down = imports_of("flywheel.checkpoints", relative, "flywheel/checkpoints.py", known)
    assert [imp.target for imp in down] == ["flywheel.logs", "flywheel.vllm.swap"]
    assert violation(down[0]) is None and "upward" in (violation(down[1]) or "")
    assert placement("flywheel.vllm.params") == (2, "flywheel.vllm")
    assert placement("flywheel.something_new") is None  # a new flywheel module must be placed
