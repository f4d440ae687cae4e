"""fastsae: sparse autoencoders with fused sparse kernels behind a drop-in torch module."""

from fastsae.auxk import DeadLatents
from fastsae.config import SAEConfig
from fastsae.formats import load
from fastsae.integrations import apply_to_saelens, apply_to_sparsify, revert_saelens, revert_sparsify
from fastsae.ops import available_backends, requested_backend, use_backend
from fastsae.sae import SAE, TrainOutput
from fastsae.sparse import SparseActivations
from fastsae.training import Trainer, TrainerConfig
from fastsae.version import __version__

__all__ = [
    "DeadLatents",
    "SAE",
    "SAEConfig",
    "SparseActivations",
    "TrainOutput",
    "Trainer",
    "TrainerConfig",
    "apply_to_saelens",
    "apply_to_sparsify",
    "available_backends",
    "load",
    "requested_backend",
    "revert_saelens",
    "revert_sparsify",
    "use_backend",
]
