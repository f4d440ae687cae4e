"""`TrainerConfig`: one dataclass for everything about a training run except the SAE's own
shape and architecture (those live in `SAEConfig`, saved as `cfg.json`). Saved as
`trainer_cfg.json` beside each checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from fastsae.losses import check_aux_normalization

TRAINER_CFG_FILENAME = "trainer_cfg.json"
DEAD_STRATEGIES = ("auto", "resample", "auxk", "none")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainerConfig:
    # Length and batches.
    total_tokens: int = 1_000_000  # rows of activations to train on
    batch_size: int = 4096
    # Adam and the learning-rate schedule: linear warm-up, constant, linear decay to 0.
    lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: Optional[int] = None  # None: 1% of the steps (at least 1)
    lr_decay_fraction: float = 0.2  # decay over the last 20% of the steps (0: no decay)
    # Clip the gradients' global norm before each Adam step (None: no clipping). 1.0 as SAELens'
    # SAETrainer. Unclipped, the gradient norm on MiniLM layer 3 (TopK) rises from 5 to ~22 by
    # step 10 and falls to ~7 by step 120; Adam's second moment (beta2 0.999: a memory of ~1000
    # steps, longer than a short run) keeps the peak and shrinks the later updates. Clipped to 1
    # (every step is clipped there), Adam sees unit-norm gradients. The held-out FVU it buys is in
    # README (Quality against SAELens). Checkpoints from before this setting resume unclipped.
    grad_clip_norm: Optional[float] = 1.0
    # Sparsity penalty (relu: L1 coefficient; jumprelu: L0 coefficient; unused by topk/batchtopk),
    # warmed up linearly from 0 over the first fraction of the steps.
    sparsity_coefficient: float = 5.0
    sparsity_warmup_fraction: float = 0.05
    # Initialisation from a sample of the data.
    b_dec_init: str = "geometric_median"
    init_sample_rows: int = 8192
    # Scale the data so that E ||x||^2 = d_in while training (SAELens' expected_average_only_in);
    # the saved SAE has the factor folded in, so it runs on raw activations.
    normalize_activations: bool = True
    # Dead latents: "auto" resamples relu (2023 paper), uses AuxK for topk/batchtopk (Gao et al.)
    # and does nothing for jumprelu. A latent is dead after `dead_after_tokens` rows without firing.
    dead_strategy: str = "auto"
    dead_after_tokens: Optional[int] = None  # None: min(10M, total_tokens // 16), at least a batch
    resample_every_steps: Optional[int] = None  # None: total steps // 8
    resample_sample_rows: int = 16384
    aux_k: Optional[int] = None  # None: d_in // 2
    aux_coefficient: float = 1.0 / 32
    aux_normalization: str = "dead_fraction"  # or "residual_variance" (dictionary_learning's AuxK): fastsae.losses
    jumprelu_min_threshold: float = 1e-6  # thresholds are clamped here after each step
    # Logging and checkpoints.
    log_every_steps: int = 50
    checkpoint_every_seconds: Optional[float] = 300.0
    checkpoint_every_steps: Optional[int] = None
    max_bad_batches: int = 5  # this many NaN/Inf batches in a row stop training
    progress: bool = True  # a tqdm progress bar on stderr
    # Data order and reproducibility.
    shuffle_buffer_rows: int = 1 << 16
    seed: int = 0
    device: str = "cpu"
    # The compute dtype of forward and backward; weights and Adam's state stay float32 (mixed
    # precision). None: bfloat16 on CUDA, float32 elsewhere (resolved when the trainer is built).
    dtype: Optional[str] = None
    data: dict = field(default_factory=dict)  # the source's describe(): lets --resume reopen it
    # Processes (torchrun): set by the trainer from the process group. Data parallel unless
    # shard_latents, which splits W_enc, b_enc and W_dec by latent (fastsae.distributed).
    world_size: int = 1
    shard_latents: bool = False

    def __post_init__(self):
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        positive_ints = ("world_size", "total_tokens", "batch_size", "init_sample_rows", "resample_sample_rows", "log_every_steps",
                         "shuffle_buffer_rows", "max_bad_batches")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("lr_warmup_steps", "dead_after_tokens", "resample_every_steps", "aux_k", "checkpoint_every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}: expected a non-negative integer or None, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a positive number, got {self.lr}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas: expected two numbers in [0, 1), got {self.adam_betas}")
        for name in ("lr_decay_fraction", "sparsity_warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a fraction in [0, 1], got {getattr(self, name)}")
        if self.grad_clip_norm is not None and not (self.grad_clip_norm > 0 and math.isfinite(self.grad_clip_norm)):
            raise ValueError(f"grad_clip_norm: expected a positive number or None, got {self.grad_clip_norm}")
        if not (self.sparsity_coefficient >= 0 and math.isfinite(self.sparsity_coefficient)):
            raise ValueError(f"sparsity_coefficient: expected a number >= 0, got {self.sparsity_coefficient}")
        check_aux_normalization(self.aux_normalization)
        if self.shard_latents and self.aux_normalization != "dead_fraction":
            raise ValueError("aux_normalization: 'residual_variance' trains data parallel only, not with shard_latents")
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init: expected one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if self.dead_strategy not in DEAD_STRATEGIES:
            raise ValueError(f"dead_strategy: expected one of {DEAD_STRATEGIES}, got {self.dead_strategy!r}")
        if self.dtype is not None:
            self.dtype = str(self.dtype).removeprefix("torch.")
            if self.dtype not in DTYPES:
                raise ValueError(f"dtype: expected one of {DTYPES} (or None: bfloat16 on CUDA, float32 elsewhere), got {self.dtype!r}")
        if self.checkpoint_every_seconds is not None and not self.checkpoint_every_seconds > 0:
            raise ValueError(f"checkpoint_every_seconds: expected a positive number or None, got {self.checkpoint_every_seconds}")

    # ------------------------------------------------------------ derived values

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.total_tokens / self.batch_size))

    @property
    def warmup_steps(self) -> int:
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return max(1, self.total_steps // 100)

    @property
    def dead_after(self) -> int:
        if self.dead_after_tokens is not None:
            return max(1, self.dead_after_tokens)
        return max(self.batch_size, min(10_000_000, self.total_tokens // 16))

    @property
    def resample_every(self) -> int:
        if self.resample_every_steps is not None:
            return self.resample_every_steps
        return max(1, self.total_steps // 8)

    def lr_at(self, step: int) -> float:
        """The learning rate for step `step` (0-based)."""
        total = self.total_steps
        warm = self.warmup_steps
        factor = 1.0
        if warm and step < warm:
            factor = (step + 1) / warm
        decay_steps = int(total * self.lr_decay_fraction)
        decay_start = total - decay_steps
        if decay_steps and step >= decay_start:
            factor = min(factor, (total - step) / decay_steps)
        return self.lr * factor

    def sparsity_coefficient_at(self, step: int) -> float:
        warm = int(self.total_steps * self.sparsity_warmup_fraction)
        if warm and step < warm:
            return self.sparsity_coefficient * (step + 1) / warm
        return self.sparsity_coefficient

    # ------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"trainer config: unknown keys {unknown}")
        d = dict(d)
        d.setdefault("grad_clip_norm", None)  # a run saved before clipping existed continues as it was
        return cls(**d)

    def save(self, folder: Union[str, Path]) -> Path:
        from fastsae.formats._common import atomic_write

        target = Path(folder) / TRAINER_CFG_FILENAME

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(self.to_dict(), f, indent=2)

        atomic_write(target, write)
        return target

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "TrainerConfig":
        path = Path(folder) / TRAINER_CFG_FILENAME
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing (a fastsae training checkpoint holds it)") from None
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
