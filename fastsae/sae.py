"""`fastsae.SAE`: a drop-in sparse autoencoder module.

Parameters carry SAELens' names and shapes: W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_out], b_dec [d_out] (d_out = d_in but for transcoders), for JumpReLU threshold
[d_sae], and with a skip connection W_skip [d_out, d_in]. Gated SAEs (Rajamanoharan
et al. 2024) have no b_enc but b_gate, r_mag and b_mag [d_sae], as in SAELens. W_enc is stored
latent-major ([d_sae, d_in] in memory, seen through a transpose) so that each latent's encoder
row is contiguous for the sparse kernels; `sae.W_enc` still looks exactly like SAELens'.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from fastsae import architectures, ops
from fastsae.auxk import DeadLatents, as_dead_latents
from fastsae.config import SAEConfig
from fastsae.losses import (  # mean_squared_norm: importable from here too
    aux_width, check_aux_normalization, mean_squared_norm, residual_variance_normalized,
)
from fastsae.sparse import SparseActivations
from fastsae.sparse_path import SparsePath, default_sparse_width_limit


@dataclass
class TrainOutput:
    """What `SAE.training_forward` returns. Losses are scalars; `loss` is their weighted sum."""

    x_hat: Tensor
    acts: SparseActivations  # the batch's activations, [N, m]
    mse_loss: Tensor
    sparsity_loss: Tensor
    aux_loss: Tensor
    loss: Tensor
    # Matryoshka: the inner levels' MSEs, summed (SAELens' inner_mse_loss_<w>); None elsewhere.
    nested_loss: Optional[Tensor] = None


def initial_decoder_rows(drawn: Tensor, cfg: SAEConfig) -> Tensor:
    """Freshly drawn (kaiming-uniform) decoder rows, scaled by the config's rule (unit rows for
    "unit_norm", else rows of norm `decoder_init_norm` unless it is None), in the SAE's dtype."""
    if cfg.decoder_norm == "unit_norm":
        drawn = drawn / drawn.norm(dim=1, keepdim=True)
    elif cfg.decoder_init_norm is not None:
        drawn = drawn / drawn.norm(dim=1, keepdim=True) * cfg.decoder_init_norm
    return drawn.to(cfg.torch_dtype)


def _drawn_rows(rows: int, width: int, cfg: SAEConfig) -> Tensor:
    """Kaiming-uniform rows [rows, width] scaled by `initial_decoder_rows`' rule."""
    drawn = torch.empty(rows, width, dtype=torch.float32, device=torch.device(cfg.device))
    nn.init.kaiming_uniform_(drawn, a=math.sqrt(5))
    return initial_decoder_rows(drawn, cfg)


