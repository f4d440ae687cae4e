"""The backends each op's matrix in tests/ops/ runs on. A test takes `backend` and runs on the
device that backend serves (conftest's `backend_device`): torch and cpp on the CPU, cuda on the
GPU, triton on the GPU where there is one and in Triton's interpreter on CPU tensors elsewhere."""

import pytest
import torch

CUDA = torch.cuda.is_available()
_NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def _param(backend, *case):
    return pytest.param(backend, *case, marks=_NEEDS_CUDA if backend == "cuda" else ())


BACKENDS = [_param(name) for name in ("torch", "cpp", "triton", "cuda")]

# The backends with float64 kernels for gradcheck.
FLOAT64_BACKENDS = [_param(name) for name in ("torch", "cpp", "cuda")]


def backends_except(*names):
    """BACKENDS less `names`: for a check a backend is known not to meet (say which, and why)."""
    return [_param(name) for name in ("torch", "cpp", "triton", "cuda") if name not in names]


def on_backends(cases, interpreter_cases=None):
    """(backend, *case) for every backend and case. `interpreter_cases`, when given, replaces
    `cases` for triton without a GPU: its interpreter is slow, so there it runs the cases the
    Triton tests always ran, and the whole list on a GPU."""
    rows = []
    for name in ("torch", "cpp", "triton", "cuda"):
        interpreted = name == "triton" and not CUDA and interpreter_cases is not None
        rows += [_param(name, *case) for case in (interpreter_cases if interpreted else cases)]
    return rows
