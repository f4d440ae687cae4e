"""Fused threshold encode (ReLU, JumpReLU): the row-wise sparse form of the pre-activations above
a per-latent cutoff, without ever writing the dense [N, d_sae] pre-activations.

x_in is x - b_dec (subtracted once by the caller, as for the top-k encoder).

`_threshold_select_kernel`: one program owns BLOCK_M rows and one contiguous range ("split") of
latent tiles, walked in ascending order. Each [BLOCK_M, BLOCK_N] tile is `topk_encode`'s
`_score_tile` (tensor-core product, fp32 accumulation, bias and decoder norm applied), then

    keep = not (pre <= cutoff)                   (above the cutoff, or NaN: the contract)
    slot = kept so far + cumsum(keep along the tile's latents) - 1
    store (pre, latent) at slot where keep and slot < cap;  kept so far += row sum of keep

so each row's kept entries land in ascending latent order in its own [cap] scratch row for the
split, with no atomics (deterministic), and the split's true count is written at the end.

`_threshold_gather_kernel`: once the counts are known, m = min(max count, max_width) (one host
sync) and each row's entries are gathered from its splits' scratch rows, in split order, into
[N, m] outputs; slots past the row's count get (-inf, latent 0). Every output element is written
there, and only the kept entries are ever written to the scratch (never the whole buffer).

Why a split needs a scratch row of min(max_width, its latents) slots: a row's first max_width
entries (all that is ever returned) come from whole splits plus a prefix of one split that keeps
at most max_width of them, so no split ever needs more, and none can lose an entry that counts.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch
from ._launch import INTERPRET, contiguous, launch_opaque, register, sm_count
from .topk_encode import (
    _MAX_SPLITS, _MIN_TILES_PER_SPLIT, _check, _common, _partition, _score_tile, _split_tiles, tile_config,
)

# The scratch (splits x cap entries per row) may hold at most this share of the dense [N, d_sae]
# entries: more splits only when the cap is small next to d_sae.
_SCRATCH_SHARE = 4

# ---------------------------------------------------------------------------- device code


@triton.jit
def _threshold_select_kernel(
    x_ptr, w_ptr, bias_ptr, norm_ptr, cutoff_ptr, val_ptr, lat_ptr, count_ptr,
    N, D_IN, n_cols, tiles_per_split, cap,
    HAS_NORM: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Rows [pid_m * BLOCK_M, +BLOCK_M) over this split's latent tiles: the first `cap` kept
    entries of each row go to val/lat[row, split, :cap] (ascending latents), the row's number of
    kept entries in the split to count[row, split]."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    # Scratch rows of this program: a scalar 64-bit base and 32-bit offsets within the block.
    block_base = (pid_m.to(tl.int64) * BLOCK_M * n_splits + split) * cap
    val_base = val_ptr + block_base
    lat_base = lat_ptr + block_base
    scratch_row = tl.arange(0, BLOCK_M) * (n_splits * cap)
    kept = tl.zeros((BLOCK_M,), dtype=tl.int32)

    tile_lo, tile_hi = _split_tiles(split, tiles_per_split, n_cols, BLOCK_N)
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        pre = _score_tile(
            x_ptr, w_ptr, bias_ptr, norm_ptr, rows, cols, N, D_IN, n_cols,
            HAS_NORM, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST,
        )
        cutoff = tl.load(cutoff_ptr + tl.minimum(cols, n_cols - 1))  # clamped as _score_tile's loads
        # Not <=, rather than >, so that NaN is kept (and reaches the output, as on the dense path).
        keep = ~(pre <= cutoff[None, :]) & row_ok[:, None] & (cols < n_cols)[None, :]
        keep_i = keep.to(tl.int32)
        slot = kept[:, None] + tl.cumsum(keep_i, axis=1) - 1
        put = keep & (slot < cap)
        dst = scratch_row[:, None] + slot
        tl.store(val_base + dst, pre.to(val_ptr.dtype.element_ty), mask=put)
        tl.store(lat_base + dst, cols, mask=put)
        kept += tl.sum(keep_i, axis=1)
    tl.store(count_ptr + rows.to(tl.int64) * n_splits + split, kept, mask=row_ok)


@triton.jit
def _threshold_gather_kernel(
    split_val_ptr, split_lat_ptr, split_count_ptr, val_ptr, idx_ptr, N, n_splits, cap, width,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """val/idx[row, :width]: the row's kept entries, split after split, then (-inf, 0)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    for s0 in range(0, width, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        value = tl.full((BLOCK_R, BLOCK_S), float("-inf"), dtype=val_ptr.dtype.element_ty)
        latent = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.int32)
        start = tl.zeros((BLOCK_R,), dtype=tl.int32)  # the row's entries in earlier splits
        for split in range(n_splits):
            count = tl.load(split_count_ptr + rows64 * n_splits + split, mask=row_ok, other=0)
            local = slots[None, :] - start[:, None]
            # local < cap holds whenever slot < width <= max_width (module docstring); the
            # test only keeps a wrong count from reading outside the scratch.
            take = (local >= 0) & (local < count[:, None]) & (local < cap) & row_ok[:, None]
            src = (rows64 * n_splits + split)[:, None] * cap + local
            value = tl.where(take, tl.load(split_val_ptr + src, mask=take), value)
            latent = tl.where(take, tl.load(split_lat_ptr + src, mask=take), latent)
            start += count
        dst = rows64[:, None] * width + slots[None, :]
        ok = row_ok[:, None] & (slots < width)[None, :]
        tl.store(val_ptr + dst, value, mask=ok)
        tl.store(idx_ptr + dst, latent.to(idx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------- configuration


def select_config(dtype: torch.dtype) -> dict:
    """`_threshold_select_kernel`'s tile. The epilogue's scatter (a row scan and two predicated
    stores per element, in the blocked layouts Triton converts the wgmma accumulator to) needs
    more registers than a top-k's: with 16-bit inputs a 64 x 128 tile over 4 warps spills
    (~400 B), over 8 warps it does not (206 registers: one CTA per SM; `fastsae aot`). fp32
    keeps `topk_encode.tile_config`'s narrower tile, which fits 4 warps (two CTAs per SM); fp64
    its tile over 8 warps."""
    cfg = tile_config(dtype)
    if INTERPRET or dtype == torch.float32:
        return cfg
    if dtype == torch.float64:
        return dict(cfg, num_warps=8)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)


def ctas_per_sm(dtype: torch.dtype) -> int:
    """How many select programs an SM holds at once, by registers (`select_config`)."""
    return 2 if dtype == torch.float32 else 1


def gather_config() -> dict:
    return dict(BLOCK_R=16, BLOCK_S=64, num_warps=4)


def _splits(n_row_blocks: int, n_tiles: int, cap: int, n_cols: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many latent ranges: the count that finishes soonest in whole waves of programs (a
    program's work is 1/splits of a row block's), the fewest on ties; at least a few tiles each,
    and no more than keeps the scratch (splits x cap entries a row) within 1/_SCRATCH_SHARE of
    the dense [N, d_sae] entries."""
    slots = sm_count(device) * ctas_per_sm(dtype)
    most = min(n_tiles // _MIN_TILES_PER_SPLIT, _MAX_SPLITS, n_cols // (_SCRATCH_SHARE * max(1, cap)))
    return min(range(1, max(1, most) + 1), key=lambda s: (triton.cdiv(n_row_blocks * s, slots) / s, s))


# ---------------------------------------------------------------------------- launcher


def _threshold_encode_fake(x_in, enc_weight, b_enc, dec_norm, cutoff, max_width, splits=0):
    # The width is the batch's largest kept count (capped): known only once the kernel has run.
    width = torch.library.get_ctx().new_dynamic_size(max=max_width)
    n = x_in.shape[0]
    return x_in.new_empty(n, width), x_in.new_empty(n, width, dtype=torch.int64), x_in.new_empty(n, dtype=torch.int64)


@register("threshold_encode", fake=_threshold_encode_fake)
def threshold_encode(
    x_in: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    dec_norm: Optional[Tensor],
    cutoff: Tensor,
    max_width: int,
    splits: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The entries of (x_in W^T + b_enc) * dec_norm above `cutoff` (per latent, in the
    accumulator's type), row by row: (pre_values [N, m] in x's dtype, indices [N, m] int64,
    counts [N] int64) as `fastsae.reference.threshold_encode` defines them. `splits` > 0 forces
    the number of latent ranges (tests); 0 picks it."""
    acc_dtype = torch.promote_types(x_in.dtype, torch.float32)  # the tile's accumulator
    x_in, enc_weight, b_enc, dec_norm, cutoff = contiguous(x_in, enc_weight, b_enc, dec_norm, cutoff.to(acc_dtype))
    n = x_in.shape[0]
    n_cols = enc_weight.shape[0]
    device = x_in.device
    if not 0 <= max_width <= n_cols:
        raise ValueError(f"triton threshold_encode: expected 0 <= max_width <= {n_cols} (d_sae), got {max_width}")
    if n == 0:
        return x_in.new_empty(0, 0), _launch.empty(0, 0, dtype=torch.int64, device=device), _launch.empty(
            0, dtype=torch.int64, device=device
        )
    _check(x_in, n_cols, "threshold_encode")

    cfg = select_config(x_in.dtype)
    row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    n_tiles = triton.cdiv(n_cols, cfg["BLOCK_N"])
    want = splits if splits > 0 else _splits(row_blocks, n_tiles, max_width, n_cols, x_in.dtype, device)
    tiles_per_split, n_splits = _partition(n_tiles, want)
    cap = min(max_width, tiles_per_split * cfg["BLOCK_N"])
    if cfg["BLOCK_M"] * n_splits * cap >= 2**31:  # a program's scratch offsets are 32-bit
        raise ValueError(
            f"triton threshold_encode: expected {cfg['BLOCK_M']} x splits x width < 2^31, got {n_splits} x {cap}"
        )

    # Only the kept entries of the scratch are ever written (and read).
    split_val = _launch.empty(n, n_splits, cap, dtype=x_in.dtype, device=device)
    split_lat = _launch.empty(n, n_splits, cap, dtype=torch.int32, device=device)
    split_count = _launch.empty(n, n_splits, dtype=torch.int32, device=device)
    launch_opaque(
        _threshold_select_kernel, (row_blocks, n_splits),
        x_in, enc_weight, b_enc, dec_norm if dec_norm is not None else b_enc, cutoff,
        split_val, split_lat, split_count, n, x_in.shape[1], n_cols, tiles_per_split, cap,
        HAS_NORM=dec_norm is not None, **_common(x_in, enc_weight, cfg), **cfg,
    )
    counts = split_count.sum(1, dtype=torch.int64)
    # The output width depends on the data: the one host sync of this op.
    width = int(counts.max().clamp(max=max_width))
    values = _launch.empty(n, width, dtype=x_in.dtype, device=device)
    indices = _launch.empty(n, width, dtype=torch.int64, device=device)
    gcfg = gather_config()
    grid = (triton.cdiv(n, gcfg["BLOCK_R"]),)
    if width > 0:
        launch_opaque(
            _threshold_gather_kernel, grid,
            split_val, split_lat, split_count, values, indices, n, n_splits, cap, width, **gcfg,
        )
    return values, indices, counts
