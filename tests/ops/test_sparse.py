"""SparseActivations and the padding helper: property checks against brute force."""

import pytest
import torch

from fastsae import SparseActivations
from fastsae.sparse import pad_at_free_latents


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_from_dense_round_trips_and_pads_at_free_latents(density):
    for n, d_sae in [(1, 1), (5, 7), (13, 40), (3, 257)]:
        dense = (torch.rand(n, d_sae) < density) * torch.randn(n, d_sae)
        sparse = SparseActivations.from_dense(dense)
        assert sparse.width == int((dense != 0).sum(-1).max())
        assert torch.equal(sparse.to_dense(), dense)
        # plain scatter (not scatter_add) is exact too: padding never lands on a held latent
        assert torch.equal(torch.zeros(n, d_sae).scatter(1, sparse.indices, sparse.values), dense)
        assert torch.equal(sparse.l0(), (dense != 0).sum(-1))
        for row in sparse.indices:
            assert row.unique().numel() == row.numel(), "a latent twice in a row"


def test_from_dense_keeps_leading_dims_and_gradients():
    dense = torch.randn(2, 3, 11).relu().requires_grad_()
    sparse = SparseActivations.from_dense(dense)
    assert sparse.values.shape[:-1] == (2, 3) and sparse.shape == (2, 3, 11)
    sparse.values.sum().backward()
    # values gather dense at every slot (padding slots read zeros): gradient 1 wherever a slot points
    pointed = torch.zeros_like(dense).scatter(-1, sparse.indices, 1.0)
    assert torch.equal(dense.grad, pointed) and (pointed[dense != 0] == 1).all()


def test_padding_is_spread_over_latents():
    """One very wide row makes every other row mostly padding: no latent may collect it all."""
    n, m, d_sae = 512, 64, 1024
    real = torch.zeros(n, m, dtype=torch.bool)
    real[:, :4] = True
    real[0] = True
    indices = torch.sort(torch.stack([torch.randperm(d_sae)[:m] for _ in range(n)]), dim=1).values
    indices = torch.where(real, indices, 0)
    spread = pad_at_free_latents(real, indices, d_sae)
    assert torch.equal(spread[real], indices[real])
    for r in range(n):
        held = set(indices[r][real[r]].tolist())
        pads = spread[r][~real[r]].tolist()
        assert len(set(pads)) == len(pads) and not held & set(pads)
        assert all(0 <= p < d_sae for p in pads)
    per_latent = torch.bincount(spread[~real], minlength=d_sae)
    fair = real.logical_not().sum().item() / d_sae
    assert per_latent.max() <= 2 * fair + 4, f"{per_latent.max()} padding slots on one latent (fair share {fair:.1f})"
