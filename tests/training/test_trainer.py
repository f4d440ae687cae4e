"""The trainer: schedules, initialisation, decoder handling, dead latents, bad data, metrics,
atomic checkpoints and exact resumption, and feature recovery on a small synthetic problem."""

import json

import pytest
import torch
from helpers.training import PoisonedSource, small_cfg, small_data

import fastsae
from fastsae.training import (
    BadDataError,
    SyntheticActivations,
    Trainer,
    TrainerConfig,
    fold_input_scale,
    geometric_median,
    latest_checkpoint,
    read_metrics,
)
from fastsae.training import checkpoint as ckpt
from fastsae.training import trainer as trainer_module

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")


def _sae(arch, d_in=16, d_sae=64, **kw):
    k = {"k": 4} if arch in ("topk", "batchtopk") else {}
    return fastsae.SAE(d_in=d_in, d_sae=d_sae, architecture=arch, **k, **kw)


_data, _cfg = small_data, small_cfg


# ---------------------------------------------------------------- pieces


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    cfg = TrainerConfig(total_tokens=100 * 10, batch_size=10, lr=1.0, lr_warmup_steps=10, lr_decay_fraction=0.2)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:80])
    assert lrs[80] == pytest.approx(1.0) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    coef = TrainerConfig(total_tokens=1000, batch_size=10, sparsity_coefficient=2.0, sparsity_warmup_fraction=0.1)
    assert [coef.sparsity_coefficient_at(s) for s in (0, 4, 9, 10, 99)] == pytest.approx([0.2, 1.0, 2.0, 2.0, 2.0])


def test_trainer_config_round_trips_and_rejects_bad_values(tmp_path):
    cfg = _cfg(adam_betas=(0.8, 0.99), data={"kind": "synthetic"})
    cfg.save(tmp_path)
    assert TrainerConfig.load(tmp_path) == cfg
    with pytest.raises(ValueError, match="batch_size"):
        TrainerConfig(batch_size=0)
    with pytest.raises(ValueError, match="dead_strategy"):
        TrainerConfig(dead_strategy="sometimes")
    with pytest.raises(ValueError, match="unknown keys"):
        TrainerConfig.from_dict({"learning_rate": 1.0})


def test_geometric_median_minimises_the_sum_of_distances():
    points = torch.randn(300, 5, dtype=torch.float64)
    points[:30] += 50.0  # outliers drag the mean, not the median
    median = geometric_median(points)

    def cost(y):
        return (points - y).norm(dim=1).sum().item()

    assert cost(median) < cost(points.mean(0))
    for _ in range(20):  # no nearby point does better
        assert cost(median) <= cost(median + 1e-3 * torch.randn(5, dtype=torch.float64)) + 1e-9
    assert median.norm() < points.mean(0).norm()


@pytest.mark.parametrize("arch", ARCHS + ("topk_rescaled",))
def test_folding_the_input_scale_gives_raw_outputs(arch):
    rescale = arch == "topk_rescaled"
    sae = _sae("topk" if rescale else arch, rescale_acts_by_decoder_norm=rescale)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if arch == "batchtopk":
            sae.topk_threshold.fill_(0.05)
    sae.eval()
    x = torch.randn(32, 16)
    folded = fold_input_scale(sae, 2.5)
    torch.testing.assert_close(folded(x), sae(2.5 * x) / 2.5, rtol=1e-5, atol=1e-5)
    assert torch.equal(folded.encode(x) > 0, sae.encode(2.5 * x) > 0)


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match=r"width d_in=16.*got width 8"):
        Trainer(_sae("relu"), _data(d_in=8), _cfg())


# ---------------------------------------------------------------- training behaviour


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_trains(arch):
    data = _data()
    trainer = Trainer(_sae(arch), data, _cfg(total_tokens=256 * 30, log_every_steps=5))
    before = data.load_chunk(0)[:256]
    with torch.no_grad():
        trainer._initialize()
        fvu_before = ((trainer.sae(before * trainer.input_scale) - before * trainer.input_scale).pow(2).sum()
                      / (before * trainer.input_scale - before.mean(0) * trainer.input_scale).pow(2).sum()).item()
    result = trainer.train()
    assert result["step"] == 30 and result["tokens"] == 30 * 256
    assert result["fvu"] < 0.8 * fvu_before
    assert 0 < result["l0"] < 64
    # normalisation: E||x||^2 = d_in after scaling
    sample = torch.cat([data.load_chunk(i) for i in range(2)])
    assert (sample * trainer.input_scale).pow(2).sum(1).mean().item() == pytest.approx(16, rel=0.1)


def test_b_dec_starts_at_the_geometric_median():
    data = _data()
    trainer = Trainer(_sae("relu"), data, _cfg(normalize_activations=False))
    trainer._initialize()
    sample = trainer.stream.read(0, 1024)
    torch.testing.assert_close(trainer.sae.b_dec, geometric_median(sample), rtol=1e-5, atol=1e-6)


