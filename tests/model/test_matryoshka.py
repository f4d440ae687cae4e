"""fastsae's Matryoshka BatchTopK SAE: its nested losses on the sparse activations against SAELens'
MatryoshkaBatchTopKTrainingSAE (the real library) and a float64 dense reference, its config rules,
and its checkpoints."""

import warnings

import pytest
import torch

from helpers.auxk import spread_parameters

import fastsae
from fastsae import SAE
from fastsae.architectures.matryoshka import default_widths, widths_from_group_sizes

D_IN, D_SAE = 24, 96
WIDTHS = (10, 37, D_SAE)


def _fastsae(k, widths=WIDTHS, dtype="float64", rescale=True, d_in=D_IN, d_sae=D_SAE, path="sparse"):
    torch.manual_seed(0)
    sae = SAE(d_in=d_in, d_sae=d_sae, architecture="matryoshka_batchtopk", k=k, matryoshka_widths=widths,
              dtype=dtype, rescale_acts_by_decoder_norm=rescale)
    sae.sparse_width_limit = {"sparse": d_sae, "dense": 0}[path]
    return spread_parameters(sae)


def _saelens_twin(sae, aux_coefficient):
    from sae_lens.saes import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

    cfg = sae.cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k, dtype=cfg.dtype, matryoshka_widths=list(cfg.matryoshka_widths),
            rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm, aux_loss_coefficient=aux_coefficient,
            topk_threshold_lr=cfg.topk_threshold_lr,
        ))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(twin, name).copy_(getattr(sae, name))
    return twin


def _grads(sae):
    return {name: getattr(sae, name).grad for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("n_dead", [0, 3, 60])
@pytest.mark.parametrize("k", [5, 1])
def test_three_training_steps_match_saelens(path, rescale, n_dead, k):
    pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import TrainStepInput

    sae = _fastsae(k, rescale=rescale, path=path)
    twin = _saelens_twin(sae, aux_coefficient=0.75)
    torch.manual_seed(5)
    x = torch.randn(39, D_IN, dtype=torch.float64)
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE)[:n_dead]] = True
    tol = dict(rtol=1e-9, atol=1e-10)
    for _ in range(3):
        sae.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        ours = sae.training_forward(x, dead_mask=mask if n_dead else None, aux_coefficient=0.75)
        ours.loss.backward()
        theirs = twin.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=mask, n_training_steps=0, is_logging_step=False))
        theirs.loss.backward()
        inner = sum(theirs.losses[f"inner_mse_loss_{w}"] for w in WIDTHS[:-1])
        torch.testing.assert_close(ours.x_hat, theirs.sae_out, **tol)
        torch.testing.assert_close(ours.acts.to_dense(), theirs.feature_acts, **tol)
        torch.testing.assert_close(ours.mse_loss, theirs.losses["mse_loss"], **tol)
        torch.testing.assert_close(ours.nested_loss, inner, **tol)
        torch.testing.assert_close(ours.aux_loss, theirs.losses["auxiliary_reconstruction_loss"], **tol)
        torch.testing.assert_close(ours.loss, theirs.loss, **tol)
        for name, grad in _grads(twin).items():
            torch.testing.assert_close(_grads(sae)[name], grad, **tol, msg=lambda m: f"grad of {name}: {m}")
        torch.testing.assert_close(sae.topk_threshold, twin.topk_threshold.to(torch.float64), **tol)
        with torch.no_grad():  # the same small step on both, so the next batch differs
            for name, grad in _grads(sae).items():
                getattr(sae, name).sub_(0.01 * grad)
            for name, grad in _grads(twin).items():
                getattr(twin, name).sub_(0.01 * grad)
    if n_dead:
        assert ours.aux_loss > 0


