"""fastsae's kernels inside sparsify: `apply_to_sparsify()` patches sparsify's `SparseCoder` in place.

After it, `SparseCoder.forward` (the training step's forward: encode, decode, FVU, AuxK,
multi-TopK, `transcode`, `skip_connection`) and `SparseCoder.decode` run on fastsae's fused ops
(`topk_encode`, `sparse_decode`, `sparse_decode_with_aux`) and compute what sparsify computes: the
same `ForwardOutput` and the same parameter gradients, to float32 rounding. `revert_sparsify()`
puts sparsify's methods back.

sparsify's math, mirrored here (sparsify 1.3, sparse_coder.py and fused_encoder.py):
- encode: top-k of relu((x - b_dec) @ encoder.weight.T + encoder.bias) (no b_dec with
  `transcode`); fastsae takes the top k and then the ReLU, the same values (the indices of
  zero-valued picks, in rows with fewer than k positive pre-activations, may differ; they carry
  no value and no gradient either way).
- decode: acts @ W_dec[indices] + b_dec; `skip_connection` adds x @ W_skip.T.
- fvu = sum((y - sae_out)^2) / sum((y - y.mean(0))^2), y the target (x unless `transcode` gives one).
- AuxK with `dead_mask`: k_aux = d_in // 2, scale = min(1, n_dead / k_aux), each row's top
  min(k_aux, n_dead) of the ReLU'd pre-activations among the dead latents decoded *with* b_dec,
  auxk_loss = scale * sum((e_hat - e.detach())^2) / total variance. sparsify's encoder backward
  ignores the gradient of its dense pre-activations, so AuxK (and multi-TopK) train only W_dec and
  b_dec, never the encoder: the patch feeds their activations to the decoder detached.
- multi_topk: the top 4k are decoded (without W_skip); sae_out, latent_acts and latent_indices
  in the output are then the 4k ones, as sparsify returns them. The patch encodes the top 4k once
  and takes the top k among them (the same k).

A call takes sparsify's own code, unchanged, where the fused path would not compute the same:
- `activation="groupmax"` (not an encoder fastsae computes);
- a non-float32/float64 SparseCoder, inputs of another dtype, autocast enabled for the input's
  device, or a CUDA input where sparsify's forward turns on its own bf16 autocast;
- an input that is not 2-D [N, d_in] (sparsify's decoder takes 2-D only), a target of another
  shape or dtype, a `dead_mask` that is not a bool [d_sae] on the input's device;
- k outside [1, num_latents] (4k with multi_topk), `decoder=False`, a subclass of SparseCoder,
  d_in < 2 with dead latents (sparsify divides by k_aux = 0): sparsify raises its own errors.
`SparseCoder.encode` returns the dense [N, num_latents] pre-activations, which are the dense
product itself: it keeps sparsify's code unless `apply_to_sparsify(dense_pre_acts=False)`, where it
runs fused and returns `pre_acts` as an empty [N, 0] tensor (sparsify's trainer never calls encode).
Where sparsify's code runs while patched, its calls to `self.decode` run on fastsae's decode.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional

import torch

from fastsae import architectures, ops
from fastsae.auxk import DeadLatents
from fastsae.integrations._versions import import_supported

# The sparsify activation the fused path computes: TopK's, through fastsae's top-k ops (the
# architecture owns the name sparsify gives it).
_FUSED_ACTIVATION = architectures.get("topk").sparsify_activation

SPARSIFY_SUPPORTED = (">=1.3", "<1.4")
_SUPPORTED_RANGE = ((1, 3), (1, 4))

# method name -> sparsify's original function, while patched.
_ORIGINALS: dict[str, Callable] = {}
_SETTINGS: dict[str, Any] = {"dense_pre_acts": True}

_NOT_ACCELERATED = {
    "SparseCoder.encode (dense_pre_acts=True, the default)": (
        "its output holds the dense [N, num_latents] pre-activations, which are the dense product "
        "itself; apply_to_sparsify(dense_pre_acts=False) runs it fused with an empty pre_acts"
    ),
    "activation='groupmax'": "a max per group of latents: not an encoder fastsae computes",
    "bfloat16/float16 SparseCoder, autocast, CUDA bf16 autocast of sparsify's forward": (
        "sparsify then computes in reduced precision, which the fused float32 path would not match"
    ),
    "inputs other than 2-D [N, d_in]": "sparsify's decoder (embedding_bag) takes 2-D inputs only",
    "subclasses of SparseCoder": "their math is their own",
    "SparseCoder(decoder=False)": "an encoder only: sparsify's forward and decode assert",
}


def _check_version() -> Any:
    return import_supported("sparsify", "sparsify", "eai-sparsify", "sparsify", SPARSIFY_SUPPORTED, _SUPPORTED_RANGE, "apply_to_sparsify")


def _sparse_coder_class() -> type:
    from sparsify.sparse_coder import SparseCoder

    return SparseCoder


def sparsify_accelerated_paths() -> list[str]:
    """The sparsify calls that run on fastsae's ops while patched (with the current settings)."""
    paths = [
        "SparseCoder.forward: encode (topk), decode, fvu, AuxK (dead_mask), multi_topk, transcode, skip_connection",
        "SparseCoder.decode",
    ]
    if not _SETTINGS["dense_pre_acts"]:
        paths.append("SparseCoder.encode (pre_acts empty: dense_pre_acts=False)")
    return paths


