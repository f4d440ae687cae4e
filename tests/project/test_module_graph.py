"""The package's import graph follows ARCHITECTURE.md's one-way data flow: no two modules import
each other, not even through a function-level import (which only hides a circle)."""

import ast
from pathlib import Path

from helpers.paths import ROOT


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


def _imports(name: str, path: Path, known: set, package_for_submodule: bool = True) -> set:
    """The known modules `name` imports. `from fastsae import ops` counts the package fastsae as
    well as fastsae.ops (Python runs the package's __init__ for it), unless
    `package_for_submodule=False`: then the package counts only for `import fastsae` and for
    `from fastsae import <a name that is not a module>` (a package attribute used)."""
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
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule)
                if package_for_submodule or submodule not in known:
                    found.add(base)
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


# ARCHITECTURE.md's layers, lowest first: a module imports its own layer or lower ones, never a
# higher one. The package root (the public API) re-exports the library and what is below it; the
# command line, a package of its own, sits on top.
LAYERS = [
    ("core", ("fastsae.version", "fastsae.sparse", "fastsae.validation", "fastsae.config", "fastsae.activations",
              "fastsae.reference", "fastsae.auxk", "fastsae.losses", "fastsae.evals", "fastsae.kernels", "fastsae.runs",
              "fastsae.integrations._versions")),
    ("ops", ("fastsae.ops",)),
    ("model", ("fastsae.sae", "fastsae.sparse_path", "fastsae.architectures", "fastsae.distributed")),
    ("formats", ("fastsae.formats",)),
    ("library", ("fastsae.training", "fastsae.integrations", "fastsae.browse", "fastsae.bench")),
    ("public API", ()),  # the package root `fastsae` alone
    ("command line", ("fastsae.cli",)),
]
PUBLIC_API = [name for name, _ in LAYERS].index("public API")


def _layer(module: str) -> int:
    """The layer of `module`: the longest matching prefix wins."""
    if module == "fastsae":
        return PUBLIC_API
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} is in no layer of LAYERS: add it"
    return found


def test_no_module_imports_a_higher_layer():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods), package_for_submodule=False) for name, path in mods.items()}
    upward = sorted(
        f"{name} ({LAYERS[_layer(name)][0]}) imports {dep} ({'package root' if dep == 'fastsae' else LAYERS[_layer(dep)][0]})"
        for name, deps in graph.items()
        for dep in deps
        if _layer(dep) > _layer(name)
    )
    assert upward == []


def test_the_layer_rule_finds_what_it_forbids():
    assert _layer("fastsae.formats.saelens") > _layer("fastsae.sae") > _layer("fastsae.ops")
    assert _layer("fastsae.cli.train") > _layer("fastsae.training.trainer") > _layer("fastsae.formats")
    assert _layer("fastsae.cli") > _layer("fastsae") > _layer("fastsae.training.trainer")


# The command line is the package fastsae.cli: no module outside it imports one of its modules.
CLI_MODULES = {name for name in _modules() if name == "fastsae.cli" or name.startswith("fastsae.cli.")}
# Packages a format reader must not know: it builds an SAE from files and nothing more.
ABOVE_FORMATS = ("fastsae.training", "fastsae.browse", "fastsae.evals", "fastsae.bench")


def _graph() -> dict[str, set]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_command_line_modules_exist():
    """The CLI set above finds the command modules, so the checks below are not vacuous."""
    assert {"fastsae.cli", "fastsae.cli.train", "fastsae.cli.flags", "fastsae.cli.eval", "fastsae.cli.browse"} <= CLI_MODULES


def test_no_library_module_imports_the_command_line():
    graph = _graph()
    leaks = sorted(f"{a} -> {b}" for a, deps in graph.items() if a not in CLI_MODULES for b in deps if b in CLI_MODULES)
    assert leaks == []


def test_formats_import_no_higher_package():
    """formats read a `fastsae train` run folder through fastsae.runs, not through the trainer."""
    graph = _graph()
    formats = [name for name in graph if name == "fastsae.formats" or name.startswith("fastsae.formats.")]
    assert len(formats) > 4
    leaks = sorted(f"{a} -> {b}" for a in formats for b in graph[a] if b.startswith(ABOVE_FORMATS))
    assert leaks == []


def test_the_run_folder_layout_imports_nothing_of_fastsae():
    """Every layer asks fastsae.runs where a run keeps things, so it must sit below them all."""
    graph = _graph()
    assert graph["fastsae.runs"] == set()
    users = {name for name, deps in graph.items() if "fastsae.runs" in deps}
    assert {"fastsae.formats", "fastsae.training.checkpoint", "fastsae.cli.browse"} <= users


def test_the_library_part_of_browse_imports_no_training():
    graph = _graph()
    browse = [name for name in graph if (name == "fastsae.browse" or name.startswith("fastsae.browse.")) and name not in CLI_MODULES]
    assert len(browse) >= 3
    assert sorted(f"{a} -> {b}" for a in browse for b in graph[a] if b.startswith("fastsae.training")) == []


def test_no_module_outside_the_kernels_is_over_500_lines():
    """Small files with one job each (ARCHITECTURE.md): a module that grows past 500 lines is split."""
    package = ROOT / "fastsae"
    sizes = {p.relative_to(package).as_posix(): len(p.read_text().splitlines()) for p in package.rglob("*.py")
             if not p.relative_to(package).as_posix().startswith(("kernels/", "csrc/"))}
    assert len(sizes) > 50
    assert {name: n for name, n in sizes.items() if n > 500} == {}
