"""Data parallel: every rank holds the whole SAE and trains on its slice of each global batch;
torch's DDP all-reduces the gradients (bucketed, overlapped with the backward)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from fastsae.distributed.process import is_distributed
from fastsae.sae import SAE, TrainOutput


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
