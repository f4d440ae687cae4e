"""Transcoders: an SAE whose output is another activation than its input (d_out may differ from
d_in), with an optional skip connection W_skip, for every architecture. Outputs, losses and
gradients against float64 references written here from the definitions (odd shapes, k=1, 3-D
inputs, both the sparse and the dense path), one clear error for each bad input, and a synthetic
check that a transcoder recovers a known sparse map."""

import pytest
import torch

import fastsae
from fastsae import SAE, SAEConfig
from fastsae.activations import JumpReLU, Step

ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu", "gated", "matryoshka_batchtopk")
D_SAE = 7
K = {"topk": 1, "batchtopk": 2, "matryoshka_batchtopk": 2}  # k=1 for TopK: the narrowest
AUX = 0.4  # AuxK's coefficient


def _transcoder(arch, d_in, d_out, skip, path="dense"):
    kwargs = {"k": K[arch]} if arch in K else {}
    if arch == "matryoshka_batchtopk":
        kwargs["matryoshka_widths"] = (3, D_SAE)
    sae = SAE(d_in=d_in, d_sae=D_SAE, d_out=d_out, architecture=arch, apply_b_dec_to_input=False,
              skip_connection=skip, dtype="float64", **kwargs)
    sae.sparse_width_limit = {"sparse": D_SAE, "dense": 0}[path]
    with torch.no_grad():  # nothing at zero, decoder rows of different norms
        for name, p in sae.named_parameters():
            p.normal_(0, 0.5)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.05, 0.4)
    return sae


def _pre(sae, x):
    return x @ sae.W_enc + (0 if sae.architecture == "gated" else sae.b_enc)


def _reference_acts(sae, x, training):
    """Dense activations [N, d_sae] from the architectures' definitions."""
    pre = _pre(sae, x)
    arch = sae.architecture
    if arch == "topk":
        top = pre.topk(sae.cfg.k, dim=1)
        return torch.zeros_like(pre).scatter(1, top.indices, top.values).relu()
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        if not training:
            return pre.relu() * (pre > sae.topk_threshold).to(pre.dtype)
        flat = pre.relu().flatten()
        keep = torch.zeros_like(flat).scatter(0, flat.topk(x.shape[0] * sae.cfg.k).indices, 1.0)
        return (flat * keep).reshape(pre.shape)
    if arch == "relu":
        return pre.relu()
    if arch == "jumprelu":
        return JumpReLU.apply(pre, sae.threshold, sae.cfg.jumprelu_bandwidth)
    gate = (pre + sae.b_gate > 0).to(pre.dtype)
    return gate * (pre * sae.r_mag.exp() + sae.b_mag).relu()


def _skip(sae, x):
    return x @ sae.W_skip.T if sae.W_skip is not None else 0


