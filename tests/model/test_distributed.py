"""Training on 2 and 3 processes (gloo, CPU) equals the one-process run on the same data and seed:
data parallel and latent-sharded, TopK (with AuxK) and ReLU, after one step and after 20
(relative 1e-5 on the weights). The processes are started here, on 127.0.0.1, under timeouts."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_bf16_close, assert_rel_close
from helpers import distributed_cases as cases
from helpers.paths import ROOT, TESTS

import fastsae
from fastsae.ops import use_backend

TIMEOUT_S = 240  # the whole multi-process run (imports included) on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out_dir: Path) -> None:
    port = _free_port()
    # The torch backend: loading a compiled one would cost each process seconds, and the layer under
    # test is the same whichever backend runs the ops.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               FASTSAE_BACKEND="torch")
    # Run as a module from the checkout's root: that checkout's fastsae is the one imported.
    procs = [
        subprocess.Popen([sys.executable, "-m", "helpers.distributed_cases", str(rank), str(world), str(port), str(out_dir)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(world)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(rank, p.returncode, out[-3000:]) for rank, (p, out) in enumerate(zip(procs, outputs)) if p.returncode]
    assert not failed, f"ranks failed: {failed}"


@pytest.fixture(scope="module")
def references():
    with use_backend("torch"):
        refs = {name: {k: v for k, v in cases.run_case(name).items() if k != "sae"} for name in cases.CASES}
        refs.update({name: cases.run_trainer_case(name) for name in cases.TRAINER_CASES})
    return refs


@pytest.mark.parametrize("world", [2, 3])
def test_multi_process_training_equals_one_process(world, references, tmp_path):
    _launch(world, tmp_path)
    for name, (options, split, _) in cases.CASES.items():
        ref = references[name]
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        if options["architecture"] == "topk":
            assert ref["dead_steps"] > 0, f"{name}: no latent died, AuxK was not exercised"
            assert got["dead_steps"] == ref["dead_steps"], name
        for step in (1, cases.STEPS):
            assert set(got["weights"][step]) == set(ref["weights"][step])
            for key, value in ref["weights"][step].items():
                assert_rel_close(got["weights"][step][key], value, 1e-5, f"{name} ({split}, {world} processes) step {step} {key}")
        # The weights moved: equality is not the initial SAE twice.
        moved = (ref["weights"][cases.STEPS]["W_dec"] - ref["weights"][1]["W_dec"]).abs().max()
        assert moved > 1e-3, name
        if split == "latents":
            assert got["mse"] == pytest.approx(ref["mse"], rel=1e-5), name
            # The sharded run's SAE, gathered on save, is a normal SAELens folder one process reads.
            loaded = fastsae.load(tmp_path / f"{name}_sae")
            assert loaded.d_sae == cases.D_SAE and loaded.architecture == options["architecture"]
            for key, value in ref["weights"][cases.STEPS].items():
                assert_rel_close(getattr(loaded, key).detach(), value, 1e-5, f"{name} saved {key}")
    for name, (options, split, _) in cases.TRAINER_CASES.items():
        ref, got = references[name], torch.load(tmp_path / f"{name}.pt", weights_only=True)
        what = f"Trainer {name} ({world} processes)"
        if "resample" in name:
            assert ref["n_resamples"] > 0 and any("resampled" in m for m in ref["messages"]), f"{what}: nothing resampled"
            assert got["n_resamples"] == ref["n_resamples"], what
        assert torch.equal(got["dead"], ref["dead"]), what
        for key, value in ref["weights"].items():
            assert_rel_close(got["weights"][key], value, 1e-5, f"{what}: {key}")
        for key in ("mse", "l0", "loss", "aux_loss", "sparsity_loss"):
            assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5), f"{what}: {key}"
        assert (got["metrics"]["world_size"], got["metrics"]["shard_latents"]) == (world, split == "latents")


# ---------------------------------------------------------------- helpers, in this process


def test_exit_process_keeps_the_code_and_flushes_the_streams():
    """`exit_process` skips the interpreter's finalisation: what the process printed into its
    buffers (a pipe: block-buffered) must still arrive, and its exit code must be the one given."""
    code = ("import sys; from fastsae import distributed as d; "
            "sys.stdout.write('last words'); sys.stderr.write('and a warning'); d.exit_process(3)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a pipe is by default
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 3
    assert proc.stdout == "last words"
    assert proc.stderr.endswith("and a warning")


@pytest.mark.parametrize("total,world", [(26, 3), (10, 3), (5, 5), (4096 * 2 + 7, 4)])
def test_shard_ranges_tile_in_rank_order(total, world):
    from fastsae.distributed import batch_slice, shard_range

    ranges = [shard_range(total, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    assert [batch_slice(total, world, r) for r in range(world)] == [(a, b - a) for a, b in ranges]


def test_bad_splits_are_refused():
    from fastsae import distributed as fdist

    with pytest.raises(ValueError, match="batch_size: expected at least one row per process \\(4\\), got 3"):
        fdist.batch_slice(3, 4, 0)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        fdist.shard_range(10, 2, 2)
    with pytest.raises(RuntimeError, match="no process group"):
        fdist.ShardedSAE(fastsae.SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2))


@pytest.mark.parametrize("decoder_norm", ["norm_weighted", "unit_norm"])
def test_sharded_initialisation_does_not_depend_on_the_split(decoder_norm):
    from fastsae.distributed import init_decoder_rows, shard_range, sharded_initial_sae

    cfg = fastsae.SAEConfig(d_in=6, d_sae=4096 + 50, architecture="topk", k=3, decoder_norm=decoder_norm)
    whole = sharded_initial_sae(cfg, seed=5)
    assert torch.equal(whole.W_enc, whole.W_dec.t()) and not whole.b_dec.any()
    for world in (2, 3):
        parts = [init_decoder_rows(cfg, 5, *shard_range(cfg.d_sae, world, r)) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole.W_dec.detach())
    assert not torch.equal(sharded_initial_sae(cfg, seed=6).W_dec, whole.W_dec)
    if decoder_norm == "unit_norm":
        assert torch.allclose(whole.W_dec.norm(dim=1), torch.ones(cfg.d_sae))


def test_shard_latents_refuses_other_architectures(capsys, tmp_path):
    from fastsae.cli import main

    code = main(["train", "--data", "synthetic", "--architecture", "jumprelu", "--shard-latents", "--tokens", "64",
                 "--batch-size", "32", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "--shard-latents: supports topk, relu, got --architecture jumprelu" in capsys.readouterr().err


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one (this process), destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg-store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_trainer_of_one_shard_checkpoints_and_resumes(one_process_group, tmp_path, dtype):
    """The sharded code path on one process (ShardedSAE, its compute twin, the gathered checkpoint,
    the resume) against the plain trainer from the same initial SAE."""
    from fastsae import distributed as fdist
    from fastsae.training import Trainer, TrainerConfig
    from fastsae.training.synthetic import SyntheticActivations

    cfg = fastsae.SAEConfig(d_in=8, d_sae=26, architecture="topk", k=3)
    data = SyntheticActivations(d_in=8, n_features=40, l0=3.0, n_rows=2048, seed=3)

    def trainer_cfg(dtype=dtype):
        return TrainerConfig(total_tokens=20 * 16, batch_size=16, lr=3e-3, log_every_steps=5, checkpoint_every_seconds=None,
                             progress=False, init_sample_rows=256, dead_after_tokens=32, dtype=dtype)

    sharded = Trainer(fdist.ShardedSAE(cfg, seed=4), data, trainer_cfg(), tmp_path / "sharded")
    assert isinstance(sharded.compute_sae, fdist.ShardedSAE) and sharded.compute_sae.dtype == getattr(torch, dtype)
    sharded.train(max_steps=10)
    saved = fastsae.load(ckpt_dir(tmp_path / "sharded", 10))
    assert saved.d_sae == 26
    assert '"shard_latents": true' in (ckpt_dir(tmp_path / "sharded", 10) / "trainer_cfg.json").read_text()
    resumed = Trainer.resume(tmp_path / "sharded")
    resumed.train()
    plain = Trainer(fdist.sharded_initial_sae(cfg, seed=4), data, trainer_cfg(), tmp_path / "plain")
    plain.train()
    got, ref = resumed.export_sae(), plain.export_sae()
    if dtype == "float32":
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert_rel_close(getattr(got, name).detach(), getattr(ref, name).detach(), 1e-5, f"{dtype} {name}")
        return
    # bf16 compute rounds differently on the two paths: each is held to the float32 run by the
    # house rule, |sharded - fp32| <= 2 |plain - fp32| + atol.
    full = Trainer(fdist.sharded_initial_sae(cfg, seed=4), data, trainer_cfg("float32"), tmp_path / "fp32")
    full.train()
    ref32 = full.export_sae()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert_bf16_close(getattr(got, name).detach(), getattr(ref32, name).detach().double(), getattr(ref, name).detach(),
                          1e-3, f"{dtype} {name}")


def ckpt_dir(out, step):
    from fastsae.training import checkpoint as ckpt

    return ckpt.checkpoint_dir(out, step)
