"""Training SAEs: data sources, the trainer loop, dead-latent handling, metrics and checkpoints.

Uses the `SAE` module and its losses only; knows nothing of backends.
"""

from fastsae.training.checkpoint import latest_checkpoint, read_metrics
from fastsae.training.config import TrainerConfig
from fastsae.training.data import ActivationFiles, ShuffledStream, open_source, save_activations
from fastsae.training.synthetic import SyntheticActivations, mean_max_cosine
from fastsae.training.guard import BadDataError
from fastsae.training.initialization import fold_input_scale, geometric_median
from fastsae.training.trainer import Trainer

__all__ = [
    "ActivationFiles",
    "BadDataError",
    "ShuffledStream",
    "SyntheticActivations",
    "Trainer",
    "TrainerConfig",
    "fold_input_scale",
    "geometric_median",
    "latest_checkpoint",
    "mean_max_cosine",
    "open_source",
    "read_metrics",
    "save_activations",
]
