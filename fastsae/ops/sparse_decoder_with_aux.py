"""The sparse decode and AuxK's reconstruction in one op, fastsae::sparse_decode_with_aux, whose
backward writes one decoder gradient: the checked public wrapper, the op, its fake and its
autograd formula (on top of the sparse decoder's, `sparse_decoder.decoder_grads`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import reference, validation
from fastsae.ops import dispatch
from fastsae.ops.checking import call_checked, op_checks, wrapper_reads_ranges
from fastsae.ops.sparse_decoder import decoder_grads, save_decoder_inputs


def sparse_decode_with_aux(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    aux_pre: Tensor,
    aux_latents: Tensor,
    *,
    check_indices: bool = True,
) -> tuple[Tensor, Tensor]:
    """The sparse decode and AuxK's reconstruction in one op, whose backward writes one decoder
    gradient: (x_hat [N, d_in], e_hat [N, d_in]) with e_hat = `fastsae.reference.aux_decode` of
    `topk_encode`'s aux_pre [N, C] over aux_latents [C] (a dense product over those rows of W_dec)."""
    validation.check_sparse_decode_with_aux(
        values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, wrapper_reads_ranges(check_indices)
    )
    return call_checked(
        torch.ops.fastsae.sparse_decode_with_aux, values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents,
        check_indices,
    )


# ---------------------------------------------------------------- the op


@torch.library.custom_op("fastsae::sparse_decode_with_aux", mutates_args=())
def sparse_decode_with_aux_op(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    aux_pre: Tensor,
    aux_latents: Tensor,
    check_indices: bool = True,
) -> tuple[Tensor, Tensor]:
    if op_checks():
        validation.check_sparse_decode_with_aux(values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, check_indices)
    x_hat = dispatch.backend(values.device, W_dec.shape[1]).sparse_decode(values, indices, W_dec, b_dec, dec_norm)
    # AuxK's reconstruction: one dense product over the listed rows of W_dec, on every backend.
    return x_hat, reference.aux_decode(aux_pre, aux_latents, W_dec, dec_norm)


@sparse_decode_with_aux_op.register_fake
def _(values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, check_indices=True):
    if op_checks():
        validation.check_sparse_decode_with_aux(values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, False)
    shape = (values.shape[0], W_dec.shape[1])
    return W_dec.new_empty(shape), W_dec.new_empty(shape)


# ---------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, _check_indices = inputs
    save_decoder_inputs(ctx, b_dec, dec_norm, values, indices, W_dec, aux_pre, aux_latents)


def _backward(ctx, grad_out, grad_aux_out):
    values, indices, W_dec, dec_norm, aux_pre, aux_latents = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(values.shape[0], W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
    grad_values, grad_W_dec, grad_b_dec, grad_dec_norm = decoder_grads(ctx, grad_out, values, indices, W_dec, dec_norm)
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


sparse_decode_with_aux_op.register_autograd(_backward, setup_context=_setup_context)
