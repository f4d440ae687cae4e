"""SAELens folders written by hand (v6 and the pre-6.0 flat cfg.json), loaded by fastsae, against
float64 references written from SAELens' formulas (saes/*.py, and sae.py of SAELens 5.x)."""

import json

import pytest
import torch
from conftest import assert_rel_close
from helpers.format_refs import rand, topk_reference
from safetensors.torch import load_file, save_file

import fastsae

D_IN, D_SAE, K = 24, 90, 5


def write_folder(folder, cfg, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({n: t.contiguous() for n, t in tensors.items()}, folder / "sae_weights.safetensors")
    return folder


def random_tensors(arch, d_in=D_IN, d_sae=D_SAE):
    t = {"W_enc": rand(d_in, d_sae, scale=0.3), "W_dec": rand(d_sae, d_in, scale=0.3), "b_dec": rand(d_in, scale=0.1)}
    if arch == "gated":
        t.update(b_gate=rand(d_sae, scale=0.1), r_mag=rand(d_sae, scale=0.3), b_mag=rand(d_sae, scale=0.1))
    else:
        t["b_enc"] = rand(d_sae, scale=0.1)
    if arch == "jumprelu":
        t["threshold"] = rand(d_sae, scale=0.2).abs()
    return t


def v6_cfg(arch, **extra):
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.3.hook_resid_post", "model_name": "gpt2"}}
    cfg.update(extra)
    return cfg


def saelens_reference(arch, t, x, apply_b_dec_to_input=True, k=None, rescale=False, module_acts=None, scale=None):
    """SAELens' encode and decode in float64. TopK uses the module's support (checked to be a top-k)."""
    p = {n: v.double() for n, v in t.items()}
    x = x.double().reshape(-1, p["W_enc"].shape[0])
    sae_in = x - p["b_dec"] * apply_b_dec_to_input
    if arch == "gated":
        active = (sae_in @ p["W_enc"] + p["b_gate"] > 0).double()
        acts = active * (sae_in @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]).relu()
    else:
        pre = sae_in @ p["W_enc"] + p["b_enc"]
        norm = p["W_dec"].norm(dim=-1)
        if arch == "topk":
            if rescale:
                pre = pre * norm
            acts = topk_reference(module_acts, pre, k)
        elif arch == "jumprelu":
            acts = pre.relu() * (pre > p["threshold"])
        else:
            acts = pre.relu()
    feats = acts / p["W_dec"].norm(dim=-1) if rescale else acts
    if scale is not None:  # pre-6.0 finetuning_scaling_factor
        feats = feats * scale.double()
    return acts, feats @ p["W_dec"] + p["b_dec"]


def check_against_reference(sae, arch, t, **kw):
    x = torch.randn(3, 7, D_IN)
    acts = sae.encode(x)
    ref_acts, ref_out = saelens_reference(arch, t, x, module_acts=acts.reshape(-1, D_SAE), **kw)
    assert (ref_acts != 0).any() and (ref_acts == 0).any(), "vacuous: all latents on or all off"
    assert_rel_close(acts, ref_acts.reshape(acts.shape), 1e-5, "encode")
    assert_rel_close(sae.decode(acts), ref_out.reshape(x.shape), 1e-5, "decode")
    assert_rel_close(sae(x), ref_out.reshape(x.shape), 1e-5, "forward")


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_v6_folders_compute_what_saelens_computes(tmp_path, arch, apply_b_dec_to_input):
    t = random_tensors(arch)
    folder = write_folder(tmp_path / arch, v6_cfg(arch, apply_b_dec_to_input=apply_b_dec_to_input), t)
    sae = fastsae.load(folder)
    assert sae.architecture == ("relu" if arch == "standard" else arch) and not sae.training
    assert sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"
    check_against_reference(sae, arch, t, apply_b_dec_to_input=apply_b_dec_to_input)


