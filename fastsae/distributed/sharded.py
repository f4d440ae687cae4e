"""Training on several processes with torch.distributed (NCCL on GPUs, gloo on CPUs).

Two ways to split the work, both exact: a run on N processes computes what the one-process run
computes on the same data and seed, up to fp32 rounding.

- Data parallel (`data_parallel`): every rank holds the whole SAE and takes its slice of each
  global batch (`batch_slice`); torch's DDP all-reduces the gradients (bucketed, overlapped with
  the backward). The loss of a slice is weighted by its share of the batch (`slice_loss_weight`),
  so DDP's average is the gradient of the global batch's mean even when N does not divide it.
- Latent sharding (`ShardedSAE`): rank r holds latents [start_r, stop_r) of W_enc, b_enc and W_dec
  (and so their Adam state); b_dec is replicated. Every rank sees the whole batch. A layer around
  the single-device ops, which know nothing of ranks:
    encode   local top-k over the rank's latents; the [N, k] candidates (values, global indices)
             are all-gathered and the global top-k is taken (the same on every rank);
    decode   each rank decodes the selected latents it owns; the partial reconstructions are
             all-reduced (forward: sum; backward: identity, since every rank holds the same loss);
    backward local to each shard; d b_dec's encoder part is all-reduced (b_dec enters every
             shard's encoder), and so would d x be if x required a gradient.
  AuxK takes its dead latents' candidates the same way; the dead-latent counters live on every
  rank for all d_sae latents (int64 per latent, small beside the weights) and are fed the global
  activations, so they agree across ranks and with the one-process run.
  `gather_sae` assembles a normal `fastsae.SAE` (SAELens layout) on one rank for saving.

Kernels and ops stay single-device: this module only calls `fastsae.ops` and torch collectives.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from dataclasses import dataclass
from typing import NoReturn, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from fastsae import ops
from fastsae.config import SAEConfig
from fastsae.auxk import DeadLatents, check_dead_mask
from fastsae.sae import SAE, TrainOutput, mean_squared_norm
from fastsae.sparse_path import default_sparse_width_limit
from fastsae.sparse import SparseActivations, pad_at_free_latents

SHARDABLE_ARCHITECTURES = ("topk", "relu")

# ---------------------------------------------------------------- ranks and slices


def is_distributed() -> bool:
    """True inside an initialised process group (torchrun, or `init_process_group` by hand)."""
    return dist.is_available() and dist.is_initialized()


def shutdown(barrier: bool = True) -> None:
    """Leave the process group, if in one. With `barrier`, every rank first waits for the others,
    so none tears its connections down while a peer still finishes its last writes.
    Pass barrier=False on a failure path, where a peer may never arrive."""
    if not is_distributed():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process now, after `shutdown`, without the interpreter's finalisation.

    Why: torch's DistributedDataParallel keeps its process group alive after
    `destroy_process_group` (its gloo worker threads are still running at exit, whatever is
    deleted first), and at interpreter finalisation those threads abort the process about once in
    23 runs ("terminate called without an active exception", SIGABRT), after all the work is
    done. Plain torch reproduces it (3 gloo ranks, DDP, barrier, destroy_process_group, exit):
    7 aborts in 160 runs; ending with os._exit instead, 0 in 160.
    Everything fastsae writes is closed by then; only the standard streams are flushed here."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing left to save
            pass
    os._exit(code)


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """torchrun (and torch.distributed.launch) set these for every worker."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: Optional[str] = None, timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes in the environment (NCCL when `device` is CUDA,
    gloo otherwise) and return this rank's device (cuda:LOCAL_RANK for CUDA). A collective that
    waits longer than `timeout_s` (a peer died or hangs) raises instead of blocking forever."""
    if not launched_by_torchrun():
        raise RuntimeError("init_from_env: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set (launch with torchrun)")
    want_cuda = device is not None and torch.device(device).type == "cuda"
    if want_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        rank_device = torch.device("cuda", local_rank)
    else:
        rank_device = torch.device(device) if device is not None else torch.device("cpu")
    if not is_distributed():
        dist.init_process_group(
            backend="nccl" if want_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": rank_device} if want_cuda else {}),
        )
    return rank_device


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


# ---------------------------------------------------------------- data parallel


class _TrainingForward(nn.Module):
    """DDP prepares its gradient reduction in the wrapped module's forward: this one's forward is
    the SAE's training_forward."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: Tensor, **kwargs) -> TrainOutput:
        return self.sae.training_forward(x, **kwargs)


