"""fastsae's ops: checked entry points over the torch.library custom ops.

These functions call `torch.ops.fastsae.*`, which run on the backend that `dispatch` picks.
Every argument is checked first, by the op's function in `fastsae.validation` (the same one the
raw ops run, whichever backend): a ValueError naming the argument, what was expected and what
came, instead of a kernel fault or a silently different result.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import validation
from fastsae.ops import library  # noqa: F401  (registers the torch.library ops)
from fastsae.ops.dispatch import BACKEND_NAMES, available_backends, requested_backend, select, use_backend

__all__ = [
    "BACKEND_NAMES",
    "available_backends",
    "requested_backend",
    "select",
    "use_backend",
    "topk_encode",
    "threshold_encode",
    "sparse_decode",
    "sparse_decode_with_aux",
]


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
    validation.check_topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, check_range=False)
    return torch.ops.fastsae.topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, check_indices)


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
    d_sae, _ = validation.check_encoder_inputs(x, enc_weight, b_enc, b_dec, dec_norm)
    if not isinstance(cutoff, Tensor):
        raise ValueError(f"cutoff: expected a tensor of shape ({d_sae},), got {type(cutoff).__name__}")
    if not cutoff.is_floating_point():
        raise ValueError(f"cutoff: expected a floating-point tensor, got {cutoff.dtype}")
    # Any float dtype is taken here: comparisons happen in the kernels' accumulation type (fp32,
    # or fp64 for fp64 inputs), which the raw op requires.
    if cutoff.device == x.device:
        cutoff = cutoff.detach().to(validation.accumulation_dtype(x.dtype)).contiguous()
    validation.check_threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)
    return torch.ops.fastsae.threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)


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
    as the SAE module's training step passes them. The range check runs inside the op (at run
    time, on real tensors), never in code that torch.compile traces."""
    validation.check_sparse_decode(values, indices, W_dec, b_dec, dec_norm, check_range=False)
    return torch.ops.fastsae.sparse_decode(values, indices, W_dec, b_dec, dec_norm, check_indices)


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
    validation.check_sparse_decode_with_aux(values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, check_range=False)
    return torch.ops.fastsae.sparse_decode_with_aux(values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, check_indices)