def sparsify_unaccelerated_paths() -> dict[str, str]:
    """What keeps sparsify's own code while patched, with the reason."""
    out = dict(_NOT_ACCELERATED)
    if not _SETTINGS["dense_pre_acts"]:
        del out["SparseCoder.encode (dense_pre_acts=True, the default)"]
    return out


def is_patched() -> bool:
    return bool(_ORIGINALS)


# ---------------------------------------------------------------------------------------------
# When the fused path computes exactly what sparsify does


def _module_ok(sc) -> bool:
    cls = _sparse_coder_class()
    if type(sc) is not cls or sc.cfg.activation != _FUSED_ACTIVATION:
        return False
    if sc.encoder.weight.dtype not in (torch.float32, torch.float64):
        return False
    return all(p.dtype == sc.encoder.weight.dtype for p in sc.parameters())


def _input_ok(sc, x) -> bool:
    if not isinstance(x, torch.Tensor) or x.is_sparse or x.ndim != 2 or x.shape[1] != sc.d_in or x.shape[0] == 0:
        return False
    if x.dtype != sc.dtype or x.device != sc.device:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    # sparsify's forward is wrapped in torch.autocast("cuda", bfloat16, enabled=is_bf16_supported())
    return not (x.device.type == "cuda" and torch.cuda.is_bf16_supported())


def _k_ok(sc, k) -> bool:
    return isinstance(k, int) and not isinstance(k, bool) and 0 < k <= sc.num_latents


def _forward_ok(sc, x, y, dead_mask) -> bool:
    if not _module_ok(sc) or sc.W_dec is None or not _input_ok(sc, x):
        return False
    k = sc.cfg.k
    if not _k_ok(sc, k) or (sc.cfg.multi_topk and not _k_ok(sc, 4 * k)):
        return False
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
            return False
    if dead_mask is not None:
        if not isinstance(dead_mask, torch.Tensor) or dead_mask.dtype != torch.bool:
            return False
        if tuple(dead_mask.shape) != (sc.num_latents,) or dead_mask.device != x.device:
            return False
        if sc.d_in < 2 and bool(dead_mask.any()):
            return False  # sparsify: k_aux = 0, a ZeroDivisionError in its scale
    return True


def _encode(sc, x: torch.Tensor, k: int, dead: Optional[DeadLatents] = None, k_aux: int = 0):
    b_dec_in = None if sc.cfg.transcode else sc.b_dec
    latents = dead.latents if dead is not None else None
    return ops.topk_encode(
        x, sc.encoder.weight, sc.encoder.bias, b_dec_in, None, k, latents, k_aux, check_indices=False
    )


# ---------------------------------------------------------------------------------------------
# The patched methods


