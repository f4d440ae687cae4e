"""circuit-tracer's per-layer transcoder sets (`transcoder_set`), which attribution graphs run on.

A set is a `config.yaml` naming `model_name`, `feature_input_hook` (e.g. "hook_resid_mid"),
`feature_output_hook` (e.g. "mlp.hook_out") and `transcoders`, a list of {id, layer, filepath},
one per layer 0..n-1. Each layer's file is safetensors with (circuit-tracer's SingleLayerTranscoder,
`to_safetensors`):
  W_enc [d_sae, d_model] (latent-major: pre = x @ W_enc.T + b_enc), b_enc [d_sae],
  W_dec [d_sae, d_model], b_dec [d_model], optional `activation_function.threshold` [d_sae]
  (JumpReLU: acts = pre * (pre > threshold); `threshold` is read too) and W_skip [d_model, d_model]
  (output += x @ W_skip.T). The input is never shifted by b_dec. Older circuit-tracer wrote W_dec
  as [d_model, d_sae]; it is read by its shape where d_sae != d_model.
A set loads as {layer: SAE}: relu (no threshold) or jumprelu transcoders with d_out = d_model and
apply_b_dec_to_input=False. circuit-tracer's JumpReLU has no ReLU, fastsae's has: the two agree
for thresholds >= 0, and a negative threshold is refused. `filepath`s are read relative to the
config's folder (an hf:// address: its file name there), as nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from fastsae.config import SAEConfig
from fastsae.formats._common import build_sae, expect_file, read_safetensors, sae_tensors, write_safetensors

CONFIG_FILENAME = "config.yaml"
THRESHOLD = "activation_function.threshold"  # circuit-tracer's key (its JumpReLU module's parameter)
_ARCHITECTURES = {False: "relu", True: "jumprelu"}  # by whether a layer has a threshold


def detect(path: Path) -> bool:
    return (path.is_dir() and (path / CONFIG_FILENAME).is_file()) or (path.is_file() and path.suffix in (".yaml", ".yml"))


def _read_config(path: Path) -> dict:
    expect_file(path, " (a circuit-tracer transcoder set holds config.yaml and layer_{i}.safetensors)")
    text = path.read_text()
    try:
        import yaml
    except ImportError:  # the files fastsae writes are JSON, which is YAML
        yaml = None
    try:
        config = yaml.safe_load(text) if yaml is not None else json.loads(text)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read it as YAML{'' if yaml else ' (PyYAML is not installed: JSON only)'}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("transcoders"), list) or not config["transcoders"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty list 'transcoders' (circuit-tracer's transcoder set)")
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(config.get(key), str):
            raise ValueError(f"{path}: missing {key!r} (the hook point the transcoders read from / write to)")
    return config


def _layer_file(folder: Path, filepath: str, config_path: Path) -> Path:
    if not isinstance(filepath, str) or not filepath:
        raise ValueError(f"{config_path}: a transcoder's 'filepath' must be a non-empty string, got {filepath!r}")
    if filepath.startswith("hf://"):
        candidates = [folder / Path(filepath.split("?")[0]).name]
    else:
        given = Path(filepath)
        candidates = [given if given.is_absolute() else folder / given, folder / given.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{config_path}: transcoder file {filepath!r} not found (looked for {', '.join(map(str, candidates))})")


def _layer_tensors(raw: dict, d_sae: int, d_model: int, source: Path) -> dict:
    """A layer file's tensors under fastsae's (SAELens') names and shapes."""
    known = {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip", THRESHOLD, "threshold"}
    extra = sorted(set(raw) - known)
    if extra:
        raise ValueError(f"{source}: unexpected tensors {extra} (expected W_enc, b_enc, W_dec, b_dec, optional {THRESHOLD}, W_skip)")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if name not in raw:
            raise ValueError(f"{source}: missing tensor {name!r} (has {sorted(raw)})")
    tensors = {"W_enc": raw["W_enc"], "b_enc": raw["b_enc"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    if tuple(tensors["W_enc"].shape) == (d_sae, d_model):
        tensors["W_enc"] = tensors["W_enc"].t()  # fastsae's W_enc is [d_in, d_sae]
    if tuple(tensors["W_dec"].shape) == (d_model, d_sae) and d_model != d_sae:
        tensors["W_dec"] = tensors["W_dec"].t()  # older circuit-tracer's layout
    threshold = raw.get(THRESHOLD, raw.get("threshold"))
    if threshold is not None:
        if threshold.numel() and bool((threshold < 0).any()):
            raise ValueError(
                f"{source}: a negative JumpReLU threshold (circuit-tracer's JumpReLU keeps negative values above it, "
                "fastsae's applies a ReLU first: they agree only for thresholds >= 0)"
            )
        tensors["threshold"] = threshold
    if "W_skip" in raw:
        tensors["W_skip"] = raw["W_skip"]
    return tensors


def load(path: Union[str, Path], device=None, dtype=None) -> dict:
    """A circuit-tracer transcoder set (its folder, or its config.yaml) as {layer: SAE}; every
    layer is read and checked before any is returned."""
    path = Path(path)
    config_path = path / CONFIG_FILENAME if path.is_dir() else path
    config = _read_config(config_path)
    saes = {}
    for entry in sorted(config["transcoders"], key=lambda e: e.get("layer", -1) if isinstance(e, dict) else -1):
        layer = entry.get("layer") if isinstance(entry, dict) else None
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ValueError(f"{config_path}: each transcoder needs a non-negative integer 'layer', got {entry!r}")
        if layer in saes:
            raise ValueError(f"{config_path}: two transcoders for layer {layer}")
        source = _layer_file(config_path.parent, entry.get("filepath"), config_path)
        raw = read_safetensors(source)
        if "b_enc" not in raw or "b_dec" not in raw:
            raise ValueError(f"{source}: missing tensor {'b_enc' if 'b_enc' not in raw else 'b_dec'!r} (has {sorted(raw)})")
        d_sae, d_model = raw["b_enc"].shape[0], raw["b_dec"].shape[0]
        tensors = _layer_tensors(raw, d_sae, d_model, source)
        metadata = {
            "source_format": "circuit_tracer",
            "model_name": config.get("model_name"),
            "hook_name": f"blocks.{layer}.{config['feature_input_hook']}",
            "hook_name_out": f"blocks.{layer}.{config['feature_output_hook']}",
            "circuit_tracer": {key: config[key] for key in ("feature_input_hook", "feature_output_hook")} | {"id": entry.get("id")},
        }
        try:
            cfg = SAEConfig(
                d_in=d_model, d_sae=d_sae, d_out=d_model, architecture=_ARCHITECTURES["threshold" in tensors],
                apply_b_dec_to_input=False, skip_connection="W_skip" in tensors,
                dtype=str(raw["b_enc"].dtype).removeprefix("torch."), metadata=metadata,
            )
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from exc
        saes[layer] = build_sae(cfg, tensors, source, device=device, dtype=dtype, why=f" (d_model={d_model}, d_sae={d_sae})")
    if sorted(saes) != list(range(len(saes))):
        raise ValueError(f"{config_path}: circuit-tracer needs a transcoder for every layer 0..{max(saes)}, got layers {sorted(saes)}")
    return saes


def _check_savable(sae, where: Path) -> None:
    if not sae.arch.saelens_transcoder_names:  # what computes a ReLU or a JumpReLU at inference
        raise ValueError(f"{where}: circuit-tracer's transcoders are ReLU or JumpReLU; this one is {sae.architecture!r}")
    if sae.d_out != sae.d_in or sae.cfg.apply_b_dec_to_input:
        raise ValueError(
            f"{where}: circuit-tracer's transcoders read and write the model's width and do not subtract b_dec from "
            f"their input; this one has d_in={sae.d_in}, d_out={sae.d_out}, apply_b_dec_to_input={sae.cfg.apply_b_dec_to_input}"
        )


def save(
    saes: dict,
    path: Union[str, Path],
    *,
    feature_input_hook: Optional[str] = None,
    feature_output_hook: Optional[str] = None,
    model_name: Optional[str] = None,
) -> Path:
    """Write {layer: SAE} (layers 0..n-1) as a circuit-tracer transcoder set: config.yaml (JSON,
    which is YAML) and layer_{i}.safetensors. The hooks default to those the SAEs were loaded with."""
    path = Path(path)
    if not isinstance(saes, dict) or not saes:
        raise ValueError("circuit_tracer.save: expected a non-empty dict {layer: SAE}")
    if sorted(saes) != list(range(len(saes))):
        raise ValueError(f"{path}: circuit-tracer needs a transcoder for every layer 0..n-1, got layers {sorted(saes)}")
    for layer, sae in saes.items():
        _check_savable(sae, path / f"layer_{layer}.safetensors")
    first = saes[0].cfg.metadata.get("circuit_tracer", {})
    hooks = {"feature_input_hook": feature_input_hook or first.get("feature_input_hook"),
             "feature_output_hook": feature_output_hook or first.get("feature_output_hook")}
    missing = [key for key, value in hooks.items() if not value]
    if missing:
        raise ValueError(f"{path}: pass {' and '.join(missing)} (circuit-tracer's config names the hook points)")
    path.mkdir(parents=True, exist_ok=True)
    entries = []
    for layer in range(len(saes)):
        sae = saes[layer]
        t = sae.arch.tensors_to_saelens(sae_tensors(sae, fold_decoder_norm=True))  # BatchTopK: one threshold per latent
        tensors = {"W_enc": t["W_enc"].t().contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
        if "threshold" in t:
            tensors[THRESHOLD] = t["threshold"]
        if "W_skip" in t:
            tensors["W_skip"] = t["W_skip"]
        target = path / f"layer_{layer}.safetensors"
        write_safetensors(target, tensors)
        name = sae.cfg.metadata.get("circuit_tracer", {}).get("id") or f"layer_{layer}"
        entries.append({"id": name, "layer": layer, "filepath": str(target.resolve())})
    config = {"model_name": model_name or saes[0].cfg.metadata.get("model_name") or "", **hooks, "transcoders": entries}
    (path / CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n")
    return path
