"""fastsae's SAEs written as dictionary_learning folders: read back (by fastsae's loader, which
computes what dictionary_learning computes: test_format_dictionary_learning.py) to the same
outputs, with the file layout dictionary_learning's classes load."""

import json

import pytest
import torch

import fastsae
from fastsae.cli import main


def _sae(arch, rescale, **kw):
    torch.manual_seed(3)
    sae = fastsae.SAE(d_in=24, d_sae=90, architecture=arch, k=5, rescale_acts_by_decoder_norm=rescale, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_((torch.rand(90, 1) + 0.5) * 10)  # rows of norms ~0.5-1.5, unequal: the folding matters
        if arch != "topk":
            sae.topk_threshold.fill_(0.08)
    return sae.eval()


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("arch,dict_class,widths", [
    ("topk", "AutoEncoderTopK", None), ("batchtopk", "BatchTopKSAE", None),
    ("matryoshka_batchtopk", "MatryoshkaBatchTopKSAE", (10, 40, 90)),
])
def test_saved_folders_load_back_computing_the_same(tmp_path, arch, dict_class, widths, rescale):
    sae = _sae(arch, rescale, **({"matryoshka_widths": widths} if widths else {}))
    sae.cfg.metadata.update(model_name="EleutherAI/pythia-70m-deduped", layer=3)
    folder = fastsae.formats.save(sae, tmp_path / "trainer_0", to="dictionary_learning")
    state = torch.load(folder / "ae.pt", weights_only=True)
    trainer = json.loads((folder / "config.json").read_text())["trainer"]
    assert trainer["dict_class"] == dict_class and trainer["k"] == 5 and trainer["lm_name"] == "EleutherAI/pythia-70m-deduped"
    assert all(v.dtype in (torch.float32, torch.int32, torch.int64) for v in state.values())
    if widths:
        assert state["group_sizes"].tolist() == trainer["group_sizes"] == [10, 30, 50]
    back = fastsae.load(folder)
    assert back.architecture == arch and back.cfg.metadata["dict_class"] == dict_class
    if widths:
        assert back.cfg.matryoshka_widths == widths
    x = torch.randn(33, 24)
    acts, ref = back.encode(x), sae.encode(x)
    assert (ref > 0).any() and (ref == 0).any()
    if rescale:  # the folded file's activations are the rescaled ones, its decoder rows unit norm
        torch.testing.assert_close(acts, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(acts, ref)
    torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)


def test_convert_writes_dictionary_learning_and_refuses_what_it_cannot_hold(tmp_path, capsys):
    sae = _sae("batchtopk", True)
    sae.save(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dl"), "--to", "dictionary_learning"]) == 0
    torch.testing.assert_close(fastsae.load(tmp_path / "dl")(torch.ones(2, 24)), sae(torch.ones(2, 24)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fastsae writes dictionary_learning files of .*'topk'.* not 'relu'"):
        fastsae.formats.save(fastsae.SAE(d_in=8, d_sae=16, architecture="relu"), tmp_path / "r", to="dictionary_learning")
    with pytest.raises(ValueError, match="no transcoder or skip connection"):
        fastsae.formats.save(fastsae.SAE(d_in=8, d_sae=16, architecture="topk", k=2, d_out=4, apply_b_dec_to_input=False),
                             tmp_path / "t", to="dictionary_learning")
