"""fastsae::threshold_encode (the row-wise sparse ReLU/JumpReLU encode) on every backend,
against float64: the selection, the values, the counts, the padding and every gradient.

Near the cutoff a latent whose float64 pre-activation lies within rounding of it may go either
way, so selections are compared exactly only away from the boundary (as top-k ties are)."""

import pytest
import torch
from conftest import assert_bf16_close, assert_rel_close, encoder_inputs, pre_activations64
from helpers.threshold import check_threshold_selection

import fastsae
from fastsae import ops, reference

# The Triton kernels run in the interpreter here: keep its shapes small. On a GPU machine the
# triton variants run on CUDA tensors (conftest.backend_device).
BACKENDS = ["torch", "cpp", "triton"]
pytestmark = pytest.mark.usefixtures("backend_device")
SHAPES = [(48, 333), (100, 1000), (17, 65)]


def _cutoff_keeping(pre64, fraction):
    """A per-latent cutoff keeping about `fraction` of each latent's entries."""
    return pre64.quantile(1 - fraction, dim=0).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_in,d_sae", SHAPES)
@pytest.mark.parametrize("use_b_dec,use_norm", [(True, False), (False, True), (False, False)])
def test_threshold_encode_matches_float64(backend, d_in, d_sae, use_b_dec, use_norm):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(37, d_in, d_sae)
    b_dec = b_dec if use_b_dec else None
    dec_norm = dec_norm if use_norm else None
    pre64 = pre_activations64(x, enc, b_enc, b_dec, dec_norm)
    cutoff = _cutoff_keeping(pre64, 0.08)
    x[3] = b_dec if b_dec is not None else 0  # a row whose pre-activations are b_enc (* norm) ...
    cutoff = torch.maximum(cutoff, (b_enc * (dec_norm if dec_norm is not None else 1)).float() + 0.01)
    pre64 = pre_activations64(x, enc, b_enc, b_dec, dec_norm)  # ... all below the cutoff: it keeps nothing
    with fastsae.use_backend(backend):
        out = ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, d_sae)
    got, ref, filled = check_threshold_selection(*out, pre64, cutoff, d_sae)
    assert_rel_close(got, ref, 1e-5, "pre_values")
    assert out[2][3] == 0 and filled.sum(1).max() > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_encode_relu_cutoff_single_row_and_keep_all(backend):
    d_in, d_sae = 48, 333
    x, enc, b_enc, b_dec, _ = encoder_inputs(1, d_in, d_sae)
    pre64 = pre_activations64(x, enc, b_enc, b_dec, None)
    zero = torch.zeros(d_sae)
    with fastsae.use_backend(backend):
        relu = ops.threshold_encode(x, enc, b_enc, b_dec, None, zero, d_sae)
        everything = ops.threshold_encode(x, enc, b_enc, b_dec, None, torch.full((d_sae,), float("-inf")), d_sae)
    got, ref, _ = check_threshold_selection(*relu, pre64, zero, d_sae)
    assert_rel_close(got, ref, 1e-5, "relu pre_values")
    values, indices, counts = everything
    assert counts.tolist() == [d_sae] and torch.equal(indices[0], torch.arange(d_sae))
    assert_rel_close(values, pre64, 1e-5, "keep all")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_width", [1, 5])
