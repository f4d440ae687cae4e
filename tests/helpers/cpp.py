"""Shared helpers of the C++/CUDA backend tests (tests/backends/cpp/).

Each test runs on every device that has a fastsae kernel backend here: "cpu" with the `cpp`
backend always (its build failing is a test failure, not a skip), "cuda" with the `cuda`
backend when a GPU is present.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastsae
from conftest import encoder_inputs, pre_activations64  # noqa: F401  (re-exported for the cpp tests)

BACKEND_OF_DEVICE = {"cpu": "cpp", "cuda": "cuda"}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@contextlib.contextmanager
def kernel_backend(device: str):
    """Force the device's C++/CUDA backend (and fail loudly if it does not load)."""
    with fastsae.use_backend(BACKEND_OF_DEVICE[device]):
        yield


def kernel_ops(device: str):
    """torch.ops.fastsae_cpp, loaded through the device's backend module."""
    if device == "cuda":
        from fastsae.ops import backend_cuda  # noqa: F401
    else:
        from fastsae.ops import backend_cpp  # noqa: F401
    return torch.ops.fastsae_cpp


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like t, filled with NaN (floating) or a sentinel -7 (integer)."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -7)
