"""fastsae::topk_encode and its backward on every backend, against float64: odd shapes and k = 1,
with and without the bias and the norm, the selection made before the ReLU, AuxK's selection
among the dead latents, every gradient of encode -> decode, bf16, ties and empty batches. The
triton variants run with the Triton launchers' buffers poisoned, so an element a kernel forgets
to write cannot pass. (Kernel internals and the raw kernel ops: tests/backends/.)"""

import itertools

import pytest
import torch
from conftest import assert_bf16_close, assert_rel_close, encoder_inputs, pre_activations64
from helpers.auxk import assert_aux_pre_matches, random_dead
from helpers.backends import BACKENDS, FLOAT64_BACKENDS, on_backends
from helpers.topk import check_topk_selection
from helpers.triton_backend import poisoned  # noqa: F401  (fixture)

import fastsae
from fastsae import DeadLatents, ops, reference

pytestmark = pytest.mark.usefixtures("backend_device", "poisoned")

SHAPES = [(48, 333, 1), (48, 333, 7), (100, 1000, 16), (100, 333, 7), (48, 1000, 1), (100, 1000, 7)]
BIAS_AND_NORM = [(True, False), (False, True), (True, True)]
INTERPRETER_CASES = [(48, 333, 1, True, False), (48, 333, 7, False, True), (100, 1000, 16, True, True),
                     (100, 333, 7, True, False), (48, 1000, 1, False, True)]


@pytest.mark.parametrize(
    "backend,d_in,d_sae,k,use_b_dec,use_norm",
    on_backends([(*shape, *flags) for shape, flags in itertools.product(SHAPES, BIAS_AND_NORM)], INTERPRETER_CASES),
)
def test_topk_encode_matches_float64(backend, d_in, d_sae, k, use_b_dec, use_norm):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(37, d_in, d_sae)
    b_dec = b_dec if use_b_dec else None
    dec_norm = dec_norm if use_norm else None
    with fastsae.use_backend(backend):
        values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k)
    assert values.dtype == x.dtype and aux_pre.shape == (37, 0) and aux_pre.dtype == x.dtype
    check_topk_selection(values, indices, pre_activations64(x, enc, b_enc, b_dec, dec_norm), k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_encode_selects_before_relu(backend):
    """Mostly negative pre-activations: the selection is the top-k of the raw pre-activations
    (not of their ReLU, where all negatives tie at 0), then ReLU zeroes the kept negatives."""
    d_in, d_sae, k = 48, 333, 16
    x, enc, b_enc, b_dec, _ = encoder_inputs(31, d_in, d_sae)
    b_enc = b_enc - 3.0
    with fastsae.use_backend(backend):
        values, indices, _ = ops.topk_encode(x, enc, b_enc, b_dec, None, k)
    pre64 = pre_activations64(x, enc, b_enc, b_dec, None)
    picked = pre64.gather(1, indices)
    assert (picked < 0).float().mean() > 0.5, "the test needs negative kept pre-activations"
    check_topk_selection(values, indices, pre64, k)
    assert (values[picked < 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_dead,k_aux,capacity", [(50, 24, None), (5, 24, None), (5, 24, 9), (5, 3, 9), (1, 1, None),
                                                   (0, 3, None), (0, 3, 4), (333, 333, None), (40, 1, 41)])
def test_topk_encode_aux_selects_among_dead(backend, n_dead, k_aux, capacity):
    """aux_pre [N, C] against the float64 contract: each row keeps its best min(k_aux, #dead)
    listed latents (raw pre-activations, no ReLU), -inf elsewhere and at every empty entry (-1);
    k_aux above the number of dead latents, and lists longer than their count."""
    d_in, d_sae, k = 48, 333, 7
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(29, d_in, d_sae)
    _, dead = random_dead(d_sae, n_dead, capacity)
    lat = dead.latents
    with fastsae.use_backend(backend):
        values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k, lat, k_aux)
    pre64 = pre_activations64(x, enc, b_enc, b_dec, dec_norm)
    check_topk_selection(values, indices, pre64, k)
    assert aux_pre.shape == (29, lat.shape[0]) and aux_pre.dtype == x.dtype
    assert_aux_pre_matches(aux_pre, pre64, lat, k_aux)
    kept = ~torch.isneginf(aux_pre)
    assert (kept.sum(-1) == min(n_dead, k_aux)).all()
    assert not kept[:, lat < 0].any(), "an empty entry was kept"
    if n_dead >= 5 and k_aux >= n_dead:  # every dead latent kept: negatives among them stay raw
        assert (aux_pre[kept] < 0).any(), "the test needs kept negative pre-activations (no ReLU)"


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("use_b_dec,use_norm,k_aux", [(True, False, 0), (False, True, 0), (True, True, 5)])
def test_topk_encode_gradcheck(backend, use_b_dec, use_norm, k_aux):
    """Finite differences in float64 through the op's own autograd (selection is fixed locally)."""
    n, d_in, d_sae, k = 4, 5, 11, 3
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae, dtype=torch.float64)
    # fewer dead than k_aux, and -1 padding: exercises the constant (-inf) entries
    _, dead = random_dead(d_sae, 4, capacity=6)
    args = [x, enc, b_enc, b_dec if use_b_dec else None, dec_norm if use_norm else None]
    for t in args:
        if t is not None:
            t.requires_grad_(True)

    def f(*tensors):
        v, _, aux_pre = ops.topk_encode(*tensors, k, dead.latents if k_aux else None, k_aux)
        # -inf entries are constants: compare the kept ones (their pattern is fixed locally).
        return v, aux_pre.masked_fill(torch.isneginf(aux_pre), 0.0)

    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_in,d_sae,k", [(48, 333, 7), (100, 1000, 16), (48, 1000, 1)])
