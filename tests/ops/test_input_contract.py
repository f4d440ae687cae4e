"""One input contract for every op on every backend (fastsae.validation): the malformed inputs
of issue 18, each refused with a ValueError naming the argument, what was expected and what
came, by fastsae.ops and by the raw torch.ops.fastsae ops, whichever backend runs; and AuxK's
entries when dead latents are switched off (-inf) or NaN, the same on every backend."""

import contextlib

import pytest
import torch
from conftest import encoder_inputs

import fastsae
from fastsae import SAE, SparseActivations, ops, validation

CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"  # the interpreter on CPU tensors (tests/conftest.py)
BACKEND_DEVICES = [
    ("torch", "cpu"),
    ("cpp", "cpu"),
    ("triton", TRITON_DEVICE),
    pytest.param(("torch", "cuda"), marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
    pytest.param(("cuda", "cuda"), marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
]


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda p: f"{p[0]}-{p[1]}")
def backend(request):
    name, device = request.param
    if name not in ops.available_backends(device):
        pytest.skip(f"backend {name} does not load on {device} here")
    with ops.use_backend(name):
        yield device


def _decode_args(device, n=4, m=3, d_sae=8, d_in=5):
    values = torch.randn(n, m, device=device)
    indices = torch.randint(0, d_sae, (n, m), device=device)
    return values, indices, torch.randn(d_sae, d_in, device=device), torch.randn(d_in, device=device)


def _both_entry_points(op_name):
    """fastsae.ops.<op> and the raw torch.ops.fastsae.<op>: both must refuse."""
    return [getattr(ops, op_name), getattr(torch.ops.fastsae, op_name)]


# ------------------------------------------------------------------ silently wrong results before


@pytest.mark.parametrize("entry", ["ops", "raw"])
def test_indices_on_another_device_are_refused(backend, entry):
    values, indices, W, b = _decode_args(backend)
    decode = ops.sparse_decode if entry == "ops" else torch.ops.fastsae.sparse_decode
    with pytest.raises(ValueError, match=rf"indices: expected device {backend}.* \(as values\), got meta"):
        decode(values, indices.to("meta"), W, b, None)
    with pytest.raises(ValueError, match=rf"indices: expected device {backend}.*got meta"):
        torch.ops.fastsae.sparse_decode_backward(torch.randn(4, 5, device=backend), values, indices.to("meta"), W, None)


def test_topk_encode_backward_rows_must_match_x(backend):
    x, enc, _, b_dec, _ = encoder_inputs(1, 8, 16, device=backend)
    idx = torch.randint(0, 16, (5, 3), device=backend)
    with pytest.raises(ValueError, match=r"grad_pre: expected a 2-D tensor \[N, m\] with N=1 rows \(as x\), got shape \(5, 3\)"):
        torch.ops.fastsae.topk_encode_backward(torch.randn(5, 3, device=backend), idx, x, enc, b_dec)
    x5 = torch.randn(5, 8, device=backend)
    with pytest.raises(ValueError, match=r"N=5 rows \(as x\), got shape \(2, 3\)"):
        torch.ops.fastsae.topk_encode_backward(torch.randn(2, 3, device=backend), idx[:2], x5, enc, b_dec)


# ------------------------------------------------------------------ bad input accepted before


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_sparse_decode_b_dec_dtype_must_match(backend, dtype):
    values, indices, W, b = _decode_args(backend)
    for decode in _both_entry_points("sparse_decode"):
        with pytest.raises(ValueError, match=rf"b_dec: expected dtype torch.float32, got {dtype}"):
            decode(values, indices, W, b.to(dtype), None)


def test_topk_encode_dec_norm_dtype_must_match(backend):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(4, 8, 16, device=backend)
    for encode in _both_entry_points("topk_encode"):
        with pytest.raises(ValueError, match=r"dec_norm: expected dtype torch.float32, got torch.float64"):
            encode(x, enc, b_enc, b_dec, dec_norm.double(), 3, None, 0)


def test_integer_values_are_refused(backend):
    values, indices, W, _ = _decode_args(backend)
    for decode in _both_entry_points("sparse_decode"):
        with pytest.raises(ValueError, match=r"values: expected a floating-point dtype .* got torch.int32"):
            decode(values.to(torch.int32), indices, W.to(torch.int32), None, None)


def test_no_broadcasting_of_vectors(backend):
    values, indices, W, b = _decode_args(backend)
    with pytest.raises(ValueError, match=r"b_dec: expected a vector of shape \(5,\), got shape \(1,\) \(d_in=5\)"):
        torch.ops.fastsae.sparse_decode(values, indices, W, b[:1], None)
    with pytest.raises(ValueError, match=r"dec_norm: expected a vector of shape \(8,\), got shape \(9,\) \(d_sae=8\)"):
        torch.ops.fastsae.sparse_decode_backward(torch.randn(4, 5, device=backend), values, indices, W, torch.ones(9, device=backend))
    x, enc, b_enc, b_dec, _ = encoder_inputs(4, 5, 8, device=backend)
    with pytest.raises(ValueError, match=r"b_dec: expected a vector of shape \(5,\)"):
        torch.ops.fastsae.topk_encode(x, enc, b_enc, b_dec[:1], None, 2, None, 0)
    with pytest.raises(ValueError, match=r"grad_out: expected a tensor of shape \(4, 5\)"):
        torch.ops.fastsae.sparse_decode_backward(torch.randn(1, 5, device=backend), values, indices, W, None)


# ------------------------------------------------------------------ valid input refused before


def test_sparse_decode_with_zero_width_output(backend):
    values, indices, W, _ = _decode_args(backend, d_in=0)
    out = ops.sparse_decode(values, indices, W, torch.zeros(0, device=backend), None)
    assert out.shape == (4, 0) and out.dtype == values.dtype and out.device == values.device


def test_empty_batch(backend):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(0, 8, 16, device=backend)
    v, i, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 3)
    assert v.shape == i.shape == (0, 3) and aux_pre.shape == (0, 0)
    _, _, aux_pre = ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 3, torch.tensor([2, 5, -1], device=backend), 2)
    assert aux_pre.shape == (0, 3)
    assert ops.sparse_decode(v, i, torch.randn(16, 8, device=backend), b_dec).shape == (0, 8)


