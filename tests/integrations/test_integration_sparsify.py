"""fastsae inside sparsify: the patched SparseCoder against sparsify's own code, on the real library."""

import pytest
import torch

sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install 'fastsae[sparsify]')")

import sparsify.sparse_coder as sparse_coder_module  # noqa: E402
import sparsify.utils as sparsify_utils  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

import fastsae  # noqa: E402
import fastsae.integrations.sparsify as integ  # noqa: E402
from fastsae.integrations import (  # noqa: E402
    apply_to_sparsify,
    revert_sparsify,
    sparsify_accelerated_paths,
    sparsify_unaccelerated_paths,
)

D_IN, D_SAE, N = 37, 150, 29  # d_in not a power of two, odd batch


@pytest.fixture(autouse=True)
def _unpatched(monkeypatch):
    # sparsify's default decoder is a Triton kernel (GPU only); on a CPU its torch path is
    # eager_decode (what SPARSIFY_DISABLE_TRITON=1 selects at import).
    if not torch.cuda.is_available():
        monkeypatch.setattr(sparse_coder_module, "decoder_impl", sparsify_utils.eager_decode)
    revert_sparsify()
    yield
    revert_sparsify()


def _coder(seed=0, dtype=torch.float32, **cfg):
    torch.manual_seed(seed)
    cfg.setdefault("num_latents", D_SAE)
    sc = SparseCoder(D_IN, SparseCoderConfig(**cfg), dtype=dtype)
    with torch.no_grad():  # no zero biases; a transcoder's zero decoder and a zero W_skip made non-zero
        sc.encoder.bias.normal_(0, 0.1)
        sc.b_dec.normal_(0, 0.3)
        if cfg.get("transcode"):
            sc.W_dec.normal_(0, 0.1)
        if sc.W_skip is not None:
            sc.W_skip.normal_(0, 0.1)
    return sc


def _mask(n_dead, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=g)[:n_dead]] = True
    return mask


def _step(sc, x, y, mask):
    for p in sc.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    out = sc(x, y, dead_mask=mask)
    (out.fvu + 0.3 * out.auxk_loss + out.multi_topk_fvu / 8).backward()
    grads = {name: p.grad.clone() for name, p in sc.named_parameters()}
    grads["x"] = x.grad.clone()
    return out, grads


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _dense(acts, indices, d_sae=D_SAE):
    return torch.zeros(indices.shape[0], d_sae, dtype=acts.dtype).scatter(1, indices, acts.detach())


def _compare(got, want, what=""):
    (g_out, g_grads), (w_out, w_grads) = got, want
    for name in ("sae_out", "fvu", "auxk_loss", "multi_topk_fvu"):
        _close(getattr(g_out, name), getattr(w_out, name), f"{what}{name}")
    # sparsify selects with topk(sorted=False): compare the activations as dense rows
    _close(_dense(g_out.latent_acts, g_out.latent_indices), _dense(w_out.latent_acts, w_out.latent_indices),
           f"{what}latent_acts/latent_indices")
    assert g_out.latent_indices.shape == w_out.latent_indices.shape
    assert g_out.latent_indices.dtype == w_out.latent_indices.dtype == torch.int64
    assert set(g_grads) == set(w_grads)
    for name in w_grads:
        _close(g_grads[name], w_grads[name], f"{what}grad {name}")


CONFIGS = {
    "sae": {"k": 5},
    "k1": {"k": 1},
    "multi_topk": {"k": 4, "multi_topk": True},
    "transcode": {"k": 6, "transcode": True},
    "skip": {"k": 6, "skip_connection": True},
    "transcode+skip+multi": {"k": 3, "transcode": True, "skip_connection": True, "multi_topk": True},
    "no_normalize": {"k": 7, "normalize_decoder": False},
}


@pytest.mark.parametrize("n_dead", [0, 4, 60, D_SAE])  # none, fewer than k_aux = 18, more, all
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_and_gradients_match_sparsify(config, n_dead):
    cfg = CONFIGS[config]
    sc = _coder(seed=n_dead, **cfg)
    torch.manual_seed(100 + n_dead)
    x = torch.randn(N, D_IN) * 2 + 0.5
    y = torch.randn(N, D_IN) * 1.5 - 0.2 if cfg.get("transcode") else None
    mask = _mask(n_dead, seed=n_dead) if n_dead else None
    want = _step(sc, x, y, mask)
    assert apply_to_sparsify() == sparsify_accelerated_paths()
    calls = []
    original = integ._encode
    integ._encode = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        got = _step(sc, x, y, mask)
    finally:
        integ._encode = original
    assert calls == [1], "the fused path did not run"
    _compare(got, want)
    if n_dead:
        assert float(want[0].auxk_loss.detach()) > 0


