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

import fastsae
import distributed_cases as cases
from conftest import assert_rel_close
from fastsae.ops import use_backend

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 240  # the whole multi-process run (imports included) on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out_dir: Path) -> None:
    port = _free_port()
    # The torch backend: loading a compiled one would cost each process seconds, and the layer under
    # test is the same whichever backend runs the ops.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               FASTSAE_BACKEND="torch")
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "distributed_cases.py"), str(rank), str(world), str(port), str(out_dir)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
