"""The start of a run and the end of one: the normalisation factor and b_dec from a sample of the
data, and the factor folded back into the SAE that is saved (so it runs on raw activations)."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from fastsae.sae import SAE
from fastsae.training.guard import BadDataError
from fastsae.training.provenance import provenance_metadata


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """The point minimising the sum of Euclidean distances to the rows of `points` [n, d]
    (Weiszfeld's iteration from the mean, in float64)."""
    if points.ndim != 2 or points.shape[0] < 1:
        raise ValueError(f"geometric_median: expected a non-empty [n, d] tensor, got shape {tuple(points.shape)}")
    x = points.double()
    median = x.mean(0)
    for _ in range(max_iter):
        dist = (x - median).norm(dim=1)
        weights = 1.0 / dist.clamp_min(1e-12)  # a point that coincides with the estimate gets a huge weight
        new = (weights[:, None] * x).sum(0) / weights.sum()
        shift = (new - median).norm().item()
        median = new
        if shift <= tol * max(1.0, median.norm().item()):
            break
    return median.to(points.dtype)


@torch.no_grad()
def fold_input_scale(sae: SAE, scale: float) -> SAE:
    """A copy of `sae`, trained on inputs multiplied by `scale`, that takes raw inputs and returns
    raw reconstructions: copy(x) == sae(scale * x) / scale, with the same latents firing (a
    transcoder's targets are scaled by the same factor; its skip connection is linear, unchanged)."""
    folded = copy.deepcopy(sae)
    if scale == 1.0:
        return folded
    folded.W_enc.mul_(scale)
    folded.b_dec.div_(scale)
    folded.W_dec.div_(scale)
    sae.arch.fold_input_scale(folded, scale)
    return folded


def export_for_raw_inputs(whole: SAE, input_scale: float, trained_dtype: str, data: dict, world_size: int) -> SAE:
    """The SAE for use on raw activations, in eval mode: `whole` (the float32 master weights) with
    the normalisation factor folded in, and the run's record in cfg.metadata (training dtype, the
    data as SAELens names it, the processes)."""
    sae = fold_input_scale(whole, input_scale)
    sae.cfg.metadata["trained_dtype"] = trained_dtype
    for key, value in provenance_metadata(data).items():
        if value is not None:
            sae.cfg.metadata.setdefault(key, value)  # a loaded SAE's own record wins
    if world_size > 1:
        sae.cfg.metadata["trained_world_size"] = world_size
    return sae.eval()


def paired_width(sae: SAE, data) -> int | None:
    """The width of the data's targets (d_out) when it pairs inputs with targets, else None; a
    ValueError when the data does not fit the SAE: a transcoder (d_out set) trains on pairs
    whose targets are d_out wide, an SAE on plain activations."""
    d_out = getattr(data, "d_out", None)
    if d_out is None and sae.cfg.d_out is not None:
        raise ValueError(f"data: a transcoder (d_out={sae.cfg.d_out}) trains on paired activations (inputs and "
                         f"targets: activation files holding both, or --hook-in/--hook-out), got {data!r}")
    if d_out is not None and sae.cfg.d_out is None:
        raise ValueError(f"data: {data!r} pairs inputs with targets of width {d_out}: train a transcoder on it "
                         "(an SAE with d_out set)")
    if d_out is not None and d_out != sae.d_out:
        raise ValueError(f"data: expected targets of width d_out={sae.d_out} (the SAE's), got width {d_out} from {data!r}")
    return d_out


def finite_rows(sample: Tensor) -> Tensor:
    """The rows of `sample` free of NaN/Inf, in float64; BadDataError if there are none."""
    finite = torch.isfinite(sample).all(dim=1)
    if not finite.any():
        raise BadDataError(f"initialisation: all {sample.shape[0]} sampled rows hold NaN or Inf")
    return sample[finite].double()


def normalising_scale(sample: Tensor, d_in: int) -> float:
    """The factor that makes E||x||^2 = d_in over the rows of `sample` (1 for an all-zero sample)."""
    mean_sq = sample.pow(2).sum(1).mean().item()
    return math.sqrt(d_in / mean_sq) if mean_sq > 0 else 1.0


@torch.no_grad()
def initial_b_dec(sample: Tensor, how: str) -> Tensor:
    """b_dec's start (`TrainerConfig.b_dec_init`) from a sample of the normalised data [n, d_in]
    (a transcoder's: of its targets, [n, d_out])."""
    if how == "geometric_median":
        return geometric_median(sample)
    if how == "mean":
        return sample.mean(0)
    return torch.zeros(sample.shape[1], dtype=torch.float64)
