"""fastsae's torch.library custom ops: schemas, fake (meta) implementations and autograd.

Each op's real implementation asks `dispatch.select` for the backend at call time, so the
FASTSAE_BACKEND variable and `use_backend` apply to eager and compiled code alike.

Forward ops:  fastsae::topk_encode, fastsae::threshold_encode, fastsae::sparse_decode
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
    dead_mask: Optional[Tensor],
    k_aux: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    validation.check_topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, dead_mask, k_aux)
    backend = _backend(x, x.shape[1])
    return backend.topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, dead_mask if k_aux else None, k_aux)


@topk_encode.register_fake
def _(x, enc_weight, b_enc, b_dec, dec_norm, k, dead_mask, k_aux):
    validation.check_topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, dead_mask, k_aux)
    n = x.shape[0]
    return (
        x.new_empty(n, k),
        x.new_empty(n, k, dtype=torch.int64),
        x.new_empty(n, k_aux),
        x.new_empty(n, k_aux, dtype=torch.int64),
    )


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
    x, enc_weight, b_enc, b_dec, dec_norm, k, dead_mask, k_aux = inputs
    values, indices, aux_values, aux_indices = output
    ctx.has_b_dec = b_dec is not None
    ctx.has_dec_norm = dec_norm is not None
    ctx.k_aux = k_aux
    ctx.save_for_backward(x, enc_weight, b_dec, dec_norm, dead_mask, values, indices, aux_values, aux_indices)


def _encoder_grads(ctx, grad_act: Tensor, acts: Tensor, idx: Tensor, x, enc_weight, b_dec, dec_norm):
    """The encoder's input gradients from d loss / d act at the [N, m] selected entries, where
    act = pre (times dec_norm when rescaled); grad_act is already zero wherever act is constant."""
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
    grad_b_dec = -grad_x_in.sum(0) if ctx.has_b_dec else None
    return grad_x_in, grad_enc_weight, grad_b_enc, grad_b_dec, grad_dec_norm


def _topk_encode_grad(ctx, grad_values, grad_indices, grad_aux_values, grad_aux_indices):
    x, enc_weight, b_dec, dec_norm, dead_mask, values, indices, aux_values, aux_indices = ctx.saved_tensors
    if grad_values is None:
        grad_values = torch.zeros_like(values)
    # ReLU on the kept values: no gradient where the value was clamped to zero.
    grad_act = torch.where(values > 0, grad_values, torch.zeros_like(grad_values))
    acts, idx = values, indices
    if ctx.k_aux > 0 and grad_aux_values is not None:
        # Aux slots past the number of dead latents are constants.
        grad_aux = torch.where(dead_mask[aux_indices], grad_aux_values, torch.zeros_like(grad_aux_values))
        grad_act = torch.cat([grad_act, grad_aux], dim=1)
        acts = torch.cat([values, aux_values], dim=1)
        idx = torch.cat([indices, aux_indices], dim=1)
    grads = _encoder_grads(ctx, grad_act, acts, idx, x, enc_weight, b_dec, dec_norm)
    return *grads, None, None, None


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


def _sparse_decode_grad(ctx, grad_out):
    values, indices, W_dec, dec_norm = ctx.saved_tensors
    # The forward checked (or was told to trust) these indices: no second check, no host sync.
    grad_values, grad_W_dec = sparse_decode_backward(grad_out.contiguous(), values, indices, W_dec, dec_norm, False)
    grad_b_dec = grad_out.sum(0) if ctx.has_b_dec else None
    grad_dec_norm = None
    if ctx.has_dec_norm:
        # out uses values / norm: d/d norm = -grad_coef * values / norm^2 = -grad_values * values / norm.
        grad_dec_norm = -reference.scatter_sum(grad_values * values / dec_norm[indices], indices, dec_norm.shape[0])
    return grad_values, None, grad_W_dec, grad_b_dec, grad_dec_norm, None


torch.library.register_autograd("fastsae::sparse_decode", _sparse_decode_grad, setup_context=_sparse_decode_setup)
