"""The ops (topk_encode, sparse_decode and their backward) against float64 references."""

import pytest
import torch
from conftest import assert_rel_close, encoder_inputs, pre_activations64
from helpers.auxk import assert_aux_pre_matches, random_dead
from helpers.topk import check_topk_selection

from fastsae import ops, reference, validation

# Float64 kernels of every backend that has them: gradcheck runs the op's autograd on each.
BACKEND_DEVICES = [
    ("torch", "cpu"),
    ("cpp", "cpu"),
    pytest.param("cuda", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

SHAPES = [(48, 333, 1), (48, 333, 7), (100, 1000, 16), (100, 333, 7), (48, 1000, 1)]


@pytest.mark.parametrize("d_in,d_sae,k", SHAPES)
@pytest.mark.parametrize("use_b_dec,use_norm", [(True, False), (False, True), (True, True)])
def test_topk_encode_matches_float64(d_in, d_sae, k, use_b_dec, use_norm):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(37, d_in, d_sae)
    b_dec = b_dec if use_b_dec else None
    dec_norm = dec_norm if use_norm else None
    values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k)
    assert values.dtype == x.dtype and aux_pre.shape == (37, 0) and aux_pre.dtype == x.dtype
    check_topk_selection(values, indices, pre_activations64(x, enc, b_enc, b_dec, dec_norm), k)


@pytest.mark.parametrize("n_dead,k_aux,capacity", [(50, 24, None), (5, 24, None), (1, 1, None), (5, 3, 9), (0, 3, 4)])
def test_topk_encode_aux_selects_among_dead(n_dead, k_aux, capacity):
    """aux_pre [N, C] over the dead list: each row's top min(k_aux, n_dead) dead latents' raw
    pre-activations (no ReLU) at their list entries, -inf elsewhere (the -1 padding included)."""
    d_in, d_sae, k = 48, 333, 7
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(29, d_in, d_sae)
    _, dead = random_dead(d_sae, n_dead, capacity)
    values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k, dead.latents, k_aux)
    pre64 = pre_activations64(x, enc, b_enc, b_dec, dec_norm)
    check_topk_selection(values, indices, pre64, k)
    assert aux_pre.shape == (29, dead.capacity)
    assert (torch.isfinite(aux_pre).sum(-1) == min(n_dead, k_aux)).all()
    assert_aux_pre_matches(aux_pre, pre64, dead.latents, k_aux)


@pytest.mark.parametrize("d_in,d_sae,m", [(48, 333, 7), (100, 1000, 16), (100, 333, 1)])
@pytest.mark.parametrize("use_b_dec,use_norm", [(True, False), (False, True), (True, True)])
def test_sparse_decode_matches_float64(d_in, d_sae, m, use_b_dec, use_norm):
    n = 41
    values = torch.randn(n, m)
    indices = torch.randint(0, d_sae, (n, m))  # duplicates allowed: the padded form has them
    W_dec = torch.randn(d_sae, d_in)
    b_dec = torch.randn(d_in) if use_b_dec else None
    dec_norm = torch.rand(d_sae) + 0.5 if use_norm else None
    out = ops.sparse_decode(values, indices, W_dec, b_dec, dec_norm)
    dense = torch.zeros(n, d_sae, dtype=torch.float64).scatter_add(1, indices, values.double())
    if use_norm:
        dense = dense / dec_norm.double()
    ref = dense @ W_dec.double() + (b_dec.double() if use_b_dec else 0)
    assert_rel_close(out, ref, 1e-5, "sparse_decode")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("use_b_dec,use_norm,k_aux", [(True, False, 0), (False, True, 0), (True, True, 5)])
