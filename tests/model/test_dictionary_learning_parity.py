"""fastsae with dictionary_learning's options against a float64 reference written out from
dictionary_learning's trainers (trainers/matryoshka_batch_top_k.py, batch_top_k.py, top_k.py):
the loss with its AuxK (aux_normalization="residual_variance") and the BatchTopK inference
threshold's sequence over steps (topk_threshold_start_step, topk_threshold_first_sets)."""

import pytest
import torch

from helpers.auxk import spread_parameters

import fastsae
from fastsae import SAE
from fastsae.training import TrainerConfig

D_IN, D_SAE = 24, 96
GROUP_SIZES = (10, 27, 59)
AUXK_ALPHA = 1 / 32


def _sae(architecture, k, path, **options):
    torch.manual_seed(0)
    if architecture == "matryoshka_batchtopk":
        options.setdefault("matryoshka_widths", tuple(torch.tensor(GROUP_SIZES).cumsum(0).tolist()))
    sae = SAE(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=k, dtype="float64",
              rescale_acts_by_decoder_norm=False, **options)  # dictionary_learning does not rescale
    sae.sparse_width_limit = {"sparse": D_SAE, "dense": 0}[path]
    return spread_parameters(sae)


def _reference_loss(p, x, k, batch, group_sizes, group_weights, dead):
    """dictionary_learning's trainer loss in float64: f from the ReLU'd pre-activations (the
    batch's k N largest, or each row's k largest for TopK), the groups' running reconstruction
    from b_dec with each level's MSE times its weight, averaged over levels; plus auxk_alpha times
    the AuxK loss: the top min(d_in // 2, n_dead) dead latents' ReLU'd pre-activations decoded
    without b_dec against the detached residual, over the residual's variance (nan -> 0).
    Returns (loss, f)."""
    post = ((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
    if batch:
        top = post.flatten().topk(k * x.shape[0], sorted=False)
        f = torch.zeros_like(post.flatten()).scatter(-1, top.indices, top.values).reshape(post.shape)
    else:
        top = post.topk(k, dim=-1, sorted=False)
        f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    recon, losses = torch.zeros_like(x) + p["b_dec"], []
    for acts, w_dec, weight in zip(f.split(group_sizes, 1), p["W_dec"].split(group_sizes, 0), group_weights):
        recon = recon + acts @ w_dec
        losses.append((x - recon).pow(2).sum(-1).mean() * weight)
    loss = torch.stack(losses).mean()
    n_dead = int(dead.sum())
    if n_dead:
        residual = (x - recon).detach()
        aux_acts, aux_indices = torch.where(dead[None], post, -torch.inf).topk(min(D_IN // 2, n_dead), sorted=False)
        aux_recon = torch.zeros_like(post).scatter(-1, aux_indices, aux_acts) @ p["W_dec"]
        l2_aux = (residual - aux_recon).pow(2).sum(-1).mean()
        spread = (residual - residual.mean(0)[None, :]).pow(2).sum(-1).mean()
        loss = loss + AUXK_ALPHA * (l2_aux / spread).nan_to_num(0.0)
    return loss, f


def _reference_threshold(threshold, f, beta):
    """dictionary_learning's update_threshold (float64 here; it keeps the threshold in float32)."""
    active = f[f > 0]
    smallest = active.min() if active.numel() else torch.zeros((), dtype=f.dtype)
    return smallest if threshold < 0 else beta * threshold + (1 - beta) * smallest


CASES = [  # architecture, k, group weights (dictionary_learning's default: 1 / levels each)
    ("matryoshka_batchtopk", 4, (0.5, 0.2, 0.3)),
    ("matryoshka_batchtopk", 1, (1 / 3, 1 / 3, 1 / 3)),
    ("batchtopk", 4, (1.0,)),
    ("topk", 3, (1.0,)),
]


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("n_dead", [0, 5, 60])
@pytest.mark.parametrize("architecture,k,group_weights", CASES)
def test_loss_with_auxk_equals_dictionary_learnings(architecture, k, group_weights, n_dead, path):
    sae = _sae(architecture, k, path)
    sizes = GROUP_SIZES if architecture == "matryoshka_batchtopk" else (D_SAE,)
    if architecture == "matryoshka_batchtopk":
        sae.cfg.matryoshka_weights = tuple(w / len(sizes) for w in group_weights)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
    torch.manual_seed(7)
    x = torch.randn(45, D_IN, dtype=torch.float64)
    out = sae.training_forward(x, dead_mask=dead, aux_coefficient=AUXK_ALPHA, aux_normalization="residual_variance")
    p = {n: getattr(sae, n).detach().clone().requires_grad_() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    want, _ = _reference_loss(p, x, k, architecture != "topk", list(sizes), group_weights, dead)
    torch.testing.assert_close(out.loss, want, rtol=1e-9, atol=1e-10)
    if n_dead:
        assert out.aux_loss > 0
    out.loss.backward()
    want.backward()
    for name in p:
        torch.testing.assert_close(getattr(sae, name).grad, p[name].grad, rtol=1e-9, atol=1e-10, msg=name)


def test_residual_variance_differs_from_the_default_only_where_asked():
    """The default AuxK is still sparsify's (raw pre-activations, times min(1, n_dead / k_aux))."""
    sae = _sae("batchtopk", 4, "sparse")
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:5] = True
    x = torch.randn(30, D_IN, dtype=torch.float64)
    default = sae.training_forward(x, dead_mask=dead).aux_loss
    assert default == sae.training_forward(x, dead_mask=dead, aux_normalization="dead_fraction").aux_loss
    assert default != sae.training_forward(x, dead_mask=dead, aux_normalization="residual_variance").aux_loss
    with pytest.raises(ValueError, match="aux_normalization: expected one of"):
        sae.training_forward(x, aux_normalization="openai")
    with pytest.raises(ValueError, match="aux_normalization: expected one of"):
        TrainerConfig(aux_normalization="openai")
    with pytest.raises(ValueError, match="data parallel only"):
        TrainerConfig(aux_normalization="residual_variance", shard_latents=True)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("architecture", ["matryoshka_batchtopk", "batchtopk"])
def test_threshold_sequence_equals_dictionary_learnings(architecture, path):
    beta, start = 0.9, 2
    sae = _sae(architecture, 4, path, topk_threshold_start_step=start, topk_threshold_first_sets=True,
               topk_threshold_lr=1 - beta)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    threshold = torch.tensor(-1.0, dtype=torch.float64)
    sizes = GROUP_SIZES if architecture == "matryoshka_batchtopk" else (D_SAE,)
    weights = (1 / len(sizes),) * len(sizes)
    if architecture == "matryoshka_batchtopk":
        sae.cfg.matryoshka_weights = tuple(w / len(sizes) for w in weights)
    torch.manual_seed(11)
    for step in range(7):
        x = torch.randn(40, D_IN, dtype=torch.float64)
        p = {n: getattr(sae, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        _, f = _reference_loss(p, x, 4, True, list(sizes), weights, torch.zeros(D_SAE, dtype=torch.bool))
        if step > start:  # dictionary_learning: `if step > self.threshold_start_step`
            threshold = _reference_threshold(threshold, f, beta)
        out = sae.training_forward(x, aux_normalization="residual_variance")
        torch.testing.assert_close(sae.topk_threshold, threshold, rtol=1e-12, atol=0, msg=f"step {step}")
        assert int(sae.threshold_batches_seen) == step + 1
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert threshold > 0
    # Inference is dictionary_learning's encode(use_threshold=True): ReLU'd pre-activations above it.
    sae.eval()
    x = torch.randn(20, D_IN, dtype=torch.float64)
    post = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    torch.testing.assert_close(sae.encode(x), post * (post > threshold), rtol=1e-12, atol=1e-12)


def test_threshold_count_is_a_buffer_that_checkpoints_keep(tmp_path):
    sae = _sae("batchtopk", 4, "sparse", topk_threshold_start_step=1, topk_threshold_first_sets=True)
    assert float(sae.topk_threshold) == -1.0  # unset, as dictionary_learning's
    x = torch.randn(30, D_IN, dtype=torch.float64)
    sae.training_forward(x)
    sae.training_forward(x)
    assert float(sae.topk_threshold) == -1.0 and int(sae.threshold_batches_seen) == 2
    state = {name: t.clone() for name, t in sae.state_dict().items()}  # what checkpoints and roll-backs hold
    sae.training_forward(x)
    assert float(sae.topk_threshold) > 0 and int(sae.threshold_batches_seen) == 3
    sae.load_state_dict(state)
    assert float(sae.topk_threshold) == -1.0 and int(sae.threshold_batches_seen) == 2
    # Saved files keep the options and the threshold; the count starts afresh.
    sae.training_forward(x)
    sae.save(tmp_path / "sae")
    loaded = fastsae.load(tmp_path / "sae")
    assert loaded.cfg.topk_threshold_start_step == 1 and loaded.cfg.topk_threshold_first_sets
    assert float(loaded.topk_threshold) == float(sae.topk_threshold) and int(loaded.threshold_batches_seen) == 0
    # Without the options nothing changes: no count, the threshold starts at 0.
    plain = _sae("batchtopk", 4, "sparse")
    assert "threshold_batches_seen" not in plain.state_dict() and float(plain.topk_threshold) == 0.0


@pytest.mark.parametrize("options,match", [
    (dict(architecture="topk", topk_threshold_start_step=3), "topk_threshold_start_step applies to batchtopk and matryoshka_batchtopk"),
    (dict(architecture="batchtopk", topk_threshold_start_step=-1), "expected a non-negative integer or None"),
    (dict(architecture="batchtopk", topk_threshold_first_sets=1), "topk_threshold_first_sets: expected a bool"),
])
def test_bad_threshold_options_say_what_was_expected(options, match):
    with pytest.raises(ValueError, match=match):
        SAE(d_in=8, d_sae=16, k=2, **options)


def test_trainer_resumes_dictionary_learnings_rules_as_an_uninterrupted_run(tmp_path):
    """With both options the trainer's run, stopped and resumed, ends as the whole run: the
    threshold's batch count is in the checkpoint, and AuxK's rule in trainer_cfg.json."""
    from helpers.training import small_cfg, small_data

    from fastsae.training import Trainer

    def sae():
        torch.manual_seed(0)
        return SAE(d_in=16, d_sae=64, architecture="matryoshka_batchtopk", k=4, matryoshka_widths=(8, 24, 64),
                   topk_threshold_start_step=3, topk_threshold_first_sets=True, topk_threshold_lr=0.1)

    cfg = dict(total_tokens=256 * 10, log_every_steps=3, dead_after_tokens=256, aux_normalization="residual_variance")
    whole = Trainer(sae(), small_data(), small_cfg(**cfg), tmp_path / "whole")
    whole.train()
    part = Trainer(sae(), small_data(), small_cfg(**cfg), tmp_path / "part")
    part.train(max_steps=5)
    resumed = Trainer.resume(tmp_path / "part")
    assert resumed.cfg.aux_normalization == "residual_variance"
    resumed.train()
    assert int(resumed.sae.threshold_batches_seen) == 10 and float(resumed.sae.topk_threshold) > 0
    for (name, a), b in zip(whole.sae.state_dict().items(), resumed.sae.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_cli_flag_sets_aux_normalization():
    from fastsae.cli import build_parser
    from fastsae.cli.train import build_run
    from fastsae.training.synthetic import SyntheticActivations

    data = SyntheticActivations(d_in=16, n_features=32, l0=2, seed=0)
    args = ["train", "--data", "synthetic", "--architecture", "matryoshka_batchtopk", "--d-sae", "64"]
    assert build_run(build_parser().parse_args(args), data)[1].aux_normalization == "dead_fraction"
    _, cfg = build_run(build_parser().parse_args([*args, "--aux-normalization", "residual_variance"]), data)
    assert cfg.aux_normalization == "residual_variance"