@pytest.mark.parametrize("k_aux", [0, 5])
def test_topk_encode_gradients_match_float64(backend, d_in, d_sae, k, k_aux):
    """fp32 encode then decode through the ops; every gradient (x, W_enc, b_enc, b_dec, both
    norm vectors, W_dec) against float64 autograd on the dense formula with the same selection.
    Encode and decode get different norm vectors (with one vector the norms cancel and its
    gradient is zero). aux_pre's gradient (over a list with empty entries) reaches the kept
    entries only."""
    n = 23
    x, enc, b_enc, b_dec, norm_enc = encoder_inputs(n, d_in, d_sae)
    norm_dec = torch.rand(d_sae) + 0.5
    W_dec = torch.randn(d_sae, d_in) / d_in**0.5
    mask = torch.rand(d_sae) < 0.3
    lat = DeadLatents.from_mask(mask, int(mask.sum()) + 3).latents if k_aux else None
    grad_out = torch.randn(n, d_in)
    grad_aux = torch.randn(n, 0 if lat is None else lat.shape[0])
    names = ("x", "enc_weight", "b_enc", "b_dec", "norm_enc", "norm_dec", "W_dec")
    base = (x, enc, b_enc, b_dec, norm_enc, norm_dec, W_dec)
    leaves32 = [t.clone().requires_grad_() for t in base]
    x32, enc32, be32, bd32, ne32, nd32, wd32 = leaves32
    with fastsae.use_backend(backend):
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_encode_backward_matches_float64(backend):
    """The backward op alone (duplicate latents across rows, several per latent); latents no row
    selected get exact zeros."""
    n, d_in, d_sae, m = 57, 100, 333, 16
    x, enc, _, b_dec, _ = encoder_inputs(n, d_in, d_sae)
    indices = torch.stack([torch.randperm(d_sae)[:m] for _ in range(n)])
    grad_pre = torch.randn(n, m)
    with fastsae.use_backend(backend):
        gx, gw, gb = torch.ops.fastsae.topk_encode_backward(grad_pre, indices, x, enc, b_dec)
    dense = torch.zeros(n, d_sae, dtype=torch.float64).scatter(1, indices, grad_pre.double())
    assert_rel_close(gx, dense @ enc.double(), 1e-5, "grad_x")
    assert_rel_close(gw, dense.T @ (x.double() - b_dec.double()), 1e-5, "grad_enc_weight")
    assert_rel_close(gb, dense.sum(0), 1e-5, "grad_b_enc")
    untouched = dense.abs().sum(0) == 0
    assert untouched.any() and (gw[untouched] == 0).all() and (gb[untouched] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_encode_bf16_within_twice_torch_error(backend):
    """bf16 as flash-attention checks it: |out - ref| <= 2 |torch_bf16 - ref| + atol, per row's
    sorted top-k values (near-ties make the selected latents themselves ambiguous in bf16)."""
    n, d_in, d_sae, k = 33, 100, 1000, 16
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae)
    bf = [t.bfloat16() for t in (x, enc, b_enc, b_dec, dec_norm)]
    with fastsae.use_backend(backend):
        values, indices, _ = ops.topk_encode(*bf, k)
    ref_values = reference.topk_encode(*(t.double() for t in bf), k, None, 0)[0]
    torch_values = reference.topk_encode(*bf, k, None, 0)[0]
    ordered = lambda t: t.double().sort(-1, descending=True).values  # noqa: E731
    assert values.dtype == torch.bfloat16
    assert_bf16_close(ordered(values), ordered(ref_values), ordered(torch_values), 1e-2, "bf16 values")
    # the values are those of the float64 pre-activations at the chosen latents, rounded to bf16
    pre64 = pre_activations64(*bf)
    assert_bf16_close(values.double(), pre64.gather(1, indices).relu(), torch_values.new_zeros(()), 1e-2, "at indices")

    grad_pre = torch.randn(n, k).bfloat16()
    with fastsae.use_backend(backend):
        got = torch.ops.fastsae.topk_encode_backward(grad_pre, indices, bf[0], bf[1], bf[3])
    ref = reference.topk_encode_backward(grad_pre.double(), indices, bf[0].double(), bf[1].double(), bf[3].double())
    same = reference.topk_encode_backward(grad_pre, indices, bf[0], bf[1], bf[3])
    for name, a, r, s in zip(("grad_x_in", "grad_enc_weight", "grad_b_enc"), got, ref, same):
        assert a.dtype == torch.bfloat16
        assert_bf16_close(a, r, s, 1e-2, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_encode_handles_ties_and_empty_batches(backend):
    """Equal pre-activations everywhere (x = 0, constant bias): k distinct latents, value = bias;
    an empty batch gives empty outputs."""
    d_in, d_sae, k = 48, 700, 9
    x = torch.zeros(6, d_in)
    enc = torch.randn(d_sae, d_in)
    b_enc = torch.full((d_sae,), 0.25)
    with fastsae.use_backend(backend):
        values, indices, _ = ops.topk_encode(x, enc, b_enc, None, None, k)
        empty = ops.topk_encode(x[:0], enc, b_enc, None, None, k)
    assert (values == 0.25).all()
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all()
    assert empty[0].shape == (0, k) and empty[1].shape == (0, k)
