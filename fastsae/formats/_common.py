"""What every format shares: reading files with errors that name them, atomic writes, and
`build_sae`, which checks a complete set of tensors before it builds anything (so nothing
loads half-way)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastsae import architectures
from fastsae.config import SAEConfig
from fastsae.sae import SAE


def parameter_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """The tensors an SAE of this config is built from, under SAELens' names and shapes (the
    architecture's `tensor_shapes`; BatchTopK's inference threshold is the scalar `topk_threshold`;
    a transcoder's W_dec [d_sae, d_out], b_dec [d_out] and W_skip [d_out, d_in])."""
    return architectures.parameter_shapes(cfg)


def check_tensors(
    tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: Path, why: str = ""
) -> None:
    """Exactly the expected names (none missing, none left over), each with its shape and a
    floating dtype; errors name `source`. `why` says where the shapes came from."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise ValueError(f"{source}: missing tensor {name!r} (has {sorted(tensors)})")
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{source}: {name!r} is a {type(t).__name__}, expected a tensor")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}{why}")
        if not t.is_floating_point():
            raise ValueError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise ValueError(f"{source}: unexpected tensors {extra} for this architecture (expected {sorted(shapes)})")


def build_sae(
    cfg: SAEConfig,
    tensors: dict[str, torch.Tensor],
    source: Path,
    *,
    device=None,
    dtype=None,
    why: str = "",
):
    """An `SAE` (in eval mode) from `cfg` and its tensors under SAELens' names and shapes
    (`parameter_shapes`). Every tensor is checked before anything is built. Loads go to the CPU
    unless `device` says otherwise (the device in a file is where it was trained, not where it
    must run); `dtype` overrides the file's."""
    check_tensors(tensors, parameter_shapes(cfg), source, why)
    cfg = dataclasses.replace(cfg, metadata=dict(cfg.metadata))
    if dtype is not None:
        cfg.dtype = str(dtype).removeprefix("torch.")
    target = torch.device("cpu" if device is None else device)
    # Build on the meta device, then fill, so no random init is spent on a large SAE.
    sae = SAE(dataclasses.replace(cfg, device="meta"))
    sae.cfg.device = str(target)
    sae.to_empty(device=target)
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(sae, name).copy_(t)  # parameters, and buffers such as BatchTopK's float64 threshold
        for name, buffer in sae.named_buffers():
            if name not in tensors:  # a training count no file holds (BatchTopK's batches seen) starts afresh
                buffer.zero_()
    return sae.eval()


def sae_tensors(sae, fold_decoder_norm: bool = False) -> dict[str, torch.Tensor]:
    """The SAE's parameters as detached contiguous copies under SAELens' names (`topk_threshold`
    included for BatchTopK). With `fold_decoder_norm` and an SAE that rescales activations by
    decoder norms, the norms are folded in (W_enc, b_enc times the norm, W_dec rows to unit norm),
    which computes the same (to rounding) with or without the rescaling."""
    tensors = {name: p.detach().clone() for name, p in sae.named_parameters()}
    for name in architectures.parameter_shapes(sae.cfg):
        if name not in tensors:  # a buffer the architecture saves (BatchTopK's topk_threshold)
            tensors[name] = getattr(sae, name).detach().clone()
    if fold_decoder_norm and sae.cfg.rescale_acts_by_decoder_norm:
        norm = tensors["W_dec"].norm(dim=1)
        tensors["W_enc"] = tensors["W_enc"] * norm
        tensors["b_enc"] = tensors["b_enc"] * norm
        tensors["W_dec"] = tensors["W_dec"] / norm[:, None]
    return {name: t.contiguous() for name, t in tensors.items()}


# ------------------------------------------------------------ files


def expect_file(path: Path, what: str = "") -> None:
    """FileNotFoundError when nothing is there; ValueError when something that is not a file is."""
    if path.is_file():
        return
    if path.exists():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ValueError(f"{path}: expected a file{what}, got {kind}")
    raise FileNotFoundError(f"{path}: missing{what}")


def read_json(path: Path, what: str = "") -> dict:
    expect_file(path, what)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    expect_file(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: cannot read it as safetensors: {exc}") from exc


def read_torch(path: Path) -> Any:
    """A .pt file's contents, through torch.load(weights_only=True): tensors and plain containers
    only, never arbitrary pickled code."""
    expect_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise ValueError(
            f"{path}: cannot read it with torch.load(weights_only=True): {_torch_load_reason(exc)} "
            "(fastsae reads only tensors and plain containers from .pt files, never pickled code)"
        ) from None


def _torch_load_reason(exc: Exception) -> str:
    """torch.load's reason without its advice to retry with weights_only=False: unsafe for a
    file that did not load as plain tensors, and not something fastsae does."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if found:
        return found.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return (lines[0] if lines else type(exc).__name__).rstrip(".")


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename over `target`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(target: Path, data: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    atomic_write(target, write)


def write_safetensors(target: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def fastsae_version() -> str:
    from fastsae.version import __version__

    return __version__
