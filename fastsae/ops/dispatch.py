"""The one place that knows which backends exist and picks one.

A backend is a module exposing the op functions of `fastsae.reference` with the same
signatures: topk_encode, threshold_encode, topk_encode_backward, sparse_decode,
sparse_decode_backward.
Adding a backend is one module plus one `_BACKENDS` line here.

The choice comes from, in order: the innermost `use_backend(...)` context, the FASTSAE_BACKEND
environment variable, then "auto". "auto" takes the first backend in the device's preference
list that is registered and loads; a backend that fails to load is reported by one warning and
skipped, so the torch path always remains.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator, Optional

import torch

from fastsae.ops import measured

BACKEND_NAMES = ("torch", "triton", "cpp", "cuda")
ENV_VAR = "FASTSAE_BACKEND"


@dataclass(frozen=True)
class BackendSpec:
    module: str
    devices: frozenset[str]


# Registered backends: the module of each, and the device types its tensors may be on.
_BACKENDS: dict[str, BackendSpec] = {
    "torch": BackendSpec("fastsae.reference", frozenset({"cpu", "cuda", "mps", "xpu", "meta"})),
    "triton": BackendSpec("fastsae.ops.backend_triton", frozenset({"cuda", "cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else {"cuda"})),
    "cpp": BackendSpec("fastsae.ops.backend_cpp", frozenset({"cpu"})),
    "cuda": BackendSpec("fastsae.ops.backend_cuda", frozenset({"cuda"})),
}

# auto's order of preference per device type (fastest first); unregistered names are skipped.
# On CUDA the measured table (`fastsae.ops.measured.BACKEND_TABLE`) may move a backend ahead
# where it was measured faster by MIN_GAIN at the nearest width; FASTSAE_BACKEND=cuda or
# use_backend("cuda") selects cuda anywhere.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "torch"),
    "cpu": ("cpp", "torch"),
}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastsae_backend", default=None)
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"unknown fastsae backend {name!r}: expected one of {('auto',) + BACKEND_NAMES}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed ops on backend `name` ("auto", "torch", "triton", "cpp" or "cuda")."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def requested_backend() -> str:
    """The backend name in force: the context manager's, else FASTSAE_BACKEND's, else "auto"."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto")


def _load(name: str) -> ModuleType:
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        raise RuntimeError(_failed[name])
    spec = _BACKENDS.get(name)
    if spec is None:
        msg = f"fastsae backend {name!r} is not part of this build (available: {sorted(_BACKENDS)})"
        _failed[name] = msg
        raise RuntimeError(msg)
    try:
        module = importlib.import_module(spec.module)
    except Exception as exc:  # a missing compiler or package must not break the torch path
        msg = f"fastsae backend {name!r} could not be loaded: {type(exc).__name__}: {exc}"
        _failed[name] = msg
        raise RuntimeError(msg) from exc
    _loaded[name] = module
    return module


def available_backends(device_type: str = "cpu") -> list[str]:
    """The registered backends that load and can run on `device_type`."""
    names = []
    for name, spec in _BACKENDS.items():
        if device_type in spec.devices:
            try:
                _load(name)
            except RuntimeError:
                continue
            names.append(name)
    return names


_warned: set[str] = set()


def _loads(name: str) -> bool:
    try:
        _load(name)
        return True
    except RuntimeError:
        return False


def select(device: torch.device, d_in: Optional[int] = None) -> tuple[str, ModuleType]:
    """The (name, module) of the backend that runs ops on tensors of `device`. With the op's
    d_in, "auto" on CUDA consults the measured table (`fastsae.ops.measured`) first."""
    requested = requested_backend()
    if requested != "auto":
        spec = _BACKENDS.get(requested)
        if spec is not None and device.type not in spec.devices:
            raise ValueError(
                f"fastsae backend {requested!r} runs on {sorted(spec.devices)} tensors, got tensors on {device}"
            )
        return requested, _load(requested)
    order = _AUTO_ORDER.get(device.type, ("torch",))
    if d_in is not None and device.type == "cuda" and order[0] in _BACKENDS:
        measured_name = measured.preferred_backend(
            device.type, d_in, order[0], lambda n: n in _BACKENDS and device.type in _BACKENDS[n].devices and _loads(n),
            _device_name(device),
        )
        if measured_name != order[0]:
            order = (measured_name,) + tuple(n for n in order if n != measured_name)
    for name in order:
        if name not in _BACKENDS:
            continue
        try:
            return name, _load(name)
        except RuntimeError as exc:
            if name not in _warned:
                _warned.add(name)
                warnings.warn(f"{exc}; falling back to the next backend", RuntimeWarning, stacklevel=3)
    return "torch", _load("torch")


def backend(device: torch.device, d_in: Optional[int] = None) -> ModuleType:
    """The module of the backend `select` picks: what an op's real implementation calls."""
    return select(device, d_in)[1]


@functools.lru_cache(maxsize=None)
def _cuda_name(index: Optional[int]) -> Optional[str]:
    try:
        return torch.cuda.get_device_name(index)
    except Exception:  # no driver (tests on CPU)
        return None


def _device_name(device: torch.device) -> Optional[str]:
    return _cuda_name(device.index)
