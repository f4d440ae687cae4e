"""Shared by the tests in tests/backends/triton/: the device the Triton kernels run on here, the
`fastsae_triton` ops, and poisoned output buffers."""

import pytest
import torch

from fastsae.kernels import _launch
from fastsae.ops import backend_triton  # noqa: F401  (registers every fastsae_triton::* op)

# On a GPU machine these are the CUDA tests (compiled kernels); without one the same tests run
# the kernels in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The raw Triton ops. Tests reach them through this name, never through a bare
# torch.ops.fastsae_triton that only works if an earlier test happened to import the kernels.
triton_ops = torch.ops.fastsae_triton

_INT_SENTINEL = -(2**30) + 7


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a Triton launcher allocates for its kernels (`fastsae.kernels._launch.empty`)
    comes back full of NaN (floats), a negative sentinel (integers) or True (bools), so an output
    element a kernel forgets to write cannot pass. torch itself is left alone: torch.compile calls
    torch.empty too, and must not see poisoned or patched factories."""
    real_empty = _launch.empty

    def empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(_INT_SENTINEL)
        return t

    monkeypatch.setattr(_launch, "empty", empty)
