"""Training checkpoints: written atomically, found again, and metrics.jsonl kept in step.

The run folder's layout (names, `latest_checkpoint`, ...) lives in fastsae.runs; this module
writes into it. A checkpoint is written into a hidden temporary folder beside the others and
renamed into place only once every file is complete, so a crash mid-write leaves the previous
one intact; older checkpoints are removed only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Union

from fastsae.runs import (  # noqa: F401  (re-exported: the trainer and older callers use these names)
    CHECKPOINTS_DIRNAME,
    METRICS_FILENAME,
    OPTIMIZER_PT,
    REQUIRED_FILES,
    STATE_JSON,
    STATE_PT,
    checkpoint_dir,
    checkpoints_root,
    list_checkpoints,
    metrics_path,
    latest_checkpoint,
    read_metrics,
)


def _fsync_tree(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())


def write_checkpoint(out_dir: Union[str, Path], step: int, write_files: Callable[[Path], None], keep: int = 1) -> Path:
    """Run `write_files(tmp_folder)`, then rename the folder to checkpoints/step_<step>; remove
    older checkpoints beyond the newest `keep` only after that. Any error leaves what was there."""
    root = checkpoints_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:09d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_files(tmp)
        missing = [name for name in REQUIRED_FILES if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint at step {step}: files {missing} were not written")
        _fsync_tree(tmp)
        final = checkpoint_dir(out_dir, step)
        if final.exists():  # the same step written twice (e.g. a timed save, then the final one)
            stale = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(out_dir: Union[str, Path]) -> None:
    """Delete half-written checkpoint folders left by a crash."""
    root = checkpoints_root(out_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith((".tmp-", ".old-")) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def read_state_json(folder: Path) -> dict:
    path = folder / STATE_JSON
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the trainer state: {exc}") from exc


def truncate_metrics(out_dir: Union[str, Path], last_step: int) -> int:
    """Keep only metrics.jsonl rows with step <= last_step (and drop a torn last line), so that a
    resumed run appends without duplicates or gaps. Returns the number of rows kept."""
    path = metrics_path(out_dir)
    if not path.exists():
        return 0
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                kept.append(json.dumps(row))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)
