"""fastsae.SAE against float64 references written from SAELens' formulas, on odd shapes."""

import pytest
import torch
from conftest import assert_bf16_close, assert_rel_close

import fastsae
from fastsae import SAE, SparseActivations

SHAPES = [(48, 333, 1), (48, 1000, 7), (100, 333, 16), (100, 1000, 7)]
ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]


def make_sae(arch, d_in, d_sae, k=None, dtype=torch.float32, path=None, **kw):
    """path "sparse": ReLU/JumpReLU/BatchTopK-eval always take the row-wise sparse path; "dense": never."""
    k = k if arch in ("topk", "batchtopk") else None
    sae = SAE(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, dtype=str(dtype).removeprefix("torch."), **kw)
    if path is not None:
        sae.sparse_width_limit = {"sparse": d_sae, "dense": 0}[path]
    with torch.no_grad():  # away from the all-zero biases of a fresh SAE
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 0.2)
        if arch == "batchtopk":
            sae.topk_threshold.fill_(0.05)
    return sae


def ref_params(sae):
    p = {name: t.detach().double().requires_grad_() for name, t in sae.named_parameters()}
    return p


def ref_forward(sae, p, x, dense_acts_fp32=None):
    """SAELens' computation in float64. TopK and BatchTopK (train) use the module's selection
    (returned by the caller) so that rounding-level ties cannot flip a latent."""
    cfg = sae.cfg
    x = x.double()
    x_in = x - p["b_dec"] if cfg.apply_b_dec_to_input else x
    pre = x_in @ p["W_enc"] + p["b_enc"]
    norm = p["W_dec"].norm(dim=-1)
    if cfg.rescale_acts_by_decoder_norm:
        pre = pre * norm
    if cfg.architecture == "relu":
        acts = pre.relu()
    elif cfg.architecture == "jumprelu":
        acts = pre.relu() * (pre > p["threshold"])
    elif cfg.architecture == "batchtopk" and not sae.training:
        acts = pre.relu() * (pre > sae.topk_threshold.double())
    else:  # topk / batchtopk in training: keep the module's support
        mask = dense_acts_fp32.reshape(pre.shape) != 0
        acts = pre.relu() * mask
    feats = acts / norm if cfg.rescale_acts_by_decoder_norm else acts
    return acts, feats @ p["W_dec"] + p["b_dec"], pre


