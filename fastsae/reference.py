"""Pure-torch implementations of fastsae's ops.

This module is the oracle every backend is tested against and the `torch` backend (the
fallback that works on any device). It never imports a kernel.

Shapes and layouts (all ops take 2-D activations; the module flattens leading dims):
  x            [N, d_in]
  enc_weight   [d_sae, d_in]   one row per latent (the transpose of SAELens' W_enc)
  W_dec        [d_sae, d_in]   one row per latent (as in SAELens)
  values       [N, m]          activations of the selected latents
  indices      [N, m] int64    which latent each value belongs to
  dec_norm     [d_sae]         decoder row norms, when activations are rescaled by them

Precision: reductions accumulate in at least float32 and results come back in the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsae.sparse import slots_within_rows

# Temporary [rows, m, d] products are processed in chunks of at most this many elements, so
# the fallback's memory stays O(N * d) rather than O(N * m * d).
_CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _row_chunks(n_rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def gather_sum(coef: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """out[n] = sum_j coef[n, j] * weight[indices[n, j]], accumulated in float32 or wider."""
    acc = _acc_dtype(weight.dtype)
    n, m = indices.shape
    if m == 0 or weight.shape[1] == 0:  # nothing to sum (embedding_bag refuses zero-width rows)
        return weight.new_zeros(n, weight.shape[1])
    out = torch.empty(n, weight.shape[1], dtype=acc, device=weight.device)
    w = weight.to(acc)
    for a, b in _row_chunks(n, m * weight.shape[1]):
        out[a:b] = F.embedding_bag(indices[a:b], w, per_sample_weights=coef[a:b].to(acc), mode="sum")
    return out.to(weight.dtype)


def gather_dot(rows: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """out[n, j] = rows[n] . weight[indices[n, j]], accumulated in float32 or wider."""
    acc = _acc_dtype(weight.dtype)
    n, m = indices.shape
    out = torch.empty(n, m, dtype=acc, device=weight.device)
    for a, b in _row_chunks(n, m * weight.shape[1]):
        picked = weight[indices[a:b]].to(acc)  # [rows, m, d]
        out[a:b] = torch.bmm(picked, rows[a:b].to(acc).unsqueeze(-1)).squeeze(-1)
    return out.to(weight.dtype)


def scatter_outer(coef: Tensor, indices: Tensor, rows: Tensor, d_sae: int) -> Tensor:
    """out[i] = sum over (n, j) with indices[n, j] == i of coef[n, j] * rows[n].

    The transpose of `gather_sum`: the gradient of a weight matrix read through `indices`.
    """
    acc = _acc_dtype(rows.dtype)
    n, m = indices.shape
    d = rows.shape[1]
    out = torch.zeros(d_sae, d, dtype=acc, device=rows.device)
    for a, b in _row_chunks(n, m * d):
        contrib = coef[a:b].to(acc).unsqueeze(-1) * rows[a:b].to(acc).unsqueeze(1)  # [rows, m, d]
        out.index_add_(0, indices[a:b].reshape(-1), contrib.reshape((b - a) * m, d))  # d may be 0
    return out.to(rows.dtype)


def scatter_sum(coef: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """out[i] = sum over (n, j) with indices[n, j] == i of coef[n, j]."""
    acc = _acc_dtype(coef.dtype)
    out = torch.zeros(d_sae, dtype=acc, device=coef.device)
    out.index_add_(0, indices.reshape(-1), coef.reshape(-1).to(acc))
    return out.to(coef.dtype)


def pre_activations(
    x: Tensor, enc_weight: Tensor, b_enc: Tensor, b_dec: Optional[Tensor], dec_norm: Optional[Tensor]
) -> Tensor:
    """The dense [N, d_sae] pre-activations, (x - b_dec) W_enc + b_enc, optionally times the
    decoder norms (SAELens' rescale_acts_by_decoder_norm)."""
    x_in = x - b_dec if b_dec is not None else x
    pre = torch.addmm(b_enc, x_in, enc_weight.t())
    if dec_norm is not None:
        pre = pre * dec_norm
    return pre


def topk_encode(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    k: int,
    aux_latents: Optional[Tensor],
    k_aux: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k of the pre-activations per row, ReLU applied to the kept values (SAELens' TopK).

    With `aux_latents` (int64 [C]: latents, -1 for an empty entry; the dead latents, compacted),
    also AuxK's pre-activations (Gao et al.), dense over that list: `aux_select` of the
    pre-activations at the listed latents. Returns (values [N, k], indices [N, k], aux_pre [N, C],
    [N, 0] without a list).
    """
    pre = pre_activations(x, enc_weight, b_enc, b_dec, dec_norm)
    top = pre.topk(k, dim=-1, sorted=False)
    values = top.values.relu()
    if aux_latents is None:
        return values, top.indices, x.new_empty(x.shape[0], 0)
    return values, top.indices, aux_select(aux_columns(pre, aux_latents), aux_latents, k_aux)


def aux_columns(pre: Tensor, aux_latents: Tensor) -> Tensor:
    """pre [N, d_sae] at the listed latents, [N, C] (an empty entry, -1, reads latent 0)."""
    return pre.index_select(1, aux_latents.clamp(min=0))


def aux_select(pre_at: Tensor, aux_latents: Tensor, k_aux: int) -> Tensor:
    """AuxK's selection over a list of latents, the same on every backend.

    pre_at [N, C] holds the pre-activations at `aux_latents` [C]. A row's candidates are the
    entries at a latent (not -1) whose pre-activation is not -inf (a latent switched off by
    b_enc = -inf is no candidate; NaN is one, and ranks first, as in top-k). The row keeps its
    best min(k_aux, candidates) entries, with their raw pre-activations (no ReLU); every other
    entry is -inf, which adds nothing to the aux reconstruction and takes no gradient.
    """
    candidate = (aux_latents >= 0) & (pre_at != float("-inf"))  # NaN != -inf: a candidate
    masked = pre_at.masked_fill(~candidate, float("-inf"))
    if k_aux >= pre_at.shape[1]:
        return masked
    chosen = torch.zeros_like(candidate)
    if k_aux > 0:
        chosen.scatter_(1, masked.topk(k_aux, dim=1, sorted=False).indices, True)
    return masked.masked_fill(~(chosen & candidate), float("-inf"))


def aux_coefficients(aux_pre: Tensor) -> Tensor:
    """AuxK's activations from `aux_select`'s output: -inf (not kept) becomes 0; NaN and +inf
    stay, as a dense decode would carry them."""
    return torch.nan_to_num(aux_pre, nan=float("nan"), posinf=float("inf"), neginf=0.0)


def aux_kept(aux_pre: Tensor) -> Tensor:
    """1 where AuxK kept an entry (not -inf), else 0, in aux_pre's dtype: the mask of its gradient
    (a multiply, several times faster than torch.where on a CPU)."""
    return torch.isneginf(aux_pre).logical_not_().to(aux_pre.dtype)


def aux_norms(aux_latents: Tensor, dec_norm: Tensor) -> Tensor:
    """The decoder norms [C] at the listed latents, 1 at the empty entries (-1): an empty entry's
    coefficient is 0, and 0 / 1 stays 0 where latent 0's norm (which it would read) may be 0."""
    return torch.where(aux_latents >= 0, dec_norm[aux_latents.clamp(min=0)], dec_norm.new_ones(()))


def aux_decode(aux_pre: Tensor, aux_latents: Tensor, W_dec: Tensor, dec_norm: Optional[Tensor]) -> Tensor:
    """AuxK's reconstruction [N, d_in]: sum over the entries j of aux_pre [N, C] that are not -inf
    of aux_pre[n, j] * W_dec[aux_latents[j]] (/ ||W_dec|| when rescaled): a dense product over the
    listed rows of W_dec. Empty entries (latent -1) must be -inf, as `aux_select` leaves them."""
    rows = aux_latents.clamp(min=0)
    coef = aux_coefficients(aux_pre)
    if dec_norm is not None:
        coef = coef / aux_norms(aux_latents, dec_norm)
    return coef @ W_dec[rows]


def threshold_encode(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    cutoff: Tensor,
    max_width: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The row-wise sparse form of the pre-activations above a per-latent cutoff (ReLU, JumpReLU).

    Row n keeps the latents i with not (pre[n, i] <= cutoff[i]), where pre is `pre_activations(...)`:
    those above the cutoff (strictly: one equal to it is not kept) and those whose pre-activation
    is NaN, so that a NaN reaches the activations and the reconstruction as on the dense path
    (relu(NaN) is NaN) instead of vanishing. -inf is never kept, so it can mark padding. Cutoffs
    are finite or +-inf (a NaN cutoff would keep everything).
    Returns (pre_values [N, m], indices [N, m] int64, counts [N] int64):
    - counts[n]: how many latents row n keeps (its true count, even beyond max_width);
    - m = min(max(counts), max_width); row n's first min(counts[n], m) slots hold its kept
      pre-activations in ascending latent order (a row with more than max_width keeps its first
      max_width, and the caller, seeing counts > max_width, takes the dense path instead);
    - the other slots hold pre_value -inf at latent 0, so any activation of them is 0.
    The dense [N, d_sae] matrix is formed a chunk of rows at a time, never whole.
    """
    n, d_in = x.shape
    d_sae = enc_weight.shape[0]
    if n == 0:
        return x.new_empty(0, 0), torch.zeros(0, 0, dtype=torch.int64, device=x.device), torch.zeros(
            0, dtype=torch.int64, device=x.device
        )
    parts = []
    for a, b in _row_chunks(n, d_sae):
        pre = pre_activations(x[a:b], enc_weight, b_enc, b_dec, dec_norm)
        keep = ~(pre <= cutoff)  # above the cutoff, or NaN
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: ascending latent within a row
        counts = keep.sum(1)
        parts.append((rows + a, cols, pre[rows, cols], counts))
    rows = torch.cat([p[0] for p in parts])
    cols = torch.cat([p[1] for p in parts])
    kept = torch.cat([p[2] for p in parts])
    counts = torch.cat([p[3] for p in parts])
    width = min(int(counts.max()), max_width)
    slots = slots_within_rows(rows, counts)
    fits = slots < width
    pre_values = torch.full((n, width), float("-inf"), dtype=x.dtype, device=x.device)
    indices = torch.zeros(n, width, dtype=torch.int64, device=x.device)
    pre_values[rows[fits], slots[fits]] = kept[fits]
    indices[rows[fits], slots[fits]] = cols[fits]
    return pre_values, indices, counts


def topk_encode_backward(
    grad_pre: Tensor, indices: Tensor, x: Tensor, enc_weight: Tensor, b_dec: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the encoder from the gradient of the pre-activations at `indices` only.

    grad_pre [N, m] is d loss / d pre[n, indices[n, j]] (ReLU and decoder-norm factors already
    applied). Returns (grad_x_in, grad_enc_weight, grad_b_enc) where x_in = x - b_dec, so
    grad_x = grad_x_in and grad_b_dec = -grad_x_in.sum(0).
    """
    x_in = x - b_dec if b_dec is not None else x
    d_sae = enc_weight.shape[0]
    grad_x_in = gather_sum(grad_pre, indices, enc_weight).to(x.dtype)
    grad_enc_weight = scatter_outer(grad_pre, indices, x_in, d_sae).to(enc_weight.dtype)
    grad_b_enc = scatter_sum(grad_pre, indices, d_sae).to(enc_weight.dtype)
    return grad_x_in, grad_enc_weight, grad_b_enc


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor], dec_norm: Optional[Tensor]
) -> Tensor:
    """x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]] / dec_norm[indices[n, j]] + b_dec."""
    coef = values / dec_norm[indices] if dec_norm is not None else values
    out = gather_sum(coef, indices, W_dec)
    if b_dec is not None:
        out = out + b_dec
    return out


def sparse_decode_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, dec_norm: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """Returns (grad_values, grad_W_dec) of `sparse_decode` (b_dec's gradient is grad_out.sum(0);
    dec_norm's is -scatter_sum(grad_values * values / dec_norm[indices]))."""
    d_sae = W_dec.shape[0]
    grad_coef = gather_dot(grad_out, indices, W_dec)
    if dec_norm is not None:
        norm = dec_norm[indices]
        coef = values / norm
        grad_values = grad_coef / norm
    else:
        coef = values
        grad_values = grad_coef
    grad_W_dec = scatter_outer(coef, indices, grad_out, d_sae)
    return grad_values.to(values.dtype), grad_W_dec.to(W_dec.dtype)
