"""Matryoshka BatchTopK SAEs (Bussmann et al. 2025; Nabeshima 2024): a BatchTopK SAE whose latents
are split into nested groups, trained so that every prefix of the dictionary reconstructs on its
own. Level w's reconstruction uses the latents < w; the loss adds each inner level's MSE to the
SAE's own (the outer level), as SAELens' `matryoshka_batchtopk` does. Inference is BatchTopK's
(a global threshold), so it saves as JumpReLU like BatchTopK.

The nested losses come from the sparse activations, never a dense [N, d_sae]: each row's kept
entries are sorted by group, each group is one sparse decode of that group's entries only
(padded to the group's widest row), and the levels are the running sums of those partial
reconstructions. The whole costs one decode of the batch's entries plus the padding, not one
decode per level.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastsae import ops
from fastsae.architectures.base import Step, decoder_norm
from fastsae.activations import batch_topk
from fastsae.architectures.batchtopk import BatchTopK
from fastsae.architectures.reference_training import ReferenceTraining, matryoshka_inner_losses
from fastsae.auxk import DeadLatents
from fastsae.losses import mean_squared_norm
from fastsae.sparse import SparseActivations


def default_widths(d_sae: int) -> tuple[int, ...]:
    """Levels that double up to d_sae (d_sae/16, /8, /4, /2, d_sae), fewer for small dictionaries:
    the group sizes of dictionary_learning's examples and the Matryoshka paper's SAEs."""
    widths = [d_sae >> shift for shift in (4, 3, 2, 1) if d_sae >> shift >= 1]
    return tuple(dict.fromkeys((*widths, d_sae)))


def widths_from_group_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """Cumulative level widths (SAELens' `matryoshka_widths`) from group sizes
    (dictionary_learning's `group_sizes`, fastsae's `--matryoshka-groups`)."""
    widths, total = [], 0
    for size in sizes:
        total += int(size)
        widths.append(total)
    return tuple(widths)


def group_sizes_from_widths(widths: Sequence[int]) -> tuple[int, ...]:
    """Group sizes from cumulative level widths (the inverse of `widths_from_group_sizes`)."""
    return tuple(b - a for a, b in zip((0, *widths), widths))


def check_widths(widths, d_sae: int) -> tuple[int, ...]:
    """`widths` as a tuple of strictly increasing positive ints ending at d_sae, or a ValueError
    naming what came."""
    try:
        out = tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        raise ValueError(f"matryoshka_widths: expected a list of integers, got {widths!r}") from None
    if any(isinstance(w, bool) or int(w) != w for w in widths):
        raise ValueError(f"matryoshka_widths: expected a list of integers, got {widths!r}")
    if not out or out[0] < 1 or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"matryoshka_widths: expected strictly increasing positive widths, got {list(out)}")
    if out[-1] != d_sae:
        raise ValueError(
            f"matryoshka_widths: the last level must be d_sae={d_sae} (group sizes must sum to d_sae), "
            f"got widths {list(out)} (group sizes {list(group_sizes_from_widths(out))}, sum {out[-1]})"
        )
    return out


def check_weights(weights, n_levels: int) -> tuple[float, ...]:
    """`weights` as a tuple of n_levels finite non-negative floats, or a ValueError naming what came."""
    try:
        out = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ValueError(f"matryoshka_weights: expected a list of numbers, got {weights!r}") from None
    if len(out) != n_levels or not all(math.isfinite(w) and w >= 0 for w in out):
        raise ValueError(
            f"matryoshka_weights: expected {n_levels} finite non-negative numbers (one per level of "
            f"matryoshka_widths), got {list(out)}"
        )
    return out


class MatryoshkaBatchTopK(BatchTopK):
    name = "matryoshka_batchtopk"
    config_options = BatchTopK.config_options + ("matryoshka_widths", "matryoshka_weights")
    dictionary_learning_class = "MatryoshkaBatchTopKSAE"  # the dictionary_learning module fastsae saves it as

    # SAELens' MatryoshkaBatchTopKTrainingSAE, densely (fastsae.bench's baselines and peers).
    reference_training = ReferenceTraining(
        "MatryoshkaBatchTopKTrainingSAE", activate=lambda model, pre: batch_topk(pre.relu(), model.cfg.k),
        saelens_config=("matryoshka_widths",), nested=matryoshka_inner_losses,
    )

    def complete_config(self, cfg) -> None:
        super().complete_config(cfg)
        cfg.matryoshka_widths = check_widths(
            cfg.matryoshka_widths if cfg.matryoshka_widths is not None else default_widths(cfg.d_sae), cfg.d_sae
        )
        if cfg.matryoshka_weights is not None:
            cfg.matryoshka_weights = check_weights(cfg.matryoshka_weights, len(cfg.matryoshka_widths))

    def training_step(self, sae, x2: Tensor, coefficient: float, dead: Optional[DeadLatents], k_aux: int, target=None) -> Step:
        target = x2 if target is None else target  # every level is compared with it
        sparse = self._sparse_selection(sae, x2, dead, k_aux)
        if sparse is None:  # the dense path (traced, or the sparse path off)
            step = super().training_step(sae, x2, coefficient, dead, k_aux, target)
            step.nested = _nested_loss(sae, _dense_levels(sae, step.acts), step.x_hat, target)
            return step
        values, indices, aux_pre = sparse
        levels = _level_reconstructions(sae, values, indices, with_outer=True, dead=dead, aux_pre=aux_pre)
        x_hat, aux_recon = levels.pop()
        self._update_threshold(sae, values)
        zero = x2.new_zeros(())
        step = Step(x_hat, SparseActivations(values, indices, sae.d_sae), zero, zero, aux_recon)
        step.nested = _nested_loss(sae, [recon for recon, _ in levels], x_hat, target)
        return step


def _dense_levels(sae, acts: Tensor) -> list[Tensor]:
    """The inner levels' reconstructions from dense activations [N, d_sae] (the traced path)."""
    dec_norm = decoder_norm(sae)
    if dec_norm is not None:
        acts = acts / dec_norm
    out, running, start = [], sae.b_dec, 0
    for width in sae.cfg.matryoshka_widths[:-1]:
        running = running + acts[:, start:width] @ sae.W_dec[start:width]
        out.append(running)
        start = width
    return out


def _nested_loss(sae, inner_levels, x_hat: Tensor, target: Tensor) -> Tensor:
    """The levels' losses beyond the SAE's own MSE (which is the outer level's, weight 1): the
    inner levels' MSEs against the target, each times its weight, plus (w_outer - 1) times the
    outer MSE, so that the whole loss is sum_l w_l MSE_l (all w_l = 1 without `matryoshka_weights`)."""
    weights = sae.cfg.matryoshka_weights
    loss = target.new_zeros(())
    for level, recon in enumerate(inner_levels):
        mse = mean_squared_norm(recon, target)
        loss = loss + (mse if weights is None else weights[level] * mse)
    if weights is not None and weights[-1] != 1:
        loss = loss + (weights[-1] - 1) * mean_squared_norm(x_hat, target)
    return loss


def _level_reconstructions(sae, values: Tensor, indices: Tensor, with_outer: bool, dead=None, aux_pre=None):
    """Each level's reconstruction b_dec + sum of the groups up to it, from one sparse decode per
    group over that group's entries only. With `with_outer`, the last item is (x_hat, AuxK's
    reconstruction or None) and the inner ones (recon, None); without, only the inner levels'
    reconstructions."""
    widths = sae.cfg.matryoshka_widths
    n_groups = len(widths) if with_outer else len(widths) - 1
    if n_groups == 0:
        return []
    dec_norm = decoder_norm(sae)
    n, m = values.shape
    bounds = torch.tensor(widths[:-1], dtype=indices.dtype, device=indices.device)
    group = torch.bucketize(indices, bounds, right=True)  # group g holds latents [w_{g-1}, w_g)
    order = torch.sort(group, dim=1, stable=True).indices
    counts = torch.zeros(n, len(widths), dtype=torch.int64, device=indices.device)
    counts.scatter_add_(1, group, torch.ones_like(group))
    starts = counts.cumsum(1) - counts
    widest = counts.amax(0).tolist() if n else [0] * len(widths)  # one host read for every group
    out, running = [], sae.b_dec
    for g in range(n_groups):
        slots = torch.arange(max(widest[g], 1), device=indices.device)
        valid = slots < counts[:, g : g + 1]
        pick = order.gather(1, (starts[:, g : g + 1] + slots).clamp(max=max(m - 1, 0)))
        v = torch.where(valid, values.gather(1, pick), values.new_zeros(()))
        i = indices.gather(1, pick)
        last = with_outer and g == n_groups - 1
        if last and dead is not None:
            partial, aux_recon = ops.sparse_decode_with_aux(
                v, i, sae.W_dec, None, dec_norm, aux_pre, dead.latents, check_indices=False
            )
        else:
            partial = ops.sparse_decode(v, i, sae.W_dec, None, dec_norm, check_indices=False)
            aux_recon = None
        running = running + partial
        out.append((running, aux_recon) if with_outer else running)
    return out
