"""Checkpoint formats: each module reads (and some write) one library's files and builds an `SAE`;
formats know nothing of kernels.

- `saelens`: SAELens folders (cfg.json + sae_weights.safetensors), v6 and the older flat cfg.json.
- `sparsify`: EleutherAI sparsify folders (cfg.json + sae.safetensors); a run folder holding one
  sub-folder per hook point loads as a dict {hookpoint: SAE}.
- `dictionary_learning`: ae.pt (+ config.json).
- `openai`: OpenAI sparse_autoencoder .pt state dicts.
- `gemmascope`: Gemma Scope params.npz.
- `circuit_tracer`: circuit-tracer's per-layer transcoder sets (config.yaml + layer_{i}.safetensors),
  loaded as {layer: SAE}.
- a `fastsae train` run folder (out/checkpoints/step_N/...) reads as its newest complete
  checkpoint, which is a SAELens folder.

`load(path)` detects the format; `save(sae, path, to=...)` writes SAELens (the default), sparsify or
(a dict {layer: SAE} of transcoders) circuit-tracer;
`convert(src, dst, to=...)` does both. Every loaded SAE is in eval mode on the CPU unless a device
is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from fastsae import runs
from fastsae import sae as sae_module
from fastsae.formats import circuit_tracer, dictionary_learning, gemmascope, openai, saelens, sparsify
from fastsae.formats._common import read_json, read_torch

FORMATS = ("saelens", "sparsify", "dictionary_learning", "openai", "gemma_scope", "circuit_tracer")
SAVE_FORMATS = ("saelens", "sparsify", "circuit_tracer", "dictionary_learning")


def detect(path: Union[str, Path]) -> str:
    """The format of a checkpoint: one of FORMATS, "sparsify_run" for a sparsify run folder, or
    "fastsae_run" for a `fastsae train` run folder (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name == saelens.WEIGHTS_FILENAME or path.name == sparsify.WEIGHTS_FILENAME:
            return detect(path.parent)
        if path.suffix == ".npz":
            return "gemma_scope"
        if circuit_tracer.detect(path):
            return "circuit_tracer"
        if path.name == dictionary_learning.WEIGHTS_FILENAME:
            return "dictionary_learning"
        if path.suffix in (".pt", ".pth"):
            state = read_torch(path)
            if openai.looks_like(state):
                return "openai"
            if dictionary_learning.looks_like(state) or (isinstance(state, dict) and "ae" in state):
                return "dictionary_learning"
            keys = sorted(state)[:12] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path}: neither an OpenAI sparse_autoencoder nor a dictionary_learning state dict ({keys})")
        raise ValueError(f"{path}: not a checkpoint fastsae reads (a folder, .pt, .npz or .safetensors file)")
    if saelens.detect(path):
        return "saelens"
    if sparsify.detect(path):
        return "sparsify"
    if dictionary_learning.detect(path):
        return "dictionary_learning"
    if gemmascope.detect(path):
        return "gemma_scope"
    if circuit_tracer.detect(path):
        return "circuit_tracer"
    if (path / saelens.CFG_FILENAME).is_file():
        # A cfg.json without weights: the loader of whichever library wrote it says what is missing.
        return "saelens" if "d_sae" in read_json(path / saelens.CFG_FILENAME) else "sparsify"
    if sparsify.is_run_folder(path):
        return "sparsify_run"
    if _training_run_checkpoint(path) is not None:
        return "fastsae_run"
    raise FileNotFoundError(
        f"{path}: not a checkpoint fastsae can read: expected {saelens.CFG_FILENAME} + {saelens.WEIGHTS_FILENAME} "
        f"(SAELens), {sparsify.CFG_FILENAME} + {sparsify.WEIGHTS_FILENAME} (sparsify, or sub-folders of them), "
        f"{dictionary_learning.WEIGHTS_FILENAME} (dictionary_learning), {gemmascope.WEIGHTS_FILENAME} (Gemma Scope), "
        f"{circuit_tracer.CONFIG_FILENAME} (a circuit-tracer transcoder set), "
        "an OpenAI .pt file, or a fastsae train run folder (checkpoints/step_N/)"
    )


