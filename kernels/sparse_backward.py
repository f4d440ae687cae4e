"""Weight gradients of the sparse products, grouped by latent: no atomics, no dense N x d_sae.

    out[i]    = scale_i * sum over entries (n, j) with indices[n, j] == i of coef[n, j] * (rows[n] - sub)
    colsum[i] = sum over the same entries of coef[n, j]

with scale_i = 1 / norm[i] when a norm is given. This is grad W_dec of sparse_decode
(coef = values, rows = grad x_hat, norm = dec_norm) and grad enc_weight / grad b_enc of the
encoder (coef = grad_pre, rows = x, sub = b_dec).

The [N, m] indices are sorted once (a stable radix sort of N*m keys, so the sum order and the
result are deterministic), and `torch.searchsorted` turns the sorted keys into segment offsets
(a counting sort's prefix sums). One program then owns BLOCK_L latents x BLOCK_D columns and walks
their segments side by side, BLOCK_E entries of each per step, gathering the source rows; it
writes each latent's row of the gradient exactly once (zeros where it was never selected).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._launch import INTERPRET, contiguous, launch, register


@triton.jit
def _scatter_outer_kernel(
    order_ptr, offsets_ptr, coef_ptr, rows_ptr, sub_ptr, norm_ptr, out_ptr, colsum_ptr,
    d_sae, M, D,
    HAS_SUB: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [BLOCK_L latents, BLOCK_D columns] of out: each step gathers the next BLOCK_E entries
    of every latent's segment (a [BLOCK_L, BLOCK_E, BLOCK_D] tile), until the longest is done."""
    lats = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    lat_ok = lats < d_sae
    col_ok = cols < D
    start = tl.load(offsets_ptr + lats, mask=lat_ok, other=0)
    length = tl.load(offsets_ptr + lats + 1, mask=lat_ok, other=0) - start
    es = tl.arange(0, BLOCK_E)
    if HAS_SUB:
        sub = tl.load(sub_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_L, BLOCK_E, BLOCK_D), dtype=tl.float32)
    csum = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32)
    for e0 in range(0, tl.max(length, axis=0), BLOCK_E):
        e_ok = (e0 + es)[None, :] < length[:, None]
        entry = tl.load(order_ptr + start[:, None] + e0 + es[None, :], mask=e_ok, other=0)
        coef = tl.load(coef_ptr + entry, mask=e_ok, other=0.0).to(tl.float32)
        src = (entry // M)[:, :, None] * D + cols[None, None, :]
        r = tl.load(rows_ptr + src, mask=e_ok[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)
        if HAS_SUB:
            r = r - sub[None, None, :]
        acc += coef[:, :, None] * r
        csum += coef
    total = tl.sum(acc, axis=1)
    if HAS_NORM:
        total = total / tl.load(norm_ptr + lats, mask=lat_ok, other=1.0).to(tl.float32)[:, None]
    dst = lats.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out_ptr + dst, total.to(out_ptr.dtype.element_ty), mask=lat_ok[:, None] & col_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(colsum_ptr + lats, tl.sum(csum, axis=1).to(colsum_ptr.dtype.element_ty), mask=lat_ok)


def scatter_config() -> dict:
    """Mean segment length is N*m/d_sae (5 to 8 at the issue's shapes): BLOCK_E = 8 entries per
    latent per step, BLOCK_L = 4 latents, BLOCK_D = 128 columns (256-byte bf16 segments):
    4 x 8 x 128 fp32 accumulators = 32 registers per thread at 4 warps."""
    if INTERPRET:  # few, wide programs: the interpreter pays per program and per step
        return dict(BLOCK_L=64, BLOCK_E=4, BLOCK_D=128, num_warps=4)
    return dict(BLOCK_L=4, BLOCK_E=8, BLOCK_D=128, num_warps=4)


def segments(indices: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """(order, offsets): the flat entries of `indices` sorted by latent (stable), and where each
    latent's segment starts (offsets[d_sae] = N*m)."""
    flat = indices.reshape(-1)
    key = flat.to(torch.int32) if d_sae < 2**31 else flat
    sorted_key, order = torch.sort(key, stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(d_sae + 1, dtype=key.dtype, device=key.device))
    return order, offsets


@register("scatter_outer")
def scatter_outer(
    coef: Tensor, indices: Tensor, rows: Tensor, sub: Optional[Tensor], norm: Optional[Tensor], d_sae: int
) -> tuple[Tensor, Tensor]:
    """(out [d_sae, D], colsum [d_sae]) in rows' dtype; see the module docstring."""
    coef, indices, rows, sub, norm = contiguous(coef, indices, rows, sub, norm)
    n, m = indices.shape
    d = rows.shape[1]
    out = _launch.empty(d_sae, d, dtype=rows.dtype, device=rows.device)
    colsum = _launch.empty(d_sae, dtype=rows.dtype, device=rows.device)
    if d_sae == 0:
        return out, colsum
    order, offsets = segments(indices, d_sae)
    cfg = scatter_config()
    grid = (triton.cdiv(d_sae, cfg["BLOCK_L"]), max(1, triton.cdiv(d, cfg["BLOCK_D"])))
    launch(
        _scatter_outer_kernel, grid,
        order, offsets, coef, rows, sub if sub is not None else rows, norm if norm is not None else rows,
        out, colsum, d_sae, max(m, 1), d, HAS_SUB=sub is not None, HAS_NORM=norm is not None, **cfg,
    )
    return out, colsum