def test_unit_norm_decoder_rows_stay_unit_and_thresholds_stay_positive():
    trainer = Trainer(_sae("relu", decoder_norm="unit_norm"), _data(), _cfg(total_tokens=256 * 5))
    trainer.train()
    torch.testing.assert_close(trainer.sae.W_dec.norm(dim=1), torch.ones(64), rtol=1e-5, atol=1e-5)

    sae = _sae("jumprelu", jumprelu_init_threshold=1e-5)
    trainer = Trainer(sae, _data(), _cfg(total_tokens=256 * 5, lr=0.1, sparsity_coefficient=0.0,
                                         jumprelu_min_threshold=1e-4))
    trainer.train()
    assert (sae.threshold >= 1e-4).all()


def test_resampling_reinitialises_dead_latents_and_their_adam_state():
    trainer = Trainer(_sae("relu"), _data(), _cfg(total_tokens=256 * 4))
    trainer.train(max_steps=3)
    sae = trainer.sae
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[1, 5, 9]] = True
    trainer.tokens_since_fired[dead] = trainer.cfg.dead_after
    trainer.tokens_since_fired[~dead] = 0
    enc_before, dec_before = sae.W_enc.detach().clone(), sae.W_dec.detach().clone()
    n = trainer.resample_dead_latents()
    assert n == 3
    assert torch.equal(sae.W_dec[~dead], dec_before[~dead]) and torch.equal(sae.W_enc[:, ~dead], enc_before[:, ~dead])
    assert not torch.equal(sae.W_dec[dead], dec_before[dead])
    assert (sae.b_enc[dead] == 0).all()
    # the decoder row and encoder row point the same way, at the alive rows' scale
    cos = torch.nn.functional.cosine_similarity(sae.W_dec[dead], sae.W_enc[:, dead].T, dim=1)
    torch.testing.assert_close(cos, torch.ones(3))
    alive_enc = sae.enc_weight[~dead].norm(dim=1).mean()
    torch.testing.assert_close(sae.enc_weight[dead].norm(dim=1), (0.2 * alive_enc).expand(3))
    for param, latent_dim in ((sae.W_dec, 0), (sae.W_enc, 1), (sae.b_enc, 0)):
        state = trainer.optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            moved = state[key].movedim(latent_dim, 0)
            assert (moved[dead] == 0).all() and (moved[~dead] != 0).any()
    assert (trainer.tokens_since_fired[dead] == 0).all()


def test_resampling_draws_badly_reconstructed_inputs():
    # One direction the SAE cannot reconstruct: every resampled latent should point along it.
    trainer = Trainer(_sae("relu"), _data(), _cfg(total_tokens=256 * 4, resample_sample_rows=512))
    trainer.train(max_steps=2)
    hard = torch.nn.functional.normalize(torch.randn(16), dim=0)
    real_read = trainer.stream.read

    def read(position, n):
        rows = real_read(position, n) * 0.0 + trainer.sae.b_dec.detach() / trainer.input_scale
        rows[7] += 40.0 * hard  # a single row with a huge loss
        return rows

    trainer.stream.read = read
    trainer.tokens_since_fired[:] = 0
    trainer.tokens_since_fired[[0, 1]] = trainer.cfg.dead_after
    trainer.resample_dead_latents()
    cos = torch.nn.functional.cosine_similarity(trainer.sae.W_dec[[0, 1]], hard.expand(2, 16), dim=1)
    torch.testing.assert_close(cos, torch.ones(2), rtol=1e-4, atol=1e-4)


def test_auxk_gets_the_dead_latents(monkeypatch):
    trainer = Trainer(_sae("topk"), _data(), _cfg(total_tokens=256 * 3, dead_after_tokens=256))
    seen = []
    real = trainer.sae.training_forward

    def spy(x, **kw):
        seen.append(None if kw["dead_mask"] is None else kw["dead_mask"].clone())
        out = real(x, **kw)
        seen.append(out.aux_loss.item())
        return out

    monkeypatch.setattr(trainer.sae, "training_forward", spy)
    trainer.tokens_since_fired[:10] = 10_000  # 10 latents dead from the start
    trainer.train()
    mask = seen[0]
    assert mask is not None and mask[:10].all() and seen[1] > 0
    assert Trainer(_sae("jumprelu"), _data(), _cfg()).dead_strategy == "none"
    with pytest.raises(ValueError, match="auxk"):
        Trainer(_sae("relu"), _data(), _cfg(dead_strategy="auxk"))


def test_dead_latent_counters_count_tokens_since_firing():
    trainer = Trainer(_sae("topk"), _data(), _cfg(total_tokens=256 * 4))
    trainer.train()
    counts = trainer.tokens_since_fired
    assert counts.min() == 0 and counts.max() <= 4 * 256
    assert set(counts.unique().tolist()) <= {0, 256, 512, 768, 1024}


