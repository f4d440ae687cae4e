"""SAELens folders: cfg.json + sae_weights.safetensors.

Tensors: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]; JumpReLU adds
threshold [d_sae]; gated has b_gate, r_mag, b_mag [d_sae] and no b_enc. BatchTopK saves as
JumpReLU with its global threshold in every slot, as SAELens does, and SAEs that rescale
activations by decoder norms save with the norms folded in (so the file computes the same with or
without the rescaling, in SAELens and here).

Transcoders (d_out, skip_connection) save as SAELens' transcoder classes where SAELens has one for
the architecture and the SAE does not subtract b_dec from its input (SAELens' transcoders never
do): `transcoder` / `skip_transcoder` (ReLU), `jumprelu_transcoder` / `jumprelu_skip_transcoder`
(JumpReLU, and BatchTopK as JumpReLU), with `d_out` and W_skip [d_out, d_in]. The others save
in fastsae's layout (the plain architecture's name with `d_out` and `skip_connection`), which
SAELens does not load.

Reading follows SAELens' own loader: a cfg.json whose `sae_lens_version` (top level or in
`metadata`) is missing or below 6.0 is the older flat format (`activation_fn_str`,
`activation_fn_kwargs` {"k": ...}, `hook_point`, boolean `normalize_activations`,
`finetuning_scaling_factor` ...), which SAELens 6 converts as `_from_pre_6_0` does here. Options
that change what the SAE computes and that fastsae's SAE does not compute (hook_z reshaping,
`constant_norm_rescale` / `layer_norm` normalisation, tanh-relu) are refused with an error.
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
WEIGHTS_FILENAME = "sae_weights.safetensors"

# SAELens reads a cfg.json as its 6.x format only when it carries a 6.x sae_lens_version; files
# that fastsae writes say this one (the format's version, not an installed SAELens).
SAELENS_FORMAT_VERSION = "6.0.0"

# Keys SAELens 6 moves from a pre-6.0 cfg.json's top level into `metadata`.
_METADATA_KEYS = (
    "model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
    "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
    "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out", "hook_head_index_out",
    "hook_layer",
)


# A pre-6.0 cfg.json's defaults: SAELens' names, as its files write them.
_DEFAULT_ARCHITECTURE = "standard"
_PLAIN_ACTIVATION = "relu"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS_FILENAME).exists()


def _major_version(version) -> int:
    match = re.match(r"\s*(\d+)", str(version)) if version else None
    return int(match.group(1)) if match else 0


def is_pre_6_0(cfg: dict) -> bool:
    """SAELens' rule: no sae_lens_version, or one below 6.0, means the pre-6.0 layout. Files
    fastsae wrote before it stamped a version carry `fastsae_version` and are 6.x layouts."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    if "fastsae_version" in metadata:
        return False
    version = cfg.get("sae_lens_version") or metadata.get("sae_lens_version")
    return _major_version(version) < 6


def _selected_by_activation() -> dict:
    """Pre-6.0 `activation_fn` -> the architecture it selects by itself (TopK's "topk", written
    with architecture "standard"): those whose activation is not the plain one."""
    archs = (architectures.get(name) for name in architectures.names())
    return {arch.saelens_pre_6_0_activation: arch for arch in archs if arch.saelens_pre_6_0_activation != _PLAIN_ACTIVATION}


def _kwargs_text(arch) -> str:
    return "{" + ", ".join(f"'{key}': ..." for key in arch.saelens_pre_6_0_kwargs) + "}"


