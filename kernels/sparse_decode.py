"""Sparse decode and its row-wise gradient: products of [N, m] sparse rows with a latent-major
weight, read through the indices (no dense [N, d_sae] matrix).

`_gather_sum_kernel`:  out[n] = sum_j coef[n, j] / norm[i_nj] * W[i_nj] + bias
    sparse_decode (x_hat), and the encoder's grad x (coef = grad_pre, W = enc_weight).
`_gather_dot_kernel`:  out[n, j] = rows[n] . W[i_nj] / norm[i_nj]
    grad values of sparse_decode (rows = grad x_hat).

Both are memory-bound gathers: each program owns BLOCK_R rows and processes BLOCK_J of the m
selected latents at a time, so BLOCK_R * BLOCK_J weight-row segments of BLOCK_D elements are in
flight at once; products accumulate in fp32 in a [BLOCK_R, BLOCK_J, BLOCK_D] register tile that is
reduced once at the end.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._launch import INTERPRET, contiguous, launch, next_pow2, register


@triton.jit
def _gather_sum_kernel(
    coef_ptr, idx_ptr, w_ptr, norm_ptr, bias_ptr, out_ptr, N, M, D,
    HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    acc = tl.zeros((BLOCK_R, BLOCK_J, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, M, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        ok = row_ok[:, None] & (js < M)[None, :]
        entry = rows.to(tl.int64)[:, None] * M + js[None, :]
        idx = tl.load(idx_ptr + entry, mask=ok, other=0)
        coef = tl.load(coef_ptr + entry, mask=ok, other=0.0).to(tl.float32)
        if HAS_NORM:
            coef = coef / tl.load(norm_ptr + idx, mask=ok, other=1.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, :, None] * D + cols[None, None, :],
            mask=ok[:, :, None] & col_ok[None, None, :],
            other=0.0,
        ).to(tl.float32)
        acc += coef[:, :, None] * w
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dst = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gather_dot_kernel(
    rows_ptr, idx_ptr, w_ptr, norm_ptr, out_ptr, N, M, D,
    HAS_NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    row_ok = rows < N
    ok = row_ok[:, None] & (js < M)[None, :]
    entry = rows.to(tl.int64)[:, None] * M + js[None, :]
    idx = tl.load(idx_ptr + entry, mask=ok, other=0)
    acc = tl.zeros((BLOCK_R, BLOCK_J, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(
            rows_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, :, None] * D + cols[None, None, :],
            mask=ok[:, :, None] & col_ok[None, None, :],
            other=0.0,
        ).to(tl.float32)
        acc += g[:, None, :] * w
    dot = tl.sum(acc, axis=2)
    if HAS_NORM:
        dot = dot / tl.load(norm_ptr + idx, mask=ok, other=1.0).to(tl.float32)
    tl.store(out_ptr + entry, dot.to(out_ptr.dtype.element_ty), mask=ok)


def gather_sum_config(m: int) -> dict:
    """About 4K fp32 accumulators per 128 threads (32 registers each); BLOCK_D = 128 keeps each
    gathered weight segment at 256 bytes (bf16), whole sectors."""
    block_j = min(8, next_pow2(m))
    if INTERPRET:
        return dict(BLOCK_R=16, BLOCK_J=block_j, BLOCK_D=64, num_warps=4)
    return dict(BLOCK_R=32 // block_j, BLOCK_J=block_j, BLOCK_D=128, num_warps=4)


def gather_dot_config(m: int) -> dict:
    block_j = min(16, next_pow2(m))
    if INTERPRET:
        return dict(BLOCK_R=16, BLOCK_J=block_j, BLOCK_D=64, num_warps=4)
    return dict(BLOCK_R=max(1, 32 // block_j), BLOCK_J=block_j, BLOCK_D=128, num_warps=4)


def gather_sum(
    coef: Tensor, indices: Tensor, weight: Tensor, bias: Optional[Tensor], norm: Optional[Tensor]
) -> Tensor:
    coef, indices, weight, bias, norm = contiguous(coef, indices, weight, bias, norm)
    n, m = indices.shape
    d = weight.shape[1]
    out = _launch.empty(n, d, dtype=weight.dtype, device=weight.device)
    if n == 0 or d == 0:
        return out
    cfg = gather_sum_config(m)
    grid = (triton.cdiv(n, cfg["BLOCK_R"]), triton.cdiv(d, cfg["BLOCK_D"]))
    launch(
        _gather_sum_kernel, grid,
        coef, indices, weight, norm if norm is not None else weight, bias if bias is not None else weight,
        out, n, m, d, HAS_NORM=norm is not None, HAS_BIAS=bias is not None, **cfg,
    )
    return out


@register("sparse_decode")
def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor], dec_norm: Optional[Tensor]
) -> Tensor:
    """x_hat [N, d_in] = sum_j values[n, j] * W_dec[i] / dec_norm[i] + b_dec, in W_dec's dtype."""
    return gather_sum(values, indices, W_dec, b_dec, dec_norm)


@register("gather_dot")
def gather_dot(rows: Tensor, indices: Tensor, weight: Tensor, norm: Optional[Tensor]) -> Tensor:
    """out [N, m] = rows[n] . weight[indices[n, j]] / norm[indices[n, j]], in rows' dtype."""
    rows, indices, weight, norm = contiguous(rows, indices, weight, norm)
    n, m = indices.shape
    out = _launch.empty(n, m, dtype=rows.dtype, device=rows.device)
    if n == 0 or m == 0:
        return out
    cfg = gather_dot_config(m)
    grid = (triton.cdiv(n, cfg["BLOCK_R"]), triton.cdiv(m, cfg["BLOCK_J"]))
    launch(
        _gather_dot_kernel, grid,
        rows, indices, weight, norm if norm is not None else weight, out, n, m, weight.shape[1],
        HAS_NORM=norm is not None, **cfg,
    )
    return out