def _patched_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, x, y=None, *, dead_mask=None):
        from sparsify.sparse_coder import ForwardOutput

        if not _forward_ok(self, x, y, dead_mask):
            return original(self, x, y, dead_mask=dead_mask)
        if y is None:
            y = x
        k = self.cfg.k
        num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        dead, k_aux, scale = None, 0, 0.0
        if num_dead > 0:
            half = y.shape[-1] // 2  # sparsify's k_aux heuristic (Gao et al., appendix B.1)
            scale = min(num_dead / half, 1.0)
            k_aux = min(half, num_dead)
            dead = DeadLatents.from_mask(dead_mask, capacity=num_dead)

        # multi_topk: encode the top 4k once; the top k are the best k of them.
        width = 4 * k if self.cfg.multi_topk else k
        wide_values, wide_indices, aux_pre = _encode(self, x, width, dead, k_aux)
        if self.cfg.multi_topk:
            pick = torch.topk(wide_values.detach(), k, dim=-1, sorted=False).indices
            values, indices = wide_values.gather(-1, pick), wide_indices.gather(-1, pick)
        else:
            values, indices = wide_values, wide_indices

        if dead is not None:
            # sparsify's AuxK activations: the ReLU'd pre-activations (-inf, not kept, is 0), with
            # no gradient to the encoder (its FusedEncoder drops the pre-activations' gradient).
            aux_acts = aux_pre.detach().clamp_min(0)
            sae_out, e_hat = ops.sparse_decode_with_aux(
                values, indices, self.W_dec, self.b_dec, None, aux_acts, dead.latents, check_indices=False
            )
            e_hat = e_hat + self.b_dec  # sparsify decodes the AuxK latents with b_dec
        else:
            sae_out = ops.sparse_decode(values, indices, self.W_dec, self.b_dec, None, check_indices=False)
        if self.W_skip is not None:
            sae_out = sae_out + x @ self.W_skip.mT

        e = y - sae_out
        total_variance = (y - y.mean(0)).pow(2).sum()
        if dead is not None:
            auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
        else:
            auxk_loss = sae_out.new_tensor(0.0)
        fvu = e.pow(2).sum() / total_variance

        top_acts, top_indices = values, indices
        if self.cfg.multi_topk:
            top_acts, top_indices = wide_values.detach(), wide_indices
            sae_out = ops.sparse_decode(top_acts, top_indices, self.W_dec, self.b_dec, None, check_indices=False)
            multi_topk_fvu = (sae_out - y).pow(2).sum() / total_variance
        else:
            multi_topk_fvu = sae_out.new_tensor(0.0)
        return ForwardOutput(sae_out, top_acts, top_indices, fvu, auxk_loss, multi_topk_fvu)

    forward.__fastsae_original__ = original
    return forward


def _patched_decode(original: Callable) -> Callable:
    @functools.wraps(original)
    def decode(self, top_acts, top_indices):
        if (
            not _module_ok(self)
            or self.W_dec is None
            or not isinstance(top_acts, torch.Tensor)
            or not isinstance(top_indices, torch.Tensor)
            or top_acts.ndim != 2
            or top_indices.shape != top_acts.shape
            or top_indices.dtype != torch.int64
            or not top_acts.is_floating_point()
            or top_acts.device != self.device
            or top_indices.device != self.device
            or torch.is_autocast_enabled(self.device.type)
        ):
            return original(self, top_acts, top_indices)
        # Indices from a caller: range-checked (a ValueError, where sparsify's embedding_bag raises).
        return ops.sparse_decode(top_acts.to(self.dtype), top_indices, self.W_dec, self.b_dec, None)

    decode.__fastsae_original__ = original
    return decode


def _patched_encode(original: Callable) -> Callable:
    @functools.wraps(original)
    def encode(self, x):
        from sparsify.fused_encoder import EncoderOutput

        if _SETTINGS["dense_pre_acts"] or not _module_ok(self) or not _input_ok(self, x) or not _k_ok(self, self.cfg.k):
            return original(self, x)
        values, indices, _ = _encode(self, x, self.cfg.k)
        return EncoderOutput(values, indices, x.new_empty(x.shape[0], 0))

    encode.__fastsae_original__ = original
    return encode


_PATCHES = {"forward": _patched_forward, "decode": _patched_decode, "encode": _patched_encode}


def apply_to_sparsify(*, dense_pre_acts: bool = True) -> list[str]:
    """Patch sparsify's `SparseCoder` in place to run on fastsae's ops; returns the paths that now
    run on fastsae (`sparsify_accelerated_paths()`). Idempotent (a second call only updates
    `dense_pre_acts`). Raises RuntimeError when sparsify is missing or its version is outside
    `SPARSIFY_SUPPORTED`."""
    if not isinstance(dense_pre_acts, bool):
        raise ValueError(f"dense_pre_acts: expected a bool, got {dense_pre_acts!r}")
    _check_version()
    _SETTINGS["dense_pre_acts"] = dense_pre_acts
    cls = _sparse_coder_class()
    for method, make in _PATCHES.items():
        if method in _ORIGINALS:
            continue
        original = cls.__dict__[method]
        _ORIGINALS[method] = original
        setattr(cls, method, make(original))
    return sparsify_accelerated_paths()


def revert_sparsify() -> None:
    """Put sparsify's own methods back (a no-op when not patched)."""
    if _ORIGINALS:
        cls = _sparse_coder_class()
        for method, original in list(_ORIGINALS.items()):
            setattr(cls, method, original)
            del _ORIGINALS[method]
    _SETTINGS["dense_pre_acts"] = True
