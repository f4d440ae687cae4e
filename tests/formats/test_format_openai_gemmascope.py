"""OpenAI sparse_autoencoder .pt state dicts and Gemma Scope params.npz built by hand, against
float64 references written from openai/sparse_autoencoder model.py and Gemma Scope's JumpReLU."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from helpers.format_refs import rand, topk_reference

import fastsae
from fastsae.formats import convert, gemmascope, openai

D_IN, D_SAE, K = 24, 90, 5


def openai_state(activation="ReLU", tied=False, k=K):
    state = {"pre_bias": rand(D_IN, scale=0.1), "encoder.weight": rand(D_SAE, D_IN, scale=0.3),
             "latent_bias": rand(D_SAE, scale=0.1),
             "stats_last_nonzero": torch.randint(0, 100, (D_SAE,)),
             "latents_activation_frequency": torch.rand(D_SAE), "latents_mean_square": torch.rand(D_SAE),
             "activation": activation}
    if tied:
        state["decoder.linear.weight"] = state["encoder.weight"]
    else:
        state["decoder.weight"] = rand(D_IN, D_SAE, scale=0.3)
    if activation == "TopK":
        state["activation_state_dict"] = {"k": k, "postact_fn": "ReLU"}
    return state


def openai_reference(state, x, module_acts=None):
    """Autoencoder.forward in float64: (latents, recons), with its layer norm for TopK."""
    s = {n: v.double() for n, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    x = x.double()
    normalize = state["activation"] == "TopK"
    if normalize:
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = (x - s["pre_bias"]) @ s["encoder.weight"].T + s["latent_bias"]
    latents = topk_reference(module_acts, pre, K) if normalize else pre.relu()
    W_dec_t = s["decoder.linear.weight"] if "decoder.linear.weight" in s else s["decoder.weight"].T
    recons = latents @ W_dec_t + s["pre_bias"]
    if normalize:
        recons = recons * std + mu
    return latents, recons


@pytest.mark.parametrize("tied", [False, True])
def test_openai_relu_computes_what_openai_computes(tmp_path, tied):
    state = openai_state(tied=tied)
    torch.save(state, tmp_path / "v4_layer5.pt")
    sae = fastsae.load(tmp_path / "v4_layer5.pt")
    assert sae.architecture == "relu" and sae.cfg.apply_b_dec_to_input
    x = torch.randn(17, D_IN)
    latents, recons = openai_reference(state, x)
    assert_rel_close(sae.encode(x), latents, 1e-5, "encode")
    assert_rel_close(sae(x), recons, 1e-5, "forward")
    assert_rel_close(sae.decode(sae.encode(x)), recons, 1e-5, "decode")


def test_openai_activation_defaults_to_relu(tmp_path):
    state = openai_state()
    del state["activation"]
    torch.save(state, tmp_path / "old.pt")
    assert fastsae.load(tmp_path / "old.pt").architecture == "relu"


def test_openai_topk_needs_external_layer_norm(tmp_path):
    state = openai_state("TopK")
    torch.save(state, tmp_path / "v5_32k_layer_8.pt")
    with pytest.raises(ValueError, match="v5_32k_layer_8.pt: OpenAI's TopK autoencoders layer-normalise their input"):
        fastsae.load(tmp_path / "v5_32k_layer_8.pt")
    sae = openai.load(tmp_path / "v5_32k_layer_8.pt", external_layer_norm=True)
    assert sae.architecture == "topk" and sae.cfg.k == K
    with pytest.raises(ValueError, match="layer-normalised outside it, which a sparsify cfg cannot say"):
        fastsae.formats.save(sae, tmp_path / "sp", to="sparsify")
    x = torch.randn(17, D_IN) * 3 + 1
    x_ln, mu, std = openai.layer_norm(x)
    acts = sae.encode(x_ln)
    latents, recons = openai_reference(state, x, acts)
    assert_rel_close(acts, latents, 1e-5, "encode of layer-normed input")
    assert_rel_close(openai.undo_layer_norm(sae(x_ln), mu, std), recons, 1e-5, "forward with OpenAI's layer norm")
    # converting to SAELens says normalize_activations "layer_norm": the same normalisation, inside SAELens
    convert(tmp_path / "v5_32k_layer_8.pt", tmp_path / "saelens")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "layer_norm" and cfg["architecture"] == "topk" and cfg["k"] == K
    with pytest.raises(ValueError, match="cfg.json: normalize_activations: fastsae supports"):
        fastsae.load(tmp_path / "saelens")
    with pytest.raises(ValueError, match="OpenAI.s TopK autoencoders layer-normalise their input"):
        convert(tmp_path / "v5_32k_layer_8.pt", tmp_path / "sparsify", to="sparsify")


def test_openai_bad_files(tmp_path):
    for activation, message in (("Identity", "activation 'Identity'"), ("GELU", "activation 'GELU'")):
        torch.save(openai_state(activation), tmp_path / "a.pt")
        with pytest.raises(ValueError, match=f"a.pt: {message}"):
            fastsae.load(tmp_path / "a.pt")
    state = openai_state("TopK")
    state["activation_state_dict"]["postact_fn"] = "Identity"
    torch.save(state, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="p.pt: TopK postact_fn 'Identity'"):
        openai.load(tmp_path / "p.pt", external_layer_norm=True)
    state = openai_state()
    state["latent_bias"] = rand(D_SAE + 1)
    torch.save(state, tmp_path / "s.pt")
    with pytest.raises(ValueError, match=r"s.pt: tensor 'latent_bias' has shape \(91,\), expected \(90,\)"):
        fastsae.load(tmp_path / "s.pt")
    state = openai_state()
    del state["decoder.weight"]
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="m.pt: missing tensor 'decoder.weight'"):
        fastsae.load(tmp_path / "m.pt")
    torch.save(openai_state(), tmp_path / "t.pt")
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[:-200])
    with pytest.raises(ValueError, match=r"t.pt: cannot read it with torch.load\(weights_only=True\)"):
        fastsae.load(tmp_path / "t.pt")
    torch.save({"weights": rand(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: neither an OpenAI sparse_autoencoder nor a dictionary_learning"):
        fastsae.load(tmp_path / "other.pt")


# ------------------------------------------------------------ Gemma Scope


def gemma_arrays():
    return {"W_enc": rand(D_IN, D_SAE, scale=0.3).numpy(), "b_enc": rand(D_SAE, scale=0.1).numpy(),
            "W_dec": rand(D_SAE, D_IN, scale=0.3).numpy(), "b_dec": rand(D_IN, scale=0.1).numpy(),
            "threshold": rand(D_SAE, scale=0.2).abs().numpy()}


def gemma_reference(a, x):
    """Gemma Scope's JumpReLU SAE in float64 (no b_dec subtracted from the input)."""
    p = {n: torch.from_numpy(v).double() for n, v in a.items()}
    pre = x.double() @ p["W_enc"] + p["b_enc"]
    acts = (pre > p["threshold"]) * pre.relu()
    return acts, acts @ p["W_dec"] + p["b_dec"]


