"""The trainer at device speed: compute dtypes over float32 master weights, read-ahead of batches,
no host synchronisation between log steps, and the roll-back rule for non-finite steps."""

import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers.training import PoisonedSource, small_cfg, small_data

import fastsae
from fastsae.training import SyntheticActivations, Trainer, TrainerConfig, read_metrics
from fastsae.training.data import ShuffledStream
from fastsae.training.prefetch import BatchPrefetcher
from fastsae.training.trainer import FLOAT16_LOSS_SCALE

TRAINING_DIR = str(Path(fastsae.__file__).parent / "training")


def _sae(arch="topk", d_in=16, d_sae=64):
    return fastsae.SAE(d_in=d_in, d_sae=d_sae, architecture=arch, **({"k": 4} if arch in ("topk", "batchtopk") else {}))


_data, _cfg = small_data, small_cfg


# ---------------------------------------------------------------- dtype


def test_dtype_defaults_to_float32_on_the_cpu_and_bad_values_are_refused():
    trainer = Trainer(_sae(), _data(), _cfg())
    assert trainer.cfg.dtype == "float32" and trainer.compute_sae is trainer.sae
    assert TrainerConfig(dtype="torch.bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"dtype: expected one of .*'float64'"):
        TrainerConfig(dtype="float64")
    with pytest.raises(ValueError, match=r"SAE in float32.*bfloat16.*sae.float\(\)"):
        Trainer(fastsae.SAE(d_in=16, d_sae=64, architecture="topk", k=4, dtype="bfloat16"), _data(), _cfg())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_keeps_float32_masters_and_computes_in_the_dtype(dtype, monkeypatch):
    trainer = Trainer(_sae("relu"), _data(), _cfg(dtype=dtype, total_tokens=256 * 8))
    compute = trainer.compute_sae
    assert compute is not trainer.sae and compute.dtype == getattr(torch, dtype)
    seen = []
    real = compute.training_forward

    def spy(x, **kw):
        seen.append(x.dtype)
        # The twin runs on the masters' weights rounded to its dtype.
        assert torch.equal(compute.W_enc, trainer.sae.W_enc.to(compute.dtype))
        return real(x, **kw)

    monkeypatch.setattr(compute, "training_forward", spy)
    before = trainer.sae.W_dec.detach().clone()
    result = trainer.train()
    assert seen and set(seen) == {getattr(torch, dtype)}
    assert all(p.dtype == torch.float32 for p in trainer.sae.parameters())
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    assert not torch.equal(before, trainer.sae.W_dec) and result["fvu"] < 1.0
    # Updates smaller than the 16-bit spacing of the weights still accumulate in the masters.
    assert not torch.equal(trainer.sae.W_dec, trainer.sae.W_dec.to(compute.dtype).float())


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_float16_gradients_are_unscaled_into_the_masters(monkeypatch, clip):
    """The masters' gradients are the float16 twin's over the loss scale, then (with clipping)
    clipped as clip_grad_norm_ clips them: on the unscaled gradients, never the scaled ones."""
    trainer = Trainer(_sae("topk"), _data(), _cfg(dtype="float16", total_tokens=256 * 2, grad_clip_norm=clip))
    grads = []
    real_step = trainer.optimizer.step

    def spy_step(*a, **kw):
        scale = kw.get("grad_scale", torch.tensor(1.0))  # the chunked CPU Adam applies the clip coefficient
        grads.append([p.grad * scale for p in trainer.sae.parameters()])
        return real_step(*a, **kw)

    monkeypatch.setattr(trainer.optimizer, "step", spy_step)
    trainer.train(max_steps=1)
    # The same step by hand: loss times the scale, then the float16 gradient over the scale.
    twin = trainer.compute_sae
    assert twin.W_dec.grad is not None
    expected = [torch.nn.Parameter(torch.zeros(p.shape)) for p in twin.parameters()]
    for e, p in zip(expected, twin.parameters()):
        e.grad = p.grad.float() / FLOAT16_LOSS_SCALE
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(expected, clip)
        assert norm > clip, "the test's gradients are not large enough to be clipped"
    for got, want in zip(grads[0], expected):
        torch.testing.assert_close(got, want.grad, rtol=0, atol=0)


def test_bfloat16_recovers_the_synthetic_features_as_float32_does():
    # The recovery problem of test_trainer.py (TopK, 32 features in 16 dims, 2 on per row).
    scores = {}
    for dtype in ("float32", "bfloat16"):
        data = SyntheticActivations(d_in=16, n_features=32, l0=2, n_rows=1 << 15, seed=0, chunk_rows=4096,
                                    min_magnitude=0.2)
        torch.manual_seed(0)
        sae = fastsae.SAE(d_in=16, d_sae=64, architecture="topk", k=2)
        cfg = _cfg(total_tokens=45_000, batch_size=256, lr=8e-3, log_every_steps=50, shuffle_buffer_rows=8192,
                   dtype=dtype)
        trainer = Trainer(sae, data, cfg)
        trainer.train()
        scores[dtype] = data.score(trainer.export_sae())
    assert scores["float32"] >= 0.95, scores
    assert scores["bfloat16"] >= scores["float32"] - 0.005, scores


def test_checkpoints_record_the_dtype_load_as_asked_and_resume_bit_exactly(tmp_path):
    cfg = dict(total_tokens=256 * 10, log_every_steps=3, dead_after_tokens=256, dtype="bfloat16")
    torch.manual_seed(0)
    whole = Trainer(_sae("topk"), _data(), _cfg(**cfg), tmp_path / "whole")
    whole.train()
    torch.manual_seed(0)
    part = Trainer(_sae("topk"), _data(), _cfg(**cfg), tmp_path / "part")
    folder = part.train(max_steps=5)["checkpoint"]
    assert json.loads((folder / "trainer_cfg.json").read_text())["dtype"] == "bfloat16"
    cfg_json = json.loads((folder / "cfg.json").read_text())
    assert cfg_json["dtype"] == "float32" and cfg_json["metadata"]["trained_dtype"] == "bfloat16"
    assert fastsae.load(folder).dtype == torch.float32  # the master weights, losslessly
    as_bf16 = fastsae.load(folder, dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16.W_dec, fastsae.load(folder).W_dec.to(torch.bfloat16))

    resumed = Trainer.resume(tmp_path / "part")
    assert resumed.cfg.dtype == "bfloat16" and resumed.compute_sae.dtype == torch.bfloat16
    resumed.train()
    for (name, a), b in zip(whole.sae.state_dict().items(), resumed.sae.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(whole.tokens_since_fired, resumed.tokens_since_fired)
    timing = {"tokens_per_s", "elapsed_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "part"))

    # Asked for another dtype, a resumed run computes in it.
    torch.manual_seed(0)
    again = Trainer(_sae("topk"), _data(), _cfg(**cfg), tmp_path / "again")
    again.train(max_steps=5)
    as_fp32 = Trainer.resume(tmp_path / "again", dtype="float32")
    assert as_fp32.cfg.dtype == "float32" and as_fp32.compute_sae is as_fp32.sae
    assert as_fp32.train()["step"] == 10


# ---------------------------------------------------------------- no host synchronisation


@pytest.mark.parametrize("arch,dtype", [("topk", "float32"), ("relu", "float32"), ("topk", "bfloat16")])
def test_steps_between_log_steps_read_nothing_back_from_the_device(monkeypatch, arch, dtype):
    cfg = _cfg(total_tokens=256 * 16, log_every_steps=8, dead_after_tokens=256, resample_every_steps=1000, dtype=dtype)
    trainer = Trainer(_sae(arch), _data(), cfg)
    trainer.train(max_steps=9)  # Adam's state exists, one log step is behind; 9..15 lie before the next
    # Adam's step count is a CPU scalar (as in torch.optim.Adam without fused/capturable): reading
    # it waits for nothing.
    step_counts = {id(s["step"]) for s in trainer.optimizer.state.values()}
    main = threading.main_thread()
    recording = {"on": False}
    calls = []

    def guard(name, real, from_training_only):
        def patched(self, *args, **kwargs):
            if recording["on"] and threading.current_thread() is main and id(self) not in step_counts:
                caller = sys._getframe(1).f_code.co_filename
                if not from_training_only or caller.startswith(TRAINING_DIR):
                    calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)

        return patched

    for name in ("item", "cpu", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name), False))
    # Implicit reads (if tensor:, int(tensor), boolean-mask indexing) in the trainer's own code.
    for name in ("__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name), True))
    real_step, real_check = trainer._train_step, trainer._check
    stepped = []

    def step(x):
        recording["on"] = True
        stepped.append(trainer.step)
        return real_step(x)

    def check():
        recording["on"] = False
        return real_check()

    real_next = BatchPrefetcher.next

    def next_batch(self):
        # Reading the data is host work (its rows made and NaN-counted on the host: inline when
        # training on the CPU, in the reading thread for an accelerator), never a device read.
        was, recording["on"] = recording["on"], False
        try:
            return real_next(self)
        finally:
            recording["on"] = was

    monkeypatch.setattr(trainer, "_train_step", step)
    monkeypatch.setattr(trainer, "_check", check)
    monkeypatch.setattr(BatchPrefetcher, "next", next_batch)
    trainer.train(max_steps=6)
    assert stepped == [9, 10, 11, 12, 13, 14]
    assert calls == []
    # The guard does see a read: the check at the end of the run is one.
    recording["on"] = True
    monkeypatch.setattr(trainer, "_check", real_check)
    trainer.train(max_steps=1)
    assert any(c.startswith("item") for c in calls)


# ---------------------------------------------------------------- non-finite steps


class _PoisonedSource(PoisonedSource):
    with_inf = False  # NaN alone


def _one_chunk_per_batch(out_dir=None, arch="topk", **kw):
    data = _PoisonedSource(d_in=16, n_features=48, l0=3, n_rows=256 * 16, seed=1, chunk_rows=256)
    cfg = _cfg(total_tokens=256 * 10, shuffle_buffer_rows=256, init_sample_rows=256, log_every_steps=4, **kw)
    torch.manual_seed(0)
    return Trainer(_sae(arch), data, cfg, out_dir)


# BatchTopK in bfloat16: its threshold (a buffer the compute twin updates) must roll back too.
@pytest.mark.parametrize("dtype,arch", [("float32", "topk"), ("bfloat16", "topk"), ("bfloat16", "batchtopk")])
def test_a_non_finite_step_rolls_back_to_the_last_check_and_its_batch_is_refused(monkeypatch, tmp_path, dtype, arch):
    # Batch 5 (the 6th) gives a NaN loss from finite rows (as an overflow would): the flag is read
    # at step 8, the state of step 4 comes back, steps 5.. are taken again checking each, and
    # that batch is refused. The result is bit for bit the run that refused it from the start.
    bad_position = 5 * 256
    trainer = _one_chunk_per_batch(tmp_path / "rolled", arch, dtype=dtype)
    compute = trainer.compute_sae
    real = compute.training_forward
    losses_seen = []

    def nan_at_batch_5(x, **kw):
        out = real(x, **kw)
        batch_start = trainer.position - 256
        losses_seen.append(batch_start // 256)
        if batch_start == bad_position:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(compute, "training_forward", nan_at_batch_5)
    result = trainer.train()
    assert result["step"] == 10 and trainer.position == 11 * 256
    assert losses_seen == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9, 10]
    said = "\n".join(trainer.messages)
    assert "steps 5..8: a non-finite loss or gradient; rolled back to step 4" in said
    assert "step 6: the loss is not finite (nan); batch refused" in said

    reference = _one_chunk_per_batch(tmp_path / "reference", arch, dtype=dtype)
    order = [g[0] for g in reference.stream._epoch_plan(0)[0]]
    reference.data.poisoned = {order[5]}
    reference.train()
    assert "step 6: the batch holds 1 NaN/Inf values" in "\n".join(reference.messages)
    for (name, a), b in zip(reference.sae.state_dict().items(), trainer.sae.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(reference.tokens_since_fired, trainer.tokens_since_fired)
    for p, q in zip(reference.sae.parameters(), trainer.sae.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(reference.optimizer.state[p][key], trainer.optimizer.state[q][key]), key
    strip = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}  # noqa: E731
    rows = [strip(r) for r in read_metrics(tmp_path / "rolled")]
    assert rows == [strip(r) for r in read_metrics(tmp_path / "reference")]
    assert [r["step"] for r in rows] == [4, 8, 10]


def test_a_non_finite_step_after_the_last_log_step_is_caught_before_train_returns(monkeypatch):
    trainer = _one_chunk_per_batch()
    compute = trainer.compute_sae
    real = compute.training_forward

    def nan_at_batch_5(x, **kw):
        out = real(x, **kw)
        if trainer.position - 256 == 5 * 256:
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(compute, "training_forward", nan_at_batch_5)
    result = trainer.train(max_steps=6)  # stops at step 6, between log steps
    assert result["step"] == 6 and trainer.position == 7 * 256
    assert "rolled back to step 4" in "\n".join(trainer.messages)
    assert all(torch.isfinite(p).all() for p in trainer.sae.parameters())


# ---------------------------------------------------------------- read-ahead


def test_the_prefetcher_hands_over_the_streams_batches_and_restarts_anywhere():
    data = _PoisonedSource(d_in=8, n_features=16, l0=2, n_rows=1000, seed=3, chunk_rows=100)
    data.poisoned = {4}
    stream = ShuffledStream(data, seed=5, buffer_rows=300)
    reference = ShuffledStream(data, seed=5, buffer_rows=300)
    prefetcher = BatchPrefetcher(stream, 64, 37, "cpu", depth=2)
    try:
        for i in range(20):  # crosses buffers and epochs
            position, rows, n_bad = prefetcher.next()
            expected = reference.read(37 + 64 * i, 64)
            assert position == 37 + 64 * i
            assert torch.equal(rows.nan_to_num(7.0), expected.nan_to_num(7.0))
            assert n_bad == int((~torch.isfinite(expected)).sum())
        prefetcher.restart(500)
        position, rows, _ = prefetcher.next()
        assert position == 500 and torch.equal(rows.nan_to_num(7.0), reference.read(500, 64).nan_to_num(7.0))
    finally:
        prefetcher.close()


def test_an_error_while_reading_ahead_reaches_the_trainer():
    class Broken(SyntheticActivations):
        def load_chunk(self, index):
            if index == 3:
                raise OSError("disk gone (simulated)")
            return super().load_chunk(index)

    data = Broken(d_in=8, n_features=16, l0=2, n_rows=1000, seed=3, chunk_rows=100)
    prefetcher = BatchPrefetcher(ShuffledStream(data, seed=0, buffer_rows=100), 100, 0, "cpu")
    try:
        with pytest.raises(OSError, match="simulated"):
            for _ in range(10):
                prefetcher.next()
    finally:
        prefetcher.close()


def test_train_cli_dtype_flag(tmp_path, capsys):
    from fastsae.cli import main

    out = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--synthetic-d-in", "16", "--synthetic-features", "32", "--d-sae", "32",
            "--k", "4", "--batch-size", "256", "--tokens", "2048", "--log-every", "4", "--no-progress", "--out", str(out)]
    assert main(args + ["--dtype", "bfloat16"]) == 0
    assert "computing in bfloat16" in capsys.readouterr().out
    folder = sorted((out / "checkpoints").iterdir())[-1]
    assert json.loads((folder / "trainer_cfg.json").read_text())["dtype"] == "bfloat16"
    # A finished run resumed in another dtype: the flag is taken, nothing is left to do.
    assert main(["train", "--resume", "--out", str(out), "--no-progress", "--dtype", "float32"]) == 0
    assert "computing in float32" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse names the choices
        main(args + ["--overwrite", "--dtype", "float64"])
    assert "--dtype: invalid choice: 'float64'" in capsys.readouterr().err


def test_a_run_saved_before_the_dtype_setting_resumes_in_its_weights_dtype(tmp_path):
    trainer = Trainer(_sae(), _data(), _cfg(total_tokens=256 * 4), tmp_path / "run")
    folder = trainer.train(max_steps=2)["checkpoint"]
    saved = json.loads((folder / "trainer_cfg.json").read_text())
    del saved["dtype"]
    saved["device"] = "cpu"
    (folder / "trainer_cfg.json").write_text(json.dumps(saved))
    resumed = Trainer.resume(tmp_path / "run")
    assert resumed.cfg.dtype == "float32" and resumed.train()["step"] == 4
