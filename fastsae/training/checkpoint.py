"""Training checkpoints: written atomically, found again, and metrics.jsonl kept in step; the
trainer's state files (`write_training_files`, `read_training_state`).

The run folder's layout (names, `latest_checkpoint`, ...) lives in fastsae.runs; this module
writes into it. A checkpoint is written into a hidden temporary folder beside the others and
renamed into place only once every file is complete, so a crash mid-write leaves the previous
one intact; older checkpoints are removed only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Union

import torch

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


class CheckpointSchedule:
    """When the trainer checkpoints: every `checkpoint_every_steps` steps, and once
    `checkpoint_every_seconds` have passed since the last save."""

    def __init__(self, cfg, world_size: int, device):
        self.every_steps, self.every_seconds = cfg.checkpoint_every_steps, cfg.checkpoint_every_seconds
        self.world_size, self.device = world_size, device
        self.last_save = time.monotonic()

    def due(self, step: int, log: bool) -> bool:
        return bool(self.every_steps and step % self.every_steps == 0) or self._time_passed(log)

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def _time_passed(self, log: bool) -> bool:
        """Whether checkpoint_every_seconds has passed. On several processes every rank must take
        the same decision (saving is collective when latents are sharded, and it syncs the ranks'
        state): rank 0's clock decides, read at log steps only, so the agreement costs one small
        broadcast per log interval."""
        if self.every_seconds is None:
            return False
        due = time.monotonic() - self.last_save >= self.every_seconds
        if self.world_size == 1:
            return due
        if not log:
            return False
        flag = torch.tensor([float(due)], device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())


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


def claim_run_folder(out_dir: Path, overwrite: bool, clear: bool = True) -> None:
    """Make `out_dir` ready for a new run: refuse a folder that holds an earlier one (checkpoints
    or metrics) unless `overwrite`, then remove that run's files if `clear`."""
    if not (list_checkpoints(out_dir) or metrics_path(out_dir).exists()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir}: holds an earlier run (checkpoints or {METRICS_FILENAME}); "
            "resume it with Trainer.resume / --resume, or pass overwrite=True / --overwrite"
        )
    if clear:
        shutil.rmtree(checkpoints_root(out_dir), ignore_errors=True)
        metrics_path(out_dir).unlink(missing_ok=True)


