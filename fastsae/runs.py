"""The run folder's layout: where `fastsae train` puts its checkpoints and metrics, and how a
checkpoint is found again. Training writes these folders; formats, the browser and the CLI read
them, so the layout lives here, below all of them.

    out/
      metrics.jsonl                     one JSON object per logged step
      checkpoints/step_000001234/       the latest complete checkpoint
        cfg.json, sae_weights.safetensors   SAELens layout (runs on raw activations)
        trainer_cfg.json                    TrainerConfig
        trainer_state.json                  step, tokens, data position, ... (readable)
        trainer_state.pt                    training weights, dead-latent counters, RNG states
        optimizer.pt                        Adam's state
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

CHECKPOINTS_DIRNAME = "checkpoints"
METRICS_FILENAME = "metrics.jsonl"
STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
OPTIMIZER_PT = "optimizer.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Files that make a checkpoint complete (written in this order, the JSON state last).
REQUIRED_FILES = ("cfg.json", "sae_weights.safetensors", "trainer_cfg.json", OPTIMIZER_PT, STATE_PT, STATE_JSON)


def checkpoint_dir(out_dir: Union[str, Path], step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIRNAME / f"step_{step:09d}"


def list_checkpoints(out_dir: Union[str, Path]) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out_dir`, oldest first, as (step, folder)."""
    root = Path(out_dir) / CHECKPOINTS_DIRNAME
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