def _reference_losses(sae, x, y, dead, coefficient):
    """(output, mse, sparsity, aux, nested) in float64 from the definitions, the target y."""
    acts = _reference_acts(sae, x, training=True)
    out = acts @ sae.W_dec + sae.b_dec + _skip(sae, x)
    mse = (out - y).pow(2).sum(-1).mean()
    zero = x.new_zeros(())
    sparsity, aux, nested = zero, zero, None
    arch = sae.architecture
    pre = _pre(sae, x)
    if arch == "relu":
        sparsity = coefficient * (acts.abs() * sae.W_dec.norm(dim=1)).sum(-1).mean()
    elif arch == "jumprelu":
        sparsity = coefficient * Step.apply(pre, sae.threshold, sae.cfg.jumprelu_bandwidth).sum(-1).mean()
    elif arch == "gated":
        gate_acts = (pre + sae.b_gate).relu()
        sparsity = coefficient * (gate_acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
        aux = (gate_acts @ sae.W_dec + sae.b_dec + _skip(sae, x) - y).pow(2).sum(-1).mean()
    if arch in K and dead is not None:  # AuxK: the top k_aux dead latents reconstruct y - out
        k_aux = min(sae.d_out // 2, D_SAE)
        masked = torch.where(dead, pre, torch.full_like(pre, float("-inf")))
        top = masked.topk(min(k_aux, int(dead.sum())), dim=1)
        aux_acts = torch.zeros_like(pre).scatter(1, top.indices, top.values)  # raw, as fastsae.reference.aux_select
        residual = (y - out).detach()
        scale = min(1.0, int(dead.sum()) / k_aux)
        aux = AUX * scale * (aux_acts @ sae.W_dec - residual).pow(2).sum(-1).mean()
    if arch == "matryoshka_batchtopk":
        w = sae.cfg.matryoshka_widths[0]
        inner = acts[:, :w] @ sae.W_dec[:w] + sae.b_dec + _skip(sae, x)
        nested = (inner - y).pow(2).sum(-1).mean()
    return out, mse, sparsity, aux, nested


SHAPES = [(5, 3), (3, 6)]  # (d_in, d_out): narrower and wider outputs


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_matches_the_definition(arch, d_in, d_out, skip, path):
    sae = _transcoder(arch, d_in, d_out, skip, path).eval()
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        sae.topk_threshold.fill_(0.3)
    x = torch.randn(2, 3, d_in, dtype=torch.float64)  # 3-D: leading dims kept
    flat = x.reshape(-1, d_in)
    acts = _reference_acts(sae, flat, training=False)
    want = (acts @ sae.W_dec + sae.b_dec + _skip(sae, flat)).reshape(2, 3, d_out)
    with torch.no_grad():
        got = sae(x)
        assert got.shape == (2, 3, d_out)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae.encode(x), acts.reshape(2, 3, D_SAE), rtol=1e-12, atol=1e-12)
        # decode has no skip term (it needs the input), as SAELens' decode
        torch.testing.assert_close(sae.decode(sae.encode_sparse(x)), want - _skip(sae, flat).reshape(2, 3, d_out)
                                   if skip else want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_losses_and_gradients_match_the_definition(arch, d_in, d_out, skip, path):
    sae = _transcoder(arch, d_in, d_out, skip, path).train()
    x = torch.randn(2, 4, d_in, dtype=torch.float64)
    y = torch.randn(2, 4, d_out, dtype=torch.float64)
    dead = torch.tensor([True, False, True, True, False, False, True]) if arch in K else None
    coefficient = 0.3
    params = dict(sae.named_parameters())

    out = sae.training_forward(x, target=y, sparsity_coefficient=coefficient, dead_mask=dead, aux_coefficient=AUX)
    assert out.x_hat.shape == (2, 4, d_out)
    out.loss.backward()
    got_grads = {name: p.grad.clone() for name, p in params.items()}
    sae.zero_grad()

    ref_x_hat, mse, sparsity, aux, nested = _reference_losses(
        sae, x.reshape(-1, d_in), y.reshape(-1, d_out), dead, coefficient
    )
    torch.testing.assert_close(out.x_hat.reshape(-1, d_out), ref_x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mse_loss, mse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.sparsity_loss, sparsity, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-12, atol=1e-12)
    if nested is not None:
        torch.testing.assert_close(out.nested_loss, nested, rtol=1e-12, atol=1e-12)
    (mse + sparsity + aux + (nested if nested is not None else 0)).backward()
    for name, p in params.items():
        if name == "topk_threshold":
            continue
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got_grads[name], want, rtol=1e-10, atol=1e-12, msg=f"grad of {name}")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_transcoder_with_d_out_equal_to_d_in_and_no_target_is_the_sae(arch):
    """target=None trains against the input; an SAE with d_out unset is unchanged."""
    kwargs = {"k": K[arch]} if arch in K else {}
    sae = SAE(d_in=6, d_sae=D_SAE, architecture=arch, dtype="float64", **kwargs)
    assert sae.d_out == 6 and sae.W_skip is None and "d_out" not in sae.cfg.to_dict()
    x = torch.randn(5, 6, dtype=torch.float64)
    a = sae.training_forward(x, sparsity_coefficient=0.1)
    b = sae.training_forward(x, target=x, sparsity_coefficient=0.1)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.x_hat, b.x_hat)


def test_initialisation_shapes_and_skip_start():
    torch.manual_seed(1)
    sae = SAE(d_in=4, d_sae=9, d_out=6, architecture="relu", apply_b_dec_to_input=False, skip_connection=True)
    assert tuple(sae.W_enc.shape) == (4, 9) and tuple(sae.W_dec.shape) == (9, 6)
    assert tuple(sae.b_dec.shape) == (6,) and tuple(sae.W_skip.shape) == (6, 4)
    assert not sae.W_skip.any()  # zeros, as SAELens' SkipTranscoder and sparsify start it
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((9,), 0.1))
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.full((9,), 0.1))  # same norm rule
    assert [n for n, _ in sae.named_parameters()][-1] == "W_skip"
    plain = SAE(d_in=4, d_sae=9, architecture="relu")
    assert "W_skip" not in dict(plain.named_parameters()) and "W_skip" not in plain.state_dict()


