"""How work is split over ranks: batch rows (data parallel), latents (latent sharding), and the
initialisation that does not depend on the split."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastsae.config import SAEConfig
from fastsae.distributed.process import get_rank, get_world_size
from fastsae.sae import SAE, initial_decoder_rows

_INIT_BLOCK = 4096  # latents per independently seeded block of a sharded SAE's initialisation


def shard_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's share of `total` items split as evenly as possible in rank order
    (the first `total % world_size` ranks take one more)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_range: expected 0 <= rank < world_size, got rank {rank} of {world_size}")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def batch_slice(batch_size: int, world_size: Optional[int] = None, rank: Optional[int] = None) -> tuple[int, int]:
    """(offset, rows) of this rank's slice of a global batch: the ranks' slices, in rank order,
    tile the batch, so the rows trained on per step (and the run's data order) do not depend on
    the number of processes."""
    world_size = get_world_size() if world_size is None else world_size
    rank = get_rank() if rank is None else rank
    if batch_size < world_size:
        raise ValueError(f"batch_size: expected at least one row per process ({world_size}), got {batch_size}")
    start, stop = shard_range(batch_size, world_size, rank)
    return start, stop - start


def slice_loss_weight(rows: int, batch_size: int, world_size: Optional[int] = None) -> float:
    """The factor on a slice's mean-over-rows loss so that DDP's average of the ranks' gradients
    is the gradient of the global batch's mean: world_size * rows / batch_size."""
    world_size = get_world_size() if world_size is None else world_size
    return world_size * rows / batch_size


def latent_dim(name: str) -> Optional[int]:
    """The dimension along latents of an SAE parameter (as SAE lays it out), None for b_dec."""
    return {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": None}[name]


def init_decoder_rows(cfg: SAEConfig, seed: int, start: int, stop: int) -> Tensor:
    """Decoder rows [stop - start, d_in] of latents [start, stop) as a sharded SAE initialises
    them: SAE's rule (kaiming-uniform rows, then the decoder-norm rule; W_enc = W_dec^T), with
    block b of `_INIT_BLOCK` latents drawn from its own generator on cfg.device, so that the
    initial SAE does not depend on how it is split, and no rank makes more than its rows."""
    bound = 1.0 / math.sqrt(cfg.d_in)  # kaiming_uniform_(a=sqrt(5)) on a [*, d_in] matrix
    device = torch.device(cfg.device)
    rows = []
    for b in range(start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK + 1):
        lo, hi = b * _INIT_BLOCK, min(cfg.d_sae, (b + 1) * _INIT_BLOCK)
        gen = torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + b) % (2**63 - 1))
        w = torch.empty(hi - lo, cfg.d_in, device=device).uniform_(-bound, bound, generator=gen)
        rows.append(w[max(lo, start) - lo : min(hi, stop) - lo])
    return initial_decoder_rows(torch.cat(rows), cfg)


@torch.no_grad()
def sharded_initial_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    """The whole SAE that `ShardedSAE(cfg, seed=seed)` starts from on any number of processes
    (its one-process equivalent)."""
    sae = SAE(cfg)
    w_dec = init_decoder_rows(cfg, seed, 0, cfg.d_sae)
    sae.W_dec.copy_(w_dec)
    sae.W_enc.copy_(w_dec.t())
    for name in ("b_enc", "b_dec"):
        getattr(sae, name).zero_()
    return sae
