"""Shared helpers of the C++/CUDA backend tests (tests/test_cpp_*.py).

Each test runs on every device that has a fastsae kernel backend here: "cpu" with the `cpp`
backend always (its build failing is a test failure, not a skip), "cuda" with the `cuda`
backend when a GPU is present.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastsae

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


def encoder_inputs(n, d_in, d_sae, dtype=torch.float32, device="cpu"):
    """x, enc_weight [d_sae, d_in], b_enc, b_dec, dec_norm: fresh random values, never zeros."""
    x = torch.randn(n, d_in, dtype=dtype, device=device)
    enc = torch.randn(d_sae, d_in, dtype=dtype, device=device) / d_in**0.5
    b_enc = torch.randn(d_sae, dtype=dtype, device=device) * 0.1
    b_dec = torch.randn(d_in, dtype=dtype, device=device) * 0.1
    dec_norm = torch.rand(d_sae, dtype=dtype, device=device) + 0.5
    return x, enc, b_enc, b_dec, dec_norm


def pre_activations64(x, enc, b_enc, b_dec, dec_norm):
    x, enc, b_enc = x.double(), enc.double(), b_enc.double()
    pre = (x - b_dec.double() if b_dec is not None else x) @ enc.T + b_enc
    return pre * dec_norm.double() if dec_norm is not None else pre


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like t, filled with NaN (floating) or a sentinel -7 (integer)."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -7)
