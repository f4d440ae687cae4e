"""Backend choice: FASTSAE_BACKEND, the context manager, auto's fallback with one warning."""

import sys
import types
import warnings

import pytest
import torch

import fastsae
from fastsae.ops import dispatch


def test_default_is_auto_and_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTSAE_BACKEND", raising=False)
    assert fastsae.requested_backend() == "auto"
    name, module = dispatch.select(torch.device("cpu"))
    assert name in fastsae.available_backends("cpu")
    assert "torch" in fastsae.available_backends("cpu")


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.setenv("FASTSAE_BACKEND", "torch")
    assert fastsae.requested_backend() == "torch"
    with fastsae.use_backend("auto"):
        assert fastsae.requested_backend() == "auto"
        with fastsae.use_backend("torch"):
            assert fastsae.requested_backend() == "torch"
        assert fastsae.requested_backend() == "auto"
    assert fastsae.requested_backend() == "torch"


def test_unknown_backend_name(monkeypatch):
    with pytest.raises(ValueError, match="unknown fastsae backend 'fast': expected one of"):
        with fastsae.use_backend("fast"):
            pass
    monkeypatch.setenv("FASTSAE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="'gpu'"):
        fastsae.requested_backend()


def _fake_backend_calls(monkeypatch, name, devices=("cpu",)):
    """Register a backend `name` that records calls and delegates to the reference."""
    from fastsae import reference

    calls = []
    mod = types.ModuleType(f"fastsae_test_backend_{name}")
    for fn in ("topk_encode", "topk_encode_backward", "sparse_decode", "sparse_decode_backward"):
        def wrapper(*a, _fn=fn):
            calls.append(_fn)
            return getattr(reference, _fn)(*a)
        setattr(mod, fn, wrapper)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(dispatch._BACKENDS, name, dispatch.BackendSpec(mod.__name__, frozenset(devices)))
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_failed", {})
    return calls


def test_forced_backend_runs_every_op(monkeypatch):
    calls = _fake_backend_calls(monkeypatch, "cpp")
    sae = fastsae.SAE(d_in=16, d_sae=40, architecture="topk", k=3)
    x = torch.randn(5, 16)
    with fastsae.use_backend("cpp"):
        sae(x).sum().backward()
    assert set(calls) == {"topk_encode", "topk_encode_backward", "sparse_decode", "sparse_decode_backward"}


def test_auto_prefers_registered_fast_backend(monkeypatch):
    calls = _fake_backend_calls(monkeypatch, "cpp")
    monkeypatch.delenv("FASTSAE_BACKEND", raising=False)
    sae = fastsae.SAE(d_in=16, d_sae=40, architecture="topk", k=3)
    sae(torch.randn(5, 16))
    assert "topk_encode" in calls


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(dispatch._BACKENDS, "cpp", dispatch.BackendSpec("fastsae_no_such_module", frozenset({"cpu"})))
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_failed", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv("FASTSAE_BACKEND", raising=False)
    sae = fastsae.SAE(d_in=16, d_sae=40, architecture="topk", k=3)
    x = torch.randn(5, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = sae(x)
        out2 = sae(x)
    relevant = [w for w in caught if "fastsae backend 'cpp' could not be loaded" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert torch.equal(out1, out2)
    assert dispatch.select(torch.device("cpu"))[0] == "torch"


def test_forced_backend_that_cannot_load_is_an_error(monkeypatch):
    monkeypatch.setitem(dispatch._BACKENDS, "cpp", dispatch.BackendSpec("fastsae_no_such_module", frozenset({"cpu"})))
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_failed", {})
    sae = fastsae.SAE(d_in=16, d_sae=40, architecture="topk", k=3)
    with fastsae.use_backend("cpp"), pytest.raises(RuntimeError, match="'cpp' could not be loaded"):
        sae(torch.randn(5, 16))


def test_forced_backend_on_wrong_device(monkeypatch):
    _fake_backend_calls(monkeypatch, "cuda", devices=("cuda",))
    sae = fastsae.SAE(d_in=16, d_sae=40, architecture="topk", k=3)
    with fastsae.use_backend("cuda"), pytest.raises(ValueError, match="runs on \\['cuda'\\] tensors, got tensors on cpu"):
        sae(torch.randn(5, 16))
