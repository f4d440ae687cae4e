"""The `triton` backend: fastsae's four ops on the Triton kernels of `fastsae.kernels`.

Same signatures and semantics as `fastsae.reference` (the oracle). Each function calls the
`fastsae_triton::*` ops (which torch.compile can trace on a GPU) and does the little glue around
them: the b_dec subtraction, dtype casts, and the top-k encoder's path per shape (the fused
kernel, or cuBLAS in row chunks + torch.topk where that was measured faster, and for AuxK).
Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the kernels then run in
Triton's interpreter: slow, for tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae.ops import dispatch, measured
from fastsae.ops.chunked import topk_encode_chunked

from fastsae.kernels import (  # noqa: F401 (registers the ops)
    sparse_backward,
    sparse_decode as _decode,
    threshold_encode as _threshold,
    topk_encode as _encode,
)

_ops = torch.ops.fastsae_triton


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
    # b_dec is subtracted once here ([N, d_in] elementwise) rather than folded into the kernel as
    # x W^T - b_dec W^T, which would read the [d_sae, d_in] weight a second time.
    x_in = x - b_dec if b_dec is not None else x
    n = x.shape[0]
    path = measured.encoder_path(x.device.type, x.shape[1], k, dispatch._device_name(x.device) if x.is_cuda else None)
    if aux_latents is not None or path == "chunked":
        # AuxK takes the chunked path whatever the width: the dead latents' columns come from the
        # same product, over a list whose capacity, not count, sets the shapes (no host sync).
        return topk_encode_chunked(x_in, enc_weight, b_enc, dec_norm, k, aux_latents, k_aux)
    values, indices = _ops.topk_encode(x_in, enc_weight, b_enc, dec_norm, k)
    return values, indices, x.new_empty(n, 0)


def topk_encode_backward(
    grad_pre: Tensor, indices: Tensor, x: Tensor, enc_weight: Tensor, b_dec: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    grad_x_in = _ops.sparse_decode(grad_pre, indices, enc_weight, None, None).to(x.dtype)
    grad_w, grad_b = _ops.scatter_outer(grad_pre, indices, x, b_dec, None, enc_weight.shape[0])
    return grad_x_in, grad_w.to(enc_weight.dtype), grad_b.to(enc_weight.dtype)


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor], dec_norm: Optional[Tensor]
) -> Tensor:
    return _ops.sparse_decode(values, indices, W_dec, b_dec, dec_norm)


def sparse_decode_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, dec_norm: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    grad_values = _ops.gather_dot(grad_out, indices, W_dec, dec_norm).to(values.dtype)
    grad_W_dec, _ = _ops.scatter_outer(values, indices, grad_out, None, dec_norm, W_dec.shape[0])
    return grad_values, grad_W_dec.to(W_dec.dtype)


def threshold_encode(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    cutoff: Tensor,
    max_width: int,
) -> tuple[Tensor, Tensor, Tensor]:
    x_in = x - b_dec if b_dec is not None else x  # once, as for topk_encode
    return _ops.threshold_encode(x_in, enc_weight, b_enc, dec_norm, cutoff, max_width)
