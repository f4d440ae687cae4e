"""What `Trainer.resume` continues: a run folder's newest complete checkpoint, its configs with
the caller's overrides, the master SAE rebuilt (whole, or this rank's shard) and the data
reopened. The trainer's own state is loaded by `checkpoint.load_trainer_state`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from fastsae import distributed as fdist
from fastsae.config import SAEConfig
from fastsae.formats import saelens
from fastsae.sae import SAE
from fastsae.training import checkpoint as ckpt
from fastsae.training.config import TrainerConfig
from fastsae.training.data import ActivationSource, open_source


@dataclass
class SavedRun:
    folder: Path  # the checkpoint
    sae: SAE  # float32 master weights, not yet loaded
    data: ActivationSource
    cfg: TrainerConfig
    world_size: int  # the processes the run trained on
    sharded: bool  # whether its latents were sharded


def open_saved_run(
    out_dir: Union[str, Path],
    data: Optional[ActivationSource] = None,
    *,
    progress: Optional[bool] = None,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
    shard_latents: Optional[bool] = None,
) -> SavedRun:
    """The newest complete checkpoint in `out_dir`, with `Trainer.resume`'s overrides applied."""
    out_dir = Path(out_dir)
    folder = ckpt.latest_checkpoint(out_dir)
    if folder is None:
        raise FileNotFoundError(f"{out_dir}: no complete checkpoint to resume from (looked in {out_dir / ckpt.CHECKPOINTS_DIRNAME})")
    cfg = TrainerConfig.load(folder)
    if progress is not None:
        cfg.progress = progress
    if dtype is not None:
        cfg.dtype = dtype
        cfg.__post_init__()  # validates it
    sae_cfg = SAEConfig.from_dict(saelens.read_cfg(folder))
    if cfg.dtype is None:  # a run from before TrainerConfig.dtype computed in its weights' dtype
        cfg.dtype = sae_cfg.dtype if sae_cfg.dtype in ("float32", "bfloat16", "float16") else "float32"
    if device is not None:
        cfg.device = str(device)
    sae_cfg.device = cfg.device
    sae_cfg.dtype = "float32"  # the master weights (saved in float32)
    previous_world, previous_sharded = cfg.world_size, cfg.shard_latents
    shard = previous_sharded if shard_latents is None else shard_latents
    if shard and fdist.get_world_size() > 1:
        sae = fdist.ShardedSAE(sae_cfg, _init=False)  # its slices come from the checkpoint
    else:
        sae = SAE(sae_cfg)
    if data is None:
        data = open_source(cfg.data)
    return SavedRun(folder, sae, data, cfg, previous_world, previous_sharded)


def processes_note(run: SavedRun, world_size: int, sharded: bool, data_parallel: bool) -> Optional[str]:
    """What changes when a run continues on other processes than it trained on (None: nothing)."""
    if (run.world_size, run.sharded) == (world_size, sharded):
        return None
    how = "latents re-sharded" if sharded else "batches re-sliced" if data_parallel else "the SAE whole on this process"
    return (f"resuming a run trained on {run.world_size} process(es){' with sharded latents' if run.sharded else ''} "
            f"on {world_size}{' with sharded latents' if sharded else ''}: the checkpoint holds the "
            f"whole SAE, {how}; the data order does not depend on the number of processes")
