"""fastsae_cpp's sparse decode and its backward (backends `cpp` on CPU, `cuda` on GPU) beyond the
op's matrix (tests/ops/test_sparse_decode.py): poisoned output buffers of the _out ops, the kernel
ops' own refusals and opcheck, other thread counts."""

import pytest
import torch
from conftest import assert_rel_close
from helpers.cpp import DEVICES, kernel_backend, kernel_ops, poison_like

from fastsae import ops


def _decode_inputs(n, m, d_in, d_sae, device, dtype=torch.float32):
    values = torch.randn(n, m, dtype=dtype, device=device)
    indices = torch.randint(0, d_sae, (n, m), device=device)  # duplicates allowed: the padded form has them
    W_dec = torch.randn(d_sae, d_in, dtype=dtype, device=device)
    b_dec = torch.randn(d_in, dtype=dtype, device=device)
    dec_norm = torch.rand(d_sae, dtype=dtype, device=device) + 0.5
    return values, indices, W_dec, b_dec, dec_norm


def _dense_coef64(values, indices, d_sae, dec_norm):
    dense = torch.zeros(values.shape[0], d_sae, dtype=torch.float64, device=values.device)
    dense = dense.scatter_add(1, indices, values.double())
    return dense / dec_norm.double() if dec_norm is not None else dense


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_decode_out_writes_every_element(device):
    kops = kernel_ops(device)
    n, d_in, d_sae, m = 37, 100, 1000, 16
    values, indices, W_dec, b_dec, dec_norm = _decode_inputs(n, m, d_in, d_sae, device)
    expect = kops.sparse_decode(values, indices, W_dec, b_dec, dec_norm)
    out = poison_like(expect)
    kops.sparse_decode_out(values, indices, W_dec, b_dec, dec_norm, out=out)
    assert torch.equal(out, expect)

    grad_out = torch.randn(n, d_in, device=device)
    expect = kops.sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm)
    outs = [poison_like(t) for t in expect]
    kops.sparse_decode_backward_out(grad_out, values, indices, W_dec, dec_norm, grad_values=outs[0],
                                    grad_W_dec=outs[1])
    for name, got, ref in zip(("grad_values", "grad_W_dec"), outs, expect):
        assert torch.equal(got, ref), name


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_decode_rejects_out_of_range_indices(device):
    values, indices, W_dec, b_dec, dec_norm = _decode_inputs(3, 4, 10, 17, device)
    indices[1, 2] = 17
    # fastsae.ops refuses them first, with the ValueError of every backend (fastsae/validation.py);
    # the kernel op called directly below still refuses them itself.
    with kernel_backend(device), pytest.raises(ValueError, match=r"indices: expected latent indices in \[0, 17\)"):
        ops.sparse_decode(values, indices, W_dec, b_dec, dec_norm)
    indices[1, 2] = -1
    with pytest.raises(RuntimeError, match=r"got values in \[-1, "):
        kernel_ops(device).sparse_decode_backward(torch.randn(3, 10, device=device), values, indices, W_dec, None)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_kernel_decode_ops(device):
    kops = kernel_ops(device)
    n, d_in, d_sae, m = 6, 10, 17, 3
    values, indices, W_dec, b_dec, dec_norm = _decode_inputs(n, m, d_in, d_sae, device)
    torch.library.opcheck(kops.sparse_decode.default, (values, indices, W_dec, b_dec, dec_norm))
    torch.library.opcheck(kops.sparse_decode.default, (values, indices, W_dec, None, None))
    torch.library.opcheck(
        kops.sparse_decode_out.default, (values, indices, W_dec, b_dec, dec_norm), dict(out=torch.empty(n, d_in, device=device))
    )
    grad_out = torch.randn(n, d_in, device=device)
    torch.library.opcheck(kops.sparse_decode_backward.default, (grad_out, values, indices, W_dec, dec_norm))
    torch.library.opcheck(
        kops.sparse_decode_backward_out.default,
        (grad_out, values, indices, W_dec, None),
        dict(grad_values=torch.empty_like(values), grad_W_dec=torch.empty_like(W_dec)),
    )


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_kernels_under_other_thread_counts(threads):
    """The CPU kernels split rows and latents by thread count: results stay correct with one
    thread and with more threads than cores (uneven row blocks, latent chunks)."""
    n, d_in, d_sae, m = 67, 48, 1000, 16
    values, indices, W_dec, b_dec, dec_norm = _decode_inputs(n, m, d_in, d_sae, "cpu")
    grad_out = torch.randn(n, d_in)
    x = torch.randn(n, d_in)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with kernel_backend("cpu"):
            out = ops.sparse_decode(values, indices, W_dec, b_dec, dec_norm)
            gv, gw = torch.ops.fastsae.sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm)
            gx, ge, gb = torch.ops.fastsae.topk_encode_backward(values, indices, x, W_dec, b_dec)
    finally:
        torch.set_num_threads(before)
    coef = _dense_coef64(values, indices, d_sae, dec_norm)
    assert_rel_close(out, coef @ W_dec.double() + b_dec.double(), 1e-5, "decode")
    norm = dec_norm.double()[indices]
    assert_rel_close(gv, (grad_out.double() @ W_dec.double().T).gather(1, indices) / norm, 1e-5, "grad_values")
    assert_rel_close(gw, coef.T @ grad_out.double(), 1e-5, "grad_W_dec")
    dense = _dense_coef64(values, indices, d_sae, None)
    assert_rel_close(gx, dense @ W_dec.double(), 1e-5, "grad_x")
    assert_rel_close(ge, dense.T @ (x.double() - b_dec.double()), 1e-5, "grad_enc_weight")
    assert_rel_close(gb, dense.sum(0), 1e-5, "grad_b_enc")
