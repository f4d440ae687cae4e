"""fastsae_cpp's threshold encode (ReLU / JumpReLU in row-wise sparse form, backend `cpp`) against
float64 references: selections (exact away from the cutoff), true counts and the max_width cap,
padding, row and latent blocking with 1 and 2 threads, bf16 and float64, gradients."""

import contextlib

import pytest
import torch
from conftest import assert_bf16_close, assert_rel_close
from helpers.cpp import encoder_inputs, kernel_backend, kernel_ops, pre_activations64
from helpers.threshold import check_threshold_selection

import fastsae
from fastsae import ops, reference

# The cpp backend only: the cuda backend's threshold_encode is still the reference's.
DEVICE = "cpu"


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cutoff_between_rows(pre64):
    """Per-latent cutoffs halfway between two of the latent's pre-activations (a random pair of
    neighbours in sorted order, or the widest gap when that one is narrow), so that no entry is
    near its cutoff and every backend must make the same selection."""
    s = pre64.sort(0).values
    gaps = s.diff(dim=0)
    cols = torch.arange(s.shape[1])
    r = torch.randint(0, s.shape[0] - 1, (s.shape[1],))
    narrow = gaps[r, cols] < 1e-3 * pre64.abs().max()
    r = torch.where(narrow, gaps.argmax(0), r)
    return (s[r, cols] + s[r + 1, cols]) / 2


def make_cutoff(kind, d_sae):
    return torch.zeros(d_sae) if kind == "relu" else torch.rand(d_sae) * 0.5 + 0.01


@pytest.mark.parametrize("d_in,d_sae", [(48, 333), (100, 1000)])
@pytest.mark.parametrize("cutoff_kind", ["relu", "jumprelu"])
@pytest.mark.parametrize("use_b_dec,use_norm", [(False, False), (True, False), (False, True), (True, True)])
def test_threshold_encode_matches_float64(d_in, d_sae, cutoff_kind, use_b_dec, use_norm):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(37, d_in, d_sae)
    b_dec = b_dec if use_b_dec else None
    dec_norm = dec_norm if use_norm else None
    cutoff = make_cutoff(cutoff_kind, d_sae)
    with kernel_backend(DEVICE):
        values, indices, counts = ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, d_sae)
    assert values.dtype == x.dtype
    got, ref, _ = check_threshold_selection(values, indices, counts, pre_activations64(x, enc, b_enc, b_dec, dec_norm),
                                         cutoff, d_sae)
    assert_rel_close(got, ref, 1e-5, "values")


def _with_full_and_empty_rows(x, enc):
    """Every latent reads feature 0 with weight 1: row 0 (x = +100 there) keeps every latent,
    row 1 (x = -100) keeps none; the other rows are 0 there."""
    enc[:, 0] = 1.0
    x[:, 0] = 0.0
    x[0, 0], x[1, 0] = 100.0, -100.0


@pytest.mark.parametrize("n_rows,threads", [(1, 1), (1, 2), (3, 4), (5, 2), (600, 2), (600, 1)])
def test_threshold_encode_row_and_latent_blocking(n_rows, threads):
    """Rows split into several blocks (600 > 256 rows per block) and few rows over more threads,
    where the latents are split too and each row's parts joined in latent order; mostly sparse
    rows (~5% kept) with, when there are enough rows, one dense row and one empty row. (Latents
    are split when rows < threads: 1 row on 2 threads, 3 rows on 4.)"""
    d_in, d_sae = 48, 1500  # three latent blocks of 512, the last one partial
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n_rows, d_in, d_sae)
    b_enc = b_enc - 1.5
    if n_rows >= 3:
        _with_full_and_empty_rows(x, enc)
    cutoff = make_cutoff("jumprelu", d_sae)
    with num_threads(threads), kernel_backend(DEVICE):
        values, indices, counts = ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, d_sae)
    got, ref, _ = check_threshold_selection(values, indices, counts, pre_activations64(x, enc, b_enc, b_dec, dec_norm),
                                         cutoff, d_sae)
    assert_rel_close(got, ref, 1e-5, "values")
    if n_rows >= 3:
        assert counts[0] == d_sae and counts[1] == 0 and values.shape[1] == d_sae
        assert 0.01 < counts[2:].float().mean() / d_sae < 0.15


@pytest.mark.parametrize("n_rows,threads,max_width", [(37, 2, 30), (37, 1, 1), (3, 4, 30), (3, 4, 700), (3, 4, 0)])
def test_threshold_encode_max_width_keeps_first_latents(n_rows, threads, max_width):
    """Rows keeping more than max_width latents report their true count and keep their first
    max_width (in latent order; with 3 rows on 4 threads, across latent parts: part 0 holds
    latents 0-511, so 700 spans both)."""
    d_in, d_sae = 48, 1500
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n_rows, d_in, d_sae)
    _with_full_and_empty_rows(x, enc)
    cutoff = make_cutoff("relu", d_sae)
    with num_threads(threads), kernel_backend(DEVICE):
        values, indices, counts = ops.threshold_encode(x, enc, b_enc - 0.5, b_dec, dec_norm, cutoff, max_width)
    pre64 = pre_activations64(x, enc, b_enc - 0.5, b_dec, dec_norm)
    got, ref, _ = check_threshold_selection(values, indices, counts, pre64, cutoff, max_width)
    assert_rel_close(got, ref, 1e-5, "values")
    assert values.shape[1] == max_width and (counts > max_width).any()
    assert counts[0] == d_sae and (indices[0] == torch.arange(max_width)).all()


