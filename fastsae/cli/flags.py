"""`fastsae train`'s flags in one table: each flag's name, the run setting it maps to, its type,
default and help. The parser, the flags -> config mapping of a new run and the config -> flags
mapping that --resume checks given flags against all read this table.

A flag's `field` names where its value lives in a run: "sae.<SAEConfig field>",
"trainer.<TrainerConfig field>", or "data.<key of the data source's describe()>" (for the
data kind `kind`); flags without one (--out, --threads, ...) describe no run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from fastsae import architectures
from fastsae.architectures.matryoshka import group_sizes_from_widths, widths_from_group_sizes

# d_sae = EXPANSION x d_in unless --d-sae is given.
EXPANSION = 8
TRANSFORMER_DATA = "(a transformer's activations: no --data)"  # --data's value for a run on a model


def _same_path(a, b) -> bool:
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def _same_device(a, b) -> bool:
    import torch

    da, db = torch.device(str(a)), torch.device(str(b))
    # "cuda" and "cuda:0" name the same device for a run on one GPU.
    return da.type == db.type and (da.index is None or db.index is None or da.index == db.index)


def _same_data(given, was) -> bool:
    return was is not None and (given == was if "synthetic" in (given, was) else _same_path(given, was))


def _same_text(given, was) -> bool:
    return given == was or (given != "pydoc" and was != "pydoc" and _same_path(given, was))


def _data_flag(data: dict):
    """--data's value for a run's data description (None: a source --data cannot name)."""
    kind = data.get("kind")
    return {"synthetic": "synthetic", "files": data.get("path"), "transformer": TRANSFORMER_DATA}.get(kind, _ABSENT)


_ABSENT = object()


@dataclass(frozen=True)
class Flag:
    name: str  # args.<name>, --name-with-dashes
    help: str = ""  # "{default}" is filled in
    field: str = ""  # the run setting (see the module's docstring); "" for none
    type: Optional[Callable] = None
    # The value used when the flag is not given; a callable takes (architecture, d_in). The
    # parser's default stays None for run settings, so --resume tells given flags from defaults.
    default: Any = None
    choices: Optional[tuple] = None
    action: Any = None
    group: str = ""  # the help's argument group
    parser_default: Any = None  # flags that describe no run: argparse's own default
    applies: Callable[[architectures.Architecture], bool] = lambda arch: True  # does the architecture use it?
    off: Any = None  # the config's value where the architecture does not use it
    to_config: Callable[[Any], Any] = lambda value: value
    from_config: Callable[[Any], Any] = lambda value: value
    none_is_a_value: bool = False  # a saved None is a setting that --resume compares, not "unused"
    same: Callable[[Any, Any], bool] = lambda given, was: given == was
    compared: bool = True  # with --resume, must a given flag equal the run's value?
    kind: str = ""  # data.* fields: the data kind they describe
    aliases: tuple[str, ...] = ()  # other option strings for the same flag

    @property
    def option(self) -> str:
        return f"--{self.name.replace('_', '-')}"

    @property
    def where(self) -> tuple[str, str]:
        """("sae" | "trainer" | "data" | "", the field's name there)."""
        where, _, name = self.field.partition(".")
        return where, name


def _uses_k(arch) -> bool:
    return arch.uses_k


def _has_threshold_rule(arch) -> bool:
    """Whether the architecture learns BatchTopK's inference threshold (and takes its options)."""
    return "topk_threshold_start_step" in arch.config_options


def _config_default(name: str):
    from fastsae.config import SAEConfig

    return SAEConfig.__dataclass_fields__[name].default


def _group_sizes(text: str) -> tuple[int, ...]:
    """--matryoshka-groups' value: positive group sizes, comma-separated."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected group sizes such as 64,192,768, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive group sizes such as 64,192,768, got {text!r}")
    return sizes


def _ints(text: str) -> Union[int, list[int]]:
    """--k's and --d-sae's value: an integer, or a comma-separated list of them (a sweep)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a list such as 16,32,64, got {text!r}") from None
    return values[0] if len(values) == 1 else values


class _Repeatable(argparse.Action):
    """A flag given once holds its value (as any flag), given again the list of its values."""

    def __call__(self, parser, namespace, values, option_string=None):
        was = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, values if was is None else [*(was if isinstance(was, list) else [was]), values])