class SAETensors(nn.Module):
    """What `SAE` and the latent-sharded `fastsae.distributed.ShardedSAE` share: the config's shape
    and architecture, the parameters' dtype and device, the input checks and the per-latent-row
    decoder operations (local to a shard: each row is whole on one rank). Subclasses set `cfg`,
    `W_enc` and `W_dec`."""

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """The width of the output: d_in for an SAE, the target's width for a transcoder."""
        return self.cfg.output_width

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def arch(self) -> architectures.Architecture:
        """The architecture's own methods (`fastsae.architectures`), over this module's tensors."""
        return architectures.get(self.cfg.architecture)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def enc_weight(self) -> Tensor:
        """The encoder latent-major, [d_sae, d_in] (a view of W_enc)."""
        return self.W_enc.t()

    # ------------------------------------------------------------ input checks

    def _check_tensor(self, t, what: str, width: int, width_name: str) -> None:
        if not isinstance(t, Tensor):
            raise ValueError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
        if t.ndim < 1 or t.shape[-1] != width:
            raise ValueError(f"{what}: expected shape [..., {width}] ({width_name}={width}), got {tuple(t.shape)}")
        if t.dtype != self.dtype:
            raise ValueError(f"{what}: expected dtype {self.dtype} (the SAE's), got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{what}: expected device {self.device} (the SAE's), got {t.device}")

    def _flat_input(self, x: Tensor) -> Tensor:
        self._check_tensor(x, "input", self.d_in, "d_in")
        return x.reshape(-1, self.d_in)

    def _flat_target(self, target: Tensor, x: Tensor) -> Tensor:
        """The training target [N, d_out], one row per input row."""
        self._check_tensor(target, "target", self.d_out, "d_out")
        if target.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"target: expected one row per input row (leading shape {tuple(x.shape[:-1])}, the input's), "
                f"got shape {tuple(target.shape)}"
            )
        return target.reshape(-1, self.d_out)

    # ------------------------------------------------------------ decoder constraints

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Scale every decoder row to unit norm (the 2023 paper's constraint)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.dtype).tiny))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Remove from W_dec.grad its component along each decoder row (call between backward
        and the optimizer step, with unit-norm rows)."""
        if self.W_dec.grad is None:
            return
        direction = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.dtype).tiny)
        parallel = (self.W_dec.grad * direction).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * direction)


class SAE(SAETensors):
    """A sparse autoencoder: `SAE(SAEConfig(...))` or `SAE(d_in=..., d_sae=..., architecture=..., k=...)`.

    - `sae(x)`: the reconstruction, shaped like x ([..., d_in]); a transcoder's prediction [..., d_out].
    - `sae.encode(x)`: dense activations [..., d_sae]; `sae.encode_sparse(x)`: `SparseActivations`.
    - `sae.decode(a)`: from dense activations or `SparseActivations`.
    - `sae.training_forward(x, ...)`: reconstruction plus the architecture's losses.
    - `sae.save(dir)`: a SAELens v6 folder; `fastsae.load(path)`: SAELens, sparsify, dictionary_learning,
      OpenAI and Gemma Scope checkpoints (see `fastsae.formats`).
    """


    def __init__(self, cfg: Optional[SAEConfig] = None, **kwargs):
        super().__init__()
        if cfg is None:
            cfg = SAEConfig(**kwargs)
        elif kwargs:
            raise ValueError(f"SAE: pass either a SAEConfig or keyword options, not both (got {sorted(kwargs)})")
        if not isinstance(cfg, SAEConfig):
            raise ValueError(f"SAE: expected a fastsae.SAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.output_width
        factory = dict(dtype=cfg.torch_dtype, device=torch.device(cfg.device))

        w_dec = _drawn_rows(d_sae, d_out, cfg)
        self.W_dec = nn.Parameter(w_dec)
        # Tied initialisation (W_enc = W_dec^T), stored latent-major. A transcoder whose output
        # has another width draws its encoder rows on their own, under the same norm rule.
        w_enc = w_dec.clone() if d_out == d_in else _drawn_rows(d_sae, d_in, cfg)
        self.W_enc = nn.Parameter(w_enc.t())
        self.arch.create_parameters(self, factory)
        self.b_dec = nn.Parameter(torch.zeros(d_out, **factory))
        self.arch.create_extra_parameters(self, factory)
        # Registered last (checkpoints' optimizer state keeps its order); zeros at the start, as
        # SAELens' SkipTranscoder and sparsify start it. None (not a parameter) without the option.
        w_skip = nn.Parameter(torch.zeros(d_out, d_in, **factory)) if cfg.skip_connection else None
        self.register_parameter("W_skip", w_skip)
        self.sparse_path = SparsePath()  # which path the next pass takes (plain numbers)

    def __setstate__(self, state: dict) -> None:
        # Modules pickled before `sparse_path` existed held its numbers as attributes.
        if "sparse_path" not in state:
            old = {name: state.pop(attr) for attr, name in _OLD_SPARSE_ATTRS.items() if attr in state}
            state["sparse_path"] = SparsePath(**old)
        state.get("_parameters", {}).setdefault("W_skip", None)  # pickled before skip connections
        super().__setstate__(state)

    # ------------------------------------------------------------ sparse-path state

    @property
    def sparse_width_limit(self) -> Optional[int]:
        """ReLU, JumpReLU (and BatchTopK at inference) take the row-wise sparse path while no row of
        a batch has more than this many active latents, the dense path otherwise; 0: always
        dense; None: the device's default (`default_sparse_width_limit`)."""
        return self.sparse_path.width_limit

    @sparse_width_limit.setter
    def sparse_width_limit(self, value: Optional[int]) -> None:
        self.sparse_path.width_limit = value

    # The sparse path's numbers under their former attribute names (tests and the trainer's
    # roll-back snapshot read and restore them by these names).
    _sparse_hint = property(lambda self: self.sparse_path.hint, lambda self, v: setattr(self.sparse_path, "hint", v))
    _dense_passes_to_skip = property(
        lambda self: self.sparse_path.dense_passes_to_skip,
        lambda self, v: setattr(self.sparse_path, "dense_passes_to_skip", v),
    )
    _overflow_backoff = property(
        lambda self: self.sparse_path.overflow_backoff, lambda self, v: setattr(self.sparse_path, "overflow_backoff", v)
    )
    _batchtopk_bound = property(
        lambda self: self.sparse_path.batchtopk_bound, lambda self, v: setattr(self.sparse_path, "batchtopk_bound", v)
    )

    # ------------------------------------------------------------ properties

    def _dec_norm(self) -> Optional[Tensor]:
        return architectures.decoder_norm(self)

    def _b_dec_in(self) -> Optional[Tensor]:
        return architectures.input_b_dec(self)

    def extra_repr(self) -> str:
        extra = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}, architecture={self.architecture!r}{extra}, dtype={self.dtype}"

    # ------------------------------------------------------------ encode

    def _pre_dense(self, x2: Tensor) -> Tensor:
        """Pre-activations [N, d_sae] (for gated x_in @ W_enc, shared by both paths, no bias)."""
        return self.arch.pre_activations(self, x2)

    # ------------------------------------------------------------ row-wise sparse path

    def default_sparse_width_limit(self) -> int:
        """d_sae / 8 on CPU: there a ReLU training step on the sparse path was faster than the dense
        one up to rows of ~d_sae / 5 active latents (benchmarks/results/sparse-path-cpu-*.json,
        2048 x 768 -> 16384: 5.7x at L0 16, 2.5x at L0 1023, 1.4x at L0 2050, 0.8x at L0 4099).
        0 (the dense path) on GPUs: on an H200 the sparse step was slower at every L0 measured
        (benchmarks/results/sparse-path-h200-2026-11-29.json, 4096 x 768 -> 24576, bf16: dense
        time / sparse time 0.74 at L0 31, 0.24 at L0 2017), until a committed sweep shows it winning."""
        return default_sparse_width_limit(self.d_sae, self.device)

    def encode_sparse(self, x: Tensor) -> SparseActivations:
        """Activations as `SparseActivations` with x's leading dims: [..., m]."""
        lead = x.shape[:-1] if isinstance(x, Tensor) else ()
        sparse = self.arch.encode_sparse(self, self._flat_input(x))
        m = sparse.width
        return SparseActivations(sparse.values.reshape(*lead, m), sparse.indices.reshape(*lead, m), self.d_sae)

    def encode(self, x: Tensor) -> Tensor:
        """Dense activations [..., d_sae], as SAELens' encode returns them."""
        lead = x.shape[:-1] if isinstance(x, Tensor) else ()
        return self.arch.encode(self, self._flat_input(x)).reshape(*lead, self.d_sae)

    # ------------------------------------------------------------ decode

    def decode(self, acts: Union[Tensor, SparseActivations]) -> Tensor:
        """Reconstruction [..., d_out] from dense [..., d_sae] activations or `SparseActivations`
        (without a skip connection's term, which needs the input: `forward` adds it)."""
        dec_norm = self._dec_norm()
        if isinstance(acts, SparseActivations):
            if acts.d_sae != self.d_sae:
                raise ValueError(f"activations: expected d_sae={self.d_sae}, got SparseActivations with d_sae={acts.d_sae}")
            self._check_tensor(acts.values, "activations.values", acts.width, "m")
            if acts.indices.device != self.device:
                raise ValueError(f"activations.indices: expected device {self.device}, got {acts.indices.device}")
            lead = acts.values.shape[:-1]
            flat = acts.flatten()
            out = ops.sparse_decode(flat.values, flat.indices, self.W_dec, self.b_dec, dec_norm)
            return out.reshape(*lead, self.d_out)
        self._check_tensor(acts, "activations", self.d_sae, "d_sae")
        if dec_norm is not None:
            acts = acts / dec_norm
        return acts @ self.W_dec + self.b_dec

    # ------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x_hat, shaped like x (a transcoder's prediction: [..., d_out])."""
        lead = x.shape[:-1] if isinstance(x, Tensor) else ()
        x2 = self._flat_input(x)
        out = self.arch.forward(self, x2)
        if self.W_skip is not None:
            out = torch.addmm(out, x2, self.W_skip.t())
        return out.reshape(*lead, self.d_out)

    def training_forward(
        self,
        x: Tensor,
        *,
        target: Optional[Tensor] = None,
        sparsity_coefficient: float = 0.0,
        dead_mask: Union[Tensor, DeadLatents, None] = None,
        k_aux: Optional[int] = None,
        aux_coefficient: float = 1.0 / 32,
        aux_normalization: str = "dead_fraction",
    ) -> TrainOutput:
        """Reconstruction and losses for one training batch (rows flattened).

        `target`: what the output is trained to match, one row per input row, [..., d_out]
        (default x: an autoencoder). A transcoder's output includes its skip connection, and every
        loss below that compares with x compares with the target instead.
        - mse_loss: sum over d_out of (x_hat - target)^2, averaged over rows (SAELens' convention).
        - relu: sparsity_loss = coefficient * mean over rows of sum_i |f_i| * ||W_dec,i||
          (decoder_norm "norm_weighted" or "unit_norm"; plain |f_i| with "none").
        - jumprelu: sparsity_loss = coefficient * mean L0, through the step pseudo-gradient.
        - gated (SAELens' losses): sparsity_loss = coefficient * mean over rows of
          sum_i relu(pi_gate)_i * ||W_dec,i|| (plain relu(pi_gate)_i with decoder_norm "none");
          aux_loss = mean over rows of ||relu(pi_gate) @ W_dec + b_dec - x||^2 (weight 1, as SAELens),
          where pi_gate = x_in @ W_enc + b_gate.
        - topk / batchtopk: with `dead_mask` (a bool [d_sae], or `fastsae.DeadLatents` built from
          one), the AuxK loss of Gao et al.: each row's top k_aux (default d_out // 2, as sparsify) dead latents
          reconstruct the detached residual e = target - x_hat, aux_loss = aux_coefficient * min(1, n_dead / k_aux)
          * mean ||e_hat - e||^2. Its cost follows the number of dead latents (see `fastsae.auxk`).
          With aux_normalization="residual_variance" (OpenAI's and dictionary_learning's AuxK) the
          dead latents' pre-activations are ReLU'd and aux_loss = aux_coefficient * mean ||e_hat - e||^2
          / mean ||e - mean_rows(e)||^2 (0 where that is 0/0), with no n_dead / k_aux factor.
        BatchTopK also updates its inference threshold here. `acts` is always `SparseActivations`
        (ReLU/JumpReLU: from the sparse path, or converted after a dense pass; JumpReLU's may hold
        zero-valued entries just below the threshold, which its pseudo-gradients use).
        """
        x2 = self._flat_input(x)
        y2 = x2 if target is None else self._flat_target(target, x)
        dead = as_dead_latents(dead_mask, self.d_sae, self.device)
        by_variance = check_aux_normalization(aux_normalization) == "residual_variance"
        if dead is not None and by_variance:
            dead = dataclasses.replace(dead, rectified=True)
        n_aux = self._aux_width(k_aux)
        if dead is not None and dead.capacity == 0:
            dead = None  # no dead latent: the loss is 0 (scaled by n_dead / k_aux), nothing to compute
        skip = x2 @ self.W_skip.t() if self.W_skip is not None else None
        # The latents reconstruct what the skip connection leaves of the target (the same losses
        # as comparing output + skip with the target, and W_skip gets its gradient through it).
        goal = y2 if skip is None else y2 - skip
        step = self.arch.training_step(self, x2, sparsity_coefficient, dead, n_aux, target=goal)
        x_hat, acts, sparsity, aux = step.x_hat, step.acts, step.sparsity, step.aux
        if skip is not None:
            x_hat = x_hat + skip
        mse = mean_squared_norm(x_hat, y2)
        if step.aux_recon is not None:
            # As sparsify: the loss shrinks when fewer latents are dead than k_aux (0 when none
            # is). A device tensor, not a Python number: no host sync, so the step can be
            # compiled with fullgraph=True and captured as a CUDA graph.
            residual = (y2 - x_hat).detach()
            if by_variance:
                aux = aux_coefficient * residual_variance_normalized(step.aux_recon, residual)
            else:
                scale = (dead.count().to(x_hat.dtype) / n_aux).clamp(max=1.0)
                aux = aux_coefficient * scale * mean_squared_norm(step.aux_recon, residual)
        if not isinstance(acts, SparseActivations):  # one type whichever path ran
            acts = SparseActivations.from_dense(acts)
        loss = mse + sparsity + aux
        if step.nested is not None:
            loss = loss + step.nested
        return TrainOutput(x_hat.reshape(*x.shape[:-1], self.d_out), acts, mse, sparsity, aux, loss, step.nested)

    def _aux_width(self, k_aux: Optional[int]) -> int:
        """AuxK's k_aux (default d_out // 2, at most d_sae)."""
        return aux_width(k_aux, self.d_out, self.d_sae)

    # ------------------------------------------------------------ persistence

    def save(self, path: Union[str, Path]) -> Path:
        """Write a SAELens v6 folder (cfg.json + sae_weights.safetensors)."""
        return _file_formats["save"](self, path)

    @classmethod
    def load(cls, path: Union[str, Path], device=None, dtype=None) -> "SAE":
        return _file_formats["load"](path, device=device, dtype=dtype)

    @classmethod
    def from_saelens(cls, saelens_sae, device=None, dtype=None) -> "SAE":
        """This SAE from a live SAELens SAE (inference or training class; tensors copied), computing
        what it computes. SAELens options fastsae does not compute raise a ValueError."""
        return _file_formats["from_saelens"](saelens_sae, device=device, dtype=dtype)

    def to_saelens(self, training: bool = False):
        """A live SAELens SAE (its inference class, or with `training` its training class) with
        this SAE's tensors (copied), computing what this SAE computes. Needs sae-lens installed."""
        return _file_formats["to_saelens"](self, training=training)

    @classmethod
    def from_sparsify(cls, sparse_coder, device=None, dtype=None) -> "SAE":
        """This SAE from a live sparsify `SparseCoder` (tensors copied exactly; on its device unless
        `device` says otherwise; transcode and skip_connection give a transcoder). groupmax raises a ValueError."""
        return _file_formats["from_sparsify"](sparse_coder, device=device, dtype=dtype)

    def to_sparsify(self):
        """A live sparsify `SparseCoder` with this TopK SAE's tensors (copied), computing what this
        SAE computes. Needs eai-sparsify installed."""
        return _file_formats["to_sparsify"](self)


# Files are `fastsae.formats`' job, which builds SAEs and so depends on this module; it installs
# its writer and reader here when imported (`import fastsae` does), so this module imports no format.
_file_formats: dict[str, Callable] = {}


_OLD_SPARSE_ATTRS = {
    "sparse_width_limit": "width_limit", "_sparse_hint": "hint", "_dense_passes_to_skip": "dense_passes_to_skip",
    "_overflow_backoff": "overflow_backoff", "_batchtopk_bound": "batchtopk_bound",
}


def install_file_formats(save: Callable, load: Callable, **converters: Callable) -> None:
    _file_formats.update(save=save, load=load, **converters)
