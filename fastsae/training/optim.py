"""Adam without parameter-sized temporaries.

`torch.optim.Adam` on CPU allocates temporaries the size of each parameter in its step (the
square root and the division of the second moment; its fused CPU kernel too). For an SAE those
parameters are the two [d_sae, d_in] matrices, so the step's temporaries outweigh everything the
sparse forward and backward allocate: at 2048 x 768 -> 16384 the default step adds ~140 MiB above
the forward + backward's ~100 MiB (benchmarks/bench_cpp_train_step.py). This Adam computes
exactly torch's update (the same operations in the same order, so the same bits as
`torch.optim.Adam(foreach=False)`), a cache-sized chunk at a time, in place.

It is a `torch.optim.Adam` (same param groups, same state keys: `step`, `exp_avg`,
`exp_avg_sq`), so its state_dict loads into torch's Adam and back.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

# Elements per chunk: 1 MiB of fp32 on CPU (the chunk's four tensors stay in L2 between the
# update's passes); on GPUs, large chunks (each chunk costs a few kernel launches).
_CHUNK_ELEMENTS = {"cpu": 1 << 18}
_DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _step_dtype() -> torch.dtype:
    """torch.optim.Adam's dtype for the step count (float64 when that is the default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _flat_in_memory_order(t: Tensor) -> Tensor | None:
    """A 1-D view of t's elements in memory order, or None if t is not dense (e.g. a strided slice)."""
    order = sorted(range(t.ndim), key=lambda d: t.stride(d), reverse=True)
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


def _chunks(tensors: list[Tensor], chunk: int) -> Iterator[list[Tensor]]:
    """Matching chunks of same-layout tensors; the whole tensors when their layouts differ."""
    if len({t.stride() for t in tensors}) == 1:
        flat = [_flat_in_memory_order(t) for t in tensors]
        if all(f is not None for f in flat):
            n = flat[0].numel()
            for start in range(0, n, chunk):
                yield [f[start : start + chunk] for f in flat]
            return
    yield tensors


class Adam(torch.optim.Adam):
    """torch.optim.Adam's update (no weight decay, amsgrad or maximize), computed in place a chunk
    at a time so the step allocates nothing parameter-sized."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 **unsupported):
        if unsupported:
            raise ValueError(
                f"fastsae.training.optim.Adam: expected only lr, betas and eps, got {sorted(unsupported)} "
                "(weight decay, amsgrad, maximize, foreach/fused/capturable are torch.optim.Adam's)"
            )
        if isinstance(lr, Tensor):
            raise ValueError("lr: expected a Python number, got a tensor")
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=False)

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Tensor | None = None):
        """The update; `grad_scale` (a 0-d tensor, e.g. gradient clipping's coefficient) first
        multiplies each gradient in place, a chunk at a time just before the chunk's update, so
        scaling costs no pass of its own over the gradients (the same bits as scaling them first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is checked before any is updated (a refused step changes nothing).
        for group in self.param_groups:
            if group["weight_decay"] or group["amsgrad"] or group["maximize"]:
                raise ValueError("fastsae.training.optim.Adam: weight_decay, amsgrad and maximize are not supported")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("fastsae.training.optim.Adam: sparse gradients are not supported")
                state = self.state[p]
                if not state:
                    # As torch.optim.Adam creates them (so state dicts are interchangeable).
                    state["step"] = torch.tensor(0.0, dtype=_step_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                step_size = lr / (1 - beta1**step)
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                chunk = _CHUNK_ELEMENTS.get(p.device.type, _DEFAULT_CHUNK_ELEMENTS)
                scale = None if grad_scale is None else grad_scale.to(p.grad.dtype)
                for param, grad, exp_avg, exp_avg_sq in _chunks([p, p.grad, state["exp_avg"], state["exp_avg_sq"]], chunk):
                    if scale is not None:
                        grad.mul_(scale)
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                    param.addcdiv_(exp_avg, denom, value=-step_size)
        return loss


def make_adam(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              device: torch.device | str = "cpu", capturable: bool = False) -> torch.optim.Adam:
    """The Adam a training step should use on `device`.

    CUDA: torch's fused Adam (one kernel for all parameters; on an H200 the whole bf16 TopK step
    was faster with it than with the chunked Adam at the same peak memory: kernels/NOTES.md). With `capturable`, its
    step and learning rate live on the device (lr as a tensor: set it with `set_lr`), so the step
    can be captured in a CUDA graph.
    Elsewhere: the chunked in-place `Adam` above (no parameter-sized temporaries on the CPU).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if capturable:
            lr = torch.tensor(float(lr), dtype=torch.float32, device=device)
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True, capturable=capturable)
    if capturable:
        raise ValueError(f"capturable: CUDA graphs need a CUDA device, got {device}")
    return Adam(params, lr=lr, betas=betas, eps=eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; in place when it is a device tensor (a captured step reads it)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
