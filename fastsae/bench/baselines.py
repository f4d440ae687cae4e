"""The pure-torch baselines fastsae is measured against, written the way each library runs them.

- `torch-dense`: SAELens' TopK SAE. Dense pre-activations, torch.topk, ReLU, the kept values
  scattered into a dense [N, d_sae] matrix, decoded by a dense matrix product.
- `torch-sparse`: sparsify's fallback. Dense pre-activations, ReLU, torch.topk, and a decoder
  that reads only the k selected rows through F.embedding_bag (on CUDA in 16 bits, whose
  embedding_bag has no backward, a gather of the k rows and a weighted sum).

Both hold SAELens-layout parameters (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec),
copied from the fastsae SAE being compared, and compute the same loss (mean over rows of the
squared error summed over d_in), so every contender does the same work on the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BASELINES = ("torch-dense", "torch-sparse")


def gather_weighted_sum(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """out[n] = sum_j values[n, j] * weight[indices[n, j]]: a gather of the rows and a batched
    product (fp32 accumulation in 16 bits), differentiable in every dtype on every device."""
    return torch.bmm(values.unsqueeze(1), weight[indices]).squeeze(1)


class DenseTopK(nn.Module):
    """SAELens' TopK SAE (encode returns the dense [N, d_sae] activations)."""

    def __init__(self, sae):
        super().__init__()
        self.k = sae.cfg.k
        self.W_enc = nn.Parameter(sae.W_enc.detach().clone().contiguous())
        self.b_enc = nn.Parameter(sae.b_enc.detach().clone())
        self.W_dec = nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = nn.Parameter(sae.b_dec.detach().clone())

    def encode(self, x: Tensor) -> Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def loss(self, x: Tensor) -> Tensor:
        return (self.decode(self.encode(x)) - x).pow(2).sum(-1).mean()


class SparseTopK(DenseTopK):
    """sparsify's TopK SAE with its embedding_bag decoder (values, indices never densified)."""

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = pre.topk(self.k, dim=-1, sorted=False)
        return top.values, top.indices

    def decode(self, acts: tuple[Tensor, Tensor]) -> Tensor:
        values, indices = acts
        if values.is_cuda and values.dtype in (torch.bfloat16, torch.float16):
            # embedding_bag has no 16-bit backward on CUDA: the same sum as a pure-torch gather of
            # the k rows and a weighted sum (a batched product, fp32 accumulation).
            return gather_weighted_sum(values, indices, self.W_dec) + self.b_dec
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec


def make_baseline(name: str, sae) -> DenseTopK:
    if name == "torch-dense":
        return DenseTopK(sae)
    if name == "torch-sparse":
        return SparseTopK(sae)
    raise ValueError(f"baseline: expected one of {BASELINES}, got {name!r}")
