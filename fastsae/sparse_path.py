"""The row-wise sparse path's state, one small object per module (`SAE.sparse_path`, and the same
rule for `distributed.ShardedSAE`'s shard): the width limit, whether the next pass tries the
sparse path, the back-off after rows overflowed, and BatchTopK's per-row candidate bound.

It holds plain numbers, no tensors: the module owns the parameters, the architecture computes, and
this object only says which path to take and learns from what the last pass found. `state_dict`
and `load_state_dict` let a trainer's roll-back snapshot restore it with the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

# The default width limit per device type, as d_sae / divisor, from the committed sweeps of
# benchmarks/bench_sparse_path.py; device types not listed take the dense path.
SPARSE_PATH_DIVISOR = {"cpu": 8}


def default_sparse_width_limit(d_sae: int, device) -> int:
    """The widest row the row-wise sparse path takes on `device` by default: d_sae / 8 on the CPU,
    0 (dense) elsewhere (see `SAE.default_sparse_width_limit` for the measurements)."""
    divisor = SPARSE_PATH_DIVISOR.get(torch.device(device).type)
    return max(1, d_sae // divisor) if divisor else 0


@dataclass
class SparsePath:
    # The widest row the sparse path takes; 0: always dense; None: the device's default.
    width_limit: Optional[int] = None
    hint: bool = True  # False after a batch overflowed, until a dense batch is sparse again
    dense_passes_to_skip: int = 0
    overflow_backoff: int = 1
    batchtopk_bound: int = 0  # BatchTopK training: the per-row candidate count the last batch needed

    def limit(self, d_sae: int, device) -> int:
        """The width limit in effect for `d_sae` latents on `device` (not capped at d_sae)."""
        return default_sparse_width_limit(d_sae, device) if self.width_limit is None else self.width_limit

    def overflowed(self) -> None:
        """A row had more entries than the limit: the dense path (this pass's included), and each
        overflow in a row doubles (up to 64) the dense passes before density is looked at again,
        so alternating batches waste few sparse passes."""
        self.hint = False
        self.dense_passes_to_skip = self.overflow_backoff
        self.overflow_backoff = min(64, 2 * self.overflow_backoff)

    def fitted(self) -> None:
        self.overflow_backoff = 1

    def wants_a_look(self) -> bool:
        """After a dense pass: whether to count its rows' widths now. Every 8th dense pass at most
        (on a GPU each look waits for the device)."""
        if self.hint:
            return False
        if self.dense_passes_to_skip > 0:
            self.dense_passes_to_skip -= 1
            return False
        return True

    def saw_widest(self, widest: int, limit: int) -> None:
        """Back to the sparse path once the rows fit well within the limit."""
        self.hint = 4 * widest <= 3 * limit
        if not self.hint:
            self.dense_passes_to_skip = 7

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
