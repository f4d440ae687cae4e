"""fastsae's ops: checked entry points over the torch.library custom ops, one file per op.

  topk_encoder.py             fastsae::topk_encode, and fastsae::topk_encode_backward (both encoders')
  threshold_encoder.py        fastsae::threshold_encode
  sparse_decoder.py           fastsae::sparse_decode and fastsae::sparse_decode_backward
  sparse_decoder_with_aux.py  fastsae::sparse_decode_with_aux

Each file holds the op's public wrapper (re-exported here), its custom ops, one fake each and
the autograd formula. The ops run on the backend that `dispatch` picks at call time (torch
reference, cpp, triton or cuda). Every argument is checked once per call, by the op's function
in `fastsae.validation`, whichever backend runs (see `checking`): a ValueError naming the
argument, what was expected and what came, instead of a kernel fault or a silently different
result. The ops that read indices take `check_indices` (default True): False skips the range
check, a host sync on an accelerator, for indices fastsae produced itself.
"""

from __future__ import annotations

from fastsae.ops.dispatch import BACKEND_NAMES, available_backends, requested_backend, select, use_backend
from fastsae.ops.sparse_decoder import sparse_decode
from fastsae.ops.sparse_decoder_with_aux import sparse_decode_with_aux
from fastsae.ops.threshold_encoder import threshold_encode
from fastsae.ops.topk_encoder import topk_encode

__all__ = [
    "BACKEND_NAMES",
    "available_backends",
    "requested_backend",
    "select",
    "use_backend",
    "topk_encode",
    "threshold_encode",
    "sparse_decode",
    "sparse_decode_with_aux",
]
