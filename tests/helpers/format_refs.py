"""Helpers for the format tests: random tensors (never zeros) and a robust top-k comparison."""

import torch
from conftest import assert_rel_close


def rand(*shape, scale=1.0, dtype=torch.float32):
    """Random normal values, nudged away from zero so no entry is exactly 0."""
    t = torch.randn(*shape, dtype=torch.float64) * scale
    t = torch.where(t.abs() < 1e-3 * scale, torch.full_like(t, 1e-3 * scale), t)
    return t.to(dtype)


def topk_reference(acts: torch.Tensor, pre64: torch.Tensor, k: int, relu_first: bool = False) -> torch.Tensor:
    """Check that dense activations `acts` [N, d_sae] are a top-k (then ReLU) of the float64
    pre-activations `pre64`, robustly near ties, and return the float64 activations on the
    module's own support (so rounding-level ties cannot flip a latent between the two).
    relu_first: sparsify's order (ReLU, then top-k), which selects the same positive values."""
    acts = acts.reshape(pre64.shape)
    support = acts != 0
    assert (support.sum(-1) <= k).all(), "more than k active latents in a row"
    score = pre64.relu() if relu_first else pre64
    kth = score.topk(k, dim=-1).values[:, -1:]
    tol = 1e-5 * pre64.abs().max()
    assert (score[support] >= kth.expand_as(score)[support] - tol).all(), "a selected latent is not in the top k"
    must = (score > kth + tol) & (pre64 > tol)
    assert support[must].all(), "a latent clearly in the top k (and positive) was dropped"
    ref = pre64.relu() * support
    assert_rel_close(acts, ref, 1e-5, "top-k values")
    return ref