def remove_stale_temporaries(out_dir: Union[str, Path]) -> None:
    """Delete half-written checkpoint folders left by a crash."""
    root = checkpoints_root(out_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith((".tmp-", ".old-")) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def write_training_files(folder: Path, sae, cfg, optimizer_state: dict, state: dict, info: dict) -> None:
    """A checkpoint's files: the SAE (SAELens layout), the TrainerConfig, Adam's state, the
    trainer's tensors and RNG states (`state`), and its readable counters (`info`), last."""
    sae.save(folder)
    cfg.save(folder)
    torch.save(optimizer_state, folder / OPTIMIZER_PT)
    torch.save(state, folder / STATE_PT)
    with open(folder / STATE_JSON, "w") as f:
        json.dump(info, f, indent=2)


def read_training_state(folder: Path, optimizer_device) -> tuple[dict, dict, dict]:
    """(state, optimizer state, info) of the checkpoint `folder`, the state on the CPU and the
    optimizer's on `optimizer_device`."""
    info = read_state_json(folder)
    try:
        state = torch.load(folder / STATE_PT, map_location="cpu", weights_only=True)
        optimizer_state = torch.load(folder / OPTIMIZER_PT, map_location=optimizer_device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{folder}: cannot read the checkpoint's state: {exc}") from exc
    return state, optimizer_state, info


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


# ---------------------------------------------------------------- the trainer's state files


def trainer_state(trainer, whole) -> dict:
    """trainer_state.pt: the whole SAE's training weights (normalised inputs), the dead-latent
    counters, the RNG states and the metrics window."""
    return {
        "sae": {name: t.detach().cpu().clone() for name, t in whole.state_dict().items()},
        "tokens_since_fired": trainer.dead.tokens_since_fired.cpu().clone(),
        "generator": trainer.dead.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "window": trainer.window.sums.cpu().clone(),
    }


def trainer_info(trainer) -> dict:
    """trainer_state.json: the counters, readable."""
    return {
        "step": trainer.step,
        "total_steps": trainer.cfg.total_steps,
        "tokens_seen": trainer.tokens_seen,
        "position": trainer.position,
        "input_scale": trainer.input_scale,
        "initialized": trainer.initialized,
        "bad_in_row": trainer.refusals.in_row,
        "refused_batches": trainer.refusals.total,
        "elapsed_s": trainer.elapsed,
        "n_resamples": trainer.dead.n_resamples,
        "dead_strategy": trainer.dead.strategy,
        **trainer.window.state_json(),
        "rows_per_epoch": trainer.stream.rows_per_epoch,
    }


def load_trainer_state(trainer, folder: Path) -> Optional[str]:
    """Put the checkpoint `folder`'s state into `trainer` (built for the same run); returns a note
    when the data's epoch is not the checkpoint's."""
    sae, optimizer = trainer.sae, trainer.optimizer
    state, optimizer_state, info = read_training_state(folder, "cpu" if trainer.sharded else sae.device)
    if trainer.sharded:  # the checkpoint holds the whole SAE: this rank takes its latents
        sae.load_whole_state_dict(state["sae"])
        optimizer_state = sae.shard_optimizer_state(optimizer_state, optimizer)
    else:
        sae.load_state_dict({k: v.to(sae.device) for k, v in state["sae"].items()})
    optimizer.load_state_dict(optimizer_state)
    trainer.dead.tokens_since_fired = state["tokens_since_fired"].to(sae.device).clone()
    trainer.dead.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    trainer.window.sums = state["window"].to(sae.device).clone()
    trainer.step = info["step"]
    trainer.tokens_seen = info["tokens_seen"]
    trainer.position = info["position"]
    trainer.input_scale = info["input_scale"]
    trainer.initialized = info["initialized"]
    trainer.refusals.in_row = info["bad_in_row"]
    trainer.refusals.total = info.get("refused_batches", 0)  # absent from checkpoints before it was counted
    trainer.elapsed = info["elapsed_s"]
    trainer.dead.n_resamples = info["n_resamples"]
    trainer.window.load_state_json(info)
    trainer.last_checkpoint = folder
    if info.get("rows_per_epoch") != trainer.stream.rows_per_epoch:
        return (f"note: the data has {trainer.stream.rows_per_epoch:,} rows per epoch, the checkpoint's had "
                f"{info.get('rows_per_epoch')}: the resumed run will not see the same batches")
    return None


def save_checkpoint(trainer) -> Path:
    """`trainer`'s checkpoint at its step, written atomically (collective when its latents are sharded: the whole SAE
    and Adam state are gathered on rank 0, which writes a one-process checkpoint; the other ranks return its path)."""
    if trainer.out_dir is None:
        raise ValueError("save_checkpoint: this trainer has no out_dir")
    bad = [name for name, param in trainer.sae.named_parameters() if not torch.isfinite(param).all()]
    if trainer._any_rank(bool(bad)):
        raise RuntimeError(
            f"step {trainer.step}: parameter {', '.join(bad) or 'of another rank'} holds NaN/Inf; not overwriting "
            f"the last good checkpoint {trainer.last_checkpoint}"
        )
    whole = trainer._whole_sae()
    optimizer = trainer.optimizer
    optimizer_state = trainer.sae.gather_optimizer_state(optimizer, dst=0, device="cpu") if trainer.sharded else None
    if trainer.rank != 0:  # rank 0 writes the run's files
        return checkpoint_dir(trainer.out_dir, trainer.step)
    optimizer_state = optimizer_state if trainer.sharded else optimizer.state_dict()
    state, info = trainer_state(trainer, whole), trainer_info(trainer)

    def write(folder: Path) -> None:
        write_training_files(folder, trainer._export(whole), trainer.cfg, optimizer_state, state, info)

    return write_checkpoint(trainer.out_dir, trainer.step, write)