# ------------------------------------------------------------------ unclear messages before


def test_not_a_tensor_blames_that_argument(backend):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(4, 8, 16, device=backend)
    with pytest.raises(ValueError, match=r"^x: expected a 2-D floating-point tensor \[N, d_in\], got ndarray$"):
        ops.topk_encode(x.cpu().numpy(), enc, b_enc, b_dec, dec_norm, 3)
    with pytest.raises(ValueError, match=r"^b_enc: expected a tensor of shape \(16,\) \(d_sae=16\), got None$"):
        ops.topk_encode(x, enc, None, b_dec, dec_norm, 3)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="b_enc"):
        torch.ops.fastsae.topk_encode(x, enc, None, b_dec, dec_norm, 3, None, 0)


def test_out_of_range_indices_name_indices_and_d_sae(backend):
    values, indices, W, b = _decode_args(backend)
    indices[1, 2] = 30
    for decode in _both_entry_points("sparse_decode"):
        with pytest.raises(ValueError, match=r"indices: expected latent indices in \[0, 8\) \(d_sae=8\), got values in \[0, 30\]"):
            decode(values, indices, W, b, None)
    indices[1, 2] = -1
    with pytest.raises(ValueError, match=r"got values in \[-1, "):
        torch.ops.fastsae.sparse_decode_backward(torch.randn(4, 5, device=backend), values, indices, W, None)
    x = torch.randn(4, 5, device=backend)
    with pytest.raises(ValueError, match=r"indices: expected latent indices in \[0, 8\)"):
        torch.ops.fastsae.topk_encode_backward(torch.randn(4, 3, device=backend), indices, x, W, None)


def test_sae_decode_with_indices_beyond_d_sae(backend):
    sae = SAE(d_in=5, d_sae=8, architecture="topk", k=3, device=backend)
    acts = SparseActivations(torch.rand(4, 3, device=backend), torch.tensor([[0, 1, 30]] * 4, device=backend), 8)
    with pytest.raises(ValueError, match=r"indices: expected latent indices in \[0, 8\) \(d_sae=8\), got values in \[0, 30\]"):
        sae.decode(acts)


def test_mixed_float_dtypes_name_the_argument(backend):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(4, 8, 16, device=backend)
    for encode in _both_entry_points("topk_encode"):
        with pytest.raises(ValueError, match=r"^b_enc: expected dtype torch.float64, got torch.float32"):
            encode(x.double(), enc.double(), b_enc, None, None, 3, None, 0)
    with pytest.raises(ValueError, match=r"^enc_weight: expected dtype torch.float32, got torch.float64"):
        ops.threshold_encode(x, enc.double(), b_enc, b_dec, dec_norm, torch.zeros(16, device=backend), 16)


def test_raw_threshold_encode_checks_cutoff(backend):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(4, 8, 16, device=backend)
    cutoff = torch.zeros(16, device=backend)
    with pytest.raises(ValueError, match=r"cutoff: expected dtype torch.float32 \(the accumulation type of torch.bfloat16"):
        bf = [t.bfloat16() for t in (x, enc, b_enc)]
        torch.ops.fastsae.threshold_encode(*bf, None, None, cutoff.bfloat16(), 16)
    with pytest.raises(ValueError, match=r"max_width: expected an integer 0 <= max_width <= d_sae=16, got 17"):
        torch.ops.fastsae.threshold_encode(x, enc, b_enc, b_dec, dec_norm, cutoff, 17)


