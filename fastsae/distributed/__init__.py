"""Training on several processes with torch.distributed (NCCL on GPUs, gloo on CPUs).

Two ways to split the work, both exact: a run on N processes computes what the one-process run
computes on the same data and seed, up to fp32 rounding.

- Data parallel (`data_parallel`): every rank holds the whole SAE and takes its slice of each
  global batch (`batch_slice`); torch's DDP all-reduces the gradients (bucketed, overlapped with
  the backward). The loss of a slice is weighted by its share of the batch (`slice_loss_weight`),
  so DDP's average is the gradient of the global batch's mean even when N does not divide it.
  Every architecture trains this way.
- Latent sharding (`ShardedSAE`): rank r holds latents [start_r, stop_r) of W_enc, b_enc and W_dec
  (and so their Adam state); b_dec is replicated. Every rank sees the whole batch. A layer around
  the single-device ops, which know nothing of ranks; each architecture with a sharded step
  (`Architecture.sharded_training_step`; TopK and ReLU) writes it from the shard's collectives:
    encode   (topk) local top-k over the rank's latents; the [N, k] candidates (values, global
             indices) are all-gathered and the global top-k is taken (the same on every rank);
    decode   each rank decodes the selected latents it owns; the partial reconstructions are
             all-reduced (forward: sum; backward: identity, since every rank holds the same loss);
    backward local to each shard; d b_dec's encoder part is all-reduced (b_dec enters every
             shard's encoder), and so would d x be if x required a gradient.
  AuxK takes its dead latents' candidates the same way; the dead-latent counters live on every
  rank for all d_sae latents (int64 per latent, small beside the weights) and are fed the global
  activations, so they agree across ranks and with the one-process run.
  `gather_sae` assembles a normal `fastsae.SAE` (SAELens layout) on one rank for saving.

Modules, one job each: `process` (the process group), `sharding` (how rows and latents are split,
the split-independent initialisation), `data_parallel` (DDP), `collectives` (the all-reduces and
all-gathers with their gradients), `sharded` (`ShardedSAE`, its gathering and optimizer state).
Kernels and ops stay single-device: this package only calls `fastsae.ops` and torch collectives.
"""

from fastsae.distributed.data_parallel import all_reduce_fired, data_parallel
from fastsae.distributed.process import (
    any_rank,
    exit_process,
    get_rank,
    get_world_size,
    init_from_env,
    is_distributed,
    is_main_process,
    launched_by_torchrun,
    shutdown,
)
from fastsae.distributed.sharded import SHARDABLE_ARCHITECTURES, ShardedSAE, ShardedTrainOutput
from fastsae.distributed.sharding import (
    batch_slice,
    init_decoder_rows,
    latent_dim,
    shard_range,
    sharded_initial_sae,
    slice_loss_weight,
)

__all__ = [
    "SHARDABLE_ARCHITECTURES", "ShardedSAE", "ShardedTrainOutput", "all_reduce_fired", "any_rank", "batch_slice",
    "data_parallel", "exit_process", "get_rank", "get_world_size", "init_decoder_rows", "init_from_env",
    "is_distributed", "is_main_process", "latent_dim", "launched_by_torchrun", "shard_range", "sharded_initial_sae",
    "shutdown", "slice_loss_weight",
]
