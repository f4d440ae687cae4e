"""The pure-torch baselines fastsae is measured against, written the way each library runs them.

- `torch-dense`: SAELens' training step for every architecture that describes it
  (`Architecture.reference_training`), dense: pre-activations [N, d_sae], the architecture's
  activation and sparsity penalty as SAELens computes them, a dense decode, and for architectures
  trained with AuxK, given a dead mask, SAELens' AuxK (the dead latents' pre-activations masked
  dense, torch.topk of k_aux, scattered into [N, d_sae] and decoded, the dead count read on the
  host).
- `torch-sparse`: sparsify's fallback, for the architecture sparsify trains (TopK). Dense
  pre-activations, ReLU, torch.topk, and a decoder that reads only the k selected rows through
  F.embedding_bag (on CUDA in 16 bits, whose embedding_bag has no backward, a gather of the k rows
  and a weighted sum); AuxK the same way (masked dense top-k, then the embedding-bag decoder).

Both hold SAELens-layout parameters (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec,
JumpReLU's threshold, a transcoder's W_skip [d_out, d_in]), copied from the fastsae SAE being
compared, and compute the loss `SAE.training_forward` computes (MSE summed over d_out and averaged
over rows, plus the sparsity and AuxK terms with the same coefficients), so every contender does
the same work on the same numbers. A transcoder's step takes a target: its output (decode + b_dec
+ x @ W_skip.T) is compared with the target, and AuxK reconstructs the residual target - output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsae import architectures

AUX_COEFFICIENT = 1.0 / 32  # SAE.training_forward's default


@dataclass(frozen=True)
class BenchMath:
    """What the bench needs to know of one architecture, so that no bench code names one:
    its dense activation and sparsity penalty as SAELens computes them (the baselines' math),
    whether it trains with AuxK, how a bench SAE of it is set up, and whether its step can be
    captured as a CUDA graph."""

    activate: Callable[["DenseSAE", Tensor], Tensor]  # pre-activations -> dense activations
    # (model, pre, acts) -> the per-row sparsity term, averaged (None: no penalty)
    penalty: Optional[Callable[["DenseSAE", Tensor, Tensor], Tensor]] = None
    auxk: bool = False  # a dead mask adds SAELens' AuxK
    takes_k: bool = False  # the SAE is built with the shape's k
    # Sets the SAE so rows hold about k active latents, from each latent's 1 - k/d_sae quantile
    # of the pre-activations (None: k does that).
    calibrate: Optional[Callable[[nn.Module, Tensor, torch.dtype], None]] = None
    sparse_decoder: bool = False  # sparsify's embedding-bag baseline (`torch-sparse`) computes it
    capturable: bool = False  # its step has no host sync (`training.graph.CapturedStep`)
    extra_parameters: tuple[str, ...] = ()  # beyond W_enc, b_enc, W_dec, b_dec
    # The train_step cases `fastsae bench` times: fractions of latents marked dead (AuxK), or
    # (None,): no dead mask (dead latents resampled between steps, or left).
    dead_fractions: tuple[Optional[float], ...] = (None,)
    encode_case: bool = False  # encode and decode are timed on an SAE of this architecture
    nested: Optional[Callable[["DenseSAE", Tensor, Tensor], Tensor]] = None  # (model, x, acts): Matryoshka's levels


# The headline architecture (the one sparsify trains, so every baseline and peer computes it):
# encode and decode are timed on it, its train_step at these dead fractions and, on CUDA, captured
# as a graph (`training.graph.CapturedStep` records its step). Other AuxK architectures: 1% dead.
HEADLINE_DEAD_FRACTIONS = (0.0, 0.01, 0.10)
AUXK_DEAD_FRACTIONS = (0.01,)


def bench_math(arch) -> BenchMath:
    """An architecture's row of BENCH_MATH, from what it says of itself (its `reference_training`:
    SAELens' math, whether sparsify trains it; whether it takes k and trains with AuxK)."""
    ref = arch.reference_training
    if ref.sparsify:
        dead_fractions = HEADLINE_DEAD_FRACTIONS
    else:
        dead_fractions = AUXK_DEAD_FRACTIONS if arch.supports_auxk else (None,)
    return BenchMath(
        ref.activate, penalty=ref.penalty, auxk=arch.supports_auxk, takes_k=arch.uses_k, calibrate=ref.calibrate,
        sparse_decoder=ref.sparsify, capturable=ref.sparsify, extra_parameters=ref.extra_parameters,
        dead_fractions=dead_fractions, encode_case=ref.sparsify, nested=ref.nested,
    )


def _bench_order(arch) -> tuple[bool, bool]:
    """The headline first, then the AuxK architectures, then the rest (registry order within):
    the order of the step cases and their rows."""
    return not arch.reference_training.sparsify, not arch.supports_auxk


# Keyed by the names of fastsae.architectures' registry and built from it: every architecture
# with a `reference_training` is benched, the others have nothing to be compared with.
_BENCHED = sorted(
    (arch for arch in map(architectures.get, architectures.names()) if arch.reference_training is not None),
    key=_bench_order,
)
BENCH_MATH: dict[str, BenchMath] = {arch.name: bench_math(arch) for arch in _BENCHED}

BASELINES = ("torch-dense", "torch-sparse")
# The architectures each baseline computes.
BASELINE_ARCHITECTURES = {
    "torch-dense": tuple(BENCH_MATH),
    "torch-sparse": tuple(name for name, math in BENCH_MATH.items() if math.sparse_decoder),
}


def gather_weighted_sum(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """out[n] = sum_j values[n, j] * weight[indices[n, j]]: a gather of the rows and a batched
    product (fp32 accumulation in 16 bits), differentiable in every dtype on every device."""
    return torch.bmm(values.unsqueeze(1), weight[indices]).squeeze(1)


def aux_k(d_out: int, d_sae: int) -> int:
    return min(d_out // 2, d_sae)


class DenseSAE(nn.Module):
    """SAELens' training step for the SAE's architecture, dense (encode returns [N, d_sae])."""

    def __init__(self, sae):
        super().__init__()
        self.architecture = sae.architecture
        self.math = BENCH_MATH[sae.architecture]
        self.cfg = sae.cfg  # what the architecture's reference math reads (k, bandwidth)
        self.k = sae.cfg.k
        self.W_enc = nn.Parameter(sae.W_enc.detach().clone().contiguous())
        self.b_enc = nn.Parameter(sae.b_enc.detach().clone())
        self.W_dec = nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = nn.Parameter(sae.b_dec.detach().clone())
        for name in self.math.extra_parameters:
            setattr(self, name, nn.Parameter(getattr(sae, name).detach().clone()))
        skip = None if sae.W_skip is None else nn.Parameter(sae.W_skip.detach().clone())
        self.register_parameter("W_skip", skip)

    def pre(self, x: Tensor) -> Tensor:
        if not self.cfg.apply_b_dec_to_input:  # transcoders (SAELens', sparsify's) encode x as it is
            return x @ self.W_enc + self.b_enc
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        return self.math.activate(self, pre)

    def encode(self, x: Tensor):
        return self.activate(self.pre(x))

    def decode(self, acts) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def aux_decode(self, top: torch.return_types.topk, like: Tensor) -> Tensor:
        """AuxK's reconstruction from the dead latents' top k_aux: SAELens scatters them dense."""
        return torch.zeros_like(like).scatter(-1, top.indices, top.values) @ self.W_dec

    def loss(self, x: Tensor, dead_mask: Optional[Tensor] = None, coefficient: float = 0.0,
             target: Optional[Tensor] = None) -> Tensor:
        y = x if target is None else target  # what the output is trained to match
        pre = self.pre(x)
        acts = self.sparse_form(pre)
        x_hat = self.decode(acts)
        if self.W_skip is not None:
            x_hat = x_hat + x @ self.W_skip.T
        loss = (x_hat - y).pow(2).sum(-1).mean()
        if self.math.nested is not None:
            # the levels reconstruct what the skip connection leaves of the target
            goal = y if self.W_skip is None else y - x @ self.W_skip.T
            loss = loss + self.math.nested(self, goal, acts)
        if self.math.penalty is not None and coefficient:
            loss = loss + coefficient * self.math.penalty(self, pre, acts)
        if dead_mask is not None and self.math.auxk:
            n_dead = int(dead_mask.sum())  # a host sync on a GPU, as SAELens does
            if n_dead:
                k_aux = aux_k(y.shape[1], pre.shape[1])
                top = pre.masked_fill(~dead_mask, float("-inf")).topk(min(k_aux, n_dead), dim=-1, sorted=False)
                residual = (y - x_hat).detach()
                e_hat = self.aux_decode(top, pre)
                loss = loss + AUX_COEFFICIENT * min(1.0, n_dead / k_aux) * (e_hat - residual).pow(2).sum(-1).mean()
        return loss

    def sparse_form(self, pre: Tensor):
        """The activations in the form `decode` takes (dense here)."""
        return self.activate(pre)


# The name the TopK baseline had before every architecture had one.
DenseTopK = DenseSAE


class SparseTopK(DenseSAE):
    """sparsify's TopK SAE with its embedding_bag decoder (values, indices never densified)."""

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.sparse_form(self.pre(x))

    def sparse_form(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        top = F.relu(pre).topk(self.k, dim=-1, sorted=False)
        return top.values, top.indices

    def _bag(self, values: Tensor, indices: Tensor) -> Tensor:
        if values.is_cuda and values.dtype in (torch.bfloat16, torch.float16):
            # embedding_bag has no 16-bit backward on CUDA: the same sum as a pure-torch gather of
            # the k rows and a weighted sum (a batched product, fp32 accumulation).
            return gather_weighted_sum(values, indices, self.W_dec)
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")

    def decode(self, acts: tuple[Tensor, Tensor]) -> Tensor:
        values, indices = acts
        return self._bag(values, indices) + self.b_dec

    def aux_decode(self, top: torch.return_types.topk, like: Tensor) -> Tensor:
        return self._bag(top.values, top.indices)


def make_baseline(name: str, sae) -> DenseSAE:
    if name not in BASELINES:
        raise ValueError(f"baseline: expected one of {BASELINES}, got {name!r}")
    if sae.architecture not in BASELINE_ARCHITECTURES[name]:
        raise ValueError(
            f"baseline {name!r}: computes {BASELINE_ARCHITECTURES[name]}, not architecture {sae.architecture!r}"
        )
    return DenseSAE(sae) if name == "torch-dense" else SparseTopK(sae)


def baselines_for(architecture: str) -> tuple[str, ...]:
    return tuple(name for name in BASELINES if architecture in BASELINE_ARCHITECTURES[name])
