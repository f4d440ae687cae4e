"""`fastsae convert SRC DST [--to saelens|sparsify]`: conversions compute what the source computes."""

import json

import torch
from conftest import assert_rel_close
from test_format_dictionary_learning import state_dict as dl_state
from test_format_dictionary_learning import write_folder as write_dl
from test_format_sparsify import write_folder as write_sparsify

import fastsae
from fastsae.cli import main


def test_sparsify_to_saelens_and_back(tmp_path, capsys):
    src = write_sparsify(tmp_path / "layers.4")
    assert main(["convert", str(src), str(tmp_path / "saelens")]) == 0
    assert "(sparsify) ->" in capsys.readouterr().out
    assert json.loads((tmp_path / "saelens" / "cfg.json").read_text())["architecture"] == "topk"
    assert main(["convert", str(tmp_path / "saelens"), str(tmp_path / "back"), "--to", "sparsify"]) == 0
    x = torch.randn(9, 24)
    original, saelens, back = (fastsae.load(p) for p in (src, tmp_path / "saelens", tmp_path / "back"))
    assert torch.equal(saelens(x), original(x)) and torch.equal(back(x), original(x))


def test_sparsify_run_folder_converts_each_hookpoint(tmp_path, capsys):
    for name in ("layers.0", "layers.1"):
        write_sparsify(tmp_path / "run" / name)
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "sparsify_run: layers.0" in out and "sparsify_run: layers.1" in out
    for name in ("layers.0", "layers.1"):
        x = torch.randn(5, 24)
        assert torch.equal(fastsae.load(tmp_path / "out" / name)(x), fastsae.load(tmp_path / "run" / name)(x))


def test_dictionary_learning_gated_to_saelens(tmp_path):
    src = write_dl(tmp_path / "trainer_0", dl_state("GatedAutoEncoder"), "GatedAutoEncoder")
    assert main(["convert", str(src), str(tmp_path / "out")]) == 0
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "gated" and cfg["metadata"]["dict_class"] == "GatedAutoEncoder"
    x = torch.randn(7, 24)
    assert_rel_close(fastsae.load(tmp_path / "out")(x), fastsae.load(src)(x), 0.0)


def test_errors_exit_nonzero_and_write_nothing(tmp_path, capsys):
    src = write_dl(tmp_path / "relu", dl_state("AutoEncoder"), "AutoEncoder")
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "sparsify"]) == 1
    assert "sparsify stores TopK SAEs; this SAE is 'relu'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert "nothing: no such file or folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["convert", str(src), str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "full"), "--overwrite"]) == 0
