"""TopK SAEs (Gao et al. 2024; SAELens' TopK): each row keeps its k largest pre-activations, with
ReLU on them; the AuxK loss on dead latents. Encoded by the fused top-k op: the dense
[N, d_sae] matrix is never formed."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import ops
from fastsae.architectures.base import Architecture, ShardedStep, Step, decoder_norm
from fastsae.architectures.reference_training import ReferenceTraining, keep_row_top_k
from fastsae.auxk import DeadLatents
from fastsae.losses import fired_and_l0, mean_squared_norm
from fastsae.sparse import SparseActivations


class TopK(Architecture):
    name = "topk"
    uses_k = True
    default_dead_strategy = "auxk"
    supports_auxk = True
    default_b_dec_init = "zeros"  # as SAELens' TopK training (better there on MiniLM: README, quality against SAELens)
    sync_free_step = True

    # SAELens' TopKTrainingSAE, densely (fastsae.bench's baselines and peers); sparsify trains it too.
    reference_training = ReferenceTraining(
        "TopKTrainingSAE", activate=lambda model, pre: keep_row_top_k(pre, model.cfg.k), sparsify=True
    )
    # File formats: SAELens before 6.0 wrote it as activation_fn "topk" with {"k": ...}; sparsify's "topk".
    saelens_pre_6_0_activation = "topk"
    saelens_pre_6_0_kwargs = ("k",)
    sparsify_activation = "topk"
    dictionary_learning_class = "AutoEncoderTopK"  # the dictionary_learning module fastsae saves it as

    def encode_sparse(self, sae, x2: Tensor) -> SparseActivations:
        values, indices, _ = self.topk_flat(sae, x2)
        return SparseActivations(values, indices, sae.d_sae)

    def encode(self, sae, x2: Tensor) -> Tensor:
        return self.encode_sparse(sae, x2).to_dense()

    def forward(self, sae, x2: Tensor) -> Tensor:
        values, indices, _ = self.topk_flat(sae, x2)
        # The encoder's own indices: check_indices=False skips the range check (a host sync on a GPU).
        return ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, decoder_norm(sae), check_indices=False)

    def training_step(self, sae, x2: Tensor, coefficient: float, dead: Optional[DeadLatents], k_aux: int, target=None) -> Step:
        values, indices, aux_pre = self.topk_flat(sae, x2, dead, k_aux)
        zero = x2.new_zeros(())
        acts = SparseActivations(values, indices, sae.d_sae)
        x_hat, aux_recon = decode_with_aux(sae, values, indices, dead, aux_pre)
        return Step(x_hat, acts, zero, zero, aux_recon)

    # ---------------------------------------------------------------- latent sharding

    shards_latents = True

    def sharded_training_step(self, shard, x2: Tensor, coefficient: float, dead_mask, k_aux, aux_coefficient: float) -> ShardedStep:
        """Each rank takes its own top k; the [N, k] candidates of all ranks are compared and the
        global top k kept (the same on every rank); each rank decodes the winners it owns and the
        partial reconstructions are summed. AuxK picks its dead latents the same way."""
        k, d_in = shard.cfg.k, shard.d_in
        dec_norm = decoder_norm(shard)
        n_aux, n_dead, dead_here, aux_width = shard.dead_latents_here(dead_mask, k_aux)
        # This rank keeps its own best n_aux (all of its dead latents when it has fewer).
        values, idx, aux_pre = ops.topk_encode(
            x2, shard.enc_weight, shard.b_enc, shard.input_b_dec(), dec_norm, min(k, shard.d_local),
            dead_here.latents if n_aux else None, min(n_aux, dead_here.capacity) if n_aux else 0,
            check_indices=False,
        )
        keep, global_values, global_idx = shard.top_over_shards(values.detach(), idx, k, min(k, shard.widest_shard))
        kept = torch.where(keep, values, torch.zeros_like(values))
        acts = SparseActivations(global_values, global_idx, shard.d_sae)
        fired, l0 = fired_and_l0(acts, shard.d_sae)
        zero = x2.new_zeros(())
        if not n_aux:
            partial = ops.sparse_decode(kept, idx, shard.W_dec, None, dec_norm, check_indices=False)
            return ShardedStep(shard.sum_over_shards(partial) + shard.b_dec, acts, zero, zero, fired, l0)
        # The top n_aux dead latents over all ranks (all of them when fewer are dead): each rank's
        # list already holds only its own best n_aux, so the winners are among them. The list is
        # the same for every row: its local indices, one row per batch row.
        aux_idx = dead_here.latents.expand(aux_pre.shape[0], -1)
        keep_aux, _, _ = shard.top_over_shards(aux_pre.detach(), aux_idx, min(n_aux, n_dead), aux_width)
        aux_pre = aux_pre.masked_fill(~keep_aux, float("-inf"))
        partial, e_partial = ops.sparse_decode_with_aux(
            kept, idx, shard.W_dec, None, dec_norm, aux_pre, dead_here.latents, check_indices=False
        )
        total = shard.sum_over_shards(torch.cat([partial, e_partial], dim=1))  # one all-reduce for both
        x_hat, e_hat = total[:, :d_in] + shard.b_dec, total[:, d_in:]
        residual = (x2 - x_hat).detach()
        aux = aux_coefficient * min(1.0, n_dead / n_aux) * mean_squared_norm(e_hat, residual)
        return ShardedStep(x_hat, acts, zero, aux, fired, l0)


def decode_with_aux(sae, values: Tensor, indices: Tensor, dead: Optional[DeadLatents], aux_pre: Tensor):
    """(x_hat, AuxK's reconstruction or None) from the encoder's own indices (check_indices=False
    skips the range check, a host sync on a GPU): one op, whose backward writes one decoder gradient."""
    if dead is None:
        return ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, decoder_norm(sae), check_indices=False), None
    return ops.sparse_decode_with_aux(
        values, indices, sae.W_dec, sae.b_dec, decoder_norm(sae), aux_pre, dead.latents, check_indices=False
    )
