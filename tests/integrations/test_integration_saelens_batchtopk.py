"""fastsae inside SAELens: the patched BatchTopK and Matryoshka BatchTopK training classes against
SAELens' own code, on the real library."""

import copy
import warnings

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from sae_lens.saes import (  # noqa: E402
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput  # noqa: E402

import fastsae.integrations.saelens_batchtopk as batchtopk_patch  # noqa: E402
from fastsae.integrations._saelens_common import sparse_path_of  # noqa: E402
from fastsae.integrations import apply_to_saelens, saelens_accelerated_classes  # noqa: E402
from helpers.auxk import spread_parameters  # noqa: E402
from helpers.saelens import SAELENS_TOL, fit_with_saelens_trainer, unpatched_saelens  # noqa: E402,F401  (unpatched_saelens: autouse fixture)

D_IN, D_SAE = 24, 96
WIDTHS = [10, 37, D_SAE]
TOL = SAELENS_TOL


@pytest.fixture
def selections(monkeypatch):
    """The bound each fused batch selection ended with (one entry per call)."""
    bounds = []
    original = batchtopk_patch._selection

    def counting(sae, *args):
        out = original(sae, *args)
        bounds.append(sparse_path_of(sae).batchtopk_bound)
        return out

    monkeypatch.setattr(batchtopk_patch, "_selection", counting)
    return bounds


def _sae(kind, k, dtype=torch.float64, rescale=True, **kw):
    torch.manual_seed(0)
    common = dict(d_in=D_IN, d_sae=D_SAE, k=k, dtype=str(dtype).split(".")[1], rescale_acts_by_decoder_norm=rescale,
                  aux_loss_coefficient=0.75)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SAELens warns about one-level or unclosed Matryoshka widths
        if kind == "batchtopk":
            sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, **kw))
        else:
            sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**common, matryoshka_widths=list(WIDTHS), **kw))
    return spread_parameters(sae)


def _step(sae, x, mask):
    for p in sae.parameters():
        p.grad = None
    out = sae.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask, n_training_steps=0, is_logging_step=False)
    )
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


def _input(kind, dtype, skewed=False):
    torch.manual_seed(5)
    # Matryoshka: SAELens' nested decode takes [N, d_in] only
    x = torch.randn(3, 13, D_IN, dtype=dtype) if kind == "batchtopk" else torch.randn(39, D_IN, dtype=dtype)
    if skewed:  # one row far larger than the rest: it holds most of the batch's largest activations
        x.view(-1, D_IN)[7] *= 25
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka", "matryoshka-level-aux"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("n_dead", [0, 3, 60])
@pytest.mark.parametrize("k", [5, 2.5, 1])
def test_three_training_steps_match_saelens(kind, dtype, rescale, n_dead, k, selections):
    level_aux = kind == "matryoshka-level-aux"
    kind = "matryoshka" if level_aux else kind
    sae = _sae(kind, k, dtype, rescale, **({"use_matryoshka_aux_loss": True} if level_aux else {}))
    x = _input(kind, dtype)
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE)[:n_dead]] = True
    reference = copy.deepcopy(sae)
    want = [_step(reference, x, mask) for _ in range(3)]
    want_encode, want_forward = reference.encode(x), reference(x)
    apply_to_saelens()
    got = [_step(sae, x, mask) for _ in range(3)]
    got_encode, got_forward = sae.encode(x), sae(x)
    assert len(selections) == 5, "every call should have taken the fused path"
    tol = TOL[dtype]
    for (w, w_grads), (g, g_grads) in zip(want, got):
        for name in ("sae_out", "feature_acts", "hidden_pre"):
            torch.testing.assert_close(getattr(g, name), getattr(w, name), **tol, msg=lambda m: f"{name}: {m}")
        assert list(g.losses) == list(w.losses)
        for name, value in w.losses.items():
            torch.testing.assert_close(g.losses[name], value, **tol, msg=lambda m: f"loss {name}: {m}")
        torch.testing.assert_close(g.loss, w.loss, **tol)
        for name, grad in w_grads.items():
            torch.testing.assert_close(g_grads[name], grad, **tol, msg=lambda m: f"grad of {name}: {m}")
        torch.testing.assert_close(g.metrics["topk_threshold"], w.metrics["topk_threshold"], **tol)
    if n_dead:
        assert w.losses["auxiliary_reconstruction_loss"] > 0
    if kind == "matryoshka":
        assert {f"inner_mse_loss_{w}" for w in WIDTHS[:-1]} <= set(w.losses)
    torch.testing.assert_close(got_encode, want_encode, **tol)
    torch.testing.assert_close(got_forward, want_forward, **tol)
    torch.testing.assert_close(sae.topk_threshold, reference.topk_threshold, **tol)
    assert sae.topk_threshold > 0


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_a_row_holding_most_of_the_batch_grows_the_bound_and_stays_exact(kind, selections):
    sae = _sae(kind, 4)
    x = _input(kind, torch.float64, skewed=True)
    want, want_grads = _step(copy.deepcopy(sae), x, None)
    apply_to_saelens()
    got, got_grads = _step(sae, x, None)
    assert selections[-1] > 4 * 4, "the first bound (4 k) should not have been enough"
    assert (want.feature_acts.reshape(-1, D_SAE)[7] != 0).sum() > 16
    torch.testing.assert_close(got.feature_acts, want.feature_acts, **TOL[torch.float64])
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **TOL[torch.float64])


def test_saelens_code_runs_where_the_patch_does_not_apply(selections):
    apply_to_saelens()
    # Matryoshka's own nested decode refuses 3-D input; the patch leaves the error to it
    sae = _sae("matryoshka", 3)
    with pytest.raises(RuntimeError):
        _step(sae, torch.randn(2, 5, D_IN, dtype=torch.float64), None)
    assert selections == []


def test_hooks_take_saelens_path(selections):
    sae = _sae("batchtopk", 3)
    x = _input("batchtopk", torch.float64)
    seen = []
    sae.hook_sae_acts_post.add_hook(lambda t, hook: seen.append(t.detach().clone()))
    want = sae.encode(x)
    apply_to_saelens()
    got = sae.encode(x)
    assert selections == [] and len(seen) == 2
    torch.testing.assert_close(got, want)


def test_listed_as_accelerated():
    names = {cls.__name__ for cls in saelens_accelerated_classes()}
    assert {"BatchTopKTrainingSAE", "MatryoshkaBatchTopKTrainingSAE", "TopKTrainingSAE"} <= names


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_saelens_trainer_runs_patched_and_matches(kind, selections):
    def run():
        sae = _sae(kind, 4, torch.float32)
        return sae, fit_with_saelens_trainer(sae, D_IN)

    want, want_trainer = run()
    apply_to_saelens()
    got, got_trainer = run()
    assert got_trainer.n_training_steps == want_trainer.n_training_steps == 6
    assert len(selections) >= 6
    for name, p in want.named_parameters():
        torch.testing.assert_close(dict(got.named_parameters())[name], p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.topk_threshold, want.topk_threshold, rtol=1e-4, atol=1e-6)