def test_threshold_encode_reports_overflow(backend, max_width):
    """Rows with more than max_width kept latents report their true count and keep their first
    max_width; the width is max_width."""
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(23, 48, 333)
    pre64 = pre_activations64(x, enc, b_enc, b_dec, dec_norm)
    cutoff = _cutoff_keeping(pre64, 0.05)
    with fastsae.use_backend(backend):
        out = ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, max_width)
    got, ref, _ = check_threshold_selection(*out, pre64, cutoff, max_width)
    assert_rel_close(got, ref, 1e-5, "pre_values")
    assert out[0].shape[1] == max_width and (out[2] > max_width).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_encode_bf16(backend):
    d_in, d_sae = 64, 257
    x, enc, b_enc, b_dec, _ = encoder_inputs(29, d_in, d_sae, torch.bfloat16)
    pre64 = pre_activations64(x, enc, b_enc, b_dec, None)
    cutoff = _cutoff_keeping(pre64, 0.1)
    with fastsae.use_backend(backend):
        values, indices, counts = ops.threshold_encode(x, enc, b_enc, b_dec, None, cutoff, d_sae)
    assert values.dtype == torch.bfloat16
    # Selection in fp32 of bf16 inputs: the boundary is blurred by one bf16 rounding of the result.
    got, ref, filled = check_threshold_selection(values, indices, counts, pre64, cutoff, d_sae, tol=1e-2)
    same_dtype = reference.pre_activations(x, enc, b_enc, b_dec, None).gather(1, indices)[filled]
    assert_bf16_close(got, ref, same_dtype, 1e-3, "bf16 values")


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_encode_gradients_match_float64(backend):
    """Encode (ReLU-style cutoff), decode, every gradient against dense float64 autograd."""
    n, d_in, d_sae = 21, 48, 333
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae)
    W_dec = torch.randn(d_sae, d_in) / d_in**0.5
    cutoff = _cutoff_keeping(pre_activations64(x, enc, b_enc, b_dec, dec_norm), 0.1)
    grad_out = torch.randn(n, d_in)
    base = (x, enc, b_enc, b_dec, dec_norm, W_dec)
    leaves = [t.clone().requires_grad_() for t in base]
    with fastsae.use_backend(backend):
        pre, idx, _ = ops.threshold_encode(*leaves[:5], cutoff, d_sae)
        out = ops.sparse_decode(pre.relu(), idx, leaves[5], leaves[3], None)
        out.backward(grad_out)

    ref_leaves = [t.double().requires_grad_() for t in base]
    x64, enc64, be64, bd64, nrm64, wd64 = ref_leaves
    pre64 = ((x64 - bd64) @ enc64.T + be64) * nrm64
    real = pre.detach() != float("-inf")
    kept = torch.zeros(n, d_sae, dtype=torch.bool)
    kept[real.nonzero(as_tuple=True)[0], idx[real]] = True
    ref = (pre64 * kept).relu() @ wd64 + bd64
    ref.backward(grad_out.double())
    assert_rel_close(out, ref.detach(), 1e-5, "output")
    for name, a, b in zip(("x", "enc_weight", "b_enc", "b_dec", "dec_norm", "W_dec"), leaves, ref_leaves):
        assert b.grad.abs().max() > 0, name
        assert_rel_close(a.grad, b.grad, 1e-5, f"grad {name}")


def test_threshold_encode_gradcheck():
    n, d_in, d_sae = 4, 5, 11
    x, enc, b_enc, b_dec, dec_norm = (t.double().requires_grad_() for t in encoder_inputs(n, d_in, d_sae))
    cutoff = torch.full((d_sae,), 0.05, dtype=torch.float64)

    def f(*tensors):  # padding is -inf: clamp it to a constant so finite differences stay finite
        return ops.threshold_encode(*tensors, cutoff, d_sae)[0].clamp_min(-100.0)

    assert torch.autograd.gradcheck(f, (x, enc, b_enc, b_dec, dec_norm), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_encode_opcheck(backend):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(6, 10, 17)
    cutoff = torch.rand(17) * 0.2
    with fastsae.use_backend(backend):
        for req in (False, True):
            leaves = [t.clone().requires_grad_(req) for t in (x, enc, b_enc, b_dec, dec_norm)]
            torch.library.opcheck(torch.ops.fastsae.threshold_encode.default, (*leaves, cutoff, 17))
            torch.library.opcheck(torch.ops.fastsae.threshold_encode.default, (*leaves[:3], None, None, cutoff, 4))


def test_threshold_encode_rejects_bad_arguments():
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(4, 10, 17)
    cutoff = torch.zeros(17)
    with pytest.raises(ValueError, match="cutoff: expected a vector of shape \\(17,\\), got shape \\(16,\\)"):
        ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff[:16], 17)
    with pytest.raises(ValueError, match="cutoff: expected a floating-point tensor, got torch.int64"):
        ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, torch.zeros(17, dtype=torch.int64), 17)
    with pytest.raises(ValueError, match="max_width: expected an integer 0 <= max_width <= d_sae=17, got 18"):
        ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, 18)
    with pytest.raises(ValueError, match="x: expected last dimension d_in=10"):
        ops.threshold_encode(torch.randn(4, 11), enc, b_enc, b_dec, dec_norm, cutoff, 17)


