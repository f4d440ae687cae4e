"""`SAEConfig`: one dataclass for an SAE's shape, architecture and options, serialised to the
SAELens v6 `cfg.json` (fastsae-only keys ride along; SAELens ignores keys it does not know)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch



@dataclass(frozen=True)
class ArchitectureRules:
    """What the config needs to know of one architecture: whether it takes k (and
    rescale_acts_by_decoder_norm), the name SAELens saves it under, and other names it loads from."""

    name: str
    uses_k: bool
    saelens_name: str
    aliases: tuple[str, ...] = ()
    # Config fields only this architecture reads (left at their default, and not saved, elsewhere),
    # and its check that fills in their defaults.
    options: tuple[str, ...] = ()
    complete: Optional[Callable[["SAEConfig"], None]] = None


# The architectures are a higher layer (fastsae.architectures) than this module: each installs its
# rules here when that package is imported (`import fastsae` does), so no architecture name is
# written in this file. `ARCHITECTURES` and `ARCHITECTURE_ALIASES` are read from this table.
_RULES: dict[str, ArchitectureRules] = {}


def install_architecture(rules: ArchitectureRules) -> None:
    _RULES[rules.name] = rules


def _option_defaults() -> dict[str, Any]:
    """Every installed architecture's own config options, each with its field's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(SAEConfig)}
    return {option: defaults[option] for r in _RULES.values() for option in r.options}


def __getattr__(name: str):
    if name == "ARCHITECTURES":
        return tuple(_RULES)
    if name == "ARCHITECTURE_ALIASES":  # other names for the same architecture ("standard" is SAELens')
        return {alias: r.name for r in _RULES.values() for alias in (*r.aliases, r.name) if r.aliases}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# How the decoder's row norms are handled (ReLU's L1 penalty, and training constraints):
#   "norm_weighted": L1 penalty sum_i |f_i| * ||W_dec,i|| (the April 2024 update; SAELens' loss)
#   "unit_norm":     rows kept at unit norm, gradient's parallel component removed (the 2023 paper)
#   "none":          plain L1 penalty sum_i |f_i|, decoder unconstrained
DECODER_NORMS = ("norm_weighted", "unit_norm", "none")

