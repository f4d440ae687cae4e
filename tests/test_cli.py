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