def _from_pre_6_0(old: dict) -> dict:
    """A pre-6.0 flat cfg.json as the 6.x dict SAEConfig reads, as SAELens' handle_pre_6_0_config."""
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    cfg = {renames.get(key, key): value for key, value in old.items()}
    architecture = cfg.get("architecture") or _DEFAULT_ARCHITECTURE
    activation = cfg.get("activation_fn") or _PLAIN_ACTIVATION
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"activation_fn_kwargs: expected a JSON object, got {kwargs!r}")
    by_activation = _selected_by_activation()
    chosen = by_activation.get(activation)
    if chosen is not None:
        if any(kwargs.get(key) is None for key in chosen.saelens_pre_6_0_kwargs):
            raise ValueError(f"activation_fn {activation!r} needs activation_fn_kwargs {_kwargs_text(chosen)}")
        if architecture not in (_DEFAULT_ARCHITECTURE, chosen.saelens_name or chosen.name):
            raise ValueError(f"activation_fn {activation!r} with architecture {architecture!r} is not an SAELens SAE")
        architecture = chosen.name
    elif activation != _PLAIN_ACTIVATION:
        known = " and ".join(repr(a) for a in sorted({_PLAIN_ACTIVATION, *by_activation}))
        raise ValueError(f"activation_fn: fastsae computes {known}, got {activation!r}")
    else:
        needs = {arch.saelens_name or arch.name: (act, arch) for act, arch in by_activation.items()}
        if architecture in needs:
            act, arch = needs[architecture]
            raise ValueError(f"architecture {architecture!r} needs activation_fn {act!r} with activation_fn_kwargs {_kwargs_text(arch)}")
    hook_name = cfg.get("hook_name") or ""
    reshape = cfg.get("reshape_activations") or ("hook_z" if "hook_z" in str(hook_name) else "none")
    normalize = cfg.get("normalize_activations")
    if isinstance(normalize, bool):
        normalize = "expected_average_only_in" if normalize else "none"
    new = {
        "architecture": architecture,
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "dtype": cfg.get("dtype") or "float32",
        "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True),
        "normalize_activations": normalize or "none",
        "reshape_activations": reshape,
        "metadata": {key: cfg[key] for key in _METADATA_KEYS if key in cfg},
    }
    if chosen is not None:
        new.update({key: kwargs[key] for key in chosen.saelens_pre_6_0_kwargs})
    return new


def transcoder_name(sae) -> str:
    """The SAELens transcoder class `sae` saves as, or "" (an SAE, or a transcoder in fastsae's layout)."""
    names = sae.arch.saelens_transcoder_names
    if not sae.cfg.is_transcoder or not names or sae.cfg.apply_b_dec_to_input:
        return ""
    return names[1] if sae.cfg.skip_connection else names[0]


def _from_transcoder(d: dict) -> dict:
    """A cfg naming one of SAELens' transcoder classes as fastsae's config: the architecture that
    computes it (the one SAELens saves under its own name), d_out and skip_connection."""
    name = d.get("architecture")
    for arch in (architectures.get(n) for n in architectures.names()):
        if name in arch.saelens_transcoder_names and (arch.saelens_name or arch.name) in (arch.name, *arch.aliases):
            if d.get("d_out") is None:
                raise ValueError(f"architecture {name!r} (a transcoder) needs d_out")
            return {**d, "architecture": arch.name, "skip_connection": name == arch.saelens_transcoder_names[-1]}
    return d


def _config(raw: dict, cfg_path: Path) -> tuple[SAEConfig, bool]:
    pre_6_0 = is_pre_6_0(raw)
    try:
        d = _from_pre_6_0(raw) if pre_6_0 else _from_transcoder(dict(raw))
        if d.get("reshape_activations", "none") == "hook_z":
            raise ValueError(
                "reshape_activations: 'hook_z' SAEs take [..., n_heads, d_head] inputs; fastsae's SAE takes "
                "[..., d_in] and does not reshape (supported: 'none')"
            )
        return SAEConfig.from_dict(d), pre_6_0
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path}: {exc}") from exc


def read_cfg(path: Path) -> dict:
    return read_json(path / CFG_FILENAME, f" (an SAELens folder holds {CFG_FILENAME} and {WEIGHTS_FILENAME})")


