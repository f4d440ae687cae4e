"""fastsae's kernels inside SAELens: `apply_to_saelens()` patches SAELens' SAE classes in place.

After it, `TopKSAE.encode` / `forward` and `TopKTrainingSAE.encode` / `forward` /
`training_forward_pass` (AuxK included) run on fastsae's fused ops (`topk_encode`,
`sparse_decode`, `sparse_decode_with_aux`) and compute what SAELens computes: the same outputs,
losses and parameter gradients, to float32 rounding. The ReLU, JumpReLU and transcoder classes
are patched by `saelens_threshold` (on `threshold_encode`). `revert_saelens()` puts SAELens'
methods back.

A call takes SAELens' own code, unchanged, whenever its result could differ or a hook could see a
value the fused path never builds:
- a hook registered on any of the SAE's hook points;
- `normalize_activations` other than "none", `reshape_activations` other than "none";
- autocast, a non-float32/float64 SAE;
- an instance of a class not patched, or of a subclass (BatchTopK, Matryoshka...), whose math is its own.

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
from fastsae.integrations import saelens_batchtopk, saelens_threshold
from fastsae.integrations._saelens_common import (
    _FAMILY_CHECKS,
    _NOT_ACCELERATED,
    _PATCHES,
    _SETTINGS,
    _classes,
    _fast_ok,
    _feature_acts,
    _hidden_pre,
    auxk_loss,
    auxk_setup,
    decode_with_auxk,
    with_error_term,
)
from fastsae.integrations._versions import import_supported

SAELENS_SUPPORTED = (">=6.54", "<6.55")
_SUPPORTED_RANGE = ((6, 54), (6, 55))

# (class name, method name) -> SAELens' original function, while patched.
_ORIGINALS: dict[tuple[str, str], Callable] = {}



def _check_version() -> Any:
    return import_supported("sae_lens", "SAELens", "sae-lens", "saelens", SAELENS_SUPPORTED, _SUPPORTED_RANGE, "apply_to_saelens")


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


_TOPK_CLASSES = ("TopKSAE", "TopKTrainingSAE")


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


def _encode_flat(sae, x: torch.Tensor, dead: Optional[DeadLatents] = None, k_aux: int = 0):
    x2 = x.to(sae.dtype).reshape(-1, sae.cfg.d_in)
    enc_weight, dec_norm, b_dec_in = _encoder_args(sae)
    latents = dead.latents if dead is not None else None
    values, indices, aux_pre = ops.topk_encode(
        x2, enc_weight, sae.b_enc, b_dec_in, dec_norm, _k(sae), latents, k_aux, check_indices=False
    )
    return x2, dec_norm, values, indices, aux_pre


# ---------------------------------------------------------------------------------------------
# The patched methods


def _patched_encode(original: Callable) -> Callable:
    @functools.wraps(original)
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_ok(self, x, _TOPK_CLASSES):
            return original(self, x)
        _, _, values, indices, _ = _encode_flat(self, x)
        return _feature_acts(self, values, indices, tuple(x.shape[:-1]))

    encode.__fastsae_original__ = original
    return encode


def _patched_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast_ok(self, x, _TOPK_CLASSES):
            return original(self, x)
        _, dec_norm, values, indices, _ = _encode_flat(self, x)
        sae_out = ops.sparse_decode(values, indices, self.W_dec, self.b_dec, dec_norm, check_indices=False)
        return with_error_term(self, x, sae_out.reshape(*x.shape[:-1], self.cfg.d_in))

    forward.__fastsae_original__ = original
    return forward


def _patched_training_forward_pass(original: Callable) -> Callable:
    @functools.wraps(original)
    def training_forward_pass(self, step_input):
        from sae_lens.saes.sae import TrainStepOutput

        sae_in = step_input.sae_in
        if not _fast_ok(self, sae_in, _TOPK_CLASSES):
            return original(self, step_input)
        dead, k_aux, scale = auxk_setup(step_input.dead_neuron_mask, self.cfg.d_in, sae_in.device)
        x2, dec_norm, values, indices, aux_pre = _encode_flat(self, sae_in, dead, k_aux)
        x_hat, e_hat = decode_with_auxk(self, values, indices, dec_norm, aux_pre, dead)
        lead = sae_in.shape[:-1]
        sae_out = x_hat.reshape(*lead, self.cfg.d_in)
        mse_loss = self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        aux_loss = auxk_loss(self, sae_in, sae_out, e_hat, scale)
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


# class name -> {method: maker}, and in _FAMILY_CHECKS the family's own conditions for the fused
# path: TopK's here, the other families' from their modules.
_PATCHES.update({
    "TopKSAE": {"encode": _patched_encode, "forward": _patched_forward},
    "TopKTrainingSAE": {
        "encode": _patched_encode,
        "forward": _patched_forward,
        "training_forward_pass": _patched_training_forward_pass,
    },
})
for _family in (saelens_threshold, saelens_batchtopk):
    _PATCHES.update(_family.PATCHES)
    _FAMILY_CHECKS.update(_family.FAMILY_CHECKS)
for _name in _PATCHES:
    _NOT_ACCELERATED.pop(_name, None)


_FAMILY_CHECKS.update({"TopKSAE": _topk_check, "TopKTrainingSAE": _topk_check})


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
                while hasattr(inherited, "__fastsae_original__"):  # a patched parent's: wrap SAELens' own
                    inherited = inherited.__fastsae_original__
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
