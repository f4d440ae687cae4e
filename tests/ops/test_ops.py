"""What every op shares: opcheck through fastsae's ops, one argument check per call, the refusals
of bad arguments, the torch reference's memory bound. Each op against float64 on every backend:
test_topk_encode.py, test_sparse_decode.py, test_threshold_encode.py."""

import pytest
import torch
from conftest import assert_rel_close, encoder_inputs
from helpers.auxk import random_dead

from fastsae import ops, reference, validation

# Float64 kernels of every backend that has them: gradcheck runs the op's autograd on each.
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
