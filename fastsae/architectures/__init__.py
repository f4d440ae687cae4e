"""One small module per SAE architecture, each implementing `Architecture`'s few methods over the
shared sparse core. `SAE` composes the one its config names.

The rule: everything about an architecture lives in its file here, and a new architecture is that
one file plus its line in `_REGISTRY`. Its name, the config's rules (`uses_k`, `saelens_name`,
`aliases`) and the CLI's choices are read from the registry; no module outside this package
compares against an architecture's name (tests/model/test_architecture_registry.py checks both)."""

from __future__ import annotations

from typing import Optional

from fastsae import config
from fastsae.architectures.base import Architecture, ShardedStep, Step, decoder_norm, input_b_dec
from fastsae.architectures.batchtopk import BatchTopK
from fastsae.architectures.gated import Gated
from fastsae.architectures.jumprelu import JumpReLU
from fastsae.architectures.matryoshka import MatryoshkaBatchTopK
from fastsae.architectures.relu import ReLU
from fastsae.architectures.topk import TopK

_REGISTRY: dict[str, Architecture] = {arch.name: arch for arch in (ReLU(), TopK(), BatchTopK(), JumpReLU(), Gated(), MatryoshkaBatchTopK())}

for _arch in _REGISTRY.values():
    config.install_architecture(
        config.ArchitectureRules(
            _arch.name, _arch.uses_k, _arch.saelens_name or _arch.name, _arch.aliases, _arch.config_options,
            _arch.complete_config,
        )
    )


def names() -> tuple[str, ...]:
    """Every registered architecture's name (the CLI's choices)."""
    return tuple(_REGISTRY)


def get(name: str) -> Architecture:
    """The architecture named `name` (a name of `names()`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"architecture: expected one of {tuple(_REGISTRY)}, got {name!r}") from None


def parameter_shapes(cfg: config.SAEConfig) -> dict[str, tuple[int, ...]]:
    """The tensors an SAE of config `cfg` is saved as and built from, under SAELens' names and
    shapes: its architecture's `tensor_shapes`, with a transcoder's decoder writing d_out and its
    skip connection W_skip [d_out, d_in] last."""
    shapes = dict(get(cfg.architecture).tensor_shapes(cfg.d_in, cfg.d_sae))
    if cfg.d_out is not None:
        shapes["W_dec"], shapes["b_dec"] = (cfg.d_sae, cfg.d_out), (cfg.d_out,)
    if cfg.skip_connection:
        shapes["W_skip"] = (cfg.output_width, cfg.d_in)
    return shapes


def by_sparsify_activation(activation: str) -> Optional[Architecture]:
    """The architecture that sparsify's `activation` is, or None where fastsae has none."""
    found = [arch for arch in _REGISTRY.values() if arch.sparsify_activation and arch.sparsify_activation == activation]
    return found[0] if found else None


__all__ = [
    "Architecture", "ShardedStep", "Step", "by_sparsify_activation", "decoder_norm", "get", "input_b_dec", "names",
    "parameter_shapes",
]
