"""Bad input gets a ValueError naming what was expected and what came; bad files name the file."""

import json

import pytest
import torch

import fastsae
from fastsae import SAE, SAEConfig, SparseActivations


@pytest.fixture
def sae():
    return SAE(d_in=48, d_sae=333, architecture="topk", k=7)


def test_wrong_width(sae):
    with pytest.raises(ValueError, match=r"expected shape \[\.\.\., 48\] \(d_in=48\), got \(4, 47\)"):
        sae(torch.randn(4, 47))
    with pytest.raises(ValueError, match="d_in=48"):
        sae.encode(torch.randn(47))
    with pytest.raises(ValueError, match=r"d_sae=333\), got \(4, 332\)"):
        sae.decode(torch.randn(4, 332))


def test_wrong_dtype_is_not_silently_cast(sae):
    with pytest.raises(ValueError, match="expected dtype torch.float32 \\(the SAE's\\), got torch.float64"):
        sae(torch.randn(4, 48, dtype=torch.float64))
    with pytest.raises(ValueError, match="got torch.bfloat16"):
        sae.encode_sparse(torch.randn(4, 48, dtype=torch.bfloat16))


def test_wrong_device(sae):
    with pytest.raises(ValueError, match="expected device cpu \\(the SAE's\\), got meta"):
        sae(torch.empty(4, 48, device="meta"))


def test_not_a_tensor(sae):
    with pytest.raises(ValueError, match="expected a torch.Tensor, got list"):
        sae([[0.0] * 48])


def test_bad_sparse_activations(sae):
    with pytest.raises(ValueError, match="expected d_sae=333, got SparseActivations with d_sae=334"):
        sae.decode(SparseActivations(torch.randn(4, 7), torch.zeros(4, 7, dtype=torch.int64), 334))
    with pytest.raises(ValueError, match="int64"):
        SparseActivations(torch.randn(4, 7), torch.zeros(4, 7, dtype=torch.int32), 333)
    with pytest.raises(ValueError, match="one shape"):
        SparseActivations(torch.randn(4, 7), torch.zeros(4, 6, dtype=torch.int64), 333)


@pytest.mark.parametrize("k", [0, -1, 334])
def test_k_out_of_range_at_construction(k):
    with pytest.raises(ValueError, match=f"1 <= k <= d_sae=333, got {k}"):
        SAE(d_in=48, d_sae=333, architecture="topk", k=k)


def test_config_errors():
    with pytest.raises(ValueError, match="needs k"):
        SAE(d_in=48, d_sae=333, architecture="batchtopk")
    with pytest.raises(ValueError, match="architecture: expected one of"):
        SAE(d_in=48, d_sae=333, architecture="mystery")
    with pytest.raises(ValueError, match="d_sae: expected a positive integer, got 0"):
        SAE(d_in=48, d_sae=0, architecture="relu")
    with pytest.raises(ValueError, match="decoder_norm"):
        SAE(d_in=48, d_sae=10, architecture="relu", decoder_norm="unit")
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm applies to topk"):
        SAE(d_in=48, d_sae=10, architecture="relu", rescale_acts_by_decoder_norm=True)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        SAE(d_in=48, d_sae=10, architecture="relu", dtype="float8")
    assert SAE(d_in=4, d_sae=10, architecture="standard").architecture == "relu"


def test_bad_dead_mask(sae):
    with pytest.raises(ValueError, match=r"dead_mask: expected a bool tensor of shape \(333,\)"):
        sae.training_forward(torch.randn(3, 48), dead_mask=torch.zeros(333))


# ------------------------------------------------------------------ files


def _saved(tmp_path, arch="jumprelu"):
    sae = SAE(d_in=8, d_sae=20, architecture=arch, k=3 if arch == "topk" else None)
    return sae.save(tmp_path / "sae")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fastsae.load(tmp_path / "nowhere")


def test_missing_cfg(tmp_path):
    folder = _saved(tmp_path)
    (folder / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="cfg.json: missing"):
        fastsae.load(folder)


def test_missing_weights(tmp_path):
    folder = _saved(tmp_path)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors: missing"):
        fastsae.load(folder)


def test_unreadable_cfg(tmp_path):
    folder = _saved(tmp_path)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json: cannot read it as JSON"):
        fastsae.load(folder)


def test_unknown_architecture_names_cfg(tmp_path):
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = "mystery"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"cfg.json: architecture: expected one of .* got 'mystery'"):
        fastsae.load(folder)


def test_truncated_safetensors(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="sae_weights.safetensors: cannot read it as safetensors"):
        fastsae.load(folder)


def test_missing_tensor_and_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path)
    weights = folder / "sae_weights.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "threshold"}, weights)
    with pytest.raises(ValueError, match="sae_weights.safetensors: missing tensor 'threshold'"):
        fastsae.load(folder)
    tensors["W_dec"] = tensors["W_dec"][:, :7].contiguous()
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"tensor 'W_dec' has shape \(20, 7\), expected \(20, 8\)"):
        fastsae.load(folder)


def test_config_round_trips_through_saelens_dict():
    cfg = SAEConfig(d_in=8, d_sae=20, architecture="relu", metadata={"hook_name": "blocks.0.hook_resid_pre"})
    d = cfg.to_dict()
    assert d["architecture"] == "standard" and "k" not in d
    assert SAEConfig.from_dict(d) == cfg
    topk = SAEConfig(d_in=8, d_sae=20, architecture="batchtopk", k=4)
    d = topk.to_dict()
    assert d["architecture"] == "jumprelu" and d["fastsae_architecture"] == "batchtopk"
    assert SAEConfig.from_dict(d) == topk