def test_topk_encode_gradcheck(backend, device, use_b_dec, use_norm, k_aux):
    """Finite differences in float64 through the op's own autograd (selection is fixed locally)."""
    n, d_in, d_sae, k = 4, 5, 11, 3
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae, dtype=torch.float64, device=device)
    # fewer dead than k_aux, and -1 padding: exercises the constant (-inf) entries
    _, dead = random_dead(d_sae, 4, capacity=6, device=device)
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


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("use_b_dec,use_norm", [(True, False), (False, True), (True, True)])
def test_sparse_decode_gradcheck(backend, device, use_b_dec, use_norm):
    n, d_in, d_sae, m = 4, 5, 11, 3
    f64 = dict(dtype=torch.float64, device=device)
    values = torch.randn(n, m, **f64, requires_grad=True)
    indices = torch.randint(0, d_sae, (n, m), device=device)  # duplicates allowed: the padded form has them
    W_dec = torch.randn(d_sae, d_in, **f64, requires_grad=True)
    b_dec = torch.randn(d_in, **f64, requires_grad=True) if use_b_dec else None
    dec_norm = (torch.rand(d_sae, **f64) + 0.5).requires_grad_() if use_norm else None
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda v, w, b, nrm: ops.sparse_decode(v, indices, w, b, nrm), (values, W_dec, b_dec, dec_norm)
        )


@pytest.mark.parametrize("d_in,d_sae,k", [(48, 333, 7), (100, 1000, 16), (48, 1000, 1)])
def test_fp32_gradients_match_float64(d_in, d_sae, k):
    """Encode then decode in fp32 through the ops; every gradient against float64 autograd on
    the dense formula with the same selection. Encode and decode get different norm vectors
    (with one vector the norms cancel and its gradient is zero)."""
    n = 23
    x, enc, b_enc, b_dec, norm_enc = encoder_inputs(n, d_in, d_sae)
    norm_dec = torch.rand(d_sae) + 0.5
    W_dec = torch.randn(d_sae, d_in) / d_in**0.5
    grad_out = torch.randn(n, d_in)
    names = ("x", "enc_weight", "b_enc", "b_dec", "norm_enc", "norm_dec", "W_dec")
    base = (x, enc, b_enc, b_dec, norm_enc, norm_dec, W_dec)
    leaves32 = [t.clone().requires_grad_() for t in base]
    x32, enc32, be32, bd32, ne32, nd32, wd32 = leaves32
    v, idx, _ = ops.topk_encode(x32, enc32, be32, bd32, ne32, k)
    out = ops.sparse_decode(v, idx, wd32, bd32, nd32)
    out.backward(grad_out)

    leaves64 = [t.double().requires_grad_() for t in base]
    x64, enc64, be64, bd64, ne64, nd64, wd64 = leaves64
    pre = ((x64 - bd64) @ enc64.T + be64) * ne64
    acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    ref = (acts / nd64) @ wd64 + bd64
    ref.backward(grad_out.double())
    assert_rel_close(out, ref.detach(), 1e-5, "output")
    for name, a, b in zip(names, leaves32, leaves64):
        assert b.grad.abs().max() > 0, name
        assert_rel_close(a.grad, b.grad, 1e-5, f"grad {name}")


def test_backward_ops_match_reference_helpers():
    """topk_encode_backward / sparse_decode_backward called directly, against dense float64 math."""
    n, d_in, d_sae, m = 19, 48, 333, 7
    x, enc, _, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae)
    indices = torch.stack([torch.randperm(d_sae)[:m] for _ in range(n)])
    grad_pre = torch.randn(n, m)
    gx, gw, gb = torch.ops.fastsae.topk_encode_backward(grad_pre, indices, x, enc, b_dec)
    dense_g = torch.zeros(n, d_sae, dtype=torch.float64).scatter(1, indices, grad_pre.double())
    assert_rel_close(gx, dense_g @ enc.double(), 1e-5, "grad_x")
    assert_rel_close(gw, dense_g.T @ (x.double() - b_dec.double()), 1e-5, "grad_enc_weight")
    assert_rel_close(gb, dense_g.sum(0), 1e-5, "grad_b_enc")

    values = torch.randn(n, m)
    W_dec = torch.randn(d_sae, d_in)
    grad_out = torch.randn(n, d_in)
    gv, gwd = torch.ops.fastsae.sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm)
    norm = dec_norm.double()
    assert_rel_close(gv, (grad_out.double() @ W_dec.double().T).gather(1, indices) / norm[indices], 1e-5, "grad_v")
    dense_c = torch.zeros(n, d_sae, dtype=torch.float64).scatter(1, indices, values.double() / norm[indices])
    assert_rel_close(gwd, dense_c.T @ grad_out.double(), 1e-5, "grad_W_dec")


