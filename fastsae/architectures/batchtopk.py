"""BatchTopK SAEs (Bussmann et al. 2024): in training the batch keeps its N k largest activations;
at inference a learned global threshold (an EMA of the smallest kept activation), which is why
SAELens saves them as JumpReLU."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import reference
from fastsae.activations import batch_topk
from fastsae.architectures.base import Architecture, Step, decoder_norm
from fastsae.architectures.topk import decode_with_aux
from fastsae.architectures.reference_training import ReferenceTraining
from fastsae.auxk import DeadLatents
from fastsae.sparse import SparseActivations, batch_top_entries, tracing


class BatchTopK(Architecture):
    name = "batchtopk"
    uses_k = True
    saelens_name = "jumprelu"  # as SAELens saves it: the inference rule is a JumpReLU
    default_dead_strategy = "auxk"
    supports_auxk = True
    default_b_dec_init = "zeros"  # as SAELens' BatchTopK training

    # SAELens' BatchTopKTrainingSAE, densely (fastsae.bench's baselines and peers).
    reference_training = ReferenceTraining(
        "BatchTopKTrainingSAE", activate=lambda model, pre: batch_topk(pre.relu(), model.cfg.k)
    )
    saelens_training_name = "batchtopk"  # SAELens' BatchTopK training class; saved and inferred as JumpReLU
    dictionary_learning_class = "BatchTopKSAE"  # the dictionary_learning module fastsae saves it as
    saelens_transcoder_names = ("jumprelu_transcoder", "jumprelu_skip_transcoder")  # as JumpReLU, too

    # dictionary_learning's threshold rule (fastsae.config's comment), off by default.
    config_options = ("topk_threshold_start_step", "topk_threshold_first_sets")

    def complete_config(self, cfg) -> None:
        start = cfg.topk_threshold_start_step
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise ValueError(f"topk_threshold_start_step: expected a non-negative integer or None, got {start!r}")
        if not isinstance(cfg.topk_threshold_first_sets, bool):
            raise ValueError(f"topk_threshold_first_sets: expected a bool, got {cfg.topk_threshold_first_sets!r}")
        lr = cfg.topk_threshold_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr <= 1:  # NaN fails too
            raise ValueError(f"topk_threshold_lr: expected a rate in [0, 1] (the EMA's step), got {lr!r}")

    def fold_input_scale(self, folded, scale: float) -> None:
        if folded.cfg.rescale_acts_by_decoder_norm:
            folded.topk_threshold.div_(scale)  # the rescaled activations shrink by the same factor

    def after_optimizer_step(self, master, forward_sae, cfg) -> None:
        if forward_sae is not master:
            master.topk_threshold.copy_(forward_sae.topk_threshold)  # updated by the forward
            if master.cfg.topk_threshold_start_step is not None:
                master.threshold_batches_seen.copy_(forward_sae.threshold_batches_seen)

    def create_extra_parameters(self, sae, factory: dict) -> None:
        # The inference threshold: an EMA of the smallest positive training activation; -1 (unset,
        # as dictionary_learning's) where the first update sets it.
        start = -1.0 if sae.cfg.topk_threshold_first_sets else 0.0
        sae.register_buffer("topk_threshold", torch.full((), start, dtype=torch.float64, device=factory["device"]))
        if sae.cfg.topk_threshold_start_step is not None:
            # The training batches seen, for the start step: a buffer, so checkpoints keep it and a
            # rolled-back step takes it back.
            sae.register_buffer("threshold_batches_seen", torch.zeros((), dtype=torch.int64, device=factory["device"]))

    def acts_dense(self, sae, pre: Tensor) -> Tensor:
        if sae.training:
            return batch_topk(pre.relu(), sae.cfg.k)
        return pre.relu() * (pre > sae.topk_threshold).to(pre.dtype)

    def sparse_cutoff(self, sae, acc: torch.dtype) -> Optional[Tensor]:
        if sae.training:
            return None  # the batch's selection has no per-latent rule
        return sae.topk_threshold.clamp_min(0).to(acc).expand(sae.d_sae)

    def training_step(self, sae, x2: Tensor, coefficient: float, dead: Optional[DeadLatents], k_aux: int, target=None) -> Step:
        zero = x2.new_zeros(())
        sparse = self._sparse_selection(sae, x2, dead, k_aux)
        if sparse is not None:
            values, indices, aux_pre = sparse
            x_hat, aux_recon = decode_with_aux(sae, values, indices, dead, aux_pre)
            self._update_threshold(sae, values)
            return Step(x_hat, SparseActivations(values, indices, sae.d_sae), zero, zero, aux_recon)
        pre = self.pre_dense_fallback(sae, x2)
        acts = self.acts_dense(sae, pre)
        x_hat = sae.decode(acts)
        self._update_threshold(sae, acts)
        aux_recon = None
        if dead is not None:
            # AuxK's selection as the topk_encode op makes it (dead latents at -inf skipped).
            aux_pre = dead.aux_activations(
                reference.aux_select(reference.aux_columns(pre, dead.latents), dead.latents, k_aux)
            )
            aux_recon = reference.aux_decode(aux_pre, dead.latents, sae.W_dec, decoder_norm(sae))
        return Step(x_hat, acts, zero, zero, aux_recon)

    @staticmethod
    @torch.no_grad()
    def _update_threshold(sae, acts: Tensor) -> None:
        cfg = sae.cfg
        if cfg.topk_threshold_start_step is not None:
            batch = int(sae.threshold_batches_seen)  # this batch's 0-based number
            sae.threshold_batches_seen.add_(1)
            if batch <= cfg.topk_threshold_start_step:
                return
        positive = acts[acts > 0]
        if positive.numel():
            smallest = positive.min().to(torch.float64)
            if cfg.topk_threshold_first_sets and sae.topk_threshold < 0:
                sae.topk_threshold.copy_(smallest)
            else:
                lr = cfg.topk_threshold_lr
                sae.topk_threshold.mul_(1 - lr).add_(lr * smallest)

    def _sparse_selection(self, sae, x2: Tensor, dead: Optional[DeadLatents], k_aux: int):
        """The batch's N k largest activations without the dense matrix (`batch_top_entries` over
        the top-k encoder's per-row candidates; the bound it needed is kept for the next batches).
        Returns (values, indices, AuxK's aux_pre) with rows padded by value-0 slots, or None for the
        dense path (off, or traced: the width depends on the data)."""
        if sae.sparse_path.limit(sae.d_sae, sae.device) <= 0 or tracing():
            return None
        n, k, d_sae = x2.shape[0], sae.cfg.k, sae.d_sae
        bound = min(d_sae, max(sae.sparse_path.batchtopk_bound or 0, 4 * k))
        values, indices, aux_pre, bound = batch_top_entries(
            lambda b: self.topk_flat(sae, x2, dead, k_aux, b), n, n * k, d_sae, bound
        )
        sae.sparse_path.batchtopk_bound = bound
        return values, indices, aux_pre

    # ---------------------------------------------------------------- file formats

    def tensor_shapes(self, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(d_in, d_sae), "topk_threshold": ()}  # the inference threshold, a scalar

    def tensors_from_saelens(self, tensors: dict[str, Tensor], d_sae: int, source) -> dict[str, Tensor]:
        if "threshold" not in tensors:
            return tensors  # SAELens' training layout: topk_threshold itself
        # Saved as JumpReLU: the one global threshold in every slot.
        tensors = dict(tensors)
        threshold = tensors.pop("threshold")
        if tuple(threshold.shape) != (d_sae,):
            raise ValueError(f"{source}: tensor 'threshold' has shape {tuple(threshold.shape)}, expected ({d_sae},)")
        tensors["topk_threshold"] = threshold[0]
        return tensors

    def tensors_to_saelens(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        tensors = dict(tensors)
        topk_threshold = tensors.pop("topk_threshold")
        tensors["threshold"] = torch.full_like(tensors["b_enc"], float(topk_threshold))
        return tensors
