"""The Triton sparse backward: latent-grouped weight gradients (fastsae_triton::scatter_outer)
and every gradient of encode -> decode with AuxK's sparse_decode_with_aux (and of the SAE module)
against float64 autograd, with the `triton` backend forced. The two backward ops alone, on every
backend: tests/ops/test_topk_encode.py and test_sparse_decode.py."""

import pytest
import torch
from conftest import assert_rel_close
from helpers.auxk import random_dead
from helpers.triton_backend import DEVICE, poisoned, triton_ops  # noqa: F401  (fixture)

import fastsae
from fastsae import ops
from fastsae.kernels import sparse_backward

pytestmark = pytest.mark.usefixtures("poisoned")


def _dense(coef, indices, d_sae):
    n = coef.shape[0]
    return torch.zeros(n, d_sae, dtype=torch.float64, device=coef.device).scatter_add(1, indices, coef.double())


@pytest.mark.parametrize("use_sub,use_norm", [(True, False), (False, True)])
def test_scatter_outer_matches_float64(use_sub, use_norm):
    """Duplicates, latents never selected (their rows must still be written: zeros) and one
    latent selected by nearly every row (a segment many steps long)."""
    n, d_in, d_sae, m = 37, 100, 333, 7
    indices = torch.randint(0, d_sae // 2, (n, m), device=DEVICE)  # the upper half never selected
    indices[:, 0] = 5  # a frequent latent
    coef = torch.randn(n, m, device=DEVICE)
    rows = torch.randn(n, d_in, device=DEVICE)
    sub = torch.randn(d_in, device=DEVICE) if use_sub else None
    norm = torch.rand(d_sae, device=DEVICE) + 0.5 if use_norm else None
    out, colsum = triton_ops.scatter_outer(coef, indices, rows, sub, norm, d_sae)
    dense = _dense(coef, indices, d_sae)
    src = rows.double() - (sub.double() if use_sub else 0)
    ref = dense.T @ src
    if use_norm:
        ref = ref / norm.double()[:, None]
    assert_rel_close(out, ref, 1e-5, "out")
    assert (out[d_sae // 2 :] == 0).all()
    assert_rel_close(colsum, dense.sum(0), 1e-5, "colsum")


def test_segments_are_a_stable_counting_sort():
    indices = torch.tensor([[3, 1, 3], [0, 3, 1]], device=DEVICE)
    order, offsets = sparse_backward.segments(indices, 5)
    assert order.tolist() == [3, 1, 5, 0, 2, 4]
    assert offsets.tolist() == [0, 1, 3, 3, 6, 6]


@pytest.mark.parametrize("d_in,d_sae,k,k_aux", [(48, 333, 7, 0), (100, 1000, 16, 0), (48, 333, 1, 5)])
def test_every_gradient_matches_float64(d_in, d_sae, k, k_aux):
    """Encode then decode (and, with k_aux, AuxK's reconstruction over a list of 40 dead latents
    with 3 empty entries, through sparse_decode_with_aux) in fp32 through the ops on the triton
    backend; every gradient against float64 autograd of the dense formula with the same
    selection. Encode and decode get different norm vectors (one vector would cancel)."""
    n = 23
    x = torch.randn(n, d_in, device=DEVICE)
    enc = torch.randn(d_sae, d_in, device=DEVICE) / d_in**0.5
    b_enc = torch.randn(d_sae, device=DEVICE) * 0.1
    b_dec = torch.randn(d_in, device=DEVICE) * 0.1
    norm_enc = torch.rand(d_sae, device=DEVICE) + 0.5
    norm_dec = torch.rand(d_sae, device=DEVICE) + 0.5
    W_dec = torch.randn(d_sae, d_in, device=DEVICE) / d_in**0.5
    _, dead = random_dead(d_sae, 40, capacity=43, device=DEVICE)
    grad_out = torch.randn(n, d_in, device=DEVICE)
    grad_aux = torch.randn(n, d_in, device=DEVICE)
    names = ("x", "enc_weight", "b_enc", "b_dec", "norm_enc", "norm_dec", "W_dec")
    base = (x, enc, b_enc, b_dec, norm_enc, norm_dec, W_dec)

    leaves32 = [t.clone().requires_grad_() for t in base]
    x32, enc32, be32, bd32, ne32, nd32, wd32 = leaves32
    with fastsae.use_backend("triton"):
        v, idx, aux_pre = ops.topk_encode(x32, enc32, be32, bd32, ne32, k, dead.latents if k_aux else None, k_aux)
        if k_aux:
            out, e_hat = ops.sparse_decode_with_aux(v, idx, wd32, bd32, nd32, aux_pre, dead.latents)
            loss = (out * grad_out).sum() + (e_hat * grad_aux).sum()
        else:
            out = ops.sparse_decode(v, idx, wd32, bd32, nd32)
            loss = (out * grad_out).sum()
        loss.backward()

    leaves64 = [t.double().requires_grad_() for t in base]
    x64, enc64, be64, bd64, ne64, nd64, wd64 = leaves64
    pre = ((x64 - bd64) @ enc64.T + be64) * ne64
    acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    ref = (acts / nd64) @ wd64 + bd64
    loss64 = (ref * grad_out.double()).sum()
    if k_aux:
        kept = torch.isfinite(aux_pre.detach())
        assert (kept.sum(1) == k_aux).all() and not kept[:, 40:].any()
        rows = dead.latents.clamp(min=0)
        aux_acts = (pre[:, rows] / nd64[rows]).masked_fill(~kept, 0)
        e_ref = aux_acts @ wd64[rows]
        assert_rel_close(e_hat, e_ref.detach(), 1e-5, "e_hat")
        loss64 = loss64 + (e_ref * grad_aux.double()).sum()
    loss64.backward()
    assert_rel_close(out, ref.detach(), 1e-5, "output")
    for name, a, b in zip(names, leaves32, leaves64):
        assert b.grad.abs().max() > 0, name
        assert_rel_close(a.grad, b.grad, 1e-5, f"grad {name}")


def test_sae_module_on_3d_input_matches_float64():
    """The SAE module (topk, decoder-norm rescaling) on a [2, 9, d_in] input through the triton
    backend: output and every parameter gradient against float64."""
    torch.manual_seed(1)
    d_in, d_sae, k = 48, 333, 7
    sae = fastsae.SAE(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, rescale_acts_by_decoder_norm=True).to(DEVICE)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(d_sae, 1, device=DEVICE) + 0.5)  # rows of different norms
    x = torch.randn(2, 9, d_in, device=DEVICE)
    grad_out = torch.randn(2, 9, d_in, device=DEVICE)
    with fastsae.use_backend("triton"):
        out = sae(x)
        (out * grad_out).sum().backward()
        idx = sae.encode_sparse(x).indices.reshape(-1, k)

    p = {name: t.detach().double().requires_grad_() for name, t in sae.named_parameters()}
    x64 = x.double().reshape(-1, d_in)
    norm = p["W_dec"].norm(dim=1)
    pre = ((x64 - p["b_dec"]) @ p["W_enc"] + p["b_enc"]) * norm
    acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    ref = (acts / norm) @ p["W_dec"] + p["b_dec"]
    (ref * grad_out.double().reshape(-1, d_in)).sum().backward()
    assert out.shape == x.shape
    assert_rel_close(out.reshape(-1, d_in), ref.detach(), 1e-5, "output")
    for name, param in sae.named_parameters():
        assert_rel_close(param.grad, p[name].grad, 1e-5, f"grad {name}")


def test_opcheck_scatter_outer():
    n, d_in, d_sae, m = 6, 10, 17, 3
    indices = torch.randint(0, d_sae, (n, m), device=DEVICE)
    coef = torch.randn(n, m, device=DEVICE)
    rows = torch.randn(n, d_in, device=DEVICE)
    sub = torch.randn(d_in, device=DEVICE)
    norm = torch.rand(d_sae, device=DEVICE) + 0.5
    torch.library.opcheck(triton_ops.scatter_outer.default, (coef, indices, rows, sub, None, d_sae))
    torch.library.opcheck(triton_ops.scatter_outer.default, (coef, indices, rows, None, norm, d_sae))


@pytest.mark.parametrize("n_dead,k_aux", [(60, 24), (10, 24)])
def test_training_forward_with_auxk_matches_torch_backend(n_dead, k_aux):
    """The module's training step with AuxK (selection among 60 dead latents; all 10 dead
    latents) on the triton backend: losses and every gradient equal the torch backend's (whose
    ops the float64 tests above pin down)."""
    torch.manual_seed(2)
    sae = fastsae.SAE(d_in=48, d_sae=333, architecture="topk", k=7).to(DEVICE)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(3, 11, 48, device=DEVICE)
    dead = torch.zeros(333, dtype=torch.bool, device=DEVICE)
    dead[torch.randperm(333, device=DEVICE)[:n_dead]] = True
    results = {}
    for backend in ("triton", "torch"):
        sae.zero_grad(set_to_none=True)
        with fastsae.use_backend(backend):
            out = sae.training_forward(x, dead_mask=dead, k_aux=k_aux)
            out.loss.backward()
        results[backend] = (out, {n: p.grad.clone() for n, p in sae.named_parameters()})
    (out_t, grads_t), (out_r, grads_r) = results["triton"], results["torch"]
    assert out_t.aux_loss > 0
    for name in ("mse_loss", "aux_loss", "loss"):
        assert_rel_close(getattr(out_t, name), getattr(out_r, name), 1e-5, name)
    for name in grads_r:
        assert_rel_close(grads_t[name], grads_r[name], 1e-5, f"grad {name}")