def test_float64_and_an_all_false_mask():
    sc = _coder(dtype=torch.float64, k=5, multi_topk=True)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    for mask in (_mask(30), torch.zeros(D_SAE, dtype=torch.bool)):
        revert_sparsify()
        want = _step(sc, x, None, mask)
        apply_to_sparsify()
        got = _step(sc, x, None, mask)
        _compare(got, want, "float64: ")



@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_forward_without_autograd_matches(mode):
    sc = _coder(k=4, multi_topk=True)
    x = torch.randn(N, D_IN)
    with torch.no_grad():
        want = sc(x, dead_mask=_mask(20))
    apply_to_sparsify()
    with getattr(torch, mode)():
        got = sc(x, dead_mask=_mask(20))
    for name in ("sae_out", "fvu", "auxk_loss", "multi_topk_fvu"):
        _close(getattr(got, name), getattr(want, name), f"{mode} {name}")

def test_decode_matches_with_gradients():
    sc = _coder(k=5)
    torch.manual_seed(1)
    acts = torch.rand(N, 9, requires_grad=True)
    indices = torch.randint(0, D_SAE, (N, 9))

    def run():
        sc.zero_grad(set_to_none=True)
        acts.grad = None
        out = sc.decode(acts, indices)
        (out * torch.linspace(-1, 1, D_IN)).pow(2).sum().backward()
        return out, acts.grad.clone(), sc.W_dec.grad.clone(), sc.b_dec.grad.clone()

    want = run()
    apply_to_sparsify()
    got = run()
    for a, b, what in zip(got, want, ("out", "grad acts", "grad W_dec", "grad b_dec")):
        _close(a, b, what)
    with pytest.raises(ValueError, match="indices"):
        sc.decode(acts, torch.full((N, 9), D_SAE))


def test_encode_keeps_sparsify_by_default_and_runs_fused_without_dense_pre_acts():
    sc = _coder(k=5)
    x = torch.randn(N, D_IN)
    want = sc.encode(x)
    want_grads = torch.autograd.grad(want.top_acts.pow(2).sum(), list(sc.parameters()), allow_unused=True)
    apply_to_sparsify()
    assert sc.encode(x).pre_acts.shape == (N, D_SAE)  # default: sparsify's own encode
    _close(sc.encode(x).pre_acts, want.pre_acts, "pre_acts")
    apply_to_sparsify(dense_pre_acts=False)
    assert any("SparseCoder.encode" in p for p in sparsify_accelerated_paths())
    got = sc.encode(x)
    assert got.pre_acts.shape == (N, 0)
    _close(_dense(got.top_acts, got.top_indices), _dense(want.top_acts, want.top_indices), "top_acts")
    got_grads = torch.autograd.grad(got.top_acts.pow(2).sum(), list(sc.parameters()), allow_unused=True)
    for (name, _), g, w in zip(sc.named_parameters(), got_grads, want_grads):
        if w is None:
            assert g is None or not g.any(), name
        else:
            _close(g, w, f"encode grad {name}")


def test_unaccelerated_cases_take_sparsify_code():
    apply_to_sparsify()
    calls = []
    original = integ._encode
    integ._encode = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        # groupmax: sparsify's encoder (its decode, called from its forward, runs fused)
        sc = _coder(k=5, activation="groupmax")
        out = sc(torch.randn(N, D_IN))
        assert calls == [] and out.latent_indices.shape == (N, 5)
        # bfloat16
        _coder(k=5, dtype=torch.bfloat16)(torch.randn(N, D_IN, dtype=torch.bfloat16))
        # an input of another dtype than the coder: sparsify's own error
        with pytest.raises(RuntimeError, match="same dtype"):
            _coder(k=5)(torch.randn(N, D_IN, dtype=torch.float64))
        # a dead mask that is not bool: sparsify's own error
        with pytest.raises(RuntimeError):
            _coder(k=5)(torch.randn(N, D_IN), dead_mask=torch.ones(D_SAE))
        # a subclass
        sub = type("MyCoder", (SparseCoder,), {})(D_IN, SparseCoderConfig(num_latents=D_SAE, k=5))
        sub(torch.randn(N, D_IN))
        assert calls == []
        _coder(k=5)(torch.randn(N, D_IN))
        assert calls == [1]
    finally:
        integ._encode = original
    unaccelerated = sparsify_unaccelerated_paths()
    assert any("groupmax" in key for key in unaccelerated)


