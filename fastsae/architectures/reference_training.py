"""How the libraries fastsae is measured against train an architecture: SAELens' training SAE of
it (class, coefficient, config fields) and that SAE's step written densely in pure torch, and
whether sparsify trains it too. `fastsae.bench` builds its baselines and peers from an
architecture's `reference_training`; fastsae's own forward never reads it.

The dense math takes `model`, a module holding SAELens' parameters (W_enc [d_in, d_sae], b_enc,
W_dec [d_sae, d_in], b_dec and `extra_parameters`) and the fastsae SAE's config as `cfg`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ReferenceTraining:
    saelens_class: str  # sae_lens' training SAE; its config class is this name + "Config"
    activate: Callable[[nn.Module, Tensor], Tensor]  # (model, pre-activations) -> dense activations
    # (model, pre, acts) -> the per-row sparsity term, averaged (None: no penalty, k sets sparsity)
    penalty: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None
    saelens_coefficient: Optional[str] = None  # "l1": l1_coefficient=c, coefficients {"l1": c}
    saelens_config: tuple[str, ...] = ()  # fields of fastsae's config SAELens' config takes by name
    extra_parameters: tuple[str, ...] = ()  # beyond W_enc, b_enc, W_dec, b_dec, named alike in SAELens
    sparsify: bool = False  # sparsify trains it too (its embedding-bag decoder, its SparseCoder)
    # For architectures without k: moves each latent's cutoff to the given pre-activation value
    # (its 1 - k/d_sae quantile), so an untrained SAE's rows hold about k active latents.
    calibrate: Optional[Callable[[nn.Module, Tensor, torch.dtype], None]] = None
    # (model, x, acts) -> further reconstruction losses (Matryoshka's inner levels), or None.
    nested: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None


def keep_row_top_k(pre: Tensor, k: int) -> Tensor:
    """Each row's k largest pre-activations, ReLU'd, scattered into a dense [N, d_sae]."""
    top = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def decoder_weighted_l1(model: nn.Module, pre: Tensor, acts: Tensor) -> Tensor:
    return (acts * model.W_dec.norm(dim=1)).sum(-1).mean()


def matryoshka_inner_losses(model: nn.Module, x: Tensor, acts: Tensor) -> Tensor:
    """SAELens' inner_mse_loss_<w>, summed: each inner level w's reconstruction from the latents
    below w, as SAELens decodes it (a dense slice of the activations per level)."""
    loss, decoded, start = x.new_zeros(()), model.b_dec, 0
    for width in model.cfg.matryoshka_widths[:-1]:
        decoded = acts[:, start:width] @ model.W_dec[start:width] + decoded
        loss = loss + (decoded - x).pow(2).sum(-1).mean()
        start = width
    return loss