def test_opcheck_every_op():
    n, d_in, d_sae, k = 6, 10, 17, 3
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(n, d_in, d_sae)
    _, dead = random_dead(d_sae, 8, capacity=10)
    W_dec = torch.randn(d_sae, d_in)
    for req in (False, True):
        leaves = [t.clone().requires_grad_(req) for t in (x, enc, b_enc, b_dec, dec_norm)]
        torch.library.opcheck(torch.ops.fastsae.topk_encode.default, (*leaves, k, dead.latents, 4))
        torch.library.opcheck(torch.ops.fastsae.topk_encode.default, (*leaves[:3], None, None, k, None, 0))
    values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k, dead.latents, 4)
    for req in (False, True):
        v, w, b, nrm, a = (t.clone().requires_grad_(req) for t in (values, W_dec, b_dec, dec_norm, aux_pre))
        torch.library.opcheck(torch.ops.fastsae.sparse_decode_with_aux.default, (v, indices, w, b, nrm, a, dead.latents))
        torch.library.opcheck(torch.ops.fastsae.sparse_decode_with_aux.default, (v, indices, w, None, None, a, dead.latents))
    for req in (False, True):
        v, w, b, nrm = (t.clone().requires_grad_(req) for t in (values, W_dec, b_dec, dec_norm))
        torch.library.opcheck(torch.ops.fastsae.sparse_decode.default, (v, indices, w, b, nrm))
        torch.library.opcheck(torch.ops.fastsae.sparse_decode.default, (v, indices, w, None, None))
    torch.library.opcheck(
        torch.ops.fastsae.topk_encode_backward.default, (torch.randn(n, k), indices, x, enc, b_dec)
    )
    torch.library.opcheck(
        torch.ops.fastsae.sparse_decode_backward.default, (torch.randn(n, d_in), values, indices, W_dec, dec_norm)
    )


def _op_calls(entry: str):
    """name -> (its check, its backward op's check, a call of it through `entry`) for every op,
    on inputs that take gradients."""
    n, d_in, d_sae, k = 6, 10, 17, 3
    x, enc, b_enc, b_dec, dec_norm = (t.requires_grad_() for t in encoder_inputs(n, d_in, d_sae))
    _, dead = random_dead(d_sae, 8, capacity=10)
    W_dec = torch.randn(d_sae, d_in, requires_grad=True)
    with torch.no_grad():
        values, indices, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, k, dead.latents, 4)
    values, aux_pre = values.requires_grad_(), aux_pre.requires_grad_()
    cutoff = torch.zeros(d_sae)
    raw = entry == "raw"
    op = (lambda name: getattr(torch.ops.fastsae, name)) if raw else (lambda name: getattr(ops, name))
    tail = (True,) if raw else ()  # the raw ops' check_indices, which the wrappers take by keyword
    return {
        "topk_encode": ("check_topk_encode", "check_topk_encode_backward",
                        lambda: op("topk_encode")(x, enc, b_enc, b_dec, dec_norm, k, dead.latents, 4, *tail)),
        "threshold_encode": ("check_threshold_encode", "check_topk_encode_backward",
                             lambda: op("threshold_encode")(x, enc, b_enc, b_dec, dec_norm, cutoff, d_sae)),
        "sparse_decode": ("check_sparse_decode", "check_sparse_decode_backward",
                          lambda: op("sparse_decode")(values, indices, W_dec, b_dec, dec_norm, *tail)),
        "sparse_decode_with_aux": (
            "check_sparse_decode_with_aux", "check_sparse_decode_backward",
            lambda: op("sparse_decode_with_aux")(values, indices, W_dec, b_dec, dec_norm, aux_pre, dead.latents, *tail)),
    }