def load(path: Union[str, Path], device=None, dtype=None):
    path = Path(path)
    cfg_path = path / CFG_FILENAME
    raw = read_cfg(path)
    cfg, pre_6_0 = _config(raw, cfg_path)
    weights_path = path / WEIGHTS_FILENAME
    tensors = read_safetensors(weights_path)

    # pre-6.0 fine-tuning scale (`scaling_factor`, or `finetuning_scaling_factor` in 5.x) multiplies
    # the activations before the decoder: fold it into W_dec rows (same result up to rounding).
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name not in tensors:
            continue
        scale = tensors.pop(name)
        if tuple(scale.shape) != (cfg.d_sae,):
            raise ValueError(f"{weights_path}: tensor {name!r} has shape {tuple(scale.shape)}, expected ({cfg.d_sae},)")
        if torch.equal(scale, torch.ones_like(scale)):
            continue
        if not raw.get("finetuning_scaling_factor"):
            if torch.allclose(scale, torch.ones_like(scale)):
                continue  # SAELens drops a near-one scale that the cfg says is unused
            raise ValueError(f"{weights_path}: holds {name!r} but {cfg_path} says finetuning_scaling_factor is false")
        if "W_dec" in tensors and tuple(tensors["W_dec"].shape) == (cfg.d_sae, cfg.d_in):
            tensors["W_dec"] = (tensors["W_dec"].double() * scale.double()[:, None]).to(tensors["W_dec"].dtype)
        cfg.metadata["fastsae_folded"] = f"{name} into W_dec"

    # The architecture's own renames (older JumpReLU log_threshold; BatchTopK saved as JumpReLU).
    tensors = architectures.get(cfg.architecture).tensors_from_saelens(tensors, cfg.d_sae, weights_path)
    why = f" from {cfg_path} (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
    sae = build_sae(cfg, tensors, weights_path, device=device, dtype=dtype, why=why)
    if pre_6_0:
        sae.cfg.metadata.setdefault("source_format", "saelens<6")
    return sae


def state_dict_for_saving(sae) -> dict[str, torch.Tensor]:
    """The SAE's tensors as SAELens 6 stores them (contiguous, detached copies)."""
    return sae.arch.tensors_to_saelens(sae_tensors(sae, fold_decoder_norm=True))


def saelens_cfg(sae) -> dict:
    cfg = sae.cfg.to_dict()
    cfg["dtype"] = str(sae.dtype).removeprefix("torch.")
    cfg["device"] = str(sae.device)
    metadata = cfg.setdefault("metadata", {})
    metadata["fastsae_version"] = fastsae_version()
    if metadata.get("input_layer_norm", "").startswith("openai"):
        # An OpenAI TopK SAE whose inputs are layer-normed outside it: SAELens' "layer_norm" is the
        # same normalisation ((x - mean) / (std + 1e-5), unbiased std; y * std + mean), so the
        # folder computes OpenAI's forward in SAELens. fastsae itself refuses to read it back.
        cfg["normalize_activations"] = "layer_norm"
    if _major_version(metadata.get("sae_lens_version")) < 6:
        metadata["sae_lens_version"] = SAELENS_FORMAT_VERSION
    name = transcoder_name(sae)
    if name:
        cfg.update(architecture=name, fastsae_architecture=sae.architecture, d_out=sae.d_out)
    return cfg