# ---------------------------------------------------------------- bad data


_PoisonedSource = PoisonedSource


def _poisoned_trainer(tmp_path, bad_batches, **kw):
    # One chunk = one batch = one shuffling buffer, so batch b is chunk order[b] of epoch 0.
    data = _PoisonedSource(d_in=16, n_features=48, l0=3, n_rows=256 * 16, seed=1, chunk_rows=256)
    cfg = _cfg(total_tokens=256 * 10, shuffle_buffer_rows=256, init_sample_rows=256, **kw)
    trainer = Trainer(_sae("relu"), data, cfg, tmp_path / "run")
    order = [g[0] for g in trainer.stream._epoch_plan(0)[0]]
    data.poisoned = {order[b] for b in bad_batches}
    return trainer


def test_a_nan_batch_is_refused_naming_the_step(tmp_path, capsys):
    trainer = _poisoned_trainer(tmp_path, bad_batches=[3])
    result = trainer.train()
    assert result["step"] == 10 and result["tokens"] == 10 * 256
    assert trainer.position == 11 * 256
    err = capsys.readouterr().err
    assert "step 4: the batch holds 2 NaN/Inf values" in err and "refused" in err
    # A source without files names its chunk and the rows within it (rows 3 and 5 of the chunk).
    chunk = [g[0] for g in trainer.stream._epoch_plan(0)[0]][3]
    assert f"in 2 rows: chunk {chunk} rows 3, 5 (stream rows " in err
    assert result["refused_batches"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.sae.parameters())


def test_bad_batches_in_a_row_stop_with_the_last_good_checkpoint(tmp_path):
    trainer = _poisoned_trainer(tmp_path, bad_batches=range(3, 16), max_bad_batches=3, checkpoint_every_steps=2)
    with pytest.raises(BadDataError, match=r"stopped at step 4: 3 batches in a row.*step_000000002"):
        trainer.train()
    folder = latest_checkpoint(tmp_path / "run")
    assert folder.name == "step_000000002"
    loaded = fastsae.load(folder)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert Trainer.resume(tmp_path / "run", trainer.data).step == 2


# ---------------------------------------------------------------- checkpoints, metrics, resume