def _weights(text: str) -> tuple[float, ...]:
    """--matryoshka-weights' value: numbers, comma-separated."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected weights such as 1,1,0.5, got {text!r}") from None


def _widths_of(sizes):
    """Group sizes -> the config's cumulative level widths (SAELens' matryoshka_widths)."""
    return None if sizes is None else widths_from_group_sizes(sizes)


def _sizes_of(widths):
    return None if widths is None else group_sizes_from_widths(widths)


TRANSFORMER = "transformer data"
SYNTHETIC = "synthetic data"
DETAILS = "training details"
PROCESSES = "several processes (launch with torchrun --nproc-per-node N -m fastsae.cli train ...)"

TRAIN_FLAGS = (
    Flag("data", "activation file or folder (.safetensors with 'activations', .npy), or 'synthetic'; default: a "
         "transformer's activations (--model, --hook, --text)", field="data", from_config=_data_flag, none_is_a_value=True,
         same=_same_data),
    # TopK by default (Gao et al. 2024, sparsify's choice): on 2 CPU cores with the cpp backend,
    # 300k MiniLM tokens took 11 s to FVU 0.16 at L0 32; ReLU + L1 took 38 s to FVU 0.38 at L0 108.
    Flag("architecture", "default {default}", "sae.architecture", choices=architectures.names(), default="topk"),
    Flag("d_sae", f"latents (default {EXPANSION} x d_in); a comma-separated list trains one SAE per value", "sae.d_sae",
         _ints, default=lambda arch, d_in: EXPANSION * d_in),
    Flag("k", "topk/batchtopk: active latents per token (default {default}); a comma-separated list trains one SAE "
         "per value", "sae.k", _ints, 32, applies=_uses_k),
    Flag("matryoshka_groups", "matryoshka_batchtopk: the nested groups' sizes, comma-separated, summing to --d-sae "
         "(default: levels doubling up to d_sae, sizes d_sae/16, d_sae/16, d_sae/8, d_sae/4, d_sae/2)",
         "sae.matryoshka_widths", _group_sizes, applies=lambda arch: "matryoshka_widths" in arch.config_options,
         to_config=_widths_of, from_config=_sizes_of),
    Flag("matryoshka_weights", "matryoshka_batchtopk: each level's loss weight, comma-separated (default 1 each, "
         "as SAELens; dictionary_learning's trainer: its group_weights divided by the number of levels)",
         "sae.matryoshka_weights", _weights, applies=lambda arch: "matryoshka_weights" in arch.config_options),
    Flag("l1_coefficient", "relu and gated: L1 coefficient; jumprelu: L0 coefficient (default {default})",
         "trainer.sparsity_coefficient", float, 5.0, applies=lambda arch: arch.takes_sparsity_coefficient, off=0.0),
    Flag("decoder_norm", "decoder handling (default {default})", "sae.decoder_norm", default="norm_weighted",
         choices=("norm_weighted", "unit_norm", "none")),
    # topk/batchtopk select and decode on pre-activations times the decoder row norms (SAELens'
    # TopKTrainingSAE default); README's "Quality against SAELens" has what it changes.
    Flag("rescale_acts_by_decoder_norm", "topk/batchtopk: select the top k of the pre-activations times each decoder "
         "row's norm, and divide the norms out in the decoder (SAELens' TopK training default; default: on)",
         "sae.rescale_acts_by_decoder_norm", default=True, action=argparse.BooleanOptionalAction, applies=_uses_k,
         off=False),
    Flag("batch_size", "rows per step (default {default})", "trainer.batch_size", int, 2048),
    Flag("tokens", "rows to train on (default {default:,})", "trainer.total_tokens", int, 800_000),
    Flag("lr", "Adam's peak learning rate (default {default})", "trainer.lr", float, 1e-3),
    # b_dec's start: the architecture's (zeros for topk/batchtopk, as SAELens; better there on
    # the MiniLM head to head; the geometric median, TrainerConfig's default, otherwise).
    Flag("b_dec_init", "b_dec's start: zeros, or the geometric median or mean of a sample of the (normalised) data "
         "(default: zeros for topk/batchtopk, geometric_median for relu/jumprelu)", "trainer.b_dec_init",
         choices=("zeros", "geometric_median", "mean"), default=lambda arch, d_in: arch.default_b_dec_init),
    # Gradients clipped to global norm 1 before each Adam step (SAELens' SAETrainer); 0: off.
    Flag("grad_clip_norm", "clip the gradients' global norm to this before each step, 0: off (default {default})",
         "trainer.grad_clip_norm", float, 1.0, to_config=lambda value: value or None,
         from_config=lambda value: value or 0.0),
    Flag("seed", "default {default}", "trainer.seed", int, 0),
    Flag("out", "run folder (default runs/train-<time>)"),
    Flag("resume", "continue the latest checkpoint in --out", action="store_true", parser_default=False),
    Flag("overwrite", "start afresh even if --out holds a run", action="store_true", parser_default=False),
    Flag("model", "Hugging Face model folder, or 'minilm' (default)", "data.model", default="minilm", group=TRANSFORMER,
         kind="transformer"),
    Flag("hook", "module whose output is read (default {default}); a transcoder's input (--hook-in). Repeatable, and "
         "fnmatch patterns (encoder.layer.*): one SAE per hook, all from one forward pass, in OUT/<hook>/",
         "data.hook", default="encoder.layer.3", group=TRANSFORMER, kind="transformer", aliases=("--hook-in",),
         action=_Repeatable),
    Flag("hook_out", "train a transcoder: module whose output is its target, read in the same pass as --hook-in",
         "data.hook_out", group=TRANSFORMER, kind="transformer", none_is_a_value=True),
    Flag("text", "'pydoc' (default), a .txt file or a folder of .txt files", "data.text", default="pydoc",
         group=TRANSFORMER, kind="transformer", same=_same_text),
    Flag("seq_len", "tokens per sequence (default {default})", "data.seq_len", int, 128, group=TRANSFORMER,
         kind="transformer"),
    Flag("max_corpus_tokens", "use only the first N tokens of the corpus", "data.max_tokens", int, group=TRANSFORMER,
         kind="transformer", none_is_a_value=True),
    Flag("activation_cache", "folder caching the model's activations between epochs and runs ('none': off); under "
         "torchrun it splits several SAEs' model forward over the processes and must be a folder all of them see",
         group=TRANSFORMER, parser_default="runs/activation-cache"),
    Flag("report_features", "features shown in the final report (0: none)", type=int, group=TRANSFORMER,
         parser_default=6),
    Flag("browser_tokens", "tokens scanned for the feature browser written to OUT/browser at the end (0: none)",
         type=int, group=TRANSFORMER, parser_default=65536),
    Flag("eval_tokens", "at the end, `fastsae eval`'s metrics on the data's last N tokens (0: none)", type=int,
         group=TRANSFORMER, parser_default=4096),
    Flag("synthetic_d_in", "default {default}", "data.d_in", int, 64, group=SYNTHETIC, kind="synthetic"),
    Flag("synthetic_features", "default {default}", "data.n_features", int, 256, group=SYNTHETIC, kind="synthetic"),
    Flag("synthetic_l0", "default {default}", "data.l0", float, 4.0, group=SYNTHETIC, kind="synthetic"),
    Flag("log_every", "steps between metrics rows (default {default})", "trainer.log_every_steps", int, 25, group=DETAILS),
    Flag("checkpoint_every", "seconds between checkpoints (default 300)", "trainer.checkpoint_every_seconds", float,
         300.0, group=DETAILS, none_is_a_value=True),
    Flag("checkpoint_every_steps", "also checkpoint every N steps", "trainer.checkpoint_every_steps", int,
         group=DETAILS, none_is_a_value=True),
    Flag("device", "cpu (default), cuda, ...", "trainer.device", default="cpu", group=DETAILS, same=_same_device),
    Flag("dtype", "compute dtype of forward and backward; weights and Adam stay float32 (default bfloat16 on CUDA, "
         "float32 on the CPU); with --resume: continue in this dtype instead of the run's", "trainer.dtype",
         choices=("bfloat16", "float16", "float32"), group=DETAILS, compared=False),
    Flag("dead_strategy", "auto: resample relu, AuxK for topk/batchtopk", "trainer.dead_strategy", default="auto",
         choices=("auto", "resample", "auxk", "none"), group=DETAILS),
    Flag("aux_normalization", "AuxK's loss: dead_fraction (sparsify, SAELens) or residual_variance (dictionary_learning, "
         "OpenAI: ReLU'd dead latents, divided by the residual's variance) (default {default})",
         "trainer.aux_normalization", default="dead_fraction", choices=("dead_fraction", "residual_variance"),
         group=DETAILS, applies=lambda arch: arch.supports_auxk, off="dead_fraction"),
    Flag("topk_threshold_lr", "batchtopk/matryoshka: the inference threshold's EMA rate (default {default}; "
         "dictionary_learning: 1 - threshold_beta)", "sae.topk_threshold_lr", float,
         _config_default("topk_threshold_lr"), group=DETAILS, applies=_has_threshold_rule,
         off=_config_default("topk_threshold_lr")),
    Flag("topk_threshold_start_step", "batchtopk/matryoshka: update the threshold only on steps after this one "
         "(0-based; dictionary_learning's threshold_start_step; default: every step)", "sae.topk_threshold_start_step",
         int, group=DETAILS, applies=_has_threshold_rule, none_is_a_value=True),
    Flag("topk_threshold_first_sets", "batchtopk/matryoshka: the first update sets the threshold instead of moving "
         "it from 0 (dictionary_learning's rule; default: off)", "sae.topk_threshold_first_sets", default=False,
         action=argparse.BooleanOptionalAction, group=DETAILS, applies=_has_threshold_rule, off=False),
    Flag("dead_after_tokens", "tokens without firing after which a latent is dead", "trainer.dead_after_tokens", int,
         group=DETAILS, none_is_a_value=True),
    Flag("resample_every", "steps between resamplings (relu)", "trainer.resample_every_steps", int, group=DETAILS,
         none_is_a_value=True),
    Flag("no_normalize", "train on raw activations (default: scaled so that E||x||^2 = d_in)",
         "trainer.normalize_activations", action="store_true", group=DETAILS, to_config=lambda value: not value,
         from_config=lambda value: not value),
    Flag("no_progress", "no progress bar", "trainer.progress", action="store_true", parser_default=False, group=DETAILS,
         to_config=lambda value: not value, compared=False),
    Flag("threads", "CPU threads for torch (default: the cores other work leaves idle at the start, at least 1; "
         "OMP_NUM_THREADS, when set, is kept)", type=int, group=DETAILS),
    Flag("shard_latents", "split W_enc, b_enc, W_dec and their Adam state by latent across the processes (topk, relu); "
         "default: data parallel (with --resume: as the run did). On one process it trains the whole SAE from the same "
         "initialisation, so the same flags give the same SAE on any number of processes",
         action=argparse.BooleanOptionalAction, group=PROCESSES),
    Flag("dist_timeout", "seconds a process waits for the others in a collective before stopping with an error "
         "(default 300)", type=float, group=PROCESSES, parser_default=300.0),
)
FLAGS = {flag.name: flag for flag in TRAIN_FLAGS}
# The value of each run setting when its flag is not given (those that depend on nothing).
DEFAULTS = {flag.name: flag.default for flag in TRAIN_FLAGS if flag.default is not None and not callable(flag.default)}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The table's flags, in its order, in their argument groups."""
    groups = {"": parser}
    for flag in TRAIN_FLAGS:
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        kwargs = {"help": flag.help.format(default=flag.default)}
        if flag.action is not None:
            kwargs["action"] = flag.action
            if flag.action is argparse.BooleanOptionalAction or flag.field:
                kwargs["default"] = None  # given or not, for --resume
        if flag.type is not None:
            kwargs["type"] = flag.type
        if flag.choices is not None:
            kwargs["choices"] = flag.choices
        if flag.parser_default is not None:
            kwargs["default"] = flag.parser_default
        groups[flag.group].add_argument(flag.option, *flag.aliases, **kwargs)


