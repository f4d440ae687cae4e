"""ReLU SAEs with an L1 penalty (SAELens' "standard"; the 2023 and 2024 Anthropic recipes)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import ops
from fastsae.architectures.base import Architecture, ShardedStep
from fastsae.architectures.reference_training import ReferenceTraining, decoder_weighted_l1
from fastsae.sparse import SparseActivations, pad_at_free_latents


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

    saelens_transcoder_names = ("transcoder", "skip_transcoder")

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

    # ---------------------------------------------------------------- latent sharding

    shards_latents = True

    def sharded_training_step(self, shard, x2: Tensor, coefficient: float, dead_mask, k_aux, aux_coefficient: float) -> ShardedStep:
        """Each rank encodes and decodes its own latents; the partial reconstructions, the rows'
        penalties and their L0 are summed over ranks in one all-reduce. (AuxK is TopK's: ReLU
        resamples dead latents, so `dead_mask` is not used.)"""
        values, idx, dense_acts = _shard_activations(shard, x2)
        weigh = shard.cfg.decoder_norm != "none"
        if dense_acts is not None:
            partial = dense_acts @ shard.W_dec
            weight = shard.W_dec.norm(dim=1) if weigh else 1.0
            sparsity_rows = (dense_acts.abs() * weight).sum(-1)
            active = dense_acts.detach() > 0
            fired_here = active.any(0)
            acts = SparseActivations.from_dense(dense_acts.detach())
        else:
            partial = ops.sparse_decode(values, idx, shard.W_dec, None, None)
            weight = shard.W_dec.norm(dim=1)[idx] if weigh else 1.0
            sparsity_rows = (values.abs() * weight).sum(-1)
            active = values.detach() > 0
            fired_here = torch.zeros(shard.d_local, dtype=torch.bool, device=shard.device)
            fired_here[idx[active]] = True
            acts = SparseActivations(values.detach(), idx, shard.d_local)
        acts = SparseActivations(acts.values, acts.indices + shard.start, shard.d_sae)
        packed = torch.cat([partial, sparsity_rows.unsqueeze(1), active.sum(-1).to(partial.dtype).unsqueeze(1)], dim=1)
        total = shard.sum_over_shards(packed)
        d_in = shard.d_in
        sparsity = coefficient * total[:, d_in].mean() if coefficient else x2.new_zeros(())
        l0 = total[:, d_in + 1].detach().float().mean()
        return ShardedStep(total[:, :d_in] + shard.b_dec, acts, sparsity, x2.new_zeros(()), shard.gather_latent_mask(fired_here), l0)


def _shard_activations(shard, x2: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """This shard's activations: (values [N, m], local indices [N, m], None) from the row-wise
    sparse path, or (None, None, dense [N, d_local]) when rows are too dense for it. Each rank
    picks its path alone, by `SparsePath`'s rule over its own latents (both paths give the same
    [N, d_in] partial)."""
    path, d_local = shard.sparse_path, shard.d_local
    b_dec_in = shard.input_b_dec()
    limit = min(path.limit(d_local, shard.device), d_local)
    if limit > 0 and path.hint:
        cutoff = torch.zeros(d_local, dtype=torch.promote_types(shard.dtype, torch.float32), device=shard.device)
        pre, idx, counts = ops.threshold_encode(x2, shard.enc_weight, shard.b_enc, b_dec_in, None, cutoff, limit)
        if not (pre.shape[1] == limit and int(counts.max()) > limit):
            path.fitted()
            return pre.relu(), pad_at_free_latents(pre != float("-inf"), idx, d_local), None
        path.overflowed()
    x_in = x2 - b_dec_in if b_dec_in is not None else x2
    pre = x_in @ shard.W_enc + shard.b_enc
    if limit > 0 and pre.numel() and path.wants_a_look():
        path.saw_widest(int((pre.detach() > 0).sum(-1).max()), limit)
    return None, None, pre.relu()
