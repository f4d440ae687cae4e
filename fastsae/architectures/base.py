"""What every architecture implements, over the shared sparse core (ops, `SparseActivations`,
the module's row-wise sparse path and its dense fallback).

An architecture is a stateless object: its methods take the `SAE` whose parameters and state they
use, so the module stays the one thing that holds tensors. The base class is the family of
ReLU-like encoders, f = act(pre) with pre = x_in W_enc + b_enc: the row-wise sparse path where the
architecture has a per-latent cutoff, the dense path otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from fastsae import ops
from fastsae.auxk import DeadLatents
from fastsae.sparse import SparseActivations

if TYPE_CHECKING:
    from fastsae.sae import SAE


@dataclass
class Step:
    """One training batch's forward pass, before the losses shared by every architecture (MSE,
    AuxK): the reconstruction, the activations, the architecture's sparsity and auxiliary losses,
    and, for AuxK, the dead latents' reconstruction of the residual [N, d_in] (or None)."""

    x_hat: Tensor
    acts: object  # SparseActivations, or dense [N, d_sae] (converted by the module)
    sparsity: Tensor
    aux: Tensor
    aux_recon: Optional[Tensor] = None


class Architecture:
    name = ""
    # What the trainer does with dead latents when asked for "auto", and whether AuxK applies.
    default_dead_strategy = "none"
    supports_auxk = False

    # ---------------------------------------------------------------- training hooks

    def fold_input_scale(self, folded: "SAE", scale: float) -> None:
        """State beyond W_enc, b_dec and W_dec to rescale when a SAE trained on `scale * x` is
        folded to take raw inputs (those three are rescaled by the caller)."""

    def after_optimizer_step(self, master: "SAE", forward_sae: "SAE", cfg) -> None:
        """Keep the architecture's constraints after an optimizer step on `master`; `forward_sae`
        is the SAE the forward ran on (a lower-precision twin under mixed precision, else master)."""

    # ---------------------------------------------------------------- parameters

    def create_parameters(self, sae: "SAE", factory: dict) -> None:
        """The encoder's parameters beyond W_enc, registered between W_enc and b_dec."""
        sae.b_enc = torch.nn.Parameter(torch.zeros(sae.d_sae, **factory))

    def create_extra_parameters(self, sae: "SAE", factory: dict) -> None:
        """Parameters and buffers registered after b_dec (the order fixes the optimizer's state
        layout in checkpoints: keep it)."""

    # ---------------------------------------------------------------- dense path

    def pre_dense(self, sae: "SAE", x_in: Tensor) -> Tensor:
        """Pre-activations [N, d_sae] of the input with b_dec already subtracted where configured."""
        pre = x_in @ sae.W_enc + sae.b_enc
        dec_norm = sae._dec_norm()
        return pre * dec_norm if dec_norm is not None else pre

    def acts_dense(self, sae: "SAE", pre: Tensor) -> Tensor:
        """Dense activations [N, d_sae] from the dense pre-activations."""
        raise NotImplementedError

    def dense_losses(self, sae: "SAE", x2: Tensor, pre: Tensor, acts: Tensor, coefficient: float):
        """(sparsity loss, auxiliary loss) of a dense pass."""
        zero = x2.new_zeros(())
        return zero, zero

    # ---------------------------------------------------------------- row-wise sparse path

    def sparse_cutoff(self, sae: "SAE", acc: torch.dtype) -> Optional[Tensor]:
        """The per-latent cutoff (in the kernels' accumulation type `acc`) above which
        pre-activations enter the sparse form, or None where there is no per-latent rule."""
        return None

    def sparse_acts(self, sae: "SAE", pre: Tensor, indices: Tensor) -> Tensor:
        """Activations [N, m] of the sparse path's pre-activations (0 at padding)."""
        return pre.relu()

    def sparse_losses(self, sae: "SAE", pre: Tensor, values: Tensor, indices: Tensor, coefficient: float) -> Tensor:
        """The sparsity loss of a sparse pass."""
        return values.new_zeros(())

    # ---------------------------------------------------------------- the module's entry points

    def encode_sparse(self, sae: "SAE", x2: Tensor) -> SparseActivations:
        sparse_pre = sae._sparse_pre(x2)
        if sparse_pre is not None:
            pre, indices = sparse_pre
            return SparseActivations(self.sparse_acts(sae, pre, indices), indices, sae.d_sae)
        pre = sae._pre_dense_fallback(x2)
        return SparseActivations.from_dense(self.acts_dense(sae, pre))

    def encode(self, sae: "SAE", x2: Tensor) -> Tensor:
        return self.acts_dense(sae, sae._pre_dense(x2))

    def forward(self, sae: "SAE", x2: Tensor) -> Tensor:
        sparse_pre = sae._sparse_pre(x2)
        if sparse_pre is not None:
            pre, indices = sparse_pre
            # The encoder's own indices: check_indices=False skips the range check (a host sync on a GPU).
            return ops.sparse_decode(
                self.sparse_acts(sae, pre, indices), indices, sae.W_dec, sae.b_dec, sae._dec_norm(), check_indices=False
            )
        pre = sae._pre_dense_fallback(x2)
        return sae.decode(self.acts_dense(sae, pre))

    def training_step(self, sae: "SAE", x2: Tensor, coefficient: float, dead: Optional[DeadLatents], k_aux: int) -> Step:
        """One batch's forward. `dead`: the dead latents (AuxK's, for the architectures that use it)."""
        sparse_pre = sae._sparse_pre(x2)
        if sparse_pre is not None:
            pre, indices = sparse_pre
            values = self.sparse_acts(sae, pre, indices)
            x_hat = ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, sae._dec_norm(), check_indices=False)
            sparsity = self.sparse_losses(sae, pre, values, indices, coefficient)
            return Step(x_hat, SparseActivations(values, indices, sae.d_sae), sparsity, x2.new_zeros(()))
        pre = sae._pre_dense_fallback(x2)
        acts = self.acts_dense(sae, pre)
        x_hat = sae.decode(acts)
        sparsity, aux = self.dense_losses(sae, x2, pre, acts, coefficient)
        return Step(x_hat, acts, sparsity, aux)
