"""`fastsae eval RUN_OR_SAE`: the SAE's reconstruction, sparsity and downstream metrics
(definitions in `fastsae.evals` and README's "fastsae eval")."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from fastsae.cli.browse import HOOK_OUT_HELP

DEFAULT_TOKENS = 50_000


def add_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="explained variance, MSE, L0, dead latents, ... of an SAE, and CE loss recovered / KL with it spliced in",
        description="Stream activations through the SAE (from --data files, or from a model at a hook on a text as "
        "`fastsae browse` does; for a `fastsae train` run folder the run's data by default) and report the metrics "
        "of SAELens' evals. With a model, also splice the reconstruction into it at the hook: CE loss recovered and "
        "KL for a causal LM, the recovered score of the final hidden states for an encoder. A transcoder is "
        "measured against its targets (paired files, or the model at --hook and --hook-out), and spliced in as the "
        "output of --hook-out's module computed from --hook's activations.",
    )
    p.add_argument("sae", metavar="RUN_OR_SAE", help="a `fastsae train` run folder, or an SAE checkpoint (SAELens, sparsify, ...)")
    p.add_argument("--data", metavar="FILE", help="activation file or folder of shards (.safetensors/.npy/.pt) instead of a model")
    p.add_argument("--model", help="Hugging Face model folder or 'minilm' (default: the run's, else minilm)")
    p.add_argument("--hook", "--hook-in", help="module whose output the SAE reads (default: the run's, else encoder.layer.3)")
    p.add_argument("--hook-out", help=HOOK_OUT_HELP)
    p.add_argument("--text", help="'pydoc', a .txt file or a folder of .txt files (default: the run's, else pydoc)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's, else 128)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens (rows) to evaluate on (default {DEFAULT_TOKENS:,})")
    p.add_argument("--activation-cache", help="folder caching the model's activations (default: the run's, else "
                   "runs/activation-cache; 'none': off)")
    p.add_argument("--no-downstream", action="store_true", help="only the activation metrics (no spliced forward passes)")
    p.add_argument("--batch-rows", type=int, default=4096, help="rows per SAE batch (default 4096)")
    p.add_argument("--batch-windows", type=int, default=8, help="sequences per spliced forward pass (default 8)")
    p.add_argument("--json", metavar="OUT", help="write the metrics to OUT as JSON")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.set_defaults(func=run_eval)
    return p


def open_eval_source(args: argparse.Namespace, sae, data: dict):
    """The activations to evaluate on: --data files; else a run's files or synthetic data (unless
    --model is given); else a transformer (`fastsae browse`'s choice of model, hook, text)."""
    from fastsae.cli.browse import open_transformer_source
    from fastsae.training.data import ActivationFiles, open_source

    if args.data is not None:
        if args.model is not None:
            raise ValueError("--data and --model: expected one source of activations, got both")
        return ActivationFiles(args.data)
    if data.get("kind") in ("files", "synthetic") and args.model is None:
        return open_source(data)
    return open_transformer_source(args, sae, data)


def nan_as_null(value):
    """NaN/Inf (a score whose baseline equals the clean model, say) as JSON null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nan_as_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_as_null(v) for v in value]
    return value


def run_eval(args: argparse.Namespace) -> int:
    from fastsae.cli.browse import open_sae
    from fastsae.evals import evaluate, format_metrics

    started = time.perf_counter()
    try:
        for name in ("tokens", "batch_rows", "batch_windows"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
        sae, data = open_sae(Path(args.sae), args.device)
        source = open_eval_source(args, sae, data)
        if source.d_in != sae.d_in:
            raise ValueError(f"width: {source!r} gives activations of width {source.d_in}, but the SAE expects "
                             f"d_in={sae.d_in} (pick the data, or --model and --hook, the SAE was trained on)")
        print(f"evaluating {sae} on {source!r} ...", flush=True)
        metrics = evaluate(sae, source, max_tokens=args.tokens, downstream=not args.no_downstream,
                           batch_rows=args.batch_rows, batch_windows=args.batch_windows)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"fastsae eval: {exc}", file=sys.stderr)
        return 2
    metrics["sae"] = str(args.sae)
    metrics["source"] = repr(source)
    metrics["seconds"] = time.perf_counter() - started
    print(format_metrics(metrics))
    if not hasattr(source, "window_inputs"):
        also = " and --hook-out" if metrics.get("transcoder") else ""
        print(f"(no downstream metrics: activation files have no model to splice the SAE into; pass --model and --hook{also})")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(nan_as_null(metrics), indent=2, allow_nan=False) + "\n")
        print(f"wrote {out}")
    print(f"({metrics['seconds']:.1f} s)")
    return 0
