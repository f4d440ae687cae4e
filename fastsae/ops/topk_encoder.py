"""The TopK encoder: fastsae::topk_encode (with AuxK's pre-activations) and
fastsae::topk_encode_backward, the encoder backward that the threshold encoder shares
(`encoder_grads`). Here: the checked public wrapper, the custom ops, their one fake each and
the autograd formula.

The real implementations ask `dispatch` for the backend at call time, so FASTSAE_BACKEND and
`use_backend` apply to eager and compiled code alike. The autograd glue does the cheap [N, k]
elementwise work (ReLU mask, decoder-norm factors, bias sums) in torch and hands the heavy
sparse products to the backward op.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import reference, validation
from fastsae.ops import dispatch
from fastsae.ops.checking import call_checked, op_checks, wrapper_reads_ranges


def topk_encode(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    k: int,
    aux_latents: Optional[Tensor] = None,
    k_aux: int = 0,
    *,
    check_indices: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused TopK encode. x [N, d_in], enc_weight [d_sae, d_in] -> (values [N, k], indices [N, k],
    aux_pre [N, C]): with `aux_latents` (int64 [C], latents or -1; `fastsae.DeadLatents`), AuxK's
    pre-activations at those latents, each row's best k_aux kept and -inf elsewhere; see
    `fastsae.reference.topk_encode`. `check_indices=False` skips reading aux_latents' range (a host
    sync on a GPU), for lists fastsae built."""
    validation.check_topk_encode(
        x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, wrapper_reads_ranges(check_indices)
    )
    return call_checked(
        torch.ops.fastsae.topk_encode, x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, check_indices
    )


# ---------------------------------------------------------------- the ops


def fake_topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux):
    """Empty outputs of topk_encode's shapes and dtypes: the fake of fastsae::topk_encode and of
    the kernel op behind the cpp and cuda backends (fastsae_cpp::topk_encode)."""
    n = x.shape[0]
    width = aux_latents.shape[0] if aux_latents is not None else 0
    return x.new_empty(n, k), x.new_empty(n, k, dtype=torch.int64), x.new_empty(n, width)


@torch.library.custom_op("fastsae::topk_encode", mutates_args=())
def topk_encode_op(
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
    if op_checks():
        validation.check_topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, check_indices)
    backend = dispatch.backend(x.device, x.shape[1])
    return backend.topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux)


@topk_encode_op.register_fake
def _(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, check_indices=True):
    if op_checks():
        validation.check_topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, check_range=False)
    return fake_topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux)


def fake_topk_encode_backward(grad_pre, indices, x, enc_weight, b_dec):
    """Empty (grad_x_in, grad_enc_weight, grad_b_enc): the fake of fastsae::topk_encode_backward
    and of fastsae_cpp::topk_encode_backward."""
    return torch.empty_like(x), torch.empty_like(enc_weight), enc_weight.new_empty(enc_weight.shape[0])


@torch.library.custom_op("fastsae::topk_encode_backward", mutates_args=())
def topk_encode_backward_op(
    grad_pre: Tensor,
    indices: Tensor,
    x: Tensor,
    enc_weight: Tensor,
    b_dec: Optional[Tensor],
    check_indices: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    validation.check_topk_encode_backward(grad_pre, indices, x, enc_weight, b_dec, check_indices)
    backend = dispatch.backend(x.device, x.shape[1])
    return backend.topk_encode_backward(grad_pre, indices, x, enc_weight, b_dec)


@topk_encode_backward_op.register_fake
def _(grad_pre, indices, x, enc_weight, b_dec, check_indices=True):
    validation.check_topk_encode_backward(grad_pre, indices, x, enc_weight, b_dec, check_range=False)
    return fake_topk_encode_backward(grad_pre, indices, x, enc_weight, b_dec)


# ---------------------------------------------------------------- autograd


def save_encoder_inputs(ctx, x, enc_weight, b_dec, dec_norm, *selected) -> None:
    """What `encoder_grads` needs of the forward: which optional inputs came, and the tensors
    (x, enc_weight, b_dec, dec_norm, then the op's own `selected` ones)."""
    ctx.has_b_dec = b_dec is not None
    ctx.has_dec_norm = dec_norm is not None
    ctx.save_for_backward(x, enc_weight, b_dec, dec_norm, *selected)


def encoder_grads(ctx, grad_act: Tensor, acts: Tensor, idx: Tensor, x, enc_weight, b_dec, dec_norm, aux=None):
    """The encoder's input gradients from d loss / d act at the [N, m] selected entries, where
    act = pre (times dec_norm when rescaled); grad_act is already zero wherever act is constant.
    `aux`: AuxK's (grad_aux [N, C], aux_pre [N, C], aux_latents [C]), dense over its list of
    latents (grad_aux zero wherever aux_pre is -inf): added by dense products over the listed
    rows, into the tensors the sparse backward returned. Returns the gradients of
    (x, enc_weight, b_enc, b_dec, dec_norm)."""
    grad_dec_norm = None
    if ctx.has_dec_norm:
        norm = dec_norm[idx]
        # act = pre * norm: d act/d pre = norm, d act/d norm = pre = act / norm.
        grad_pre = grad_act * norm
        grad_dec_norm = reference.scatter_sum(grad_act * acts / norm, idx, dec_norm.shape[0])
    else:
        grad_pre = grad_act
    # The indices are the forward's own output (or checked by it): no range check, no host sync.
    grad_x_in, grad_enc_weight, grad_b_enc = topk_encode_backward_op(grad_pre, idx, x, enc_weight, b_dec, False)
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


def _setup_context(ctx, inputs, output):
    x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, _check_indices = inputs
    values, indices, aux_pre = output
    save_encoder_inputs(ctx, x, enc_weight, b_dec, dec_norm, values, indices, aux_latents, aux_pre)


def _backward(ctx, grad_values, grad_indices, grad_aux_pre):
    x, enc_weight, b_dec, dec_norm, values, indices, aux_latents, aux_pre = ctx.saved_tensors
    if grad_values is None:
        grad_values = torch.zeros_like(values)
    # ReLU on the kept values: no gradient where the value was clamped to zero.
    grad_act = torch.where(values > 0, grad_values, torch.zeros_like(grad_values))
    aux = None
    if aux_latents is not None and aux_pre.shape[1] and grad_aux_pre is not None:
        # Entries AuxK did not keep (-inf) are constants.
        aux = (grad_aux_pre * reference.aux_kept(aux_pre), aux_pre, aux_latents)
    grads = encoder_grads(ctx, grad_act, values, indices, x, enc_weight, b_dec, dec_norm, aux)
    return *grads, None, None, None, None


topk_encode_op.register_autograd(_backward, setup_context=_setup_context)
