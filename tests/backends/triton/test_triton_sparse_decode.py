"""The Triton sparse decode's row-wise gradient kernel (grad values, fastsae_triton::gather_dot)
against float64, and opcheck of the raw decode ops. The op itself on every backend:
tests/ops/test_sparse_decode.py."""

import pytest
import torch
from conftest import assert_rel_close
from helpers.triton_backend import DEVICE, poisoned, triton_ops  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("poisoned")


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
