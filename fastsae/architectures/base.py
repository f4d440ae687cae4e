"""What every architecture implements, over the shared sparse core (ops, `SparseActivations`,
the module's row-wise sparse path and its dense fallback).

An architecture is a stateless object: its methods take the `SAE` whose parameters, config and
sparse-path state (`sae.sparse_path`) they read, so the module stays the one thing that holds
tensors. Calls go one way: the module checks inputs and calls the architecture; the architecture
reads the module's public attributes and calls the ops, never the module's private methods. The base class is the family of
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
from fastsae.sparse import SparseActivations, pad_at_free_latents, tracing

if TYPE_CHECKING:
    from fastsae.sae import SAE


def decoder_norm(sae: "SAE") -> Optional[Tensor]:
    """||W_dec,i|| [d_sae] where activations are rescaled by it (topk/batchtopk's option), else None."""
    return sae.W_dec.norm(dim=1) if sae.cfg.rescale_acts_by_decoder_norm else None


def input_b_dec(sae: "SAE") -> Optional[Tensor]:
    """b_dec where the encoder subtracts it from the input, else None."""
    return sae.b_dec if sae.cfg.apply_b_dec_to_input else None


@dataclass
class Step:
    """One training batch's forward pass, before the losses shared by every architecture (MSE,
    AuxK): the reconstruction, the activations, the architecture's sparsity and auxiliary losses,
    and, for AuxK, the dead latents' reconstruction of the residual [N, d_out] (or None)."""

    x_hat: Tensor
    acts: object  # SparseActivations, or dense [N, d_sae] (converted by the module)
    sparsity: Tensor
    aux: Tensor
    aux_recon: Optional[Tensor] = None
    nested: Optional[Tensor] = None  # Matryoshka's inner levels' reconstruction losses, summed


@dataclass
class ShardedStep:
    """One training batch's forward over a latent-sharded SAE (every rank holds some latents and
    sees the whole batch): the whole reconstruction and losses, the same on every rank, the
    activations (global indices), and the whole batch's fired latents (bool [d_sae]) and mean L0."""

    x_hat: Tensor
    acts: SparseActivations
    sparsity: Tensor
    aux: Tensor
    fired: Tensor
    l0: Tensor


class Architecture:
    name = ""
    # The config's rules (installed into `fastsae.config` by the registry): whether the
    # architecture takes k, the name SAELens saves it under (default: `name`), and other names.
    uses_k = False
    saelens_name = ""
    aliases: tuple[str, ...] = ()
    # SAEConfig fields that only this architecture reads (see `complete_config`).
    config_options: tuple[str, ...] = ()
    # The dictionary_learning class fastsae writes it as (`fastsae.formats.save(..., to="dictionary_learning")`),
    # or "" where fastsae writes none.
    dictionary_learning_class = ""
    # What the trainer does with dead latents when asked for "auto", and whether AuxK applies.
    default_dead_strategy = "none"
    supports_auxk = False
    # What `fastsae train` asks of the architecture: whether --l1-coefficient sets its sparsity
    # coefficient (else the run trains with 0), and b_dec's start.
    takes_sparsity_coefficient = False
    default_b_dec_init = "geometric_median"
    # Whether a training step runs without a host sync (CUDA-graph capture: training.graph).
    sync_free_step = False

    # How SAELens (and sparsify) train it, for fastsae.bench's baselines and peers: a
    # `reference_training.ReferenceTraining`, or None (the bench leaves the architecture out).
    reference_training = None

    def complete_config(self, cfg) -> None:
        """Check the config's options that belong to this architecture, filling in their defaults
        (run by `SAEConfig` after its own checks)."""

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
        dec_norm = decoder_norm(sae)
        return pre * dec_norm if dec_norm is not None else pre

    def pre_activations(self, sae: "SAE", x2: Tensor) -> Tensor:
        """Dense pre-activations [N, d_sae] of the flat input x2 (b_dec subtracted where configured)."""
        x_in = x2 - sae.b_dec if sae.cfg.apply_b_dec_to_input else x2
        return self.pre_dense(sae, x_in)

    def acts_dense(self, sae: "SAE", pre: Tensor) -> Tensor:
        """Dense activations [N, d_sae] from the dense pre-activations."""
        raise NotImplementedError

    def dense_losses(self, sae: "SAE", target: Tensor, pre: Tensor, acts: Tensor, coefficient: float):
        """(sparsity loss, auxiliary loss) of a dense pass; `target` is what the decoder's output is
        compared with (the input, for an SAE)."""
        zero = target.new_zeros(())
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

    def sparse_pre(self, sae: "SAE", x2: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """(pre-activations [N, m] with -inf padding, indices [N, m]) from the row-wise sparse
        encoder, or None when the dense path should run (no rule, disabled, traced, or a row too
        dense)."""
        path = sae.sparse_path
        cutoff = self.sparse_cutoff(sae, torch.promote_types(sae.dtype, torch.float32))  # the kernels' type
        limit = path.limit(sae.d_sae, sae.device)
        if cutoff is None or limit <= 0 or not path.hint or tracing():
            return None
        limit = min(limit, sae.d_sae)
        pre, indices, counts = ops.threshold_encode(
            x2, sae.enc_weight, sae.b_enc, input_b_dec(sae), decoder_norm(sae), cutoff, limit
        )
        if pre.shape[1] == limit and int(counts.max()) > limit:
            path.overflowed()
            return None
        path.fitted()
        return pre, pad_at_free_latents(pre != float("-inf"), indices, sae.d_sae)

    def pre_dense_fallback(self, sae: "SAE", x2: Tensor) -> Tensor:
        """The dense pre-activations of a pass that did not take the sparse path, noting whether
        the next pass could."""
        pre = self.pre_activations(sae, x2)
        path = sae.sparse_path
        limit = path.limit(sae.d_sae, sae.device)
        if limit <= 0 or not pre.numel() or tracing() or path.hint:
            return pre
        cutoff = self.sparse_cutoff(sae, torch.promote_types(sae.dtype, torch.float32))
        if cutoff is not None and path.wants_a_look():
            widest = int((~(pre.detach() <= cutoff)).sum(-1).max())  # as the op counts: NaN included
            path.saw_widest(widest, limit)
        return pre

    def topk_flat(self, sae: "SAE", x2: Tensor, dead: Optional[DeadLatents] = None, k_aux: int = 0, k: Optional[int] = None):
        """(values [N, k], indices [N, k], AuxK's aux_pre [N, C] over `dead`'s list, or [N, 0])."""
        values, indices, aux_pre = ops.topk_encode(
            x2, sae.enc_weight, sae.b_enc, input_b_dec(sae), decoder_norm(sae), k or sae.cfg.k,
            dead.latents if dead is not None else None, k_aux, check_indices=False,
        )
        return values, indices, aux_pre if dead is None else dead.aux_activations(aux_pre)

    # ---------------------------------------------------------------- the module's entry points

    def encode_sparse(self, sae: "SAE", x2: Tensor) -> SparseActivations:
        sparse_pre = self.sparse_pre(sae, x2)
        if sparse_pre is not None:
            pre, indices = sparse_pre
            return SparseActivations(self.sparse_acts(sae, pre, indices), indices, sae.d_sae)
        pre = self.pre_dense_fallback(sae, x2)
        return SparseActivations.from_dense(self.acts_dense(sae, pre))

    def encode(self, sae: "SAE", x2: Tensor) -> Tensor:
        return self.acts_dense(sae, self.pre_activations(sae, x2))

    def forward(self, sae: "SAE", x2: Tensor) -> Tensor:
        sparse_pre = self.sparse_pre(sae, x2)
        if sparse_pre is not None:
            pre, indices = sparse_pre
            # The encoder's own indices: check_indices=False skips the range check (a host sync on a GPU).
            return ops.sparse_decode(
                self.sparse_acts(sae, pre, indices), indices, sae.W_dec, sae.b_dec, decoder_norm(sae), check_indices=False
            )
        pre = self.pre_dense_fallback(sae, x2)
        return sae.decode(self.acts_dense(sae, pre))

    def training_step(
        self, sae: "SAE", x2: Tensor, coefficient: float, dead: Optional[DeadLatents], k_aux: int,
        target: Optional[Tensor] = None,
    ) -> Step:
        """One batch's forward. `dead`: the dead latents (AuxK's, for the architectures that use it);
        `target`: what the decoder's output is compared with where the architecture's own losses
        compare it (default x2; a transcoder's target less its skip connection's term)."""
        sparse_pre = self.sparse_pre(sae, x2)
        if sparse_pre is not None:
            pre, indices = sparse_pre
            values = self.sparse_acts(sae, pre, indices)
            x_hat = ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, decoder_norm(sae), check_indices=False)
            sparsity = self.sparse_losses(sae, pre, values, indices, coefficient)
            return Step(x_hat, SparseActivations(values, indices, sae.d_sae), sparsity, x2.new_zeros(()))
        pre = self.pre_dense_fallback(sae, x2)
        acts = self.acts_dense(sae, pre)
        x_hat = sae.decode(acts)
        sparsity, aux = self.dense_losses(sae, x2 if target is None else target, pre, acts, coefficient)
        return Step(x_hat, acts, sparsity, aux)

    # ---------------------------------------------------------------- file formats (fastsae.formats asks these)

    # SAELens before 6.0 wrote the activation as `activation_fn` (and `activation_fn_kwargs`): the
    # one this architecture was written with, and the kwargs keys it needs from there.
    saelens_pre_6_0_activation = "relu"
    saelens_pre_6_0_kwargs: tuple[str, ...] = ()
    # Set where SAELens trains the architecture under this name but saves it, and infers, as
    # `saelens_name` (BatchTopK as JumpReLU): its live inference SAE then takes the saved layout.
    saelens_training_name = ""
    # sparsify's `activation` for the architecture; "" where sparsify has none.
    sparsify_activation = ""
    # SAELens' transcoder classes computing this architecture, (without, with) a skip connection;
    # empty where SAELens has none (its transcoders then save in fastsae's layout, which SAELens
    # does not load).
    saelens_transcoder_names: tuple[str, ...] = ()

    def tensor_shapes(self, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        """The tensors an SAE of this architecture is saved as and built from, under SAELens'
        names and shapes, in that order."""
        return {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}

    def tensors_from_saelens(self, tensors: dict[str, Tensor], d_sae: int, source) -> dict[str, Tensor]:
        """Tensors under SAELens' names (a file's, or a live SAELens SAE's) as `tensor_shapes`
        names them; errors name `source`."""
        return tensors

    def tensors_to_saelens(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """This architecture's tensors (`tensor_shapes`) as SAELens' files and inference SAE hold them."""
        return tensors

    # ---------------------------------------------------------------- latent sharding

    # Whether the architecture has a latent-sharded step (`sharded_training_step`); the others
    # train data parallel only.
    shards_latents = False

    def sharded_training_step(
        self, shard, x2: Tensor, coefficient: float, dead_mask: Optional[Tensor], k_aux: Optional[int], aux_coefficient: float
    ) -> ShardedStep:
        """One batch's forward on `shard` (a `fastsae.distributed.ShardedSAE`: this rank's latents,
        the collectives that join the ranks' parts), collective: every rank calls it with the same
        flat batch x2. `dead_mask`: the bool [d_sae] mask of dead latents (AuxK), or None."""
        raise ValueError(
            f"architecture: {self.name!r} trains data parallel only (it has no latent-sharded step); "
            "train it data parallel (fastsae.distributed.data_parallel, or `fastsae train` without --shard-latents)"
        )
