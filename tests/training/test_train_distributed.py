"""`torchrun --nproc-per-node 2 -m fastsae.cli train ...` on the CPU (gloo): the same flags give the
same SAE as one process (data parallel, and latent-sharded); rank 0 writes the run's files,
which record the number of processes; a rank killed mid-run stops the run, the last checkpoint
stays intact, and `--resume` (on another number of processes) finishes the run exactly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastsae
from conftest import assert_rel_close
from fastsae.cli import main as cli_main
from fastsae.ops import use_backend
from fastsae.training import checkpoint as ckpt

BATCH = 30


def _flags(steps: int, *extra: str) -> list[str]:
    return ["--data", "synthetic", "--synthetic-d-in", "12", "--synthetic-features", "40", "--d-sae", "30", "--k", "3",
            "--batch-size", str(BATCH), "--tokens", str(BATCH * steps), "--log-every", "5", "--no-progress", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int, args: list[str]) -> subprocess.Popen:
    # The torch backend in every process: compiled ones would cost each process seconds to load.
    env = dict(os.environ, FASTSAE_BACKEND="torch", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "fastsae.cli", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _one_process(args: list[str]) -> None:
    with use_backend("torch"):
        assert cli_main(["train", *args]) == 0


def _final_sae(out: Path):
    return fastsae.load(ckpt.latest_checkpoint(out))


def _assert_same_sae(got, ref, what):
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert_rel_close(getattr(got, name).detach(), getattr(ref, name).detach(), 1e-5, f"{what}: {name}")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_data_parallel_run_equals_one_process(tmp_path):
    steps = 20
    proc = _torchrun(2, _flags(steps, "--out", str(tmp_path / "dp")))
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "2 processes (data parallel" in output
    _one_process(_flags(steps, "--out", str(tmp_path / "one")))
    _assert_same_sae(_final_sae(tmp_path / "dp"), _final_sae(tmp_path / "one"), "2 processes, data parallel")
    cfg = json.loads((ckpt.latest_checkpoint(tmp_path / "dp") / "trainer_cfg.json").read_text())
    assert (cfg["world_size"], cfg["shard_latents"]) == (2, False)
    rows, ref_rows = _metrics(tmp_path / "dp"), _metrics(tmp_path / "one")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [5, 10, 15, 20]  # written once, by rank 0
    assert all((r["world_size"], r["shard_latents"]) == (2, False) for r in rows)
    # The ranks' slices make the whole batch: its loss and L0 are the one-process run's.
    for r, ref in zip(rows, ref_rows):
        assert r["mse"] == pytest.approx(ref["mse"], rel=1e-5) and r["l0"] == pytest.approx(ref["l0"], rel=1e-5)
        assert r["tokens"] == ref["tokens"]


def _child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc/*/stat: the field after the command's ')')."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _rank_of(pid: int):
    """The RANK torchrun gave process `pid` (None for another child)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")), None)


def test_sharded_run_killed_rank_then_resume_on_one_process(tmp_path, capsys):
    steps = 150  # long enough that the kill lands mid-run (it follows the first checkpoint, at step 5)
    out = tmp_path / "sharded"
    proc = _torchrun(2, _flags(steps, "--shard-latents", "--checkpoint-every-steps", "5", "--out", str(out)))
    try:
        deadline = time.monotonic() + 180
        while ckpt.latest_checkpoint(out) is None:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        victim = next(pid for pid in _child_pids(proc.pid) if _rank_of(pid) == 1)  # torchrun's workers
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The other rank was stopped (by torchrun, or by the collective's timeout), with a message.
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 120
    assert "FAILED" in output and "SIGKILL" in output, output[-3000:]  # torchrun names the killed rank
    folder = ckpt.latest_checkpoint(out)
    kept_step = int(folder.name.split("_")[-1])
    assert 5 <= kept_step < steps and kept_step % 5 == 0
    assert fastsae.load(folder).d_sae == 30  # intact: the whole SAE, gathered from the shards
    assert all(r["world_size"] == 2 and r["shard_latents"] for r in _metrics(out))

    # --resume on one process: the checkpoint holds the whole SAE, so the run continues unsharded.
    capsys.readouterr()
    with use_backend("torch"):
        assert cli_main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr()
    assert "trained on 2 process(es) with sharded latents on 1" in said.err + said.out
    _one_process(_flags(steps, "--shard-latents", "--out", str(tmp_path / "one")))
    _assert_same_sae(_final_sae(out), _final_sae(tmp_path / "one"), "sharded on 2, killed, resumed on 1")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(5, steps + 1, 5))
    assert rows[-1]["world_size"] == 1
