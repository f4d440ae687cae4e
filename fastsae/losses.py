"""The loss pieces every training step shares (`SAE`, the latent-sharded SAE, the trainer):
the MSE, AuxK's width, and which latents fired with the mean L0. Tensors in, tensors out."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsae.sparse import SparseActivations


def mean_squared_norm(a: Tensor, b: Tensor) -> Tensor:
    """The mean over rows of ||a - b||^2 (SAELens' MSE), as one fused op and its one-pass backward."""
    return F.mse_loss(a, b, reduction="sum") / a.shape[0]


# How the AuxK loss is normalised (`SAE.training_forward`'s `aux_normalization`):
#   "dead_fraction":     aux_coefficient * min(1, n_dead / k_aux) * mean ||e_hat - e||^2, on the dead
#                        latents' raw pre-activations (sparsify's and SAELens' AuxK)
#   "residual_variance": aux_coefficient * mean ||e_hat - e||^2 / mean ||e - mean_rows(e)||^2, on
#                        their ReLU'd pre-activations (OpenAI's normalised AuxK, dictionary_learning's)
AUX_NORMALIZATIONS = ("dead_fraction", "residual_variance")


def check_aux_normalization(value) -> str:
    if value not in AUX_NORMALIZATIONS:
        raise ValueError(f"aux_normalization: expected one of {AUX_NORMALIZATIONS}, got {value!r}")
    return value


def residual_variance_normalized(aux_recon: Tensor, residual: Tensor) -> Tensor:
    """mean ||aux_recon - e||^2 over the residual's variance mean ||e - mean_rows(e)||^2; 0 where
    that is 0/0 (as dictionary_learning's nan_to_num)."""
    spread = mean_squared_norm(residual, residual.mean(0, keepdim=True).expand_as(residual))
    return (mean_squared_norm(aux_recon, residual) / spread).nan_to_num(0.0)


def aux_width(k_aux: Optional[int], d_in: int, d_sae: int) -> int:
    """AuxK's k_aux (default d_in // 2, at most d_sae; a transcoder passes its output width d_out)."""
    k_aux = d_in // 2 if k_aux is None else k_aux
    if isinstance(k_aux, bool) or not isinstance(k_aux, int) or k_aux < 1:
        raise ValueError(f"k_aux: expected a positive integer, got {k_aux!r}")
    return min(k_aux, d_sae)


def fired_and_l0(acts: Union[SparseActivations, Tensor], d_sae: int) -> tuple[Tensor, Tensor]:
    """Which latents fired in the batch (bool [d_sae]) and the mean number active per row
    (no data-dependent shapes: nothing waits for the device)."""
    if isinstance(acts, SparseActivations):
        active = acts.values > 0
        counts = torch.zeros(d_sae, dtype=torch.int32, device=acts.values.device)
        counts.index_add_(0, acts.indices.reshape(-1), active.reshape(-1).to(torch.int32))
        return counts > 0, active.sum(-1).float().mean()
    active = acts > 0
    return active.any(0), active.sum(-1).float().mean()
