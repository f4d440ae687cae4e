"""Activation functions with training-time pseudo-gradients (pure torch, dense).

JumpReLU and its L0 step follow Rajamanoharan et al. 2024 / Gemma Scope with a rectangle
kernel of width `bandwidth`, as SAELens implements them; BatchTopK follows Bussmann et al. 2024.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """relu(x) * (x > threshold); d/dx is the true derivative, d/dthreshold the pseudo-gradient
    -(threshold / bandwidth) * K((x - threshold) / bandwidth). threshold broadcasts against x:
    [d_sae] for dense x [N, d_sae], or [N, m] thresholds gathered for sparse entries."""

    generate_vmap_rule = True  # torch.func transforms (vmap, grad, jacrev) work through it

    @staticmethod
    def forward(x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        return x.relu() * (x > threshold).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, threshold, bandwidth = inputs
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_x = grad_out * ((x > threshold) & (x > 0)).to(x.dtype)
        grad_threshold = (-(threshold / bw) * _rectangle((x - threshold) / bw) * grad_out).sum_to_size(threshold.shape)
        return grad_x, grad_threshold, None


class Step(torch.autograd.Function):
    """(x > threshold) as 0/1; no gradient to x, pseudo-gradient -(1 / bandwidth) * K(...) to threshold."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        return (x > threshold).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, threshold, bandwidth = inputs
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_threshold = (-(1.0 / bw) * _rectangle((x - threshold) / bw) * grad_out).sum_to_size(threshold.shape)
        return None, grad_threshold, None


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """Keep the k * rows largest entries of `acts` [rows, d_sae] over the whole batch."""
    flat = acts.flatten()
    n_keep = min(flat.numel(), k * acts.shape[0])
    top = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(acts.shape)
