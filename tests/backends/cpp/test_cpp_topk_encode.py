"""fastsae_cpp's TopK encode and its backward (backends `cpp` on CPU, `cuda` on GPU) against
float64 references: selections, aux selections, every gradient, poisoned output buffers."""

import pytest
import torch
from conftest import assert_bf16_close, assert_rel_close
from helpers.auxk import assert_aux_pre_matches, aux_pre_via_reference, random_dead
from helpers.cpp import DEVICES, encoder_inputs, kernel_backend, kernel_ops, poison_like, pre_activations64
from helpers.topk import check_topk_selection

from fastsae import DeadLatents, ops, reference

SHAPES = [(48, 333, 1), (48, 333, 7), (100, 1000, 16), (100, 333, 7), (48, 1000, 1), (100, 1000, 7)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_in,d_sae,k", SHAPES)
@pytest.mark.parametrize("use_b_dec,use_norm", [(True, False), (False, True), (True, True)])
def test_topk_encode_matches_float64(device, d_in, d_sae, k, use_b_dec, use_norm):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(37, d_in, d_sae, device=device)
    b_dec = b_dec if use_b_dec else None
    dec_norm = dec_norm if use_norm else None
    with kernel_backend(device):
        values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k)
    assert values.dtype == x.dtype and aux_pre.shape == (37, 0) and aux_pre.dtype == x.dtype
    check_topk_selection(values.cpu(), indices.cpu(), pre_activations64(x, enc, b_enc, b_dec, dec_norm).cpu(), k)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_encode_selects_before_relu(device):
    """Mostly negative pre-activations: the selection is the top-k of the raw pre-activations
    (not of their ReLU, where all negatives tie at 0), then ReLU zeroes the kept negatives."""
    d_in, d_sae, k = 48, 333, 16
    x, enc, b_enc, b_dec, _ = encoder_inputs(31, d_in, d_sae, device=device)
    b_enc = b_enc - 3.0
    with kernel_backend(device):
        values, indices, _ = ops.topk_encode(x, enc, b_enc, b_dec, None, k)
    pre64 = pre_activations64(x, enc, b_enc, b_dec, None).cpu()
    picked = pre64.gather(1, indices.cpu())
    assert (picked < 0).float().mean() > 0.5, "the test needs negative kept pre-activations"
    check_topk_selection(values.cpu(), indices.cpu(), pre64, k)
    assert (values.cpu()[picked < 0] == 0).all()


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
@pytest.mark.parametrize("n_dead,k_aux,capacity", [(50, 24, None), (5, 24, None), (5, 24, 9), (1, 1, None),
                                                   (0, 3, None), (0, 3, 4), (333, 333, None), (40, 1, 41)])
def test_topk_encode_aux_selects_among_dead(device, n_dead, k_aux, capacity):
    """aux_pre against the float64 contract: each row keeps its best min(k_aux, #dead) listed
    latents (raw pre-activations, no ReLU), -inf elsewhere and at every empty entry (-1);
    k_aux above the number of dead latents, and lists longer than their count."""
    d_in, d_sae, k = 48, 333, 7
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(29, d_in, d_sae, device=device)
    _, dead = random_dead(d_sae, n_dead, capacity, device=device)
    lat = dead.latents
    with kernel_backend(device):
        values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k, lat, k_aux)
    pre64 = pre_activations64(x, enc, b_enc, b_dec, dec_norm).cpu()
    check_topk_selection(values.cpu(), indices.cpu(), pre64, k)
    assert aux_pre.shape == (29, lat.shape[0]) and aux_pre.dtype == x.dtype
    assert_aux_pre_matches(aux_pre, pre64, lat, k_aux)
    kept = ~torch.isneginf(aux_pre.cpu())
    assert (kept.sum(-1) == min(n_dead, k_aux)).all()
    assert not kept[:, lat.cpu() < 0].any(), "an empty entry was kept"
    if n_dead >= 5 and k_aux >= n_dead:  # every dead latent kept: negatives among them stay raw
        assert (aux_pre.cpu()[kept] < 0).any(), "the test needs kept negative pre-activations (no ReLU)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_in,d_sae,k", [(48, 333, 7), (100, 1000, 16), (48, 1000, 1)])
