"""fastsae inside SAELens: the patched ReLU ("standard"), JumpReLU and transcoder classes against
SAELens' own code, on the real library."""

import copy

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from sae_lens.saes import (  # noqa: E402
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import TrainStepInput  # noqa: E402

import fastsae.integrations.saelens_threshold as threshold_patch  # noqa: E402
from fastsae.integrations import apply_to_saelens, revert_saelens, saelens_accelerated_classes  # noqa: E402
from helpers.saelens import SAELENS_TOL, fit_with_saelens_trainer, unpatched_saelens  # noqa: E402,F401  (unpatched_saelens: autouse fixture)

# d_sae 400: rows of up to 50 entries take the sparse path on the CPU (d_sae / 8).
D_IN, D_OUT, D_SAE, N = 24, 19, 400, 37
TOL = SAELENS_TOL


@pytest.fixture
def sparse_calls(monkeypatch):
    """How many calls took the sparse path (a list of True per sparse pass, False per overflow)."""
    calls = []
    original = threshold_patch._sparse_pre

    def counting(*args):
        out = original(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(threshold_patch, "_sparse_pre", counting)
    return calls


def _randomize(sae, b_enc_mean=-2.2, dtype=torch.float64):
    """Random (non-zero) biases, decoder rows of different norms, thresholds on both sides of 0:
    a sparse regime (L0 ~5-10 of 400)."""
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_enc":
                p.normal_(0, 0.2)
            elif name == "b_enc":
                p.normal_(b_enc_mean, 0.3)
            elif name == "threshold":
                p.uniform_(-0.1, 0.6)
            elif name == "W_dec":
                p.normal_(0, 0.3).mul_(torch.rand(p.shape[0], 1, dtype=p.dtype) + 0.5)
            else:
                p.normal_(0, 0.3)
    return sae


TRAINING_CASES = {
    "standard-l1": (StandardTrainingSAE, StandardTrainingSAEConfig, {}, {"l1": 0.3}),
    "standard-l2": (StandardTrainingSAE, StandardTrainingSAEConfig, {"lp_norm": 2.0}, {"l1": 0.3}),
    "standard-no-b_dec-in": (StandardTrainingSAE, StandardTrainingSAEConfig, {"apply_b_dec_to_input": False}, {"l1": 0.1}),
    "jumprelu-step": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {"jumprelu_bandwidth": 0.5}, {"l0": 0.2}),
    "jumprelu-step-ste": (
        JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {"jumprelu_bandwidth": 0.5, "jumprelu_ste_to_input": True}, {"l0": 0.2}
    ),
    "jumprelu-tanh-preact": (
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        {"jumprelu_bandwidth": 0.5, "jumprelu_sparsity_loss_mode": "tanh", "jumprelu_ste_to_input": True,
         "pre_act_loss_coefficient": 0.1},
        {"l0": 0.2},
    ),
    "jumprelu-quadratic": (
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        {"jumprelu_bandwidth": 0.5, "jumprelu_sparsity_loss_mode": "quadratic", "target_l0": 5},
        {"l0": 0.2},
    ),
}


def _training_step(sae, x, coefficients, mask):
    for p in sae.parameters():
        p.grad = None
    out = sae.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=mask, n_training_steps=0, is_logging_step=False)
    )
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(TRAINING_CASES))
@pytest.mark.parametrize("three_d", [False, True])
def test_training_step_matches_saelens(case, dtype, three_d, sparse_calls):
    cls, cfg_cls, kw, coefficients = TRAINING_CASES[case]
    torch.manual_seed(1)
    sae = _randomize(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype=str(dtype).split(".")[1], **kw)), b_enc_mean=-2.1)
    x = torch.randn(*((3, 13) if three_d else (N,)), D_IN, dtype=dtype)
    mask = torch.rand(D_SAE) < 0.1
    reference = copy.deepcopy(sae)
    want, want_grads = _training_step(reference, x, coefficients, mask)
    apply_to_saelens()
    got, got_grads = _training_step(sae, x, coefficients, mask)
    assert sparse_calls == [True], "the step should have taken the sparse path"
    active = (want.feature_acts != 0).sum(-1).float()
    assert 1 <= active.mean() <= D_SAE / 8, "the case should be in the sparse regime with active latents"
    tol = TOL[dtype]
    for name in ("sae_out", "feature_acts", "hidden_pre"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **tol, msg=lambda m: f"{name}: {m}")
    assert set(got.losses) == set(want.losses)
    for name, value in want.losses.items():
        torch.testing.assert_close(got.losses[name], value, **tol, msg=lambda m: f"loss {name}: {m}")
    torch.testing.assert_close(got.loss, want.loss, **tol)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **tol, msg=lambda m: f"grad of {name}: {m}")
    if "threshold" in want_grads:
        assert want_grads["threshold"].count_nonzero() > 0, "the pseudo-gradients should reach the threshold"


def test_jumprelu_training_clamps_the_threshold_as_saelens_does():
    torch.manual_seed(2)
    sae = _randomize(JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64")), -2.1)
    assert (sae.threshold < 0).any()
    apply_to_saelens()
    _training_step(sae, torch.randn(N, D_IN, dtype=torch.float64), {"l0": 0.1}, None)
    assert (sae.threshold >= 0).all()


INFERENCE_CASES = {
    "StandardSAE": (StandardSAE, StandardSAEConfig, {}),
    "JumpReLUSAE": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "StandardTrainingSAE": (StandardTrainingSAE, StandardTrainingSAEConfig, {}),
    "JumpReLUTrainingSAE": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {}),
    "Transcoder": (Transcoder, TranscoderConfig, {"d_out": D_OUT, "apply_b_dec_to_input": False}),
    "SkipTranscoder": (SkipTranscoder, SkipTranscoderConfig, {"d_out": D_OUT, "apply_b_dec_to_input": False}),
    "JumpReLUTranscoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig, {"d_out": D_OUT, "apply_b_dec_to_input": False}),
    "JumpReLUSkipTranscoder": (
        JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, {"d_out": D_OUT, "apply_b_dec_to_input": False}
    ),
}


