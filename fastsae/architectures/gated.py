"""Gated SAEs (Rajamanoharan et al. 2024) as SAELens has them: b_gate, r_mag and b_mag, no b_enc;
the gate and magnitude paths share W_enc. Dense path only."""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae.architectures.base import Architecture


class Gated(Architecture):
    name = "gated"
    takes_sparsity_coefficient = True  # L1 on the gate's ReLU, as SAELens' l1_coefficient

    def create_parameters(self, sae, factory: dict) -> None:
        sae.b_gate = torch.nn.Parameter(torch.zeros(sae.d_sae, **factory))
        sae.r_mag = torch.nn.Parameter(torch.zeros(sae.d_sae, **factory))
        sae.b_mag = torch.nn.Parameter(torch.zeros(sae.d_sae, **factory))

    def pre_dense(self, sae, x_in: Tensor) -> Tensor:
        return x_in @ sae.W_enc  # shared by both paths, no bias

    def acts_dense(self, sae, pre: Tensor) -> Tensor:
        # SAELens' GatedSAE: 1[x_in W_enc + b_gate > 0] * relu(x_in (W_enc * exp(r_mag)) + b_mag),
        # with one matmul: (x_in W_enc) * exp(r_mag) equals it up to rounding.
        gate = (pre + sae.b_gate > 0).to(pre.dtype)
        return gate * (pre * sae.r_mag.exp() + sae.b_mag).relu()

    def dense_losses(self, sae, target: Tensor, pre: Tensor, acts: Tensor, coefficient: float):
        sparsity = target.new_zeros(())
        gate_acts = (pre + sae.b_gate).relu()
        if coefficient:
            weight = sae.W_dec.norm(dim=1) if sae.cfg.decoder_norm != "none" else 1.0
            sparsity = coefficient * (gate_acts * weight).sum(-1).mean()
        via_gate = gate_acts @ sae.W_dec + sae.b_dec
        return sparsity, (via_gate - target).pow(2).sum(-1).mean()

    # ---------------------------------------------------------------- file formats

    def tensor_shapes(self, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        return {"W_enc": (d_in, d_sae), "b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,),
                "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