def test_threshold_encode_bf16_within_twice_torch_error():
    """bf16 in, fp32 cutoff: the selection is made on fp32 pre-activations (so it is exact away
    from the cutoff, as fp32's), and the values, rounded to bf16, are as close to the float64
    pre-activations as twice torch's bf16 pre-activations are, plus atol (flash-attention's rule)."""
    n, d_in, d_sae = 33, 100, 1000
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae)
    bf = [t.bfloat16() for t in (x, enc, b_enc, b_dec, dec_norm)]
    cutoff = make_cutoff("jumprelu", d_sae)
    with kernel_backend(DEVICE):
        values, indices, counts = ops.threshold_encode(*bf, cutoff, d_sae)
    assert values.dtype == torch.bfloat16
    got, ref, _ = check_threshold_selection(values, indices, counts, pre_activations64(*bf), cutoff, d_sae)
    torch_bf16 = reference.pre_activations(*bf)
    filled = torch.arange(values.shape[1]) < counts.clamp(max=values.shape[1])[:, None]
    same = torch_bf16.gather(1, indices)[filled]
    assert_bf16_close(got, ref, same, 1e-3, "bf16 values")


def test_threshold_encode_float64():
    n, d_in, d_sae = 29, 100, 1000
    inputs = encoder_inputs(n, d_in, d_sae, dtype=torch.float64)
    cutoff = make_cutoff("jumprelu", d_sae).double()
    with kernel_backend(DEVICE):
        values, indices, counts = ops.threshold_encode(*inputs, cutoff, d_sae)
    assert values.dtype == torch.float64
    got, ref, _ = check_threshold_selection(values, indices, counts, pre_activations64(*inputs), cutoff, d_sae, 1e-12)
    assert_rel_close(got, ref, 1e-12, "values")


def test_threshold_encode_nan_inf_and_empty_batches():
    """A NaN pre-activation is always kept (as NaN), even against a +inf cutoff; otherwise an
    infinite cutoff keeps nothing (width 0), a -inf cutoff everything finite; an empty batch gives
    empty outputs."""
    d_in, d_sae = 48, 333
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(6, d_in, d_sae)
    x[2, 5] = float("nan")
    cutoff = make_cutoff("relu", d_sae)
    cutoff[:7] = float("inf")
    cutoff[7:20] = float("-inf")
    finite = torch.ones(6, dtype=torch.bool)
    finite[2] = False
    with kernel_backend(DEVICE):
        values, indices, counts = ops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, d_sae)
        infinite = torch.full((d_sae,), float("inf"))
        nothing = ops.threshold_encode(x[finite], enc, b_enc, b_dec, dec_norm, infinite, d_sae)
        empty = ops.threshold_encode(x[:0], enc, b_enc, b_dec, dec_norm, cutoff, d_sae)
    assert counts[2] == d_sae and values[2].isnan().all() and torch.equal(indices[2], torch.arange(d_sae))
    pre64 = pre_activations64(x, enc, b_enc, b_dec, dec_norm)
    got, ref, _ = check_threshold_selection(values, indices, counts, pre64, cutoff, d_sae)
    assert_rel_close(got, ref, 1e-5, "values")
    kept_latents = torch.zeros(d_sae, dtype=torch.bool)
    kept_latents[indices[finite][values[finite] > float("-inf")]] = True
    assert not kept_latents[:7].any() and kept_latents[7:20].all()
    assert nothing[0].shape == (5, 0) and nothing[1].shape == (5, 0) and (nothing[2] == 0).all()
    assert empty[0].shape == (0, 0) and empty[1].shape == (0, 0) and empty[2].shape == (0,)


@pytest.mark.parametrize("threads", [1, 2])
def test_threshold_encode_is_strict(threads):
    """x = 0 makes pre = b_enc exactly: a latent whose cutoff equals it is not kept, one whose
    cutoff is the next float below is (every row, in the SIMD lanes and the scalar tail)."""
    d_in, d_sae = 16, 1000  # 1000 = 62 chunks of 16 + a tail of 8
    _, enc, b_enc, _, _ = encoder_inputs(3, d_in, d_sae)
    cutoff = b_enc.clone()
    below = torch.rand(d_sae) < 0.5
    cutoff[below] = torch.nextafter(b_enc[below], torch.tensor(float("-inf")))
    with num_threads(threads), kernel_backend(DEVICE):
        values, indices, counts = ops.threshold_encode(torch.zeros(3, d_in), enc, b_enc, None, None, cutoff, d_sae)
    expect = below.nonzero()[:, 0]
    assert (counts == below.sum()).all() and values.shape[1] == below.sum()
    assert (indices == expect).all() and (values == b_enc[expect]).all()


