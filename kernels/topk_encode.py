"""Fused TopK encode: pre = x_in W^T + b_enc (times dec_norm), top-k per row, ReLU on the kept
values, without ever writing the dense [N, d_sae] pre-activations.

x_in is x - b_dec (the caller subtracts b_dec once: an [N, d_in] elementwise pass, cheaper than
folding it as x W^T - b_dec W^T, which would read W a second time).

`_topk_select_kernel`: one program owns BLOCK_M rows and one contiguous range ("split") of latent
tiles. For each [BLOCK_M, BLOCK_N] tile it runs the matrix product on tensor cores with fp32
accumulation, then folds the tile into a running per-row top-k held in registers:

    tau = the row's current k-th best; best = the row's tile maximum
    while some row has best > tau:
        move that maximum into the slot holding tau, remove it from the tile, update tau, best

After the first few tiles tau is high and most tiles cost one max-reduction and one comparison
per element (expected insertions per row over the whole range grow like k log(tiles)).
Indices never need packing into the values: the position of each row's maximum comes out of the
same reduction (tl.max(..., return_indices=True)). When there are several splits (to fill the GPU
when N is small) each writes its k candidates (raw value, latent) and `_topk_merge_kernel` picks
each row's top k of the S*k candidates by k rounds of the same argmax. Only [N, k] values and
int64 indices leave.

`_encode_columns_kernel`: the same tile, written out densely: the row-chunked path when k is too
large for registers. (AuxK takes the backends' chunked torch path, fastsae/ops/chunked.py.)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._launch import INTERPRET, contiguous, dot_precision, launch, next_pow2, register, sm_count

_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))
_FP32_MAX = tl.constexpr(3.4028234663852886e38)

# Largest k (rounded up to a power of two) whose running top-k lives in registers; larger k
# goes through row chunks of dense pre-activations (`_topk_by_chunks`), each chunk holding at
# most _CHUNK_ELEMENTS of them.
MAX_FUSED_K = 128
_CHUNK_ELEMENTS = 1 << 26
# Each split should walk at least this many latent tiles, so the start-up insertions (about k
# per row while tau is still -inf) stay a small share of its work.
_MIN_TILES_PER_SPLIT = 2 if INTERPRET else 8
_MAX_SPLITS = 16


# ---------------------------------------------------------------------------- device code


@triton.jit
def _score_tile(
    x_ptr, w_ptr, bias_ptr, norm_ptr, rows, cols, N, D_IN, n_cols,
    HAS_NORM: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] pre-activations of `rows` at latents `cols`, fp32 (fp64 for fp64
    inputs). Out-of-range rows/columns are clamped (loads stay in bounds without masks); the
    caller masks them."""
    safe_rows = tl.minimum(rows, N - 1)
    lat = tl.minimum(cols, n_cols - 1)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + safe_rows.to(tl.int64)[:, None] * D_IN + ks[None, :]
    w_ptrs = w_ptr + lat.to(tl.int64)[:, None] * D_IN + ks[None, :]
    if x_ptr.dtype.element_ty == tl.float64:  # tl.dot's fp64 product must accumulate in fp64
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = (k0 + ks) < D_IN
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's 16-bit dot is unreliable
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # out_dtype named: Triton 3.6 checks it against acc and defaults it to fp32, even for fp64.
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    pre = acc + tl.load(bias_ptr + lat).to(acc.dtype)[None, :]
    if HAS_NORM:
        pre = pre * tl.load(norm_ptr + lat).to(acc.dtype)[None, :]
    return pre


@triton.jit
def _split_tiles(split, tiles_per_split, n_cols, BLOCK_N: tl.constexpr):
    """The latent tiles [lo, hi) of a split (the last one may be short)."""
    lo = split * tiles_per_split
    return lo, tl.minimum(lo + tiles_per_split, tl.cdiv(n_cols, BLOCK_N))


@triton.jit
def _absorb_tile(score, tile_start, top_val, top_col, tau, tau_slot, slots, BLOCK_N: tl.constexpr):
    """Fold a [BLOCK_M, BLOCK_N] tile of scores (columns tile_start...) into the running top-k
    (top_val, top_col). tau is each row's smallest kept value and tau_slot its slot; slots at or
    beyond k hold +inf and are never replaced."""
    positions = tl.arange(0, BLOCK_N)
    best, best_pos = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
    steps = 0
    # Each step takes one element per row out of the tile, so BLOCK_N steps always suffice; the
    # bound only stops a row of NaNs from looping.
    while (tl.max((best > tau).to(tl.int32), axis=0) > 0) & (steps < BLOCK_N):
        take = best > tau
        score = tl.where(positions[None, :] == best_pos[:, None], _NEG_INF, score)
        put = (slots[None, :] == tau_slot[:, None]) & take[:, None]
        top_val = tl.where(put, best[:, None], top_val)
        top_col = tl.where(put, (tile_start + best_pos)[:, None], top_col)
        tau, tau_slot = tl.min(top_val, axis=1, return_indices=True, return_indices_tie_break_left=True)
        best, best_pos = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        steps += 1
    return top_val, top_col, tau, tau_slot


