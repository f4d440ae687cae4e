"""TopK SAEs (Gao et al. 2024; SAELens' TopK): each row keeps its k largest pre-activations, with
ReLU on them; the AuxK loss on dead latents. Encoded by the fused top-k op: the dense
[N, d_sae] matrix is never formed."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from fastsae import ops
from fastsae.architectures.base import Architecture, Step
from fastsae.sparse import SparseActivations


class TopK(Architecture):
    name = "topk"

    def encode_sparse(self, sae, x2: Tensor) -> SparseActivations:
        values, indices, _, _ = sae._topk_flat(x2)
        return SparseActivations(values, indices, sae.d_sae)

    def encode(self, sae, x2: Tensor) -> Tensor:
        return self.encode_sparse(sae, x2).to_dense()

    def forward(self, sae, x2: Tensor) -> Tensor:
        values, indices, _, _ = sae._topk_flat(x2)
        # The encoder's own indices: check_indices=False skips the range check (a host sync on a GPU).
        return ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, sae._dec_norm(), check_indices=False)

    def training_step(self, sae, x2: Tensor, coefficient: float, dead_mask: Optional[Tensor], k_aux: Optional[int]) -> Step:
        n_aux = sae._aux_width(dead_mask, k_aux)
        values, indices, aux_values, aux_indices = sae._topk_flat(x2, dead_mask if n_aux else None, n_aux)
        x_hat = ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, sae._dec_norm(), check_indices=False)
        zero = x2.new_zeros(())
        aux_pair = (aux_values, aux_indices, n_aux) if n_aux else None
        return Step(x_hat, SparseActivations(values, indices, sae.d_sae), zero, zero, aux_pair)