@pytest.mark.parametrize("entry", ["ops", "raw"])
@pytest.mark.parametrize("name", ["topk_encode", "threshold_encode", "sparse_decode", "sparse_decode_with_aux"])
def test_each_call_checks_its_arguments_once(monkeypatch, name, entry):
    """fastsae.ops.<op> checks in its wrapper and the op then trusts it; a direct
    torch.ops.fastsae.<op> call checks inside the op. Either way: one check per call, and one
    for the backward op that the op's gradient calls."""
    check, backward_check, call = _op_calls(entry)[name]
    counts = {check: 0, backward_check: 0}
    inside = []  # a check that another counted one runs (the backward's of the forward's) is part of it
    for what in counts:
        real = getattr(validation, what)

        def counted(*args, _real=real, _what=what, **kwargs):
            counts[_what] += not inside
            inside.append(_what)
            try:
                return _real(*args, **kwargs)
            finally:
                inside.pop()

        monkeypatch.setattr(validation, what, counted)
    outputs = call()
    assert counts == {check: 1, backward_check: 0}
    sum(o.sum() for o in outputs if o.is_floating_point() and o.requires_grad).backward()
    assert counts == {check: 1, backward_check: 1}


def test_ops_reject_bad_arguments():
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(4, 10, 17)
    with pytest.raises(ValueError, match="d_in=10"):
        ops.topk_encode(torch.randn(4, 11), enc, b_enc, b_dec, dec_norm, 3)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= d_sae=17, got 0"):
        ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 0)
    with pytest.raises(ValueError, match="k: expected"):
        ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 18)
    with pytest.raises(ValueError, match="2-D"):
        ops.topk_encode(x[None], enc, b_enc, b_dec, dec_norm, 3)
    with pytest.raises(ValueError, match="aux_latents: expected dtype torch.int64, got torch.int32"):
        ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 3, torch.tensor([1, 2], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"aux_latents: expected latents in \[0, 17\) or -1 \(empty\), got values in \[-2, 3\]"):
        torch.ops.fastsae.topk_encode(x, enc, b_enc, b_dec, dec_norm, 3, torch.tensor([3, -2]), 2)
    with pytest.raises(ValueError, match=r"aux_latents: expected a vector of at most d_sae=17 latents, got shape \(18,\)"):
        ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 3, torch.full((18,), -1), 2)
    with pytest.raises(ValueError, match="k_aux: expected 0 <= k_aux <= d_sae=17, got 18"):
        ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 3, torch.tensor([1]), 18)
    with pytest.raises(ValueError, match="b_enc: expected a vector of shape \\(17,\\)"):
        ops.topk_encode(x, enc, b_enc[:5], b_dec, dec_norm, 3)
    with pytest.raises(ValueError, match="enc_weight: expected dtype torch.float32, got torch.float64"):
        ops.topk_encode(x, enc.double(), b_enc, b_dec, dec_norm, 3)
    v = torch.randn(4, 3)
    with pytest.raises(ValueError, match="int64"):
        ops.sparse_decode(v, torch.zeros(4, 3, dtype=torch.int32), torch.randn(17, 10))
    with pytest.raises(ValueError, match="indices: expected shape"):
        ops.sparse_decode(v, torch.zeros(4, 2, dtype=torch.int64), torch.randn(17, 10))


def test_reference_fallback_bounds_memory_by_chunks(monkeypatch):
    """The chunked loops of the torch path give the same answer as one chunk."""
    n, d_in, d_sae, m = 50, 16, 40, 5
    values = torch.randn(n, m)
    indices = torch.randint(0, d_sae, (n, m))
    W = torch.randn(d_sae, d_in)
    rows = torch.randn(n, d_in)
    whole = (reference.gather_sum(values, indices, W), reference.gather_dot(rows, indices, W),
             reference.scatter_outer(values, indices, rows, d_sae))
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", m * d_in * 3)  # 3 rows per chunk
    chunked = (reference.gather_sum(values, indices, W), reference.gather_dot(rows, indices, W),
               reference.scatter_outer(values, indices, rows, d_sae))
    for a, b in zip(whole, chunked):
        assert_rel_close(b, a, 1e-6)
