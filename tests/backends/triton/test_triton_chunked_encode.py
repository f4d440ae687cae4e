"""The triton backend's second top-k encoder path (cuBLAS in row chunks + torch.topk; also its
AuxK) against float64, and the measured table that picks between the paths and backends."""

import pytest
import torch
from conftest import assert_bf16_close, assert_rel_close
from helpers.auxk import assert_aux_pre_matches, random_dead

import fastsae
from fastsae import ops
from fastsae.ops import backend_triton, measured
from fastsae.ops import chunked as chunked_encoder
from fastsae.kernels import topk_encode as kernel


def _inputs(n, d_in, d_sae, dtype=torch.float32):
    x = torch.randn(n, d_in, dtype=dtype)
    enc = (torch.randn(d_sae, d_in) / d_in**0.5).to(dtype)
    b_enc = (torch.randn(d_sae) * 0.1).to(dtype)
    b_dec = (torch.randn(d_in) * 0.1).to(dtype)
    dec_norm = (torch.rand(d_sae) + 0.5).to(dtype)
    return x, enc, b_enc, b_dec, dec_norm


def _pre64(x, enc, b_enc, b_dec, dec_norm):
    x_in = x.double() - b_dec.double() if b_dec is not None else x.double()
    pre = x_in @ enc.double().T + b_enc.double()
    return pre * dec_norm.double() if dec_norm is not None else pre


def _check_topk(values, indices, pre64, k, tol=1e-5):
    n, d = pre64.shape
    assert indices.shape == (n, k) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < d)).all()
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all(), "duplicate latents in a row"
    picked = pre64.gather(1, indices)
    assert_rel_close(values, picked.relu(), tol, "values")
    kth = pre64.topk(k, dim=-1).values[:, -1:]
    assert (picked >= kth - tol * pre64.abs().max()).all(), "a selected latent is not among the row's top k"


@pytest.fixture
def chunked(monkeypatch):
    """The chunked path forced, with chunks of 5 rows at d_sae 333 (an uneven last chunk)."""
    monkeypatch.setenv(measured.PATH_ENV_VAR, "chunked")
    monkeypatch.setattr(chunked_encoder, "CHUNK_ELEMENTS", 5 * 333)


@pytest.mark.parametrize("d_in,d_sae,k,use_b_dec,use_norm", [(48, 333, 1, True, False), (48, 333, 7, False, True),
                                                               (100, 333, 16, True, True), (17, 41, 41, True, False)])
def test_chunked_topk_matches_float64(chunked, d_in, d_sae, k, use_b_dec, use_norm):
    x, enc, b_enc, b_dec, dec_norm = _inputs(37, d_in, d_sae)
    b_dec = b_dec if use_b_dec else None
    dec_norm = dec_norm if use_norm else None
    with fastsae.use_backend("triton"):
        values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k)
    assert aux_pre.shape == (37, 0)
    _check_topk(values, indices, _pre64(x, enc, b_enc, b_dec, dec_norm), k)


def test_chunked_topk_bf16_within_twice_torch_error(chunked):
    x, enc, b_enc, b_dec, dec_norm = _inputs(37, 64, 333, torch.bfloat16)
    with fastsae.use_backend("triton"):
        values, indices, _ = ops.topk_encode(x, enc, b_enc, b_dec, None, 8)
    pre64 = _pre64(x, enc, b_enc, b_dec, None)
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all()
    ref = pre64.gather(1, indices).relu()
    same = (torch.addmm(b_enc, x - b_dec, enc.t())).double().gather(1, indices).relu()  # torch in bf16
    assert_bf16_close(values, ref, same, 1e-3, "values")
    kth = pre64.topk(8, dim=-1).values[:, -1:]
    assert (pre64.gather(1, indices) >= kth - 2e-2 * pre64.abs().max()).all()


@pytest.mark.parametrize("n_dead,capacity,k_aux", [(50, 50, 24), (5, 8, 24), (1, 1, 1), (0, 3, 3), (333, 333, 40)])
def test_auxk_from_the_chunked_product(monkeypatch, n_dead, capacity, k_aux):
    """AuxK always takes the chunked path (no host sync): over the dead-latent list, each row's
    best k_aux pre-activations (raw), -inf elsewhere and at empty entries, chunk by chunk (7 rows:
    an uneven last chunk); the main top-k is unchanged."""
    monkeypatch.setattr(chunked_encoder, "CHUNK_ELEMENTS", 7 * 333)
    x, enc, b_enc, b_dec, dec_norm = _inputs(29, 48, 333)
    _, dead = random_dead(333, n_dead, capacity)
    with fastsae.use_backend("triton"):
        values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 7, dead.latents, k_aux)
    pre64 = _pre64(x, enc, b_enc, b_dec, dec_norm)
    _check_topk(values, indices, pre64, 7)
    assert aux_pre.shape == (29, capacity)
    assert_aux_pre_matches(aux_pre, pre64, dead.latents, k_aux)