@pytest.mark.parametrize("lower_case", [False, True])
def test_gemma_scope_computes_what_gemma_scope_computes(tmp_path, lower_case):
    arrays = gemma_arrays()
    folder = tmp_path / "layer_12" / "width_16k" / "average_l0_41"
    folder.mkdir(parents=True)
    saved = {("w_" + n[2:] if lower_case and n.startswith("W_") else n): a for n, a in arrays.items()}
    np.savez(folder / "params.npz", **saved)
    sae = fastsae.load(folder)
    assert sae.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    x = torch.randn(3, 7, D_IN)
    acts, out = gemma_reference(arrays, x)
    assert (acts != 0).any() and (acts == 0).any()
    assert_rel_close(sae.encode(x), acts, 1e-5, "encode")
    assert_rel_close(sae(x), out, 1e-5, "forward")
    assert_rel_close(fastsae.load(folder / "params.npz")(x), out, 1e-5, "loading the file itself")
    sae64 = fastsae.load(folder, dtype=torch.float64)
    assert sae64.dtype == torch.float64 and sae64.cfg.dtype == "float64"
    assert_rel_close(sae64(x.double()), out, 1e-12, "float64 override")


def test_gemma_scope_bad_files(tmp_path):
    arrays = gemma_arrays()
    np.savez(tmp_path / "missing.npz", **{n: a for n, a in arrays.items() if n != "threshold"})
    with pytest.raises(ValueError, match="missing.npz: missing array 'threshold'"):
        fastsae.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "extra.npz", **arrays, log_sparsity=np.zeros(D_SAE, dtype=np.float32))
    with pytest.raises(ValueError, match=r"extra.npz: unexpected arrays \['log_sparsity'\]"):
        fastsae.load(tmp_path / "extra.npz")
    np.savez(tmp_path / "shape.npz", **dict(arrays, b_dec=np.ones(D_IN + 1, dtype=np.float32)))
    with pytest.raises(ValueError, match=r"shape.npz: tensor 'b_dec' has shape \(25,\), expected \(24,\)"):
        fastsae.load(tmp_path / "shape.npz")
    np.savez(tmp_path / "full.npz", **arrays)
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.npz: cannot read it as a .npz archive"):
        gemmascope.load(tmp_path / "trunc.npz")
    np.savez(tmp_path / "obj.npz", **dict(arrays, W_enc=np.array([object()], dtype=object)))
    with pytest.raises(ValueError, match="obj.npz: cannot read it as a .npz archive"):
        fastsae.load(tmp_path / "obj.npz")  # object arrays would need pickle: refused
