"""The measurements `dispatch` and the triton backend choose by, on CUDA: which top-k encoder
path (`encoder_path`: the fused Triton kernel or cuBLAS + torch.topk in row chunks) and which
backend (`preferred_backend`: triton or cuda) was faster at the shape nearest the call's.

Every row is a measurement (device, shape, milliseconds, source), never a guess. Lookups take
the row nearest in d_in (on a log scale): what decides between the paths is how long the matrix
product is against the per-element selection work, and that ratio grows with d_in. Off CUDA
the tables are not consulted. benchmarks/gpu_targets.py re-measures each row; add its rows here
when a result is committed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

# The first GPU session's numbers, tabulated in kernels/NOTES.md ("Measured against predicted").
H200_2026_11_29 = "kernels/NOTES.md, H200 2026-11-29 (bf16, torch 2.11, Triton 3.6)"

ENCODER_PATHS = ("fused", "chunked")
PATH_ENV_VAR = "FASTSAE_ENCODER_PATH"


@dataclass(frozen=True)
class EncoderRow:
    """The top-k encoder at one shape: the fused Triton kernel (its best measured tile) against
    cuBLAS addmm + torch.topk (the `chunked` path's work, there on the whole batch at once)."""

    device: str  # torch.cuda.get_device_name()
    n: int
    d_in: int
    d_sae: int
    k: int
    fused_ms: float
    chunked_ms: float
    source: str

    @property
    def winner(self) -> str:
        return "fused" if self.fused_ms <= self.chunked_ms else "chunked"


ENCODER_TABLE: tuple[EncoderRow, ...] = (
    # default tile 2.74 ms (best of the sweep); addmm + topk 4.01 ms; cuBLAS alone 0.88 ms
    EncoderRow("NVIDIA H200", 16384, 768, 24576, 32, 2.74, 4.01, H200_2026_11_29),
    # 128 x 128 / 8 warps / 3 stages 14.76 ms (default tile 17.02); addmm + topk 9.84 ms; cuBLAS 6.23 ms
    EncoderRow("NVIDIA H200", 4096, 4096, 131072, 64, 14.76, 9.84, H200_2026_11_29),
)


@dataclass(frozen=True)
class BackendRow:
    """Forward + backward of a TopK SAE per backend at one shape (the ops of one step together:
    no per-op measurement of the cuda backend exists yet)."""

    device: str
    n: int
    d_in: int
    d_sae: int
    k: int
    ms: dict  # backend -> ms
    source: str


BACKEND_TABLE: tuple[BackendRow, ...] = (
    BackendRow("NVIDIA H200", 16384, 768, 24576, 32, {"triton": 4.72, "cuda": 8.13}, H200_2026_11_29),
    BackendRow("NVIDIA H200", 16384, 4096, 131072, 64, {"triton": 79.19, "cuda": 73.98}, H200_2026_11_29),
)

# A backend displaces the default order only when measured faster by more than this: the spread
# of repeated medians in the same files is 3-8 %.
MIN_GAIN = 1.10


def _nearest(rows, d_in: int):
    return min(rows, key=lambda r: abs(math.log(max(1, d_in)) - math.log(r.d_in)))


def _device_rows(rows, device_name: Optional[str]):
    """Rows for this GPU model, or for any GPU when it has none (Hopper rows stand for all)."""
    same = [r for r in rows if device_name is not None and r.device == device_name]
    return same or list(rows)


def encoder_path(device_type: str, d_in: int, k: int, device_name: Optional[str] = None) -> str:
    """"fused" or "chunked" for the triton backend's top-k encoder. FASTSAE_ENCODER_PATH
    ("fused", "chunked" or "auto") overrides it. Off CUDA (the interpreter) and for k above what
    the measured rows cover, the fused kernel (which itself goes to chunks past MAX_FUSED_K)."""
    forced = os.environ.get(PATH_ENV_VAR, "auto").strip().lower() or "auto"
    if forced not in ENCODER_PATHS + ("auto",):
        raise ValueError(f"{PATH_ENV_VAR}: expected one of {ENCODER_PATHS + ('auto',)}, got {forced!r}")
    if forced != "auto":
        return forced
    if device_type != "cuda":
        return "fused"
    return _nearest(_device_rows(ENCODER_TABLE, device_name), d_in).winner


def preferred_backend(device_type: str, d_in: int, default: str, loadable, device_name: Optional[str] = None) -> str:
    """The backend `auto` takes at this width: `default` unless the nearest measured row has a
    loadable backend faster by MIN_GAIN."""
    if device_type != "cuda":
        return default
    row = _nearest(_device_rows(BACKEND_TABLE, device_name), d_in)
    base = row.ms.get(default)
    if base is None:
        return default
    # Fastest first; loadability is asked only of a backend that would win (loading the cuda
    # backend compiles the extension the first time).
    for ms, name in sorted((ms, name) for name, ms in row.ms.items() if name != default):
        if ms * MIN_GAIN >= base:
            break
        if loadable(name):
            return name
    return default
