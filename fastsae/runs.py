"""A `fastsae train` run folder's layout, in one place: where its checkpoints, metrics and
browser go, and how the newest complete checkpoint is found.

    out/
      metrics.jsonl                     one JSON object per logged step
      browser/                          the feature browser (--browser)
      checkpoints/step_000001234/       the latest complete checkpoint
        cfg.json, sae_weights.safetensors   SAELens layout (runs on raw activations)
        trainer_cfg.json                    TrainerConfig
        trainer_state.json                  step, tokens, data position, ... (readable)
        trainer_state.pt                    training weights, dead-latent counters, RNG states
        optimizer.pt                        Adam's state

This module imports nothing from fastsae, so every layer (training, formats, browse, the
command line) can ask it where a run keeps things without importing the trainer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

CHECKPOINTS_DIRNAME = "checkpoints"
METRICS_FILENAME = "metrics.jsonl"
BROWSER_DIRNAME = "browser"
SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
TRAINER_CFG = "trainer_cfg.json"
STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
OPTIMIZER_PT = "optimizer.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Files that make a checkpoint complete (written in this order, the JSON state last).
REQUIRED_FILES = (SAE_CFG, SAE_WEIGHTS, TRAINER_CFG, OPTIMIZER_PT, STATE_PT, STATE_JSON)


def checkpoints_root(out_dir: Union[str, Path]) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIRNAME


def metrics_path(out_dir: Union[str, Path]) -> Path:
    return Path(out_dir) / METRICS_FILENAME


def browser_dir(out_dir: Union[str, Path]) -> Path:
    return Path(out_dir) / BROWSER_DIRNAME


def is_run_folder(path: Union[str, Path]) -> bool:
    """True for a folder that holds a checkpoints/ folder (complete checkpoint or not)."""
    return Path(path).is_dir() and checkpoints_root(path).is_dir()


def checkpoint_dir(out_dir: Union[str, Path], step: int) -> Path:
    return checkpoints_root(out_dir) / f"step_{step:09d}"


def list_checkpoints(out_dir: Union[str, Path]) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out_dir`, oldest first, as (step, folder)."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and all((child / name).is_file() for name in REQUIRED_FILES):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: Union[str, Path]) -> Optional[Path]:
    """The folder of the newest complete checkpoint in `out_dir`, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def read_metrics(out_dir: Union[str, Path]) -> list[dict]:
    path = metrics_path(out_dir)
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
