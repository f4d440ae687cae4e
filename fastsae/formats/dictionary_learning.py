"""saprmarks/dictionary_learning: a folder with ae.pt (a state dict) and config.json
({"trainer": {"dict_class": ..., "k": ..., ...}, "buffer": {...}}), read as its
`utils.load_dictionary` reads them. What each class computes, and what it becomes here:

- AutoEncoder (keys bias, encoder.weight [d_sae, d_in], encoder.bias, decoder.weight [d_in, d_sae]):
  relu(encoder(x - bias)), decoder(f) + bias -> relu, apply_b_dec_to_input. Its from_pretrained
  normalises the decoder by default (columns to unit norm, the norms folded into the encoder,
  unless they are already allclose to 1); so does this loader, so activations match too.
- AutoEncoderNew (encoder.weight/bias, decoder.weight/bias): relu(encoder(x)), decoder(f)
  -> relu with apply_b_dec_to_input=False, b_dec = decoder.bias.
- GatedAutoEncoder (decoder_bias, encoder.weight, r_mag, gate_bias, mag_bias, decoder.weight)
  -> gated (the same formula as SAELens' GatedSAE).
- JumpReluAutoEncoder (W_enc [d_in, d_sae], b_enc, W_dec, b_dec, threshold): relu(pre * (pre >
  threshold)) with apply_b_dec_to_input=False (its default; the flag is not saved) -> jumprelu.
- AutoEncoderTopK (k, threshold, encoder.weight/bias, decoder.weight, b_dec): encode's default is
  the per-row top-k of relu(pre) -> topk.
- BatchTopKSAE and MatryoshkaBatchTopKSAE (k, threshold, ...; Matryoshka: W_enc, b_enc, W_dec,
  b_dec, group_sizes): encode's default is relu(pre) * (relu(pre) > threshold), equal to
  fastsae's BatchTopK inference relu(pre) * (pre > threshold) for every threshold -> batchtopk.
  (Matryoshka's group mask keeps every latent once loaded: all groups are active.)
An ae.pt whose biases were trained on normalised activations is saved with them rescaled
(`scale_biases(norm_factor)`), so it computes on raw activations as it stands. A training backup
({"ae", "optimizer", ...}) holds unscaled biases and is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from fastsae import architectures
from fastsae.architectures.matryoshka import group_sizes_from_widths, widths_from_group_sizes
from fastsae.config import SAEConfig
from fastsae.formats._common import build_sae, read_json, read_torch, sae_tensors, write_json

WEIGHTS_FILENAME = "ae.pt"
CONFIG_FILENAME = "config.json"

# The state-dict keys of each dictionary class, as its module defines them.
CLASS_KEYS = {
    "AutoEncoder": {"bias", "encoder.weight", "encoder.bias", "decoder.weight"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "GatedAutoEncoder": {"decoder_bias", "encoder.weight", "r_mag", "gate_bias", "mag_bias", "decoder.weight"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "AutoEncoderTopK": {"k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"},
    "BatchTopKSAE": {"k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"},
    "MatryoshkaBatchTopKSAE": {"k", "threshold", "group_sizes", "W_enc", "b_enc", "W_dec", "b_dec"},
}
# Layouts before December 2024: AutoEncoderTopK kept k in config.json only; BatchTopKSAE had no
# threshold and encoded with the batch top-k itself (batch-dependent), which is refused.
LEGACY_KEYS = {
    "AutoEncoderTopK": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec"},
    "BatchTopKSAE": {"k", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"},
}


def detect(path: Path) -> bool:
    return (path.is_dir() and (path / WEIGHTS_FILENAME).exists()) or (path.is_file() and path.name == WEIGHTS_FILENAME)


def looks_like(state: object) -> bool:
    """Whether a loaded .pt object is one of dictionary_learning's state dicts."""
    layouts = list(CLASS_KEYS.values()) + list(LEGACY_KEYS.values())
    return isinstance(state, dict) and any(set(state) == keys for keys in layouts)


def _infer_class(state: dict, source: Path) -> str:
    matches = [name for name, keys in CLASS_KEYS.items() if set(state) == keys]
    matches += [name for name, keys in LEGACY_KEYS.items() if set(state) == keys]
    if matches == ["AutoEncoderTopK", "BatchTopKSAE"]:
        raise ValueError(
            f"{source}: AutoEncoderTopK and BatchTopKSAE store the same tensors and encode differently "
            f"(per-row top-k vs a global threshold); put its {CONFIG_FILENAME} beside it to say which"
        )
    if not matches:
        raise ValueError(f"{source}: keys {sorted(state)} match no dictionary_learning class ({sorted(CLASS_KEYS)})")
    return matches[0]


def _tensor(state: dict, name: str, source: Path, shape: tuple) -> torch.Tensor:
    t = state[name]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{source}: tensor {name!r} has shape {got}, expected {shape}")
    return t


