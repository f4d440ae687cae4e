"""Against SAELens itself (optional: skipped, with the reason shown, where sae-lens is not installed):
folders fastsae writes load in SAELens and compute the same, and folders SAELens writes load in
fastsae and compute the same: encode, decode and forward, to fp32 rounding."""

import json

import pytest
import torch
from conftest import assert_rel_close
from helpers.format_refs import rand

sae_lens = pytest.importorskip(
    "sae_lens", reason="sae-lens is an optional test dependency (pip install sae-lens) for the SAELens interop tests"
)

import fastsae  # noqa: E402
from fastsae import SAE  # noqa: E402
from fastsae.formats import convert  # noqa: E402

D_IN, D_SAE, K = 24, 90, 5


def randomise(module):
    """Random values in every parameter (never the zeros a fresh SAE has), positive thresholds."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(rand(*p.shape, scale=0.3 if p.ndim == 2 else 0.1))
            if name == "threshold":
                p.abs_()
    return module


def compare(ours, theirs, x):
    theirs.eval()
    with torch.no_grad():
        acts_theirs = theirs.encode(x)
        out_theirs = theirs(x)
        dec_theirs = theirs.decode(acts_theirs)
    acts = ours.encode(x)
    assert (acts_theirs != 0).any() and (acts_theirs == 0).any(), "vacuous: all latents on or all off"
    assert_rel_close(acts, acts_theirs, 1e-5, "encode")
    assert_rel_close(ours.decode(acts), dec_theirs, 1e-5, "decode")
    assert_rel_close(ours(x), out_theirs, 1e-5, "forward")


@pytest.mark.parametrize("arch,kw", [
    ("relu", {}), ("relu", {"apply_b_dec_to_input": False}), ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}), ("jumprelu", {}), ("gated", {}),
    ("batchtopk", {"k": K}),
])
def test_fastsae_folders_load_in_saelens(tmp_path, arch, kw):
    sae = randomise(SAE(d_in=D_IN, d_sae=D_SAE, architecture=arch, metadata={"hook_name": "blocks.1.hook_resid_post"}, **kw))
    if arch == "batchtopk":
        sae.topk_threshold.fill_(0.2)
    sae.eval()
    folder = sae.save(tmp_path / arch)
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"  # read as a 6.x cfg, metadata kept
    compare(sae, theirs, torch.randn(3, 7, D_IN))


def saelens_modules():
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    yield "standard", sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    yield "topk", sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    yield "topk_rescaled", sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True))
    yield "jumprelu", sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    yield "gated", sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    yield "batchtopk", BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))


@pytest.mark.parametrize("name", ["standard", "topk", "topk_rescaled", "jumprelu", "gated", "batchtopk"])
def test_saelens_folders_load_in_fastsae(tmp_path, name):
    theirs = randomise(dict(saelens_modules())[name])
    if name == "batchtopk":
        theirs.topk_threshold.fill_(0.2)
        theirs.save_inference_model(str(tmp_path / name))  # as JumpReLU, decoder norms folded
        inference = sae_lens.SAE.load_from_disk(str(tmp_path / name))
        compare(fastsae.load(tmp_path / name), inference, torch.randn(3, 7, D_IN))
        theirs.save_model(str(tmp_path / "training"))  # the training layout keeps topk_threshold
        ours = fastsae.load(tmp_path / "training")
        assert ours.architecture == "batchtopk"
        compare(ours, inference, torch.randn(11, D_IN))
        return
    theirs.save_model(str(tmp_path / name))
    compare(fastsae.load(tmp_path / name), theirs, torch.randn(3, 7, D_IN))


def test_openai_topk_converts_to_saelens_layer_norm(tmp_path):
    """OpenAI's TopK autoencoders layer-normalise their inputs; converted, SAELens computes the same."""
    state = {"pre_bias": rand(D_IN, scale=0.1), "encoder.weight": rand(D_SAE, D_IN, scale=0.3),
             "latent_bias": rand(D_SAE, scale=0.1), "decoder.weight": rand(D_IN, D_SAE, scale=0.3),
             "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long), "activation": "TopK",
             "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}
    torch.save(state, tmp_path / "v5.pt")
    convert(tmp_path / "v5.pt", tmp_path / "saelens")
    assert json.loads((tmp_path / "saelens" / "cfg.json").read_text())["normalize_activations"] == "layer_norm"
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"))
    x = torch.randn(13, D_IN) * 2 + 0.5
    mu = x.double().mean(-1, keepdim=True)
    std = (x.double() - mu).std(-1, keepdim=True)
    x_ln = (x.double() - mu) / (std + 1e-5)
    pre = (x_ln - state["pre_bias"].double()) @ state["encoder.weight"].double().T + state["latent_bias"].double()
    top = pre.topk(K, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    recons = (latents @ state["decoder.weight"].double().T + state["pre_bias"].double()) * std + mu
    with torch.no_grad():
        assert_rel_close(theirs(x), recons, 1e-5, "SAELens forward of the converted OpenAI SAE")
