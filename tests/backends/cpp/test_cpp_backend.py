"""The `cpp` backend through the module (2-D and 3-D inputs, every gradient), its place as
CPU default, and its build: cached, and a failed build falls back to torch with one warning."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_rel_close
from helpers.auxk import assert_aux_pre_matches
from helpers.cpp import DEVICES, kernel_backend
from helpers.paths import ROOT

import fastsae
from fastsae import ops
from fastsae.ops import dispatch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(29,), (3, 11)])
@pytest.mark.parametrize("rescale", [False, True])
def test_module_training_forward_matches_float64(device, shape, rescale):
    """SAE.training_forward (MSE + AuxK) on 2-D and 3-D input with the kernel backend forced:
    loss and every parameter's gradient (and x's) against float64 autograd on the dense
    formula, with the kernel's selections."""
    d_in, d_sae, k, k_aux = 48, 333, 7, 16
    sae = fastsae.SAE(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, rescale_acts_by_decoder_norm=rescale,
                      device=device)
    with torch.no_grad():  # move every parameter away from its initialisation (b_enc = b_dec = 0)
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(*shape, d_in, device=device, requires_grad=True)
    dead = torch.rand(d_sae, device=device) < 0.1
    with kernel_backend(device):
        out = sae.training_forward(x, dead_mask=dead, k_aux=k_aux)
        out.loss.backward()
        assert out.x_hat.shape == x.shape
        x2 = x.detach().reshape(-1, d_in)
        norm = sae.W_dec.norm(dim=1) if rescale else None
        lat = fastsae.DeadLatents.from_mask(dead).latents
        _, idx, aux_pre = ops.topk_encode(x2, sae.enc_weight, sae.b_enc, sae.b_dec, norm, k, lat, k_aux)

    params64 = {name: p.detach().double().requires_grad_() for name, p in sae.named_parameters()}
    x64 = x.detach().double().reshape(-1, d_in).requires_grad_()
    W_enc, b_enc, W_dec, b_dec = (params64[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    dec_norm = W_dec.norm(dim=1) if rescale else torch.ones(d_sae, dtype=torch.float64, device=device)
    pre = ((x64 - b_dec) @ W_enc + b_enc) * dec_norm
    acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    x_hat = (acts / dec_norm) @ W_dec + b_dec
    mse = (x_hat - x64).pow(2).sum(-1).mean()
    # the kernel's aux selection, checked against the float64 contract, then its entries scattered
    # back to their latents (empty entries, -1, are never kept)
    assert_aux_pre_matches(aux_pre, pre.detach(), lat, k_aux)
    kept = ~torch.isneginf(aux_pre)
    assert (lat[kept.any(0)] >= 0).all() and int(kept.sum(-1).min()) == min(k_aux, int(dead.sum()))
    cols = lat.clamp(min=0).expand_as(aux_pre)
    aux_acts = torch.zeros_like(pre).scatter_add(1, cols, torch.where(kept, pre.gather(1, cols), 0.0))
    e_hat = (aux_acts / dec_norm) @ W_dec
    n_dead = int(dead.sum())
    aux = (1 / 32) * min(1.0, n_dead / k_aux) * (e_hat - (x64 - x_hat).detach()).pow(2).sum(-1).mean()
    (mse + aux).backward()

    assert_rel_close(out.mse_loss, mse.detach(), 1e-5, "mse")
    assert_rel_close(out.aux_loss, aux.detach(), 1e-5, "aux loss")
    assert_rel_close(x.grad.reshape(-1, d_in), x64.grad, 1e-5, "grad x")
    for name, p in sae.named_parameters():
        assert params64[name].grad.abs().max() > 0, name
        assert_rel_close(p.grad, params64[name].grad, 1e-5, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_module_encode_decode_agree_with_torch_backend(device):
    """encode / encode_sparse / decode / forward on 3-D input: the kernel backend and the torch
    backend give the same activations and reconstructions."""
    sae = fastsae.SAE(d_in=100, d_sae=1000, architecture="topk", k=16, device=device)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(2, 9, 100, device=device)
    results = {}
    for backend in (None, "torch"):
        with (kernel_backend(device) if backend is None else fastsae.use_backend(backend)):
            sparse = sae.encode_sparse(x)
            results[backend] = (sae.encode(x), sae.decode(sparse), sae(x), sparse.values.shape)
    kernel, torch_ = results[None], results["torch"]
    assert kernel[3] == (2, 9, 16)
    for name, a, b in zip(("encode", "decode", "forward"), kernel[:3], torch_[:3]):
        assert a.shape == b.shape, name
        assert_rel_close(a, b, 1e-5, name)


def test_cpp_is_the_cpu_default(monkeypatch):
    monkeypatch.delenv("FASTSAE_BACKEND", raising=False)
    assert dispatch.select(torch.device("cpu"))[0] == "cpp"
    assert "cpp" in fastsae.available_backends("cpu")


def test_build_is_cached():
    from fastsae.ops import backend_cpp

    folder = backend_cpp.build_directory(backend_cpp.HAS_CUDA_KERNELS)
    assert (folder / "fastsae_cpp.so").is_file()
    assert (folder / "build.ninja").is_file()


@pytest.mark.parametrize(
    "compiler,cause",
    [("no-such-compiler", "no C++ compiler to build fastsae's C++ kernels"), ("false", "could not build fastsae's C++ extension")],
)
def test_failed_build_warns_once_and_uses_torch(tmp_path, compiler, cause):
    """No compiler, or one that fails: one RuntimeWarning naming the cause, and the torch
    path's results."""
    script = textwrap.dedent(
        """
        import json, warnings
        import torch, fastsae
        from fastsae.ops import dispatch
        torch.manual_seed(0)
        sae = fastsae.SAE(d_in=16, d_sae=40, architecture="topk", k=3)
        x = torch.randn(5, 16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = sae(x)
            b = sae(x)
        with fastsae.use_backend("torch"):
            ref = sae(x)
        messages = [str(w.message) for w in caught if "fastsae backend" in str(w.message)]
        print(json.dumps({"messages": messages, "same": bool(torch.equal(a, ref) and torch.equal(b, ref)),
                          "backend": dispatch.select(torch.device("cpu"))[0]}))
        """
    )
    env = dict(os.environ, FASTSAE_BUILD_DIR=str(tmp_path / "build"), CXX=compiler)
    env.pop("FASTSAE_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(report["messages"]) == 1, report["messages"]
    assert "fastsae backend 'cpp' could not be loaded" in report["messages"][0]
    assert cause in report["messages"][0]
    assert report["same"] and report["backend"] == "torch"
