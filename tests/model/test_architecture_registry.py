"""A new architecture is one file in fastsae/architectures plus its registry line: the config reads
its names and rules from the registry, and no module outside that package compares against an
architecture's name."""

import ast
from pathlib import Path

import pytest
from helpers.paths import ROOT

from fastsae import architectures, config
from fastsae.config import SAEConfig

PACKAGE = ROOT / "fastsae"

# Issue 23 moved every module off architecture names: none outside fastsae/architectures compares
# against one, and none may start (a module listed here with a count would be allowed that many).
NOT_YET_MOVED: dict[str, int] = {
}


def _name_comparisons(path: Path, names: set) -> list:
    """Comparisons (==, !=, in, not in) of anything against an architecture name literal."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for operand in (node.left, *node.comparators):
            items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            if any(isinstance(i, ast.Constant) and i.value in names for i in items):
                found.append(node.lineno)
                break
    return found


def test_the_config_accepts_exactly_the_registered_architectures():
    assert config.ARCHITECTURES == architectures.names() and len(architectures.names()) >= 5
    for name in architectures.names():
        arch = architectures.get(name)
        cfg = SAEConfig(d_in=4, d_sae=8, architecture=name, k=2 if arch.uses_k else None)
        saved = cfg.to_dict()
        assert saved["architecture"] == (arch.saelens_name or name)
        assert SAEConfig.from_dict(saved) == cfg, name
        for alias in arch.aliases:
            assert SAEConfig(d_in=4, d_sae=8, architecture=alias.upper()).architecture == name
    with pytest.raises(ValueError, match="architecture: expected one of"):
        SAEConfig(d_in=4, d_sae=8, architecture="not-an-architecture")


def test_no_module_outside_architectures_compares_against_an_architecture_name():
    names = set(architectures.names()) | {a for n in architectures.names() for a in architectures.get(n).aliases}
    offenders = {}
    scanned = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("architectures/", "kernels/", "csrc/")):
            continue
        scanned += 1
        found = _name_comparisons(path, names)
        if found:
            offenders[rel] = len(found)
    assert scanned > 30, "the scan found no module"
    over = {rel: n for rel, n in offenders.items() if n > NOT_YET_MOVED.get(rel, 0)}
    assert over == {}, f"architecture names compared outside fastsae/architectures: {over}"


def test_the_scan_finds_a_comparison(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(cfg):\n    return cfg.architecture in ('topk', 'x') or cfg.architecture == 'relu'\n")
    assert _name_comparisons(probe, {"topk", "relu"}) == [2, 2]
