"""One small module per SAE architecture, each implementing `Architecture`'s few methods over the
shared sparse core. `SAE` composes the one its config names. A new architecture is one new file
here plus its line in `_REGISTRY` (and its name in `fastsae.config.ARCHITECTURES`)."""

from __future__ import annotations

from fastsae.architectures.base import Architecture, Step, decoder_norm, input_b_dec
from fastsae.architectures.batchtopk import BatchTopK
from fastsae.architectures.gated import Gated
from fastsae.architectures.jumprelu import JumpReLU
from fastsae.architectures.relu import ReLU
from fastsae.architectures.topk import TopK

_REGISTRY: dict[str, Architecture] = {arch.name: arch for arch in (ReLU(), TopK(), BatchTopK(), JumpReLU(), Gated())}


def names() -> tuple[str, ...]:
    """Every registered architecture's name (the CLI's choices)."""
    return tuple(_REGISTRY)


def get(name: str) -> Architecture:
    """The architecture named `name` (a name of `fastsae.config.ARCHITECTURES`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"architecture: expected one of {tuple(_REGISTRY)}, got {name!r}") from None


__all__ = ["Architecture", "Step", "decoder_norm", "get", "input_b_dec", "names"]
