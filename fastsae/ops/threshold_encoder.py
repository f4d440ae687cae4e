"""The row-wise sparse encoder of ReLU and JumpReLU SAEs: fastsae::threshold_encode, with its
checked public wrapper, its one fake and its autograd formula (the encoder backward it shares
with the TopK encoder, `topk_encoder.encoder_grads`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import validation
from fastsae.ops import dispatch
from fastsae.ops.checking import call_checked, op_checks
from fastsae.ops.topk_encoder import encoder_grads, save_encoder_inputs
from fastsae.sparse import pad_at_free_latents


def threshold_encode(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    cutoff: Tensor,
    max_width: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row-wise sparse encode for ReLU/JumpReLU. x [N, d_in], enc_weight [d_sae, d_in], cutoff [d_sae]
    -> (pre_values [N, m], indices [N, m], counts [N]): each row's pre-activations above the cutoff
    (strictly) or NaN, m = min(largest count, max_width), padding -inf; see
    `fastsae.reference.threshold_encode`."""
    validation.check_threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width, any_float_cutoff=True)
    # The raw op takes the cutoff in the kernels' accumulation type (fp32, or fp64 for fp64
    # inputs), in which they compare; any float dtype is taken here.
    cutoff = cutoff.detach().to(validation.accumulation_dtype(x.dtype)).contiguous()
    return call_checked(torch.ops.fastsae.threshold_encode, x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)


# ---------------------------------------------------------------- the op


def fake_threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width):
    """Empty outputs of threshold_encode's shapes and dtypes: the fake of fastsae::threshold_encode
    and of fastsae_cpp::threshold_encode."""
    # The width is the batch's largest kept count (capped): known only once the kernel has run.
    width = torch.library.get_ctx().new_dynamic_size(max=max_width)
    n = x.shape[0]
    return x.new_empty(n, width), x.new_empty(n, width, dtype=torch.int64), x.new_empty(n, dtype=torch.int64)


@torch.library.custom_op("fastsae::threshold_encode", mutates_args=())
def threshold_encode_op(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    cutoff: Tensor,
    max_width: int,
) -> tuple[Tensor, Tensor, Tensor]:
    if op_checks():
        validation.check_threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)
    backend = dispatch.backend(x.device, x.shape[1])
    return backend.threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)


@threshold_encode_op.register_fake
def _(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width):
    if op_checks():
        validation.check_threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)
    return fake_threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)


# ---------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width = inputs
    pre_values, indices, counts = output
    save_encoder_inputs(ctx, x, enc_weight, b_dec, dec_norm, pre_values, indices)


def _backward(ctx, grad_pre_values, grad_indices, grad_counts):
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
    grads = encoder_grads(ctx, grad_act, acts, indices, x, enc_weight, b_dec, dec_norm)
    return *grads, None, None


threshold_encode_op.register_autograd(_backward, setup_context=_setup_context)
