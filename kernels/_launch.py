"""What every kernel module shares: launching through `wrap_triton`, registering ops, and the
few device facts the launchers' heuristics need.

Under TRITON_INTERPRET=1 (CI without a GPU) `@triton.jit` returns an interpreted function that
runs on CPU tensors. Such a kernel cannot be traced by torch.compile, so in that mode the ops are
plain (opaque) `custom_op`s whose fake implementation is the launcher with its launches skipped;
on a GPU they are `triton_op`s that torch.compile traces into.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

NAMESPACE = "fastsae_triton"


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, torch.Tensor) and (is_fake(t) or t.device.type == "meta")


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), traceable by torch.compile on a GPU."""
    if grid_size(grid) == 0:
        return
    if INTERPRET:
        # Shape propagation only (FakeTensor / meta): nothing to run.
        if any(_is_fake(a) for a in args) or any(_is_fake(a) for a in kwargs.values()):
            return
        kernel[grid](*args, **kwargs)
    else:
        wrap_triton(kernel)[grid](*args, **kwargs)


def launch_opaque(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) from inside an opaque op (never traced, never fake tensors)."""
    if grid_size(grid) > 0:
        kernel[grid](*args, **kwargs)


def grid_size(grid) -> int:
    size = 1
    for g in grid:
        size *= int(g)
    return size


def register(name: str, mutates_args: Iterable[str] = (), fake: Optional[Callable] = None) -> Callable:
    """Decorator: `fastsae_triton::<name>` backed by the decorated launcher.

    With `fake` (a launcher whose output shapes depend on the data, hence a host sync that cannot
    be traced), the op is an opaque `custom_op` everywhere, with `fake` as its meta
    implementation; such a launcher starts its kernels with `launch_opaque`."""

    def wrap(fn):
        qualname = f"{NAMESPACE}::{name}"
        if fake is not None:
            op = custom_op(qualname, fn, mutates_args=tuple(mutates_args))
            op.register_fake(fake)
            return op
        if INTERPRET:
            op = custom_op(qualname, fn, mutates_args=tuple(mutates_args))
            op.register_fake(fn)
            return op
        return triton_op(qualname, fn, mutates_args=tuple(mutates_args))

    return wrap


def empty(*size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer the launchers hand their kernels to fill. Every such allocation goes through here, so
    the tests can poison them all (tests/helpers/triton_backend.py) without replacing torch.empty itself,
    which torch.compile and the rest of torch also call."""
    return torch.empty(*size, dtype=dtype, device=device)


def contiguous(*tensors):
    """The kernels index rows as base + row * width: make every (optional) tensor dense."""
    return tuple(t.contiguous() if t is not None else None for t in tensors)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a nominal 1 off CUDA: the interpreter runs
    programs one after another, so extra programs only cost time there)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 inputs follow torch's own TF32 switch (full-precision
    results through three TF32 products unless the user allowed TF32); 16-bit inputs ignore it,
    and fp64 products are exact."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"
