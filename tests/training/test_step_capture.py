"""The TopK training step has no host sync (AuxK included), so it compiles with fullgraph=True and
can be captured as a CUDA graph; the parts of the capture that run on the CPU are checked here."""

import copy
import re

import pytest
import torch
from conftest import assert_rel_close
from torch._subclasses.fake_tensor import FakeTensorMode

import fastsae
from fastsae.training import graph, optim


def _topk_sae(d_in=24, d_sae=150, k=5):
    torch.manual_seed(0)
    sae = fastsae.SAE(d_in=d_in, d_sae=d_sae, architecture="topk", k=k)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def _dead(d_sae, n_dead):
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae)[:n_dead]] = True
    return dead


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("n_dead", [40, 3, 0])
def test_training_forward_compiles_fullgraph_with_dead_mask(backend, n_dead):
    """fullgraph=True fails on .item(), int(tensor), nonzero or a data-dependent shape."""
    torch._dynamo.reset()
    sae = _topk_sae()
    twin = copy.deepcopy(sae)
    x = torch.randn(37, 24)
    dead = _dead(150, n_dead)

    def step(model, x, dead):
        out = model.training_forward(x, dead_mask=dead, k_aux=12, aux_coefficient=0.5)
        return out.loss, out.mse_loss, out.aux_loss, out.x_hat, out.acts.values, out.acts.indices

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with fastsae.use_backend(backend):
        got = compiled(sae, x, dead)
        want = step(twin, x, dead)
        got[0].backward()
        want[0].backward()
    for g, w, what in zip(got, want, ("loss", "mse", "aux", "x_hat", "values")):
        assert_rel_close(g.detach(), w.detach().double(), 1e-5, what)
    assert torch.equal(got[5].sort(-1).values, want[5].sort(-1).values)
    if n_dead == 0:
        assert got[2].item() == 0.0
    else:
        assert got[2].item() > 0.0
    for name, p in sae.named_parameters():
        assert_rel_close(p.grad, getattr(twin, name).grad.double(), 1e-4, name)


def test_auxk_scale_follows_sparsify_when_few_latents_are_dead():
    """aux_coefficient * min(1, n_dead / k_aux) * mean ||e_hat - e||^2 (the docstring's, sparsify's)."""
    sae = _topk_sae()
    x = torch.randn(21, 24)
    dead = _dead(150, 3)
    out = sae.training_forward(x, dead_mask=dead, k_aux=12, aux_coefficient=0.5)
    p = {n: t.detach().double() for n, t in sae.named_parameters()}
    pre = (x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(3, dim=-1)  # only 3 latents are dead: the other 9 slots hold 0
    e_hat = torch.zeros_like(pre).scatter(1, top.indices, top.values) @ p["W_dec"]
    residual = x.double() - out.x_hat.detach().double()
    expect = 0.5 * (3 / 12) * (e_hat - residual).pow(2).sum(-1).mean()
    assert_rel_close(out.aux_loss, expect, 1e-5, "aux loss")


@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_triton_topk_with_auxk_has_no_data_dependent_step(monkeypatch, path):
    """The triton backend's encoder under fake tensors: .item(), nonzero or a shape read from
    data would raise there (launches are skipped for fake tensors)."""
    from fastsae.ops import backend_triton

    monkeypatch.setenv("FASTSAE_ENCODER_PATH", path)
    sae = _topk_sae()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(37, 24))
        dead = fastsae.DeadLatents.from_mask(mode.from_tensor(_dead(150, 7)), capacity=16)
        args = [mode.from_tensor(t.detach()) for t in (sae.enc_weight.contiguous(), sae.b_enc, sae.b_dec)]
        v, i, aux_pre = backend_triton.topk_encode(x, args[0], args[1], args[2], None, 5, dead.latents, 12)
        assert v.shape == i.shape == (37, 5) and aux_pre.shape == (37, 16)
        v, i, aux_pre = backend_triton.topk_encode(x, args[0], args[1], args[2], None, 5, None, 0)
        assert v.shape == (37, 5) and aux_pre.shape == (37, 0)


def test_warm_up_is_undone_exactly():
    """CapturedStep's warm-up steps leave parameters and Adam's state as they were, so the first
    replay is the first real step: one real step after run_and_undo == one step on a twin."""
    sae = _topk_sae()
    twin = copy.deepcopy(sae)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, fused=True)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=1e-2, fused=True)
    x = torch.randn(33, 24)
    dead = _dead(150, 9)

    def one_step(model, o):
        o.zero_grad(set_to_none=True)
        model.training_forward(x, dead_mask=dead).loss.backward()
        o.step()

    for first in (True, False):  # a fresh optimizer, then one with state
        graph.run_and_undo(lambda: [one_step(sae, opt) for _ in range(3)], opt)
        for name, p in sae.named_parameters():
            assert torch.equal(p, getattr(twin, name)), name
        one_step(sae, opt)
        one_step(twin, opt_twin)
        for name, p in sae.named_parameters():
            assert torch.equal(p, getattr(twin, name)), name
            s, t = opt.state[p], opt_twin.state[getattr(twin, name)]
            assert torch.equal(s["exp_avg_sq"], t["exp_avg_sq"]) and torch.equal(s["step"], t["step"])


def test_found_inf_refuses_the_step():
    """The captured step's guard: torch's fused Adam skips its whole update when found_inf is set."""
    sae = _topk_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, fused=True)
    x = torch.randn(33, 24)
    sae.training_forward(x).loss.backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    step_before = opt.state[sae.W_dec]["step"].clone()
    sae.training_forward(x).loss.backward()
    opt.found_inf = torch.ones(())
    opt.step()
    for n, p in sae.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(opt.state[sae.W_dec]["step"], step_before)


def test_captured_step_run_checks_the_dead_mask_as_training_forward():
    """run() copies the mask into the captured buffer: a wrong shape would broadcast and a wrong
    dtype be cast silently, so it is checked first (the graph itself needs CUDA; the check does not)."""
    sae = _topk_sae()
    step = graph.CapturedStep.__new__(graph.CapturedStep)
    step.sae, step.x, step.dead, step.graph = sae, torch.zeros(8, 24), torch.zeros(150, dtype=torch.bool), None
    x = torch.randn(8, 24)
    for bad, got in ((torch.zeros(150), "torch.float32 (150,)"), (torch.ones(1, dtype=torch.bool), "torch.bool (1,)"),
                     (torch.ones(150, 1, dtype=torch.bool), "torch.bool (150, 1)")):
        with pytest.raises(ValueError, match=rf"dead_mask: expected a bool tensor of shape \(150,\) on cpu, got {re.escape(got)}"):
            step.run(x, dead_mask=bad)
    with pytest.raises(ValueError, match="dead_mask: expected a bool tensor of shape \\(150,\\), got list"):
        step.run(x, dead_mask=[True] * 150)
    assert not step.dead.any(), "a refused mask was copied"


def test_captured_step_and_adam_choices_check_their_arguments():
    sae = _topk_sae()
    with pytest.raises(ValueError, match="CUDA"):
        graph.CapturedStep(sae, optim.make_adam(sae.parameters()), 8)
    with pytest.raises(ValueError, match="capturable"):
        optim.make_adam(sae.parameters(), device="cpu", capturable=True)
    assert type(optim.make_adam(sae.parameters(), device="cpu")) is optim.Adam  # the chunked one on the CPU
    opt = optim.make_adam(sae.parameters(), lr=0.5)
    optim.set_lr(opt, 0.25)
    assert all(g["lr"] == 0.25 for g in opt.param_groups)

