"""`SparseActivations`: the small sparse type that `SAE.encode_sparse` returns and `SAE.decode` takes.

Form: `values` and `indices` of shape [..., m] (leading dims as the input's) and `d_sae`.
Row r's activation vector is the sum over j of values[r, j] at latent indices[r, j].
- TopK: m == k, and each row's indices are distinct.
- ReLU, JumpReLU, BatchTopK (variable number of active latents per row): m is the largest
  number of nonzero activations of any row in the batch; shorter rows are padded with value 0
  (at some latent whose activation is 0), so padding adds nothing when decoding or scattering.
  `l0()` counts the real entries per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
        """The padded sparse form of dense activations [..., d_sae] (differentiable in the values)."""
        d_sae = dense.shape[-1]
        nonzero = dense != 0
        m = int(nonzero.sum(-1).max()) if dense.numel() else 0
        # Nonzero entries rank first; the padding slots land on entries that are zero.
        indices = nonzero.to(torch.uint8).topk(m, dim=-1, sorted=False).indices if m > 0 else (
            torch.zeros(*dense.shape[:-1], 0, dtype=torch.int64, device=dense.device)
        )
        return cls(dense.gather(-1, indices), indices, d_sae)

    def to(self, *args, **kwargs) -> "SparseActivations":
        """Moves both tensors (dtype arguments apply to the values only)."""
        values = self.values.to(*args, **kwargs)
        return SparseActivations(values, self.indices.to(values.device), self.d_sae)

    def __repr__(self) -> str:
        return (
            f"SparseActivations(shape={tuple(self.shape)}, width={self.width}, "
            f"dtype={self.values.dtype}, device={self.values.device})"
        )
