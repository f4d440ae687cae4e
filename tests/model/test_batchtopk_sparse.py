"""BatchTopK training on the sparse path: the batch's N k largest activations from per-row top-k
candidates, without the dense [N, d_sae] matrix, equal to the dense path's result."""

import pytest
import torch
from conftest import assert_rel_close
from test_sae import make_sae


def _pair(d_in, d_sae, k, **kw):
    sparse = make_sae("batchtopk", d_in, d_sae, k, dtype=torch.float64, **kw)
    dense = make_sae("batchtopk", d_in, d_sae, k, dtype=torch.float64, path="dense", **kw)
    dense.load_state_dict(sparse.state_dict())
    sparse.train(), dense.train()
    return sparse, dense


def _compare(sparse, dense, x, **fwd):
    outs = []
    for sae in (sparse, dense):
        sae.zero_grad()
        xi = x.clone().requires_grad_()
        out = sae.training_forward(xi, **fwd)
        out.loss.backward()
        outs.append((out, xi.grad, {n: p.grad for n, p in sae.named_parameters()}))
    (s, s_gx, s_grads), (d, d_gx, d_grads) = outs
    assert_rel_close(s.x_hat, d.x_hat.detach(), 1e-10, "x_hat")
    assert_rel_close(s.acts.to_dense(), d.acts.to_dense(), 1e-10, "acts")
    for name in ("mse_loss", "aux_loss", "loss"):
        assert_rel_close(getattr(s, name), getattr(d, name).detach(), 1e-10, name)
    assert_rel_close(s_gx, d_gx, 1e-10, "grad x")
    for name, g in d_grads.items():
        if g is not None:
            assert_rel_close(s_grads[name], g, 1e-10, f"grad {name}")
    assert torch.equal(sparse.topk_threshold, dense.topk_threshold)
    return s


@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("rescale", [False, True])
def test_sparse_batchtopk_equals_dense(k, rescale):
    sparse, dense = _pair(48, 333, k, rescale_acts_by_decoder_norm=rescale)
    x = torch.randn(3, 13, 48, dtype=torch.float64)
    out = _compare(sparse, dense, x)
    assert out.acts.width < 333 and sparse._batchtopk_bound >= 4 * k, "the sparse path did not answer"
    assert dense._batchtopk_bound == 0
    assert (out.acts.to_dense() != 0).sum() == 39 * k


def test_sparse_batchtopk_with_dead_latents_equals_dense():
    sparse, dense = _pair(48, 333, 5)
    dead = torch.zeros(333, dtype=torch.bool)
    dead[torch.randperm(333)[:40]] = True
    out = _compare(sparse, dense, torch.randn(21, 48, dtype=torch.float64), dead_mask=dead, k_aux=24, aux_coefficient=0.5)
    assert out.aux_loss > 0


def test_a_row_holding_more_than_its_candidates_widens_the_bound():
    """One row with much larger activations holds most of the batch's N k: more than the 4 k
    candidates a row starts with. The bound doubles until no row is saturated; the result stays
    the dense one."""
    sparse, dense = _pair(48, 333, 3)
    x = torch.randn(40, 48, dtype=torch.float64)
    x[5] *= 40
    out = _compare(sparse, dense, x)
    assert sparse._batchtopk_bound > 12
    assert (out.acts.to_dense()[5] != 0).sum() > 12