def test_revert_restores_the_originals():
    before = dict(vars(SparseCoder))
    apply_to_sparsify()
    apply_to_sparsify()  # idempotent
    for name in ("forward", "decode", "encode"):
        assert vars(SparseCoder)[name] is not before[name]
        assert vars(SparseCoder)[name].__fastsae_original__ is before[name]
    assert integ.is_patched()
    revert_sparsify()
    assert not integ.is_patched()
    assert set(vars(SparseCoder)) == set(before)
    for name in ("forward", "decode", "encode"):
        assert vars(SparseCoder)[name] is before[name]


def test_version_outside_range_is_refused(monkeypatch):
    monkeypatch.setattr(sparsify, "__version__", "1.4.0")
    with pytest.raises(RuntimeError, match=r"sparsify 1\.4\.0.*>=1\.3,<1\.4"):
        apply_to_sparsify()
    assert not integ.is_patched()


def test_bad_argument_and_top_level_names():
    with pytest.raises(ValueError, match="dense_pre_acts: expected a bool"):
        apply_to_sparsify(dense_pre_acts=1)
    assert fastsae.apply_to_sparsify is apply_to_sparsify and fastsae.revert_sparsify is revert_sparsify


def _tiny_trainer(tmp_path, transcode=False):
    from datasets import Dataset
    from sparsify import TrainConfig, Trainer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=D_IN - 1, n_head=3, vocab_size=64, n_positions=16))
    g = torch.Generator().manual_seed(1)
    dataset = Dataset.from_dict({"input_ids": torch.randint(0, 64, (24, 16), generator=g).tolist()})
    dataset = dataset.with_format("torch")
    cfg = TrainConfig(
        SparseCoderConfig(num_latents=512, k=4, multi_topk=True, transcode=transcode),
        batch_size=4, optimizer="adam", lr=1e-3, lr_warmup_steps=0, auxk_alpha=1 / 32, dead_feature_threshold=8,
        layers=[0, 1], log_to_wandb=False, save_every=10**6, save_dir=str(tmp_path), hookpoints=[],
    )
    if transcode:
        cfg.hookpoints = ["h.*.mlp"]
        cfg.layers = []
    return Trainer(cfg, dataset, model)


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_trainer_runs_patched_and_matches(tmp_path, transcode):
    forward_calls = []
    want = _tiny_trainer(tmp_path / "want", transcode)
    want.fit()
    apply_to_sparsify()
    original = integ._encode
    integ._encode = lambda *a, **k: forward_calls.append(len(a) > 3 and a[3] is not None) or original(*a, **k)
    try:
        got = _tiny_trainer(tmp_path / "got", transcode)
        got.fit()
    finally:
        integ._encode = original
    assert got.global_step == want.global_step == 6
    assert len(forward_calls) == 6 * 2  # every step, both hook points, fused
    assert any(forward_calls[2:]) and not any(forward_calls[:2])  # AuxK ran after the first step
    assert set(got.saes) == set(want.saes)
    for name, sc in want.saes.items():
        for pname, p in sc.named_parameters():
            _close(dict(got.saes[name].named_parameters())[pname], p, f"{name} {pname}", rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.num_tokens_since_fired[name], want.num_tokens_since_fired[name])


# ------------------------------------------------------------ SAE.from_sparsify / SAE.to_sparsify


@pytest.mark.parametrize("cfg", [{"k": 5}, {"expansion_factor": 4, "num_latents": 0, "k": 3, "multi_topk": True},
                                 {"k": 1, "normalize_decoder": False}])
