"""The float64 check of a top-k selection, shared by the top-k encode tests of every backend."""

import torch
from conftest import assert_rel_close


def check_topk_selection(values, indices, pre64, k, tol=1e-5):
    """indices are k distinct latents whose float64 pre-activations are a top-k of their row
    (up to rounding), and values are relu of those pre-activations."""
    n = pre64.shape[0]
    assert indices.shape == (n, k) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < pre64.shape[1])).all()
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all(), "duplicate latents in a row"
    picked = pre64.gather(1, indices)
    assert_rel_close(values, picked.relu(), tol, "values")
    kth = pre64.topk(k, dim=-1).values[:, -1:]
    scale = pre64.abs().max()
    assert (picked >= kth - tol * scale).all(), "a selected latent is not among the row's top k"