def _dense_reference(sae, x):
    """Float64: BatchTopK's dense activations, then every level's reconstruction from the latents
    below its width, as SAELens and dictionary_learning define the nested levels."""
    p = {n: getattr(sae, n).detach().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    x = x.double().reshape(-1, sae.d_in)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    norm = p["W_dec"].norm(dim=1) if sae.cfg.rescale_acts_by_decoder_norm else torch.ones(sae.d_sae, dtype=torch.float64)
    acts = (pre * norm).relu().flatten()
    keep = acts.topk(sae.cfg.k * x.shape[0]).indices
    dense = torch.zeros_like(acts).scatter(0, keep, acts[keep]).view(x.shape[0], -1) / norm
    return [dense[:, :w] @ p["W_dec"][:w] + p["b_dec"] for w in sae.cfg.matryoshka_widths]


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("d_in,d_sae,k,widths", [(24, 96, 1, (96,)), (17, 333, 7, (1, 50, 51, 333)), (40, 1000, 16, None)])
def test_levels_equal_a_float64_dense_reference_on_odd_shapes(path, d_in, d_sae, k, widths):
    sae = _fastsae(k, widths=widths, d_in=d_in, d_sae=d_sae, path=path, dtype="float32")
    torch.manual_seed(1)
    x = torch.randn(3, 29, d_in)  # 3-D input
    out = sae.training_forward(x)
    levels = _dense_reference(sae, x)
    x2 = x.double().reshape(-1, d_in)
    want_nested = sum(((level - x2) ** 2).sum(1).mean() for level in levels[:-1])
    assert out.x_hat.shape == x.shape
    torch.testing.assert_close(out.x_hat.double().reshape(-1, d_in), levels[-1], rtol=1e-5, atol=1e-5)
    want_nested = torch.as_tensor(want_nested, dtype=torch.float64)
    torch.testing.assert_close(out.nested_loss.double(), want_nested, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), ((levels[-1] - x2) ** 2).sum(1).mean() + want_nested, rtol=1e-5, atol=1e-5)
    if len(sae.cfg.matryoshka_widths) == 1:
        assert float(out.nested_loss) == 0.0


def test_default_widths_double_up_to_d_sae_and_group_sizes_accumulate():
    assert default_widths(16384) == (1024, 2048, 4096, 8192, 16384)
    assert default_widths(3) == (1, 3)
    assert default_widths(1) == (1,)
    assert widths_from_group_sizes([2, 3, 5]) == (2, 5, 10)
    assert SAE(d_in=8, d_sae=64, architecture="matryoshka_batchtopk", k=2).cfg.matryoshka_widths == (4, 8, 16, 32, 64)


@pytest.mark.parametrize("widths,match", [
    ((10, 37, 95), "last level must be d_sae=96.*sum 95"),
    ((37, 10, 96), "strictly increasing"),
    ((0, 96), "strictly increasing positive"),
    (("a", 96), "list of integers"),
    ((10.5, 96), "list of integers"),
])
def test_bad_widths_say_what_was_expected(widths, match):
    with pytest.raises(ValueError, match=match):
        SAE(d_in=8, d_sae=96, architecture="matryoshka_batchtopk", k=2, matryoshka_widths=widths)


def test_widths_on_another_architecture_are_refused():
    with pytest.raises(ValueError, match="matryoshka_widths applies to matryoshka_batchtopk, not 'topk'"):
        SAE(d_in=8, d_sae=96, architecture="topk", k=2, matryoshka_widths=(10, 96))


def test_other_architectures_save_no_matryoshka_key():
    assert "matryoshka_widths" not in SAE(d_in=8, d_sae=16, architecture="topk", k=2).cfg.to_dict()
    saved = SAE(d_in=8, d_sae=16, architecture="matryoshka_batchtopk", k=2, matryoshka_widths=(4, 16)).cfg.to_dict()
    assert saved["matryoshka_widths"] == [4, 16]
    assert saved["architecture"] == "jumprelu" and saved["fastsae_architecture"] == "matryoshka_batchtopk"


def test_a_saved_matryoshka_sae_loads_back_and_computes_the_same(tmp_path):
    sae = _fastsae(3, dtype="float32")
    sae.train()
    x = torch.randn(50, D_IN)
    sae.training_forward(x)  # moves the inference threshold
    sae.eval()
    sae.save(tmp_path / "m")
    back = fastsae.load(tmp_path / "m")
    assert back.architecture == "matryoshka_batchtopk" and back.cfg.matryoshka_widths == WIDTHS
    torch.testing.assert_close(back.topk_threshold, sae.topk_threshold)
    torch.testing.assert_close(back(x), sae(x))


