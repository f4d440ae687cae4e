"""SAELens v6 folders: cfg.json + sae_weights.safetensors.

Tensors: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], and for JumpReLU
threshold [d_sae]. BatchTopK saves as JumpReLU with its global threshold in every slot, as SAELens
does, and SAEs that rescale activations by decoder norms save with the norms folded in (so the
file computes the same with or without the rescaling, in SAELens and here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastsae.config import SAEConfig

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


def detect(path: Path) -> bool:
    return path.is_dir() and ((path / CFG_FILENAME).exists() or (path / WEIGHTS_FILENAME).exists())


def _atomic_write(target: Path, write) -> None:
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


def state_dict_for_saving(sae) -> dict[str, torch.Tensor]:
    """The SAE's tensors under SAELens' names and shapes (contiguous, detached copies)."""
    W_enc = sae.W_enc.detach().clone()
    b_enc = sae.b_enc.detach().clone()
    W_dec = sae.W_dec.detach().clone()
    if sae.cfg.rescale_acts_by_decoder_norm:
        norm = W_dec.norm(dim=1)
        W_enc = W_enc * norm
        b_enc = b_enc * norm
        W_dec = W_dec / norm[:, None]
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": sae.b_dec.detach().clone()}
    if sae.architecture == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().clone()
    elif sae.architecture == "batchtopk":
        tensors["threshold"] = torch.full_like(b_enc, float(sae.topk_threshold))
    return {name: t.contiguous() for name, t in tensors.items()}


def save(sae, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_for_saving(sae)
    cfg = sae.cfg.to_dict()
    cfg["dtype"] = str(sae.dtype).removeprefix("torch.")
    cfg["device"] = str(sae.device)
    cfg.setdefault("metadata", {})["fastsae_version"] = _version()
    _atomic_write(path / WEIGHTS_FILENAME, lambda tmp: save_file(tensors, tmp))

    def write_cfg(tmp):
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)

    _atomic_write(path / CFG_FILENAME, write_cfg)
    return path


def _version() -> str:
    from fastsae import __version__

    return __version__


def read_cfg(path: Path) -> dict:
    cfg_path = path / CFG_FILENAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: missing (an SAELens folder holds {CFG_FILENAME} and {WEIGHTS_FILENAME})")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: cannot read it as JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def read_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    if not weights_path.exists():
        raise FileNotFoundError(f"{weights_path}: missing")
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{weights_path}: cannot read it as safetensors: {exc}") from exc


def load(path: Union[str, Path], device=None, dtype=None):
    from fastsae.sae import SAE

    path = Path(path)
    raw_cfg = read_cfg(path)
    cfg_path = path / CFG_FILENAME
    try:
        cfg = SAEConfig.from_dict(raw_cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path}: {exc}") from exc
    weights_path = path / WEIGHTS_FILENAME
    tensors = read_tensors(weights_path)

    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture in ("jumprelu", "batchtopk"):
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{weights_path}: missing tensor {name!r} (has {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{weights_path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"expected {shape} from {cfg_path} (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
            )

    if dtype is not None:
        cfg.dtype = str(dtype).removeprefix("torch.")
    if device is not None:
        cfg.device = str(device)
    # Build on the meta device, then fill, so no random init is wasted on a large SAE.
    target_device = torch.device(cfg.device)
    sae = SAE(dataclasses.replace(cfg, device="meta"))
    sae.cfg.device = str(target_device)
    sae.to_empty(device=target_device)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["W_enc"])
        sae.b_enc.copy_(tensors["b_enc"])
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_dec.copy_(tensors["b_dec"])
        if cfg.architecture == "jumprelu":
            sae.threshold.copy_(tensors["threshold"])
        elif cfg.architecture == "batchtopk":
            sae.topk_threshold.copy_(tensors["threshold"][0].to(torch.float64))
    return sae
