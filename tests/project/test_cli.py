import subprocess
import sys

import fastsae
from fastsae.cli import main


def test_demo_trains_saves_and_reloads(tmp_path, capsys):
    rc = main(["demo", "--steps", "60", "--batch-size", "128", "--d-sae", "128", "--out", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "reloaded: identical outputs" in out
    assert fastsae.load(tmp_path / "d").cfg.k == 8


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fastsae.cli", "backends"], capture_output=True, text=True, check=True)
    assert "cpu:" in out.stdout and "torch" in out.stdout


def test_backends_refuses_a_bad_env_value_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("FASTSAE_BACKEND", "bogus")
    assert main(["backends"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FASTSAE_BACKEND=bogus" in err and "Traceback" not in err


def test_backends_says_where_the_request_comes_from_and_skips_cuda_without_a_gpu(monkeypatch, capsys):
    import fastsae.cli.tools

    monkeypatch.setattr(fastsae.cli.tools, "_cuda_visible", lambda: False)
    monkeypatch.delenv("FASTSAE_BACKEND", raising=False)
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "requested: auto (the default; FASTSAE_BACKEND is not set)"
    assert lines[2] == "cuda: none (torch sees no CUDA device)"
    assert lines[1].startswith("cpu: ") and "torch" in lines[1]
    monkeypatch.setenv("FASTSAE_BACKEND", "torch")
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "requested: torch (FASTSAE_BACKEND=torch)"
    assert lines[1].endswith("(in use: torch)")
