"""Mixed precision for the trainer: the compute twin, float16's loss scale, the master gradients
and their clipping.

The SAE the trainer holds keeps float32 master weights (and Adam's state on them); with bfloat16
or float16 a twin SAE in that dtype runs forward and backward on a copy of the weights made at
each step (mixed precision, as autocast would give, but with the kernels' own 16-bit paths).
Nothing here waits for the device: a non-finite loss or gradient only raises a device flag.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastsae import distributed as fdist
from fastsae.config import SAEConfig
from fastsae.sae import SAE
from fastsae.training.optim import Adam as ChunkedAdam

# float16 training multiplies the loss by this before backward and divides the float32 gradients
# by it: the gradient of the mean squared error is ~2 * residual / batch (~1e-5 late in training
# at batch 4096), below float16's smallest normal number (6e-5) without it. An overflow is a
# non-finite gradient: the step is rolled back and refused like any other.
FLOAT16_LOSS_SCALE = 1024.0


def compute_twin(master: SAE, dtype: str, sharded: bool) -> SAE:
    """The SAE that runs forward and backward: the master itself in float32, else a copy in
    `dtype` whose weights `Precision.refresh_compute_weights` refreshes at every step."""
    if dtype == "float32":
        return master
    twin_cfg = SAEConfig.from_dict({**master.cfg.to_dict(), "dtype": dtype})
    twin = fdist.ShardedSAE(twin_cfg, group=master.group, _init=False) if sharded else SAE(twin_cfg)
    with torch.no_grad():
        for mine, theirs in zip(twin.state_dict().values(), master.state_dict().values()):
            mine.copy_(theirs)
    twin.sparse_width_limit = master.sparse_width_limit
    return twin


class Precision:
    """The master SAE, its compute twin (`compute`, the master itself in float32) and the
    gradients' way from the twin to the master."""

    def __init__(self, master: SAE, dtype: str, sharded: bool):
        self.master = master
        self.sharded = sharded
        self.compute = compute_twin(master, dtype, sharded)
        self.mixed = self.compute is not master
        self.loss_scale = FLOAT16_LOSS_SCALE if dtype == "float16" else 1.0
        self._inv_scale = torch.full((1,), 1.0 / self.loss_scale, device=master.device)

    @torch.no_grad()
    def refresh_compute_weights(self) -> None:
        """The twin's weights from the master's, and its buffers (BatchTopK's threshold), which a
        roll-back restores in the master only."""
        if self.mixed:
            torch._foreach_copy_(list(self.compute.parameters()), list(self.master.parameters()))
            for twin, master in zip(self.compute.buffers(), self.master.buffers()):
                twin.copy_(master)

    def zero_grads(self) -> None:
        self.compute.zero_grad(set_to_none=True)
        if self.mixed:
            self.master.zero_grad(set_to_none=True)

    def gradients_to_master(self, found: Tensor) -> Optional[Tensor]:
        """After backward: the master's float32 gradients (unscaled for float16), `found` raised
        if any is not finite. Returns the gradients' global norm where computing the flag gave it
        for free (the gradients clipping reads), else None."""
        if self.loss_scale != 1.0:
            # float16: the float32 copies are unscaled, and a non-finite one flagged, in one pass.
            torch._amp_foreach_non_finite_check_and_unscale_(self.master_grads(), found, self._inv_scale)
            return None
        # Only the flag: the gradients' norms read each one once, in its own dtype (the 16-bit
        # twin's before the copy), and write nothing parameter-sized.
        grads = [p.grad for p in self.compute.parameters() if p.grad is not None]
        norms = torch.stack(torch._foreach_norm(grads))
        found.add_((~torch.isfinite(norms.float().sum())).float())
        if self.mixed:
            self.master_grads()
        elif grads and not self.sharded and self.master.cfg.decoder_norm != "unit_norm":
            # These are the gradients clipping reads: its global norm from the same norms.
            return torch.linalg.vector_norm(norms, 2)
        return None

    def master_grads(self) -> list[Tensor]:
        """The master weights' gradients (float32), copied from the compute twin's when mixed."""
        if not self.mixed:
            return [p.grad for p in self.master.parameters() if p.grad is not None]
        grads = []
        for master, twin in zip(self.master.parameters(), self.compute.parameters()):
            if twin.grad is not None:
                master.grad = twin.grad.to(torch.float32)
                grads.append(master.grad)
        return grads

    def step(self, optimizer: torch.optim.Optimizer, max_norm: Optional[float], grad_norm: Optional[Tensor] = None) -> None:
        """The optimizer's step on the master gradients, clipped to `max_norm` first (None: not
        clipped). The chunked CPU Adam (`optim.Adam`) takes the clip coefficient as its
        `grad_scale` and scales each gradient chunk while it is in cache: one pass over the
        gradients fewer (clipping alone took 0.26 ms of a 35 ms step at 256 -> 4096, 2 cores), the
        same bits."""
        if max_norm is not None and isinstance(optimizer, ChunkedAdam):
            optimizer.step(grad_scale=self.clip_coefficient(max_norm, grad_norm))  # None: no gradients to scale
            return
        if max_norm is not None:
            self.clip_gradients(max_norm, grad_norm)
        optimizer.step()

    def clip_coefficient(self, max_norm: float, grad_norm: Optional[Tensor] = None) -> Optional[Tensor]:
        """What the master gradients are multiplied by to bring their global norm to at most
        `max_norm` (torch's clip_grad_norm_ rule, SAELens' SAETrainer's step: max_norm / (norm +
        1e-6), at most 1), a 0-d tensor on the device (no host sync); None without gradients.
        `grad_norm`: the global norm when the step's finiteness check already computed it from
        these gradients. Sharded: the norm of the whole SAE's gradient (the shards' squares summed
        over the ranks; b_dec's gradient is the same on every rank and counted once)."""
        named = [(name, p.grad) for name, p in self.master.named_parameters() if p.grad is not None]
        if not named:
            return None
        if self.sharded:
            squares = torch.stack([g.float().pow(2).sum() for _, g in named])
            is_sharded = torch.tensor([name != "b_dec" for name, _ in named], device=squares.device)
            local = squares[is_sharded].sum()
            torch.distributed.all_reduce(local)
            grad_norm = (local + squares[~is_sharded].sum()).sqrt()
        elif grad_norm is None:
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g for _, g in named])), 2)
        return (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)

    def clip_gradients(self, max_norm: float, grad_norm: Optional[Tensor] = None) -> None:
        """Scale the master gradients by `clip_coefficient` (their global norm at most `max_norm`),
        on the device, no host sync."""
        coef = self.clip_coefficient(max_norm, grad_norm)
        if coef is None:
            return
        grads = [p.grad for p in self.master.parameters() if p.grad is not None]
        if grads[0].device.type == "cpu":
            # torch 2.13's CPU _foreach_mul_ by a 0-dim tensor takes a slow path: 12 ms for 2M
            # floats where per-tensor mul_ takes 0.5 ms (clip_grad_norm_ uses it: +10% a step).
            for g in grads:
                g.mul_(coef.to(g.dtype))
        else:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