@pytest.mark.parametrize("rescale", [False, True])
def test_v6_topk(tmp_path, rescale):
    t = random_tensors("topk")
    t["W_dec"] = t["W_dec"] * (torch.rand(D_SAE, 1) * 3 + 0.2)  # decoder norms far from one
    folder = write_folder(tmp_path / "topk", v6_cfg("topk", k=K, rescale_acts_by_decoder_norm=rescale), t)
    sae = fastsae.load(folder)
    assert sae.cfg.k == K and sae.cfg.rescale_acts_by_decoder_norm == rescale
    check_against_reference(sae, "topk", t, k=K, rescale=rescale)


def test_v6_batchtopk_saved_as_jumprelu(tmp_path):
    """SAELens saves a BatchTopK SAE for inference as JumpReLU with its threshold in every slot."""
    t = random_tensors("standard")
    t["threshold"] = torch.full((D_SAE,), 0.07)
    sae = fastsae.load(write_folder(tmp_path / "b", v6_cfg("jumprelu"), t))
    assert sae.architecture == "jumprelu"
    check_against_reference(sae, "jumprelu", t)


def test_saelens_training_checkpoints(tmp_path):
    """SAELens' TrainingSAE.save_model: BatchTopK keeps its scalar topk_threshold buffer, and older
    JumpReLU training checkpoints store log_threshold."""
    t = random_tensors("standard")
    t["topk_threshold"] = torch.tensor(0.05)
    sae = fastsae.load(write_folder(tmp_path / "b", v6_cfg("batchtopk", k=K), t))
    assert sae.architecture == "batchtopk" and sae.topk_threshold.item() == pytest.approx(0.05)
    x = torch.randn(9, D_IN)
    t2 = dict(t, threshold=torch.full((D_SAE,), 0.05))
    _, ref_out = saelens_reference("jumprelu", {n: v for n, v in t2.items() if n != "topk_threshold"}, x)
    assert_rel_close(sae(x), ref_out, 1e-5, "batchtopk inference")
    t = random_tensors("jumprelu")
    log_t = dict(t, log_threshold=t.pop("threshold").log())
    sae = fastsae.load(write_folder(tmp_path / "j", v6_cfg("jumprelu"), log_t))
    check_against_reference(sae, "jumprelu", dict(t, threshold=log_t["log_threshold"].exp()))


# ------------------------------------------------------------ pre-6.0 flat cfg.json


def old_cfg(**overrides):
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cuda",
           "model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
           "hook_point_head_index": None, "activation_fn_str": "relu", "activation_fn_kwargs": {},
           "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "sae_lens_training_version": "3.13.0",
           "prepend_bos": True, "dataset_path": "Skylion007/openwebtext", "context_size": 128,
           "normalize_activations": False}
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("arch,activation", [("standard", "relu"), ("standard", "topk"), ("topk", "topk"),
                                             ("jumprelu", "relu"), ("gated", "relu")])
def test_pre_6_0_cfg(tmp_path, arch, activation):
    t = random_tensors("gated" if arch == "gated" else "jumprelu" if arch == "jumprelu" else "standard")
    kwargs = {"k": K} if activation == "topk" else {}
    cfg = old_cfg(architecture=arch, activation_fn_str=activation, activation_fn_kwargs=kwargs)
    sae = fastsae.load(write_folder(tmp_path / "old", cfg, t))
    expect = "topk" if activation == "topk" else {"standard": "relu"}.get(arch, arch)
    assert sae.architecture == expect and sae.device == torch.device("cpu")  # the file said cuda
    assert sae.cfg.metadata["hook_name"] == "blocks.8.hook_resid_pre"  # renamed from hook_point
    assert sae.cfg.metadata["source_format"] == "saelens<6"
    check_against_reference(sae, "topk" if activation == "topk" else arch, t, k=K)


def test_pre_6_0_normalize_activations_bool(tmp_path):
    t = random_tensors("standard")
    sae = fastsae.load(write_folder(tmp_path / "n", old_cfg(normalize_activations=True), t))
    assert sae.cfg.normalize_activations == "expected_average_only_in"  # computed outside the SAE