def load(path: Union[str, Path], device=None, dtype=None):
    """Load a checkpoint, detecting its format: an `SAE`, {hookpoint: SAE} for a sparsify run
    folder, or {layer: SAE} for a circuit-tracer transcoder set. On the CPU unless `device` is given; `dtype` overrides the file's."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth") and path.name != dictionary_learning.WEIGHTS_FILENAME:
        return _load_pt(path, device, dtype)  # read once, then look at its keys
    fmt = detect(path)
    if path.is_file() and fmt in ("saelens", "sparsify"):
        path = path.parent
    if fmt == "saelens":
        return saelens.load(path, device=device, dtype=dtype)
    if fmt == "sparsify":
        return sparsify.load(path, device=device, dtype=dtype)
    if fmt == "sparsify_run":
        return sparsify.load_run(path, device=device, dtype=dtype)
    if fmt == "fastsae_run":
        return saelens.load(_training_run_checkpoint(path), device=device, dtype=dtype)
    if fmt == "dictionary_learning":
        return dictionary_learning.load(path, device=device, dtype=dtype)
    if fmt == "openai":
        return openai.load(path, device=device, dtype=dtype)
    if fmt == "circuit_tracer":
        return circuit_tracer.load(path, device=device, dtype=dtype)
    return gemmascope.load(path, device=device, dtype=dtype)


def _training_run_checkpoint(path: Path):
    """The newest complete checkpoint (a SAELens folder) of a `fastsae train` run folder, or None."""
    return runs.latest_checkpoint(path)


def _load_pt(path: Path, device, dtype, **openai_options):
    state = read_torch(path)
    if openai.looks_like(state):
        return openai.from_state_dict(state, path, device=device, dtype=dtype, **openai_options)
    if dictionary_learning.looks_like(state) or (isinstance(state, dict) and "ae" in state):
        config_path = path.parent / dictionary_learning.CONFIG_FILENAME
        config = read_json(config_path) if config_path.is_file() else None
        return dictionary_learning.from_state_dict(state, path, config, device=device, dtype=dtype)
    keys = sorted(state)[:12] if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{path}: neither an OpenAI sparse_autoencoder nor a dictionary_learning state dict ({keys})")


def save(sae, path: Union[str, Path], to: str = "saelens") -> Path:
    """Write an SAE (or {hookpoint: SAE}, one sub-folder each) as SAELens (default) or sparsify, or
    transcoders {layer: SAE} as a circuit-tracer set (its hooks: those the SAEs were loaded with;
    `circuit_tracer.save` takes them)."""
    if to not in SAVE_FORMATS:
        raise ValueError(f"to: expected one of {SAVE_FORMATS}, got {to!r}")
    path = Path(path)
    if to == "circuit_tracer":
        return circuit_tracer.save(sae if isinstance(sae, dict) else {0: sae}, path)
    if to == "dictionary_learning":
        if isinstance(sae, dict):  # one trainer folder per SAE, as dictionary_learning's sweeps write them
            for name, one in sae.items():
                dictionary_learning.save(one, path / name)
            return path
        return dictionary_learning.save(sae, path)
    if isinstance(sae, dict):
        if to == "sparsify":
            return sparsify.save_run(sae, path)
        for name, one in sae.items():
            saelens.save(one, path / name)
        return path
    return saelens.save(sae, path) if to == "saelens" else sparsify.save(sae, path)


def convert(src: Union[str, Path], dst: Union[str, Path], to: str = "saelens"):
    """Read `src` in any format fastsae reads and write it to `dst` as `to`; returns what was loaded.
    An OpenAI TopK autoencoder (layer-normed inputs) converts to SAELens' normalize_activations
    "layer_norm", which is the same normalisation."""
    if to not in SAVE_FORMATS:
        raise ValueError(f"to: expected one of {SAVE_FORMATS}, got {to!r}")
    src = Path(src)
    if src.is_file() and src.suffix in (".pt", ".pth") and src.name != dictionary_learning.WEIGHTS_FILENAME:
        sae = _load_pt(src, None, None, external_layer_norm=(to == "saelens"))
    else:
        sae = load(src)
    save(sae, dst, to=to)
    return sae


# SAE.save / SAE.load, SAE.from_saelens / SAE.to_saelens, SAE.from_sparsify / SAE.to_sparsify
sae_module.install_file_formats(
    save=saelens.save,
    load=load,
    from_saelens=saelens.from_saelens_object,
    to_saelens=saelens.to_saelens_object,
    from_sparsify=sparsify.from_sparsify_object,
    to_sparsify=sparsify.to_sparsify_object,
)
