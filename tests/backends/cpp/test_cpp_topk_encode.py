"""fastsae_cpp's TopK encode and its backward (backends `cpp` on CPU, `cuda` on GPU) beyond the
op's matrix (tests/ops/test_topk_encode.py): row and latent blocking over thread counts, poisoned
output buffers of the _out ops, the kernel ops' own refusals and opcheck, AuxK's -inf and NaN
entries."""

import pytest
import torch
from helpers.auxk import assert_aux_pre_matches, aux_pre_via_reference, random_dead
from helpers.cpp import DEVICES, encoder_inputs, kernel_backend, kernel_ops, poison_like, pre_activations64
from helpers.topk import check_topk_selection

from fastsae import DeadLatents, ops

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_rows,threads", [(1, 2), (3, 4), (600, 2), (5, 1)])
def test_topk_encode_row_and_latent_blocking(device, n_rows, threads):
    """Rows split into several blocks (600 > 256 rows per block), and few rows spread over more
    threads, where the latents are split too and partial top-k lists merged."""
    d_in, d_sae, k = 48, 1500, 16  # three latent blocks of 512, the last one partial
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n_rows, d_in, d_sae, device=device)
    _, dead = random_dead(d_sae, 300, capacity=307, device=device)  # 7 empty entries (-1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with kernel_backend(device):
            values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k, dead.latents, 20)
    finally:
        torch.set_num_threads(before)
    pre64 = pre_activations64(x, enc, b_enc, b_dec, dec_norm).cpu()
    check_topk_selection(values.cpu(), indices.cpu(), pre64, k)
    assert aux_pre.shape == (n_rows, 307) and aux_pre.dtype == x.dtype
    assert_aux_pre_matches(aux_pre, pre64, dead.latents, 20)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_aux", [0, 30])