def check_valid_topk(sae, x, dense_acts):
    """The module's support is a true top-k (per row) of the float64 pre-activations."""
    p = {n: t.detach().double() for n, t in sae.named_parameters()}
    pre = (x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if sae.cfg.rescale_acts_by_decoder_norm:
        pre = pre * p["W_dec"].norm(dim=-1)
    pre = pre.reshape(-1, sae.d_sae)
    support = dense_acts.reshape(-1, sae.d_sae) != 0
    k = sae.cfg.k
    kth = pre.topk(k, dim=-1).values[:, -1:]
    tol = 1e-5 * pre.abs().max()
    assert (pre[support] >= kth.expand_as(pre)[support] - tol).all()
    assert (support.sum(-1) <= k).all()


# TopK has one path; the others a row-wise sparse one and a dense one.
ARCH_PATHS = [("topk", None)] + [(arch, path) for arch in ARCHS if arch != "topk" for path in ("sparse", "dense")]


@pytest.mark.parametrize("arch,path", ARCH_PATHS)
@pytest.mark.parametrize("d_in,d_sae,k", SHAPES)
@pytest.mark.parametrize("lead", [(13,), (3, 5)])
def test_forward_and_gradients_match_float64(arch, d_in, d_sae, k, lead, path):
    sae = make_sae(arch, d_in, d_sae, k, path=path)
    if arch == "batchtopk":
        sae.eval()  # the row-wise sparse path serves BatchTopK at inference
    x = torch.randn(*lead, d_in, requires_grad=True)
    acts = sae.encode(x)
    x_hat = sae(x)
    assert x_hat.shape == x.shape and acts.shape == (*lead, d_sae)
    if arch == "topk":
        check_valid_topk(sae, x, acts)
        assert ((acts != 0).sum(-1) <= k).all()
    p = ref_params(sae)
    x64 = x.detach().double().requires_grad_()
    ref_acts, ref_out, _ = ref_forward(sae, p, x64, acts.detach())
    assert_rel_close(acts, ref_acts.reshape(acts.shape).detach(), 1e-5, "acts")
    assert_rel_close(x_hat, ref_out.reshape(x_hat.shape).detach(), 1e-5, "x_hat")

    grad = torch.randn_like(x_hat)
    x_hat.backward(grad)
    ref_out.backward(grad.double().reshape(ref_out.shape))
    for name, param in sae.named_parameters():
        if arch == "jumprelu" and name == "threshold":
            continue  # pseudo-gradient only; checked in test_jumprelu_threshold_pseudo_gradient
        assert param.grad is not None, name
        assert_rel_close(param.grad, p[name].grad, 1e-5, f"grad {name}")
    assert_rel_close(x.grad, x64.grad.reshape(x.shape), 1e-5, "grad x")


@pytest.mark.parametrize("arch,path", ARCH_PATHS)
def test_sparse_and_dense_paths_agree(arch, path):
    sae = make_sae(arch, 48, 333, 7, path=path).eval()
    x = torch.randn(3, 11, 48)
    sparse = sae.encode_sparse(x)
    # Padding slots never share a latent with a real entry (a user's scatter stays exact).
    flat = sparse.flatten()
    for row_values, row_indices in zip(flat.values, flat.indices):
        real = row_indices[row_values != 0]
        assert not torch.isin(row_indices[row_values == 0], real).any()
    assert isinstance(sparse, SparseActivations)
    assert sparse.values.shape[:-1] == (3, 11) and sparse.shape == (3, 11, 333)
    dense = sae.encode(x)
    assert_rel_close(sparse.to_dense(), dense, 1e-6, "to_dense")
    assert_rel_close(sae.decode(sparse), sae.decode(dense), 1e-5, "decode(sparse) vs decode(dense)")
    assert torch.equal(sparse.l0(), (dense != 0).sum(-1))
    if arch == "topk":
        assert sparse.width == 7


class _CountCalls:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_row_wise_sparse_path_falls_back_to_dense_and_comes_back(monkeypatch):
    spy = _CountCalls(fastsae.ops.threshold_encode)
    monkeypatch.setattr(fastsae.ops, "threshold_encode", spy)
    sae = make_sae("relu", 48, 333)
    x = torch.randn(40, 48)
    dense = make_sae("relu", 48, 333, path="dense")
    dense.load_state_dict(sae.state_dict())
    widest = int((sae._pre_dense(x) > 0).sum(-1).max())
    assert widest > 20, "the test needs rows denser than the limit below"

    sae.sparse_width_limit = widest  # every row fits: the sparse path
    assert_rel_close(sae(x), dense(x).detach(), 1e-5, "sparse path")
    assert spy.calls == 1 and sae._sparse_hint

    sae.sparse_width_limit = widest - 1  # one row too dense: the sparse pass gives up, the dense one answers
    assert_rel_close(sae(x), dense(x).detach(), 1e-5, "after overflow")
    assert spy.calls == 2 and not sae._sparse_hint
    sae(x)  # still too dense: straight to the dense path, no wasted sparse pass
    assert spy.calls == 2

    with torch.no_grad():  # make the activations sparse: a later dense pass notices
        sae.b_enc.sub_(3.0)
        dense.b_enc.sub_(3.0)
    dense_passes = 0
    while not sae._sparse_hint:
        assert_rel_close(sae(x), dense(x).detach(), 1e-5, "dense passes")
        dense_passes += 1
        assert dense_passes <= 8, "density is looked at every 8th dense pass at least"
    assert spy.calls == 2 and dense_passes > 1
    assert_rel_close(sae(x), dense(x).detach(), 1e-5, "back on the sparse path")
    assert spy.calls == 3


def test_repeated_overflows_back_off():
    """Each overflow in a row doubles the dense passes before density is looked at again."""
    sae = make_sae("relu", 48, 333)
    x = torch.randn(40, 48)
    sae.sparse_width_limit = 1  # every batch overflows
    skips = []
    for _ in range(4):
        sae._sparse_hint = True  # as if a dense pass had found the batch sparse
        sae(x)
        assert not sae._sparse_hint
        skips.append(sae._dense_passes_to_skip)
    assert skips == [0, 1, 3, 7]


def test_jumprelu_inference_keeps_exactly_the_active_latents():
    """Without gradients the cutoff is the threshold itself: no window entries, the width is the
    widest row's number of active latents, and the activations are the dense path's."""
    sae = make_sae("jumprelu", 48, 333, path="sparse")
    x = torch.randn(3, 9, 48)
    with torch.no_grad():
        sparse = sae.encode_sparse(x)
        dense = sae.encode(x)
    active = (dense != 0).sum(-1)
    assert sparse.width == int(active.max())
    assert torch.equal(sparse.l0(), active)
    slot = torch.arange(sparse.width)
    assert ((sparse.values != 0) == (slot < active[..., None])).all(), "a kept entry is not active"
    assert_rel_close(sparse.to_dense(), dense, 1e-6)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_bf16_sparse_path_within_flash_attention_rule(arch):
    sae = make_sae(arch, 100, 1000, dtype=torch.bfloat16, path="sparse")
    x16 = torch.randn(33, 100).to(torch.bfloat16)
    with torch.no_grad():
        out = sae(x16)
        support = sae.encode_sparse(x16).to_dense() != 0
        dense16 = sae.encode(x16) != 0
    # The selection is made on fp32 pre-activations, the dense bf16 path's on bf16-rounded ones:
    # they may differ only for entries within bf16 rounding of the threshold (JumpReLU then jumps).
    p = {n: t.detach().double() for n, t in sae.named_parameters()}
    pre = (x16.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    cut = p["threshold"] if arch == "jumprelu" else torch.zeros(1000, dtype=torch.float64)
    differ = support != dense16
    assert ((pre - cut).abs()[differ] <= 2e-2 * pre.abs().max()).all(), "selections differ away from the cutoff"
    assert differ.sum() <= 0.01 * support.sum()
    mask = support
    ref = (pre * mask) @ p["W_dec"] + p["b_dec"]
    q = {n: t.detach() for n, t in sae.named_parameters()}
    same = (((x16 - q["b_dec"]) @ q["W_enc"] + q["b_enc"]) * mask) @ q["W_dec"] + q["b_dec"]
    assert out.dtype == torch.bfloat16
    assert_bf16_close(out, ref, same, atol=1e-3, what=f"bf16 {arch} x_hat")


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_compile_fullgraph_and_vmap_take_the_dense_path(arch):
    """The sparse path's width depends on the data: under torch.compile(fullgraph=True) and
    torch.func transforms the module takes the dense path instead of failing."""
    sae = make_sae(arch, 48, 333)
    sae.sparse_width_limit = 333  # the sparse path in eager mode
    x = torch.randn(19, 48)
    eager = sae(x).detach()
    compiled = torch.compile(sae, backend="aot_eager", fullgraph=True)
    assert_rel_close(compiled(x), eager, 1e-5, "fullgraph")
    batched = torch.func.vmap(sae)(x.reshape(19, 1, 48))
    assert_rel_close(batched.reshape(19, 48), eager, 1e-5, "vmap")


# Each backend on the device it serves: the triton backend takes CUDA tensors on a GPU machine
# and CPU tensors only under Triton's interpreter (tests/conftest.py sets it when there is no GPU).
_BACKEND_DEVICE = {"torch": "cpu", "cpp": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_nan_input_row_gives_nan_on_the_sparse_path_as_on_the_dense_one(arch, backend, monkeypatch):
    """A NaN in one input row makes that row of the reconstruction NaN (relu(NaN) is NaN, as in
    SAELens) on the row-wise sparse path too, not a silent b_dec; the other rows are unchanged."""
    spy = _CountCalls(fastsae.ops.threshold_encode)
    monkeypatch.setattr(fastsae.ops, "threshold_encode", spy)
    device = _BACKEND_DEVICE[backend]
    sae = make_sae(arch, 48, 333, path="sparse").to(device)
    dense = make_sae(arch, 48, 333, path="dense").to(device)
    dense.load_state_dict(sae.state_dict())
    x = torch.randn(7, 48, device=device)
    x[3, 10] = float("nan")
    with fastsae.use_backend(backend):
        got, want = sae(x), dense(x)
    assert spy.calls == 1 and sae._sparse_hint, "the sparse path did not answer"
    assert got[3].isnan().all() and want[3].isnan().all()
    others = torch.arange(7, device=device) != 3
    assert_rel_close(got[others], want[others].detach(), 1e-5, "rows without NaN")


def test_row_wise_sparse_path_under_torch_compile():
    sae = make_sae("relu", 48, 333, path="sparse")
    compiled = torch.compile(sae, backend="aot_eager")
    x = torch.randn(19, 48, requires_grad=True)
    out = compiled(x)
    assert_rel_close(out, sae(x).detach(), 1e-6)
    out.sum().backward()
    assert sae.W_enc.grad is not None and x.grad is not None


@pytest.mark.parametrize("k", [1, 7, 16])
def test_topk_rescale_by_decoder_norm(k):
    sae = make_sae("topk", 100, 1000, k, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(1000, 1) * 3 + 0.1)  # norms far from equal
    x = torch.randn(17, 100, requires_grad=True)
    acts = sae.encode(x)
    check_valid_topk(sae, x, acts)
    p = ref_params(sae)
    x64 = x.detach().double().requires_grad_()
    _, ref_out, _ = ref_forward(sae, p, x64, acts.detach())
    out = sae(x)
    assert_rel_close(out, ref_out.detach(), 1e-5, "x_hat")
    g = torch.randn_like(out)
    out.backward(g)
    ref_out.backward(g.double())
    for name, param in sae.named_parameters():
        assert_rel_close(param.grad, p[name].grad, 1e-5, f"grad {name}")


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_relu_training_loss_is_saelens(path):
    sae = make_sae("relu", 48, 333, path=path)
    x = torch.randn(29, 48)
    out = sae.training_forward(x, sparsity_coefficient=0.3)
    p = ref_params(sae)
    acts, x_hat, _ = ref_forward(sae, p, x)
    mse = (x_hat - x.double()).pow(2).sum(-1).mean()
    l1 = 0.3 * (acts * p["W_dec"].norm(dim=1)).norm(p=1, dim=-1).mean()
    assert_rel_close(out.mse_loss, mse.detach(), 1e-5, "mse")
    assert_rel_close(out.sparsity_loss, l1.detach(), 1e-5, "l1")
    out.loss.backward()
    (mse + l1).backward()
    for name, param in sae.named_parameters():
        assert_rel_close(param.grad, p[name].grad, 1e-5, f"grad {name}")


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_relu_plain_l1_with_decoder_norm_none(path):
    sae = make_sae("relu", 48, 333, decoder_norm="none", path=path)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    x = torch.randn(29, 48)
    out = sae.training_forward(x, sparsity_coefficient=0.5)
    acts = sae.encode(x)
    assert_rel_close(out.sparsity_loss, 0.5 * acts.abs().sum(-1).mean().detach(), 1e-5)


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_jumprelu_threshold_pseudo_gradient(path):
    """d loss / d threshold is Gemma Scope's pseudo-gradient (rectangle kernel), for both the
    JumpReLU activation and the L0 penalty."""
    sae = make_sae("jumprelu", 48, 333, path=path)
    bw = sae.cfg.jumprelu_bandwidth
    x = torch.randn(31, 48)
    out = sae.training_forward(x, sparsity_coefficient=0.2)
    out.loss.backward()
    p = {n: t.detach().double() for n, t in sae.named_parameters()}
    pre = (x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    theta = p["threshold"]
    kernel = (((pre - theta) / bw).abs() < 0.5).double()
    # d mse / d acts, at the float64 reconstruction
    acts = pre.relu() * (pre > theta)
    x_hat = acts @ p["W_dec"] + p["b_dec"]
    g_acts = (2 * (x_hat - x.double()) / x.shape[0]) @ p["W_dec"].T
    g_theta = (-(theta / bw) * kernel * g_acts).sum(0) + 0.2 * (-(1 / bw) * kernel).sum(0) / x.shape[0]
    assert kernel.sum() > 0, "no pre-activation within the bandwidth: test would be vacuous"
    assert_rel_close(sae.threshold.grad, g_theta, 1e-4, "threshold grad")
    assert_rel_close(out.sparsity_loss, 0.2 * (pre > theta).double().sum(-1).mean(), 1e-6, "L0 loss")


def test_batchtopk_training_keeps_k_per_row_on_average_and_learns_threshold():
    sae = make_sae("batchtopk", 48, 333, 7)
    sae.topk_threshold.zero_()
    x = torch.randn(64, 48)
    sae.train()
    out = sae.training_forward(x)
    acts = out.acts.to_dense()
    assert (acts != 0).sum() == 7 * 64
    kept = acts[acts != 0]
    pre_relu = sae._pre_dense(x).relu()
    # exactly the batch's largest 7*64 activations
    assert_rel_close(kept.sort().values, pre_relu.flatten().topk(7 * 64).values.sort().values, 1e-6)
    assert sae.topk_threshold.item() == pytest.approx(0.01 * kept.min().item(), rel=1e-6)
    sae.eval()
    acts = sae.encode(x)
    thr = sae.topk_threshold.item()
    assert ((acts == 0) | (sae._pre_dense(x) > thr)).all()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_loss(arch):
    sae = make_sae(arch, 48, 333, 7)
    x = torch.randn(21, 48)
    dead = torch.zeros(333, dtype=torch.bool)
    dead[torch.randperm(333)[:40]] = True
    sae.train()
    out = sae.training_forward(x, dead_mask=dead, k_aux=24, aux_coefficient=0.5)
    p = {n: t.detach().double() for n, t in sae.named_parameters()}
    pre = ((x.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    top = pre.masked_fill(~dead, float("-inf")).topk(24, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(1, top.indices, top.values) @ p["W_dec"]
    residual = x.double() - out.x_hat.detach().double()
    expect = 0.5 * (e_hat - residual).pow(2).sum(-1).mean()
    assert_rel_close(out.aux_loss, expect, 1e-5, "aux loss")
    out.loss.backward()
    assert sae.W_dec.grad[dead].abs().sum() > 0  # dead latents learn through AuxK
    # no dead latents: no aux loss
    sae.zero_grad()
    none = sae.training_forward(x, dead_mask=torch.zeros(333, dtype=torch.bool))
    assert none.aux_loss.item() == 0.0


def test_unit_norm_decoder_helpers():
    sae = make_sae("relu", 48, 333, decoder_norm="unit_norm")
    assert_rel_close(sae.W_dec.norm(dim=1), torch.ones(333, dtype=torch.float64), 1e-6)
    x = torch.randn(8, 48)
    sae.training_forward(x, sparsity_coefficient=1.0).loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-6 * sae.W_dec.grad.abs().max()
    with torch.no_grad():
        sae.W_dec.mul_(2.5)
    sae.set_decoder_norm_to_unit_norm()
    assert_rel_close(sae.W_dec.norm(dim=1), torch.ones(333, dtype=torch.float64), 1e-6)


def test_layout_matches_saelens_and_parameters_are_all_trained_tensors():
    sae = make_sae("jumprelu", 48, 333)
    shapes = {n: tuple(t.shape) for n, t in sae.named_parameters()}
    assert shapes == {"W_dec": (333, 48), "W_enc": (48, 333), "b_enc": (333,), "b_dec": (48,), "threshold": (333,)}
    assert sae.enc_weight.is_contiguous()  # latent-major storage for the kernels
    out = sae.training_forward(torch.randn(9, 48), sparsity_coefficient=0.1)
    out.loss.backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bf16_forward_within_flash_attention_rule():
    sae = make_sae("topk", 100, 1000, 16)
    x = torch.randn(33, 100)
    sae16 = make_sae("topk", 100, 1000, 16, dtype=torch.bfloat16)
    sae16.load_state_dict({n: t.to(torch.bfloat16) for n, t in sae.state_dict().items()})
    x16 = x.to(torch.bfloat16)
    out = sae16(x16)
    acts16 = sae16.encode(x16)
    # float64 reference and a plain-torch bf16 computation on the same (bf16-rounded) inputs
    p = {n: t.detach().double() for n, t in sae16.named_parameters()}
    pre = (x16.double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    mask = acts16 != 0
    ref = (pre.relu() * mask) @ p["W_dec"] + p["b_dec"]
    q = {n: t.detach() for n, t in sae16.named_parameters()}
    pre16 = (x16 - q["b_dec"]) @ q["W_enc"] + q["b_enc"]
    same = (pre16.relu() * mask) @ q["W_dec"] + q["b_dec"]
    assert out.dtype == torch.bfloat16
    assert_bf16_close(out, ref, same, atol=1e-3, what="bf16 x_hat")


def test_save_load_round_trip_every_architecture(tmp_path):
    x = torch.randn(2, 7, 48)
    for arch in ARCHS:
        sae = make_sae(arch, 48, 333, 7)
        sae.eval()
        folder = sae.save(tmp_path / arch)
        assert (folder / "cfg.json").exists() and (folder / "sae_weights.safetensors").exists()
        loaded = fastsae.load(folder)
        loaded.eval()
        assert loaded.architecture == arch and loaded.cfg.k == sae.cfg.k
        assert torch.equal(loaded(x), sae(x)), arch
        for name, t in sae.state_dict().items():
            if name == "topk_threshold":  # an fp64 EMA, stored (as SAELens does) in the SAE's dtype
                t = t.to(sae.dtype).double()
            assert torch.equal(loaded.state_dict()[name], t), (arch, name)


def test_save_folds_decoder_norm_for_rescaled_topk(tmp_path):
    sae = make_sae("topk", 48, 333, 7, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(333, 1) + 0.5)
    x = torch.randn(10, 48)
    loaded = SAE.load(sae.save(tmp_path / "s"))
    assert_rel_close(loaded.W_dec.norm(dim=1), torch.ones(333, dtype=torch.float64), 1e-5)
    assert_rel_close(loaded(x), sae(x).detach(), 1e-5)


def test_torch_compile_matches_eager():
    sae = make_sae("topk", 48, 333, 7)
    compiled = torch.compile(sae, backend="aot_eager", fullgraph=False)
    x = torch.randn(19, 48, requires_grad=True)
    out = compiled(x)
    assert_rel_close(out, sae(x).detach(), 1e-6)
    out.sum().backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None


@pytest.mark.slow
def test_torch_compile_inductor():
    for arch in ("topk", "relu"):
        sae = make_sae(arch, 48, 333, 7)
        compiled = torch.compile(sae)
        x = torch.randn(2, 19, 48)
        assert_rel_close(compiled(x), sae(x).detach(), 1e-5, arch)
