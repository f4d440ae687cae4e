"""The `cuda` backend: fastsae's CUDA kernels (csrc/*.cu), compiled on first use.

The kernels live in the same `fastsae_cpp` extension as the CPU kernels: on a machine with a
CUDA device and a CUDA toolkit (CUDA_HOME), `fastsae.ops.backend_cpp` builds it with its CUDA
parts (radix top-k per row over cuBLAS pre-activations, sparse decode, grouped sparse
backward), and torch's dispatcher sends CUDA tensors to them. The op functions are therefore
the cpp backend's. Importing this module without the CUDA parts raises ImportError, which
`dispatch` reports once before falling back to the next backend (triton, then torch).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch.utils.cpp_extension import CUDA_HOME

from fastsae.ops import backend_cpp
from fastsae.ops.backend_cpp import (  # noqa: F401  (the backend's op functions)
    sparse_decode,
    sparse_decode_backward,
    topk_encode_backward,
)
from fastsae.ops.chunked import topk_encode_chunked
from fastsae.reference import threshold_encode  # noqa: F401  (cuBLAS in row chunks + compaction; no .cu kernel yet)

if not backend_cpp.HAS_CUDA_KERNELS:
    if backend_cpp.CUDA_BUILD_ERROR:
        raise ImportError(f"fastsae's CUDA kernels failed to build: {backend_cpp.CUDA_BUILD_ERROR}")
    raise ImportError(
        "fastsae's C++ extension is built without CUDA kernels here: they need a CUDA device and toolkit "
        f"(torch.cuda.is_available()={torch.cuda.is_available()}, torch.version.cuda={torch.version.cuda}, "
        f"CUDA_HOME={CUDA_HOME}, FASTSAE_BUILD_CUDA={os.environ.get('FASTSAE_BUILD_CUDA', '1')})"
    )


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
    # AuxK takes the chunked torch path, as on the triton backend (the shared design: the dead
    # latents' columns of each chunk's product, over a list of fixed capacity, no host sync).
    if aux_latents is not None:
        x_in = x - b_dec if b_dec is not None else x
        return topk_encode_chunked(x_in, enc_weight, b_enc, dec_norm, k, aux_latents, k_aux)
    return backend_cpp.topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, None, 0)
