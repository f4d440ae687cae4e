"""`train_step`: one training step (zero_grad, forward, AuxK, backward, Adam), the step every
benchmark times eagerly (`fastsae.bench.harness`); and `CapturedStep`: a TopK SAE's `train_step`
recorded once as a CUDA graph and replayed: one launch per step instead of a few hundred, the small-batch cost the H200 run
measured (about 3 ms per step at N 4096 against a ~0.5 ms floor).

Why it can be captured: the TopK step has no host sync and no data-dependent shape (AuxK
included: its dead latents go in a list of fixed capacity, `fastsae.DeadLatents`, and the GPU
backends select among them from the chunked product), and the optimizer is torch's fused Adam with
`capturable=True` (step count and learning rate on the device; `optim.make_adam`).

What stays exact:
- Capturing needs a few warm-up steps (on a side stream); they are undone (parameters and the
  optimizer's state copied back in place), so the first replay is the first real step.
- A non-finite loss is refused on the device: the fused Adam skips its update (parameters,
  moments and step count) when `found_inf` is set, as under a GradScaler. `CapturedStep.run`
  returns the outputs; the caller reads `loss` to report the refusal.
- Each replay reads the batch, the dead mask and the learning rate from static buffers
  (`run` copies them in).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from fastsae.auxk import DeadLatents, check_dead_mask
from fastsae.sae import TrainOutput
from fastsae.training.optim import set_lr


def train_step(
    sae,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    *,
    target: Optional[Tensor] = None,
    dead_mask=None,
    sparsity_coefficient: Optional[float] = None,
    k_aux: Optional[int] = None,
    aux_coefficient: Optional[float] = None,
    found_inf: Optional[Tensor] = None,
    after_step: Optional[Callable[[], None]] = None,
) -> TrainOutput:
    """One training step: zero the gradients, `training_forward`, backward, the optimizer's step
    (unit-norm decoders: the gradient's parallel part removed before, the rows renormalised
    after). The step `fastsae bench` and the benchmarks time eagerly and `CapturedStep` records.

    found_inf (a 0-d float tensor on the device): set to 1 when the loss is not finite and handed
    to the fused Adam, which then skips the whole update (no host sync, so it can be captured).
    None-valued keywords take `training_forward`'s defaults (target None: x, an autoencoder).
    """
    optimizer.zero_grad(set_to_none=True)
    kwargs = {"dead_mask": dead_mask, "target": target}
    for name, value in (("sparsity_coefficient", sparsity_coefficient), ("k_aux", k_aux),
                        ("aux_coefficient", aux_coefficient)):
        if value is not None:
            kwargs[name] = value
    out = sae.training_forward(x, **kwargs)
    out.loss.backward()
    unit_norm = sae.cfg.decoder_norm == "unit_norm"
    if unit_norm:
        sae.remove_gradient_parallel_to_decoder_directions()
    if found_inf is not None:
        found_inf.copy_((~torch.isfinite(out.loss.detach())).float())
        optimizer.found_inf = found_inf  # read by the fused Adam: a refused step changes nothing
    optimizer.step()
    if unit_norm or after_step is not None:
        with torch.no_grad():
            if unit_norm:
                sae.set_decoder_norm_to_unit_norm()
            if after_step is not None:
                after_step()
    return out


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]


@torch.no_grad()
def run_and_undo(fn: Callable[[], object], optimizer: torch.optim.Optimizer) -> None:
    """Run fn (warm-up steps), then put the optimizer's parameters and state back as they were,
    in place (a graph records these addresses); a fresh optimizer's state is zeroed, which is what
    Adam's first step starts from."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_params = [p.detach().clone() for p in params]
    fresh = not optimizer.state
    saved_state = None if fresh else [t.clone() for t in _state_tensors(optimizer)]
    with torch.enable_grad():
        fn()
    for p, saved in zip(params, saved_params):
        p.copy_(saved)
    for i, t in enumerate(_state_tensors(optimizer)):
        if fresh:
            t.zero_()
        else:
            t.copy_(saved_state[i])


class CapturedStep:
    """`step = CapturedStep(sae, optimizer, rows)`; then `out = step.run(x, dead_mask, lr)` per batch.

    x must have `rows` rows; dead_mask is a bool [d_sae] (None: no latent is dead; with
    `auxk=False` it must stay None). `aux_capacity`: the most dead latents AuxK takes (its list's
    fixed capacity, which its cost follows; default d_sae, exact whatever the count; a mask with
    more lists the first `aux_capacity`). The returned `TrainOutput` holds static tensors that the
    next `run` overwrites: copy what you keep.
    """

    def __init__(
        self,
        sae,
        optimizer: torch.optim.Optimizer,
        rows: int,
        *,
        auxk: bool = True,
        k_aux: Optional[int] = None,
        aux_coefficient: float = 1.0 / 32,
        aux_capacity: Optional[int] = None,
        after_step: Optional[Callable[[], None]] = None,
        warmup: int = 3,
    ):
        if sae.device.type != "cuda":
            raise ValueError(f"CapturedStep: CUDA graphs need the SAE on a CUDA device, got {sae.device}")
        if not sae.arch.sync_free_step:
            raise ValueError(
                f"CapturedStep: only a topk SAE's step is free of host syncs, got architecture {sae.architecture!r}"
            )
        fused = all(g.get("fused") and g.get("capturable") for g in optimizer.param_groups)
        if not isinstance(optimizer, torch.optim.Adam) or not fused:
            raise ValueError("CapturedStep: expected torch's fused Adam with capturable=True (optim.make_adam(..., capturable=True))")
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows: expected a positive integer, got {rows!r}")
        self.sae, self.optimizer, self.rows = sae, optimizer, rows
        self.k_aux, self.aux_coefficient, self.after_step, self.warmup = k_aux, aux_coefficient, after_step, warmup
        self.aux_capacity = sae.d_sae if aux_capacity is None else aux_capacity
        device = sae.device
        self.x = torch.zeros(rows, sae.d_in, dtype=sae.dtype, device=device)
        self.dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=device) if auxk else None
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)  # 0-d, as Adam's step count
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[TrainOutput] = None

    def _step(self) -> TrainOutput:
        dead = DeadLatents.from_mask(self.dead, capacity=self.aux_capacity) if self.dead is not None else None
        return train_step(
            self.sae, self.optimizer, self.x, dead_mask=dead, k_aux=self.k_aux, aux_coefficient=self.aux_coefficient,
            found_inf=self.found_inf, after_step=self.after_step,
        )

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.sae.device)
        side.wait_stream(torch.cuda.current_stream(self.sae.device))

        def warm_up():
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._step()
            torch.cuda.current_stream(self.sae.device).wait_stream(side)

        run_and_undo(warm_up, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step()

    def run(self, x: Tensor, dead_mask: Optional[Tensor] = None, lr: Optional[float] = None) -> TrainOutput:
        if x.shape != self.x.shape:
            raise ValueError(f"x: expected shape {tuple(self.x.shape)} (the captured batch), got {tuple(x.shape)}")
        if dead_mask is not None and self.dead is None:
            raise ValueError("dead_mask: this step was captured without AuxK (auxk=False), got a mask")
        if dead_mask is not None:
            # As training_forward: copy_ would broadcast a wrong shape or cast a wrong dtype silently.
            check_dead_mask(dead_mask, self.sae.d_sae, self.sae.device)
        self.x.copy_(x, non_blocking=True)
        if self.dead is not None:
            if dead_mask is None:
                self.dead.zero_()
            else:
                self.dead.copy_(dead_mask, non_blocking=True)
        if lr is not None:
            set_lr(self.optimizer, lr)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out
