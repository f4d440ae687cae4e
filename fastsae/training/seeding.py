"""Reproducible random streams shared by the data sources and the shuffled stream."""

from __future__ import annotations

import torch


def keyed_generator(*keys: int) -> torch.Generator:
    """A distinct, reproducible CPU generator per key tuple (seed, epoch, buffer, ...)."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)
