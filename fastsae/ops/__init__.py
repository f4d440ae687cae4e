"""fastsae's ops: checked entry points over the torch.library custom ops.

These functions validate their arguments (a clear ValueError instead of a kernel fault) and
call `torch.ops.fastsae.*`, which run on the backend that `dispatch` picks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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
]


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_vector(name: str, t: Optional[Tensor], size: int, ref: Tensor) -> None:
    if t is None:
        return
    _expect(
        t.ndim == 1 and t.shape[0] == size,
        f"{name}: expected a vector of shape ({size},), got shape {tuple(t.shape)}",
    )
    _expect(t.device == ref.device, f"{name}: expected device {ref.device}, got {t.device}")


def _check_matrix(name: str, t: Tensor, ref: Tensor) -> None:
    _expect(t.ndim == 2, f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    _expect(t.dtype == ref.dtype, f"{name}: expected dtype {ref.dtype}, got {t.dtype}")
    _expect(t.device == ref.device, f"{name}: expected device {ref.device}, got {t.device}")


def _check_encoder_args(x, enc_weight, b_enc, b_dec, dec_norm) -> int:
    """The arguments both encoders share; returns d_sae."""
    _expect(x.ndim == 2, f"x: expected a 2-D tensor [N, d_in], got shape {tuple(x.shape)}")
    _check_matrix("enc_weight", enc_weight, x)
    d_sae, d_in = enc_weight.shape
    _expect(x.shape[1] == d_in, f"x: expected last dimension d_in={d_in}, got shape {tuple(x.shape)}")
    _check_vector("b_enc", b_enc, d_sae, x)
    _check_vector("b_dec", b_dec, d_in, x)
    _check_vector("dec_norm", dec_norm, d_sae, x)
    return d_sae


def topk_encode(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    k: int,
    dead_mask: Optional[Tensor] = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused TopK encode. x [N, d_in], enc_weight [d_sae, d_in] -> (values [N, k], indices [N, k],
    aux_values [N, k_aux], aux_indices [N, k_aux]); see `fastsae.reference.topk_encode`."""
    d_sae = _check_encoder_args(x, enc_weight, b_enc, b_dec, dec_norm)
    _expect(1 <= k <= d_sae, f"k: expected 1 <= k <= d_sae={d_sae}, got {k}")
    _expect(0 <= k_aux <= d_sae, f"k_aux: expected 0 <= k_aux <= d_sae={d_sae}, got {k_aux}")
    if k_aux > 0:
        _expect(dead_mask is not None, "dead_mask: expected a bool mask of shape (d_sae,) when k_aux > 0, got None")
        _check_vector("dead_mask", dead_mask, d_sae, x)
        _expect(dead_mask.dtype == torch.bool, f"dead_mask: expected dtype torch.bool, got {dead_mask.dtype}")
    else:
        dead_mask = None
    return torch.ops.fastsae.topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, dead_mask, k_aux)


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
    d_sae = _check_encoder_args(x, enc_weight, b_enc, b_dec, dec_norm)
    _expect(isinstance(cutoff, Tensor), f"cutoff: expected a tensor of shape ({d_sae},), got {type(cutoff).__name__}")
    _check_vector("cutoff", cutoff, d_sae, x)
    _expect(cutoff.is_floating_point(), f"cutoff: expected a floating-point tensor, got {cutoff.dtype}")
    _expect(
        isinstance(max_width, int) and 0 <= max_width <= d_sae,
        f"max_width: expected an integer 0 <= max_width <= d_sae={d_sae}, got {max_width!r}",
    )
    # Comparisons happen in the kernels' accumulator type (fp32, or fp64 for fp64 inputs).
    cutoff = cutoff.detach().to(torch.promote_types(x.dtype, torch.float32)).contiguous()
    return torch.ops.fastsae.threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width)


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None, dec_norm: Optional[Tensor] = None
) -> Tensor:
    """Sparse decode: values, indices [N, m], W_dec [d_sae, d_in] -> [N, d_in]; see
    `fastsae.reference.sparse_decode`."""
    _expect(values.ndim == 2, f"values: expected a 2-D tensor [N, m], got shape {tuple(values.shape)}")
    _expect(
        indices.shape == values.shape,
        f"indices: expected shape {tuple(values.shape)} (as values), got {tuple(indices.shape)}",
    )
    _expect(indices.dtype == torch.int64, f"indices: expected dtype torch.int64, got {indices.dtype}")
    _check_matrix("W_dec", W_dec, values)
    d_sae, d_in = W_dec.shape
    _check_vector("b_dec", b_dec, d_in, values)
    _check_vector("dec_norm", dec_norm, d_sae, values)
    return torch.ops.fastsae.sparse_decode(values, indices, W_dec, b_dec, dec_norm)
