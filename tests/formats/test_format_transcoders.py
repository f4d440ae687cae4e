"""Transcoders in files: SAELens' Transcoder, SkipTranscoder, JumpReLUTranscoder and
JumpReLUSkipTranscoder (against the real sae-lens, both ways), sparsify's `transcode` and
`skip_connection` (against the real sparsify), and circuit-tracer's per-layer `transcoder_set`
(not installed: float64 references written from its documented format). Bad files get one
error naming the file."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import fastsae
import fastsae.formats
from fastsae import SAE

D_IN, D_OUT, D_SAE = 6, 4, 11


def _randomised(sae):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.05, 0.5)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.3)
    return sae.eval()


def _transcoder(arch, skip, d_out=D_OUT, **kwargs):
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        kwargs.setdefault("k", 3)
    return _randomised(SAE(d_in=D_IN, d_sae=D_SAE, d_out=d_out, architecture=arch, apply_b_dec_to_input=False,
                           skip_connection=skip, dtype="float64", **kwargs))


SAELENS_CLASSES = {  # (architecture, skip) -> SAELens' class
    ("relu", False): "Transcoder", ("relu", True): "SkipTranscoder",
    ("jumprelu", False): "JumpReLUTranscoder", ("jumprelu", True): "JumpReLUSkipTranscoder",
    ("batchtopk", False): "JumpReLUTranscoder", ("batchtopk", True): "JumpReLUSkipTranscoder",
}


@pytest.mark.parametrize("arch,skip", list(SAELENS_CLASSES))
def test_saved_transcoders_load_in_saelens_computing_the_same(tmp_path, arch, skip):
    pytest.importorskip("sae_lens")
    from sae_lens import SAE as SAELensSAE

    sae = _transcoder(arch, skip)
    sae.save(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert cfg["d_out"] == D_OUT and cfg["apply_b_dec_to_input"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SAELensSAE.load_from_disk(tmp_path / "t")
    assert type(theirs).__name__ == SAELENS_CLASSES[arch, skip]
    x = torch.randn(3, 5, D_IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), sae(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae.to_saelens()(x), sae(x), rtol=1e-12, atol=1e-12)
        back = fastsae.load(tmp_path / "t")
        assert back.architecture == arch and back.cfg.skip_connection == skip and back.d_out == D_OUT
        torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Transcoder", "SkipTranscoder", "JumpReLUTranscoder", "JumpReLUSkipTranscoder"])
def test_saelens_transcoders_load_computing_the_same(tmp_path, name):
    sae_lens = pytest.importorskip("sae_lens")
    cls = getattr(sae_lens, name)
    cfg_cls = getattr(sae_lens, name + "Config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, dtype="float64", apply_b_dec_to_input=False))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        if hasattr(theirs, "threshold"):
            theirs.threshold.uniform_(0.1, 0.6)
    theirs.save_model(tmp_path / "s")
    x = torch.randn(9, D_IN, dtype=torch.float64)
    with torch.no_grad():
        want = theirs(x)
        for ours in (fastsae.load(tmp_path / "s"), SAE.from_saelens(theirs)):
            assert ours.d_out == D_OUT and ours.cfg.skip_connection == ("Skip" in name)
            torch.testing.assert_close(ours(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["topk", "gated", "matryoshka_batchtopk"])
@pytest.mark.parametrize("skip", [False, True])
def test_other_architectures_save_in_fastsae_layout(tmp_path, arch, skip):
    sae = _transcoder(arch, skip)
    sae.save(tmp_path / "t")
    back = fastsae.load(tmp_path / "t")
    x = torch.randn(7, D_IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)
    if arch != "matryoshka_batchtopk":
        with pytest.raises(ValueError, match=f"SAELens has no {arch} transcoder"):
            sae.to_saelens()


def test_saelens_refusals(tmp_path):
    same_width = _randomised(SAE(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, architecture="relu", dtype="float64"))
    with pytest.raises(ValueError, match="SAELens' transcoders do not subtract b_dec from their input"):
        same_width.to_saelens()
    same_width.save(tmp_path / "own")  # fastsae's layout: loads back as it was
    back = fastsae.load(tmp_path / "own")
    assert back.cfg.apply_b_dec_to_input and back.d_out == D_IN
    with pytest.raises(ValueError, match="no training class for transcoders"):
        _transcoder("relu", False).to_saelens(training=True)


def test_a_w_skip_of_the_wrong_shape_names_the_file(tmp_path):
    _transcoder("relu", True).save(tmp_path / "t")
    weights = tmp_path / "t" / "sae_weights.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(weights)
    tensors["W_skip"] = torch.zeros(D_IN, D_OUT, dtype=torch.float64)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: tensor 'W_skip' has shape \(6, 4\), expected \(4, 6\)"):
        fastsae.load(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    del cfg["d_out"], cfg["fastsae_architecture"]
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"cfg.json: architecture 'skip_transcoder' \(a transcoder\) needs d_out"):
        fastsae.load(tmp_path / "t")


# ---------------------------------------------------------------- sparsify


@pytest.fixture
def sparsify_on_cpu(monkeypatch):
    sparsify = pytest.importorskip("sparsify")
    import sparsify.sparse_coder as sparse_coder_module
    import sparsify.utils as sparsify_utils

    if not torch.cuda.is_available():  # sparsify's default decoder is a Triton kernel (GPU only)
        monkeypatch.setattr(sparse_coder_module, "decoder_impl", sparsify_utils.eager_decode)
    return sparsify


@pytest.mark.parametrize("transcode,skip", [(True, False), (True, True), (False, True)])
def test_sparsify_transcode_and_skip_connection(tmp_path, sparsify_on_cpu, transcode, skip):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sc = SparseCoder(D_IN, SparseCoderConfig(k=3, num_latents=D_SAE, transcode=transcode, skip_connection=skip),
                     dtype=torch.float64)
    with torch.no_grad():
        for p in sc.parameters():
            p.normal_()
    sc.save_to_disk(tmp_path / "sc")
    x = torch.randn(13, D_IN, dtype=torch.float64)
    y = torch.randn(13, D_IN, dtype=torch.float64)
    want = sc(x).sae_out
    loaded = fastsae.load(tmp_path / "sc")
    assert loaded.cfg.skip_connection == skip and loaded.cfg.apply_b_dec_to_input == (not transcode)
    assert loaded.cfg.d_out == (D_IN if transcode else None)
    with torch.no_grad():
        for ours in (loaded, SAE.from_sparsify(sc)):
            torch.testing.assert_close(ours(x), want, rtol=1e-12, atol=1e-12)
        fastsae.formats.save(loaded, tmp_path / "back", to="sparsify")
        torch.testing.assert_close(SparseCoder.load_from_disk(tmp_path / "back")(x).sae_out, want, rtol=0, atol=0)
        torch.testing.assert_close(loaded.to_sparsify()(x).sae_out, want, rtol=0, atol=0)
    # the training loss against a target: sparsify's FVU's numerator is our MSE times the rows
    out = sc(x, y)
    ours = loaded.training_forward(x, target=y)
    total_variance = (y - y.mean(0)).pow(2).sum()
    torch.testing.assert_close(ours.mse_loss * x.shape[0] / total_variance, out.fvu, rtol=1e-10, atol=0)


def test_sparsify_refuses_transcoders_it_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="as wide as their input; this one has d_out=4 != d_in=6"):
        fastsae.formats.save(_transcoder("topk", False), tmp_path / "w", to="sparsify")
    same = SAE(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, architecture="topk", k=2)
    with pytest.raises(ValueError, match="sparsify's transcoders do not subtract b_dec"):
        fastsae.formats.save(same, tmp_path / "b", to="sparsify")


def test_a_sparsify_w_skip_of_the_wrong_shape_names_the_file(tmp_path):
    same = _transcoder("topk", True, d_out=D_IN)
    fastsae.formats.save(same, tmp_path / "s", to="sparsify")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "s" / "sae.safetensors")
    tensors["W_skip"] = torch.zeros(D_IN, D_IN + 1, dtype=torch.float64)
    save_file(tensors, tmp_path / "s" / "sae.safetensors")
    with pytest.raises(ValueError, match=r"sae.safetensors: tensor 'W_skip' has shape \(6, 7\), expected \(6, 6\)"):
        fastsae.load(tmp_path / "s")


# ---------------------------------------------------------------- circuit-tracer


def _layer(gen, d_model, d_sae, threshold=False, skip=False):
    t = {
        "W_enc": torch.randn(d_sae, d_model, generator=gen, dtype=torch.float64),  # [d_transcoder, d_model]
        "W_dec": torch.randn(d_sae, d_model, generator=gen, dtype=torch.float64),
        "b_enc": torch.randn(d_sae, generator=gen, dtype=torch.float64),
        "b_dec": torch.randn(d_model, generator=gen, dtype=torch.float64),
    }
    if threshold:
        t["activation_function.threshold"] = torch.rand(d_sae, generator=gen, dtype=torch.float64)
    if skip:
        t["W_skip"] = torch.randn(d_model, d_model, generator=gen, dtype=torch.float64)
    return t


def _circuit_tracer_reference(t, x):
    """circuit-tracer's SingleLayerTranscoder forward: F.linear encode, ReLU or JumpReLU
    (x * (x > threshold)), acts @ W_dec + b_dec, plus x @ W_skip.T."""
    pre = x @ t["W_enc"].T + t["b_enc"]
    threshold = t.get("activation_function.threshold")
    acts = pre.relu() if threshold is None else pre * (pre > threshold)
    out = acts @ t["W_dec"] + t["b_dec"]
    return out + x @ t["W_skip"].T if "W_skip" in t else out


def _write_set(folder, layers, filepaths=None):
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, t in layers.items():
        save_file(t, folder / f"layer_{i}.safetensors")
        path = (filepaths or {}).get(i, f"layer_{i}.safetensors")
        entries.append(f'  - id: "toy-{i}"\n    layer: {i}\n    filepath: "{path}"\n')
    (folder / "config.yaml").write_text(
        'model_name: "toy/model"\nfeature_input_hook: "hook_resid_mid"\nfeature_output_hook: \'mlp.hook_out\'\n'
        "transcoders:\n" + "".join(entries)
    )
    return folder


def test_circuit_tracer_sets_load_computing_the_same(tmp_path):
    gen = torch.Generator().manual_seed(0)
    d_model, d_sae = 5, 9
    layers = {0: _layer(gen, d_model, d_sae), 1: _layer(gen, d_model, d_sae, threshold=True, skip=True),
              2: _layer(gen, d_model, d_sae, skip=True)}
    folder = _write_set(tmp_path / "set", layers, {0: "hf://someone/transcoders/layer_0.safetensors?revision=main"})
    saes = fastsae.load(folder)
    assert sorted(saes) == [0, 1, 2]
    x = torch.randn(2, 7, d_model, dtype=torch.float64)
    for i, sae in saes.items():
        assert sae.architecture == ("jumprelu" if i == 1 else "relu") and sae.d_out == d_model
        assert sae.cfg.metadata["hook_name"] == f"blocks.{i}.hook_resid_mid"
        assert sae.cfg.metadata["hook_name_out"] == f"blocks.{i}.mlp.hook_out"
        with torch.no_grad():
            torch.testing.assert_close(sae(x), _circuit_tracer_reference(layers[i], x), rtol=1e-12, atol=1e-12)
    fastsae.formats.save(saes, tmp_path / "back", to="circuit_tracer")
    config = json.loads((tmp_path / "back" / "config.yaml").read_text())
    assert config["feature_input_hook"] == "hook_resid_mid" and config["model_name"] == "toy/model"
    from safetensors.torch import load_file

    for i in layers:
        written = load_file(tmp_path / "back" / f"layer_{i}.safetensors")
        assert sorted(written) == sorted(layers[i])
        for name, t in layers[i].items():
            assert torch.equal(written[name], t), name
    assert fastsae.formats.detect(tmp_path / "back" / "config.yaml") == "circuit_tracer"


def test_a_batchtopk_transcoder_saves_for_circuit_tracer_as_jumprelu(tmp_path):
    sae = _transcoder("batchtopk", True, d_out=D_IN)
    fastsae.formats.circuit_tracer.save({0: sae}, tmp_path / "c", feature_input_hook="ln2.hook_normalized",
                                        feature_output_hook="hook_mlp_out")
    from safetensors.torch import load_file

    t = load_file(tmp_path / "c" / "layer_0.safetensors")
    x = torch.randn(8, D_IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(_circuit_tracer_reference(t, x), sae(x), rtol=1e-12, atol=1e-12)


def test_circuit_tracer_bad_sets(tmp_path):
    gen = torch.Generator().manual_seed(1)
    bad_skip = _layer(gen, 5, 9, skip=True)
    bad_skip["W_skip"] = torch.zeros(5, 4, dtype=torch.float64)
    folder = _write_set(tmp_path / "skip", {0: bad_skip})
    with pytest.raises(ValueError, match=r"layer_0.safetensors: tensor 'W_skip' has shape \(5, 4\), expected \(5, 5\)"):
        fastsae.load(folder)
    negative = _layer(gen, 5, 9, threshold=True)
    negative["activation_function.threshold"][2] = -0.1
    with pytest.raises(ValueError, match="layer_0.safetensors: a negative JumpReLU threshold"):
        fastsae.load(_write_set(tmp_path / "neg", {0: negative}))
    with pytest.raises(ValueError, match=r"needs a transcoder for every layer 0\.\.1, got layers \[1\]"):
        fastsae.load(_write_set(tmp_path / "gap", {1: _layer(gen, 5, 9)}))
    missing = _write_set(tmp_path / "missing", {0: _layer(gen, 5, 9)}, {0: "elsewhere/nothing.safetensors"})
    with pytest.raises(FileNotFoundError, match="config.yaml: transcoder file 'elsewhere/nothing.safetensors' not found"):
        fastsae.load(missing)
    with pytest.raises(ValueError, match="circuit-tracer's transcoders are ReLU or JumpReLU; this one is 'topk'"):
        fastsae.formats.circuit_tracer.save({0: _transcoder("topk", False, d_out=D_IN)}, tmp_path / "t",
                                            feature_input_hook="a", feature_output_hook="b")
    with pytest.raises(ValueError, match="pass feature_input_hook and feature_output_hook"):
        fastsae.formats.circuit_tracer.save({0: _transcoder("relu", False, d_out=D_IN)}, tmp_path / "h")
