"""SAELens' BatchTopK and Matryoshka BatchTopK training SAEs on fastsae's TopK encoder.

Patched: `BatchTopKTrainingSAE` and `MatryoshkaBatchTopKTrainingSAE` (encode, forward,
training_forward_pass). SAELens keeps the batch's int(k * rows) largest ReLU'd pre-activations
(times ||W_dec,i|| with `rescale_acts_by_decoder_norm`), in training and in `encode` alike; its
threshold (an EMA of the smallest kept activation) is used only once the SAE is saved as JumpReLU.

The batch selection without the dense [N, d_sae] is fastsae's own BatchTopK's
(`fastsae.sparse.batch_top_entries` over `ops.topk_encode`'s per-row candidates, exact), keeping
SAELens' int(k N); the candidate bound it needed is kept for the next batches in the instance's
`SparsePath`, with the threshold families' back-off.

Matryoshka's nested losses: level w's reconstruction decodes the kept entries with latent < w,
one sparse decode per level, never a dense [N, d_sae]. AuxK is the TopK patch's (the dead
latents' pre-activations from the same encoder call); with `use_matryoshka_aux_loss` each level's
dead latents reconstruct the residual of the reconstruction up to that level, from one product
over the dead latents' columns.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch

from fastsae import ops
from fastsae.auxk import DeadLatents
from fastsae.integrations._saelens_common import (
    _dense,
    _fast_ok,
    _hidden_pre,
    auxk_loss,
    auxk_setup,
    decode_with_auxk,
    sparse_path_of,
    with_error_term,
)
from fastsae.sparse import batch_top_entries



def _selection(sae, x: torch.Tensor, dead: Optional[DeadLatents] = None, k_aux: int = 0):
    """(x2, dec_norm, values [N, m], indices [N, m], aux_pre): the batch's kept activations in
    rows padded with value-0 slots (at distinct candidate latents, no gradient)."""
    cfg = sae.cfg
    x2 = x.to(sae.dtype).reshape(-1, cfg.d_in)
    n, d_sae = x2.shape[0], cfg.d_sae
    dec_norm = sae.W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else None
    b_dec_in = sae.b_dec if cfg.apply_b_dec_to_input else None
    latents = dead.latents if dead is not None else None
    path = sparse_path_of(sae)
    values, indices, aux_pre, path.batchtopk_bound = batch_top_entries(
        lambda bound: ops.topk_encode(
            x2, sae.W_enc.t(), sae.b_enc, b_dec_in, dec_norm, bound, latents, k_aux, check_indices=False
        ),
        n,
        int(cfg.k * n),  # SAELens' BatchTopK
        d_sae,
        min(d_sae, max(path.batchtopk_bound, 4 * math.ceil(cfg.k), 1)),
    )
    return x2, dec_norm, values, indices, aux_pre


def _decode(sae, values, indices, dec_norm):
    return ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, dec_norm, check_indices=False)


def _patched_encode(original: Callable) -> Callable:
    @functools.wraps(original)
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_ok(self, x, PATCHES):
            return original(self, x)
        _, _, values, indices, _ = _selection(self, x)
        return _dense(values, indices, self.cfg.d_sae).reshape(*x.shape[:-1], self.cfg.d_sae)

    encode.__fastsae_original__ = original
    return encode


def _patched_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_ok(self, x, PATCHES):
            return original(self, x)
        _, dec_norm, values, indices, _ = _selection(self, x)
        return with_error_term(self, x, _decode(self, values, indices, dec_norm).reshape(*x.shape[:-1], self.cfg.d_in))

    forward.__fastsae_original__ = original
    return forward


def _patched_training_forward_pass(original: Callable) -> Callable:
    @functools.wraps(original)
    def training_forward_pass(self, step_input):
        from sae_lens.saes.sae import TrainStepOutput

        sae_in = step_input.sae_in
        mask = step_input.dead_neuron_mask
        num_dead = int(mask.sum()) if mask is not None else 0
        matryoshka = hasattr(self.cfg, "matryoshka_widths")
        if not _fast_ok(self, sae_in, PATCHES) or (matryoshka and sae_in.ndim != 2):
            return original(self, step_input)  # SAELens' nested decode slices dim 1: its own error
        cfg = self.cfg
        per_level_aux = matryoshka and cfg.use_matryoshka_aux_loss and num_dead > 0
        dead, k_aux, scale = auxk_setup(None if per_level_aux else mask, cfg.d_in, sae_in.device)
        x2, dec_norm, values, indices, aux_pre = _selection(self, sae_in, dead, k_aux)
        x_hat, e_hat = decode_with_auxk(self, values, indices, dec_norm, aux_pre, dead)
        lead = sae_in.shape[:-1]
        sae_out = x_hat.reshape(*lead, cfg.d_in)
        mse_loss = self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        inner_recons = {}
        if matryoshka:
            for width in cfg.matryoshka_widths[:-1]:  # the outer level is the SAE's own output
                inner = torch.where(indices < width, values, values.new_zeros(()))
                inner_recons[width] = _decode(self, inner, indices, dec_norm).reshape(*lead, cfg.d_in)
        if per_level_aux:
            aux_loss = _matryoshka_aux_loss(self, x2, sae_in, sae_out, inner_recons, mask.to(sae_in.device, torch.bool))
        else:
            aux_loss = auxk_loss(self, sae_in, sae_out, e_hat, scale)
        losses = {"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss}
        loss = mse_loss + aux_loss
        for width, recon in inner_recons.items():
            inner_mse = self.mse_loss_fn(recon, sae_in).sum(dim=-1).mean()
            losses[f"inner_mse_loss_{width}"] = inner_mse
            loss = loss + inner_mse
        feature_acts = _dense(values, indices, cfg.d_sae).reshape(*lead, cfg.d_sae)
        _update_threshold(self, values)
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=_hidden_pre(self, sae_in, None if dec_norm is None else dec_norm.detach()),
            loss=loss,
            losses=losses,
            metrics={"topk_threshold": self.topk_threshold},
        )

    training_forward_pass.__fastsae_original__ = original
    return training_forward_pass


def _matryoshka_aux_loss(sae, x2, sae_in, sae_out, inner_recons: dict, mask: torch.Tensor) -> torch.Tensor:
    """SAELens' `use_matryoshka_aux_loss`: per level, its dead latents' top min(d_in / 2, dead)
    pre-activations reconstruct the residual of the reconstruction up to that level. The dead
    latents' pre-activations come from one product over their columns only."""
    cfg = sae.cfg
    dead = mask.nonzero().squeeze(1)
    x_in = x2 - sae.b_dec * cfg.apply_b_dec_to_input
    pre = x_in @ sae.W_enc[:, dead] + sae.b_enc[dead]
    w_dec = sae.W_dec[dead]
    if cfg.rescale_acts_by_decoder_norm:
        norm = sae.W_dec.norm(dim=-1)[dead]
        pre = pre * norm
        w_dec = w_dec / norm[:, None]
    half = cfg.d_in // 2
    losses, start = [], 0
    for width in cfg.matryoshka_widths:
        in_level = (dead >= start) & (dead < width)
        start = width
        count = int(in_level.sum())
        if count == 0:
            continue
        level_pre, level_w = pre[:, in_level], w_dec[in_level]
        top = level_pre.topk(min(half, count), dim=-1, sorted=False)
        acts = torch.zeros_like(level_pre).scatter(-1, top.indices, top.values)
        partial = inner_recons.get(width, sae_out)
        residual = (sae_in - partial).detach()
        loss = (acts @ level_w - residual).pow(2).sum(dim=-1).mean()
        losses.append(min(count / half, 1.0) * loss)
    return cfg.aux_loss_coefficient * torch.stack(losses).sum()


@torch.no_grad()
def _update_threshold(sae, values: torch.Tensor) -> None:
    """SAELens' update: an EMA (in float64) of the smallest positive kept activation."""
    positive = values[values > 0]
    if positive.numel():
        lr = sae.cfg.topk_threshold_lr
        sae.topk_threshold = (1 - lr) * sae.topk_threshold + lr * positive.min().to(sae.topk_threshold.dtype)


def _family_check(sae) -> bool:
    k = getattr(sae.cfg, "k", None)
    # k above d_sae: SAELens' own code raises its error
    return isinstance(k, (int, float)) and 0 < k <= sae.cfg.d_sae and getattr(sae.activation_fn, "k", None) == k


_METHODS = {"encode": _patched_encode, "forward": _patched_forward, "training_forward_pass": _patched_training_forward_pass}
PATCHES = {"BatchTopKTrainingSAE": _METHODS, "MatryoshkaBatchTopKTrainingSAE": _METHODS}
FAMILY_CHECKS = {name: _family_check for name in PATCHES}
