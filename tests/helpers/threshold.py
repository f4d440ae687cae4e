"""The one check of fastsae::threshold_encode's output contract (see
`fastsae.reference.threshold_encode`), shared by the op's tests on every backend."""

from typing import NamedTuple

import torch


class Selection(NamedTuple):
    got: torch.Tensor  # the op's values at the filled slots
    ref: torch.Tensor  # the float64 pre-activations there
    filled: torch.Tensor  # [N, m] bool: the slots holding kept latents whose pre-activation is a number


def check_threshold_selection(values, indices, counts, pre64, cutoff, max_width, tol=1e-5):
    """Checks every element of threshold_encode's outputs against the float64 pre-activations.

    Latents whose pre-activation is within rounding (tol * max |pre|, over the numbers) of their
    cutoff may go either way; every other one must be kept exactly when not pre <= cutoff (above
    it, or NaN: a NaN pre-activation must be kept, with value NaN). Row n's true count is
    counts[n]; its first min(counts[n], m) slots hold kept latents in ascending order, with none
    skipped before the last one shown (all of them when the row fits), and the other slots hold
    -inf at latent 0. Returns (kernel values, float64 pre-activations, the mask of filled slots),
    leaving out the NaN ones (checked here) so that the values can be compared as numbers."""
    device = pre64.device
    n, d_sae = pre64.shape
    cutoff = cutoff.double()
    nan = pre64.isnan()
    margin = tol * max(pre64.abs().masked_fill(nan, 0).max().item() if pre64.numel() else 0.0, 1e-30)
    sure = (pre64 > cutoff + margin) | nan  # must be kept
    maybe = ~(pre64 <= cutoff - margin)  # may be kept (NaN included)
    assert counts.shape == (n,) and counts.dtype == torch.int64
    assert (counts >= sure.sum(1)).all() and (counts <= maybe.sum(1)).all(), "wrong counts"
    m = min(int(counts.max()), max_width) if n else 0
    assert values.shape == indices.shape == (n, m) and indices.dtype == torch.int64
    shown = counts.clamp(max=m)
    filled = torch.arange(m, device=device) < shown[:, None]
    assert (values[~filled] == float("-inf")).all() and (indices[~filled] == 0).all(), "padding"
    assert ((indices >= 0) & (indices < d_sae)).all()
    # ascending (so distinct) latents within the filled slots
    both = filled[:, 1:] & filled[:, :-1]
    assert (indices.diff(dim=-1)[both] > 0).all(), "filled slots not in ascending latent order"
    rows = torch.arange(n, device=device)[:, None].expand(n, m)[filled]
    kept = torch.zeros(n, d_sae, dtype=torch.bool, device=device)
    kept[rows, indices[filled]] = True
    assert not (kept & ~maybe).any(), "a latent kept below its cutoff"
    # no latent skipped: all of a fitting row, those before the last shown of a truncated row
    last_shown = torch.full((n,), -1, dtype=torch.int64, device=device)
    if m:
        last_shown = torch.where(shown > 0, indices.gather(1, (shown - 1).clamp(min=0)[:, None])[:, 0], -1)
    last = torch.where(counts > shown, last_shown, d_sae)
    before_last = torch.arange(d_sae, device=device) <= last[:, None]
    assert not (sure & before_last & ~kept).any(), "a latent above its cutoff (or NaN) was skipped"
    ref = pre64[rows, indices[filled]]
    assert torch.equal(values[filled].isnan(), ref.isnan()), "NaN values not where the pre-activations are NaN"
    number = filled.clone()
    number[filled] = ~ref.isnan()
    return Selection(values[number], ref[~ref.isnan()], number)
