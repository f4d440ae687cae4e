"""The Triton fused TopK encoder (fastsae_triton::topk_encode / encode_columns and the backend's
AuxK path) against float64 references, with the `triton` backend forced, beyond the op's matrix
(tests/ops/test_topk_encode.py): splits, NaN ranking, row chunks for large k, 16-bit inputs with
an fp32 selection, opcheck and torch.compile of the raw ops."""

import pytest
import torch
from conftest import assert_bf16_close, assert_rel_close
from helpers.auxk import assert_aux_pre_matches, random_dead
from helpers.triton_backend import DEVICE, poisoned, triton_ops  # noqa: F401  (fixture)

import fastsae
from fastsae import ops

pytestmark = pytest.mark.usefixtures("poisoned")


def _inputs(n, d_in, d_sae, dtype=torch.float32):
    x = torch.randn(n, d_in, dtype=dtype, device=DEVICE)
    enc = (torch.randn(d_sae, d_in, device=DEVICE) / d_in**0.5).to(dtype)
    b_enc = (torch.randn(d_sae, device=DEVICE) * 0.1).to(dtype)
    b_dec = (torch.randn(d_in, device=DEVICE) * 0.1).to(dtype)
    dec_norm = (torch.rand(d_sae, device=DEVICE) + 0.5).to(dtype)
    return x, enc, b_enc, b_dec, dec_norm


def _pre64(x_in, enc, b_enc, dec_norm):
    pre = x_in.double() @ enc.double().T + b_enc.double()
    return pre * dec_norm.double() if dec_norm is not None else pre


def _check_topk(values, indices, pre64, k, tol=1e-5):
    """Indices: k distinct latents forming a top-k of the float64 row (up to rounding);
    values: ReLU of the float64 pre-activations there."""
    n, d = pre64.shape
    assert indices.shape == (n, k) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < d)).all(), "an index is out of range (unwritten?)"
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all(), "duplicate latents in a row"
    picked = pre64.gather(1, indices)
    assert_rel_close(values, picked.relu(), tol, "values")
    kth = pre64.topk(k, dim=-1).values[:, -1:]
    assert (picked >= kth - tol * pre64.abs().max()).all(), "a selected latent is not among the row's top k"


@pytest.mark.parametrize("splits", [2, 6])
def test_topk_encode_any_number_of_splits(splits):
    """The latent range split across programs and merged. Under the interpreter d_sae = 333 is
    6 tiles of 64, so 6 splits leave the last one 13 latents, fewer than k = 16."""
    x, enc, b_enc, _, dec_norm = _inputs(37, 48, 333)
    values, indices = triton_ops.topk_encode(x, enc, b_enc, dec_norm, 16, splits)
    _check_topk(values, indices, _pre64(x, enc, b_enc, dec_norm), 16)


@pytest.mark.parametrize("splits", [1, 3])
def test_topk_encode_ranks_nan_first_as_torch_topk(splits):
    """A NaN input row (every pre-activation NaN) and a NaN latent (its bias): NaN ranks above every
    number, as in torch.topk, in one split and through the merge of several; ReLU keeps it NaN."""
    x, enc, b_enc, _, dec_norm = _inputs(9, 48, 333)
    x[4, 7] = float("nan")
    b_enc[100] = float("nan")
    values, indices = triton_ops.topk_encode(x, enc, b_enc, dec_norm, 5, splits)
    ref = _pre64(x, enc, b_enc, dec_norm).topk(5, dim=1)
    assert values[4].isnan().all()
    others = torch.arange(9, device=DEVICE) != 4
    # every other row: latent 100 (NaN) and its 4 largest numbers, as torch.topk selects them
    # (the order of the slots is not part of the contract)
    got = values[others].double()
    nan_slots = got.isnan()
    assert (nan_slots.sum(1) == 1).all() and (indices[others][nan_slots] == 100).all()
    want = ref.values[others].relu().masked_fill(ref.values[others].isnan(), 0).sort(1).values
    assert_rel_close(got.masked_fill(nan_slots, 0).sort(1).values, want, 1e-5, "values beside the NaN")


