"""`fastsae train`: synthetic and file data, refusal to clobber a run, --resume, bad data."""

import json

import numpy as np
import torch

import fastsae
from fastsae.cli import main
from fastsae.training import ActivationFiles, Trainer, TrainerConfig, latest_checkpoint, read_metrics

SYNTHETIC = ["--data", "synthetic", "--synthetic-d-in", "16", "--synthetic-features", "32", "--synthetic-l0", "2",
             "--d-sae", "64", "--batch-size", "256", "--tokens", "5120", "--lr", "8e-3", "--seed", "0",
             "--no-progress", "--log-every", "5"]


def test_train_synthetic_topk_then_resume_rules(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", *SYNTHETIC, "--architecture", "topk", "--k", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "final metrics" in text and "mean max cosine similarity to the 32 true features" in text
    folder = latest_checkpoint(out)
    assert folder.name == "step_000000020"
    sae = fastsae.load(folder)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 2 and sae.d_sae == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 20 and summary["l0"] == 2.0
    assert [r["step"] for r in read_metrics(out)] == [5, 10, 15, 20]

    assert main(["train", *SYNTHETIC, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out), "--lr", "1"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0  # already finished
    assert "resuming" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [5, 10, 15, 20]


def test_resume_reopens_activation_files_and_finishes_the_run(tmp_path, capsys):
    acts = torch.randn(3000, 12)
    np.save(tmp_path / "acts.npy", acts.numpy())
    data = ActivationFiles(tmp_path / "acts.npy", chunk_rows=500)
    cfg = TrainerConfig(total_tokens=128 * 10, batch_size=128, progress=False, log_every_steps=2,
                        checkpoint_every_seconds=None)
    first = Trainer(fastsae.SAE(d_in=12, d_sae=24, architecture="relu"), data, cfg, tmp_path / "run")
    first.train(max_steps=5)
    assert latest_checkpoint(tmp_path / "run").name == "step_000000005"
    rc = main(["train", "--resume", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run").name == "step_000000010"
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2, 4, 6, 8, 10]


def test_train_on_files_stops_on_nan_data(tmp_path, capsys):
    acts = np.full((2048, 8), np.nan, dtype=np.float32)
    np.save(tmp_path / "bad.npy", acts)
    rc = main(["train", "--data", str(tmp_path / "bad.npy"), "--architecture", "relu", "--d-sae", "16", "--batch-size", "64",
               "--tokens", "640", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 1
    assert "NaN or Inf" in capsys.readouterr().err


def test_train_reports_a_bad_data_path(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "missing.safetensors" in capsys.readouterr().err
