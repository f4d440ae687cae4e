"""The gated architecture against a float64 reference written from SAELens' GatedSAE formulas."""

import pytest
import torch
from conftest import assert_rel_close

import fastsae
from fastsae import SAE, SparseActivations


def make_gated(d_in, d_sae, **kw):
    sae = SAE(d_in=d_in, d_sae=d_sae, architecture="gated", **kw)
    with torch.no_grad():  # away from the all-zero gated parameters of a fresh SAE
        sae.b_gate.normal_(0, 0.1)
        sae.r_mag.normal_(0, 0.3)
        sae.b_mag.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def saelens_gated(p, x, apply_b_dec_to_input=True):
    """SAELens GatedSAE.encode / decode, and GatedTrainingSAE's losses, in float64."""
    x = x.double()
    sae_in = x - p["b_dec"] if apply_b_dec_to_input else x
    pi_gate = sae_in @ p["W_enc"] + p["b_gate"]
    active = (pi_gate > 0).double()
    magnitude = (sae_in @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]).relu()
    acts = active * magnitude
    x_hat = acts @ p["W_dec"] + p["b_dec"]
    gate_acts = pi_gate.relu()
    l1 = (gate_acts * p["W_dec"].norm(dim=1)).sum(-1).mean()
    aux = ((gate_acts @ p["W_dec"] + p["b_dec"]) - x).pow(2).sum(-1).mean()
    return acts, x_hat, l1, aux


def test_parameters_are_saelens_names():
    sae = make_gated(24, 90)
    shapes = {n: tuple(t.shape) for n, t in sae.named_parameters()}
    assert shapes == {
        "W_dec": (90, 24), "W_enc": (24, 90), "b_gate": (90,), "r_mag": (90,), "b_mag": (90,), "b_dec": (24,)
    }
    assert not hasattr(sae, "b_enc")


@pytest.mark.parametrize("d_in,d_sae,lead", [(24, 90, (13,)), (48, 333, (3, 5)), (7, 1, (2,))])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_encode_decode_forward_match_float64(d_in, d_sae, lead, apply_b_dec_to_input):
    sae = make_gated(d_in, d_sae, apply_b_dec_to_input=apply_b_dec_to_input)
    x = torch.randn(*lead, d_in)
    p = {n: t.detach().double() for n, t in sae.named_parameters()}
    ref_acts, ref_out, _, _ = saelens_gated(p, x, apply_b_dec_to_input)
    acts = sae.encode(x)
    assert (ref_acts != 0).any() and (ref_acts == 0).any(), "gate all open or all shut: test would be vacuous"
    assert_rel_close(acts, ref_acts.reshape(acts.shape), 1e-5, "acts")
    assert_rel_close(sae(x), ref_out.reshape(x.shape), 1e-5, "forward")
    assert_rel_close(sae.decode(acts), ref_out.reshape(x.shape), 1e-5, "decode")
    sparse = sae.encode_sparse(x)
    assert isinstance(sparse, SparseActivations)
    assert_rel_close(sparse.to_dense(), ref_acts.reshape(acts.shape), 1e-5, "encode_sparse")


def test_training_losses_and_gradients_match_saelens():
    sae = make_gated(48, 333)
    x = torch.randn(29, 48)
    out = sae.training_forward(x, sparsity_coefficient=0.3)
    p = {n: t.detach().double().requires_grad_() for n, t in sae.named_parameters()}
    _, x_hat, l1, aux = saelens_gated(p, x)
    mse = (x_hat - x.double()).pow(2).sum(-1).mean()
    assert_rel_close(out.mse_loss, mse.detach(), 1e-5, "mse")
    assert_rel_close(out.sparsity_loss, 0.3 * l1.detach(), 1e-5, "l1")
    assert_rel_close(out.aux_loss, aux.detach(), 1e-5, "aux")
    out.loss.backward()
    (mse + 0.3 * l1 + aux).backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert_rel_close(param.grad, p[name].grad, 1e-5, f"grad {name}")


def test_plain_l1_with_decoder_norm_none():
    sae = make_gated(24, 90, decoder_norm="none")
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    x = torch.randn(11, 24)
    out = sae.training_forward(x, sparsity_coefficient=0.5)
    pi_gate = (x - sae.b_dec) @ sae.W_enc + sae.b_gate
    assert_rel_close(out.sparsity_loss, 0.5 * pi_gate.relu().sum(-1).mean().detach(), 1e-5)


def test_save_load_round_trip(tmp_path):
    sae = make_gated(24, 90)
    folder = sae.save(tmp_path / "g")
    loaded = fastsae.load(folder)
    assert loaded.architecture == "gated"
    x = torch.randn(5, 24)
    assert torch.equal(loaded(x), sae(x))
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