def test_saelens_matryoshka_checkpoints_load_and_ours_load_in_saelens(tmp_path):
    pytest.importorskip("sae_lens")
    from sae_lens import SAE as SAELensSAE

    twin = _saelens_twin(_fastsae(3, dtype="float32"), aux_coefficient=1 / 32)
    with torch.no_grad():
        twin.topk_threshold.fill_(0.05)
    twin.save_model(tmp_path / "theirs")  # a SAELens training checkpoint (cfg keeps its widths)
    for ours in (fastsae.load(tmp_path / "theirs"), SAE.from_saelens(twin)):
        assert ours.architecture == "matryoshka_batchtopk" and ours.cfg.matryoshka_widths == WIDTHS
        assert float(ours.topk_threshold) == pytest.approx(0.05)
        torch.testing.assert_close(ours.W_enc, twin.W_enc)
    # ours, saved, is SAELens' inference JumpReLU SAE (the threshold rule), computing what we compute
    sae = _fastsae(3, dtype="float32")
    with torch.no_grad():
        sae.topk_threshold.fill_(0.05)
    sae.eval()
    sae.save(tmp_path / "ours")
    theirs = SAELensSAE.load_from_disk(tmp_path / "ours")
    assert type(theirs).__name__ == "JumpReLUSAE"
    x = torch.randn(40, D_IN)
    torch.testing.assert_close(theirs(x), sae(x), rtol=1e-5, atol=1e-5)


def _dictionary_learning_loss(sae, x, group_weights):
    """dictionary_learning's MatryoshkaBatchTopKTrainer.loss without its AuxK, in float64: the
    batch's k N largest ReLU'd pre-activations (no decoder-norm rescaling), the groups' running
    reconstruction from b_dec, each level's mean squared error times its group weight, averaged
    over the levels."""
    p = {n: getattr(sae, n).double() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    x = x.double()
    post = ((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
    flat = post.flatten()
    top = flat.topk(sae.cfg.k * x.shape[0], sorted=False)
    f = torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(post.shape)
    sizes = [b - a for a, b in zip((0, *sae.cfg.matryoshka_widths), sae.cfg.matryoshka_widths)]
    recon, losses = p["b_dec"].expand_as(x), []
    for acts, w_dec, weight in zip(f.split(sizes, 1), p["W_dec"].split(sizes, 0), group_weights):
        recon = recon + acts @ w_dec
        losses.append((x - recon).pow(2).sum(-1).mean() * weight)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_weighted_levels_equal_dictionary_learnings_loss(path):
    group_weights = (0.5, 0.2, 0.3)  # dictionary_learning's group_weights; fastsae's weight is it / levels
    sae = _fastsae(4, rescale=False, path=path)
    sae.cfg.matryoshka_weights = tuple(w / len(WIDTHS) for w in group_weights)
    torch.manual_seed(7)
    x = torch.randn(45, D_IN, dtype=torch.float64)
    out = sae.training_forward(x)
    p = {n: getattr(sae, n).detach().clone().requires_grad_() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    want = _dictionary_learning_loss(type("P", (), {**p, "cfg": sae.cfg})(), x, group_weights)
    torch.testing.assert_close(out.loss, want, rtol=1e-9, atol=1e-10)
    out.loss.backward()
    want.backward()
    for name in p:
        torch.testing.assert_close(getattr(sae, name).grad, p[name].grad, rtol=1e-9, atol=1e-10, msg=name)
    torch.testing.assert_close(out.mse_loss, (out.x_hat - x).pow(2).sum(-1).mean())  # still the outer MSE


@pytest.mark.parametrize("weights,match", [((1, 1), "expected 3 finite non-negative numbers"),
                                           ((1, -1, 1), "non-negative"), ((1, "a", 1), "list of numbers")])
def test_bad_weights_say_what_was_expected(weights, match):
    with pytest.raises(ValueError, match=match):
        SAE(d_in=8, d_sae=96, architecture="matryoshka_batchtopk", k=2, matryoshka_widths=WIDTHS,
            matryoshka_weights=weights)
    with pytest.raises(ValueError, match="matryoshka_weights applies to matryoshka_batchtopk, not 'batchtopk'"):
        SAE(d_in=8, d_sae=96, architecture="batchtopk", k=2, matryoshka_weights=(1.0,))