def _scalar(state: dict, name: str, source: Path) -> torch.Tensor:
    t = state[name]
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise ValueError(f"{source}: {name!r}: expected a one-element tensor, got {t!r}")
    return t.reshape(())


def from_state_dict(state: object, source: Path, config: Optional[dict] = None, device=None, dtype=None):
    """An SAE from an ae.pt state dict (and its config.json, if any). `source` names the file in errors."""
    if isinstance(state, dict) and "ae" in state and "optimizer" in state:
        raise ValueError(
            f"{source}: a dictionary_learning training backup (ae, optimizer, ...), not a saved dictionary: its "
            "biases are not rescaled for raw activations; finish training (or rerun its final save) first"
        )
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{source}: expected a state dict (names to tensors), got {type(state).__name__}")
    trainer = (config or {}).get("trainer") or {}
    dict_class = trainer.get("dict_class") or _infer_class(state, source)
    if dict_class not in CLASS_KEYS:
        raise ValueError(f"{source}: dict_class {dict_class!r}: fastsae reads {sorted(CLASS_KEYS)}")
    if set(state) == LEGACY_KEYS.get(dict_class):
        if dict_class == "BatchTopKSAE":
            raise ValueError(
                f"{source}: a BatchTopKSAE saved before dictionary_learning tracked its inference threshold: it "
                "encodes with the batch's top k * rows, which depends on the whole batch; fastsae loads BatchTopK "
                "SAEs with a threshold"
            )
        if trainer.get("k") is None:
            raise ValueError(f"{source}: an AutoEncoderTopK without a 'k' tensor takes k from its {CONFIG_FILENAME}, which is missing")
        state = dict(state, k=torch.tensor(int(trainer["k"])), threshold=torch.tensor(-1.0))
    keys = CLASS_KEYS[dict_class]
    if set(state) != keys:
        missing, extra = sorted(keys - set(state)), sorted(set(state) - keys)
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected keys {extra}"
        raise ValueError(f"{source}: {what} for a {dict_class} (has {sorted(state)})")

    # dictionary_learning's modules are float32 and load_state_dict casts into them (before any
    # decoder normalisation), so the file's floating tensors become float32 first here too.
    state = {name: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for name, t in state.items()}
    if "encoder.weight" in state:
        enc = state["encoder.weight"]
        if not isinstance(enc, torch.Tensor) or enc.ndim != 2:
            raise ValueError(f"{source}: tensor 'encoder.weight': expected [dict_size, activation_dim]")
        d_sae, d_in = enc.shape
    else:
        enc = state["W_enc"]
        if not isinstance(enc, torch.Tensor) or enc.ndim != 2:
            raise ValueError(f"{source}: tensor 'W_enc': expected [activation_dim, dict_size]")
        d_in, d_sae = enc.shape
    d_in, d_sae = int(d_in), int(d_sae)
    for key, value in (("activation_dim", d_in), ("dict_size", d_sae)):
        if key in trainer and trainer[key] != value:
            raise ValueError(f"{source}: its tensors have {key}={value}, its {CONFIG_FILENAME} says {trainer[key]}")

    kw: dict = {}
    if dict_class == "AutoEncoder":
        W_enc, b_enc = state["encoder.weight"], _tensor(state, "encoder.bias", source, (d_sae,))
        W_dec = _tensor(state, "decoder.weight", source, (d_in, d_sae))
        # AutoEncoder.from_pretrained(normalize_decoder=True), in the file's dtype as it does it.
        norms = W_dec.norm(dim=0)
        if not torch.allclose(norms, torch.ones_like(norms)):
            W_dec, W_enc, b_enc = W_dec / norms, W_enc * norms[:, None], b_enc * norms
        tensors = {"W_enc": W_enc.t(), "b_enc": b_enc, "W_dec": W_dec.t(), "b_dec": state["bias"]}
        kw = dict(architecture="relu")
    elif dict_class == "AutoEncoderNew":
        tensors = {"W_enc": state["encoder.weight"].t(), "b_enc": state["encoder.bias"],
                   "W_dec": _tensor(state, "decoder.weight", source, (d_in, d_sae)).t(), "b_dec": state["decoder.bias"]}
        kw = dict(architecture="relu", apply_b_dec_to_input=False)
    elif dict_class == "GatedAutoEncoder":
        tensors = {"W_enc": state["encoder.weight"].t(), "b_gate": state["gate_bias"], "r_mag": state["r_mag"],
                   "b_mag": state["mag_bias"], "W_dec": _tensor(state, "decoder.weight", source, (d_in, d_sae)).t(),
                   "b_dec": state["decoder_bias"]}
        kw = dict(architecture="gated")
    elif dict_class == "JumpReluAutoEncoder":
        tensors = {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        kw = dict(architecture="jumprelu", apply_b_dec_to_input=False)
    else:
        k = int(_scalar(state, "k", source))
        if trainer.get("k") is not None and trainer["k"] != k:
            raise ValueError(f"{source}: k={k} in the state dict, k={trainer['k']} in its {CONFIG_FILENAME}")
        if dict_class == "MatryoshkaBatchTopKSAE":
            tensors = {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
            group_sizes = state["group_sizes"]
            if not isinstance(group_sizes, torch.Tensor) or int(group_sizes.sum()) != d_sae:
                raise ValueError(f"{source}: group_sizes must sum to dict_size={d_sae}, got {group_sizes!r}")
            sizes = [int(g) for g in group_sizes]
            kw = dict(metadata={"group_sizes": sizes}, matryoshka_widths=widths_from_group_sizes(sizes))
        else:
            tensors = {"W_enc": state["encoder.weight"].t(), "b_enc": state["encoder.bias"],
                       "W_dec": _tensor(state, "decoder.weight", source, (d_in, d_sae)).t(), "b_dec": state["b_dec"]}
        if dict_class == "AutoEncoderTopK":
            kw.update(architecture="topk", k=k)
        else:
            tensors["topk_threshold"] = _scalar(state, "threshold", source).to(torch.float64)
            kw.update(architecture="matryoshka_batchtopk" if "matryoshka_widths" in kw else "batchtopk", k=k)

    metadata = {"source_format": "dictionary_learning", "dict_class": dict_class}
    for key, name in (("lm_name", "model_name"), ("layer", "layer"), ("submodule_name", "submodule_name")):
        if trainer.get(key) is not None:
            metadata[name] = trainer[key]
    metadata.update(kw.pop("metadata", {}))
    try:
        # dictionary_learning builds float32 modules and load_state_dict casts into them.
        cfg = SAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", metadata=metadata, **kw)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    return build_sae(cfg, tensors, source, device=device, dtype=dtype, why=f" (d_in={d_in}, d_sae={d_sae})")


def load(path: Union[str, Path], device=None, dtype=None):
    """A folder holding ae.pt (and config.json), or an ae.pt file (its config.json read if beside it)."""
    path = Path(path)
    weights = path / WEIGHTS_FILENAME if path.is_dir() else path
    config_path = weights.parent / CONFIG_FILENAME
    config = read_json(config_path) if config_path.exists() else None
    if config is not None and not isinstance(config.get("trainer", {}), dict):
        raise ValueError(f"{config_path}: 'trainer': expected a JSON object")
    return from_state_dict(read_torch(weights), weights, config, device=device, dtype=dtype)


# ------------------------------------------------------------ writing


def save(sae, path: Union[str, Path]) -> Path:
    """Write `sae` as a dictionary_learning folder (ae.pt + config.json) of the class its
    architecture names (`dictionary_learning_class`: TopK, BatchTopK and Matryoshka BatchTopK
    SAEs), which dictionary_learning's `load_dictionary` and `fastsae.load` read back computing the
    same. Decoder-norm rescaling is folded in (dictionary_learning has none; same outputs to
    rounding); the tensors are float32, as its modules are."""
    path = Path(path)
    dict_class = sae.arch.dictionary_learning_class
    if not dict_class:
        writable = [n for n in architectures.names() if architectures.get(n).dictionary_learning_class]
        raise ValueError(f"{path}: fastsae writes dictionary_learning files of {writable} SAEs, not {sae.architecture!r}")
    if sae.cfg.d_out is not None or sae.cfg.skip_connection or not sae.cfg.apply_b_dec_to_input:
        raise ValueError(
            f"{path}: dictionary_learning's {dict_class} subtracts b_dec from its input and has no transcoder "
            "or skip connection; this SAE does not compute that"
        )
    t = {name: v.detach().to(torch.float32).cpu() for name, v in sae_tensors(sae, fold_decoder_norm=True).items()}
    threshold = t.get("topk_threshold", torch.tensor(-1.0))  # TopK: none (-1, dictionary_learning's unset)
    state = {"k": torch.tensor(int(sae.cfg.k), dtype=torch.int), "threshold": threshold.reshape(())}
    trainer = {"dict_class": dict_class, "activation_dim": sae.d_in, "dict_size": sae.d_sae, "k": int(sae.cfg.k)}
    if dict_class == "MatryoshkaBatchTopKSAE":
        sizes = list(group_sizes_from_widths(sae.cfg.matryoshka_widths))
        state.update(group_sizes=torch.tensor(sizes), W_enc=t["W_enc"], b_enc=t["b_enc"], W_dec=t["W_dec"], b_dec=t["b_dec"])
        trainer["group_sizes"] = sizes
    else:
        state.update({"encoder.weight": t["W_enc"].t().contiguous(), "encoder.bias": t["b_enc"],
                      "decoder.weight": t["W_dec"].t().contiguous(), "b_dec": t["b_dec"]})
    for key, name in (("lm_name", "model_name"), ("layer", "layer"), ("submodule_name", "submodule_name")):
        if sae.cfg.metadata.get(name) is not None:
            trainer[key] = sae.cfg.metadata[name]
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / WEIGHTS_FILENAME)
    write_json(path / CONFIG_FILENAME, {"trainer": trainer})
    return path