def setting(args: argparse.Namespace, name: str, arch=None, d_in: Optional[int] = None):
    """The flag's value, or its default when not given (a callable default needs `arch`, `d_in`)."""
    value = getattr(args, name)
    if value is not None:
        return value
    default = FLAGS[name].default
    return default(arch, d_in) if callable(default) else default


def run_config(args: argparse.Namespace, d_in: int) -> tuple[dict, dict]:
    """(SAEConfig keywords, TrainerConfig keywords) of a new run, from the flags (flags -> config)."""
    arch = architectures.get(setting(args, "architecture"))
    configs = {"sae": {}, "trainer": {}}
    for flag in TRAIN_FLAGS:
        where, name = flag.where
        if where in configs:
            value = flag.to_config(setting(args, flag.name, arch, d_in)) if flag.applies(arch) else flag.off
            configs[where][name] = value
    return configs["sae"], configs["trainer"]


def data_settings(args: argparse.Namespace, kind: str) -> dict:
    """The data source's keywords of `kind` ("synthetic", "transformer") from the flags."""
    return {flag.where[1]: setting(args, flag.name) for flag in TRAIN_FLAGS if flag.kind == kind}


def run_flags(sae_cfg, trainer_cfg) -> dict:
    """Each compared flag's value in a saved run (config -> flags); flags the run does not use (--k
    for a ReLU SAE) and flags of another data kind are left out, so they never differ."""
    arch = architectures.get(sae_cfg.architecture)
    data = trainer_cfg.data or {}
    saved = {}
    for flag in TRAIN_FLAGS:
        where, name = flag.where
        if not flag.compared or not where:
            continue
        if where == "data":
            if flag.kind and flag.kind != data.get("kind"):
                continue
            value = data.get(name) if name else data
        else:
            value = getattr(sae_cfg if where == "sae" else trainer_cfg, name)
        if not flag.applies(arch):
            continue
        value = flag.from_config(value)
        if value is not _ABSENT:
            saved[flag.name] = value
    return saved