# ---------------------------------------------------------------- bad input: one clear error each


def test_b_dec_on_the_input_is_refused_when_widths_differ():
    with pytest.raises(ValueError, match=r"apply_b_dec_to_input.*d_out=3 != d_in=5"):
        SAEConfig(d_in=5, d_sae=8, d_out=3, architecture="relu")
    SAEConfig(d_in=5, d_sae=8, d_out=5, architecture="relu")  # same width: allowed
    SAEConfig(d_in=5, d_sae=8, architecture="relu", skip_connection=True)  # sparsify's skip SAE


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_d_out_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="d_out: expected a positive integer"):
        SAEConfig(d_in=5, d_sae=8, d_out=bad, architecture="relu", apply_b_dec_to_input=False)


def test_skip_connection_must_be_a_bool():
    with pytest.raises(ValueError, match="skip_connection: expected a bool"):
        SAEConfig(d_in=5, d_sae=8, architecture="relu", skip_connection=1)


def test_mismatched_input_and_target_rows_and_widths():
    sae = SAE(d_in=5, d_sae=8, d_out=3, architecture="topk", k=2, apply_b_dec_to_input=False)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"target: expected one row per input row.*\(4,\).*\(6, 3\)"):
        sae.training_forward(x, target=torch.randn(6, 3))
    with pytest.raises(ValueError, match=r"target: expected shape \[\.\.\., 3\] \(d_out=3\)"):
        sae.training_forward(x, target=torch.randn(4, 5))
    with pytest.raises(ValueError, match="target: expected dtype"):
        sae.training_forward(x, target=torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="input: expected shape"):
        sae(torch.randn(4, 3))


def test_the_sharded_sae_refuses_transcoders():
    from fastsae.distributed import ShardedSAE

    cfg = SAEConfig(d_in=5, d_sae=8, d_out=3, architecture="topk", k=2, apply_b_dec_to_input=False)
    with pytest.raises(ValueError, match="latent sharding trains SAEs, not transcoders"):
        ShardedSAE(cfg)


# ---------------------------------------------------------------- a known sparse map


def test_a_transcoder_recovers_a_known_sparse_map():
    """y = sum_i f_i(x) g_i: x is a sparse mix of input directions u_i, and each active f_i writes
    a known output direction g_i (d_out != d_in). The trained decoder rows find the g_i."""
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, n_features, rows = 24, 16, 32, 24576
    u = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(n_features, d_out, generator=gen), dim=1)
    active = torch.rand(rows, n_features, generator=gen) < 3 / n_features
    f = active * (0.5 + torch.rand(rows, n_features, generator=gen))
    x, y = f @ u, f @ g
    sae = SAE(d_in=d_in, d_sae=n_features * 2, d_out=d_out, architecture="topk", k=4, apply_b_dec_to_input=False)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for epoch in range(4):
        for start in range(0, rows, 512):
            loss = sae.training_forward(x[start : start + 512], target=y[start : start + 512]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    found = fastsae.training.synthetic.mean_max_cosine(sae.W_dec, g)
    assert found >= 0.95, found


def test_eval_measures_transcoders_against_targets_and_refuses_one_without():
    """(The metrics themselves: tests/evals/test_eval_transcoder.py.) A transcoder given inputs
    alone is refused; a skip SAE (d_out unset) is measured against its input, skip term included."""
    from fastsae.evals import evaluate

    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))

    class Rows:
        d_in, chunk_sizes = 5, [10]

        def load_chunk(self, index):
            return x

    transcoder = SAE(d_in=5, d_sae=8, d_out=3, architecture="topk", k=2, apply_b_dec_to_input=False)
    with pytest.raises(ValueError, match=r"a transcoder \(d_out=3\) is measured against targets"):
        evaluate(transcoder, Rows())
    skip = SAE(d_in=5, d_sae=8, architecture="topk", k=2, skip_connection=True).eval()
    with torch.no_grad():
        skip.W_skip.copy_(torch.eye(5) * 0.5)
        mse = (skip(x) - x).pow(2).sum(1).mean().item()
    assert evaluate(skip, Rows())["mse"] == pytest.approx(mse, rel=1e-5)
