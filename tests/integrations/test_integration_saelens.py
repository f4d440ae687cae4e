"""fastsae inside SAELens: the patched TopK classes against SAELens' own code, on the real library."""

import copy

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from sae_lens.saes import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402

import fastsae.integrations.saelens as integ  # noqa: E402
from fastsae.integrations import apply_to_saelens, revert_saelens, saelens_accelerated_classes  # noqa: E402
from helpers.auxk import spread_parameters  # noqa: E402
from helpers.saelens import fit_with_saelens_trainer, unpatched_saelens  # noqa: E402,F401  (unpatched_saelens: autouse fixture)

D_IN, D_SAE, K, N = 24, 96, 5, 40


def _training_sae(rescale=True, apply_b_dec=True, seed=0, sparse=False):
    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=apply_b_dec,
        aux_loss_coefficient=0.75, use_sparse_activations=sparse,
    )
    sae = TopKTrainingSAE(cfg)
    return spread_parameters(sae)


def _step(sae, x, mask):
    for p in sae.parameters():
        p.grad = None
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


def _close(a, b, what):
    if a.is_sparse or b.is_sparse:
        assert a.is_sparse and b.is_sparse, f"{what}: layouts {a.layout} and {b.layout}"
        a, b = a.to_dense(), b.to_dense()
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("n_dead", [0, 3, 60])
@pytest.mark.parametrize("sparse", [False, True])
def test_training_step_matches_saelens(rescale, apply_b_dec, n_dead, sparse):
    sae = _training_sae(rescale, apply_b_dec, seed=n_dead, sparse=sparse)
    x = torch.randn(N, D_IN) * 2
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE)[:n_dead]] = True
    if sparse and rescale:
        # SAELens 6.54's own backward fails here (a view of its sparse rescaled activations); the
        # patched step computes what its dense layout computes, the same math.
        with pytest.raises(NotImplementedError, match="aten::view"):
            _step(sae, x, mask)
        sae.cfg.use_sparse_activations = sae.activation_fn.use_sparse_activations = False
        want, want_grads = _step(sae, x, mask)
        sae.cfg.use_sparse_activations = sae.activation_fn.use_sparse_activations = True
        want.feature_acts = want.feature_acts.to_sparse()
    else:
        want, want_grads = _step(sae, x, mask)
    apply_to_saelens()
    assert TopKTrainingSAE.training_forward_pass.__fastsae_original__ is not None
    got, got_grads = _step(sae, x, mask)
    _close(got.loss, want.loss, "loss")
    for name in ("mse_loss", "auxiliary_reconstruction_loss"):
        _close(got.losses[name], want.losses[name], name)
    if n_dead:
        assert float(want.losses["auxiliary_reconstruction_loss"].detach()) > 0
    _close(got.sae_out, want.sae_out, "sae_out")
    _close(got.feature_acts, want.feature_acts, "feature_acts")
    _close(got.hidden_pre, want.hidden_pre, "hidden_pre")
    assert set(got_grads) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in got_grads:
        _close(got_grads[name], want_grads[name], f"grad {name}")


@pytest.mark.parametrize("sparse", [False, True])
def test_inference_and_training_encode_forward_match_3d_input(sparse):
    train = _training_sae(sparse=sparse)
    cfg = TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True)
    infer = TopKSAE(cfg)
    infer.load_state_dict(train.state_dict())
    x = torch.randn(3, 7, D_IN)
    want = {}
    for name, sae in (("train", train), ("infer", infer)):
        for error_term in (False, True):
            sae.use_error_term = error_term
            want[name, error_term] = (sae.encode(x), sae(x))
    apply_to_saelens()
    for (name, error_term), (enc, fwd) in want.items():
        sae = train if name == "train" else infer
        sae.use_error_term = error_term
        _close(sae.encode(x), enc, f"{name} encode")
        _close(sae(x), fwd, f"{name} forward, error term {error_term}")


def test_hooks_take_saelens_path_with_its_values():
    sae = _training_sae()
    x = torch.randn(N, D_IN)
    seen = []
    sae.hook_sae_acts_pre.add_hook(lambda t, hook: seen.append(t.detach().clone()))
    want = sae.encode(x)
    apply_to_saelens()
    calls = []
    original = integ._encode_flat
    integ._encode_flat = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        got = sae.encode(x)
    finally:
        integ._encode_flat = original
    assert calls == []  # the hook needs the dense pre-activations: SAELens' own code ran
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1])
    torch.testing.assert_close(got, want)


