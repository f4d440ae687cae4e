import os

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU: the Triton kernels run in Triton's interpreter on CPU tensors. This must be set
    # before triton (or fastsae, which registers the triton backend's devices) is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests compare against float64 references: keep CPU matmuls deterministic and fast on 2 cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    """max |out - ref| <= tol * max |ref| (relative error of the whole tensor), with shapes equal."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor, atol: float, what: str = ""):
    """flash-attention's rule: |out - ref| <= 2 |torch_same_dtype - ref| + atol (max over elements)."""
    err = (out.double() - ref).abs().max().item()
    base = (same_dtype.double() - ref).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 * {base:.3g} + {atol:g}"


def encoder_inputs(n, d_in, d_sae, dtype=torch.float32, device="cpu"):
    """x, enc_weight [d_sae, d_in], b_enc, b_dec, dec_norm: fresh random values, never zeros."""
    x = torch.randn(n, d_in, dtype=dtype, device=device)
    enc = torch.randn(d_sae, d_in, dtype=dtype, device=device) / d_in**0.5
    b_enc = torch.randn(d_sae, dtype=dtype, device=device) * 0.1
    b_dec = torch.randn(d_in, dtype=dtype, device=device) * 0.1
    dec_norm = torch.rand(d_sae, dtype=dtype, device=device) + 0.5
    return x, enc, b_enc, b_dec, dec_norm


def pre_activations64(x, enc, b_enc, b_dec, dec_norm):
    """The encoder's pre-activations in float64 (b_dec and dec_norm optional)."""
    x, enc, b_enc = x.double(), enc.double(), b_enc.double()
    pre = (x - b_dec.double() if b_dec is not None else x) @ enc.T + b_enc
    return pre * dec_norm.double() if dec_norm is not None else pre
