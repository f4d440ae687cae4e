"""fastsae.training.optim.Adam: torch.optim.Adam's update, bit for bit, computed in place in chunks."""

import pytest
import torch

from fastsae.training import optim


def _params():
    # W_enc-like (a transposed view, as the SAE stores it), W_dec-like, a bias.
    return [torch.randn(97, 33).t().requires_grad_(), torch.randn(97, 33).requires_grad_(), torch.randn(97).requires_grad_()]


@pytest.mark.parametrize("chunk", [1 << 18, 100, 7])
def test_same_bits_as_torch_adam(monkeypatch, chunk):
    monkeypatch.setitem(optim._CHUNK_ELEMENTS, "cpu", chunk)  # chunk edges inside every tensor
    ref_params = _params()
    ours_params = [torch.empty_strided(p.shape, p.stride()).copy_(p.detach()).requires_grad_() for p in ref_params]
    assert ours_params[0].stride() == ref_params[0].stride() == (1, 33)
    ref = torch.optim.Adam(ref_params, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, foreach=False)
    ours = optim.Adam(ours_params, lr=3e-2, betas=(0.8, 0.99), eps=1e-6)
    for step in range(6):
        for a, b in zip(ref_params, ours_params):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        if step == 3:  # a parameter without gradient is skipped, as torch skips it
            ref_params[2].grad = ours_params[2].grad = None
        ref.step()
        ours.step()
        for a, b in zip(ref_params, ours_params):
            assert torch.equal(a, b)
    for a, b in zip(ref_params, ours_params):
        sa, sb = ref.state[a], ours.state[b]
        assert torch.equal(sa["step"], sb["step"]) and sa["step"].dtype == sb["step"].dtype
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.mark.parametrize("chunk", [1 << 18, 7])
def test_grad_scale_is_scaling_the_gradients_first(monkeypatch, chunk):
    """step(grad_scale=c) (gradient clipping folded into the update) gives the same bits as
    multiplying every gradient by c, then step()."""
    monkeypatch.setitem(optim._CHUNK_ELEMENTS, "cpu", chunk)
    first = _params()
    second = [torch.empty_strided(p.shape, p.stride()).copy_(p.detach()).requires_grad_() for p in first]
    a, b = optim.Adam(first, lr=3e-2), optim.Adam(second, lr=3e-2)
    for scale in (0.37, 1.0, 0.0021):
        coef = torch.tensor(scale)
        for p, q in zip(first, second):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
            p.grad.mul_(coef)
        a.step()
        b.step(grad_scale=coef)
        for p, q in zip(first, second):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
            assert torch.equal(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"])


def test_state_dict_interchanges_with_torch_adam():
    params = _params()
    ours = optim.Adam(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    ours.step()
    theirs = torch.optim.Adam(params, lr=1e-2)
    theirs.load_state_dict(ours.state_dict())
    back = optim.Adam(params, lr=1e-2)
    back.load_state_dict(theirs.state_dict())
    assert torch.equal(back.state[params[0]]["exp_avg"], ours.state[params[0]]["exp_avg"])


def test_non_dense_gradient_layout_still_updates_correctly():
    """A gradient whose layout differs from the parameter's: whole-tensor update, same bits."""
    p_ref = torch.randn(40, 30).requires_grad_()
    p_ours = p_ref.detach().clone().requires_grad_()
    g = torch.randn(30, 40).t()  # same values shape, transposed layout
    p_ref.grad, p_ours.grad = g.clone(), g.clone()
    assert p_ours.grad.stride() != p_ours.stride()
    torch.optim.Adam([p_ref], lr=1e-2, foreach=False).step()
    optim.Adam([p_ours], lr=1e-2).step()
    assert torch.equal(p_ref, p_ours)


def test_rejects_what_it_does_not_compute():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    for bad in (dict(weight_decay=0.1), dict(amsgrad=True), dict(maximize=True)):
        opt = optim.Adam([p], lr=1e-3)
        opt.param_groups[0].update(bad)
        with pytest.raises(ValueError, match="weight_decay, amsgrad and maximize are not supported"):
            opt.step()
    with pytest.raises(ValueError, match="lr: expected a Python number"):
        optim.Adam([p], lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match=r"expected only lr, betas and eps, got \['weight_decay'\]"):
        optim.Adam([p], lr=1e-3, weight_decay=0.01)


def test_a_refused_step_changes_no_group():
    first, second = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    first.grad, second.grad = torch.randn(4), torch.randn(4)
    opt = optim.Adam([{"params": [first]}, {"params": [second]}], lr=1e-2)
    opt.param_groups[1]["amsgrad"] = True
    before = first.detach().clone()
    with pytest.raises(ValueError):
        opt.step()
    assert torch.equal(first, before) and not opt.state
