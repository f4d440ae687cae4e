"""Property tests: random valid inputs (shapes down to 0 and 1, the four float dtypes, NaN and
Inf, non-contiguous and stride-0 layouts) through every backend's ops, each against a float64
reference of the same inputs. NaN and Inf must land where the float64 formula puts them; finite
results agree within a bound that scales with the dtype's epsilon and the sum of |terms|."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsae import ops

CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# The interpreter runs Triton on CPU slowly: fewer examples there, the same properties.
BACKENDS = [
    ("torch", "cpu", 40),
    ("cpp", "cpu", 40),
    ("triton", TRITON_DEVICE, 40 if CUDA else 12),
    pytest.param("torch", "cuda", 40, marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
    pytest.param("cuda", "cuda", 40, marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
]


def _settings(n):
    # FASTSAE_PROPERTY_SCALE=10 runs ten times the examples (a longer search, by hand).
    n = int(n * float(os.environ.get("FASTSAE_PROPERTY_SCALE", "1")))
    return settings(
        max_examples=n, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )


def _use(backend, device):
    if backend not in ops.available_backends(device):
        pytest.skip(f"backend {backend} does not load on {device} here")
    return ops.use_backend(backend)


# Reductions accumulate in at least float32 (fastsae.reference); torch and cpp accumulate float64
# inputs in float64, the Triton kernels (and, unverified here, the CUDA ones) in float32.
FP64_ACCUMULATION = {"torch": True, "cpp": True, "triton": False, "cuda": False}


def _eps(dtype, backend):
    if dtype == torch.float64 and not FP64_ACCUMULATION[backend]:
        return torch.finfo(torch.float32).eps
    return torch.finfo(dtype).eps


def _key(t):
    """Ranking key: NaN above every number, as in torch.topk."""
    return torch.where(t.isnan(), torch.full_like(t, float("inf")), t)


def _assert_same_nonfinite_and_close(got, ref, tol, what):
    """NaN exactly where ref is NaN, +-inf where ref is, finite elsewhere within tol (elementwise)."""
    got = got.double().cpu()
    assert torch.equal(got.isnan(), ref.isnan()), f"{what}: NaN positions differ"
    inf = ref.isinf()
    assert torch.equal(got.isinf(), inf) and torch.equal(got[inf], ref[inf]), f"{what}: Inf positions differ"
    fin = torch.isfinite(ref)
    err = (got[fin] - ref[fin]).abs()
    assert (err <= tol[fin]).all(), f"{what}: max error {err.max():.3g} beyond its bound"


# Every backend ranks NaN pre-activations first, as torch.topk does.
NAN_TOPK = {"torch": True, "cpp": True, "cuda": True, "triton": True}


@st.composite
def _encoder_case(draw, allow_nan=True):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    n, d_in, d_sae = draw(st.integers(0, 9)), draw(st.integers(1, 33)), draw(st.integers(1, 70))
    k = draw(st.integers(1, min(d_sae, 9)))
    k_aux = draw(st.integers(0, min(d_sae, 6)))
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    enc = torch.randn(d_sae, d_in + 3, generator=gen, dtype=torch.float64) / d_in**0.5
    b_enc = torch.randn(d_sae, generator=gen, dtype=torch.float64) * 0.1
    b_dec = torch.randn(d_in, generator=gen, dtype=torch.float64) * 0.1 if draw(st.booleans()) else None
    dec_norm = torch.rand(d_sae, generator=gen, dtype=torch.float64) + 0.5 if draw(st.booleans()) else None
    dead = torch.rand(d_sae, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    # AuxK's list: the dead latents ascending, then up to 3 empty entries (-1), within d_sae.
    pad = min(draw(st.integers(0, 3)), d_sae - int(dead.sum()))
    aux_latents = torch.cat([dead.nonzero().flatten(), torch.full((pad,), -1, dtype=torch.int64)])
    poisons = ["none", "x_nan", "x_inf", "b_enc_-inf", "b_enc_nan"] if allow_nan else ["none", "b_enc_-inf"]
    poison = draw(st.sampled_from(poisons))
    if poison.startswith("x") and n:
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, d_in - 1))] = float("nan" if poison == "x_nan" else "inf")
    elif poison.startswith("b_enc"):
        b_enc[torch.rand(d_sae, generator=gen) < 0.3] = float("-inf" if poison == "b_enc_-inf" else "nan")
    layout = draw(st.sampled_from(["contiguous", "strided"]))
    return dtype, x, enc, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, layout


def _laid_out(layout, dtype, device, x, enc, b_enc, b_dec, dec_norm):
    """The inputs in `dtype` on `device`; "strided": x column-major, enc_weight a slice of a wider
    matrix, b_dec a stride-0 expand when it is constant-able (its first value)."""
    d_in = x.shape[1]
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    if layout == "strided":
        xs = cast(x).t().contiguous().t()
        encs = cast(enc)[:, :d_in]
        bds = None if b_dec is None else cast(b_dec[:1]).expand(d_in)
    else:
        xs, encs, bds = cast(x), cast(enc[:, :d_in]).contiguous(), cast(b_dec)
    return xs, encs, cast(b_enc), bds, cast(dec_norm)


@pytest.mark.parametrize("backend,device,examples", BACKENDS)
def test_topk_encode_matches_float64(backend, device, examples):
    @_settings(examples)
    @given(_encoder_case(allow_nan=NAN_TOPK[backend]))
    def check(case):
        dtype, x, enc, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, layout = case
        args = _laid_out(layout, dtype, device, x, enc, b_enc, b_dec, dec_norm)
        with _use(backend, device):
            values, indices, aux_pre = ops.topk_encode(*args, k, aux_latents.to(device), k_aux)
        xs, encs, be, bd, nrm = (None if t is None else t.double().cpu() for t in args)
        x_in = xs - bd if bd is not None else xs
        pre = (x_in @ encs.T + be) * (nrm if nrm is not None else 1)
        bound = (x_in.abs() @ encs.abs().T + be.abs()) * (nrm if nrm is not None else 1)
        tol = (8 + x.shape[1]) * _eps(dtype, backend) * bound.nan_to_num(0, 0, 0) + 1e-30
        n, d_sae = pre.shape
        c = aux_latents.shape[0]
        for t, width, want in ((values, k, dtype), (indices, k, torch.int64), (aux_pre, c, dtype)):
            assert t.shape == (n, width) and t.dtype == want and t.device.type == torch.device(device).type
        values, indices, aux_pre = values.cpu(), indices.cpu(), aux_pre.double().cpu()
        if n == 0:
            return
        # Top-k: k distinct latents, none ranked below the row's k-th best by more than the bound.
        assert ((indices >= 0) & (indices < d_sae)).all()
        assert (indices.sort(1).values.diff(dim=1) != 0).all(), "duplicate latents in a row"
        picked, picked_tol = pre.gather(1, indices), tol.gather(1, indices)
        _assert_same_nonfinite_and_close(values, picked.relu(), picked_tol, "values")
        kth = _key(pre).topk(k, dim=1).values[:, -1:]
        assert (_key(picked) + picked_tol >= kth).all(), "a selected latent is not among the row's top k"
        # AuxK: each row keeps its best min(k_aux, candidates) listed latents (candidates: not -1,
        # not -inf; NaN first) with their raw pre-activations, -inf everywhere else.
        listed = aux_latents >= 0
        at = pre[:, aux_latents.clamp(min=0)]
        at_tol = tol[:, aux_latents.clamp(min=0)]
        candidate = listed & (at != float("-inf"))
        kept = aux_pre != float("-inf")
        assert not (kept & ~candidate).any(), "an entry kept at an empty entry or a latent at -inf"
        assert torch.equal(kept.sum(1), candidate.sum(1).clamp(max=k_aux)), "kept count != min(k_aux, candidates)"
        _assert_same_nonfinite_and_close(aux_pre[kept], at[kept], at_tol[kept], "aux_pre")
        for r in range(n):
            real = int(kept[r].sum())
            if real and real < int(candidate[r].sum()):
                nth = _key(at[r][candidate[r]]).topk(real).values[-1]
                assert (_key(at[r][kept[r]]) + at_tol[r][kept[r]] >= nth).all(), "a kept aux entry is not among the best"

    check()


@st.composite
def _decode_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    n, m, d_in, d_sae = draw(st.integers(0, 9)), draw(st.integers(0, 7)), draw(st.integers(0, 33)), draw(st.integers(1, 70))
    values = torch.randn(n, m, generator=gen, dtype=torch.float64)
    indices = torch.randint(0, d_sae, (n, m), generator=gen)  # duplicates allowed
    W = torch.randn(d_sae, d_in + 2, generator=gen, dtype=torch.float64)
    b_dec = torch.randn(d_in, generator=gen, dtype=torch.float64) if draw(st.booleans()) else None
    dec_norm = torch.rand(d_sae, generator=gen, dtype=torch.float64) + 0.5 if draw(st.booleans()) else None
    poison = draw(st.sampled_from(["none", "v_nan", "v_inf", "W_inf"]))
    if poison.startswith("v") and n and m:
        values[draw(st.integers(0, n - 1)), draw(st.integers(0, m - 1))] = float("nan" if poison == "v_nan" else "-inf")
    elif poison == "W_inf" and d_in:
        W[draw(st.integers(0, d_sae - 1)), draw(st.integers(0, d_in - 1))] = float("inf")
    layout = draw(st.sampled_from(["contiguous", "strided"]))
    return dtype, values, indices, W, b_dec, dec_norm, layout


@pytest.mark.parametrize("backend,device,examples", BACKENDS)
def test_sparse_decode_and_backward_match_float64(backend, device, examples):
    @_settings(examples)
    @given(_decode_case())
    def check(case):
        dtype, values, indices, W, b_dec, dec_norm, layout = case
        d_in = W.shape[1] - 2
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        if layout == "strided":
            v, w = cast(values).t().contiguous().t(), cast(W)[:, :d_in]
            b = None if b_dec is None else cast(b_dec[:1]).expand(d_in)
        else:
            v, w, b = cast(values), cast(W[:, :d_in]).contiguous(), cast(b_dec)
        nrm, idx = cast(dec_norm), indices.to(device)
        with _use(backend, device):
            out = ops.sparse_decode(v, idx, w, b, nrm)
        assert out.shape == (values.shape[0], d_in) and out.dtype == dtype
        v64, w64 = v.double().cpu(), w.double().cpu()
        coef = v64 / nrm.double().cpu()[indices] if nrm is not None else v64
        terms = coef.unsqueeze(-1) * w64[indices]  # [n, m, d_in]
        b64 = b.double().cpu() if b is not None else torch.zeros(d_in, dtype=torch.float64)
        ref = terms.sum(1) + b64
        bound = terms.abs().nan_to_num(0, 0, 0).sum(1) + b64.abs()
        tol = (8 + values.shape[1]) * _eps(dtype, backend) * bound + 1e-30
        _assert_same_nonfinite_and_close(out, ref, tol, "sparse_decode")

        # The backward ops on finite data: grad_values = (grad_out . W[idx]) / norm, grad_W by scatter.
        if not (torch.isfinite(v64).all() and torch.isfinite(w64).all()):
            return
        grad_out = torch.randn(values.shape[0], d_in, dtype=torch.float64)
        with _use(backend, device):
            gv, gw = torch.ops.fastsae.sparse_decode_backward(cast(grad_out), v, idx, w, nrm)
            gx, genc, gbenc = torch.ops.fastsae.topk_encode_backward(v, idx, cast(grad_out), w, None)
        g64 = cast(grad_out).double().cpu()
        norm = nrm.double().cpu()[indices] if nrm is not None else torch.ones_like(v64)
        dots = (g64.unsqueeze(1) * w64[indices]).sum(-1)
        dots_bound = (g64.abs().unsqueeze(1) * w64.abs()[indices]).sum(-1)
        _assert_same_nonfinite_and_close(gv, dots / norm, (8 + d_in) * _eps(dtype, backend) * dots_bound / norm + 1e-30, "grad_values")
        dense = torch.zeros(w64.shape[0], values.shape[0], dtype=torch.float64)
        dense.index_put_((indices.T.reshape(-1), torch.arange(values.shape[0]).repeat(values.shape[1])),
                         (coef.T.reshape(-1)), accumulate=True)
        dense_abs = torch.zeros_like(dense).index_put_(
            (indices.T.reshape(-1), torch.arange(values.shape[0]).repeat(values.shape[1])), coef.abs().T.reshape(-1),
            accumulate=True)
        gw_tol = (8 + values.shape[0] * max(1, values.shape[1])) * _eps(dtype, backend) * (dense_abs @ g64.abs()) + 1e-30
        _assert_same_nonfinite_and_close(gw, dense @ g64, gw_tol, "grad_W_dec")
        # topk_encode_backward with grad_pre = values: grad_x = sum_j v W[idx], grad_enc = scatter of v * x_in.
        plain = torch.zeros_like(dense).index_put_(
            (indices.T.reshape(-1), torch.arange(values.shape[0]).repeat(values.shape[1])), v64.T.reshape(-1),
            accumulate=True)
        plain_abs = torch.zeros_like(dense).index_put_(
            (indices.T.reshape(-1), torch.arange(values.shape[0]).repeat(values.shape[1])), v64.abs().T.reshape(-1),
            accumulate=True)
        gx_bound = (v64.abs().unsqueeze(-1) * w64.abs()[indices]).sum(1)
        _assert_same_nonfinite_and_close(gx, (v64.unsqueeze(-1) * w64[indices]).sum(1), (8 + values.shape[1]) * _eps(dtype, backend) * gx_bound + 1e-30, "grad_x")
        enc_tol = (8 + values.shape[0] * max(1, values.shape[1])) * _eps(dtype, backend) * (plain_abs @ g64.abs()) + 1e-30
        _assert_same_nonfinite_and_close(genc, plain @ g64, enc_tol, "grad_enc_weight")
        _assert_same_nonfinite_and_close(gbenc, plain.sum(1), (8 + values.numel()) * _eps(dtype, backend) * plain_abs.sum(1) + 1e-30, "grad_b_enc")

    check()


def test_triton_topk_encode_keeps_nan_rows():
    x = torch.tensor([[float("nan"), 1.0, 2.0]], device=TRITON_DEVICE)
    W, b = torch.randn(5, 3, device=TRITON_DEVICE), torch.zeros(5, device=TRITON_DEVICE)
    with _use("triton", TRITON_DEVICE):
        values = ops.topk_encode(x, W, b, None, None, 2)[0]
    assert values.isnan().all()
