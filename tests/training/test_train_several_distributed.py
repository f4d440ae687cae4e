"""Several SAEs under `torchrun` on the CPU (gloo): spread over the processes when there are at least as
many SAEs as processes (each a one-process run on its rank), data parallel when there are fewer; either
way each SAE is the one the one-process several-SAE run trains, and `--resume` re-spreads them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_rel_close
from helpers.tiny_models import save_tiny_bert

import fastsae
from fastsae.ops import use_backend
from fastsae.runs import latest_checkpoint

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] the a of to and is in it for def class return print x y".split()
BATCH = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int, args: list, counts_dir=None) -> str:
    # The torch backend in every process: compiled ones would cost each process seconds to load.
    env = dict(os.environ, FASTSAE_BACKEND="torch", OMP_NUM_THREADS="1")
    program = ["-m", "fastsae.cli"]
    if counts_dir is not None:  # the same command, each rank counting its model forwards into counts_dir
        root = Path(__file__).resolve().parents[2]
        env.update(FORWARD_COUNTS=str(counts_dir), PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]))
        program = [str(root / "tests" / "helpers" / "count_forwards.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *program, "train", *args]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _one_process(args: list) -> None:
    from fastsae.cli import main

    with use_backend("torch"):
        assert main(["train", *args]) == 0


def _assert_same_saes(got_out, ref_out, folders, what):
    for folder in folders:
        got, ref = fastsae.load(got_out / folder), fastsae.load(ref_out / folder)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert_rel_close(getattr(got, name).detach(), getattr(ref, name).detach(), 1e-5, f"{what}, {folder}: {name}")


def _synthetic(steps: int, *extra: str) -> list:
    return ["--data", "synthetic", "--synthetic-d-in", "12", "--synthetic-features", "40", "--d-sae", "30",
            "--batch-size", str(BATCH), "--tokens", str(BATCH * steps), "--log-every", "5", "--no-progress",
            "--eval-tokens", "0", *extra]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is installed by the [train] and [test] extras")
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS)


def test_three_hooks_spread_over_two_processes_equal_the_one_process_run(tiny_bert, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["the x of y is in it for def class return print x to and is a"] * 40))
    args = ["--model", str(tiny_bert), "--text", str(corpus), "--seq-len", "16", "--k", "3", "--tokens", "600",
            "--batch-size", "100", "--no-progress", "--report-features", "0", "--browser-tokens", "0",
            "--eval-tokens", "0", "--activation-cache", "none", "--hook", "encoder.layer.*"]
    output = _torchrun(2, [*args, "--out", str(tmp_path / "spread")])
    assert "2 processes, 3 SAEs spread; rank 0: encoder.layer.0, encoder.layer.2; rank 1: encoder.layer.1" in output
    _one_process([*args, "--out", str(tmp_path / "one")])
    folders = [f"encoder.layer.{layer}" for layer in range(3)]
    _assert_same_saes(tmp_path / "spread", tmp_path / "one", folders, "spread over 2 processes")
    runs = json.loads((tmp_path / "spread" / "sae_runs.json").read_text())
    assert [(entry["folder"], entry["rank"]) for entry in runs["runs"]] == list(zip(folders, [0, 1, 0]))
    assert (runs["world_size"], runs["processes"]) == (2, "spread")
    assert runs["throughput"]["sae_tokens_per_s"] == pytest.approx(3 * runs["throughput"]["data_tokens_per_s"])
    for folder in folders:  # each written by its own rank, as a one-process run
        out = tmp_path / "spread" / folder
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 6 and rows[-1]["world_size"] == 1 and rows[-1]["tokens_per_s"] > 0
        assert (out / "summary.json").is_file()
        assert fastsae.load(out).cfg.metadata["hook_name"] == folder


def _counts(folder, world: int) -> list:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]


def test_spread_ranks_split_the_forward_through_the_activation_cache(tiny_bert, tmp_path):
    from fastsae.training.transformer import TransformerActivations

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["the x of y is in it for def class return print x to and is a"] * 40))
    args = ["--model", str(tiny_bert), "--text", str(corpus), "--seq-len", "8", "--k", "3", "--tokens", "600",
            "--batch-size", "100", "--no-progress", "--report-features", "0", "--browser-tokens", "0",
            "--eval-tokens", "0", "--hook", "encoder.layer.*"]
    n_chunks = len(TransformerActivations(tiny_bert, hook="encoder.layer.0", text=corpus, seq_len=8).chunk_sizes)
    assert n_chunks >= 3  # 600 tokens of the ~680 read: every chunk (one shuffle buffer holds them all)
    cache = tmp_path / "cache"
    first = tmp_path / "counts1"
    first.mkdir()
    output = _torchrun(2, [*args, "--activation-cache", str(cache), "--out", str(tmp_path / "spread")], first)
    for rank, counts in enumerate(_counts(first, 2)):
        share = len(range(rank, n_chunks, 2))
        # at most one short pass for the hooks' widths (none when another rank has already cached chunk 0 at
        # every hook), then its own chunks only, then none while training
        assert counts["setup"] <= 1 and (counts["fill"], counts["after"]) == (share, 0), (rank, counts)
    assert f"activation cache: rank 0 of 2 ran the model on {len(range(0, n_chunks, 2))} of its" in output
    assert len(list(cache.glob("*/chunk_*.safetensors"))) == 3 * n_chunks  # every hook's folder holds every chunk
    _one_process([*args, "--activation-cache", "none", "--out", str(tmp_path / "one")])
    folders = [f"encoder.layer.{layer}" for layer in range(3)]
    _assert_same_saes(tmp_path / "spread", tmp_path / "one", folders, "spread over 2 processes through the cache")

    second = tmp_path / "counts2"  # a second run on the same cache: no rank runs the model at all
    second.mkdir()
    _torchrun(2, [*args, "--activation-cache", str(cache), "--out", str(tmp_path / "again")], second)
    assert _counts(second, 2) == [{"setup": 0, "fill": 0, "after": 0}] * 2
    _assert_same_saes(tmp_path / "again", tmp_path / "one", folders, "second run from the cache")


def test_resume_under_torchrun_spreads_a_one_process_run(tmp_path, monkeypatch):
    from fastsae.training.multi import MultiTrainer

    args = _synthetic(20, "--k", "2,3,4")
    _one_process([*args, "--out", str(tmp_path / "whole")])
    with monkeypatch.context() as patch:  # stopped after 10 of its 20 steps
        original = MultiTrainer.train
        patch.setattr(MultiTrainer, "train", lambda self, max_steps=None: original(self, max_steps=10))
        _one_process([*args, "--out", str(tmp_path / "run")])
    folders = ["k2-d30", "k3-d30", "k4-d30"]
    assert all(latest_checkpoint(tmp_path / "run" / f).name.endswith("_000000010") for f in folders)
    output = _torchrun(2, [*args, "--out", str(tmp_path / "run"), "--resume"])
    assert "resuming a run of 3 SAEs trained on 1 process(es) on 2" in output and "spread now" in output
    assert all(latest_checkpoint(tmp_path / "run" / f).name.endswith("_000000020") for f in folders)
    _assert_same_saes(tmp_path / "run", tmp_path / "whole", folders, "resumed on 2 processes")
    runs = json.loads((tmp_path / "run" / "sae_runs.json").read_text())
    assert [entry["rank"] for entry in runs["runs"]] == [0, 1, 0] and runs["world_size"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "k3-d30" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5, 10, 15, 20]  # no duplicate or missing rows


def test_fewer_saes_than_processes_train_data_parallel(tmp_path):
    args = _synthetic(10, "--k", "2,4")
    output = _torchrun(3, [*args, "--out", str(tmp_path / "dp")])
    assert "3 processes, 2 SAEs data parallel" in output
    _one_process([*args, "--out", str(tmp_path / "one")])
    _assert_same_saes(tmp_path / "dp", tmp_path / "one", ["k2-d30", "k4-d30"], "data parallel over 3 processes")
    runs = json.loads((tmp_path / "dp" / "sae_runs.json").read_text())
    assert [entry["rank"] for entry in runs["runs"]] == ["all", "all"] and runs["processes"] == "data parallel"
    cfg = json.loads((latest_checkpoint(tmp_path / "dp" / "k4-d30") / "trainer_cfg.json").read_text())
    assert cfg["world_size"] == 3


def test_several_saes_refuse_latent_sharding_under_torchrun(tmp_path):
    env = dict(os.environ, FASTSAE_BACKEND="torch", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "fastsae.cli", "train",
           *_synthetic(4, "--k", "2,4", "--shard-latents", "--out", str(tmp_path / "x"))]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode != 0
    assert "--shard-latents: several SAEs under torchrun are spread over the processes" in proc.stdout