def test_topk_encode_out_writes_every_element(device, k_aux):
    """Output buffers filled with NaN / -7 before the kernel: every element must be written,
    and the result equals the functional op's exactly (deterministic kernels)."""
    kops = kernel_ops(device)
    n, d_in, d_sae, k = 41, 100, 1000, 16
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae, device=device)
    # fewer dead than k_aux, and a list longer than their count: -inf and empty entries written too
    _, dead = random_dead(d_sae, 20, capacity=27, device=device)
    lat = dead.latents if k_aux else None
    expect = kops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k, lat, k_aux)
    assert expect[2].shape == (n, 27 if k_aux else 0)
    if k_aux:
        assert_aux_pre_matches(expect[2], pre_activations64(x, enc, b_enc, b_dec, dec_norm), lat, k_aux)
    outs = [poison_like(t) for t in expect]
    kops.topk_encode_out(x, enc, b_enc, b_dec, dec_norm, k, lat, k_aux, values=outs[0], indices=outs[1],
                         aux_pre=outs[2])
    for name, got, ref in zip(("values", "indices", "aux_pre"), outs, expect):
        assert torch.equal(got, ref), name

    indices = expect[1]
    grad_pre = torch.randn(n, k, device=device)
    expect = kops.topk_encode_backward(grad_pre, indices, x, enc, b_dec)
    outs = [poison_like(t) for t in expect]
    kops.topk_encode_backward_out(grad_pre, indices, x, enc, b_dec, grad_x_in=outs[0], grad_enc_weight=outs[1],
                                  grad_b_enc=outs[2])
    for name, got, ref in zip(("grad_x_in", "grad_enc_weight", "grad_b_enc"), outs, expect):
        assert torch.equal(got, ref), name


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_ops_reject_bad_arguments(device):
    """Direct calls of the fastsae_cpp ops get clear errors instead of a fault."""
    kops = kernel_ops(device)
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(4, 10, 17, device=device)
    with pytest.raises(RuntimeError, match="k: expected 1 <= k <= d_sae=17, got 18"):
        kops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 18, None, 0)
    with pytest.raises(RuntimeError, match="aux_latents: expected dtype int64, got Bool"):
        kops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 3, torch.ones(17, dtype=torch.bool, device=device), 2)
    with pytest.raises(RuntimeError, match="aux_latents: expected a vector of at most d_sae=17"):
        kops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 3, torch.arange(18, device=device), 2)
    with pytest.raises(RuntimeError, match="k_aux: expected 0 <= k_aux <= d_sae=17, got 18"):
        kops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 3, torch.arange(17, device=device), 18)
    with pytest.raises(RuntimeError, match=r"values: expected shape \[4, 3\], got \[4, 2\]"):
        v = torch.empty(4, 2, device=device)
        i = torch.empty(4, 3, dtype=torch.int64, device=device)
        kops.topk_encode_out(x, enc, b_enc, b_dec, dec_norm, 3, None, 0, values=v, indices=i, aux_pre=v[:, :0])
    bad = torch.tensor([[0, 17, 2]], device=device)
    with pytest.raises(RuntimeError, match=r"indices: expected latent indices in \[0, 17\)"):
        kops.topk_encode_backward(torch.randn(1, 3, device=device), bad, x[:1], enc, b_dec)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_kernel_topk_ops(device):
    kops = kernel_ops(device)
    n, d_in, d_sae, k = 6, 10, 17, 3
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae, device=device)
    mask = torch.zeros(d_sae, dtype=torch.bool, device=device)
    mask[:8] = True
    lat = DeadLatents.from_mask(mask, 10).latents  # 8 dead, 2 empty entries
    torch.library.opcheck(kops.topk_encode.default, (x, enc, b_enc, b_dec, dec_norm, k, lat, 4))
    torch.library.opcheck(kops.topk_encode.default, (x, enc, b_enc, None, None, k, None, 0))
    values, indices, aux_pre = kops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k, lat, 4)
    torch.library.opcheck(
        kops.topk_encode_out.default,
        (x, enc, b_enc, b_dec, dec_norm, k, lat, 4),
        dict(values=torch.empty_like(values), indices=torch.empty_like(indices), aux_pre=torch.empty_like(aux_pre)),
    )
    grad_pre = torch.randn(n, k, device=device)
    torch.library.opcheck(kops.topk_encode_backward.default, (grad_pre, indices, x, enc, b_dec))
    torch.library.opcheck(
        kops.topk_encode_backward_out.default,
        (grad_pre, indices, x, enc, None),
        dict(grad_x_in=torch.empty_like(x), grad_enc_weight=torch.empty_like(enc), grad_b_enc=torch.empty_like(b_enc)),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d_sae,dead_frac,k_aux", [(3, 5000, 0.5, 40), (37, 333, 0.95, 333), (5, 333, 1.0, 300)])
def test_aux_pre_with_dead_latents_at_minus_inf_and_nan_match_the_reference(device, n, d_sae, dead_frac, k_aux):
    """AuxK's contract when dead latents sit at -inf (b_enc = -inf) or NaN (b_enc = NaN): -inf
    ones are no candidates (their entries stay -inf, a row keeps min(k_aux, #candidates)), NaN
    ones rank first. Few rows over many latents split the latents into parts (merged per row);
    the list has empty entries (-1); poisoned output buffers must be written everywhere."""
    kops = kernel_ops(device)
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, 48, d_sae, device=device)
    off = torch.rand(d_sae, device=device) < 0.3
    b_enc[off] = float("-inf")
    mask = torch.rand(d_sae, device=device) < dead_frac
    nan_at = (mask & ~off).nonzero().flatten()[:2]
    b_enc[nan_at] = float("nan")
    n_dead = int(mask.sum())
    lat = DeadLatents.from_mask(mask, min(d_sae, n_dead + 5)).latents
    pre64 = pre_activations64(x, enc, b_enc, b_dec, dec_norm)
    expect = kops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 7, lat, k_aux)
    outs = [poison_like(t) for t in expect]
    kops.topk_encode_out(x, enc, b_enc, b_dec, dec_norm, 7, lat, k_aux, values=outs[0], indices=outs[1],
                         aux_pre=outs[2])
    for name, got, ref in zip(("values", "indices", "aux_pre"), outs, expect):  # NaN kept as NaN: equal_nan
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num()), name
    aux_pre = expect[2].cpu()
    assert_aux_pre_matches(aux_pre, pre64, lat, k_aux)
    want = aux_pre_via_reference(pre64.cpu(), lat.cpu(), k_aux)
    assert torch.equal(aux_pre.isneginf(), want.isneginf()) and torch.equal(aux_pre.isnan(), want.isnan())
    cands = (lat.cpu() >= 0) & ~(off.cpu()[lat.cpu().clamp(min=0)])
    kept = ~aux_pre.isneginf()
    assert (kept.sum(-1) == min(k_aux, int(cands.sum()))).all()
    assert not kept[:, ~cands].any(), "a -inf or empty entry was kept"
    if len(nan_at):
        assert aux_pre.isnan().sum(-1).eq(len(nan_at)).all(), "NaN latents rank first"