@triton.jit
def _rank_key(val):
    """fp32 keys that order NaN above +inf above every number, as torch.topk ranks them: NaN
    competes as +inf and +inf as the largest float, elementwise (no extra reduction)."""
    return tl.where(val != val, _POS_INF, tl.where(val == _POS_INF, _FP32_MAX, val))


@triton.jit
def _from_rank_key(key):
    """The values back from `_rank_key` (a pre-activation of exactly the largest float reads +inf)."""
    return tl.where(key == _POS_INF, float("nan"), tl.where(key == _FP32_MAX, _POS_INF, key))


@triton.jit
def _topk_select_kernel(
    x_ptr, w_ptr, bias_ptr, norm_ptr, val_ptr, idx_ptr,
    N, D_IN, n_cols, tiles_per_split,
    K: tl.constexpr, K_PAD: tl.constexpr,
    HAS_NORM: tl.constexpr, RELU: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Top-K of rows [pid_m * BLOCK_M, +BLOCK_M) over this split's latent tiles. Writes
    val/idx[row, split, :K] (with one split: the final [N, K] outputs, ReLU'd when RELU; several
    splits leave the ReLU to the merge)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    slots = tl.arange(0, K_PAD)
    top_val = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32) + tl.where(slots < K, _NEG_INF, _POS_INF)[None, :]
    top_col = tl.zeros((BLOCK_M, K_PAD), dtype=tl.int32)
    tau = tl.full((BLOCK_M,), _NEG_INF, dtype=tl.float32)
    tau_slot = tl.zeros((BLOCK_M,), dtype=tl.int32)

    tile_lo, tile_hi = _split_tiles(split, tiles_per_split, n_cols, BLOCK_N)
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        score = _score_tile(
            x_ptr, w_ptr, bias_ptr, norm_ptr, rows, cols, N, D_IN, n_cols,
            HAS_NORM, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST,
        )
        score = tl.where(row_ok[:, None] & (cols < n_cols)[None, :], _rank_key(score.to(tl.float32)), _NEG_INF)
        top_val, top_col, tau, tau_slot = _absorb_tile(
            score, tile * BLOCK_N, top_val, top_col, tau, tau_slot, slots, BLOCK_N
        )

    # Slots never filled (a split with fewer than K columns) keep -inf and column 0: they lose
    # every comparison in the merge, which always has at least K real candidates.
    top_val = _from_rank_key(top_val)  # slots at or beyond K are never stored
    if RELU:
        top_val = tl.where(top_val != top_val, top_val, tl.maximum(top_val, 0.0))  # relu(NaN) is NaN
    out = (rows.to(tl.int64)[:, None] * n_splits + split) * K + slots[None, :]
    ok = row_ok[:, None] & (slots < K)[None, :]
    tl.store(val_ptr + out, top_val.to(val_ptr.dtype.element_ty), mask=ok)
    tl.store(idx_ptr + out, top_col.to(idx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _topk_merge_kernel(
    cand_val_ptr, cand_idx_ptr, val_ptr, idx_ptr, N, L,
    K: tl.constexpr, L_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Top-K of each row's L candidates (raw fp32 values, int32 latents), ReLU'd: K rounds of
    "take the row maximum, remove it". Latents are distinct across splits, so no duplicates."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    js = tl.arange(0, L_PAD)
    ok = row_ok[:, None] & (js < L)[None, :]
    src = rows.to(tl.int64)[:, None] * L + js[None, :]
    value = _rank_key(tl.load(cand_val_ptr + src, mask=ok, other=float("-inf")))
    latent = tl.load(cand_idx_ptr + src, mask=ok, other=0)
    for t in range(K):
        best, pos = tl.max(value, axis=1, return_indices=True, return_indices_tie_break_left=True)
        hit = js[None, :] == pos[:, None]
        best_latent = tl.sum(tl.where(hit, latent, 0), axis=1)
        value = tl.where(hit, float("-inf"), value)
        best = _from_rank_key(best)
        best = tl.where(best != best, best, tl.maximum(best, 0.0))  # relu(NaN) is NaN
        dst = rows.to(tl.int64) * K + t
        tl.store(val_ptr + dst, best.to(val_ptr.dtype.element_ty), mask=row_ok)
        tl.store(idx_ptr + dst, best_latent.to(idx_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _encode_columns_kernel(
    x_ptr, w_ptr, bias_ptr, norm_ptr, out_ptr, N, D_IN, n_cols,
    HAS_NORM: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[N, n_cols] = the pre-activations of every latent."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    score = _score_tile(
        x_ptr, w_ptr, bias_ptr, norm_ptr, rows, cols, N, D_IN, n_cols,
        HAS_NORM, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST,
    )
    ok = (rows < N)[:, None] & (cols < n_cols)[None, :]
    out = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(out_ptr + out, score.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------- configuration


def tile_config(dtype: torch.dtype) -> dict:
    """The encoder's tile when its epilogue is light (a top-k with k <= 64, a threshold test).

    H100 reasoning (kernels/NOTES.md): one warpgroup (4 warps) runs wgmma on a 64-row tile;
    BLOCK_K * element size = 128 bytes (one swizzled shared-memory row). With 4 warps a CTA may
    use up to 255 registers per thread and still leave room for a second CTA on the SM
    (2 x 128 x 255 < 64K registers; 2 x 96 KiB of pipeline buffers < 227 KiB), so one CTA's
    CUDA-core epilogue overlaps the other's tensor-core main loop. fp32 inputs (three TF32
    products) take a narrower tile; fp64 (no tensor-core path worth tuning) a small one that fits
    shared memory. `fastsae aot` checks each of these for spills.
    """
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
    if dtype == torch.float32:  # three TF32 products per step need the registers of a narrower tile
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)


# From d_in this wide, 16-bit inputs take a 128 x 128 tile over 8 warps (3 stages). Measured on an
# H200 (kernels/NOTES.md, "Measured against predicted"; bf16, k 64): at d_in 4096 it took 14.8 ms
# against 17.0 for the default 64 x 128 / 4 warps / 4 stages; at d_in 768 the default was best
# (2.7 against 3.2 ms). Between the two the main loop's share grows with d_in; the boundary is
# their geometric mean, pending a measurement in between.
WIDE_TILE_MIN_D_IN = 1774


def select_config(k_pad: int, dtype: torch.dtype, d_in: int = 0) -> dict:
    """Tile sizes and launch options of `_topk_select_kernel` for a padded k: `tile_config`, except
    that the running top-k costs 2 * BLOCK_M * K_PAD / (32 * num_warps) registers per thread, so
    at k = 128 eight warps share it (64 registers each; one CTA per SM), and that wide 16-bit
    inputs (d_in >= WIDE_TILE_MIN_D_IN, k <= 64) take the measured 128 x 128 / 8-warp tile."""
    cfg = tile_config(dtype)
    if (
        not INTERPRET and k_pad <= 64 and d_in >= WIDE_TILE_MIN_D_IN
        and dtype in (torch.bfloat16, torch.float16)
    ):
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if k_pad > 64 and not INTERPRET:
        if dtype == torch.float64:
            return dict(cfg, num_warps=8)
        block_k = 32 if dtype == torch.float32 else 64
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, num_warps=8, num_stages=3)
    return cfg


def columns_config(dtype: torch.dtype) -> dict:
    """`_encode_columns_kernel`: a plain tiled matrix product with a bias epilogue."""
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return tile_config(dtype)
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, num_warps=8, num_stages=3)


def merge_config(l_pad: int) -> dict:
    if INTERPRET:  # few programs: the interpreter pays per program and per reduction
        return dict(BLOCK_R=64, num_warps=4)
    return dict(BLOCK_R=max(1, min(16, 2048 // l_pad)), num_warps=4)


def _num_splits(n_row_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Enough splits of the latent range for about two programs per SM, while each split keeps
    at least _MIN_TILES_PER_SPLIT tiles."""
    want = triton.cdiv(2 * sm_count(device), n_row_blocks)
    return max(1, min(want, n_tiles // _MIN_TILES_PER_SPLIT, _MAX_SPLITS))


def _partition(n_tiles: int, splits: int) -> tuple[int, int]:
    """(tiles per split, number of splits) for about `splits` equal ranges of n_tiles, none empty."""
    tiles_per_split = triton.cdiv(n_tiles, min(splits, n_tiles))
    return tiles_per_split, triton.cdiv(n_tiles, tiles_per_split)


def _common(x: Tensor, w: Tensor, cfg: dict) -> dict:
    upcast = INTERPRET and x.dtype in (torch.float16, torch.bfloat16)
    return dict(
        EVEN_K=x.shape[1] % cfg["BLOCK_K"] == 0,
        DOT_PRECISION=dot_precision(torch.float32 if upcast else x.dtype),
        UPCAST=upcast,
    )


def _check(x: Tensor, n_cols: int, op: str = "topk_encode") -> None:
    if n_cols >= 2**31 or x.shape[0] >= 2**31:
        raise ValueError(f"triton {op}: expected fewer than 2^31 latents and rows, got {n_cols} and {x.shape[0]}")


# ---------------------------------------------------------------------------- launchers


@register("encode_columns")
def encode_columns(x_in: Tensor, enc_weight: Tensor, b_enc: Tensor, dec_norm: Optional[Tensor]) -> Tensor:
    """Dense pre-activations [N, d_sae]."""
    x_in, enc_weight, b_enc, dec_norm = contiguous(x_in, enc_weight, b_enc, dec_norm)
    n = x_in.shape[0]
    n_cols = enc_weight.shape[0]
    out = _launch.empty(n, n_cols, dtype=x_in.dtype, device=x_in.device)
    if n == 0 or n_cols == 0:
        return out
    _check(x_in, n_cols)
    cfg = columns_config(x_in.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(n_cols, cfg["BLOCK_N"]))
    launch(
        _encode_columns_kernel, grid,
        x_in, enc_weight, b_enc, dec_norm if dec_norm is not None else b_enc, out, n, x_in.shape[1], n_cols,
        HAS_NORM=dec_norm is not None,
        **_common(x_in, enc_weight, cfg), **cfg,
    )
    return out


def _topk_by_chunks(x_in, enc_weight, b_enc, dec_norm, k, values, indices):
    """k too large for registers: dense pre-activations for a chunk of rows at a time (at most
    _CHUNK_ELEMENTS), then torch.topk. Memory stays bounded; speed is that of the dense step."""
    n = x_in.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, enc_weight.shape[0]))
    for a in range(0, n, step):
        b = min(n, a + step)
        pre = encode_columns(x_in[a:b], enc_weight, b_enc, dec_norm)
        top = pre.topk(k, dim=1, sorted=False)
        values[a:b] = top.values.relu()
        indices[a:b] = top.indices
    return values, indices


@register("topk_encode")
def topk_encode(
    x_in: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    dec_norm: Optional[Tensor],
    k: int,
    splits: int = 0,
) -> tuple[Tensor, Tensor]:
    """Top-k of the pre-activations (x_in W^T + b_enc) * dec_norm per row. Returns (values [N, k]
    in x's dtype, ReLU'd; indices [N, k] int64). `splits` > 0 forces the number of latent ranges
    (the tests' way to reach the merge at small shapes); 0 picks it."""
    x_in, enc_weight, b_enc, dec_norm = contiguous(x_in, enc_weight, b_enc, dec_norm)
    n = x_in.shape[0]
    n_cols = enc_weight.shape[0]
    values = _launch.empty(n, k, dtype=x_in.dtype, device=x_in.device)
    indices = _launch.empty(n, k, dtype=torch.int64, device=x_in.device)
    if n == 0 or k == 0:
        return values, indices
    _check(x_in, n_cols)
    if not 1 <= k <= n_cols:
        raise ValueError(f"triton topk_encode: expected 1 <= k <= d_sae={n_cols}, got {k}")
    k_pad = next_pow2(k)
    if k_pad > MAX_FUSED_K:
        return _topk_by_chunks(x_in, enc_weight, b_enc, dec_norm, k, values, indices)

    cfg = select_config(k_pad, x_in.dtype, x_in.shape[1])
    row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    n_tiles = triton.cdiv(n_cols, cfg["BLOCK_N"])
    n_splits = splits if splits > 0 else _num_splits(row_blocks, n_tiles, x_in.device)
    tiles_per_split, n_splits = _partition(n_tiles, n_splits)

    if n_splits == 1:
        cand_val, cand_idx = values, indices
    else:
        cand_val = _launch.empty(n, n_splits, k, dtype=torch.float32, device=x_in.device)
        cand_idx = _launch.empty(n, n_splits, k, dtype=torch.int32, device=x_in.device)
    launch(
        _topk_select_kernel, (row_blocks, n_splits),
        x_in, enc_weight, b_enc, dec_norm if dec_norm is not None else b_enc, cand_val, cand_idx,
        n, x_in.shape[1], n_cols, tiles_per_split,
        K=k, K_PAD=k_pad, HAS_NORM=dec_norm is not None,
        RELU=n_splits == 1, **_common(x_in, enc_weight, cfg), **cfg,
    )
    if n_splits > 1:
        length = n_splits * k
        l_pad = next_pow2(length)
        mcfg = merge_config(l_pad)
        launch(
            _topk_merge_kernel, (triton.cdiv(n, mcfg["BLOCK_R"]),),
            cand_val, cand_idx, values, indices, n, length,
            K=k, L_PAD=l_pad, **mcfg,
        )
    return values, indices
