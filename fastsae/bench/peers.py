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
from typing import Optional

import torch
from torch import Tensor, nn

from fastsae import architectures
from fastsae.bench.baselines import BASELINE_ARCHITECTURES, BENCH_MATH

PEERS = ("saelens", "sparsify", "saelens+fastsae", "sparsify+fastsae")
SPARSIFY_ACTIVATION = "topk"  # sparsify's fused_encoder takes its activation by this name


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


# SAELens' training SAE of each benched architecture (`Architecture.reference_training`: its
# class, the coefficient its config and step take, the config fields it copies), keyed by the
# names of fastsae.architectures' registry, as baselines.BENCH_MATH.
SAELENS_CLASSES = {name: architectures.get(name).reference_training for name in BENCH_MATH}


class SAELensTraining(nn.Module):
    """SAELens' own training SAE of the fastsae SAE's architecture (`SAELENS_CLASSES`), holding
    its weights; `loss` is SAELens' `training_forward_pass` with the bench's dead mask (AuxK for
    the architectures trained with it, at fastsae's coefficient 1/32) and sparsity coefficient."""

    def __init__(self, sae, coefficient: float = 0.0):
        super().__init__()
        import sae_lens

        common = dict(d_in=sae.d_in, d_sae=sae.d_sae, dtype=str(sae.dtype).removeprefix("torch."), device=str(sae.device))
        arch = sae.architecture
        if arch not in SAELENS_CLASSES:
            raise ValueError(f"peer saelens: no training SAE for architecture {arch!r} here")
        ref = SAELENS_CLASSES[arch]
        if ref.saelens_coefficient is None:  # a TopK family: k sets the sparsity, AuxK at 1/32
            settings = {"k": sae.cfg.k, "aux_loss_coefficient": 1.0 / 32}
            self.coefficients = {}
        else:
            settings = {f"{ref.saelens_coefficient}_coefficient": coefficient}
            self.coefficients = {ref.saelens_coefficient: coefficient}
        settings.update({field: getattr(sae.cfg, field) for field in ref.saelens_config})
        cfg = getattr(sae_lens, ref.saelens_class + "Config")(**settings, **common)
        self.sae = getattr(sae_lens, ref.saelens_class)(cfg)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec") + ref.extra_parameters:
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
        values, indices, _ = self._encoder(x - self.b_dec, self.W, self.b, self.k, SPARSIFY_ACTIVATION)
        return values, indices

    def loss(self, x: Tensor, dead_mask: Optional[Tensor] = None, coefficient: float = 0.0) -> Tensor:
        values, indices, pre_acts = self._encoder(x - self.b_dec, self.W, self.b, self.k, SPARSIFY_ACTIVATION)
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


# The architectures each peer runs. sparsify trains one (TopK), and the patched peers are timed
# on it too: the architecture sparsify's embedding-bag baseline computes.
_SPARSIFY_TRAINS = BASELINE_ARCHITECTURES["torch-sparse"]
PEER_ARCHITECTURES = {
    "saelens": tuple(SAELENS_CLASSES),
    "sparsify": _SPARSIFY_TRAINS,
    "saelens+fastsae": _SPARSIFY_TRAINS,
    "sparsify+fastsae": _SPARSIFY_TRAINS,
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
