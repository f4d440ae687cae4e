"""What SAELens' patched classes share: the registry of patched classes, the gate that decides
whether a call may take the fused path, and the conversions to SAELens' layouts."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from fastsae import ops
from fastsae.auxk import DeadLatents
from fastsae.sparse_path import SparsePath

# class name -> {method: maker(original) -> patched}; filled by the family modules.
_PATCHES: dict[str, dict[str, Callable]] = {}
# class name -> the family's own conditions for the fused path (beyond the shared ones).
_FAMILY_CHECKS: dict[str, Callable[[Any], bool]] = {}
_SETTINGS: dict[str, Any] = {"dense_hidden_pre": True}
_SPARSE_PATH_ATTR = "_fastsae_sparse_path"  # per SAELens instance: fastsae's SparsePath

_NOT_ACCELERATED = {
    "AbsTopKSAE": "top-k by |pre| (no ReLU): not fastsae's TopK",
    "AbsTopKTrainingSAE": "top-k by |pre| (no ReLU): not fastsae's TopK",
    "GatedSAE": "gated encoder: not patched",
    "GatedTrainingSAE": "gated encoder: not patched",
    "MatchingPursuitSAE": "iterative matching pursuit: not an encoder fastsae computes",
    "MatchingPursuitTrainingSAE": "iterative matching pursuit: not an encoder fastsae computes",
    "TemporalSAE": "attention over positions: not an encoder fastsae computes",
}


def _classes() -> dict[str, type]:
    import sae_lens.saes as saes

    return {name: getattr(saes, name) for name in (*_PATCHES, *_NOT_ACCELERATED) if hasattr(saes, name)}


def _accelerated(sae) -> bool:
    """Exactly a patched SAELens class (a subclass has math of its own)."""
    import sae_lens.saes as saes

    name = type(sae).__name__  # looked up by name, not through _classes(): this runs every call
    return name in _FAMILY_CHECKS and getattr(saes, name, None) is type(sae)


def _has_hooks(sae) -> bool:
    for hook in sae.hook_dict.values():
        if hook._forward_hooks or hook._backward_hooks or hook._forward_pre_hooks:
            return True
    return False


def _fast_ok(sae, x: torch.Tensor, family) -> bool:
    """Whether this call of a patched method of `family` (its class names) may take the fused
    path: the instance is exactly one of the family's classes (a parent's patched method reached
    through super() from another family's class runs SAELens' code), the checks every family
    shares, then the family's own (`_FAMILY_CHECKS`, keyed by the exact class name)."""
    cfg = sae.cfg
    name = type(sae).__name__
    family_check = _FAMILY_CHECKS.get(name)
    if name not in family or family_check is None or not _accelerated(sae):
        return False
    if not isinstance(x, torch.Tensor) or x.is_sparse or x.ndim < 1 or x.shape[-1] != cfg.d_in:
        return False  # SAELens' own code raises its own error for these
    if sae.dtype not in (torch.float32, torch.float64) or sae.W_enc.dtype != sae.dtype:
        return False
    if getattr(cfg, "normalize_activations", "none") != "none" or getattr(cfg, "reshape_activations", "none") != "none":
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if x.device != sae.W_enc.device:
        return False
    return family_check(sae) and not _has_hooks(sae)


def _dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    # in place into the fresh zeros: out-of-place scatter would copy the [N, d_sae] matrix again
    return values.new_zeros(values.shape[0], d_sae).scatter_(-1, indices, values)


def _feature_acts(sae, values: torch.Tensor, indices: torch.Tensor, lead: tuple) -> torch.Tensor:
    """The activations in SAELens' layout: dense [..., d_sae], or with `use_sparse_activations` the
    COO tensor SAELens' TopK builds (the same entries; coalesce or to_dense to compare)."""
    d_sae = sae.cfg.d_sae
    if not getattr(sae.cfg, "use_sparse_activations", False):
        return _dense(values, indices, d_sae).reshape(*lead, d_sae)
    n, k = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(k)
    coords = []
    for size in reversed(lead):
        coords.append(rows % size)
        rows = rows // size
    coords.reverse()
    sparse_indices = torch.stack([*coords, indices.flatten()]) if lead else indices.flatten()[None]
    return torch.sparse_coo_tensor(sparse_indices, values.flatten(), (*lead, d_sae), check_invariants=False)


def _hidden_pre(sae, x: torch.Tensor, dec_norm: Optional[torch.Tensor]) -> torch.Tensor:
    lead = x.shape[:-1]
    if not _SETTINGS["dense_hidden_pre"]:
        return x.new_empty(*lead, 0)
    with torch.no_grad():
        sae_in = x.to(sae.dtype) - sae.b_dec * sae.cfg.apply_b_dec_to_input
        # SAELens' sae_in @ W_enc + b_enc in one pass over the [..., d_sae] result
        pre = torch.addmm(sae.b_enc, sae_in.reshape(-1, sae.cfg.d_in), sae.W_enc).reshape(*lead, -1)
        if dec_norm is not None:
            pre.mul_(dec_norm)
    return pre


def with_error_term(sae, x: torch.Tensor, sae_out: torch.Tensor) -> torch.Tensor:
    """SAELens' forward tail: sae_out + (x - clean reconstruction), the error without gradient
    (with no hook registered, the clean reconstruction is this one), through hook_sae_output."""
    if sae.use_error_term:
        with torch.no_grad():
            sae_error = sae.hook_sae_error(x - sae_out)
        sae_out = sae_out + sae_error
    return sae.hook_sae_output(sae_out)


def auxk_setup(mask: Optional[torch.Tensor], d_in: int, device: torch.device):
    """(dead latents or None, k_aux, scale) as SAELens' TopK AuxK sets them: k_aux = d_in / 2
    (Gao et al., appendix B.1), capped at the dead count, the loss scaled down below it."""
    num_dead = int(mask.sum()) if mask is not None else 0
    if num_dead == 0:
        return None, 0, 0.0
    half = d_in // 2
    dead = DeadLatents.from_mask(mask.to(device=device, dtype=torch.bool), capacity=num_dead)
    return dead, min(half, num_dead), min(num_dead / half, 1.0)


def decode_with_auxk(sae, values, indices, dec_norm, aux_pre, dead: Optional[DeadLatents]):
    """(x_hat [N, d_in], the dead latents' reconstruction or None) from the fused decode."""
    if dead is None:
        return ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, dec_norm, check_indices=False), None
    return ops.sparse_decode_with_aux(
        values, indices, sae.W_dec, sae.b_dec, dec_norm, aux_pre, dead.latents, check_indices=False
    )


def auxk_loss(sae, sae_in: torch.Tensor, sae_out: torch.Tensor, e_hat: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """SAELens' auxiliary loss: the dead latents' reconstruction against the detached residual."""
    if e_hat is None:
        return sae_out.new_tensor(0.0)
    residual = (sae_in - sae_out).detach()
    loss = (e_hat.reshape(residual.shape) - residual).pow(2).sum(dim=-1).mean()
    return sae.cfg.aux_loss_coefficient * scale * loss


def sparse_path_of(sae) -> SparsePath:
    """The SAELens instance's sparse-path state (fastsae's `SparsePath`: the back-off after too-dense
    rows, BatchTopK's candidate bound), kept in the instance's __dict__ beside its modules."""
    path = sae.__dict__.get(_SPARSE_PATH_ATTR)
    if path is None:
        path = sae.__dict__[_SPARSE_PATH_ATTR] = SparsePath()
    return path
