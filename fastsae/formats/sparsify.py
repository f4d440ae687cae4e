"""EleutherAI sparsify folders: cfg.json + sae.safetensors, one folder per hook point.

Tensors: encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
sparsify encodes top-k of relu((x - b_dec) @ encoder.weight.T + encoder.bias) and decodes
acts @ W_dec + b_dec. It applies the ReLU before the top-k, fastsae (like SAELens and OpenAI)
after: the selected values are the same (relu is monotonic and keeps every positive value), and
where a row has fewer than k positive pre-activations the extra picks are zeros either way, so
activations and reconstructions agree. Only the indices of those zero-valued picks may differ.

cfg.json options, and what fastsae does with them:
- `k`, `num_latents` (0: d_in * `expansion_factor`), `d_in`: the SAE's shape.
- `normalize_decoder`: a training constraint (unit-norm decoder rows); kept as
  decoder_norm="unit_norm" (or "none"), it does not change what a loaded SAE computes.
- `multi_topk`: a training loss (an extra 4k-latent reconstruction); inference uses k as sparsify's
  encode does.
- `transcode`: a transcoder (its target another activation of the same width, no b_dec on the
  input): loads with d_out = d_in and apply_b_dec_to_input=False; `skip_connection`: W_skip
  [d_in, d_in], output += x @ W_skip.T (skip_connection=True). fastsae transcoders save with them
  where sparsify can hold them (d_out = d_in, TopK).
- `activation: "groupmax"` and `signed` (top-k by |pre|, no ReLU) compute something fastsae's SAE
  does not: they are refused with an error naming the file. Unknown keys are ignored, as sparsify does.
Live objects (no files): `from_sparsify_object(sc)` / `to_sparsify_object(sae)`, behind
`fastsae.SAE.from_sparsify` / `sae.to_sparsify()`: the same tensors (copied, bit for bit) and the
same SparseCoderConfig back (its fields ride in the SAE's metadata["sparsify_cfg"]).
A run folder (one sub-folder per hook point, as sparsify's trainer writes) loads as a dict
{hookpoint: SAE} in natural order; sub-folders without cfg.json are skipped (e.g. `best/`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

import torch

from fastsae import architectures
from fastsae.config import SAEConfig
from fastsae.formats._common import (
    build_sae,
    fastsae_version,
    read_json,
    read_safetensors,
    sae_tensors,
    write_json,
    write_safetensors,
)

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
_TENSOR_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
_SKIP = "W_skip"
_DEFAULT_ACTIVATION = "topk"  # sparsify's, for a cfg.json without `activation`


def _activations() -> list[str]:
    """The sparsify activations fastsae computes (each architecture's `sparsify_activation`)."""
    return sorted(a for a in (architectures.get(name).sparsify_activation for name in architectures.names()) if a)


def detect(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS_FILENAME).exists()


def hookpoint_folders(path: Path) -> list[Path]:
    """Sub-folders of a run folder that hold a sparse coder (a cfg.json), in natural order."""
    if not path.is_dir():
        return []
    found = [p for p in path.iterdir() if p.is_dir() and (p / CFG_FILENAME).is_file()]
    return sorted(found, key=lambda p: _natural_key(p.name))


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and not (path / CFG_FILENAME).exists() and bool(hookpoint_folders(path))


def _natural_key(name: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _int(cfg: dict, key: str, cfg_path: Path, default=None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{cfg_path}: {key}: expected a non-negative integer, got {value!r}")
    return value


def _config(raw: dict, cfg_path: Path) -> SAEConfig:
    refuse = {"signed": "signed SAEs select top-k by |pre-activation| with no ReLU"}
    for key, what in refuse.items():
        if raw.get(key):
            raise ValueError(f"{cfg_path}: {key}=true: {what}; fastsae's SAE does not compute that")
    activation = raw.get("activation", _DEFAULT_ACTIVATION)
    arch = architectures.by_sparsify_activation(activation)
    if arch is None:
        known = " and ".join(repr(a) for a in _activations())
        raise ValueError(f"{cfg_path}: activation {activation!r}: fastsae computes sparsify's {known} only")
    if "d_in" not in raw:
        raise ValueError(f"{cfg_path}: missing 'd_in'")
    d_in = _int(raw, "d_in", cfg_path)
    d_sae = _int(raw, "num_latents", cfg_path, 0) or d_in * _int(raw, "expansion_factor", cfg_path, 32)
    k = _int(raw, "k", cfg_path, 32)
    transcode = bool(raw.get("transcode", False))
    try:
        return SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            d_out=d_in if transcode else None,
            skip_connection=bool(raw.get("skip_connection", False)),
            architecture=arch.name,
            k=k,
            apply_b_dec_to_input=not transcode,
            decoder_norm="unit_norm" if raw.get("normalize_decoder", True) else "none",
            metadata={"source_format": "sparsify", "sparsify_cfg": dict(raw)},
        )
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: {exc}") from exc


def load(path: Union[str, Path], device=None, dtype=None):
    path = Path(path)
    cfg_path = path / CFG_FILENAME
    raw = read_json(cfg_path, f" (a sparsify folder holds {CFG_FILENAME} and {WEIGHTS_FILENAME})")
    cfg = _config(raw, cfg_path)
    cfg.metadata.setdefault("hook_name", path.name)
    weights_path = path / WEIGHTS_FILENAME
    raw_tensors = read_safetensors(weights_path)
    names = (*_TENSOR_NAMES, _SKIP) if cfg.skip_connection else _TENSOR_NAMES
    if _SKIP in raw_tensors and not cfg.skip_connection:
        raise ValueError(f"{weights_path}: holds W_skip (a skip connection) but {cfg_path} says skip_connection is false")
    missing = [name for name in names if name not in raw_tensors]
    if missing:
        hint = " (an encoder-only checkpoint cannot reconstruct)" if missing == ["W_dec"] else ""
        raise ValueError(f"{weights_path}: missing tensor {missing[0]!r}{hint} (has {sorted(raw_tensors)})")
    extra = sorted(set(raw_tensors) - set(names))
    if extra:
        raise ValueError(f"{weights_path}: unexpected tensors {extra} (expected {list(names)})")
    encoder = raw_tensors["encoder.weight"]
    expected = (cfg.d_sae, cfg.d_in)
    if tuple(encoder.shape) != expected:
        raise ValueError(
            f"{weights_path}: tensor 'encoder.weight' has shape {tuple(encoder.shape)}, expected {expected} "
            f"from {cfg_path} (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
        )
    # sparsify builds the module in the dtype of the file's tensors.
    cfg.dtype = str(encoder.dtype).removeprefix("torch.")
    tensors = {
        "W_enc": encoder.t(),
        "b_enc": raw_tensors["encoder.bias"],
        "W_dec": raw_tensors["W_dec"],
        "b_dec": raw_tensors["b_dec"],
    }
    if cfg.skip_connection:
        tensors["W_skip"] = raw_tensors["W_skip"]
    why = f" from {cfg_path} (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
    return build_sae(cfg, tensors, weights_path, device=device, dtype=dtype, why=why)


def load_run(path: Union[str, Path], device=None, dtype=None) -> dict:
    """A sparsify run folder as {hookpoint: SAE}; every hook point is read before any is returned."""
    path = Path(path)
    folders = hookpoint_folders(path)
    if not folders:
        raise FileNotFoundError(f"{path}: no sub-folder with {CFG_FILENAME} and {WEIGHTS_FILENAME} (a sparsify run folder)")
    return {folder.name: load(folder, device=device, dtype=dtype) for folder in folders}


def _check_savable(sae, path: Path) -> None:
    if not sae.arch.sparsify_activation:
        raise ValueError(
            f"{path}: sparsify stores TopK SAEs; this SAE is {sae.architecture!r} (save it as SAELens instead)"
        )
    if sae.cfg.metadata.get("input_layer_norm"):
        raise ValueError(f"{path}: this SAE's inputs are layer-normalised outside it, which a sparsify cfg cannot say")
    if sae.cfg.d_out is not None:  # a transcoder: sparsify's `transcode`
        if sae.cfg.d_out != sae.d_in:
            raise ValueError(f"{path}: sparsify's transcoders write an output as wide as their input; this one has "
                             f"d_out={sae.cfg.d_out} != d_in={sae.d_in}")
        if sae.cfg.apply_b_dec_to_input:
            raise ValueError(f"{path}: sparsify's transcoders do not subtract b_dec from their input; this one has "
                             "apply_b_dec_to_input=True")
    elif not sae.cfg.apply_b_dec_to_input:
        raise ValueError(f"{path}: sparsify SAEs subtract b_dec from their input; this SAE has apply_b_dec_to_input=False")


def save(sae, path: Union[str, Path]) -> Path:
    """Write one sparse coder folder. Decoder-norm rescaling is folded in (same outputs to rounding)."""
    path = Path(path)
    _check_savable(sae, path)
    path.mkdir(parents=True, exist_ok=True)
    t = sae_tensors(sae, fold_decoder_norm=True)
    tensors = {"encoder.weight": t["W_enc"].t().contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if sae.cfg.skip_connection:
        tensors["W_skip"] = t["W_skip"]
    cfg = {
        "activation": sae.arch.sparsify_activation,
        "expansion_factor": max(1, sae.d_sae // sae.d_in),
        "normalize_decoder": sae.cfg.decoder_norm == "unit_norm",
        "num_latents": sae.d_sae,
        "k": sae.cfg.k,
        "multi_topk": bool(sae.cfg.metadata.get("sparsify_cfg", {}).get("multi_topk", False)),
        "skip_connection": sae.cfg.skip_connection,
        "transcode": sae.cfg.d_out is not None,
        "d_in": sae.d_in,
    }
    write_safetensors(path / WEIGHTS_FILENAME, tensors, metadata={"fastsae_version": fastsae_version()})
    write_json(path / CFG_FILENAME, cfg)
    return path


def save_run(saes: dict, path: Union[str, Path]) -> Path:
    """Write {hookpoint: SAE} as a sparsify run folder (one sub-folder per hook point)."""
    path = Path(path)
    for name, sae in saes.items():
        _check_savable(sae, path / name)
    for name, sae in saes.items():
        save(sae, path / name)
    return path


# ------------------------------------------------------------ live objects


def from_sparsify_object(sc, device=None, dtype=None):
    """An `SAE` (eval mode) from a live sparsify `SparseCoder`, its tensors copied exactly, on the
    coder's device unless `device` says otherwise (transcode and skip_connection: a transcoder).
    Options fastsae's SAE does not compute (groupmax, signed) and encoder-only coders raise a
    ValueError."""
    cfg_obj = getattr(sc, "cfg", None)
    if cfg_obj is None or not hasattr(cfg_obj, "to_dict") or not hasattr(sc, "encoder") or not hasattr(sc, "d_in"):
        raise ValueError(f"from_sparsify: expected a sparsify SparseCoder (with .cfg, .encoder, .d_in), got {type(sc).__name__}")
    source = Path(f"the sparsify {type(sc).__name__}")
    if getattr(sc, "W_dec", None) is None:
        raise ValueError(f"{source}: built with decoder=False (an encoder only cannot reconstruct)")
    raw = {**cfg_obj.to_dict(), "d_in": sc.d_in}
    cfg = _config({**raw, "num_latents": sc.num_latents}, source)
    cfg.metadata["sparsify_cfg"] = raw  # num_latents as the coder's config says it (0: expansion_factor)
    cfg.dtype = str(sc.encoder.weight.dtype).removeprefix("torch.")
    tensors = {
        "W_enc": sc.encoder.weight.detach().t(),
        "b_enc": sc.encoder.bias.detach(),
        "W_dec": sc.W_dec.detach(),
        "b_dec": sc.b_dec.detach(),
    }
    if cfg.skip_connection:
        tensors["W_skip"] = sc.W_skip.detach()
    why = f" from {source} (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
    return build_sae(cfg, tensors, source, device=sc.encoder.weight.device if device is None else device, dtype=dtype, why=why)


def to_sparsify_object(sae):
    """A live sparsify `SparseCoder` computing what `sae` computes (TopK SAEs that subtract b_dec
    from their input), on its device and dtype, its tensors copied (exactly, unless the SAE
    rescales activations by decoder norms: those are folded in, the same outputs to rounding). A
    config read from sparsify (metadata["sparsify_cfg"]) comes back as it was."""
    from sparsify import SparseCoder, SparseCoderConfig

    _check_savable(sae, Path("to_sparsify"))
    prev = sae.cfg.metadata.get("sparsify_cfg", {})
    expansion = prev.get("expansion_factor", max(1, sae.d_sae // sae.d_in))
    num_latents = prev.get("num_latents", sae.d_sae)
    if (num_latents or sae.d_in * expansion) != sae.d_sae:
        num_latents = sae.d_sae
    cfg = SparseCoderConfig(
        activation=sae.arch.sparsify_activation,
        expansion_factor=expansion,
        normalize_decoder=sae.cfg.decoder_norm == "unit_norm",
        num_latents=num_latents,
        k=sae.cfg.k,
        multi_topk=bool(prev.get("multi_topk", False)),
        skip_connection=sae.cfg.skip_connection,
        transcode=sae.cfg.d_out is not None,
    )
    t = sae_tensors(sae, fold_decoder_norm=True)
    # Built on the meta device, then filled: no random init, no decoder normalisation of it.
    sc = SparseCoder(sae.d_in, cfg, device="meta", dtype=sae.dtype).to_empty(device=sae.device)
    with torch.no_grad():
        sc.encoder.weight.copy_(t["W_enc"].t())
        sc.encoder.bias.copy_(t["b_enc"])
        sc.W_dec.copy_(t["W_dec"])
        sc.b_dec.copy_(t["b_dec"])
        if sae.cfg.skip_connection:
            sc.W_skip.copy_(t["W_skip"])
    return sc