def test_chunked_gradients_match_float64(chunked):
    """fp32 through the triton backend on the chunked path (with AuxK, fewer dead than k_aux, and
    an empty list entry): every input's gradient against float64 autograd of the dense formula
    with the same selection."""
    base = _inputs(23, 48, 333)
    tensors = [t.clone().requires_grad_() for t in base]
    _, dead = random_dead(333, 3, capacity=4)
    with fastsae.use_backend("triton"):
        v, i, aux_pre = ops.topk_encode(*tensors, 5, dead.latents, 4)
    kept = torch.isfinite(aux_pre)
    assert kept.sum(1).eq(3).all(), "every listed dead latent is kept when fewer than k_aux"
    g, ga = torch.randn_like(v), torch.randn_like(aux_pre)
    # The incoming gradient is nonzero at the -inf (not kept) entries too: they must take none.
    torch.autograd.backward([v, aux_pre], [g, ga])
    ref = [t.double().requires_grad_() for t in base]
    pre = ((ref[0] - ref[3]) @ ref[1].T + ref[2]) * ref[4]
    aux = pre[:, dead.latents.clamp(min=0)].masked_fill(~kept, 0)
    ((pre.gather(1, i).relu() * g.double()).sum() + (aux * ga.double()).sum()).backward()
    for got, want, name in zip(tensors, ref, ("x", "enc", "b_enc", "b_dec", "dec_norm")):
        assert want.grad.abs().max() > 0, name
        assert_rel_close(got.grad, want.grad, 1e-5, name)


def test_encoder_path_comes_from_the_measured_table(monkeypatch):
    monkeypatch.delenv(measured.PATH_ENV_VAR, raising=False)
    # On the H200: fused wins at d_in 768 (2.74 vs 4.01 ms), chunked at 4096 (9.84 vs 14.76 ms).
    assert measured.encoder_path("cuda", 768, 32, "NVIDIA H200") == "fused"
    assert measured.encoder_path("cuda", 4096, 64, "NVIDIA H200") == "chunked"
    assert measured.encoder_path("cuda", 8192, 64, "NVIDIA H100 80GB HBM3") == "chunked"  # nearest row, any GPU
    assert measured.encoder_path("cpu", 4096, 64) == "fused"
    for row in measured.ENCODER_TABLE:
        assert row.source and row.fused_ms > 0 and row.chunked_ms > 0
    monkeypatch.setenv(measured.PATH_ENV_VAR, "chunked")
    assert measured.encoder_path("cuda", 768, 32) == "chunked"
    monkeypatch.setenv(measured.PATH_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=measured.PATH_ENV_VAR):
        measured.encoder_path("cuda", 768, 32)


def test_backend_choice_needs_a_measured_gain(monkeypatch):
    every = lambda name: True  # noqa: E731

    def never_asked(name):
        raise AssertionError(f"loadability of {name} asked although it cannot win")
    # cuda measured 1.07x faster at d_in 4096: within the noise, triton stays (and cuda is not loaded)
    assert measured.preferred_backend("cuda", 4096, "triton", never_asked) == "triton"
    assert measured.preferred_backend("cuda", 768, "triton", every) == "triton"
    row = measured.BackendRow("X", 1, 4096, 1, 1, {"triton": 10.0, "cuda": 5.0}, "test")
    monkeypatch.setattr(measured, "BACKEND_TABLE", (row,))
    assert measured.preferred_backend("cuda", 4096, "triton", every) == "cuda"
    assert measured.preferred_backend("cuda", 4096, "triton", lambda name: name != "cuda") == "triton"
    assert measured.preferred_backend("cpu", 4096, "triton", every) == "triton"


def test_wide_inputs_take_the_measured_tile(monkeypatch):
    monkeypatch.setattr(kernel, "INTERPRET", False)
    wide = kernel.select_config(64, torch.bfloat16, 4096)
    assert (wide["BLOCK_M"], wide["BLOCK_N"], wide["num_warps"], wide["num_stages"]) == (128, 128, 8, 3)
    assert kernel.select_config(32, torch.bfloat16, 768) == kernel.tile_config(torch.bfloat16)
    assert kernel.select_config(128, torch.bfloat16, 4096)["BLOCK_M"] == 64  # k 128 keeps its 8-warp tile
    assert kernel.select_config(64, torch.float32, 4096) == kernel.tile_config(torch.float32)
