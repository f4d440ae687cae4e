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
    dead_mask: Optional[Tensor],
    k_aux: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cuBLAS in row chunks + a top-k select: per chunk, the dense pre-activations by addmm (in
    x's dtype, as the reference forms them), torch.topk for the k largest, and, for AuxK, the
    k_aux largest among dead latents from the same chunk (one product serves both). Shapes depend
    only on N, k and k_aux: no host sync. AuxK's slots follow `fastsae.reference.topk_encode`."""
    n = x_in.shape[0]
    d_sae = enc_weight.shape[0]
    values = x_in.new_empty(n, k)
    indices = torch.empty(n, k, dtype=torch.int64, device=x_in.device)
    aux_values = x_in.new_empty(n, k_aux)
    aux_indices = torch.empty(n, k_aux, dtype=torch.int64, device=x_in.device)
    step = _chunk_rows(d_sae)
    for a in range(0, n, step):
        b = min(n, a + step)
        pre = torch.addmm(b_enc, x_in[a:b], enc_weight.t())
        if dec_norm is not None:
            pre.mul_(dec_norm)
        top = pre.topk(k, dim=1, sorted=False)
        values[a:b] = top.values.relu()
        indices[a:b] = top.indices
        if k_aux > 0:
            # AuxK's slots as the reference defines them (dead latents at -inf skipped), sync-free.
            aux_values[a:b], aux_indices[a:b] = reference.aux_select(pre, dead_mask, k_aux)
    return values, indices, aux_values, aux_indices
