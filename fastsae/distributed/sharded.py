"""`ShardedSAE`: this rank's latents of an SAE split by latent across the process group.

Rank r holds latents [start_r, stop_r) of W_enc, b_enc and W_dec (and so their Adam state); b_dec
is replicated. Every rank sees the whole batch. The step itself is the architecture's
(`Architecture.sharded_training_step`, e.g. TopK's: a local top-k, then the global top-k of the
all-gathered candidates); this module holds the tensors and offers the collectives it is made of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from fastsae import architectures
from fastsae.auxk import DeadLatents, check_dead_mask
from fastsae.config import SAEConfig
from fastsae.distributed.collectives import IntoShards, SumOverShards, gather_latent_mask, top_over_ranks
from fastsae.distributed.process import is_distributed
from fastsae.distributed.sharding import init_decoder_rows, latent_dim, shard_range
from fastsae.losses import aux_width, mean_squared_norm
from fastsae.sae import SAE, SAETensors, TrainOutput
from fastsae.sparse_path import SparsePath

# The architectures with a latent-sharded step, those that take k first (the order messages list them in).
SHARDABLE_ARCHITECTURES = tuple(
    sorted((name for name in architectures.names() if architectures.get(name).shards_latents),
           key=lambda name: not architectures.get(name).uses_k)
)


@dataclass
class ShardedTrainOutput(TrainOutput):
    """`TrainOutput` plus the whole batch's `fired` (bool [d_sae]) and mean `l0`."""

    fired: Optional[Tensor] = None
    l0: Optional[Tensor] = None