# normalize_activations values: "none"; "expected_average_only_in" scales the data outside the
# SAE (in the activation store), so the SAE itself computes as with "none".
NORMALIZE_ACTIVATIONS = ("none", "expected_average_only_in")

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_from_str(name: str) -> torch.dtype:
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: Optional[int] = None  # topk and batchtopk: active latents per row (batchtopk: on average)
    apply_b_dec_to_input: bool = True
    rescale_acts_by_decoder_norm: bool = False  # topk/batchtopk: select on pre-acts * ||W_dec,i||
    decoder_norm: str = "norm_weighted"
    decoder_init_norm: Optional[float] = 0.1  # initial decoder row norm (None: kaiming rows as drawn)
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    topk_threshold_lr: float = 0.01  # batchtopk: EMA rate of the inference threshold
    # batchtopk: dictionary_learning's threshold rule (beta = 1 - topk_threshold_lr). The threshold
    # updates only on training batches numbered (0-based) above `topk_threshold_start_step` (None:
    # every batch, as SAELens); with `topk_threshold_first_sets` it starts unset (-1) and its first
    # update sets it to the batch's smallest activation instead of moving it from 0.
    topk_threshold_start_step: Optional[int] = None
    topk_threshold_first_sets: bool = False
    # matryoshka_batchtopk: the nested levels' widths (SAELens' key; cumulative group sizes, the
    # last one d_sae); None takes the architecture's default.
    matryoshka_widths: Optional[tuple[int, ...]] = None
    # matryoshka_batchtopk: each level's loss weight (None: 1 each, as SAELens; dictionary_learning's
    # trainer weighs level l by group_weights[l] / number of levels).
    matryoshka_weights: Optional[tuple[float, ...]] = None
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    metadata: dict = field(default_factory=dict)
    # Transcoders: the width of the activation the decoder writes (None: d_in, an ordinary SAE;
    # W_dec [d_sae, d_out], b_dec [d_out]), and a linear skip connection from the raw input to
    # the output (W_skip [d_out, d_in]: output += x @ W_skip.T), as SAELens' SkipTranscoder and
    # sparsify's skip_connection. Both are saved only when set.
    d_out: Optional[int] = None
    skip_connection: bool = False

    def __post_init__(self):
        aliases = {alias: r.name for r in _RULES.values() for alias in (*r.aliases, r.name)}
        if not isinstance(self.architecture, str) or self.architecture.lower() not in aliases:
            other_names = ", ".join(f"{a!r} for {r.name}" for r in _RULES.values() for a in r.aliases)
            raise ValueError(
                f"architecture: expected one of {tuple(_RULES)}{f' (or {other_names})' if other_names else ''}, "
                f"got {self.architecture!r}"
            )
        self.architecture = aliases[self.architecture.lower()]
        rules = _RULES[self.architecture]
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if self.d_out is not None and (not _is_int(self.d_out) or self.d_out < 1):
            raise ValueError(f"d_out: expected a positive integer or None (= d_in), got {self.d_out!r}")
        if not isinstance(self.skip_connection, bool):
            raise ValueError(f"skip_connection: expected a bool, got {self.skip_connection!r}")
        if self.apply_b_dec_to_input and self.output_width != self.d_in:
            raise ValueError(
                f"apply_b_dec_to_input: a transcoder with d_out={self.d_out} != d_in={self.d_in} cannot subtract "
                f"b_dec [d_out] from its input [d_in]; pass apply_b_dec_to_input=False (as SAELens' transcoders)"
            )
        if rules.uses_k:
            if self.k is None:
                raise ValueError(f"k: the {self.architecture} architecture needs k (1 <= k <= d_sae={self.d_sae})")
            if not _is_int(self.k) or not 1 <= self.k <= self.d_sae:
                raise ValueError(f"k: expected an integer with 1 <= k <= d_sae={self.d_sae}, got {self.k!r}")
        elif self.rescale_acts_by_decoder_norm:
            with_k = " and ".join(r.name for r in _RULES.values() if r.uses_k)
            raise ValueError(f"rescale_acts_by_decoder_norm applies to {with_k}, not {self.architecture!r}")
        if self.decoder_norm not in DECODER_NORMS:
            raise ValueError(f"decoder_norm: expected one of {DECODER_NORMS}, got {self.decoder_norm!r}")
        if self.normalize_activations not in NORMALIZE_ACTIVATIONS:
            raise ValueError(
                f"normalize_activations: fastsae supports {NORMALIZE_ACTIVATIONS}, got {self.normalize_activations!r}"
            )
        if self.jumprelu_bandwidth <= 0:
            raise ValueError(f"jumprelu_bandwidth: expected > 0, got {self.jumprelu_bandwidth}")
        self.dtype = dtype_to_str(dtype_from_str(self.dtype))
        for option, default in _option_defaults().items():
            if option not in rules.options and getattr(self, option) != default:
                owners = " and ".join(r.name for r in _RULES.values() if option in r.options)
                raise ValueError(f"{option} applies to {owners}, not {self.architecture!r}")
        if rules.complete is not None:
            rules.complete(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_str(self.dtype)

    @property
    def output_width(self) -> int:
        """The width of what the SAE returns: d_out for a transcoder, d_in for an ordinary SAE."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def is_transcoder(self) -> bool:
        """Whether the SAE predicts another activation than its input (d_out set) or adds a skip
        connection: what an ordinary SAE's file cannot hold."""
        return self.d_out is not None or self.skip_connection

    # ------------------------------------------------------------ cfg.json

    def to_dict(self) -> dict[str, Any]:
        """The SAELens v6 inference cfg.json. BatchTopK saves as JumpReLU (as SAELens does), with
        `fastsae_architecture` so fastsae loads it back as BatchTopK."""
        d = dataclasses.asdict(self)
        rules = _RULES[self.architecture]
        d["architecture"] = rules.saelens_name
        if rules.saelens_name not in (rules.name, *rules.aliases):  # saved as another architecture
            d["fastsae_architecture"] = rules.name
        if not rules.uses_k:
            d.pop("k")
            d.pop("rescale_acts_by_decoder_norm")
        # Architecture options are saved only where they are set: a file of a default SAE keeps
        # the keys it always had.
        for option, default in _option_defaults().items():
            if option not in rules.options or d.get(option) == default:
                d.pop(option, None)
        if self.d_out is None:
            d.pop("d_out")
        if not self.skip_connection:
            d.pop("skip_connection")
        for option in rules.options:  # tuples as JSON lists
            if isinstance(d.get(option), tuple):
                d[option] = list(d[option])
        d["reshape_activations"] = "none"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        """From a SAELens v6 cfg.json (or our own): unknown keys are ignored, as SAELens does."""
        d = dict(d)
        arch = d.pop("fastsae_architecture", None) or d.get("architecture")
        if arch is None:
            raise ValueError("cfg: missing 'architecture'")
        d["architecture"] = arch
        if d.get("reshape_activations", "none") != "none":
            raise ValueError(f"reshape_activations: fastsae supports 'none', got {d['reshape_activations']!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in d.items() if key in names}
        if kwargs.get("metadata") is None:
            kwargs["metadata"] = {}
        return cls(**kwargs)