@pytest.mark.parametrize("k_aux", [0, 5])
def test_topk_encode_gradients_match_float64(device, d_in, d_sae, k, k_aux):
    """fp32 encode then decode through the ops; every gradient (x, W_enc, b_enc, b_dec, both
    norm vectors, W_dec) against float64 autograd on the dense formula with the same selection.
    aux_pre's gradient (over a list with empty entries) reaches the kept entries only."""
    n = 23
    x, enc, b_enc, b_dec, norm_enc = encoder_inputs(n, d_in, d_sae, device=device)
    norm_dec = torch.rand(d_sae, device=device) + 0.5
    W_dec = torch.randn(d_sae, d_in, device=device) / d_in**0.5
    mask = torch.rand(d_sae, device=device) < 0.3
    lat = DeadLatents.from_mask(mask, int(mask.sum()) + 3).latents if k_aux else None
    grad_out = torch.randn(n, d_in, device=device)
    grad_aux = torch.randn(n, 0 if lat is None else lat.shape[0], device=device)
    names = ("x", "enc_weight", "b_enc", "b_dec", "norm_enc", "norm_dec", "W_dec")
    base = (x, enc, b_enc, b_dec, norm_enc, norm_dec, W_dec)
    leaves32 = [t.clone().requires_grad_() for t in base]
    x32, enc32, be32, bd32, ne32, nd32, wd32 = leaves32
    with kernel_backend(device):
        v, idx, aux_pre = ops.topk_encode(x32, enc32, be32, bd32, ne32, k, lat, k_aux)
        out = ops.sparse_decode(v, idx, wd32, bd32, nd32)
        # -inf entries carry a gradient of 0 through where (nothing reaches the pre-activations)
        torch.autograd.backward([out, aux_pre], [grad_out, grad_aux])

    leaves64 = [t.double().requires_grad_() for t in base]
    x64, enc64, be64, bd64, ne64, nd64, wd64 = leaves64
    pre = ((x64 - bd64) @ enc64.T + be64) * ne64
    acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    ref = (acts / nd64) @ wd64 + bd64
    outs, grads = [ref], [grad_out.double()]
    if lat is not None:
        assert_aux_pre_matches(aux_pre, pre.detach(), lat, k_aux)
        kept = ~torch.isneginf(aux_pre.detach())
        cols = pre[:, lat.clamp(min=0)]
        outs.append(torch.where(kept, cols, torch.zeros_like(cols)))
        grads.append(grad_aux.double())
    else:
        assert aux_pre.shape == (n, 0)
    torch.autograd.backward(outs, grads)
    assert_rel_close(out, ref.detach(), 1e-5, "output")
    for name, a, b in zip(names, leaves32, leaves64):
        assert b.grad.abs().max() > 0, name
        assert_rel_close(a.grad, b.grad, 1e-5, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_topk_encode_backward_matches_float64(device):
    """The backward op alone (duplicate latents across rows, several per latent)."""
    n, d_in, d_sae, m = 57, 100, 333, 16
    x, enc, _, b_dec, _ = encoder_inputs(n, d_in, d_sae, device=device)
    indices = torch.stack([torch.randperm(d_sae)[:m] for _ in range(n)]).to(device)
    grad_pre = torch.randn(n, m, device=device)
    with kernel_backend(device):
        gx, gw, gb = torch.ops.fastsae.topk_encode_backward(grad_pre, indices, x, enc, b_dec)
    dense = torch.zeros(n, d_sae, dtype=torch.float64, device=device).scatter(1, indices, grad_pre.double())
    assert_rel_close(gx, dense @ enc.double(), 1e-5, "grad_x")
    assert_rel_close(gw, dense.T @ (x.double() - b_dec.double()), 1e-5, "grad_enc_weight")
    assert_rel_close(gb, dense.sum(0), 1e-5, "grad_b_enc")
    # latents no row selected get exact zeros
    untouched = dense.abs().sum(0) == 0
    assert untouched.any() and (gw[untouched] == 0).all() and (gb[untouched] == 0).all()


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
def test_topk_encode_bf16_within_twice_torch_error(device):
    """bf16 as flash-attention checks it: |out - ref| <= 2 |torch_bf16 - ref| + atol, per row's
    sorted top-k values (near-ties make the selected latents themselves ambiguous in bf16)."""
    n, d_in, d_sae, k = 33, 100, 1000, 16
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae, device=device)
    bf = [t.bfloat16() for t in (x, enc, b_enc, b_dec, dec_norm)]
    with kernel_backend(device):
        values, indices, _ = ops.topk_encode(*bf, k)
    ref_values = reference.topk_encode(*(t.double() for t in bf), k, None, 0)[0]
    torch_values = reference.topk_encode(*bf, k, None, 0)[0]
    ordered = lambda t: t.double().sort(-1, descending=True).values  # noqa: E731
    assert values.dtype == torch.bfloat16
    assert_bf16_close(ordered(values), ordered(ref_values), ordered(torch_values), 1e-2, "bf16 values")
    # the values are those of the float64 pre-activations at the chosen latents, rounded to bf16
    pre64 = pre_activations64(*bf)
    assert_bf16_close(values.double(), pre64.gather(1, indices).relu(), torch_values.new_zeros(()), 1e-2, "at indices")

    grad_pre = torch.randn(n, k, device=device).bfloat16()
    with kernel_backend(device):
        got = torch.ops.fastsae.topk_encode_backward(grad_pre, indices, bf[0], bf[1], bf[3])
    ref = reference.topk_encode_backward(grad_pre.double(), indices, bf[0].double(), bf[1].double(), bf[3].double())
    same = reference.topk_encode_backward(grad_pre, indices, bf[0], bf[1], bf[3])
    for name, a, r, s in zip(("grad_x_in", "grad_enc_weight", "grad_b_enc"), got, ref, same):
        assert a.dtype == torch.bfloat16
        assert_bf16_close(a, r, s, 1e-2, name)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_encode_handles_ties_and_empty_batches(device):
    """Equal pre-activations everywhere (x = 0, constant bias): k distinct latents, value = bias;
    an empty batch gives empty outputs."""
    d_in, d_sae, k = 48, 700, 9
    x = torch.zeros(6, d_in, device=device)
    enc = torch.randn(d_sae, d_in, device=device)
    b_enc = torch.full((d_sae,), 0.25, device=device)
    with kernel_backend(device):
        values, indices, _ = ops.topk_encode(x, enc, b_enc, None, None, k)
        empty = ops.topk_encode(x[:0], enc, b_enc, None, None, k)
    assert (values == 0.25).all()
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all()
    assert empty[0].shape == (0, k) and empty[1].shape == (0, k)


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
