"""The libraries users would otherwise pick, as bench contenders, when they are importable.

- `saelens`: SAELens' own training SAEs (package `sae-lens`): their encode (dense [N, d_sae]
  output) and, for train_step, their `training_forward_pass` (AuxK on the same dead mask,
  sparsity penalties at the same coefficient) with torch's Adam.
- `sparsify`: sparsify's own kernels (package `eai-sparsify`): its `fused_encoder` and its
  decoder (`decoder_impl`: the Triton embedding-bag where it has one; on a CPU its torch path,
  `eager_decode`), as its SparseCoder runs them.
- `saelens+fastsae`: the `saelens` peer (TopK) with `fastsae.apply_to_saelens()` in force for its
  calls: SAELens' own class and code, its math on fastsae's ops.
- `sparsify+fastsae`: sparsify's own `SparseCoder` (from the SAE by `SAE.to_sparsify()`) with
  `fastsae.apply_to_sparsify()` in force for its calls: its forward with the dead mask, loss
  fvu + auxk_loss / 32 (sparsify's losses: the same work as the `sparsify` peer's, normalised by
  the batch's variance), its encode fused (`dense_pre_acts=False`). On CUDA, where sparsify's
  forward autocasts to bf16, the patch leaves its own code running.

Both get the same weights and inputs as every other contender (copied from the fastsae SAE) and
the same loss (mean over rows of the squared error summed over d_in). Nothing here is installed
by fastsae; a peer that does not import is left out, and one that fails at run time is reported by
the runner, not hidden.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastsae.bench.baselines import BASELINE_ARCHITECTURES, BENCH_MATH

PEERS = ("saelens", "sparsify", "saelens+fastsae", "sparsify+fastsae")


def importable(name: str) -> bool:
    name = name.removesuffix("+fastsae")
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
    """Peers that import here (sparsify's decoder is Triton on CUDA; on a CPU the bench asks for
    it by name only)."""
    return [p for p in PEERS if importable(p) and (p != "sparsify" or device_type == "cuda")]


@contextlib.contextmanager
def _patched(library: str, **settings):
    """fastsae's patch of `library` in force for one call (left as it was found when already on)."""
    from fastsae import integrations
    from fastsae.integrations import saelens as saelens_integration
    from fastsae.integrations import sparsify as sparsify_integration

    module = saelens_integration if library == "saelens" else sparsify_integration
    if module.is_patched():
        yield
        return
    getattr(integrations, f"apply_to_{library}")(**settings)
    try:
        yield
    finally:
        getattr(integrations, f"revert_{library}")()


@dataclass(frozen=True)
class SAELensClass:
    """SAELens' training SAE of one architecture: its class and config names, and the
    coefficient its config and step take (None: a TopK family, whose sparsity is k and whose
    AuxK runs at fastsae's coefficient 1/32)."""

    sae: str
    config: str
    coefficient: Optional[str] = None  # "l1" -> l1_coefficient=..., coefficients {"l1": ...}
    extra_config: Callable[[object], dict] = lambda sae: {}


# Keyed by the names of fastsae.architectures' registry, as baselines.BENCH_MATH.
SAELENS_CLASSES = {
    "topk": SAELensClass("TopKTrainingSAE", "TopKTrainingSAEConfig"),
    "batchtopk": SAELensClass("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig"),
    "relu": SAELensClass("StandardTrainingSAE", "StandardTrainingSAEConfig", "l1"),
    "jumprelu": SAELensClass("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig", "l0",
                             lambda sae: {"jumprelu_bandwidth": sae.cfg.jumprelu_bandwidth}),
}


