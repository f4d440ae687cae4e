"""`SparseActivations`: the small sparse type that `SAE.encode_sparse` returns and `SAE.decode` takes.

Form: `values` and `indices` of shape [..., m] (leading dims as the input's) and `d_sae`.
Row r's activation vector is the sum over j of values[r, j] at latent indices[r, j].
- TopK: m == k, and each row's indices are distinct.
- ReLU, JumpReLU, BatchTopK (variable number of active latents per row): m is the largest
  number of nonzero activations of any row in the batch; shorter rows are padded with value 0
  at latents the row does not hold (distinct within the row), so padding adds nothing when
  decoding or scattering, even with `scatter` rather than `scatter_add`. `l0()` counts the real
  entries per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def tracing() -> bool:
    """Under torch.compile or a torch.func transform: a sparse form whose width depends on the data
    would break them (a graph break, an error with fullgraph=True or vmap), so callers take the
    dense path instead."""
    if torch.compiler.is_compiling():
        return True
    functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(functorch_active is not None and functorch_active())


@dataclass(frozen=True)
class SparseActivations:
    values: Tensor
    indices: Tensor
    d_sae: int

    def __post_init__(self):
        if self.values.shape != self.indices.shape:
            raise ValueError(
                f"SparseActivations: values and indices must have one shape, got "
                f"{tuple(self.values.shape)} and {tuple(self.indices.shape)}"
            )
        if self.indices.dtype != torch.int64:
            raise ValueError(f"SparseActivations: expected int64 indices, got {self.indices.dtype}")
        if self.values.ndim < 1:
            raise ValueError("SparseActivations: values must have at least one dimension [..., m]")

    @property
    def shape(self) -> torch.Size:
        """The shape of the dense activations this represents: [..., d_sae]."""
        return torch.Size((*self.values.shape[:-1], self.d_sae))

    @property
    def width(self) -> int:
        """m: the number of (value, index) slots per row."""
        return self.values.shape[-1]

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros(self.shape)
        return dense.scatter_add(-1, self.indices, self.values)

    def l0(self) -> Tensor:
        """Number of nonzero activations per row, shape [...]."""
        return (self.values != 0).sum(-1)

    def flatten(self) -> "SparseActivations":
        """The same activations with the leading dims flattened to one: [N, m]."""
        m = self.width
        return SparseActivations(self.values.reshape(-1, m), self.indices.reshape(-1, m), self.d_sae)

    @classmethod
    def from_dense(cls, dense: Tensor) -> "SparseActivations":
        """The padded sparse form of dense activations [..., d_sae] (differentiable in the values):
        each row's nonzero entries (NaN included) in ascending latent order, then padding."""
        d_sae = dense.shape[-1]
        lead = dense.shape[:-1]
        flat = dense.reshape(-1, d_sae)
        nonzero = flat != 0
        counts = nonzero.sum(-1)
        m = int(counts.max()) if flat.numel() else 0
        rows, cols = nonzero.nonzero(as_tuple=True)  # row-major: ascending latent within a row
        slots = slots_within_rows(rows, counts)
        indices = torch.zeros(flat.shape[0], m, dtype=torch.int64, device=dense.device)
        indices[rows, slots] = cols
        real = torch.arange(m, device=dense.device) < counts[:, None]
        indices = pad_at_free_latents(real, indices, d_sae)
        values = flat.gather(-1, indices)  # 0 at the padding: the row does not hold those latents
        return cls(values.reshape(*lead, m), indices.reshape(*lead, m), d_sae)

    def to(self, *args, **kwargs) -> "SparseActivations":
        """Moves both tensors (dtype arguments apply to the values only)."""
        values = self.values.to(*args, **kwargs)
        return SparseActivations(values, self.indices.to(values.device), self.d_sae)

    def __repr__(self) -> str:
        return (
            f"SparseActivations(shape={tuple(self.shape)}, width={self.width}, "
            f"dtype={self.values.dtype}, device={self.values.device})"
        )


def slots_within_rows(rows: Tensor, counts: Tensor) -> Tensor:
    """For entries listed row-major (`rows`, as `nonzero` gives them) with `counts[r]` entries in
    row r: each entry's position within its row, i.e. its slot in the padded [N, m] form."""
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(rows.shape[0], device=rows.device) - starts[rows]


def pad_at_free_latents(real: Tensor, indices: Tensor, d_sae: int, traceable: bool = False) -> Tensor:
    """`indices` [N, m] with each row's padding slots pointed at distinct latents the row does not
    hold, spread over the latents by row.

    A row's real slots (`real`, a prefix of the row) hold its latents in ascending order; what the
    padding slots hold is replaced. The kernels group work by latent, so padding that all pointed
    at one latent would hand one thread (or one GPU program) every row's padding. `traceable`:
    no data-dependent shortcut (inside an op's autograd, where the width is symbolic).
    """
    n, m = indices.shape
    if not traceable and (m == 0 or bool(real.all())):
        return indices
    slot = torch.arange(m, device=indices.device)
    counts = real.sum(1, keepdim=True)
    # With held latents h_0 < h_1 < ..., the t-th latent a row does not hold is
    # t + #{i : h_i - i <= t} (h_i - i is nondecreasing, so that count is a searchsorted).
    shifted = torch.where(real, indices - slot, d_sae).contiguous()
    free = (d_sae - counts).clamp_min(1)
    row = torch.arange(n, device=indices.device)[:, None]
    t = torch.remainder(row * 7919 + slot - counts, free)  # distinct within a row: m - count <= free
    latent = t + torch.searchsorted(shifted, t.contiguous(), right=True)
    return torch.where(real, indices, latent)


def batch_top_entries(encode: Callable[[int], tuple], n: int, keep_count: int, d_sae: int, bound: int):
    """BatchTopK's selection without the dense [N, d_sae]: the batch's `keep_count` largest
    activations, taken from each row's top `bound` candidates, `encode(bound)` -> (values [N, bound],
    indices [N, bound], anything else the encoder returns). Exact unless a row had all its
    candidates kept while its smallest one is positive (its next entries might belong too): then
    the bound doubles and the batch is encoded again. Returns (values [N, m], indices [N, m], the
    encoder's extra output, the bound used): each row compacted to the batch's widest row, its kept
    entries first, then value-0 slots at other candidates of the row (distinct latents, no
    gradient)."""
    while True:
        cand, cand_idx, extra = encode(bound)
        flat = cand.detach().flatten()
        keep = torch.zeros(n * bound, dtype=torch.bool, device=cand.device)
        keep[flat.topk(min(keep_count, flat.numel()), sorted=False).indices] = True
        keep = keep.view(n, bound)
        saturated = keep.all(1) & (cand.detach().amin(1) > 0)
        if bound >= d_sae or not bool(saturated.any()):
            break
        bound = min(d_sae, 2 * bound)
    width = max(1, int(keep.sum(1).max())) if n else 0
    order = cand.detach().masked_fill(~keep, float("-inf")).topk(width, dim=1).indices
    values = torch.where(keep.gather(1, order), cand.gather(1, order), cand.new_zeros(()))
    return values, cand_idx.gather(1, order), extra, bound
