"""fastsae's kernels inside SAELens: `apply_to_saelens()` patches SAELens' TopK SAE classes in place.

After it, `TopKSAE.encode` / `forward` and `TopKTrainingSAE.encode` / `forward` /
`training_forward_pass` (AuxK included) run on fastsae's fused ops (`topk_encode`,
`sparse_decode`, `sparse_decode_with_aux`) and compute what SAELens computes: the same outputs,
losses and parameter gradients, to float32 rounding. `revert_saelens()` puts SAELens' methods back.

A call takes SAELens' own code, unchanged, whenever its result could differ or a hook could see a
value the fused path never builds:
- a hook registered on any of the SAE's hook points;
- `normalize_activations` other than "none", `reshape_activations` other than "none";
- autocast, a non-float32/float64 SAE;
- an instance of a subclass (BatchTopK, Matryoshka, transcoders...), whose math is its own.

`TrainStepOutput.hidden_pre`: SAELens returns the dense [N, d_sae] pre-activations, which its
trainer never reads. The fused path does not build them; by default it computes them (detached,
one extra dense product) so the output is the same; `apply_to_saelens(dense_hidden_pre=False)`
skips that and leaves `hidden_pre` an empty [..., 0] tensor (any use against [.., d_sae] fails).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from fastsae import ops
from fastsae.auxk import DeadLatents
from fastsae.integrations._versions import import_supported

SAELENS_SUPPORTED = (">=6.54", "<6.55")
_SUPPORTED_RANGE = ((6, 54), (6, 55))

# (class name, method name) -> SAELens' original function, while patched.
_ORIGINALS: dict[tuple[str, str], Callable] = {}
_SETTINGS: dict[str, Any] = {"dense_hidden_pre": True}

_NOT_ACCELERATED = {
    "StandardSAE": "ReLU SAE: not patched yet (fastsae's threshold_encode computes it; the patch is not written)",
    "StandardTrainingSAE": "ReLU + L1 training: not patched yet",
    "JumpReLUSAE": "not patched yet (threshold_encode computes its forward; SAELens' pseudo-gradients not wired)",
    "JumpReLUTrainingSAE": "JumpReLU's straight-through pseudo-gradients (bandwidth) are not fastsae ops",
    "BatchTopKTrainingSAE": "BatchTopK's batch-wide selection and running threshold: not patched yet",
    "MatryoshkaBatchTopKTrainingSAE": "nested-prefix losses over BatchTopK: not fastsae ops",
    "AbsTopKSAE": "top-k by |pre| (no ReLU): not fastsae's TopK",
    "AbsTopKTrainingSAE": "top-k by |pre| (no ReLU): not fastsae's TopK",
    "GatedSAE": "gated encoder: not patched",
    "GatedTrainingSAE": "gated encoder: not patched",
    "MatchingPursuitSAE": "iterative matching pursuit: not an encoder fastsae computes",
    "MatchingPursuitTrainingSAE": "iterative matching pursuit: not an encoder fastsae computes",
    "TemporalSAE": "attention over positions: not an encoder fastsae computes",
}


def _check_version() -> Any:
    return import_supported("sae_lens", "SAELens", "sae-lens", "saelens", SAELENS_SUPPORTED, _SUPPORTED_RANGE, "apply_to_saelens")


def _classes() -> dict[str, type]:
    import sae_lens.saes as saes

    return {name: getattr(saes, name) for name in (*_PATCHES, *_NOT_ACCELERATED) if hasattr(saes, name)}


def saelens_accelerated_classes() -> list[type]:
    """The SAELens classes whose calls run on fastsae's ops while patched (exact type only)."""
    classes = _classes()
    return [classes[name] for name in _PATCHES if name in classes]


def saelens_unaccelerated_classes() -> dict[type, str]:
    """SAELens' SAE classes that keep SAELens' own code, with the reason."""
    classes = _classes()
    return {classes[name]: why for name, why in _NOT_ACCELERATED.items() if name in classes}


