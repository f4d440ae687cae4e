"""The Triton fused threshold encoder (fastsae_triton::threshold_encode, the row-wise sparse form
for ReLU and JumpReLU) against float64 references, with the `triton` backend forced."""

import pytest
import torch
from conftest import assert_bf16_close, assert_rel_close
from helpers.threshold import check_threshold_selection
from helpers.triton_backend import DEVICE, poisoned, triton_ops  # noqa: F401  (fixture)

import fastsae
from fastsae import ops, reference

pytestmark = pytest.mark.usefixtures("poisoned")

_ops = triton_ops


def _inputs(n, d_in, d_sae, dtype=torch.float32, extremes=True):
    """Random SAE parameters whose encoder rows share a direction (x[:, 0] then moves a row's
    count from none towards all). With `extremes`, row 0 keeps every latent and row 1 none."""
    x = torch.randn(n, d_in, device=DEVICE)
    enc = torch.randn(d_sae, d_in, device=DEVICE) / d_in**0.5
    enc[:, 0] += 1.0
    if extremes:
        x[:2] = 0.0
        x[0, 0], x[1, 0] = 20.0, -20.0
    b_enc = torch.randn(d_sae, device=DEVICE) * 0.1
    b_dec = torch.randn(d_in, device=DEVICE) * 0.1
    dec_norm = torch.rand(d_sae, device=DEVICE) + 0.5
    return [t.to(dtype) for t in (x, enc, b_enc, b_dec, dec_norm)]


def _cutoff(kind, d_sae):
    """ReLU's zeros or JumpReLU's positive per-latent thresholds."""
    if kind == "relu":
        return torch.zeros(d_sae, device=DEVICE)
    return torch.rand(d_sae, device=DEVICE) * 0.5


def _pre64(x_in, enc, b_enc, dec_norm):
    pre = x_in.double() @ enc.double().T + b_enc.double()
    return pre * dec_norm.double() if dec_norm is not None else pre


def _check(values, indices, counts, pre64, cutoff, max_width, tol=1e-5):
    got, ref, filled = check_threshold_selection(values, indices, counts, pre64, cutoff, max_width, tol)
    assert_rel_close(got, ref, tol, "values")
    return filled


@pytest.mark.parametrize(
    "n,d_in,d_sae,use_b_dec,use_norm,kind,max_width,extremes",
    [
        (37, 48, 333, True, False, "relu", 333, True),  # a row keeping everything, one keeping nothing
        (37, 100, 333, False, True, "jump", 40, True),  # rows over max_width: true counts, first 40 kept
        (37, 48, 333, True, True, "jump", 333, False),  # width = the largest count, below max_width
        (1, 100, 200, True, True, "jump", 200, False),  # one row
        (37, 48, 333, False, False, "relu", 0, True),  # max_width 0: counts only
    ],
)
def test_threshold_encode_matches_float64(n, d_in, d_sae, use_b_dec, use_norm, kind, max_width, extremes):
    x, enc, b_enc, b_dec, dec_norm = _inputs(n, d_in, d_sae, extremes=extremes)
    b_dec = b_dec if use_b_dec else None
    dec_norm = dec_norm if use_norm else None
    cutoff = _cutoff(kind, d_sae)
    with fastsae.use_backend("triton"):
        values, indices, counts = ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, max_width)
    assert values.dtype == x.dtype
    pre64 = _pre64(x - b_dec if use_b_dec else x, enc, b_enc, dec_norm)
    _check(values, indices, counts, pre64, cutoff, max_width)
    if extremes:
        assert counts[0] == d_sae and counts[1] == 0
    if max_width == 40:
        assert (counts > 40).any() and values.shape[1] == 40
    if not extremes:
        assert 0 < values.shape[1] < max_width  # the width is the largest count


@pytest.mark.parametrize("splits,max_width", [(3, 40), (6, 100), (2, 333)])
def test_threshold_encode_any_number_of_splits(splits, max_width):
    """Latent ranges compacted separately and gathered in order. Under the interpreter d_sae = 333
    is 6 tiles of 64: 6 splits give scratch rows of 64 (< max_width = 100) and a last split of 13
    latents, and row 0 (keeping all) fills every split's scratch row."""
    x, enc, b_enc, _, dec_norm = _inputs(37, 48, 333)
    cutoff = _cutoff("jump", 333)
    values, indices, counts = _ops.threshold_encode(x, enc, b_enc, dec_norm, cutoff, max_width, splits)
    _check(values, indices, counts, _pre64(x, enc, b_enc, dec_norm), cutoff, max_width)
    assert counts[0] == 333


