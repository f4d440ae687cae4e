"""TopK SAEs (Gao et al. 2024; SAELens' TopK): each row keeps its k largest pre-activations, with
ReLU on them; the AuxK loss on dead latents. Encoded by the fused top-k op: the dense
[N, d_sae] matrix is never formed."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from fastsae import ops
from fastsae.architectures.base import Architecture, Step, decoder_norm
from fastsae.architectures.reference_training import ReferenceTraining, keep_row_top_k
from fastsae.auxk import DeadLatents
from fastsae.sparse import SparseActivations


class TopK(Architecture):
    name = "topk"
    uses_k = True
    default_dead_strategy = "auxk"
    supports_auxk = True
    default_b_dec_init = "zeros"  # as SAELens' TopK training (better there on MiniLM, issue 27)
    sync_free_step = True

    # SAELens' TopKTrainingSAE, densely (fastsae.bench's baselines and peers); sparsify trains it too.
    reference_training = ReferenceTraining(
        "TopKTrainingSAE", activate=lambda model, pre: keep_row_top_k(pre, model.cfg.k), sparsify=True
    )

    def encode_sparse(self, sae, x2: Tensor) -> SparseActivations:
        values, indices, _ = self.topk_flat(sae, x2)
        return SparseActivations(values, indices, sae.d_sae)

    def encode(self, sae, x2: Tensor) -> Tensor:
        return self.encode_sparse(sae, x2).to_dense()

    def forward(self, sae, x2: Tensor) -> Tensor:
        values, indices, _ = self.topk_flat(sae, x2)
        # The encoder's own indices: check_indices=False skips the range check (a host sync on a GPU).
        return ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, decoder_norm(sae), check_indices=False)

    def training_step(self, sae, x2: Tensor, coefficient: float, dead: Optional[DeadLatents], k_aux: int) -> Step:
        values, indices, aux_pre = self.topk_flat(sae, x2, dead, k_aux)
        zero = x2.new_zeros(())
        acts = SparseActivations(values, indices, sae.d_sae)
        x_hat, aux_recon = decode_with_aux(sae, values, indices, dead, aux_pre)
        return Step(x_hat, acts, zero, zero, aux_recon)


def decode_with_aux(sae, values: Tensor, indices: Tensor, dead: Optional[DeadLatents], aux_pre: Tensor):
    """(x_hat, AuxK's reconstruction or None) from the encoder's own indices (check_indices=False
    skips the range check, a host sync on a GPU): one op, whose backward writes one decoder gradient."""
    if dead is None:
        return ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, decoder_norm(sae), check_indices=False), None
    return ops.sparse_decode_with_aux(
        values, indices, sae.W_dec, sae.b_dec, decoder_norm(sae), aux_pre, dead.latents, check_indices=False
    )
