"""ReLU SAEs with an L1 penalty (SAELens' "standard"; the 2023 and 2024 Anthropic recipes)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae.architectures.base import Architecture
from fastsae.architectures.reference_training import ReferenceTraining, decoder_weighted_l1


class ReLU(Architecture):
    name = "relu"
    saelens_name = "standard"
    aliases = ("standard",)
    default_dead_strategy = "resample"  # Bricken et al. 2023
    takes_sparsity_coefficient = True  # L1

    # SAELens' StandardTrainingSAE, densely (fastsae.bench's baselines and peers); calibrated by
    # lowering each latent's bias.
    reference_training = ReferenceTraining(
        "StandardTrainingSAE", activate=lambda model, pre: pre.relu(), penalty=decoder_weighted_l1,
        saelens_coefficient="l1", calibrate=lambda sae, cutoff, dtype: sae.b_enc.sub_(cutoff.to(dtype)),
    )

    def acts_dense(self, sae, pre: Tensor) -> Tensor:
        return pre.relu()

    def sparse_cutoff(self, sae, acc: torch.dtype) -> Tensor:
        return torch.zeros(sae.d_sae, dtype=acc, device=sae.device)

    def dense_losses(self, sae, x2: Tensor, pre: Tensor, acts: Tensor, coefficient: float):
        zero = x2.new_zeros(())
        if not coefficient:
            return zero, zero
        weight = sae.W_dec.norm(dim=1) if sae.cfg.decoder_norm != "none" else 1.0
        return coefficient * (acts.abs() * weight).sum(-1).mean(), zero

    def sparse_losses(self, sae, pre: Tensor, values: Tensor, indices: Tensor, coefficient: float) -> Tensor:
        if not coefficient:
            return values.new_zeros(())
        weight = sae.W_dec.norm(dim=1)[indices] if sae.cfg.decoder_norm != "none" else 1.0
        return coefficient * (values.abs() * weight).sum(-1).mean()
