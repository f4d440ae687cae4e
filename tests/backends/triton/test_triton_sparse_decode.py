"""The Triton sparse decode (x_hat) and its row-wise gradient (grad values) against float64,
with the `triton` backend forced."""

import pytest
import torch
from conftest import assert_bf16_close, assert_rel_close
from helpers.triton_backend import DEVICE, poisoned, triton_ops  # noqa: F401  (fixture)

import fastsae
from fastsae import ops

pytestmark = pytest.mark.usefixtures("poisoned")


def _dense(values, indices, d_sae):
    n = values.shape[0]
    return torch.zeros(n, d_sae, dtype=torch.float64, device=values.device).scatter_add(1, indices, values.double())


@pytest.mark.parametrize(
    "d_in,d_sae,m,use_b_dec,use_norm",
    [(48, 333, 7, True, False), (100, 1000, 16, False, True), (100, 333, 1, True, True), (48, 1000, 20, True, True)],
)
def test_sparse_decode_matches_float64(d_in, d_sae, m, use_b_dec, use_norm):
    n = 41
    values = torch.randn(n, m, device=DEVICE)
    indices = torch.randint(0, d_sae, (n, m), device=DEVICE)  # duplicates allowed
    W_dec = torch.randn(d_sae, d_in, device=DEVICE)
    b_dec = torch.randn(d_in, device=DEVICE) if use_b_dec else None
    dec_norm = torch.rand(d_sae, device=DEVICE) + 0.5 if use_norm else None
    with fastsae.use_backend("triton"):
        out = ops.sparse_decode(values, indices, W_dec, b_dec, dec_norm)
    dense = _dense(values, indices, d_sae)
    if use_norm:
        dense = dense / dec_norm.double()
    ref = dense @ W_dec.double() + (b_dec.double() if use_b_dec else 0)
    assert out.dtype == W_dec.dtype
    assert_rel_close(out, ref, 1e-5, "sparse_decode")


def test_sparse_decode_with_no_latents_is_the_bias():
    values = torch.randn(5, 0, device=DEVICE)
    indices = torch.zeros(5, 0, dtype=torch.int64, device=DEVICE)
    W_dec = torch.randn(17, 10, device=DEVICE)
    b_dec = torch.randn(10, device=DEVICE)
    with fastsae.use_backend("triton"):
        out = ops.sparse_decode(values, indices, W_dec, b_dec)
    assert torch.equal(out, b_dec.expand(5, 10))


@pytest.mark.parametrize("m,use_norm", [(1, True), (7, False), (20, True)])
def test_gather_dot_matches_float64(m, use_norm):
    """grad values: rows[n] . W[i_nj] / norm[i_nj]; m = 20 spans two blocks of slots."""
    n, d_in, d_sae = 37, 100, 333
    rows = torch.randn(n, d_in, device=DEVICE)
    indices = torch.randint(0, d_sae, (n, m), device=DEVICE)
    W = torch.randn(d_sae, d_in, device=DEVICE)
    norm = torch.rand(d_sae, device=DEVICE) + 0.5 if use_norm else None
    out = triton_ops.gather_dot(rows, indices, W, norm)
    ref = (rows.double() @ W.double().T).gather(1, indices)
    if use_norm:
        ref = ref / norm.double()[indices]
    assert_rel_close(out, ref, 1e-5, "gather_dot")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_decode_16bit(dtype):
    n, d_in, d_sae, m = 41, 100, 333, 16
    values = torch.randn(n, m, device=DEVICE).to(dtype)
    indices = torch.randint(0, d_sae, (n, m), device=DEVICE)
    W_dec = torch.randn(d_sae, d_in, device=DEVICE).to(dtype)
    b_dec = torch.randn(d_in, device=DEVICE).to(dtype)
    dec_norm = (torch.rand(d_sae, device=DEVICE) + 0.5).to(dtype)
    with fastsae.use_backend("triton"):
        out = ops.sparse_decode(values, indices, W_dec, b_dec, dec_norm)
    ref = (_dense(values, indices, d_sae) / dec_norm.double()) @ W_dec.double() + b_dec.double()
    with fastsae.use_backend("torch"):
        same_dtype = ops.sparse_decode(values, indices, W_dec, b_dec, dec_norm)
    assert out.dtype == dtype
    assert_bf16_close(out, ref, same_dtype, atol=1e-6, what="x_hat")


def test_opcheck_decode_ops():
    n, d_in, d_sae, m = 6, 10, 17, 3
    values = torch.randn(n, m, device=DEVICE)
    indices = torch.randint(0, d_sae, (n, m), device=DEVICE)
    W = torch.randn(d_sae, d_in, device=DEVICE)
    b = torch.randn(d_in, device=DEVICE)
    norm = torch.rand(d_sae, device=DEVICE) + 0.5
    torch.library.opcheck(triton_ops.sparse_decode.default, (values, indices, W, b, norm))
    torch.library.opcheck(triton_ops.sparse_decode.default, (values, indices, W, None, None))
    torch.library.opcheck(triton_ops.gather_dot.default, (torch.randn(n, d_in, device=DEVICE), indices, W, norm))


def test_non_contiguous_inputs():
    """Views (a transposed weight, a column slice of the values) give the same answer."""
    n, d_in, d_sae, m = 9, 48, 333, 5
    W_t = torch.randn(d_in, d_sae, device=DEVICE)
    wide = torch.randn(n, 2 * m, device=DEVICE)
    values = wide[:, ::2]
    indices = torch.randint(0, d_sae, (n, m), device=DEVICE)
    assert not W_t.t().is_contiguous() and not values.is_contiguous()
    with fastsae.use_backend("triton"):
        out = ops.sparse_decode(values, indices, W_t.t())
    assert_rel_close(out, _dense(values, indices, d_sae) @ W_t.t().double(), 1e-5, "views")
