"""The version gate both integrations share: a patch mirrors one release range's math."""

from __future__ import annotations

import importlib
import re
from typing import Any


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def import_supported(module: str, library: str, package: str, extra: str, supported: tuple[str, str],
                     supported_range: tuple[tuple[int, int], tuple[int, int]], caller: str) -> Any:
    """Import `module`, or raise a RuntimeError naming the installed version and the range."""
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(
            f"{caller}: {library} is not installed (supported: {package}{','.join(supported)}; "
            f"pip install 'fastsae[{extra}]')"
        ) from exc
    installed = getattr(imported, "__version__", "unknown")
    low, high = supported_range
    if not low <= version_tuple(installed)[:2] < high:
        raise RuntimeError(
            f"{caller}: installed {package} {installed} is outside the supported range "
            f"{package}{','.join(supported)}; the patch mirrors that version's math and would not "
            "be checked against yours"
        )
    return imported
