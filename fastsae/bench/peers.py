"""The libraries users would otherwise pick, as bench contenders, when they are importable.

- `saelens`: SAELens' own `TopKSAE` (package `sae-lens`): its encode (dense [N, d_sae] output)
  and, for train_step, its forward with the bench's loss and torch's Adam.
- `sparsify`: sparsify's own kernels (package `eai-sparsify`): its Triton `fused_encoder` and its
  decoder (`decoder_impl`: the Triton embedding-bag where it has one), as its SparseCoder runs them.

Both get the same weights and inputs as every other contender (copied from the fastsae SAE) and
the same loss (mean over rows of the squared error summed over d_in). Nothing here is installed
by fastsae; a peer that does not import is left out, and one that fails at run time is reported by
the runner, not hidden.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor, nn

PEERS = ("saelens", "sparsify")


def importable(name: str) -> bool:
    module = {"saelens": "sae_lens", "sparsify": "sparsify"}[name]
    try:
        if importlib.util.find_spec(module) is None:
            return False
        if name == "sparsify":
            importlib.import_module("sparsify.fused_encoder")  # the package of that name on PyPI is another project
        else:
            importlib.import_module(module)
        return True
    except Exception:
        return False


def available_peers(device_type: str) -> list[str]:
    """Peers that import here (sparsify's kernels are Triton: CUDA only)."""
    return [p for p in PEERS if importable(p) and (p != "sparsify" or device_type == "cuda")]


class SAELensTopK(nn.Module):
    """SAELens' TopKSAE holding the fastsae SAE's weights."""

    def __init__(self, sae):
        super().__init__()
        from sae_lens import TopKSAE, TopKSAEConfig

        cfg = TopKSAEConfig(
            d_in=sae.d_in, d_sae=sae.d_sae, k=sae.cfg.k, dtype=str(sae.dtype).removeprefix("torch."), device=str(sae.device)
        )
        self.sae = TopKSAE(cfg)
        with torch.no_grad():
            self.sae.W_enc.copy_(sae.W_enc)
            self.sae.b_enc.copy_(sae.b_enc)
            self.sae.W_dec.copy_(sae.W_dec)
            self.sae.b_dec.copy_(sae.b_dec)

    def encode(self, x: Tensor) -> Tensor:
        return self.sae.encode(x)

    def loss(self, x: Tensor) -> Tensor:
        return (self.sae(x) - x).pow(2).sum(-1).mean()


class SparsifyTopK(nn.Module):
    """sparsify's SparseCoder forward (TopK, no skip connection) on its own kernels."""

    def __init__(self, sae):
        super().__init__()
        from sparsify.fused_encoder import fused_encoder

        self._encoder = fused_encoder
        try:
            from sparsify.utils import decoder_impl
        except ImportError:  # older releases: the Triton embedding-bag directly
            from sparsify.xformers import xformers_embedding_bag

            def decoder_impl(indices, values, w_dec_t):
                return xformers_embedding_bag(indices, w_dec_t.mT, values)
        self._decoder = decoder_impl
        self.k = sae.cfg.k
        self.W = nn.Parameter(sae.W_enc.detach().t().contiguous())  # its encoder.weight, [d_sae, d_in]
        self.b = nn.Parameter(sae.b_enc.detach().clone())
        self.W_dec = nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = nn.Parameter(sae.b_dec.detach().clone())

    def encode(self, x: Tensor):
        values, indices, _ = self._encoder(x - self.b_dec, self.W, self.b, self.k, "topk")
        return values, indices

    def loss(self, x: Tensor) -> Tensor:
        values, indices = self.encode(x)
        out = self._decoder(indices, values.to(self.W_dec.dtype), self.W_dec.mT) + self.b_dec
        return (out - x).pow(2).sum(-1).mean()


def make_peer(name: str, sae) -> Optional[nn.Module]:
    if name == "saelens":
        return SAELensTopK(sae)
    if name == "sparsify":
        return SparsifyTopK(sae)
    raise ValueError(f"peer: expected one of {PEERS}, got {name!r}")
