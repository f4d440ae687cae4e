"""Gemma Scope's params.npz (Google DeepMind's JumpReLU SAEs for Gemma 2).

Arrays: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], threshold [d_sae]
(lower-case `w_enc` / `w_dec` are accepted, as SAELens does). Gemma Scope computes
    pre = x @ W_enc + b_enc;  acts = (pre > threshold) * relu(pre);  x_hat = acts @ W_dec + b_dec
with no b_dec subtracted from the input: jumprelu with apply_b_dec_to_input=False.
The arrays are taken as they are: SAELens additionally rescales the embedding-layer SAEs for
TransformerLens' hook_embed (which lacks Gemma's sqrt(d_model) embedding scale); fastsae does not,
so feed those SAEs the activations Gemma Scope trained them on.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Union

import numpy as np
import torch

from fastsae.config import SAEConfig
from fastsae.formats._common import build_sae, expect_file

WEIGHTS_FILENAME = "params.npz"
_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def detect(path: Path) -> bool:
    return (path.is_dir() and (path / WEIGHTS_FILENAME).exists()) or (path.is_file() and path.suffix == ".npz")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    expect_file(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{path}: cannot read it as a .npz archive: {exc}") from exc


def load(path: Union[str, Path], device=None, dtype=None):
    """A params.npz file, or a folder holding one."""
    path = Path(path)
    weights = path / WEIGHTS_FILENAME if path.is_dir() else path
    arrays = read_npz(weights)
    arrays = {("W_" + name[2:] if name.startswith("w_") else name): a for name, a in arrays.items()}
    for name in _NAMES:
        if name not in arrays:
            raise ValueError(f"{weights}: missing array {name!r} (has {sorted(arrays)})")
    extra = sorted(set(arrays) - set(_NAMES))
    if extra:
        raise ValueError(f"{weights}: unexpected arrays {extra} (a Gemma Scope SAE holds {list(_NAMES)})")
    for name, a in arrays.items():
        if a.dtype.kind != "f":
            raise ValueError(f"{weights}: array {name!r} has dtype {a.dtype}, expected floating point")
    if arrays["W_enc"].ndim != 2:
        raise ValueError(f"{weights}: array 'W_enc' has shape {arrays['W_enc'].shape}, expected [d_in, d_sae]")
    d_in, d_sae = (int(n) for n in arrays["W_enc"].shape)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        dtype=str(tensors["W_enc"].dtype).removeprefix("torch."),
        metadata={"source_format": "gemma_scope"},
    )
    return build_sae(cfg, tensors, weights, device=device, dtype=dtype, why=f" (W_enc gives d_in={d_in}, d_sae={d_sae})")
