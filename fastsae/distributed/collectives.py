"""The collectives a latent-sharded SAE's step is made of, with their gradients: every rank holds
some latents, sees the whole batch and ends with the same (replicated) loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class SumOverShards(torch.autograd.Function):
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


class IntoShards(torch.autograd.Function):
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


def all_gather_columns(t: Tensor, group, world: int) -> Tensor:
    """The ranks' [B, w] tensors side by side: [B, world * w] (rank r's at columns r*w..)."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def pad_columns(t: Tensor, width: int, value) -> Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), value)], dim=1)


def top_over_ranks(values: Tensor, global_idx: Tensor, k: int, width: int, group, rank: int, world: int):
    """From each rank's candidates (values [B, w_r], their global indices), the top k over all
    ranks: (which of this rank's candidates won [B, w_r], the winners' values and global indices
    [B, k]). Each rank's list is padded to `width` columns; every rank computes the same winners."""
    w_here = values.shape[1]
    cand_values = all_gather_columns(pad_columns(values, width, float("-inf")), group, world)
    cand_idx = all_gather_columns(pad_columns(global_idx, width, 0), group, world)
    top = cand_values.topk(k, dim=1)
    won = torch.zeros_like(cand_values, dtype=torch.bool).scatter_(1, top.indices, True)
    keep = won[:, rank * width : rank * width + w_here]
    return keep, top.values, cand_idx.gather(1, top.indices)


def gather_latent_mask(mask_here: Tensor, shard_sizes: list[int], group) -> Tensor:
    """The ranks' per-latent bool masks, in latent order: bool [sum(shard_sizes)]."""
    width = max(shard_sizes)
    padded = torch.zeros(width, dtype=torch.uint8, device=mask_here.device)
    padded[: mask_here.shape[0]] = mask_here.to(torch.uint8)
    parts = [torch.empty_like(padded) for _ in range(len(shard_sizes))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, shard_sizes)]).bool()