def test_bad_aux_latents_and_k(backend):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(4, 8, 16, device=backend)
    bad = [
        (torch.ones(16, dtype=torch.bool), r"aux_latents: expected dtype torch.int64, got torch.bool"),
        (torch.arange(3, dtype=torch.int32), r"aux_latents: expected dtype torch.int64, got torch.int32"),
        (torch.arange(17), r"aux_latents: expected a vector of at most d_sae=16 latents, got shape \(17,\)"),
        (torch.arange(4).reshape(2, 2), r"aux_latents: expected a vector of at most d_sae=16 latents, got shape \(2, 2\)"),
        (torch.tensor([0, 16]), r"aux_latents: expected latents in \[0, 16\) or -1 \(empty\), got values in \[0, 16\]"),
        (torch.tensor([-2, 3]), r"aux_latents: expected latents in \[0, 16\) or -1 \(empty\), got values in \[-2, 3\]"),
    ]
    for encode in _both_entry_points("topk_encode"):
        for latents, message in bad:
            with pytest.raises(ValueError, match=message):
                encode(x, enc, b_enc, b_dec, dec_norm, 3, latents.to(backend), 2)
        with pytest.raises(ValueError, match=r"k_aux: expected 0 <= k_aux <= d_sae=16, got 17"):
            encode(x, enc, b_enc, b_dec, dec_norm, 3, torch.arange(3, device=backend), 17)
    with pytest.raises(ValueError, match=r"k: expected an integer 1 <= k <= d_sae=16, got float 2.0"):
        ops.topk_encode(x, enc, b_enc, b_dec, dec_norm, 2.0)
    sae = SAE(d_in=8, d_sae=16, architecture="topk", k=3, device=backend)
    with pytest.raises(ValueError, match=r"dead_mask"):
        sae.training_forward(x, dead_mask=torch.ones(15, dtype=torch.bool, device=backend))
    with pytest.raises(ValueError, match=r"dead_mask"):
        sae.training_forward(x, dead_mask=torch.ones(16, dtype=torch.int64, device=backend))


def test_non_contiguous_and_expanded_inputs_are_accepted(backend):
    x, enc, b_enc, b_dec, dec_norm = encoder_inputs(6, 8, 16, device=backend)
    x_t = x.t().contiguous().t()  # column-major view
    b_flat = torch.tensor(0.1, device=backend).expand(8)  # stride 0
    a = ops.topk_encode(x_t, enc, b_enc, b_flat, dec_norm, 3)
    b = ops.topk_encode(x.contiguous(), enc, b_enc, b_flat.contiguous(), dec_norm, 3)
    assert torch.equal(a[1].sort(1).values, b[1].sort(1).values)


# ------------------------------------------------------------------ where the range check runs


def test_own_indices_skip_the_range_check_and_user_indices_do_not(monkeypatch):
    """The module's training step decodes its own encoder's indices without the range check
    (which costs a host sync on a GPU); decoding user SparseActivations checks them."""
    calls = []
    real = validation.check_index_range
    monkeypatch.setattr(validation, "check_index_range", lambda *a: (calls.append(a[0]), real(*a))[1])
    sae = SAE(d_in=5, d_sae=16, architecture="topk", k=3)
    x = torch.randn(7, 5)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:6] = True
    out = sae.training_forward(x, dead_mask=dead, k_aux=4)
    (out.loss).backward()
    sae(x)
    assert calls == []
    sae.decode(sae.encode_sparse(x))
    assert calls == ["indices"]


def test_compiled_graph_checks_indices_at_run_time():
    """Under torch.compile(fullgraph=True) the checks trace (no data-dependent branch in the
    graph) and the range check runs inside the op on real tensors."""
    W = torch.randn(8, 5)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def decode(values, indices):
        return ops.sparse_decode(values, indices, W)

    values, indices = torch.randn(4, 3), torch.randint(0, 8, (4, 3))
    torch.testing.assert_close(decode(values, indices), ops.sparse_decode(values, indices, W))
    with pytest.raises(ValueError, match=r"indices: expected latent indices in \[0, 8\)"):
        decode(values, indices + 8)


# ------------------------------------------------------------------ AuxK when dead latents are at -inf


def _aux(backend, x, enc, b_enc, latents, k_aux, k=2):
    latents = torch.tensor(latents, device=backend)
    _, _, aux_pre = ops.topk_encode(x, enc, b_enc, None, None, k, latents, k_aux)
    assert aux_pre.shape == (x.shape[0], latents.shape[0])
    return aux_pre.cpu().double()