def test_checkpoint_layout_and_metrics(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(_sae("topk"), _data(), _cfg(), out)
    result = trainer.train()
    folder = result["checkpoint"]
    assert folder == out / "checkpoints" / "step_000000012"
    for name in ckpt.REQUIRED_FILES:
        assert (folder / name).is_file()
    cfg_json = json.loads((folder / "cfg.json").read_text())
    assert cfg_json["architecture"] == "topk" and cfg_json["d_in"] == 16
    assert TrainerConfig.load(folder).data == trainer.data.describe()
    # The saved SAE runs on raw activations (the normalisation folded in).
    loaded = fastsae.load(folder)
    x = trainer.data.load_chunk(0)[:64]
    with torch.no_grad():
        expected = trainer.sae.eval()(x * trainer.input_scale) / trainer.input_scale
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    for key in ("mse", "fvu", "l0", "dead_fraction", "tokens_per_s", "lr", "sparsity_coefficient", "aux_loss"):
        assert key in rows[-1]
    assert rows[-1]["l0"] == pytest.approx(4.0)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_sae("topk"), _data(), _cfg(), out)
    Trainer(_sae("topk"), _data(), _cfg(), out, overwrite=True)
    assert latest_checkpoint(out) is None and read_metrics(out) == []


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_resume_matches_an_uninterrupted_run(tmp_path, arch):
    # relu resamples (RNG, Adam resets) and topk uses AuxK inside the interrupted stretch.
    cfg = dict(total_tokens=256 * 14, log_every_steps=3, resample_every_steps=4, dead_after_tokens=256)
    torch.manual_seed(0)
    whole = Trainer(_sae(arch), _data(), _cfg(**cfg), tmp_path / "whole")
    whole.train()

    torch.manual_seed(0)  # the same initial SAE
    part = Trainer(_sae(arch), _data(), _cfg(**cfg), tmp_path / "part")
    part.train(max_steps=7)  # stops mid metrics window, writes a checkpoint
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "torn": ')  # rows written after the checkpoint, then a kill mid-line
    resumed = Trainer.resume(tmp_path / "part")
    assert resumed.step == 7 and resumed.position == 7 * 256
    resumed.train()

    for (name, a), b in zip(whole.sae.state_dict().items(), resumed.sae.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(whole.tokens_since_fired, resumed.tokens_since_fired)
    timing = {"tokens_per_s", "elapsed_s"}
    rows_whole = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "whole")]
    rows_part = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "part")]
    assert rows_whole == rows_part
    assert [r["step"] for r in rows_part] == [3, 6, 9, 12, 14]


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(_sae("relu"), _data(), _cfg(), out)
    trainer.train(max_steps=4)
    good = latest_checkpoint(out)
    assert good.name == "step_000000004"
    good_weights = (good / "sae_weights.safetensors").read_bytes()

    real_save = torch.save

    def failing_save(obj, path, *a, **kw):
        if str(path).endswith(ckpt.STATE_PT):
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(trainer_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        trainer.train(max_steps=3)
    monkeypatch.setattr(trainer_module.torch, "save", real_save)
    assert latest_checkpoint(out) == good
    assert (good / "sae_weights.safetensors").read_bytes() == good_weights
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    fastsae.load(good)

    # A hard kill leaves a half-written temporary folder: ignored, then cleaned by resume.
    stale = out / "checkpoints" / ".tmp-step_000000009-dead"
    stale.mkdir()
    (stale / "cfg.json").write_text("{")
    resumed = Trainer.resume(out)
    assert resumed.step == 4 and not stale.exists()
    assert resumed.train()["step"] == 12


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Trainer.resume(tmp_path)


# ---------------------------------------------------------------- quality (small scale)


@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("seed", [0, 1])
def test_small_synthetic_features_are_recovered(arch, seed):
    # 32 features in 16 dims, two on per row: both SAEs find nearly all of them. (ReLU + L1 also
    # keeps a few small activations, so its L0 sits above the truth; TopK's is k by construction.)
    data = SyntheticActivations(d_in=16, n_features=32, l0=2, n_rows=1 << 15, seed=seed, chunk_rows=4096,
                                min_magnitude=0.2)
    torch.manual_seed(seed)
    sae = fastsae.SAE(d_in=16, d_sae=64, architecture=arch, **({"k": 2} if arch == "topk" else {}))
    cfg = _cfg(total_tokens=45_000, batch_size=256, lr=8e-3, sparsity_coefficient=3.0, log_every_steps=50,
               shuffle_buffer_rows=8192, seed=seed)
    trainer = Trainer(sae, data, cfg)
    result = trainer.train()
    score = data.score(trainer.sae)
    assert score >= 0.95, (score, result)
    assert 1.5 <= result["l0"] <= 6.0
    assert result["fvu"] < 0.4


def test_timed_checkpoints_replace_each_other_and_metrics_follow_the_schedule(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    writes = []
    real_write = ckpt.write_checkpoint

    def counting_write(out_dir, step, write_files, keep=1):
        writes.append(step)
        return real_write(out_dir, step, write_files, keep)

    monkeypatch.setattr(trainer_module.ckpt, "write_checkpoint", counting_write)
    cfg = _cfg(total_tokens=256 * 6, checkpoint_every_seconds=1e-9, progress=True, log_every_steps=3)
    trainer = Trainer(_sae("relu"), _data(), cfg, out)
    trainer.train()
    assert writes == [1, 2, 3, 4, 5, 6]  # one per step at this cadence, the final one not repeated
    assert [step for step, _ in ckpt.list_checkpoints(out)] == [6]
    rows = read_metrics(out)
    for row in rows:
        assert row["lr"] == pytest.approx(cfg.lr_at(row["step"] - 1))
        assert row["sparsity_coefficient"] == pytest.approx(cfg.sparsity_coefficient_at(row["step"] - 1))
    bar = capsys.readouterr().err  # the progress bar shows the logged figures
    last = rows[-1]
    assert f"fvu {last['fvu']:.3f}" in bar and f"l0 {last['l0']:.1f}" in bar and "dead" in bar


@pytest.mark.parametrize("paired", [False, True])
def test_step_metrics_with_a_reused_scratch_are_the_same_bits(paired):
    """The metrics window centres each batch in one reused tensor; the figures are those computed
    without it (a transcoder's targets are a strided slice of its rows)."""
    from fastsae.training.metrics import MetricsWindow, step_metrics

    torch.manual_seed(0)
    sae = fastsae.SAE(d_in=24, d_sae=96, architecture="topk", k=4)
    window = MetricsWindow("cpu")
    total = torch.zeros(7, dtype=torch.float64)
    for _ in range(3):
        rows = torch.randn(100, 48 if paired else 24) * 3 + 1
        x32 = rows[:, 24:] if paired else rows
        out = sae.training_forward(x32.contiguous())
        l0 = torch.tensor(4.0)
        expected = step_metrics(out, x32, l0)
        window.add_step(out, x32, l0, 1.0, 100)
        total += expected.double()
        assert torch.equal(window.sums, total)
        assert torch.equal(step_metrics(out, x32, l0, torch.empty(100, 24)), expected)
        assert expected[2] > 0  # the FVU's variance is the batch's own
    assert window.steps == 3
