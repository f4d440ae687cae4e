"""Shared by the tests/test_triton_*.py files: the device the Triton kernels run on here, and
poisoned output buffers."""

import pytest
import torch

# On a GPU machine these are the CUDA tests (compiled kernels); without one the same tests run
# the kernels in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_INT_SENTINEL = -(2**30) + 7


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty during the test comes back full of NaN (floats), a negative sentinel
    (integers) or True (bools), so an output element a kernel forgets to write cannot pass."""
    real_empty = torch.empty

    def empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(_INT_SENTINEL)
        return t

    monkeypatch.setattr(torch, "empty", empty)
