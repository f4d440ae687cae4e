"""sparsify folders written by hand, against float64 references from sparsify's SparseCoder
(encode: top-k of relu((x - b_dec) @ encoder.weight.T + encoder.bias); decode: acts @ W_dec + b_dec)."""

import json

import pytest
import torch
from conftest import assert_rel_close
from helpers.format_refs import rand, topk_reference
from safetensors.torch import load_file, save_file

import fastsae
from fastsae import SAE
from fastsae.formats import sparsify

D_IN, D_SAE, K = 24, 90, 6


def sparsify_cfg(**overrides):
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    cfg.update(overrides)
    return cfg


def sparsify_tensors(bias_shift=0.0, dtype=torch.float32):
    return {"encoder.weight": rand(D_SAE, D_IN, scale=0.3, dtype=dtype),
            "encoder.bias": (rand(D_SAE, scale=0.1) + bias_shift).to(dtype),
            "W_dec": rand(D_SAE, D_IN, scale=0.3, dtype=dtype), "b_dec": rand(D_IN, scale=0.1, dtype=dtype)}


def write_folder(folder, cfg=None, tensors=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(sparsify_cfg() if cfg is None else cfg))
    save_file(sparsify_tensors() if tensors is None else tensors, folder / "sae.safetensors")
    return folder


def sparsify_reference(t, x, module_acts):
    """sparsify's encode (ReLU, then top-k) and decode in float64, on the module's support."""
    p = {n: v.double() for n, v in t.items()}
    x = x.double().reshape(-1, D_IN)
    pre = (x - p["b_dec"]) @ p["encoder.weight"].T + p["encoder.bias"]
    acts = topk_reference(module_acts.reshape(-1, D_SAE), pre, K, relu_first=True)
    return acts, acts @ p["W_dec"] + p["b_dec"]


@pytest.mark.parametrize("bias_shift", [0.0, -3.5])
def test_folder_computes_what_sparsify_computes(tmp_path, bias_shift):
    """bias_shift=-3.5 leaves most rows with fewer than k positive pre-activations, where sparsify's
    ReLU-before-top-k picks zeros: the activations and reconstruction still agree."""
    t = sparsify_tensors(bias_shift)
    sae = fastsae.load(write_folder(tmp_path / "layers.3", tensors=t))
    assert sae.architecture == "topk" and sae.cfg.k == K and sae.cfg.apply_b_dec_to_input
    assert sae.cfg.metadata["hook_name"] == "layers.3" and sae.cfg.decoder_norm == "unit_norm"
    x = torch.randn(4, 5, D_IN)
    acts = sae.encode(x)
    ref_acts, ref_out = sparsify_reference(t, x, acts)
    if bias_shift:
        assert ((ref_acts > 0).sum(-1) < K).float().mean() > 0.5, "rows with fewer than k positives are the point"
    assert_rel_close(acts.reshape(-1, D_SAE), ref_acts, 1e-5, "encode")
    assert_rel_close(sae(x).reshape(-1, D_IN), ref_out, 1e-5, "forward")
    sparse = sae.encode_sparse(x)
    assert_rel_close(sae.decode(sparse).reshape(-1, D_IN), ref_out, 1e-5, "decode(sparse)")


