"""Integrations with the SAE libraries users already run: they patch those libraries' classes to
call fastsae's ops (never anything below the ops layer)."""

from fastsae.integrations.saelens import (
    SAELENS_SUPPORTED,
    apply_to_saelens,
    revert_saelens,
    saelens_accelerated_classes,
    saelens_unaccelerated_classes,
)
from fastsae.integrations.sparsify import (
    SPARSIFY_SUPPORTED,
    apply_to_sparsify,
    revert_sparsify,
    sparsify_accelerated_paths,
    sparsify_unaccelerated_paths,
)

__all__ = [
    "SAELENS_SUPPORTED",
    "apply_to_saelens",
    "revert_saelens",
    "saelens_accelerated_classes",
    "saelens_unaccelerated_classes",
    "SPARSIFY_SUPPORTED",
    "apply_to_sparsify",
    "revert_sparsify",
    "sparsify_accelerated_paths",
    "sparsify_unaccelerated_paths",
]
