"""The package's import graph follows ARCHITECTURE.md's one-way data flow: no two modules import
each other, not even through a function-level import (which only hides a circle)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in [*(ROOT / "fastsae").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":  # installed as fastsae.kernels
            parts = ["fastsae", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, known: set) -> set:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def test_no_two_modules_import_each_other():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    assert len(graph) > 30 and graph["fastsae.training.trainer"], "the scan found nothing: the test is vacuous"
    circles = sorted(
        f"{a} <-> {b}"
        for a, deps in graph.items()
        for b in deps
        # a package and its own submodules import each other by design (re-exports)
        if a < b and a in graph[b] and not (b.startswith(a + ".") or a.startswith(b + "."))
    )
    assert circles == []


def test_the_module_knows_no_file_format():
    """formats build SAEs; the module, its architectures and the ops never import formats."""
    mods = _modules()
    for name in ("fastsae.sae", "fastsae.architectures.base", "fastsae.ops"):
        assert not {m for m in _imports(name, mods[name], set(mods)) if m.startswith("fastsae.formats")}, name
