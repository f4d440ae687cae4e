"""The sparse decoder: fastsae::sparse_decode and its backward op fastsae::sparse_decode_backward,
with the checked public wrapper, their one fake each and the autograd formula (whose
`decoder_grads` the decode with AuxK shares)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import reference, validation
from fastsae.ops import dispatch
from fastsae.ops.checking import call_checked, op_checks, wrapper_reads_ranges


def sparse_decode(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Optional[Tensor] = None,
    dec_norm: Optional[Tensor] = None,
    *,
    check_indices: bool = True,
) -> Tensor:
    """Sparse decode: values, indices [N, m], W_dec [d_sae, d_in] -> [N, d_in]; see
    `fastsae.reference.sparse_decode`.

    Indices outside [0, d_sae) raise a ValueError. `check_indices=False` skips that check, which
    reads the indices (a host sync on a GPU): for indices that fastsae's own encoders produced,
    as the SAE module's training step passes them. The range is read on real tensors only: here
    when called eagerly, inside the op at run time under torch.compile (never in traced code)."""
    validation.check_sparse_decode(values, indices, W_dec, b_dec, dec_norm, wrapper_reads_ranges(check_indices))
    return call_checked(torch.ops.fastsae.sparse_decode, values, indices, W_dec, b_dec, dec_norm, check_indices)


# ---------------------------------------------------------------- the ops


def fake_sparse_decode(values, indices, W_dec, b_dec, dec_norm):
    """An empty [N, d_in]: the fake of fastsae::sparse_decode and of fastsae_cpp::sparse_decode."""
    return W_dec.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("fastsae::sparse_decode", mutates_args=())
def sparse_decode_op(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    check_indices: bool = True,
) -> Tensor:
    if op_checks():
        validation.check_sparse_decode(values, indices, W_dec, b_dec, dec_norm, check_indices)
    return dispatch.backend(values.device, W_dec.shape[1]).sparse_decode(values, indices, W_dec, b_dec, dec_norm)


@sparse_decode_op.register_fake
def _(values, indices, W_dec, b_dec, dec_norm, check_indices=True):
    if op_checks():
        validation.check_sparse_decode(values, indices, W_dec, b_dec, dec_norm, check_range=False)
    return fake_sparse_decode(values, indices, W_dec, b_dec, dec_norm)


def fake_sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm):
    """Empty (grad_values, grad_W_dec): the fake of fastsae::sparse_decode_backward and of
    fastsae_cpp::sparse_decode_backward."""
    return torch.empty_like(values), torch.empty_like(W_dec)


@torch.library.custom_op("fastsae::sparse_decode_backward", mutates_args=())
def sparse_decode_backward_op(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    dec_norm: Optional[Tensor],
    check_indices: bool = True,
) -> tuple[Tensor, Tensor]:
    validation.check_sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm, check_indices)
    backend = dispatch.backend(values.device, W_dec.shape[1])
    return backend.sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm)


@sparse_decode_backward_op.register_fake
def _(grad_out, values, indices, W_dec, dec_norm, check_indices=True):
    validation.check_sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm, check_range=False)
    return fake_sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm)


# ---------------------------------------------------------------- autograd


def save_decoder_inputs(ctx, b_dec, dec_norm, values, indices, W_dec, *more) -> None:
    """What `decoder_grads` needs of the forward: which optional inputs came, and the tensors
    (values, indices, W_dec, dec_norm, then the op's own `more`)."""
    ctx.has_b_dec = b_dec is not None
    ctx.has_dec_norm = dec_norm is not None
    ctx.save_for_backward(values, indices, W_dec, dec_norm, *more)


def decoder_grads(ctx, grad_out, values, indices, W_dec, dec_norm):
    """(grad_values, grad_W_dec, grad_b_dec, grad_dec_norm) of the sparse decode."""
    # The forward checked (or was told to trust) these indices: no second check, no host sync.
    grad_values, grad_W_dec = sparse_decode_backward_op(grad_out.contiguous(), values, indices, W_dec, dec_norm, False)
    grad_b_dec = grad_out.sum(0) if ctx.has_b_dec else None
    grad_dec_norm = None
    if ctx.has_dec_norm:
        # out uses values / norm: d/d norm = -grad_coef * values / norm^2 = -grad_values * values / norm.
        grad_dec_norm = -reference.scatter_sum(grad_values * values / dec_norm[indices], indices, dec_norm.shape[0])
    return grad_values, grad_W_dec, grad_b_dec, grad_dec_norm


def _setup_context(ctx, inputs, output):
    values, indices, W_dec, b_dec, dec_norm, _check_indices = inputs
    save_decoder_inputs(ctx, b_dec, dec_norm, values, indices, W_dec)


def _backward(ctx, grad_out):
    values, indices, W_dec, dec_norm = ctx.saved_tensors
    grad_values, grad_W_dec, grad_b_dec, grad_dec_norm = decoder_grads(ctx, grad_out, values, indices, W_dec, dec_norm)
    return grad_values, None, grad_W_dec, grad_b_dec, grad_dec_norm, None


sparse_decode_op.register_autograd(_backward, setup_context=_setup_context)