class SAELensTraining(nn.Module):
    """SAELens' own training SAE of the fastsae SAE's architecture (`SAELENS_CLASSES`:
    TopKTrainingSAE, BatchTopKTrainingSAE, StandardTrainingSAE, JumpReLUTrainingSAE), holding its
    weights; `loss` is SAELens' `training_forward_pass` with the bench's dead mask (AuxK for TopK
    and BatchTopK, at fastsae's coefficient 1/32) and sparsity coefficient."""

    def __init__(self, sae, coefficient: float = 0.0):
        super().__init__()
        import sae_lens

        common = dict(d_in=sae.d_in, d_sae=sae.d_sae, dtype=str(sae.dtype).removeprefix("torch."), device=str(sae.device))
        arch = sae.architecture
        if arch not in SAELENS_CLASSES:
            raise ValueError(f"peer saelens: no training SAE for architecture {arch!r} here")
        classes = SAELENS_CLASSES[arch]
        if classes.coefficient is None:
            settings = {"k": sae.cfg.k, "aux_loss_coefficient": 1.0 / 32}
            self.coefficients = {}
        else:
            settings = {f"{classes.coefficient}_coefficient": coefficient}
            self.coefficients = {classes.coefficient: coefficient}
        cfg = getattr(sae_lens, classes.config)(**settings, **classes.extra_config(sae), **common)
        self.sae = getattr(sae_lens, classes.sae)(cfg)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec") + BENCH_MATH[arch].extra_parameters:
                getattr(self.sae, name).copy_(getattr(sae, name))

    def encode(self, x: Tensor) -> Tensor:
        return self.sae.encode(x)

    def loss(self, x: Tensor, dead_mask: Optional[Tensor] = None, coefficient: float = 0.0) -> Tensor:
        from sae_lens.saes.sae import TrainStepInput

        step = TrainStepInput(sae_in=x, coefficients=self.coefficients, dead_neuron_mask=dead_mask,
                              n_training_steps=0, is_logging_step=False)
        return self.sae.training_forward_pass(step).loss


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
        self._decoder = decoder_impl if sae.device.type == "cuda" else _eager_decode()
        self.k = sae.cfg.k
        self.W = nn.Parameter(sae.W_enc.detach().t().contiguous())  # its encoder.weight, [d_sae, d_in]
        self.b = nn.Parameter(sae.b_enc.detach().clone())
        self.W_dec = nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = nn.Parameter(sae.b_dec.detach().clone())

    def encode(self, x: Tensor):
        values, indices, _ = self._encoder(x - self.b_dec, self.W, self.b, self.k, "topk")
        return values, indices

    def loss(self, x: Tensor, dead_mask: Optional[Tensor] = None, coefficient: float = 0.0) -> Tensor:
        values, indices, pre_acts = self._encoder(x - self.b_dec, self.W, self.b, self.k, "topk")
        out = self._decoder(indices, values.to(self.W_dec.dtype), self.W_dec.mT) + self.b_dec
        loss = (out - x).pow(2).sum(-1).mean()
        if dead_mask is not None and (n_dead := int(dead_mask.sum())):
            # sparsify's AuxK: its encoder's dense pre-activations masked to the dead latents, a
            # dense top-k_aux, and its decoder (fastsae's coefficient and scaling, for equal work).
            k_aux = min(x.shape[1] // 2, self.W.shape[0])
            top = torch.where(dead_mask[None], pre_acts, -torch.inf).topk(min(k_aux, n_dead), sorted=False)
            e_hat = self._decoder(top.indices, top.values.to(self.W_dec.dtype), self.W_dec.mT)
            residual = (x - out).detach()
            loss = loss + min(1.0, n_dead / k_aux) / 32 * (e_hat - residual).pow(2).sum(-1).mean()
        return loss


def _eager_decode():
    from sparsify.utils import eager_decode

    return eager_decode


class SAELensPatched(SAELensTraining):
    """The `saelens` peer with `fastsae.apply_to_saelens()` in force for its calls."""

    def encode(self, x: Tensor) -> Tensor:
        with _patched("saelens"):
            return super().encode(x)

    def loss(self, x: Tensor, dead_mask: Optional[Tensor] = None, coefficient: float = 0.0) -> Tensor:
        with _patched("saelens"):
            return super().loss(x, dead_mask, coefficient)


class SparsifyPatched(nn.Module):
    """sparsify's own SparseCoder of the SAE's weights with `fastsae.apply_to_sparsify()` in force
    for its calls."""

    def __init__(self, sae):
        super().__init__()
        self.sc = sae.to_sparsify()

    def encode(self, x: Tensor):
        with _patched("sparsify", dense_pre_acts=False):
            values, indices, _ = self.sc.encode(x)
        return values, indices

    def loss(self, x: Tensor, dead_mask: Optional[Tensor] = None, coefficient: float = 0.0) -> Tensor:
        with _patched("sparsify"):
            out = self.sc(x, dead_mask=dead_mask)
        return out.fvu + out.auxk_loss / 32


# The architectures each peer runs.
# sparsify trains TopK only, and the patches accelerate the TopK classes: the architectures
# sparsify's embedding-bag baseline computes.
_TOPK_ONLY = BASELINE_ARCHITECTURES["torch-sparse"]
PEER_ARCHITECTURES = {
    "saelens": tuple(SAELENS_CLASSES),
    "sparsify": _TOPK_ONLY,
    "saelens+fastsae": _TOPK_ONLY,  # the classes apply_to_saelens accelerates
    "sparsify+fastsae": _TOPK_ONLY,
}


def make_peer(name: str, sae, coefficient: float = 0.0) -> Optional[nn.Module]:
    if name == "saelens":
        return SAELensTraining(sae, coefficient)
    if name == "sparsify":
        return SparsifyTopK(sae)
    if name == "saelens+fastsae":
        return SAELensPatched(sae, coefficient)
    if name == "sparsify+fastsae":
        return SparsifyPatched(sae)
    raise ValueError(f"peer: expected one of {PEERS}, got {name!r}")
