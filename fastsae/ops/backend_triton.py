"""The `triton` backend: fastsae's four ops on the Triton kernels of `fastsae.kernels`.

Same signatures and semantics as `fastsae.reference` (the oracle). Each function calls the
`fastsae_triton::*` ops (which torch.compile can trace on a GPU) and does the little glue around
them: the b_dec subtraction, AuxK's dead-latent pass, dtype casts.
Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the kernels then run in
Triton's interpreter: slow, for tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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
    dead_mask: Optional[Tensor],
    k_aux: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # b_dec is subtracted once here ([N, d_in] elementwise) rather than folded into the kernel as
    # x W^T - b_dec W^T, which would read the [d_sae, d_in] weight a second time.
    x_in = x - b_dec if b_dec is not None else x
    values, indices = _ops.topk_encode(x_in, enc_weight, b_enc, dec_norm, None, k, True)
    n = x.shape[0]
    if k_aux == 0:
        return values, indices, x.new_zeros(n, 0), torch.zeros(n, 0, dtype=torch.int64, device=x.device)

    # AuxK: a second pass over the dead latents only (their count sets the shapes, hence one
    # host sync; the SAE module already makes it). Its cost is n_dead / d_sae of the encoder.
    dead = dead_mask.nonzero().squeeze(1)
    n_dead = dead.shape[0]
    take = min(k_aux, n_dead)
    parts_v, parts_i = [], []
    if take == n_dead and take > 0:
        # Every dead latent is selected: no selection, just their pre-activations.
        parts_v.append(_ops.encode_columns(x_in, enc_weight, b_enc, dec_norm, dead))
        parts_i.append(dead.expand(n, n_dead))
    elif take > 0:
        aux_v, aux_i = _ops.topk_encode(x_in, enc_weight, b_enc, dec_norm, dead, take, False)
        parts_v.append(aux_v)
        parts_i.append(aux_i)
    if take < k_aux:
        # Fewer dead latents than slots: the rest hold value 0 at live latents (constants for
        # autograd, which masks them by dead_mask), as in the reference.
        alive = (~dead_mask).nonzero().squeeze(1)[: k_aux - take]
        parts_v.append(x.new_zeros(n, k_aux - take))
        parts_i.append(alive.expand(n, k_aux - take))
    aux_values = torch.cat(parts_v, dim=1) if len(parts_v) > 1 else parts_v[0]
    aux_indices = torch.cat(parts_i, dim=1) if len(parts_i) > 1 else parts_i[0].contiguous()
    return values, indices, aux_values, aux_indices


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
