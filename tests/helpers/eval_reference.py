"""The activation metrics of `fastsae eval` from dense float64 tensors, written straight from README's
definitions (independent of fastsae.evals' streaming float64 accumulation)."""

import torch

from helpers.format_refs import rand


def randomized(sae):
    """`sae` with every parameter drawn at random (thresholds positive), in eval mode: an SAE whose
    metrics are not special (no dead-by-construction latents, no zero decoder)."""
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(rand(*p.shape, scale=0.3 if p.ndim == 2 else 0.1))
            if name == "threshold":
                p.abs_()
    return sae.eval()


def reference_metrics(acts: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> dict:
    """acts [N, d_sae] the latents, pred [N, d] the reconstruction (or a transcoder's output),
    target [N, d] what it is compared with (the input, or a transcoder's targets)."""
    a, pred, target = acts.double(), pred.double(), target.double()
    resid = (target - pred).pow(2).sum(1)
    var = (target - target.mean(0)).pow(2).sum(1).mean()
    n_target, n_pred = target.norm(dim=1), pred.norm(dim=1)
    density = (a != 0).double().mean(0)
    return {
        "explained_variance": 1 - (resid.mean() / var).item(),
        "fvu": (resid.mean() / var).item(),
        "mse": resid.mean().item(),
        "cosine_similarity": ((target * pred).sum(1) / (n_target * n_pred)).mean().item(),
        "l2_ratio": (n_pred / n_target).mean().item(),
        "relative_reconstruction_bias": (n_pred.pow(2).sum() / (target * pred).sum()).item(),
        "l0": (a != 0).double().sum(1).mean().item(),
        "l1": a.abs().sum(1).mean().item(),
        "dead_fraction": (density == 0).double().mean().item(),
        "dense_fraction": (density > 0.1).double().mean().item(),
    }