def data_parallel(sae: SAE, **ddp_kwargs) -> nn.Module:
    """`sae` under torch's DistributedDataParallel: calling the result with (x, **training_forward
    options) runs `sae.training_forward` and the backward of its loss all-reduces the gradients.
    DDP broadcasts rank 0's parameters at construction."""
    if not is_distributed():
        raise RuntimeError("data_parallel: no process group (launch with torchrun, then call init_from_env)")
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [sae.device.index] if sae.device.type == "cuda" else None
    return DistributedDataParallel(_TrainingForward(sae), device_ids=device_ids, **ddp_kwargs)


def all_reduce_fired(fired: Tensor) -> Tensor:
    """The union over ranks of the latents that fired (bool [d_sae]) on each rank's slice."""
    if not is_distributed():
        return fired
    counts = fired.to(torch.int32)
    dist.all_reduce(counts)
    return counts > 0


# ---------------------------------------------------------------- collectives with autograd


class _SumOverShards(torch.autograd.Function):
    """Forward: the sum over ranks of each rank's partial result. Backward: identity, since every
    rank then holds the same (replicated) loss and so the same gradient of the sum."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _IntoShards(torch.autograd.Function):
    """Forward: identity for a replicated tensor each shard reads. Backward: the sum of the
    shards' gradients (each shard saw only its latents' contribution)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_gather_cat(t: Tensor, group, world: int) -> Tensor:
    """The ranks' [B, w] tensors side by side: [B, world * w] (rank r's at columns r*w..)."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _pad_columns(t: Tensor, width: int, value) -> Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), value)], dim=1)


# ---------------------------------------------------------------- the latent-sharded SAE

_INIT_BLOCK = 4096  # latents per independently seeded block of a sharded SAE's initialisation
_GATHER_CHUNK_ELEMENTS = 1 << 26  # elements per piece of a gather (256 MiB of float32 over all ranks)


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
    w = torch.cat(rows)
    if cfg.decoder_norm == "unit_norm":
        w = w / w.norm(dim=1, keepdim=True)
    elif cfg.decoder_init_norm is not None:
        w = w / w.norm(dim=1, keepdim=True) * cfg.decoder_init_norm
    return w.to(cfg.torch_dtype)


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


class ShardedSAE(nn.Module):
    """This rank's share of an SAE split by latent across the process group.

    Parameters carry `SAE`'s names and layouts, restricted to latents [start, stop): W_enc
    [d_in, d_local] (stored latent-major), b_enc [d_local], W_dec [d_local, d_in]; b_dec [d_in] is
    whole on every rank. `training_forward` and `forward` are collective: every rank calls them
    with the same (whole) batch. Architectures: topk and relu.

    Build it with `ShardedSAE.from_sae(sae)` (slices a whole SAE: the same run as one process) or
    `ShardedSAE(cfg, seed=...)` (initialises only this rank's rows, in fixed blocks of latents, so
    the initial SAE does not depend on the number of ranks and never exists whole; its
    one-process equivalent is `sharded_initial_sae(cfg, seed)`).
    """

    def __init__(self, cfg: SAEConfig, *, seed: int = 0, group=None, _init: bool = True):
        super().__init__()
        if not is_distributed():
            raise RuntimeError("ShardedSAE: no process group (launch with torchrun, then call init_from_env)")
        if not isinstance(cfg, SAEConfig):
            raise ValueError(f"ShardedSAE: expected a fastsae.SAEConfig, got {type(cfg).__name__}")
        if cfg.architecture not in SHARDABLE_ARCHITECTURES:
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
        # relu: the row-wise sparse path while rows hold at most this many of the shard's latents
        # (None: SAE's per-device default over the shard; 0: always dense); past it the dense path.
        self.sparse_width_limit: Optional[int] = None
        self._dense_hint = False  # the last pass found rows too dense for the sparse path

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

    # The whole SAE's shape and type, as SAE reports them (d_sae counts all latents; this rank
    # holds `d_local` of them).
    d_in, d_sae, architecture, arch = SAE.d_in, SAE.d_sae, SAE.architecture, SAE.arch
    dtype, device, enc_weight = SAE.dtype, SAE.device, SAE.enc_weight

    @property
    def d_local(self) -> int:
        return self.stop - self.start

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_sae={self.d_sae}, latents [{self.start}, {self.stop}) of rank {self.rank}/"
                f"{self.world_size}, architecture={self.architecture!r}")

    # Per-latent-row operations are local to the shard: SAE's own methods apply as they are.
    set_decoder_norm_to_unit_norm = SAE.set_decoder_norm_to_unit_norm
    remove_gradient_parallel_to_decoder_directions = SAE.remove_gradient_parallel_to_decoder_directions
    _check_tensor = SAE._check_tensor
    _flat_input = SAE._flat_input

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
    ) -> "ShardedTrainOutput":
        """`SAE.training_forward` over the shards (collective; the same x on every rank). The
        losses and x_hat are the whole SAE's, the same on every rank; `fired` (bool [d_sae]) and
        `l0` are the whole batch's. `acts`: topk, the global selection [N, k] (global indices);
        relu, this rank's own activations (global indices)."""
        x2 = self._flat_input(x)
        cfg, group = self.cfg, self.group
        if x2.requires_grad:
            x2 = _IntoShards.apply(x2, group)  # each shard's encoder sees only its latents' part of d x
        b_dec_in = _IntoShards.apply(self.b_dec, group) if cfg.apply_b_dec_to_input else None
        dec_norm = self.W_dec.norm(dim=1) if cfg.rescale_acts_by_decoder_norm else None
        zero = x2.new_zeros(())
        sparsity = aux = zero
        if self.architecture == "topk":
            n_aux, n_dead, dead_here, aux_width = self._dead_lists(dead_mask, k_aux)
            # This rank keeps its own best n_aux (all of its dead latents when it has fewer).
            values, idx, aux_pre = ops.topk_encode(
                x2, self.enc_weight, self.b_enc, b_dec_in, dec_norm, min(cfg.k, self.d_local),
                dead_here.latents if n_aux else None, min(n_aux, dead_here.capacity) if n_aux else 0,
                check_indices=False,
            )
            keep, global_values, global_idx = self._global_top(values.detach(), idx, cfg.k, min(cfg.k, max(self.shard_sizes)))
            kept = torch.where(keep, values, torch.zeros_like(values))
            acts = SparseActivations(global_values, global_idx, self.d_sae)
            fired, l0 = _topk_fired_and_l0(acts)
            if n_aux:
                # The top n_aux dead latents over all ranks (all of them when fewer are dead): each
                # rank's list already holds only its own best n_aux, so the winners are among them.
                # The list is the same for every row: its local indices, one row per batch row.
                aux_idx = dead_here.latents.expand(aux_pre.shape[0], -1)
                keep_aux, _, _ = self._global_top(aux_pre.detach(), aux_idx, min(n_aux, n_dead), aux_width)
                aux_pre = aux_pre.masked_fill(~keep_aux, float("-inf"))
                partial, e_partial = ops.sparse_decode_with_aux(
                    kept, idx, self.W_dec, None, dec_norm, aux_pre, dead_here.latents, check_indices=False
                )
                # One all-reduce for both reconstructions.
                total = _SumOverShards.apply(torch.cat([partial, e_partial], dim=1), group)
                x_hat, e_hat = total[:, : self.d_in] + self.b_dec, total[:, self.d_in :]
                residual = (x2 - x_hat).detach()
                aux = aux_coefficient * min(1.0, n_dead / n_aux) * mean_squared_norm(e_hat, residual)
            else:
                partial = ops.sparse_decode(kept, idx, self.W_dec, None, dec_norm, check_indices=False)
                x_hat = _SumOverShards.apply(partial, group) + self.b_dec
        else:
            values, idx, dense_acts = self._relu_local(x2, b_dec_in)
            if dense_acts is not None:
                scaled = dense_acts / dec_norm if dec_norm is not None else dense_acts
                partial = scaled @ self.W_dec
                weight = self.W_dec.norm(dim=1) if cfg.decoder_norm != "none" else 1.0
                sparsity_rows = (dense_acts.abs() * weight).sum(-1)
                active = dense_acts.detach() > 0
                fired_here = active.any(0)
                l0_rows = active.sum(-1)
                acts = SparseActivations.from_dense(dense_acts.detach())
            else:
                partial = ops.sparse_decode(values, idx, self.W_dec, None, dec_norm)
                weight = self.W_dec.norm(dim=1)[idx] if cfg.decoder_norm != "none" else 1.0
                sparsity_rows = (values.abs() * weight).sum(-1)
                active = values.detach() > 0
                fired_here = torch.zeros(self.d_local, dtype=torch.bool, device=self.device)
                fired_here[idx[active]] = True
                l0_rows = active.sum(-1)
                acts = SparseActivations(values.detach(), idx, self.d_local)
            acts = SparseActivations(acts.values, acts.indices + self.start, self.d_sae)
            # One all-reduce for the reconstruction, the rows' penalty and their L0.
            packed = torch.cat([partial, sparsity_rows.unsqueeze(1), l0_rows.to(partial.dtype).unsqueeze(1)], dim=1)
            total = _SumOverShards.apply(packed, group)
            x_hat = total[:, : self.d_in] + self.b_dec
            if sparsity_coefficient:
                sparsity = sparsity_coefficient * total[:, self.d_in].mean()
            l0 = total[:, self.d_in + 1].detach().float().mean()
            fired = self._gather_latent_mask(fired_here)
        mse = mean_squared_norm(x_hat, x2)
        loss = mse + sparsity + aux
        return ShardedTrainOutput(x_hat.reshape(x.shape), acts, mse, sparsity, aux, loss, fired, l0)

    def _global_top(self, values: Tensor, idx: Tensor, k: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """From each rank's candidates (values [B, w_r], local indices), the top k over all ranks:
        (which of this rank's candidates won [B, w_r], the winners' values and global indices
        [B, k]). Every rank computes the same winners."""
        w_here = values.shape[1]
        cand_values = _all_gather_cat(_pad_columns(values, width, float("-inf")), self.group, self.world_size)
        cand_idx = _all_gather_cat(_pad_columns(idx + self.start, width, 0), self.group, self.world_size)
        top = cand_values.topk(k, dim=1)
        won = torch.zeros_like(cand_values, dtype=torch.bool).scatter_(1, top.indices, True)
        keep = won[:, self.rank * width : self.rank * width + w_here]
        return keep, top.values, cand_idx.gather(1, top.indices)

    def _dead_lists(self, dead_mask: Optional[Tensor], k_aux: Optional[int]) -> tuple[int, int, Optional[DeadLatents], int]:
        """AuxK: (the whole SAE's k_aux, the number of dead latents, this rank's dead latents (local
        indices), the longest rank's count). As `SAE`: k_aux does not depend on the dead count (the
        loss is scaled by min(1, n_dead / k_aux)); the candidates are the dead latents only. The
        mask is read on the host (every rank needs the counts to size its exchange)."""
        if dead_mask is None:
            return 0, 0, None, 0
        if isinstance(dead_mask, DeadLatents):
            raise ValueError("dead_mask: a sharded SAE takes the bool mask [d_sae] (every rank sizes its own list)")
        check_dead_mask(dead_mask, self.d_sae)
        n_aux = SAE._aux_width(self, k_aux)
        dead_cpu = dead_mask.cpu()
        n_dead = int(dead_cpu.sum())
        if n_dead == 0:
            return 0, 0, None, 0  # the loss is 0 (scaled by n_dead / k_aux)
        widest = max(int(part.sum()) for part in dead_cpu.split(self.shard_sizes))
        here = DeadLatents.from_mask(dead_mask[self.start : self.stop].to(self.device))
        return n_aux, n_dead, here, widest

    def _width_limit(self) -> int:
        """SAE's rule (`SAE.default_sparse_width_limit`) applied to the shard's latents."""
        limit = self.sparse_width_limit
        if limit is None:
            limit = default_sparse_width_limit(self.d_local, self.device)
        return min(limit, self.d_local)

    def _relu_local(self, x2: Tensor, b_dec_in: Optional[Tensor]):
        """This shard's ReLU activations: (values [B, m], local indices [B, m], None) from the
        row-wise sparse path, or (None, None, dense [B, d_local]) when rows are too dense for it.
        Each rank picks its path alone (both give the same [B, d_in] partial)."""
        limit = self._width_limit()
        if limit > 0 and not self._dense_hint:
            cutoff = torch.zeros(self.d_local, dtype=torch.promote_types(self.dtype, torch.float32), device=self.device)
            pre, idx, counts = ops.threshold_encode(x2, self.enc_weight, self.b_enc, b_dec_in, None, cutoff, limit)
            if not (pre.shape[1] == limit and int(counts.max()) > limit):
                return pre.relu(), pad_at_free_latents(pre != float("-inf"), idx, self.d_local), None
            self._dense_hint = True
        x_in = x2 - b_dec_in if b_dec_in is not None else x2
        pre = x_in @ self.W_enc + self.b_enc
        if limit > 0:  # back to the sparse path once rows fit well within the limit
            widest = int((pre.detach() > 0).sum(-1).max()) if pre.numel() else 0
            self._dense_hint = 4 * widest > 3 * limit
        return None, None, pre.relu()

    def _gather_latent_mask(self, mask_here: Tensor) -> Tensor:
        """The ranks' per-latent bool masks, in latent order: bool [d_sae]."""
        width = max(self.shard_sizes)
        padded = torch.zeros(width, dtype=torch.uint8, device=mask_here.device)
        padded[: mask_here.shape[0]] = mask_here.to(torch.uint8)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, self.shard_sizes)]).bool()

    # ------------------------------------------------------------ gathering

    @torch.no_grad()
    def gather_latents(self, t: Tensor, name: str, dst: Optional[int] = 0, device=None) -> Optional[Tensor]:
        """The whole tensor of which `t` is this rank's slice (shaped like parameter `name`, W_enc
        latent-major in memory as SAE stores it): on rank `dst` (None elsewhere), or on every rank
        with dst=None; on `device` (default t's). Collective. It goes over in pieces of at most
        `_GATHER_CHUNK_ELEMENTS` (all ranks' rows together), so gathering onto the CPU never needs
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
        chunk = max(1, _GATHER_CHUNK_ELEMENTS // (max(1, math.prod(rest)) * self.world_size))
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


def latent_dim(name: str) -> Optional[int]:
    """The dimension along latents of an SAE parameter (as SAE lays it out), None for b_dec."""
    return {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": None}[name]


@dataclass
class ShardedTrainOutput(TrainOutput):
    """`TrainOutput` plus the whole batch's `fired` (bool [d_sae]) and mean `l0`."""

    fired: Optional[Tensor] = None
    l0: Optional[Tensor] = None


def _topk_fired_and_l0(acts: SparseActivations) -> tuple[Tensor, Tensor]:
    active = acts.values > 0
    fired = torch.zeros(acts.d_sae, dtype=torch.bool, device=acts.values.device)
    fired[acts.indices[active]] = True
    return fired, active.sum(-1).float().mean()