def is_patched() -> bool:
    return bool(_ORIGINALS)


# ---------------------------------------------------------------------------------------------
# When the fused path computes exactly what SAELens does


def _has_hooks(sae) -> bool:
    for hook in sae.hook_dict.values():
        if hook._forward_hooks or hook._backward_hooks or hook._forward_pre_hooks:
            return True
    return False


def _fast_ok(sae, x: torch.Tensor) -> bool:
    """Whether this call of a patched method may take the fused path: the checks every family
    shares, then the family's own (`_FAMILY_CHECKS`, keyed by the exact class name)."""
    cfg = sae.cfg
    family_check = _FAMILY_CHECKS.get(type(sae).__name__)
    if family_check is None or type(sae) not in saelens_accelerated_classes():
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


def _topk_check(sae) -> bool:
    k = _k(sae)
    return k is not None and 0 < k <= sae.cfg.d_sae


def _k(sae) -> Optional[int]:
    k = getattr(sae.activation_fn, "k", None)
    return k if isinstance(k, int) and k == sae.cfg.k else None


def _encoder_args(sae):
    dec_norm = sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None
    b_dec_in = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    return sae.W_enc.t(), dec_norm, b_dec_in


def _dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    return values.new_zeros(values.shape[0], d_sae).scatter(-1, indices, values)


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


def _encode_flat(sae, x: torch.Tensor, dead: Optional[DeadLatents] = None, k_aux: int = 0):
    x2 = x.to(sae.dtype).reshape(-1, sae.cfg.d_in)
    enc_weight, dec_norm, b_dec_in = _encoder_args(sae)
    latents = dead.latents if dead is not None else None
    values, indices, aux_pre = ops.topk_encode(
        x2, enc_weight, sae.b_enc, b_dec_in, dec_norm, _k(sae), latents, k_aux, check_indices=False
    )
    return x2, dec_norm, values, indices, aux_pre


def _hidden_pre(sae, x: torch.Tensor, dec_norm: Optional[torch.Tensor]) -> torch.Tensor:
    lead = x.shape[:-1]
    if not _SETTINGS["dense_hidden_pre"]:
        return x.new_empty(*lead, 0)
    with torch.no_grad():
        sae_in = x.to(sae.dtype) - sae.b_dec * sae.cfg.apply_b_dec_to_input
        pre = sae_in @ sae.W_enc + sae.b_enc
        if dec_norm is not None:
            pre = pre * dec_norm
    return pre


# ---------------------------------------------------------------------------------------------
# The patched methods


def _patched_encode(original: Callable) -> Callable:
    @functools.wraps(original)
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_ok(self, x):
            return original(self, x)
        _, _, values, indices, _ = _encode_flat(self, x)
        return _feature_acts(self, values, indices, tuple(x.shape[:-1]))

    encode.__fastsae_original__ = original
    return encode


def _patched_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_ok(self, x):
            return original(self, x)
        _, dec_norm, values, indices, _ = _encode_flat(self, x)
        sae_out = ops.sparse_decode(values, indices, self.W_dec, self.b_dec, dec_norm, check_indices=False)
        sae_out = sae_out.reshape(*x.shape[:-1], self.cfg.d_in)
        if self.use_error_term:
            # SAELens: sae_out + (x - clean reconstruction), the error without gradient; with no
            # hook registered the clean reconstruction is this one.
            with torch.no_grad():
                sae_error = self.hook_sae_error(x - sae_out)
            sae_out = sae_out + sae_error
        return self.hook_sae_output(sae_out)

    forward.__fastsae_original__ = original
    return forward