@pytest.mark.parametrize("n_dead,capacity,k_aux", [(50, 50, 24), (24, 24, 24), (5, 9, 24), (1, 1, 1), (0, 4, 3)])
def test_topk_encode_aux_matches_float64(n_dead, capacity, k_aux):
    """AuxK through the backend: aux_pre [N, C] over the dead-latent list holds each row's best
    k_aux pre-activations among the listed latents (raw, no ReLU), all of them when there are at
    most k_aux, -inf elsewhere and at the list's empty entries (capacity above the count)."""
    d_in, d_sae, k = 48, 333, 7
    x, enc, b_enc, b_dec, dec_norm = _inputs(29, d_in, d_sae)
    b_enc = b_enc - 1.0  # most pre-activations negative: a ReLU would show
    _, dead = random_dead(d_sae, n_dead, capacity, device=DEVICE)
    with fastsae.use_backend("triton"):
        values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k, dead.latents, k_aux)
    pre64 = _pre64(x - b_dec, enc, b_enc, dec_norm)
    _check_topk(values, indices, pre64, k)
    assert aux_pre.shape == (29, capacity) and aux_pre.dtype == x.dtype
    assert_aux_pre_matches(aux_pre, pre64, dead.latents, k_aux)
    if n_dead:
        assert (aux_pre[torch.isfinite(aux_pre)] < 0).any(), "no negative value kept: was ReLU applied?"


def test_topk_encode_large_k_takes_row_chunks(monkeypatch):
    """k beyond the register-resident top-k: dense pre-activations a few rows at a time."""
    from fastsae.kernels import topk_encode as module

    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 333 * 8)  # 8 rows per chunk: 5 chunks
    x, enc, b_enc, _, dec_norm = _inputs(37, 48, 333)
    k = 200
    assert k > module.MAX_FUSED_K
    values, indices = triton_ops.topk_encode(x, enc, b_enc, dec_norm, k, 0)
    _check_topk(values, indices, _pre64(x, enc, b_enc, dec_norm), k)


def test_encode_columns_matches_float64():
    x, enc, b_enc, _, dec_norm = _inputs(37, 100, 333)
    out = triton_ops.encode_columns(x, enc, b_enc, dec_norm)
    assert_rel_close(out, _pre64(x, enc, b_enc, dec_norm), 1e-5, "all columns, rescaled")
    out = triton_ops.encode_columns(x, enc, b_enc, None)
    assert_rel_close(out, _pre64(x, enc, b_enc, None), 1e-5, "all columns")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_encode_16bit(dtype):
    """16-bit inputs: the selection is a top-k of the pre-activations of the (rounded) inputs,
    and values are as close to float64 as torch's own same-dtype computation, or closer."""
    d_in, d_sae, k = 100, 333, 7
    x, enc, b_enc, b_dec, dec_norm = _inputs(37, d_in, d_sae, dtype)
    with fastsae.use_backend("triton"):
        values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k)
    assert values.dtype == dtype and aux_pre.shape == (37, 0)
    x_in = x - b_dec  # rounded as the module rounds it
    pre64 = _pre64(x_in, enc, b_enc, dec_norm)
    picked = pre64.gather(1, indices)
    same_dtype = ((x_in @ enc.T + b_enc) * dec_norm).gather(1, indices)
    assert_bf16_close(values, picked.relu(), same_dtype.relu(), atol=1e-6, what="values")
    kth = pre64.topk(k, dim=-1).values[:, -1:]
    assert (picked >= kth - 1e-5 * pre64.abs().max()).all()
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all()


def test_triton_op_rejects_k_beyond_candidates():
    x, enc, b_enc, _, _ = _inputs(4, 48, 333)
    with pytest.raises(ValueError, match="expected 1 <= k <= d_sae=333"):
        triton_ops.topk_encode(x, enc, b_enc, None, 334, 0)


def test_opcheck_encoder_ops():
    x, enc, b_enc, _, dec_norm = _inputs(6, 10, 17)
    torch.library.opcheck(triton_ops.topk_encode.default, (x, enc, b_enc, dec_norm, 3, 0))
    torch.library.opcheck(triton_ops.topk_encode.default, (x, enc, b_enc, None, 2, 2))
    torch.library.opcheck(triton_ops.encode_columns.default, (x, enc, b_enc, dec_norm))
    torch.library.opcheck(triton_ops.encode_columns.default, (x, enc, b_enc, None))


def test_torch_compile_traces_the_ops():
    """fullgraph torch.compile over the Triton ops (on a GPU they are triton_ops that the
    compiler traces into; under the interpreter, opaque custom ops)."""
    x, enc, b_enc, _, dec_norm = _inputs(37, 48, 333)
    W_dec = torch.randn(333, 48, device=DEVICE)

    def f(x):
        v, i = triton_ops.topk_encode(x, enc, b_enc, dec_norm, 7, 0)
        return triton_ops.sparse_decode(v, i, W_dec, None, dec_norm)

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    assert_rel_close(compiled(x), f(x), 1e-6, "compiled")
