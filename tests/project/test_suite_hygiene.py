"""Rules the test suite keeps so that it passes on any machine and in any order.

A fixture that replaced `torch.empty` for a whole test made torch.compile's own set-up fail on the
GPU (inductor allocates with it too). Tests poison or spy on fastsae's own functions instead."""

import ast
import inspect
from pathlib import Path

import torch
from helpers.paths import TESTS


def _torch_module_target(node: ast.AST) -> str:
    """'torch.x.y' if `node` names a torch module (torch, torch.nn.functional, ...), else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id == "torch"):
        return ""
    obj = torch
    for name in reversed(parts):
        obj = getattr(obj, name, None)
    return "torch" + "".join(f".{p}" for p in reversed(parts)) if inspect.ismodule(obj) else ""


def _resolve(dotted: str):
    obj = torch
    for name in dotted.split(".")[1:]:
        obj = getattr(obj, name, None)
    return obj


def _is_function(module: str, attr) -> bool:
    """Whether torch module `module`'s attribute `attr` is a function (settings such as
    torch.utils.deterministic.fill_uninitialized_memory are documented switches, not functions)."""
    return not isinstance(attr, str) or callable(getattr(_resolve(module), attr, None))


def _patches_of_torch_modules(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if name not in ("setattr", "delattr") or not node.args:
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.startswith("torch."):
                module, _, attr = first.value.rpartition(".")
                if _is_function(module, attr):
                    found.append(f"line {node.lineno}: {name}({first.value!r}, ...)")
            elif target := _torch_module_target(first):
                second = node.args[1] if len(node.args) > 1 else None
                attr = second.value if isinstance(second, ast.Constant) else None
                if _is_function(target, attr):
                    found.append(f"line {node.lineno}: {name}({target}, {attr!r}, ...)")
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Attribute) and (module := _torch_module_target(target.value)):
                    if _is_function(module, target.attr):
                        found.append(f"line {node.lineno}: assignment to {module}.{target.attr}")
    return found


def test_the_rule_finds_what_it_forbids():
    bad = "monkeypatch.setattr(torch, 'empty', f)\nmonkeypatch.setattr('torch.zeros', f)\ntorch.nn.functional.relu = f\n"
    assert len(_patches_of_torch_modules(bad)) == 3
    fine = ("monkeypatch.setattr(fastsae.ops, 'topk_encode', f)\nmonkeypatch.setattr(torch.Tensor, 'item', f)\n"
            "torch.utils.deterministic.fill_uninitialized_memory = True\n")
    assert _patches_of_torch_modules(fine) == []


def test_no_test_replaces_functions_of_torch_modules():
    """Patch fastsae's own functions (e.g. fastsae.kernels._launch.empty), never torch's: torch.compile,
    inductor and autograd call those too, and a patched factory breaks them in ways unrelated to
    the test."""
    offences = {
        str(path.relative_to(TESTS)): hits
        for path in sorted(TESTS.rglob("*.py"))
        if path != Path(__file__).resolve() and (hits := _patches_of_torch_modules(path.read_text()))
    }
    assert offences == {}