def test_threshold_encode_nan_is_kept_and_fp64_is_exact():
    """fp64 inputs are multiplied and compared in fp64 (the cutoff too): the reference's result,
    exactly; a row holding a NaN keeps every latent, as NaN (its true count over max_width)."""
    x, enc, b_enc, b_dec, dec_norm = _inputs(29, 48, 333, torch.float64)
    x[2, 5] = float("nan")
    cutoff = _cutoff("jump", 333).double()
    with fastsae.use_backend("triton"):
        got = ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, 150)
    want = reference.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, 150)
    assert got[2][2] == 333 and got[0][2].isnan().all() and torch.equal(got[1][2], torch.arange(150, device=DEVICE))
    assert torch.equal(got[2], want[2]) and torch.equal(got[1], want[1])
    assert torch.equal(got[0].isnan(), want[0].isnan()) and torch.equal(got[0].isfinite(), want[0].isfinite())
    assert_rel_close(got[0][got[0].isfinite()], want[0][want[0].isfinite()], 1e-12, "fp64 values")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_threshold_encode_16bit(dtype):
    """16-bit inputs: the selection is made on the fp32 accumulator, so it matches the float64
    pre-activations of the (rounded) inputs up to fp32 rounding; values are as close to float64 as
    torch's own same-dtype computation, or closer."""
    x, enc, b_enc, b_dec, dec_norm = _inputs(37, 100, 333, dtype)
    cutoff = _cutoff("jump", 333)
    with fastsae.use_backend("triton"):
        values, indices, counts = ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, 200)
    assert values.dtype == dtype
    x_in = x - b_dec  # rounded as the backend rounds it
    pre64 = _pre64(x_in, enc, b_enc, dec_norm)
    _, _, filled = check_threshold_selection(values, indices, counts, pre64, cutoff, 200)
    same_dtype = ((x_in @ enc.T + b_enc) * dec_norm).gather(1, indices)[filled]
    assert_bf16_close(values[filled], pre64.gather(1, indices)[filled], same_dtype, atol=1e-6, what="values")


def test_threshold_encode_gradients_match_torch_backend():
    """Autograd through fastsae.ops.threshold_encode (the shared encoder backward on the Triton
    kernels) against the torch backend: every input's gradient, padding slots excluded."""
    x, enc, b_enc, b_dec, dec_norm = _inputs(13, 24, 150)
    cutoff = _cutoff("jump", 150)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (x, enc, b_enc, b_dec, dec_norm)]
        with fastsae.use_backend(backend):
            values, indices, counts = ops.threshold_encode(*leaves[:4], leaves[4], cutoff, 100)
            weight = torch.linspace(-1.0, 2.0, values.numel(), device=DEVICE).reshape(values.shape)
            loss = torch.where(values.isfinite(), values * weight, 0.0).sum()
            loss.backward()
        results[backend] = (values.detach(), indices, counts, [t.grad for t in leaves])
    (v_ref, i_ref, c_ref, g_ref), (v, i, c, g) = results["torch"], results["triton"]
    assert torch.equal(c, c_ref) and torch.equal(i, i_ref)
    assert_rel_close(v[v.isfinite()], v_ref[v_ref.isfinite()], 1e-5, "values")
    for name, got, want in zip(("x", "enc_weight", "b_enc", "b_dec", "dec_norm"), g, g_ref):
        assert_rel_close(got, want, 1e-5, f"grad {name}")


def test_triton_op_rejects_a_width_beyond_d_sae():
    x, enc, b_enc, _, _ = _inputs(4, 48, 333)
    with pytest.raises(ValueError, match="expected 0 <= max_width <= 333"):
        _ops.threshold_encode(x, enc, b_enc, None, _cutoff("relu", 333), 334, 0)


def test_opcheck_threshold_encode():
    x, enc, b_enc, _, dec_norm = _inputs(6, 10, 17)
    cutoff = _cutoff("jump", 17)
    torch.library.opcheck(_ops.threshold_encode.default, (x, enc, b_enc, dec_norm, cutoff, 9, 0))
    torch.library.opcheck(_ops.threshold_encode.default, (x, enc, b_enc, None, cutoff, 3, 2))


def test_torch_compile_keeps_the_op_whole():
    """fullgraph torch.compile over the op: opaque (its width is data-dependent), with the
    dynamic width of its fake implementation."""
    x, enc, b_enc, _, dec_norm = _inputs(37, 48, 333)
    cutoff = _cutoff("jump", 333)

    def f(x):
        values, indices, counts = _ops.threshold_encode(x, enc, b_enc, dec_norm, cutoff, 100, 0)
        return torch.where(values.isfinite(), values, 0.0).sum(1), counts

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(x), f(x)
    assert torch.equal(got[1], want[1])
    assert_rel_close(got[0], want[0], 1e-6, "compiled")


def test_threshold_encode_cutoff_is_strict():
    """A pre-activation equal to its cutoff is not kept: a zero row's pre-activations are b_enc
    exactly, and the cutoff equals b_enc at even latents, lies just below it at odd ones."""
    x, enc, b_enc, _, _ = _inputs(5, 48, 333, extremes=False)
    x[3] = 0.0
    cutoff = torch.where(torch.arange(333, device=DEVICE) % 2 == 0, b_enc, b_enc - 0.01)
    with fastsae.use_backend("triton"):
        values, indices, counts = ops.threshold_encode(x, enc, b_enc, None, None, cutoff, 333)
    assert counts[3] == 166
    assert torch.equal(indices[3, :166], torch.arange(1, 333, 2, device=DEVICE))
    assert torch.equal(values[3, :166], b_enc[1::2])