def test_pre_6_0_finetuning_scaling_factor_folds_into_decoder(tmp_path):
    t = random_tensors("standard")
    scale = rand(D_SAE).abs() + 0.5
    sae = fastsae.load(write_folder(tmp_path / "s", old_cfg(finetuning_scaling_factor=True),
                                    dict(t, finetuning_scaling_factor=scale)))
    check_against_reference(sae, "standard", t, scale=scale)
    # an all-ones scaling_factor (older files carried one) is dropped
    sae = fastsae.load(write_folder(tmp_path / "ones", old_cfg(), dict(t, scaling_factor=torch.ones(D_SAE))))
    check_against_reference(sae, "standard", t)
    with pytest.raises(ValueError, match="holds 'scaling_factor' but .*cfg.json says finetuning_scaling_factor is false"):
        fastsae.load(write_folder(tmp_path / "bad", old_cfg(), dict(t, scaling_factor=scale)))


@pytest.mark.parametrize("overrides,message", [
    (dict(hook_point="blocks.2.attn.hook_z"), "hook_z"),
    (dict(activation_fn_str="tanh-relu"), "activation_fn: fastsae computes 'relu' and 'topk', got 'tanh-relu'"),
    (dict(normalize_activations="layer_norm"), "normalize_activations: fastsae supports"),
    (dict(normalize_activations="constant_norm_rescale"), "normalize_activations: fastsae supports"),
    (dict(activation_fn_str="topk"), r"needs activation_fn_kwargs \{'k': ...\}"),
])
def test_pre_6_0_refuses_what_fastsae_does_not_compute(tmp_path, overrides, message):
    folder = write_folder(tmp_path / "r", old_cfg(**overrides), random_tensors("standard"))
    with pytest.raises(ValueError, match=message) as err:
        fastsae.load(folder)
    assert "cfg.json" in str(err.value)


# ------------------------------------------------------------ saving and bad files


def test_saved_cfg_is_read_by_saelens_as_v6(tmp_path):
    sae = fastsae.load(write_folder(tmp_path / "old", old_cfg(), random_tensors("standard")))
    cfg = json.loads((sae.save(tmp_path / "new") / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0"  # SAELens would re-convert anything below 6
    assert cfg["metadata"]["hook_name"] == "blocks.8.hook_resid_pre" and cfg["architecture"] == "standard"
    again = fastsae.load(tmp_path / "new")
    x = torch.randn(4, D_IN)
    assert torch.equal(again(x), sae(x))


def test_gated_saves_saelens_tensors(tmp_path):
    t = random_tensors("gated")
    sae = fastsae.load(write_folder(tmp_path / "g", v6_cfg("gated"), t))
    saved = load_file(sae.save(tmp_path / "out") / "sae_weights.safetensors")
    assert set(saved) == set(t)
    for name in t:
        assert torch.equal(saved[name], t[name]), name


def test_bad_folders_name_the_file_and_the_problem(tmp_path):
    t = random_tensors("standard")
    folder = write_folder(tmp_path / "extra", v6_cfg("standard"), dict(t, threshold=torch.ones(D_SAE)))
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: unexpected tensors \['threshold'\]"):
        fastsae.load(folder)  # a standard cfg over JumpReLU weights would silently drop the threshold
    folder = write_folder(tmp_path / "gated", v6_cfg("gated"), t)
    with pytest.raises(ValueError, match="sae_weights.safetensors: missing tensor 'b_gate'"):
        fastsae.load(folder)
    folder = write_folder(tmp_path / "shape", v6_cfg("standard"), dict(t, b_dec=rand(D_IN + 1)))
    with pytest.raises(ValueError, match=r"tensor 'b_dec' has shape \(25,\), expected \(24,\)"):
        fastsae.load(folder)
    folder = write_folder(tmp_path / "int", v6_cfg("standard"), dict(t, b_dec=torch.arange(D_IN)))
    with pytest.raises(ValueError, match="tensor 'b_dec' has dtype torch.int64"):
        fastsae.load(folder)
    # (an architecture SAELens has and fastsae does not: matching pursuit)
    folder = write_folder(tmp_path / "arch", v6_cfg("matching_pursuit"), t)
    with pytest.raises(ValueError, match=r"cfg.json: architecture: expected one of .* got 'matching_pursuit'"):
        fastsae.load(folder)
