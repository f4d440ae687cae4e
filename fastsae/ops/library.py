"""fastsae's torch.library custom ops: schemas, fake (meta) implementations and autograd.

Each op's real implementation asks `dispatch.select` for the backend at call time, so the
FASTSAE_BACKEND variable and `use_backend` apply to eager and compiled code alike.

Forward ops:  fastsae::topk_encode, fastsae::threshold_encode, fastsae::sparse_decode,
              fastsae::sparse_decode_with_aux (the decode and AuxK's dense one, one gradient)
Backward ops: fastsae::topk_encode_backward (shared by both encoders), fastsae::sparse_decode_backward

Every op, real and fake implementation alike, first runs its check from `fastsae.validation`:
one input contract whichever backend runs, for `fastsae.ops` and for direct calls of
`torch.ops.fastsae.*` (torch.compile's graphs, users). The ops that read indices take
`check_indices` (default True): False skips the index range check, which costs a host sync on an
accelerator, for indices fastsae produced itself (see `validation.check_index_range`).
The autograd glue below does the cheap [N, k] elementwise work (ReLU mask, decoder-norm
factors, bias sums) in torch and hands the heavy sparse products to the backward ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import reference, validation
from fastsae.ops import dispatch
from fastsae.sparse import pad_at_free_latents


def _backend(t: Tensor, d_in: Optional[int] = None):
    return dispatch.select(t.device, d_in)[1]


# ---------------------------------------------------------------- topk_encode


@torch.library.custom_op("fastsae::topk_encode", mutates_args=())
def topk_encode(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    k: int,
    aux_latents: Optional[Tensor],
    k_aux: int,
    check_indices: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    validation.check_topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, check_indices)
    backend = _backend(x, x.shape[1])
    return backend.topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux)


@topk_encode.register_fake
def _(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, check_indices=True):
    validation.check_topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, check_range=False)
    n = x.shape[0]
    width = aux_latents.shape[0] if aux_latents is not None else 0
    return x.new_empty(n, k), x.new_empty(n, k, dtype=torch.int64), x.new_empty(n, width)


@torch.library.custom_op("fastsae::topk_encode_backward", mutates_args=())
def topk_encode_backward(
    grad_pre: Tensor,
    indices: Tensor,
    x: Tensor,
    enc_weight: Tensor,
    b_dec: Optional[Tensor],
    check_indices: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    validation.check_topk_encode_backward(grad_pre, indices, x, enc_weight, b_dec, check_indices)
    return _backend(x, x.shape[1]).topk_encode_backward(grad_pre, indices, x, enc_weight, b_dec)


@topk_encode_backward.register_fake
def _(grad_pre, indices, x, enc_weight, b_dec, check_indices=True):
    validation.check_topk_encode_backward(grad_pre, indices, x, enc_weight, b_dec, check_range=False)
    return torch.empty_like(x), torch.empty_like(enc_weight), enc_weight.new_empty(enc_weight.shape[0])


def _topk_encode_setup(ctx, inputs, output):
    x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, _check_indices = inputs
    values, indices, aux_pre = output
    ctx.has_b_dec = b_dec is not None
    ctx.has_dec_norm = dec_norm is not None
    ctx.save_for_backward(x, enc_weight, b_dec, dec_norm, values, indices, aux_latents, aux_pre)


def _encoder_grads(ctx, grad_act: Tensor, acts: Tensor, idx: Tensor, x, enc_weight, b_dec, dec_norm, aux=None):
    """The encoder's input gradients from d loss / d act at the [N, m] selected entries, where
    act = pre (times dec_norm when rescaled); grad_act is already zero wherever act is constant.
    `aux`: AuxK's (grad_aux [N, C], aux_pre [N, C], aux_latents [C]), dense over its list of
    latents (grad_aux zero wherever aux_pre is -inf): added by dense products over the listed
    rows, into the tensors the sparse backward returned."""
    grad_dec_norm = None
    if ctx.has_dec_norm:
        norm = dec_norm[idx]
        # act = pre * norm: d act/d pre = norm, d act/d norm = pre = act / norm.
        grad_pre = grad_act * norm
        grad_dec_norm = reference.scatter_sum(grad_act * acts / norm, idx, dec_norm.shape[0])
    else:
        grad_pre = grad_act
    # The indices are the forward's own output (or checked by it): no range check, no host sync.
    grad_x_in, grad_enc_weight, grad_b_enc = topk_encode_backward(grad_pre, idx, x, enc_weight, b_dec, False)
    if aux is not None:
        grad_aux, aux_pre, aux_latents = aux
        rows = aux_latents.clamp(min=0)  # an empty entry (-1) has no gradient: it adds 0 at latent 0
        if ctx.has_dec_norm:
            norm = reference.aux_norms(aux_latents, dec_norm)
            grad_dec_norm.index_add_(0, rows, (grad_aux * reference.aux_coefficients(aux_pre) / norm).sum(0))
            grad_aux = grad_aux * norm
        # G^T (x - b_dec) = G^T x - (column sums of G) b_dec: a rank-one term instead of x - b_dec.
        column_sums = grad_aux.sum(0)
        grad_rows = grad_aux.t() @ x
        if b_dec is not None:
            grad_rows.sub_(column_sums[:, None] * b_dec)
        grad_enc_weight.index_add_(0, rows, grad_rows)
        grad_b_enc.index_add_(0, rows, column_sums)
        enc_rows = enc_weight[rows]
        if ctx.needs_input_grad[0]:
            grad_x_in = grad_x_in + grad_aux @ enc_rows
            grad_b_dec = -grad_x_in.sum(0) if ctx.has_b_dec else None
        else:  # x takes no gradient: b_dec's needs only the column sums, not the [N, d_in] product
            grad_b_dec = -(grad_x_in.sum(0) + column_sums @ enc_rows) if ctx.has_b_dec else None
    else:
        grad_b_dec = -grad_x_in.sum(0) if ctx.has_b_dec else None
    return grad_x_in, grad_enc_weight, grad_b_enc, grad_b_dec, grad_dec_norm


def _topk_encode_grad(ctx, grad_values, grad_indices, grad_aux_pre):
    x, enc_weight, b_dec, dec_norm, values, indices, aux_latents, aux_pre = ctx.saved_tensors
    if grad_values is None:
        grad_values = torch.zeros_like(values)
    # ReLU on the kept values: no gradient where the value was clamped to zero.
    grad_act = torch.where(values > 0, grad_values, torch.zeros_like(grad_values))
    aux = None
    if aux_latents is not None and aux_pre.shape[1] and grad_aux_pre is not None:
        # Entries AuxK did not keep (-inf) are constants.
        aux = (grad_aux_pre * reference.aux_kept(aux_pre), aux_pre, aux_latents)
    grads = _encoder_grads(ctx, grad_act, values, indices, x, enc_weight, b_dec, dec_norm, aux)
    return *grads, None, None, None, None


torch.library.register_autograd("fastsae::topk_encode", _topk_encode_grad, setup_context=_topk_encode_setup)


# ---------------------------------------------------------------- threshold_encode


@torch.library.custom_op("fastsae::threshold_encode", mutates_args=())
def threshold_encode(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    cutoff: Tensor,
    max_width: int,
) -> tuple[Tensor, Tensor, Tensor]:
    validation.check_threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)
    return _backend(x, x.shape[1]).threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)


@threshold_encode.register_fake
def _(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width):
    validation.check_threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)
    # The width is the batch's largest kept count (capped): known only once the kernel has run.
    width = torch.library.get_ctx().new_dynamic_size(max=max_width)
    n = x.shape[0]
    return x.new_empty(n, width), x.new_empty(n, width, dtype=torch.int64), x.new_empty(n, dtype=torch.int64)


def _threshold_encode_setup(ctx, inputs, output):
    x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width = inputs
    pre_values, indices, counts = output
    ctx.has_b_dec = b_dec is not None
    ctx.has_dec_norm = dec_norm is not None
    ctx.save_for_backward(x, enc_weight, b_dec, dec_norm, pre_values, indices)


def _threshold_encode_grad(ctx, grad_pre_values, grad_indices, grad_counts):
    x, enc_weight, b_dec, dec_norm, pre_values, indices = ctx.saved_tensors
    # Padding slots hold -inf (never a kept value: kept ones exceed a cutoff or are NaN) and take
    # no gradient.
    padding = pre_values == float("-inf")
    zero = torch.zeros((), dtype=pre_values.dtype, device=pre_values.device)
    grad_act = torch.where(padding, zero, grad_pre_values)
    acts = torch.where(padding, zero, pre_values)
    # The kernels group the backward by latent: padding spread over latents (its gradient is 0)
    # rather than all at latent 0, whose group would hold every row's padding.
    indices = pad_at_free_latents(~padding, indices, enc_weight.shape[0], traceable=True)
    grads = _encoder_grads(ctx, grad_act, acts, indices, x, enc_weight, b_dec, dec_norm)
    return *grads, None, None


torch.library.register_autograd(
    "fastsae::threshold_encode", _threshold_encode_grad, setup_context=_threshold_encode_setup
)


# ---------------------------------------------------------------- sparse_decode


@torch.library.custom_op("fastsae::sparse_decode", mutates_args=())
def sparse_decode(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    check_indices: bool = True,
) -> Tensor:
    validation.check_sparse_decode(values, indices, W_dec, b_dec, dec_norm, check_indices)
    return _backend(values, W_dec.shape[1]).sparse_decode(values, indices, W_dec, b_dec, dec_norm)


@sparse_decode.register_fake
def _(values, indices, W_dec, b_dec, dec_norm, check_indices=True):
    validation.check_sparse_decode(values, indices, W_dec, b_dec, dec_norm, check_range=False)
    return W_dec.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("fastsae::sparse_decode_backward", mutates_args=())
def sparse_decode_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    dec_norm: Optional[Tensor],
    check_indices: bool = True,
) -> tuple[Tensor, Tensor]:
    validation.check_sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm, check_indices)
    return _backend(values, W_dec.shape[1]).sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm)


@sparse_decode_backward.register_fake
def _(grad_out, values, indices, W_dec, dec_norm, check_indices=True):
    validation.check_sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm, check_range=False)
    return torch.empty_like(values), torch.empty_like(W_dec)


def _sparse_decode_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec, dec_norm, _check_indices = inputs
    ctx.has_b_dec = b_dec is not None
    ctx.has_dec_norm = dec_norm is not None
    ctx.save_for_backward(values, indices, W_dec, dec_norm)


def _decode_grads(ctx, grad_out, values, indices, W_dec, dec_norm):
    """(grad_values, grad_W_dec, grad_b_dec, grad_dec_norm) of the sparse decode."""
    # The forward checked (or was told to trust) these indices: no second check, no host sync.
    grad_values, grad_W_dec = sparse_decode_backward(grad_out.contiguous(), values, indices, W_dec, dec_norm, False)
    grad_b_dec = grad_out.sum(0) if ctx.has_b_dec else None
    grad_dec_norm = None
    if ctx.has_dec_norm:
        # out uses values / norm: d/d norm = -grad_coef * values / norm^2 = -grad_values * values / norm.
        grad_dec_norm = -reference.scatter_sum(grad_values * values / dec_norm[indices], indices, dec_norm.shape[0])
    return grad_values, grad_W_dec, grad_b_dec, grad_dec_norm


def _sparse_decode_grad(ctx, grad_out):
    values, indices, W_dec, dec_norm = ctx.saved_tensors
    grad_values, grad_W_dec, grad_b_dec, grad_dec_norm = _decode_grads(ctx, grad_out, values, indices, W_dec, dec_norm)
    return grad_values, None, grad_W_dec, grad_b_dec, grad_dec_norm, None


torch.library.register_autograd("fastsae::sparse_decode", _sparse_decode_grad, setup_context=_sparse_decode_setup)


# ---------------------------------------------------------------- sparse_decode_with_aux


@torch.library.custom_op("fastsae::sparse_decode_with_aux", mutates_args=())
def sparse_decode_with_aux(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    aux_pre: Tensor,
    aux_latents: Tensor,
    check_indices: bool = True,
) -> tuple[Tensor, Tensor]:
    validation.check_sparse_decode_with_aux(values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, check_indices)
    x_hat = _backend(values, W_dec.shape[1]).sparse_decode(values, indices, W_dec, b_dec, dec_norm)
    # AuxK's reconstruction: one dense product over the listed rows of W_dec, on every backend.
    return x_hat, reference.aux_decode(aux_pre, aux_latents, W_dec, dec_norm)


@sparse_decode_with_aux.register_fake
def _(values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, check_indices=True):
    validation.check_sparse_decode_with_aux(values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, False)
    shape = (values.shape[0], W_dec.shape[1])
    return W_dec.new_empty(shape), W_dec.new_empty(shape)


def _sparse_decode_with_aux_setup(ctx, inputs, output):
    values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, _check_indices = inputs
    ctx.has_b_dec = b_dec is not None
    ctx.has_dec_norm = dec_norm is not None
    ctx.save_for_backward(values, indices, W_dec, dec_norm, aux_pre, aux_latents)


def _sparse_decode_with_aux_grad(ctx, grad_out, grad_aux_out):
    values, indices, W_dec, dec_norm, aux_pre, aux_latents = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(values.shape[0], W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    grad_values, grad_W_dec, grad_b_dec, grad_dec_norm = _decode_grads(ctx, grad_out, values, indices, W_dec, dec_norm)
    grad_aux_pre = None
    if grad_aux_out is not None and aux_latents.shape[0]:
        # e = coef @ W_dec[rows], coef = aux_pre (0 where -inf) / norm: dense products over the
        # listed rows, added in place to the decoder gradient the sparse backward made (no second
        # [d_sae, d_in] tensor for autograd to sum).
        rows = aux_latents.clamp(min=0)
        coef = reference.aux_coefficients(aux_pre)
        if ctx.has_dec_norm:
            norm = reference.aux_norms(aux_latents, dec_norm)
            coef = coef / norm
        grad_coef = grad_aux_out @ W_dec[rows].t()
        grad_W_dec.index_add_(0, rows, coef.t() @ grad_aux_out)
        if ctx.has_dec_norm:
            grad_dec_norm.index_add_(0, rows, -(grad_coef * coef / norm).sum(0))
            grad_coef = grad_coef / norm
        grad_aux_pre = grad_coef.mul_(reference.aux_kept(aux_pre))
    return grad_values, None, grad_W_dec, grad_b_dec, grad_dec_norm, grad_aux_pre, None, None


torch.library.register_autograd(
    "fastsae::sparse_decode_with_aux", _sparse_decode_with_aux_grad, setup_context=_sparse_decode_with_aux_setup
)