def _patched_training_forward_pass(original: Callable) -> Callable:
    @functools.wraps(original)
    def training_forward_pass(self, step_input):
        from sae_lens.saes.sae import TrainStepOutput

        sae_in = step_input.sae_in
        if not _fast_ok(self, sae_in):
            return original(self, step_input)
        mask = step_input.dead_neuron_mask
        num_dead = int(mask.sum()) if mask is not None else 0
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        dead, k_aux, scale = None, 0, 0.0
        if num_dead > 0:
            half = d_in // 2  # SAELens' k_aux heuristic (Gao et al., appendix B.1)
            scale = min(num_dead / half, 1.0)
            k_aux = min(half, num_dead)
            dead = DeadLatents.from_mask(mask.to(device=sae_in.device, dtype=torch.bool), capacity=num_dead)
        x2, dec_norm, values, indices, aux_pre = _encode_flat(self, sae_in, dead, k_aux)
        if dead is not None:
            x_hat, e_hat = ops.sparse_decode_with_aux(
                values, indices, self.W_dec, self.b_dec, dec_norm, aux_pre, dead.latents, check_indices=False
            )
        else:
            x_hat = ops.sparse_decode(values, indices, self.W_dec, self.b_dec, dec_norm, check_indices=False)
        lead = sae_in.shape[:-1]
        sae_out = x_hat.reshape(*lead, d_in)
        mse_loss = self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        if dead is None:
            aux_loss = sae_out.new_tensor(0.0)
        else:
            residual = (sae_in - sae_out).detach()
            aux_loss = (e_hat.reshape(*lead, d_in) - residual).pow(2).sum(dim=-1).mean()
            aux_loss = self.cfg.aux_loss_coefficient * scale * aux_loss
        feature_acts = _feature_acts(self, values, indices, tuple(lead))
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=_hidden_pre(self, sae_in, None if dec_norm is None else dec_norm.detach()),
            loss=mse_loss + aux_loss,
            losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss},
        )

    training_forward_pass.__fastsae_original__ = original
    return training_forward_pass


# class name -> {method: maker}; a family added in its own module registers here and in
# _FAMILY_CHECKS (its extra conditions for the fused path), and leaves _NOT_ACCELERATED.
_PATCHES = {
    "TopKSAE": {"encode": _patched_encode, "forward": _patched_forward},
    "TopKTrainingSAE": {
        "encode": _patched_encode,
        "forward": _patched_forward,
        "training_forward_pass": _patched_training_forward_pass,
    },
}


_FAMILY_CHECKS: dict[str, Callable[[Any], bool]] = {"TopKSAE": _topk_check, "TopKTrainingSAE": _topk_check}


def apply_to_saelens(*, dense_hidden_pre: bool = True) -> list[type]:
    """Patch SAELens' TopK SAE classes in place to run on fastsae's ops; returns the patched
    classes. Idempotent (a second call only updates `dense_hidden_pre`). Raises RuntimeError when
    SAELens is missing or its version is outside `SAELENS_SUPPORTED`."""
    if not isinstance(dense_hidden_pre, bool):
        raise ValueError(f"dense_hidden_pre: expected a bool, got {dense_hidden_pre!r}")
    _check_version()
    _SETTINGS["dense_hidden_pre"] = dense_hidden_pre
    classes = _classes()
    for class_name, methods in _PATCHES.items():
        cls = classes[class_name]
        for method, make in methods.items():
            key = (class_name, method)
            if key in _ORIGINALS:
                continue
            original = cls.__dict__.get(method)
            if original is None:
                # inherited: patch a wrapper on this class only, and remove it on revert
                inherited = getattr(cls, method)
                _ORIGINALS[key] = None
                setattr(cls, method, make(inherited))
            else:
                _ORIGINALS[key] = original
                setattr(cls, method, make(original))
    return saelens_accelerated_classes()


def revert_saelens() -> None:
    """Put SAELens' own methods back (a no-op when not patched)."""
    if not _ORIGINALS:
        return
    classes = _classes()
    for (class_name, method), original in list(_ORIGINALS.items()):
        cls = classes[class_name]
        if original is None:
            delattr(cls, method)
        else:
            setattr(cls, method, original)
        del _ORIGINALS[(class_name, method)]
    _SETTINGS["dense_hidden_pre"] = True