def test_reference_threshold_encode_in_row_chunks(monkeypatch):
    """The torch path forms the dense pre-activations a chunk of rows at a time: same answer."""
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(50, 16, 40)
    cutoff = torch.rand(40) * 0.3
    whole = reference.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, 40)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 40 * 3)  # 3 rows per chunk
    chunked = reference.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, 40)
    assert torch.equal(whole[1], chunked[1]) and torch.equal(whole[2], chunked[2])
    real = whole[0] != float("-inf")
    assert torch.equal(real, chunked[0] != float("-inf"))
    assert_rel_close(chunked[0][real], whole[0][real], 1e-6)  # matmul blocking may round differently


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_encode_keeps_a_nan_input_row_whole(backend):
    """A NaN in a row's input makes all its pre-activations NaN: the row keeps every latent, as
    NaN, and its count says so (so relu/JumpReLU of it is NaN, as on the dense path). The
    other rows are untouched."""
    d_in, d_sae = 48, 333
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(9, d_in, d_sae)
    x[4, 17] = float("nan")
    cutoff = torch.rand(d_sae) * 0.3
    with fastsae.use_backend(backend):
        values, indices, counts = ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, d_sae)
    assert counts[4] == d_sae and values.shape == (9, d_sae)
    assert values[4].isnan().all() and torch.equal(indices[4], torch.arange(d_sae))
    assert not values[torch.arange(9) != 4].isnan().any()
    got, ref, _ = check_threshold_selection(values, indices, counts, pre_activations64(x, enc, b_enc, b_dec, dec_norm),
                                            cutoff, d_sae)
    assert_rel_close(got, ref, 1e-5, "pre_values")


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_encode_keeps_a_nan_latent_in_every_row(backend):
    """NaN in one encoder row (latent 5, in a SIMD chunk; latent 330, in the cpp kernel's tail)
    makes that latent NaN in every row: kept everywhere, even against a +inf cutoff."""
    d_in, d_sae = 48, 333
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(11, d_in, d_sae)
    nan_latents = torch.tensor([5, 330])
    enc[5, 0] = float("nan")
    enc[330, 47] = float("nan")
    pre64 = pre_activations64(x, enc, b_enc, b_dec, dec_norm)
    cutoff = _cutoff_keeping(pre64.nan_to_num(0.0), 0.1)
    cutoff[330] = float("inf")
    with fastsae.use_backend(backend):
        values, indices, counts = ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, d_sae)
    got, ref, _ = check_threshold_selection(values, indices, counts, pre64, cutoff, d_sae)
    assert_rel_close(got, ref, 1e-5, "pre_values")
    for latent in nan_latents.tolist():
        at = indices == latent
        assert (at.sum(1) == 1).all(), f"latent {latent} not kept in every row"
        assert values[at].isnan().all()
    nans = values.isnan()
    assert torch.equal(nans.sum(1), torch.full((11,), 2)), "NaN values other than the NaN latents"


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_encode_equal_to_cutoff_and_minus_inf_are_not_kept(backend):
    """With x = 0 and no b_dec or norm, pre = b_enc exactly: a latent whose cutoff equals it is
    not kept, one whose cutoff is the next float below it is; a -inf pre-activation (b_enc = -inf)
    is not kept even against a -inf cutoff."""
    d_in, d_sae = 16, 333
    _, enc, b_enc, _, _ = encoder_inputs(3, d_in, d_sae)
    b_enc[[7, 100]] = float("-inf")
    cutoff = b_enc.clone()
    below = torch.rand(d_sae) < 0.5
    below[[7, 100]] = False
    cutoff[below] = torch.nextafter(b_enc[below], torch.tensor(float("-inf")))
    with fastsae.use_backend(backend):
        values, indices, counts = ops.threshold_encode(torch.zeros(3, d_in), enc, b_enc, None, None, cutoff, d_sae)
    expect = below.nonzero()[:, 0]
    assert (counts == below.sum()).all() and values.shape == (3, int(below.sum()))
    assert (indices == expect).all() and (values == b_enc[expect]).all()
