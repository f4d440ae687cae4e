"""dictionary_learning ae.pt files built by hand in each class's state-dict layout, against float64
references written from dictionary_learning's dictionary.py and trainers/*.py (encode / decode as
`utils.load_dictionary` returns them)."""

import json

import pytest
import torch
from conftest import assert_rel_close
from helpers.format_refs import rand, topk_reference

import fastsae
from fastsae.formats import dictionary_learning

D_IN, D_SAE, K = 24, 90, 5


def state_dict(dict_class):
    enc, dec = rand(D_SAE, D_IN, scale=0.3), rand(D_IN, D_SAE, scale=0.3)
    b_enc, b_in, b_dec = rand(D_SAE, scale=0.1), rand(D_IN, scale=0.1), rand(D_IN, scale=0.1)
    if dict_class == "AutoEncoder":
        return {"bias": b_in, "encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec}
    if dict_class == "AutoEncoderNew":
        return {"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec, "decoder.bias": b_dec}
    if dict_class == "GatedAutoEncoder":
        return {"decoder_bias": b_dec, "encoder.weight": enc, "r_mag": rand(D_SAE, scale=0.3),
                "gate_bias": rand(D_SAE, scale=0.1), "mag_bias": rand(D_SAE, scale=0.1), "decoder.weight": dec}
    if dict_class == "JumpReluAutoEncoder":
        return {"W_enc": enc.T.contiguous(), "b_enc": b_enc, "W_dec": dec.T.contiguous(), "b_dec": b_dec,
                "threshold": rand(D_SAE, scale=0.2).abs()}
    k, threshold = torch.tensor(K, dtype=torch.int), torch.tensor(0.3)
    if dict_class == "MatryoshkaBatchTopKSAE":
        return {"k": k, "threshold": threshold, "group_sizes": torch.tensor([10, 30, 50]),
                "W_enc": enc.T.contiguous(), "b_enc": b_enc, "W_dec": dec.T.contiguous(), "b_dec": b_dec}
    return {"k": k, "threshold": threshold, "encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec,
            "b_dec": b_dec}


def write_folder(folder, state, dict_class=None, **trainer):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ae.pt")
    if dict_class is not None:
        cfg = {"trainer": {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 3,
                           "lm_name": "EleutherAI/pythia-70m-deduped", **trainer}, "buffer": {"ctx_len": 128}}
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def dl_reference(dict_class, s, x, module_acts=None):
    """dictionary_learning's encode and decode in float64 (AutoEncoder after from_pretrained's
    decoder normalisation)."""
    s = {n: v.double() if v.is_floating_point() else v for n, v in s.items()}
    relu = torch.relu
    if dict_class == "AutoEncoder":
        norms = s["decoder.weight"].norm(dim=0)
        W_enc, b_enc = s["encoder.weight"] * norms[:, None], s["encoder.bias"] * norms
        W_dec = s["decoder.weight"] / norms
        f = relu((x - s["bias"]) @ W_enc.T + b_enc)
        return f, f @ W_dec.T + s["bias"]
    if dict_class == "AutoEncoderNew":
        f = relu(x @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["decoder.bias"]
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        f = (x_enc + s["gate_bias"] > 0).double() * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return f, f @ s["decoder.weight"].T + s["decoder_bias"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]  # apply_b_dec_to_input is False
        f = relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    pre = (x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"]
    if dict_class == "AutoEncoderTopK":
        f = topk_reference(module_acts, pre, K, relu_first=True)
    else:  # BatchTopKSAE: use_threshold=True by default
        f = relu(pre) * (relu(pre) > s["threshold"])
    return f, f @ s["decoder.weight"].T + s["b_dec"]


CLASSES = ["AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
           "BatchTopKSAE", "MatryoshkaBatchTopKSAE"]
EXPECT = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "GatedAutoEncoder": "gated", "JumpReluAutoEncoder": "jumprelu",
          "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "matryoshka_batchtopk"}


@pytest.mark.parametrize("dict_class", CLASSES)
def test_each_class_computes_what_dictionary_learning_computes(tmp_path, dict_class):
    state = state_dict(dict_class)
    sae = fastsae.load(write_folder(tmp_path / "trainer_0", state, dict_class, k=K))
    assert sae.architecture == EXPECT[dict_class] and not sae.training
    assert sae.cfg.metadata["dict_class"] == dict_class and sae.cfg.metadata["layer"] == 3
    if dict_class == "MatryoshkaBatchTopKSAE":  # its group sizes [10, 30, 50] as SAELens' cumulative widths
        assert sae.cfg.matryoshka_widths == (10, 40, 90)
    x = torch.randn(21, D_IN)
    acts = sae.encode(x)
    ref_acts, ref_out = dl_reference(dict_class, state, x.double(), acts)
    assert (ref_acts != 0).any() and (ref_acts == 0).any(), "vacuous: all latents on or all off"
    assert_rel_close(acts, ref_acts, 1e-5, "encode")
    assert_rel_close(sae.decode(acts), ref_out, 1e-5, "decode")
    assert_rel_close(sae(x), ref_out, 1e-5, "forward")


def test_autoencoder_with_unit_decoder_is_not_renormalised(tmp_path):
    state = state_dict("AutoEncoder")
    state["decoder.weight"] = state["decoder.weight"] / state["decoder.weight"].norm(dim=0)
    sae = fastsae.load(write_folder(tmp_path / "a", state, "AutoEncoder"))
    assert torch.equal(sae.W_enc, state["encoder.weight"].T) and torch.equal(sae.b_enc, state["encoder.bias"])


def test_loads_without_config_where_the_keys_say_the_class(tmp_path):
    state = state_dict("GatedAutoEncoder")
    sae = fastsae.load(write_folder(tmp_path / "g", state) / "ae.pt")  # the file itself, no config.json
    assert sae.architecture == "gated"
    folder = write_folder(tmp_path / "t", state_dict("AutoEncoderTopK"))
    with pytest.raises(ValueError, match="ae.pt: AutoEncoderTopK and BatchTopKSAE store the same tensors"):
        fastsae.load(folder)
    torch.save(state_dict("JumpReluAutoEncoder"), tmp_path / "ae_1000.pt")  # a checkpoints/ae_<step>.pt
    assert fastsae.load(tmp_path / "ae_1000.pt").architecture == "jumprelu"


def test_bad_files(tmp_path):
    state = state_dict("AutoEncoderTopK")
    with pytest.raises(ValueError, match=r"ae.pt: k=5 in the state dict, k=7 in its config.json"):
        fastsae.load(write_folder(tmp_path / "k", state, "AutoEncoderTopK", k=7))
    with pytest.raises(ValueError, match="ae.pt: missing tensor 'b_dec' for a AutoEncoderTopK"):
        fastsae.load(write_folder(tmp_path / "m", {n: v for n, v in state.items() if n != "b_dec"}, "AutoEncoderTopK"))
    bad = dict(state, **{"decoder.weight": rand(D_IN, D_SAE - 1)})
    with pytest.raises(ValueError, match=r"ae.pt: tensor 'decoder.weight' has shape \(24, 89\), expected \(24, 90\)"):
        fastsae.load(write_folder(tmp_path / "s", bad, "AutoEncoderTopK"))
    with pytest.raises(ValueError, match="ae.pt: dict_class 'CrossCoder'"):
        fastsae.load(write_folder(tmp_path / "c", state, "CrossCoder"))
    backup = {"step": 10, "ae": state_dict("AutoEncoder"), "optimizer": {"state": {}}, "config": {}, "norm_factor": 2.0}
    with pytest.raises(ValueError, match="ae.pt: a dictionary_learning training backup"):
        fastsae.load(write_folder(tmp_path / "b", backup, "AutoEncoder"))
    folder = write_folder(tmp_path / "trunc", state, "AutoEncoderTopK")
    data = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"ae.pt: cannot read it with torch.load\(weights_only=True\)"):
        fastsae.load(folder)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    torch.save({"encoder.weight": Evil()}, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="weights_only"):
        dictionary_learning.load(tmp_path / "ae.pt")


def test_layouts_from_before_december_2024(tmp_path):
    """AutoEncoderTopK then kept k in config.json only; BatchTopKSAE had no threshold (batch-dependent
    encode), which is refused."""
    state = state_dict("AutoEncoderTopK")
    old = {n: v for n, v in state.items() if n not in ("k", "threshold")}
    sae = fastsae.load(write_folder(tmp_path / "t", old, "AutoEncoderTopK", k=K))
    x = torch.randn(13, D_IN)
    acts = sae.encode(x)
    ref_acts, ref_out = dl_reference("AutoEncoderTopK", state, x.double(), acts)
    assert_rel_close(acts, ref_acts, 1e-5, "encode")
    assert_rel_close(sae(x), ref_out, 1e-5, "forward")
    with pytest.raises(ValueError, match="takes k from its config.json, which is missing"):
        fastsae.load(write_folder(tmp_path / "nocfg", old))
    old_batch = {n: v for n, v in state.items() if n != "threshold"}
    with pytest.raises(ValueError, match="ae.pt: a BatchTopKSAE saved before dictionary_learning tracked"):
        fastsae.load(write_folder(tmp_path / "b", old_batch, "BatchTopKSAE", k=K))