def test_threshold_encode_writes_every_element():
    """With torch's deterministic mode filling fresh tensors (NaN, and INT64_MAX for indices),
    the outputs the kernel allocates start poisoned: every element must be written."""
    kops = kernel_ops(DEVICE)
    n, d_in, d_sae = 41, 100, 1000
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae)
    cutoff = make_cutoff("jumprelu", d_sae)
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(3).isnan().all()  # the poisoning is on
        values, indices, counts = kops.threshold_encode(x, enc, b_enc - 1.5, b_dec, dec_norm, cutoff, d_sae)
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]
    pre64 = pre_activations64(x, enc, b_enc - 1.5, b_dec, dec_norm)
    got, ref, _ = check_threshold_selection(values, indices, counts, pre64, cutoff, d_sae)
    assert_rel_close(got, ref, 1e-5, "values")
    assert (counts < values.shape[1]).any(), "the test needs padding slots"


@pytest.mark.parametrize("max_width_kind", ["all", "capped"])
def test_threshold_encode_gradients_match_torch_backend_float64(max_width_kind):
    """fp32 through fastsae.ops with the cpp backend (kernel forward, cpp encoder backward)
    against the torch backend in float64, with cutoffs away from every pre-activation (the same
    selection by construction): outputs and the gradients of x, W_enc, b_enc, b_dec, dec_norm."""
    n, d_in, d_sae = 23, 100, 1000
    base = encoder_inputs(n, d_in, d_sae)
    cutoff = cutoff_between_rows(pre_activations64(*base)).float()
    max_width = d_sae if max_width_kind == "all" else 100
    names = ("x", "enc_weight", "b_enc", "b_dec", "dec_norm")

    leaves32 = [t.clone().requires_grad_() for t in base]
    with kernel_backend(DEVICE):
        values, indices, counts = ops.threshold_encode(*leaves32, cutoff, max_width)
    grad = torch.randn(values.shape)
    values.backward(grad)

    leaves64 = [t.double().requires_grad_() for t in base]
    with fastsae.use_backend("torch"):
        values64, indices64, counts64 = ops.threshold_encode(*leaves64, cutoff.double(), max_width)
    values64.backward(grad.double())

    assert torch.equal(indices, indices64) and torch.equal(counts, counts64)
    if max_width_kind == "capped":
        assert (counts > max_width).any()
    padding = values64 == float("-inf")
    assert torch.equal(values == float("-inf"), padding)
    assert_rel_close(values[~padding], values64[~padding].detach(), 1e-5, "values")
    for name, a, b in zip(names, leaves32, leaves64):
        assert b.grad.abs().max() > 0, name
        assert_rel_close(a.grad, b.grad, 1e-5, f"grad {name}")


@pytest.mark.parametrize("use_b_dec,use_norm", [(True, False), (False, True), (True, True)])
def test_threshold_encode_gradcheck(use_b_dec, use_norm):
    """Finite differences in float64 through the backend (its float64 kernel), padding masked."""
    n, d_in, d_sae = 4, 5, 11
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae, dtype=torch.float64)
    args = [x, enc, b_enc, b_dec if use_b_dec else None, dec_norm if use_norm else None]
    cutoff = cutoff_between_rows(pre_activations64(*args))
    for t in args:
        if t is not None:
            t.requires_grad_(True)

    def f(*tensors):
        values, _, _ = ops.threshold_encode(*tensors, cutoff, d_sae)
        return values.masked_fill(values == float("-inf"), 0.0)

    with kernel_backend(DEVICE):
        assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7)


def test_kernel_op_rejects_bad_arguments():
    """Direct calls of fastsae_cpp::threshold_encode get clear errors instead of a fault."""
    kops = kernel_ops(DEVICE)
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(4, 10, 17)
    cutoff = torch.zeros(17)
    with pytest.raises(RuntimeError, match="max_width: expected 0 <= max_width <= d_sae=17, got 18"):
        kops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, 18)
    with pytest.raises(RuntimeError, match=r"cutoff: expected shape \[17\], got \[16\]"):
        kops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff[:16], 3)
    with pytest.raises(RuntimeError, match="cutoff: expected dtype Float .* got Double"):
        kops.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff.double(), 3)
    with pytest.raises(RuntimeError, match="b_enc: expected dtype Float, got Double"):
        kops.threshold_encode(x, enc, b_enc.double(), b_dec, dec_norm, cutoff, 3)


def test_opcheck_kernel_threshold_op():
    kops = kernel_ops(DEVICE)
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(6, 10, 17)
    cutoff = make_cutoff("jumprelu", 17)
    torch.library.opcheck(kops.threshold_encode.default, (x, enc, b_enc, b_dec, dec_norm, cutoff, 17))
    torch.library.opcheck(kops.threshold_encode.default, (x, enc, b_enc, None, None, torch.zeros(17), 5))