def _inference_outputs(sae, x):
    out = {"encode": sae.encode(x), "forward": sae(x)}
    if hasattr(sae, "forward_with_activations"):
        out["forward_with_activations"] = sae.forward_with_activations(x)
    else:
        sae.use_error_term = True
        out["forward with error term"] = sae(x)
        sae.use_error_term = False
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(INFERENCE_CASES))
def test_inference_matches_saelens_3d(case, dtype, sparse_calls):
    cls, cfg_cls, kw = INFERENCE_CASES[case]
    torch.manual_seed(0)
    sae = _randomize(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype=str(dtype).split(".")[1], **kw)))
    x = torch.randn(3, 11, D_IN, dtype=dtype)
    want = _inference_outputs(sae, x)
    apply_to_saelens()
    got = _inference_outputs(sae, x)
    assert sparse_calls and all(sparse_calls)
    assert (want["encode"] != 0).any(), "some latents should fire"
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_too_dense_rows_take_saelens_path_and_back_off(monkeypatch):
    torch.manual_seed(0)
    sae = _randomize(StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64")), b_enc_mean=0.5)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    want = sae(x)
    assert (want != 0).any() and (sae.encode(x) > 0).sum(-1).max() > D_SAE // 8
    apply_to_saelens()
    encodes = []
    original = threshold_patch.ops.threshold_encode
    monkeypatch.setattr(threshold_patch.ops, "threshold_encode", lambda *a: encodes.append(1) or original(*a))
    tried = []
    for _ in range(7):
        before = len(encodes)
        torch.testing.assert_close(sae(x), want, rtol=1e-10, atol=1e-11)
        tried.append(len(encodes) > before)
    # each overflow doubles the dense calls before the next try: 1, then 2, then 4
    assert tried == [True, False, True, False, False, True, False]


def test_hooks_take_saelens_path_with_their_values(sparse_calls):
    torch.manual_seed(0)
    sae = _randomize(JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64")))
    x = torch.randn(N, D_IN, dtype=torch.float64)
    seen = []
    sae.hook_sae_acts_post.add_hook(lambda t, hook: seen.append(t.detach().clone()))
    want = sae.encode(x)
    apply_to_saelens()
    got = sae.encode(x)
    assert sparse_calls == []  # the gate sent the call to SAELens' own code
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0])
    torch.testing.assert_close(got, want)


def test_the_classes_are_listed_and_revert_restores_them():
    names = {cls.__name__ for cls in saelens_accelerated_classes()}
    assert set(INFERENCE_CASES) <= names
    before = {cls: dict(vars(cls)) for cls in saelens_accelerated_classes()}
    apply_to_saelens()
    assert "forward_with_activations" in vars(JumpReLUSkipTranscoder)
    assert vars(SkipTranscoder)["forward"] is not before[SkipTranscoder]["forward"]
    revert_saelens()
    for cls, attrs in before.items():
        assert set(vars(cls)) == set(attrs), cls.__name__
        for name in ("encode", "forward", "forward_with_activations", "training_forward_pass"):
            assert vars(cls).get(name) is attrs.get(name)


def test_inherited_methods_wrap_saelens_own_code_once():
    apply_to_saelens()
    encode = vars(JumpReLUSkipTranscoder)["encode"]
    assert not hasattr(encode.__fastsae_original__, "__fastsae_original__")


@pytest.mark.parametrize("case", ["standard", "jumprelu"])
def test_saelens_trainer_runs_patched_and_matches(case, sparse_calls):
    def run():
        torch.manual_seed(3)
        if case == "standard":
            sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.5, l1_warm_up_steps=3))
        else:
            sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l0_coefficient=0.1, jumprelu_bandwidth=0.3))
        _randomize(sae, b_enc_mean=-2.1)
        return sae, fit_with_saelens_trainer(sae, D_IN)

    want, want_trainer = run()
    assert sparse_calls == []
    apply_to_saelens()
    got, got_trainer = run()
    assert got_trainer.n_training_steps == want_trainer.n_training_steps == 6
    assert sum(sparse_calls) >= 6, "every training step should have taken the sparse path"
    for name, p in want.named_parameters():
        torch.testing.assert_close(dict(got.named_parameters())[name], p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["StandardSAE", "JumpReLUSAE"])
def test_hooked_sae_transformer_same_logits_and_cache(case, sparse_calls):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    model = HookedSAETransformer(HookedTransformerConfig(
        n_layers=1, d_model=D_IN, n_ctx=8, d_head=4, n_heads=6, d_vocab=50, act_fn="relu", device="cpu",
    ))
    cls, cfg_cls, kw = INFERENCE_CASES[case]
    sae = _randomize(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype="float32", **kw)), b_enc_mean=-3.0)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, 50, (3, 8))

    def run():
        logits = model.run_with_saes(tokens, saes=[sae])
        cached_logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        return logits, cached_logits, {name: t for name, t in cache.items() if "hook_sae" in name}

    want = run()
    assert not torch.allclose(want[0], model(tokens))  # the SAE is spliced in
    assert (want[2]["blocks.0.hook_resid_post.hook_sae_acts_post"] != 0).any()
    apply_to_saelens()
    got = run()
    # run_with_saes takes the sparse path; run_with_cache_with_saes hooks the SAE: SAELens' code
    assert sparse_calls == [True]
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])
    assert set(got[2]) == set(want[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **TOL[torch.float32])
