"""JumpReLU SAEs (Rajamanoharan et al. 2024, Gemma Scope): a learned per-latent threshold with
straight-through pseudo-gradients and an L0 penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae.activations import JumpReLU as JumpReLUFn
from fastsae.activations import Step
from fastsae.architectures.base import Architecture
from fastsae.architectures.reference_training import ReferenceTraining


class JumpReLU(Architecture):
    name = "jumprelu"
    takes_sparsity_coefficient = True  # L0

    # SAELens' JumpReLUTrainingSAE, densely (fastsae.bench's baselines and peers): L0 through the
    # step pseudo-gradient; calibrated by setting the threshold.
    reference_training = ReferenceTraining(
        "JumpReLUTrainingSAE",
        activate=lambda model, pre: JumpReLUFn.apply(pre, model.threshold, model.cfg.jumprelu_bandwidth),
        penalty=lambda model, pre, acts: Step.apply(pre, model.threshold, model.cfg.jumprelu_bandwidth).sum(-1).mean(),
        saelens_coefficient="l0", saelens_config=("jumprelu_bandwidth",), extra_parameters=("threshold",),
        calibrate=lambda sae, cutoff, dtype: sae.threshold.copy_(cutoff.clamp_min(1e-3).to(dtype)),
    )

    saelens_transcoder_names = ("jumprelu_transcoder", "jumprelu_skip_transcoder")

    def after_optimizer_step(self, master, forward_sae, cfg) -> None:
        master.threshold.clamp_(min=cfg.jumprelu_min_threshold)

    def create_extra_parameters(self, sae, factory: dict) -> None:
        sae.threshold = torch.nn.Parameter(torch.full((sae.d_sae,), sae.cfg.jumprelu_init_threshold, **factory))

    def acts_dense(self, sae, pre: Tensor) -> Tensor:
        return JumpReLUFn.apply(pre, sae.threshold, sae.cfg.jumprelu_bandwidth)

    def sparse_cutoff(self, sae, acc: torch.dtype) -> Tensor:
        threshold = sae.threshold.detach().to(acc)
        if torch.is_grad_enabled() and sae.threshold.requires_grad:
            # The threshold's pseudo-gradients see every pre-activation within bandwidth/2 of it;
            # the margin keeps entries that rounding of 16-bit pre-activations could bring in
            # (extra entries cost a slot each and contribute exactly 0).
            bandwidth = sae.cfg.jumprelu_bandwidth
            return threshold - (bandwidth / 2 + bandwidth / 16)
        return threshold.clamp_min(0)

    def sparse_acts(self, sae, pre: Tensor, indices: Tensor) -> Tensor:
        return JumpReLUFn.apply(pre, sae.threshold[indices], sae.cfg.jumprelu_bandwidth)

    def dense_losses(self, sae, x2: Tensor, pre: Tensor, acts: Tensor, coefficient: float):
        zero = x2.new_zeros(())
        if not coefficient:
            return zero, zero
        l0 = Step.apply(pre, sae.threshold, sae.cfg.jumprelu_bandwidth).sum(-1)
        return coefficient * l0.mean(), zero

    def sparse_losses(self, sae, pre: Tensor, values: Tensor, indices: Tensor, coefficient: float) -> Tensor:
        if not coefficient:
            return values.new_zeros(())
        l0 = Step.apply(pre, sae.threshold[indices], sae.cfg.jumprelu_bandwidth).sum(-1)
        return coefficient * l0.mean()

    # ---------------------------------------------------------------- file formats

    def tensor_shapes(self, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(d_in, d_sae), "threshold": (d_sae,)}

    def tensors_from_saelens(self, tensors: dict[str, Tensor], d_sae: int, source) -> dict[str, Tensor]:
        if "log_threshold" in tensors and "threshold" not in tensors:  # older SAELens training checkpoints
            tensors = dict(tensors)
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        return tensors
