"""The top-k encoder as cuBLAS in row chunks + torch.topk: pure torch, shared by the GPU backends.

The triton backend takes it where it was measured faster than the fused kernel (wide d_in) and
for AuxK; the cuda backend for AuxK. Memory stays O(N k + one chunk of dense pre-activations), and
no shape depends on the data, so it needs no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import reference


# Dense pre-activations per chunk of rows on the chunked path: 2^27 elements (256 MiB in bf16) keep
# cuBLAS's tiles busy (at d_sae 131072, 1024 rows) while memory stays O(N * k + one chunk).
CHUNK_ELEMENTS = 1 << 27


def _chunk_rows(n_cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, n_cols))


def topk_encode_chunked(
    x_in: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    dec_norm: Optional[Tensor],
    k: int,
    aux_latents: Optional[Tensor],
    k_aux: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """cuBLAS in row chunks + a top-k select: per chunk, the dense pre-activations by addmm (in
    x's dtype, as the reference forms them), torch.topk for the k largest, and, for AuxK, the
    chunk's columns at `aux_latents` with each row's best k_aux kept (one product serves both).
    Shapes depend only on N, k and the list's capacity: no host sync. AuxK's entries follow
    `fastsae.reference.aux_select`."""
    n = x_in.shape[0]
    d_sae = enc_weight.shape[0]
    values = x_in.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.int64, device=x_in.device)
    aux_pre = x_in.new_empty(n, aux_latents.shape[0] if aux_latents is not None else 0)
    step = _chunk_rows(d_sae)
    for a in range(0, n, step):
        b = min(n, a + step)
        pre = torch.addmm(b_enc, x_in[a:b], enc_weight.t())
        if dec_norm is not None:
            pre.mul_(dec_norm)
        top = pre.topk(k, dim=1, sorted=False)
        values[a:b] = top.values.relu()
        indices[a:b] = top.indices
        if aux_latents is not None:
            aux_pre[a:b] = reference.aux_select(reference.aux_columns(pre, aux_latents), aux_latents, k_aux)
    return values, indices, aux_pre