def test_aux_skips_dead_latents_at_minus_inf(backend):
    """The issue's case: b_enc[[1, 3]] = -inf, dead [1, 3, 5], k_aux = 3. Latent 5, the one usable
    dead latent, keeps its pre-activation; the switched-off ones and the empty entry stay -inf."""
    x, enc, b_enc, _, _ = encoder_inputs(4, 8, 8, device=backend)
    b_enc[[1, 3]] = float("-inf")
    aux_pre = _aux(backend, x, enc, b_enc, [1, 3, 5, -1], 3)
    pre = (x.double() @ enc.double().T + b_enc.double()).cpu()
    assert torch.isneginf(aux_pre[:, [0, 1, 3]]).all()
    torch.testing.assert_close(aux_pre[:, 2], pre[:, 5], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k_aux", [8, 4])
def test_aux_when_every_latent_is_dead(backend, k_aux):
    """Every latent listed, two switched off: each row keeps its best min(k_aux, 6) usable ones."""
    x, enc, b_enc, _, _ = encoder_inputs(3, 8, 8, device=backend)
    b_enc[[6, 1]] = float("-inf")
    aux_pre = _aux(backend, x, enc, b_enc, list(range(8)), k_aux)
    pre = (x.double() @ enc.double().T + b_enc.double()).cpu()
    kept = torch.isfinite(aux_pre)
    assert (kept.sum(1) == min(k_aux, 6)).all() and not kept[:, [1, 6]].any()
    best = pre.topk(min(k_aux, 6), dim=1)  # -inf ranks last, so never among them
    assert torch.equal(kept, torch.zeros_like(kept).scatter(1, best.indices, True))
    torch.testing.assert_close(aux_pre[kept], pre[kept], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k_aux", [1, 3])
def test_aux_nan_ranks_first(backend, k_aux):
    x, enc, b_enc, _, _ = encoder_inputs(3, 8, 8, device=backend)
    b_enc[4] = float("nan")
    b_enc[2] = float("-inf")
    aux_pre = _aux(backend, x, enc, b_enc, [2, 4, 7], k_aux)
    assert aux_pre[:, 1].isnan().all() and torch.isneginf(aux_pre[:, 0]).all()
    if k_aux == 1:
        assert torch.isneginf(aux_pre[:, 2]).all()
    else:
        assert torch.isfinite(aux_pre[:, 2]).all()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_aux_loss_stays_finite_with_switched_off_latents(arch):
    """A TopK / BatchTopK SAE whose dead latents include ones switched off by b_enc = -inf: the
    AuxK loss and its gradients are finite (the -inf latents are skipped, not decoded)."""
    sae = SAE(d_in=6, d_sae=12, architecture=arch, k=2)
    with torch.no_grad():
        sae.b_enc[[0, 1, 2]] = float("-inf")
    dead = torch.zeros(12, dtype=torch.bool)
    dead[:5] = True
    out = sae.training_forward(torch.randn(9, 6), dead_mask=dead, k_aux=4)
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    out.loss.backward()
    assert torch.isfinite(sae.W_dec.grad).all() and torch.isfinite(sae.W_enc.grad).all()


# ------------------------------------------------------------------ files


def test_load_random_bytes_pt_gives_no_unsafe_advice(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(torch.randint(0, 256, (300,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=r"junk.pt: cannot read it with torch.load\(weights_only=True\): .* \(fastsae reads only tensors") as info:
        fastsae.load(path)
    assert "weights_only=False" not in str(info.value) and "weights_only` set to `False" not in str(info.value)
    assert info.value.__cause__ is None or "weights_only" not in str(info.value.__cause__)


def test_load_cfg_json_that_is_a_folder(tmp_path):
    folder = SAE(d_in=8, d_sae=20, architecture="relu").save(tmp_path / "sae")
    (folder / "cfg.json").unlink()
    (folder / "cfg.json").mkdir()
    with pytest.raises(ValueError, match=r"cfg.json: expected a file .*got a folder"):
        fastsae.load(folder)


def test_cpp_kernels_called_directly_refuse_integer_values():
    """The fastsae_cpp ops, below fastsae's Python checks, apply the same dtype rule."""
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("the cpp backend does not load here")
    values, indices, W, _ = _decode_args("cpu")
    with pytest.raises(RuntimeError, match=r"values: expected a floating-point dtype .* got Int"):
        torch.ops.fastsae_cpp.sparse_decode(values.to(torch.int32), indices, W.to(torch.int32), None, None)
    x = torch.ones(4, 5, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"x: expected a floating-point dtype .* got Int"):
        torch.ops.fastsae_cpp.topk_encode(x, x[:3].clone(), torch.ones(3, dtype=torch.int32), None, None, 1, None, 0)