def save(sae, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_for_saving(sae)
    cfg = saelens_cfg(sae)
    write_safetensors(path / WEIGHTS_FILENAME, tensors)
    write_json(path / CFG_FILENAME, cfg)
    return path


def from_config_and_tensors(raw: dict, tensors: dict[str, torch.Tensor], source: str = "an SAELens SAE", device=None, dtype=None):
    """An `SAE` from a SAELens 6 config dict and its tensors under SAELens' names (the live-object
    counterpart of `load`: no files). The tensors are copied; `source` names them in errors."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a config dict, got {type(raw).__name__}")
    cfg, _ = _config(raw, Path(source))
    tensors = {name: t.detach().clone() for name, t in tensors.items()}
    # The architecture's own renames (e.g. SAELens' JumpReLU training SAE's log_threshold).
    tensors = architectures.get(cfg.architecture).tensors_from_saelens(tensors, cfg.d_sae, source)
    why = f" from {source} (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
    return build_sae(cfg, tensors, Path(source), device=device, dtype=dtype, why=why)


def from_saelens_object(saelens_sae, device=None, dtype=None):
    """`from_config_and_tensors` of a live SAELens SAE (its config as its inference dict)."""
    cfg = getattr(saelens_sae, "cfg", None)
    if cfg is None or not hasattr(saelens_sae, "state_dict") or not hasattr(cfg, "to_dict"):
        raise ValueError(f"from_saelens: expected a sae_lens SAE (with .cfg and .state_dict()), got {type(saelens_sae).__name__}")
    raw = cfg.get_inference_sae_cfg_dict() if hasattr(cfg, "get_inference_sae_cfg_dict") else cfg.to_dict()
    if hasattr(cfg, "get_inference_sae_cfg_dict"):
        raw["architecture"] = cfg.architecture()  # a training config's own architecture (batchtopk stays batchtopk)
        options = architectures.get(raw["architecture"]).config_options if raw["architecture"] in architectures.names() else ()
        for key in ("k", "rescale_acts_by_decoder_norm", *options):  # training settings the inference dict drops
            if hasattr(cfg, key):
                raw[key] = getattr(cfg, key)
    tensors = {name: t for name, t in saelens_sae.state_dict().items()}
    if "topk_threshold" in tensors:
        tensors["topk_threshold"] = tensors["topk_threshold"].reshape(())
    if "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    return from_config_and_tensors(raw, tensors, f"the SAELens {type(saelens_sae).__name__}", device=device, dtype=dtype)


def to_saelens_object(sae, training: bool = False):
    """A live SAELens SAE (inference class, or with `training` its training class) computing what
    `sae` computes, from the same tensors (copied; decoder norms not folded, the rescaling kept)."""
    from sae_lens.saes.sae import SAEConfig as SAELensConfig
    from sae_lens.saes.sae import TrainingSAEConfig, get_sae_class, get_sae_training_class

    if not isinstance(training, bool):
        raise ValueError(f"training: expected a bool, got {training!r}")
    if sae.cfg.is_transcoder:
        _check_transcoder_for_saelens(sae, training)
    cfg = saelens_cfg(sae)
    tensors = sae_tensors(sae, fold_decoder_norm=False)
    training_name = sae.arch.saelens_training_name  # set where SAELens saves and infers it as another architecture
    if training_name and training:
        cfg["architecture"] = training_name
    elif training_name:
        tensors = state_dict_for_saving(sae)  # the saved layout (BatchTopK's: JumpReLU's, one threshold per latent)
        cfg.pop("k", None)
    arch = cfg["architecture"]
    if training:
        cls, cfg_cls = get_sae_training_class(arch)
        sl_cfg = cfg_cls.from_dict(cfg) if cfg_cls is not TrainingSAEConfig else TrainingSAEConfig.from_dict(cfg)
    else:
        cls, cfg_cls = get_sae_class(arch)
        sl_cfg = cfg_cls.from_dict(cfg) if cfg_cls is not SAELensConfig else SAELensConfig.from_dict(cfg)
    out = cls(sl_cfg)
    missing, unexpected = out.load_state_dict({k: v for k, v in tensors.items()}, strict=False)
    if unexpected or [name for name in missing if not name.startswith("hook")]:
        raise ValueError(
            f"to_saelens: SAELens' {cls.__name__} expects tensors {sorted(out.state_dict())}, "
            f"fastsae's {arch} SAE has {sorted(tensors)}"
        )
    return out.to(sae.device)


def _check_transcoder_for_saelens(sae, training: bool) -> None:
    if not sae.arch.saelens_transcoder_names:
        with_one = sorted(n for n in architectures.names() if architectures.get(n).saelens_transcoder_names)
        raise ValueError(
            f"to_saelens: SAELens has no {sae.architecture} transcoder (its transcoders are {', '.join(with_one)}); "
            "save it with sae.save (fastsae's layout) instead"
        )
    if sae.cfg.apply_b_dec_to_input:
        raise ValueError(
            "to_saelens: SAELens' transcoders do not subtract b_dec from their input; this transcoder has "
            "apply_b_dec_to_input=True (build it with apply_b_dec_to_input=False)"
        )
    if training:
        raise ValueError("to_saelens: SAELens has no training class for transcoders (training=False gives its inference class)")
