"""Shared helpers of the AuxK tests: dead-latent lists and the float64 check of `aux_pre`.

The contract (`fastsae.reference.aux_select`): aux_pre [N, C] holds, for row n and list entry j,
the pre-activation of latent aux_latents[j] when it is among the row's best min(k_aux, number of
candidates) candidates (a candidate: an entry at a latent, not -1, whose pre-activation is not
-inf; NaN ranks first), else -inf.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastsae import DeadLatents, reference


def random_dead(d_sae: int, n_dead: int, capacity: Optional[int] = None, device=None) -> tuple[torch.Tensor, DeadLatents]:
    """(a bool mask with n_dead random latents set, its DeadLatents list of `capacity`)."""
    mask = torch.zeros(d_sae, dtype=torch.bool, device=device)
    mask[torch.randperm(d_sae)[:n_dead].to(mask.device)] = True
    return mask, DeadLatents.from_mask(mask, capacity)


def expected_aux_pre(pre64: torch.Tensor, latents: torch.Tensor, k_aux: int) -> torch.Tensor:
    """The contract's aux_pre from float64 pre-activations [N, d_sae], by plain per-row loops
    (independent of `reference.aux_select`'s vectorised form)."""
    n, c = pre64.shape[0], latents.shape[0]
    out = torch.full((n, c), float("-inf"), dtype=torch.float64)
    lat = latents.cpu().tolist()
    pre = pre64.cpu()
    for r in range(n):
        cands = [(j, float(pre[r, i])) for j, i in enumerate(lat) if i >= 0 and float(pre[r, i]) != float("-inf")]
        # NaN first, then descending value.
        cands.sort(key=lambda jv: (0, 0.0) if jv[1] != jv[1] else (1, -jv[1]))
        for j, v in cands[: min(k_aux, len(cands))]:
            out[r, j] = v
    return out


def assert_aux_pre_matches(got: torch.Tensor, pre64: torch.Tensor, latents: torch.Tensor, k_aux: int, tol: float = 1e-5, what: str = "aux_pre"):
    """got equals the contract's aux_pre computed in float64: the same kept entries (the same
    -inf and NaN pattern) and the kept values within tol of the float64 ones (relative to the
    largest finite one)."""
    want = expected_aux_pre(pre64, latents, k_aux)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got = got.detach().cpu().double()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: kept entries differ"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN entries differ"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +inf entries differ"
    finite = torch.isfinite(want)
    if finite.any():
        scale = want[finite].abs().max().item()
        err = (got[finite] - want[finite]).abs().max().item()
        assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def aux_pre_via_reference(pre64: torch.Tensor, latents: torch.Tensor, k_aux: int) -> torch.Tensor:
    """`reference.aux_select` over `reference.aux_columns` (the library's own vectorised rule)."""
    return reference.aux_select(reference.aux_columns(pre64, latents), latents, k_aux)


def spread_parameters(sae):
    """Give a fresh SAE (fastsae's or SAELens': the same parameter names) non-zero biases and decoder
    rows of different norms, so that b_dec, b_enc and the decoder-norm rescaling all show in the
    losses and gradients the AuxK tests compare. Returns the SAE."""
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1, dtype=sae.W_dec.dtype) + 0.5)
    return sae