class ShardedSAE(SAETensors):
    """This rank's share of an SAE split by latent across the process group.

    Parameters carry `SAE`'s names and layouts, restricted to latents [start, stop): W_enc
    [d_in, d_local] (stored latent-major), b_enc [d_local], W_dec [d_local, d_in]; b_dec [d_in] is
    whole on every rank. `training_forward` and `forward` are collective: every rank calls them
    with the same (whole) batch. Architectures: those with a sharded step (`SHARDABLE_ARCHITECTURES`);
    the others train data parallel.

    Build it with `ShardedSAE.from_sae(sae)` (slices a whole SAE: the same run as one process) or
    `ShardedSAE(cfg, seed=...)` (initialises only this rank's rows, in fixed blocks of latents, so
    the initial SAE does not depend on the number of ranks and never exists whole; its
    one-process equivalent is `sharded_initial_sae(cfg, seed)`).
    """

    gather_chunk_elements = 1 << 26  # elements per piece of a gather (256 MiB of float32 over all ranks)

    def __init__(self, cfg: SAEConfig, *, seed: int = 0, group=None, _init: bool = True):
        super().__init__()
        if isinstance(cfg, SAEConfig) and cfg.is_transcoder:
            raise ValueError(
                "ShardedSAE: latent sharding trains SAEs, not transcoders (d_out or skip_connection set); "
                "train a transcoder on one process or data parallel"
            )
        if not is_distributed():
            raise RuntimeError("ShardedSAE: no process group (launch with torchrun, then call init_from_env)")
        if not isinstance(cfg, SAEConfig):
            raise ValueError(f"ShardedSAE: expected a fastsae.SAEConfig, got {type(cfg).__name__}")
        if not architectures.get(cfg.architecture).shards_latents:
            raise ValueError(
                f"architecture: latent sharding supports {SHARDABLE_ARCHITECTURES}, got {cfg.architecture!r} "
                "(train it data-parallel instead)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if cfg.d_sae < self.world_size:
            raise ValueError(f"d_sae: expected at least one latent per process ({self.world_size}), got {cfg.d_sae}")
        self.cfg = cfg
        self.start, self.stop = shard_range(cfg.d_sae, self.world_size, self.rank)
        self.shard_sizes = [b - a for a, b in (shard_range(cfg.d_sae, self.world_size, r) for r in range(self.world_size))]
        d_local, d_in = self.d_local, cfg.d_in
        factory = dict(dtype=cfg.torch_dtype, device=torch.device(cfg.device))
        w_dec = init_decoder_rows(cfg, seed, self.start, self.stop) if _init else torch.zeros(d_local, d_in, **factory)
        self.W_dec = nn.Parameter(w_dec.to(**factory))
        self.W_enc = nn.Parameter(w_dec.to(**factory).clone().t())  # tied init, latent-major storage
        self.b_enc = nn.Parameter(torch.zeros(d_local, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        # The row-wise sparse path's state over this shard's latents, by SAE's rule.
        self.sparse_path = SparsePath()

    # ------------------------------------------------------------ construction

    @classmethod
    @torch.no_grad()
    def from_sae(cls, sae: SAE, group=None, device=None) -> "ShardedSAE":
        """This rank's latents of `sae` (copied, onto `device`; default the SAE's). Every rank must
        pass the same SAE."""
        cfg = sae.cfg if device is None else SAEConfig.from_dict({**sae.cfg.to_dict(), "device": str(device)})
        sharded = cls(cfg, group=group, _init=False)
        sharded.load_whole_state_dict(sae.state_dict())
        return sharded

    @torch.no_grad()
    def load_whole_state_dict(self, state: dict) -> None:
        """Load this rank's slice of a whole SAE's state dict (as `SAE.state_dict()` gives it)."""
        expected = {"W_enc", "b_enc", "W_dec", "b_dec"}
        if set(state) != expected:
            raise ValueError(f"state dict: expected the keys {sorted(expected)} of a {self.architecture} SAE, got {sorted(state)}")
        for name, param in self.named_parameters():
            whole = state[name]
            dim = latent_dim(name)
            want = list(param.shape)
            if dim is not None:
                want[dim] = self.cfg.d_sae
            if list(whole.shape) != want:
                raise ValueError(f"state dict: {name}: expected shape {tuple(want)}, got {tuple(whole.shape)}")
            param.copy_(self.shard_of(whole, name))

    def shard_of(self, whole: Tensor, name: str) -> Tensor:
        """This rank's slice of a whole tensor shaped like parameter `name` (itself for b_dec)."""
        dim = latent_dim(name)
        return whole if dim is None else whole.narrow(dim, self.start, self.d_local)

    # ------------------------------------------------------------ properties

    # d_in, d_sae, architecture, dtype, device, enc_weight: `SAETensors`' (d_sae counts all
    # latents; this rank holds `d_local` of them).

    @property
    def d_local(self) -> int:
        return self.stop - self.start

    @property
    def widest_shard(self) -> int:
        """The most latents any rank holds (collectives pad every rank's part to it)."""
        return max(self.shard_sizes)

    @property
    def sparse_width_limit(self) -> Optional[int]:
        """The row-wise sparse path (ReLU) while rows hold at most this many of the shard's latents;
        None: SAE's per-device default over the shard; 0: always dense."""
        return self.sparse_path.width_limit

    @sparse_width_limit.setter
    def sparse_width_limit(self, value: Optional[int]) -> None:
        self.sparse_path.width_limit = value

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_sae={self.d_sae}, latents [{self.start}, {self.stop}) of rank {self.rank}/"
                f"{self.world_size}, architecture={self.architecture!r}")

    # ------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x_hat, shaped like x (collective)."""
        return self.training_forward(x).x_hat

    def training_forward(
        self,
        x: Tensor,
        *,
        sparsity_coefficient: float = 0.0,
        dead_mask: Optional[Tensor] = None,
        k_aux: Optional[int] = None,
        aux_coefficient: float = 1.0 / 32,
        aux_normalization: str = "dead_fraction",
    ) -> "ShardedTrainOutput":
        """`SAE.training_forward` over the shards (collective; the same x on every rank). The
        losses and x_hat are the whole SAE's, the same on every rank; `fired` (bool [d_sae]) and
        `l0` are the whole batch's. `acts`: topk, the global selection [N, k] (global indices);
        relu, this rank's own activations (global indices)."""
        if aux_normalization != "dead_fraction":
            raise ValueError(
                f"aux_normalization: a latent-sharded SAE computes AuxK's 'dead_fraction' only, got {aux_normalization!r}; "
                "train data parallel (without --shard-latents) for 'residual_variance'"
            )
        x2 = self._flat_input(x)
        if x2.requires_grad:
            x2 = self.into_shards(x2)  # each shard's encoder sees only its latents' part of d x
        step = self.arch.sharded_training_step(self, x2, sparsity_coefficient, dead_mask, k_aux, aux_coefficient)
        mse = mean_squared_norm(step.x_hat, x2)
        loss = mse + step.sparsity + step.aux
        return ShardedTrainOutput(
            step.x_hat.reshape(x.shape), step.acts, mse, step.sparsity, step.aux, loss, fired=step.fired, l0=step.l0
        )

    # ------------------------------------------------------------ collectives for the architectures' sharded steps

    def into_shards(self, t: Tensor) -> Tensor:
        """A replicated tensor as each shard reads it: the backward sums the shards' gradients."""
        return IntoShards.apply(t, self.group)

    def sum_over_shards(self, partial: Tensor) -> Tensor:
        """The sum over ranks of each rank's partial result (backward: identity)."""
        return SumOverShards.apply(partial, self.group)

    def input_b_dec(self) -> Optional[Tensor]:
        """b_dec where the encoder subtracts it from the input (its gradient summed over shards), else None."""
        return self.into_shards(self.b_dec) if self.cfg.apply_b_dec_to_input else None

    def top_over_shards(self, values: Tensor, idx: Tensor, k: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """From each rank's candidates (values [B, w_r], local indices), the top k over all ranks:
        (which of this rank's candidates won [B, w_r], the winners' values and global indices
        [B, k]). Every rank computes the same winners; `width` is the longest rank's w_r."""
        return top_over_ranks(values, idx + self.start, k, width, self.group, self.rank, self.world_size)

    def gather_latent_mask(self, mask_here: Tensor) -> Tensor:
        """The ranks' per-latent bool masks, in latent order: bool [d_sae]."""
        return gather_latent_mask(mask_here, self.shard_sizes, self.group)

    def dead_latents_here(self, dead_mask: Optional[Tensor], k_aux: Optional[int]) -> tuple[int, int, Optional[DeadLatents], int]:
        """AuxK: (the whole SAE's k_aux, the number of dead latents, this rank's dead latents (local
        indices), the longest rank's count). As `SAE`: k_aux does not depend on the dead count (the
        loss is scaled by min(1, n_dead / k_aux)); the candidates are the dead latents only. The
        mask is read on the host (every rank needs the counts to size its exchange)."""
        if dead_mask is None:
            return 0, 0, None, 0
        if isinstance(dead_mask, DeadLatents):
            raise ValueError("dead_mask: a sharded SAE takes the bool mask [d_sae] (every rank sizes its own list)")
        check_dead_mask(dead_mask, self.d_sae)
        n_aux = aux_width(k_aux, self.d_in, self.d_sae)
        dead_cpu = dead_mask.cpu()
        n_dead = int(dead_cpu.sum())
        if n_dead == 0:
            return 0, 0, None, 0  # the loss is 0 (scaled by n_dead / k_aux)
        widest = max(int(part.sum()) for part in dead_cpu.split(self.shard_sizes))
        here = DeadLatents.from_mask(dead_mask[self.start : self.stop].to(self.device))
        return n_aux, n_dead, here, widest

    # ------------------------------------------------------------ gathering

    @torch.no_grad()
    def gather_latents(self, t: Tensor, name: str, dst: Optional[int] = 0, device=None) -> Optional[Tensor]:
        """The whole tensor of which `t` is this rank's slice (shaped like parameter `name`, W_enc
        latent-major in memory as SAE stores it): on rank `dst` (None elsewhere), or on every rank
        with dst=None; on `device` (default t's). Collective. It goes over in pieces of at most
        `gather_chunk_elements` (all ranks' rows together), so gathering onto the CPU never needs
        the whole tensor on a device."""
        dim = latent_dim(name)
        out_device = t.device if device is None else torch.device(device)
        receiving = dst is None or self.rank == dst
        if dim is None:
            return t.detach().to(out_device, copy=True) if receiving else None
        rows = t.detach().movedim(dim, 0)  # [d_local, ...]
        rest = tuple(rows.shape[1:])
        width = max(self.shard_sizes)
        starts = [shard_range(self.d_sae, self.world_size, r)[0] for r in range(self.world_size)]
        chunk = max(1, self.gather_chunk_elements // (max(1, math.prod(rest)) * self.world_size))
        whole = torch.empty((self.d_sae, *rest), dtype=t.dtype, device=out_device) if receiving else None
        dst_global = dst if dst is None or self.group is None else dist.get_global_rank(self.group, dst)
        for lo in range(0, width, chunk):
            hi = min(width, lo + chunk)
            piece = rows.new_zeros((hi - lo, *rest))  # ranks with fewer rows pad
            mine = max(0, min(hi, rows.shape[0]) - lo)
            piece[:mine] = rows[lo : lo + mine]
            parts = [torch.empty_like(piece) for _ in range(self.world_size)] if receiving else None
            if dst is None:
                dist.all_gather(parts, piece, group=self.group)
            else:
                dist.gather(piece, parts, dst=dst_global, group=self.group)
            if receiving:
                for r, part in enumerate(parts):
                    take = max(0, min(hi, self.shard_sizes[r]) - lo)
                    whole[starts[r] + lo : starts[r] + lo + take] = part[:take]
        if not receiving:
            return None
        return whole.movedim(0, dim) if dim else whole

    @torch.no_grad()
    def gather_sae(self, dst: Optional[int] = 0, device=None) -> Optional[SAE]:
        """The whole SAE (a normal `fastsae.SAE`, SAELens layout) on rank `dst` (None elsewhere;
        every rank with dst=None), on `device` (default: this shard's). Collective."""
        whole = {name: self.gather_latents(p, name, dst, device) for name, p in self.named_parameters()}
        if dst is not None and self.rank != dst:
            return None
        cfg = self.cfg if device is None else SAEConfig.from_dict({**self.cfg.to_dict(), "device": str(device)})
        sae = SAE(cfg)
        sae.W_enc.copy_(whole["W_enc"])
        sae.b_enc.copy_(whole["b_enc"])
        sae.W_dec.copy_(whole["W_dec"])
        sae.b_dec.copy_(whole["b_dec"])
        return sae

    @torch.no_grad()
    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer, dst: Optional[int] = 0, device=None) -> Optional[dict]:
        """`optimizer.state_dict()` for the whole SAE (what a one-process run's optimizer holds, for
        parameters in the same order) on rank `dst`, None elsewhere; its tensors on `device`
        (default: where they are). Collective."""
        whole = optimizer.state_dict()
        names = self._optimizer_param_names(optimizer)
        state = {}
        for index in sorted(whole["state"]):
            state[index] = {
                key: self.gather_latents(value, names[index], dst, device) if isinstance(value, Tensor) and value.ndim else value
                for key, value in whole["state"][index].items()
            }
        if dst is not None and self.rank != dst:
            return None
        return {"state": state, "param_groups": whole["param_groups"]}

    @torch.no_grad()
    def shard_optimizer_state(self, whole: dict, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's slice of a whole SAE's optimizer state dict (from a one-process run or from
        `gather_optimizer_state`), ready for `optimizer.load_state_dict`."""
        names = self._optimizer_param_names(optimizer)
        state = {}
        for index, entry in whole["state"].items():
            index = int(index)
            state[index] = {
                key: self.shard_of(value, names[index]).clone() if isinstance(value, Tensor) and value.ndim else value
                for key, value in entry.items()
            }
        return {"state": state, "param_groups": whole["param_groups"]}

    def _optimizer_param_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Parameter names in the optimizer's order (its state dict's indices)."""
        name_of = {id(p): name for name, p in self.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        unknown = [i for i, p in enumerate(params) if id(p) not in name_of]
        if unknown:
            raise ValueError(f"optimizer: parameters {unknown} are not this ShardedSAE's")
        return [name_of[id(p)] for p in params]
