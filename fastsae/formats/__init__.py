"""Checkpoint formats: each module reads and writes one library's files and builds an `SAE`.

`load(path)` detects the format of a folder. Formats know nothing of kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from fastsae.formats import saelens


def load(path: Union[str, Path], device=None, dtype=None):
    """Load an SAE from a checkpoint folder, detecting its format (SAELens v6 for now)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if saelens.detect(path):
        return saelens.load(path, device=device, dtype=dtype)
    raise FileNotFoundError(
        f"{path}: not a checkpoint fastsae can read: expected a folder with "
        f"{saelens.CFG_FILENAME} and {saelens.WEIGHTS_FILENAME} (SAELens v6)"
    )
