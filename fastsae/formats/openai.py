"""OpenAI's sparse_autoencoder .pt files (the state dict of its `Autoencoder`).

Keys: pre_bias [d_in], encoder.weight [d_sae, d_in], latent_bias [d_sae], decoder.weight
[d_in, d_sae] (a tied decoder stores decoder.linear.weight, the encoder's own [d_sae, d_in]),
the training statistics stats_last_nonzero, latents_activation_frequency, latents_mean_square
(not needed to compute, not kept), `activation` ("ReLU" when absent, or "TopK") and
`activation_state_dict` ({"k": ..., "postact_fn": "ReLU"} for TopK). It computes
    latents = activation((x - pre_bias) @ encoder.weight.T + latent_bias)
    recons  = latents @ decoder.weight.T + pre_bias
TopK takes torch.topk then ReLU, as fastsae does.

Normalisation: the library turns on input layer norm exactly when the activation is TopK
(`normalize = activation_class_name == "TopK"`): it encodes LN(x) = (x - mean) / (std + 1e-5)
(std unbiased) and returns recons * std + mean. fastsae's SAE does not compute that, so these
files are refused unless the caller opts in with `external_layer_norm=True`: the SAE then
computes on layer-normed inputs, and `layer_norm` / `undo_layer_norm` below reproduce OpenAI's
normalisation around it (`undo_layer_norm(sae(layer_norm(x)[0]), ...)` is OpenAI's forward).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from fastsae.config import SAEConfig
from fastsae.formats._common import build_sae, read_torch

LAYER_NORM_EPS = 1e-5
_STATS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")


def looks_like(state: object) -> bool:
    return isinstance(state, dict) and "pre_bias" in state and "latent_bias" in state


def layer_norm(x: Tensor, eps: float = LAYER_NORM_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """OpenAI's input normalisation: (x - mu) / (std + eps), std unbiased; returns (x_ln, mu, std)."""
    mu = x.mean(dim=-1, keepdim=True)
    x = x - mu
    std = x.std(dim=-1, keepdim=True)
    return x / (std + eps), mu, std


def undo_layer_norm(y: Tensor, mu: Tensor, std: Tensor) -> Tensor:
    """OpenAI's output de-normalisation: y * std + mu."""
    return y * std + mu


def _tensor(state: dict, name: str, source: Path, shape: tuple) -> Tensor:
    if name not in state:
        raise ValueError(f"{source}: missing tensor {name!r} (has {sorted(state)})")
    t = state[name]
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{source}: tensor {name!r} has shape {got}, expected {shape}")
    if not t.is_floating_point():
        raise ValueError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype")
    return t


def from_state_dict(state: object, source: Path, *, external_layer_norm: bool = False, device=None, dtype=None):
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a state dict, got {type(state).__name__}")
    state = dict(state)
    activation = state.pop("activation", "ReLU")
    activation_state = state.pop("activation_state_dict", {})
    for name in _STATS:
        state.pop(name, None)
    if "encoder.weight" not in state or not isinstance(state["encoder.weight"], Tensor) or state["encoder.weight"].ndim != 2:
        raise ValueError(f"{source}: missing tensor 'encoder.weight' [n_latents, n_inputs] (has {sorted(state)})")
    d_sae, d_in = (int(n) for n in state["encoder.weight"].shape)
    encoder = _tensor(state, "encoder.weight", source, (d_sae, d_in))
    if "decoder.linear.weight" in state:  # TiedTranspose: the decoder is the encoder's transpose
        decoder_t = _tensor(state, "decoder.linear.weight", source, (d_sae, d_in))
        decoder_key = "decoder.linear.weight"
    else:
        decoder_t = _tensor(state, "decoder.weight", source, (d_in, d_sae)).t()
        decoder_key = "decoder.weight"
    tensors = {
        "W_enc": encoder.t(),
        "b_enc": _tensor(state, "latent_bias", source, (d_sae,)),
        "W_dec": decoder_t,
        "b_dec": _tensor(state, "pre_bias", source, (d_in,)),
    }
    extra = sorted(set(state) - {"encoder.weight", "latent_bias", "pre_bias", decoder_key})
    if extra:
        raise ValueError(f"{source}: unexpected keys {extra} for an OpenAI sparse_autoencoder state dict")

    metadata: dict = {"source_format": "openai"}
    if activation == "ReLU":
        kw: dict = dict(architecture="relu")
    elif activation == "TopK":
        if not isinstance(activation_state, dict) or "k" not in activation_state:
            raise ValueError(f"{source}: activation 'TopK' needs activation_state_dict {{'k': ...}}, got {activation_state!r}")
        postact = activation_state.get("postact_fn", "ReLU")
        if postact != "ReLU":
            raise ValueError(f"{source}: TopK postact_fn {postact!r}: fastsae computes top-k followed by ReLU only")
        if not external_layer_norm:
            raise ValueError(
                f"{source}: OpenAI's TopK autoencoders layer-normalise their input ((x - mean) / (std + 1e-5)) and "
                "undo it on the output, which fastsae's SAE does not compute. To use it anyway, load it with "
                "fastsae.formats.openai.load(path, external_layer_norm=True) and wrap calls in "
                "fastsae.formats.openai.layer_norm / undo_layer_norm"
            )
        metadata["input_layer_norm"] = "openai: (x - mean) / (std + 1e-5) in, y * std + mean out (caller applies it)"
        kw = dict(architecture="topk", k=activation_state["k"])
    else:
        raise ValueError(f"{source}: activation {activation!r}: fastsae reads OpenAI's 'ReLU' and 'TopK'")
    try:
        cfg = SAEConfig(d_in=d_in, d_sae=d_sae, dtype=str(encoder.dtype).removeprefix("torch."), metadata=metadata, **kw)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    return build_sae(cfg, tensors, source, device=device, dtype=dtype, why=f" (d_in={d_in}, d_sae={d_sae})")


def load(path: Union[str, Path], device=None, dtype=None, *, external_layer_norm: bool = False):
    path = Path(path)
    return from_state_dict(read_torch(path), path, external_layer_norm=external_layer_norm, device=device, dtype=dtype)
