"""The dead latents that AuxK trains (Gao et al. 2024), compacted into a list.

AuxK's cost follows the number of dead latents: the encoder hands over their pre-activations
dense over this list ([N, C], each row's best k_aux kept), and their reconstruction of the
residual is one dense product with the listed rows of W_dec. A list of capacity C holds the
dead latents in ascending order, then -1 for the entries left empty; its shape is fixed by C
alone, so building and using it needs no host sync (a CUDA graph or a compiled step can hold
it), and the count of dead latents stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from fastsae.sparse import tracing


@dataclass(frozen=True)
class DeadLatents:
    """`latents` int64 [C]: the dead latents ascending, then -1. Build with `from_mask`.
    `rectified`: AuxK decodes the dead latents' ReLU'd pre-activations (OpenAI's and
    dictionary_learning's AuxK) instead of the raw ones (sparsify's and SAELens')."""

    latents: Tensor
    rectified: bool = False

    def aux_activations(self, aux_pre: Tensor) -> Tensor:
        """AuxK's kept pre-activations [N, C] (-inf: not kept) as this rule decodes them: rectified,
        an entry <= 0 is dropped (-inf), which decodes and differentiates as its ReLU (0)."""
        return aux_pre.masked_fill(aux_pre <= 0, float("-inf")) if self.rectified else aux_pre

    @property
    def capacity(self) -> int:
        return self.latents.shape[0]

    def count(self) -> Tensor:
        """How many latents are listed (a 0-dim int64 tensor on the list's device)."""
        return (self.latents >= 0).sum()

    @classmethod
    def from_mask(cls, mask: Tensor, capacity: Optional[int] = None) -> "DeadLatents":
        """The latents where the bool mask [d_sae] is True, ascending, in a list of `capacity`.

        capacity None: the number of dead latents, read from the mask (free on the CPU; on an
        accelerator a host sync, and under torch.compile, which cannot read it, d_sae). Give a
        capacity for a step without a sync: at least the number of dead latents (the trainer
        passes a bound it knows from its last check). A mask with more dead latents than the
        capacity lists the first `capacity` of them.
        """
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 1:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"dead_mask: expected a 1-D bool tensor [d_sae], got {got}")
        d_sae = mask.shape[0]
        if capacity is None:
            capacity = d_sae if tracing() else int(mask.sum())
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 0 <= capacity <= d_sae:
            raise ValueError(f"capacity: expected an integer 0 <= capacity <= d_sae={d_sae}, got {capacity!r}")
        # Each dead latent's place in the list is the number of dead latents before it; the live
        # ones, and dead ones past the capacity, go to a spare entry that is then dropped.
        place = torch.cumsum(mask, 0) - 1
        place = torch.where(mask & (place < capacity), place, capacity)
        latents = torch.full((capacity + 1,), -1, dtype=torch.int64, device=mask.device)
        latents.scatter_(0, place, torch.arange(d_sae, device=mask.device))
        return cls(latents[:capacity])


def check_dead_mask(mask, d_sae: int, device: Optional[torch.device] = None) -> None:
    """A bool tensor of shape (d_sae,) on `device`, else one ValueError naming the dead mask."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"dead_mask: expected a bool tensor of shape ({d_sae},), got {type(mask).__name__}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (d_sae,) or (device is not None and mask.device != device):
        where = f" on {device}" if device is not None else ""
        raise ValueError(
            f"dead_mask: expected a bool tensor of shape ({d_sae},){where}, got {mask.dtype} "
            f"{tuple(mask.shape)} on {mask.device}"
        )


def as_dead_latents(dead: Union[Tensor, DeadLatents, None], d_sae: int, device: torch.device) -> Optional[DeadLatents]:
    """A `dead_mask` argument (a bool mask, a `DeadLatents` or None) as `DeadLatents`, checked."""
    if dead is None:
        return None
    if isinstance(dead, DeadLatents):
        latents = dead.latents
        if latents.dtype != torch.int64 or latents.ndim != 1 or latents.device != device or latents.shape[0] > d_sae:
            raise ValueError(
                f"dead_mask: expected DeadLatents of at most {d_sae} int64 latents on {device}, got "
                f"{latents.dtype} {tuple(latents.shape)} on {latents.device}"
            )
        return dead
    check_dead_mask(dead, d_sae, device)
    return DeadLatents.from_mask(dead)