def test_fused_path_runs_and_subclasses_keep_their_code():
    from sae_lens.saes import AbsTopKTrainingSAE, AbsTopKTrainingSAEConfig

    apply_to_saelens()
    calls = []
    original = integ._encode_flat
    integ._encode_flat = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        _training_sae().encode(torch.randn(4, D_IN))
        assert calls == [1]
        torch.manual_seed(0)
        subclass = AbsTopKTrainingSAE(AbsTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
        subclass.encode(torch.randn(4, D_IN))  # a TopK subclass with math of its own
        assert calls == [1]
    finally:
        integ._encode_flat = original
    assert AbsTopKTrainingSAE in integ.saelens_unaccelerated_classes()


def test_revert_restores_the_originals():
    before = {cls: dict(vars(cls)) for cls in saelens_accelerated_classes()}
    apply_to_saelens()
    apply_to_saelens()  # idempotent
    assert "training_forward_pass" in vars(TopKTrainingSAE) and "training_forward_pass" not in before[TopKTrainingSAE]
    assert vars(TopKSAE)["encode"] is not before[TopKSAE]["encode"]
    assert "forward" in vars(TopKSAE) and "forward" not in before[TopKSAE]
    revert_saelens()
    for cls, attrs in before.items():
        assert set(vars(cls)) == set(attrs)
        for name in ("encode", "forward", "training_forward_pass"):
            assert vars(cls).get(name) is attrs.get(name)


def test_version_outside_range_is_refused(monkeypatch):
    monkeypatch.setattr(sae_lens, "__version__", "6.60.0")
    with pytest.raises(RuntimeError, match=r"6\.60\.0.*>=6\.54,<6\.55"):
        apply_to_saelens()
    assert not integ.is_patched()


def test_bad_argument():
    with pytest.raises(ValueError, match="dense_hidden_pre: expected a bool"):
        apply_to_saelens(dense_hidden_pre="no")


def test_saelens_trainer_runs_patched_and_matches():
    def run():
        sae = _training_sae(seed=3)
        return sae, fit_with_saelens_trainer(sae, D_IN)

    want, want_trainer = run()
    apply_to_saelens()
    got, got_trainer = run()
    assert got_trainer.n_training_steps == want_trainer.n_training_steps == 6
    for name, p in want.named_parameters():
        torch.testing.assert_close(dict(got.named_parameters())[name], p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "arch, kw",
    [("topk", {"k": 4, "rescale_acts_by_decoder_norm": True}), ("topk", {"k": 4}), ("relu", {}), ("jumprelu", {}),
     ("batchtopk", {"k": 4})],
)
@pytest.mark.parametrize("training", [False, True])
def test_to_and_from_saelens_objects(arch, kw, training):
    import fastsae
    from fastsae.config import SAEConfig

    torch.manual_seed(0)
    sae = fastsae.SAE(SAEConfig(architecture=arch, d_in=16, d_sae=64, **kw))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
            if name == "threshold":
                p.abs_()
    sae.eval()
    x = torch.randn(10, 16)
    sl = sae.to_saelens(training=training)
    assert type(sl).__name__.endswith("TrainingSAE") == training
    back = fastsae.SAE.from_saelens(sl)
    assert back.architecture == (sae.architecture if training or arch != "batchtopk" else "jumprelu")
    torch.testing.assert_close(back(x), sae(x))
    if not (training and arch == "batchtopk"):  # SAELens' training BatchTopK selects over the batch
        sl.eval()
        torch.testing.assert_close(sl(x), sae(x), rtol=1e-5, atol=1e-6)
    for name, p in sae.named_parameters():
        if arch != "batchtopk" or training:
            torch.testing.assert_close(dict(back.named_parameters())[name], p, rtol=0, atol=0)


def test_from_saelens_refuses_other_objects():
    import fastsae

    with pytest.raises(ValueError, match="expected a sae_lens SAE"):
        fastsae.SAE.from_saelens(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="training: expected a bool"):
        fastsae.SAE(d_in=8, d_sae=16, k=2).to_saelens(training="yes")


def test_hooked_sae_transformer_same_logits_and_cache():
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    model = HookedSAETransformer(HookedTransformerConfig(
        n_layers=1, d_model=D_IN, n_ctx=8, d_head=4, n_heads=6, d_vocab=50, act_fn="relu", device="cpu",
    ))
    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True))
    sae.load_state_dict(_training_sae().state_dict())
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, 50, (3, 8))

    def run():
        logits = model.run_with_saes(tokens, saes=[sae])
        cached_logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        acts = {name: t for name, t in cache.items() if "hook_sae" in name}
        return logits, cached_logits, acts

    want = run()
    assert not torch.allclose(want[0], model(tokens))  # the SAE is spliced in
    apply_to_saelens()
    calls = []
    original = integ._encode_flat
    integ._encode_flat = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        got = run()
    finally:
        integ._encode_flat = original
    assert calls == [1]  # run_with_saes fused; run_with_cache_with_saes hooks the SAE: SAELens' code
    _close(got[0], want[0], "run_with_saes logits")
    _close(got[1], want[1], "run_with_cache_with_saes logits")
    assert set(got[2]) == set(want[2]) and any("hook_sae_acts_post" in name for name in want[2])
    for name in want[2]:
        _close(got[2][name], want[2][name], name)