def test_num_latents_zero_uses_expansion_factor_and_dtype_follows_file(tmp_path):
    t = sparsify_tensors(dtype=torch.bfloat16)
    cfg = sparsify_cfg(num_latents=0, expansion_factor=D_SAE // D_IN)  # 3 * 24 = 72 latents
    t = {n: (v[:72] if v.shape[0] == D_SAE else v) for n, v in t.items()}
    sae = fastsae.load(write_folder(tmp_path / "f", cfg, t))
    assert sae.d_sae == 72 and sae.dtype == torch.bfloat16
    assert torch.equal(sae.W_dec, t["W_dec"]) and torch.equal(sae.W_enc, t["encoder.weight"].T)


def test_multi_topk_is_a_training_loss(tmp_path):
    sae = fastsae.load(write_folder(tmp_path / "m", sparsify_cfg(multi_topk=True)))
    assert sae.cfg.k == K and sae.cfg.metadata["sparsify_cfg"]["multi_topk"] is True


def test_run_folder_loads_as_dict_in_natural_order(tmp_path):
    run = tmp_path / "run"
    tensors = {name: sparsify_tensors() for name in ("layers.10", "layers.2", "embed_tokens")}
    for name, t in tensors.items():
        write_folder(run / name, tensors=t)
    (run / "best" / "layers.2").mkdir(parents=True)  # sparsify's save_best folder: not a hook point
    (run / "config.json").write_text("{}")
    saes = fastsae.load(run)
    assert list(saes) == ["embed_tokens", "layers.2", "layers.10"]
    for name, sae in saes.items():
        assert torch.equal(sae.W_dec, tensors[name]["W_dec"]), name
    # one bad hook point: nothing is returned
    (run / "layers.2" / "sae.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"layers.2/sae.safetensors: cannot read it as safetensors"):
        fastsae.load(run)


@pytest.mark.parametrize("overrides,message", [
    (dict(signed=True), "signed=true"),
    (dict(activation="groupmax"), "activation 'groupmax'"),
    (dict(k=0), "k: expected an integer with 1 <= k"),
])
def test_refuses_what_fastsae_does_not_compute(tmp_path, overrides, message):
    folder = write_folder(tmp_path / "r", sparsify_cfg(**overrides))
    with pytest.raises(ValueError, match=message) as err:
        fastsae.load(folder)
    assert "cfg.json" in str(err.value)


def test_bad_files(tmp_path):
    t = sparsify_tensors()
    folder = write_folder(tmp_path / "skip", tensors=dict(t, W_skip=rand(D_IN, D_IN)))
    with pytest.raises(ValueError, match="sae.safetensors: holds W_skip"):
        fastsae.load(folder)
    folder = write_folder(tmp_path / "enc", tensors={n: v for n, v in t.items() if n != "W_dec"})
    with pytest.raises(ValueError, match="sae.safetensors: missing tensor 'W_dec' .*encoder-only"):
        fastsae.load(folder)
    folder = write_folder(tmp_path / "shape", tensors=dict(t, **{"encoder.weight": rand(D_SAE, D_IN + 2)}))
    with pytest.raises(ValueError, match=r"tensor 'encoder.weight' has shape \(90, 26\), expected \(90, 24\)"):
        fastsae.load(folder)
    folder = write_folder(tmp_path / "trunc", tensors=t)
    data = (folder / "sae.safetensors").read_bytes()
    (folder / "sae.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="sae.safetensors: cannot read it as safetensors"):
        fastsae.load(folder)
    folder = write_folder(tmp_path / "nodin", cfg={k: v for k, v in sparsify_cfg().items() if k != "d_in"})
    with pytest.raises(ValueError, match="cfg.json: missing 'd_in'"):
        fastsae.load(folder)
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "cfg.json").write_text(json.dumps(sparsify_cfg()))
    with pytest.raises(FileNotFoundError, match="cfgonly/sae.safetensors: missing"):
        fastsae.load(tmp_path / "cfgonly")


def test_save_as_sparsify_round_trips_and_folds_decoder_norm(tmp_path):
    sae = SAE(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=K, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.2)
    folder = fastsae.formats.save(sae, tmp_path / "s", to="sparsify")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_in"] == D_IN and cfg["num_latents"] == D_SAE and cfg["k"] == K and cfg["activation"] == "topk"
    tensors = load_file(folder / "sae.safetensors")
    assert set(tensors) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert_rel_close(tensors["W_dec"].norm(dim=1), torch.ones(D_SAE), 1e-5, "unit decoder rows")
    loaded = fastsae.load(folder)
    x = torch.randn(11, D_IN)
    assert_rel_close(loaded(x), sae(x).detach(), 1e-5, "forward after sparsify round trip")
    # sparsify's own computation on the written file gives the same reconstruction
    acts = loaded.encode(x)
    _, ref_out = sparsify_reference(tensors, x, acts)
    assert_rel_close(loaded(x), ref_out, 1e-5, "sparsify formula on the saved file")


def test_save_as_sparsify_refuses_other_architectures(tmp_path):
    for sae in (SAE(d_in=8, d_sae=20, architecture="relu"), SAE(d_in=8, d_sae=20, architecture="gated")):
        with pytest.raises(ValueError, match="sparsify stores TopK SAEs"):
            sparsify.save(sae, tmp_path / sae.architecture)
    with pytest.raises(ValueError, match="apply_b_dec_to_input=False"):
        sparsify.save(SAE(d_in=8, d_sae=20, architecture="topk", k=2, apply_b_dec_to_input=False), tmp_path / "x")
    assert not (tmp_path / "relu").exists()