def test_from_and_to_sparsify_round_trip_exactly(cfg):
    sc = _coder(**cfg)
    sae = fastsae.SAE.from_sparsify(sc)
    assert sae.architecture == "topk" and sae.cfg.k == cfg["k"] and sae.d_sae == sc.num_latents
    back = sae.to_sparsify()
    assert type(back) is SparseCoder and back.cfg == sc.cfg and back.d_in == sc.d_in
    assert set(back.state_dict()) == set(sc.state_dict())
    for name, t in sc.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    # the other way: fastsae -> sparsify -> fastsae
    again = fastsae.SAE.from_sparsify(back)
    for name, p in sae.named_parameters():
        assert torch.equal(dict(again.named_parameters())[name], p), name
    assert again.cfg == sae.cfg
    # and they compute what sparsify computes (its forward's sae_out is the 4k one with multi_topk)
    x = torch.randn(N, D_IN)
    with torch.no_grad():
        acts, indices, _ = sc.encode(x)
        want = sc.decode(acts, indices)
        _close(sae(x), want, "fastsae SAE forward")
        _close(back.decode(*back.encode(x)[:2]), want, "to_sparsify encode, decode")
        _close(back(x).sae_out, sc(x).sae_out, "to_sparsify forward")
        _close(sae.encode(x), _dense(acts, indices, sc.num_latents), "fastsae SAE encode")


def test_fastsae_sae_to_sparsify_computes_the_same():
    torch.manual_seed(0)
    sae = fastsae.SAE(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=6)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sc = sae.to_sparsify()
    assert sc.cfg.k == 6 and sc.num_latents == D_SAE
    x = torch.randn(N, D_IN)
    with torch.no_grad():
        _close(sc(x).sae_out, sae(x), "sae_out")
    back = fastsae.SAE.from_sparsify(sc)
    for name, p in sae.named_parameters():
        assert torch.equal(dict(back.named_parameters())[name], p), name
    sc64 = fastsae.SAE(d_in=D_IN, d_sae=D_SAE, k=3, dtype="float64").to_sparsify()
    assert sc64.dtype == torch.float64


def test_from_sparsify_refuses_what_fastsae_does_not_compute():
    for cfg, match in (({"k": 5, "activation": "groupmax"}, "groupmax"),):  # transcode, skip_connection: transcoders
        with pytest.raises(ValueError, match=match):
            fastsae.SAE.from_sparsify(_coder(**cfg))
    with pytest.raises(ValueError, match="decoder=False"):
        fastsae.SAE.from_sparsify(SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=4), decoder=False))
    with pytest.raises(ValueError, match="expected a sparsify SparseCoder"):
        fastsae.SAE.from_sparsify(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="sparsify stores TopK"):
        fastsae.SAE(d_in=8, d_sae=16, architecture="relu").to_sparsify()


# ------------------------------------------------------------ fastsae bench --peers


@pytest.mark.skipif(not __import__("fastsae.bench.peers", fromlist=["x"]).importable("saelens"), reason="sae_lens is not installed")
def test_bench_runs_both_libraries_with_and_without_fastsae():
    from fastsae.bench import peers, runner

    names = ["saelens", "saelens+fastsae", "sparsify", "sparsify+fastsae"]
    result = runner.run_bench(
        device="cpu", shapes=[runner.Shape(48, 16, 96, 3)], reps=2, log=lambda s: None, backends=["torch"],
        peers=names, ops=("encode", "train_step"), cases=(runner.StepCase("topk", 0.1), runner.StepCase("relu")),
    )
    rows = result["rows"]
    for name in names:
        assert {r["op"] for r in rows if r["backend"] == name} == {"encode", "train_step"}, name
        archs = {r["architecture"] for r in rows if r["backend"] == name and r["op"] == "train_step"}
        assert archs == ({"topk", "relu"} if name == "saelens" else {"topk"}), name
    assert not integ.is_patched()
    import fastsae.integrations.saelens as saelens_integ

    assert not saelens_integ.is_patched()
    # the patched sparsify peer is sparsify's own step on the fused path
    torch.manual_seed(0)
    sae = runner.bench_sae(runner.Shape(48, 16, 96, 3), runner.StepCase("topk", 0.1), torch.device("cpu"), torch.float32)
    peer = peers.make_peer("sparsify+fastsae", sae)
    x = torch.randn(48, 16)
    mask = runner.dead_mask_for(runner.StepCase("topk", 0.1), 96, torch.device("cpu"))
    want = peer.sc(x, dead_mask=mask)
    calls = []
    original = integ._encode
    integ._encode = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        got = peer.loss(x, mask)
    finally:
        integ._encode = original
    assert calls == [1]
    _close(got, want.fvu + want.auxk_loss / 32, "peer loss")
