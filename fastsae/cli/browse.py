"""`fastsae browse RUN_OR_SAE --out SITE/`: the command line of the feature browser."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_TOKENS = 100_000
HOOK_OUT_HELP = "a transcoder's: module whose output it predicts (default: the run's, else its cfg.json's hook_name_out)"


def add_browse_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "browse",
        help="write a static feature browser (top contexts, histograms, nearest features) for a trained SAE",
        description="Run the model over the text, gather each feature's statistics in one pass over the SAE's "
        "sparse activations and write a static site that opens from the file system (no server, no CDN). "
        "For a run folder of `fastsae train`, the model, hook, text and activation cache default to the run's.",
    )
    p.add_argument("sae", metavar="RUN_OR_SAE", help="a `fastsae train` run folder, or an SAE checkpoint (SAELens, sparsify, ...)")
    p.add_argument("--out", required=True, help="folder for the site (created; a previous site there is replaced)")
    p.add_argument("--model", help="Hugging Face model folder or 'minilm' (default: the run's, else minilm)")
    p.add_argument("--hook", "--hook-in", help="module whose output the SAE reads (default: the run's, else encoder.layer.3)")
    p.add_argument("--hook-out", help=HOOK_OUT_HELP)
    p.add_argument("--text", help="'pydoc', a .txt file or a folder of .txt files (default: the run's, else pydoc)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's, else 128)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to scan (default {DEFAULT_TOKENS:,})")
    p.add_argument("--features", type=int, help="give pages to the first N features only (default: all; the index lists all)")
    p.add_argument("--contexts", type=int, default=16, help="top-activating contexts kept per feature (default 16)")
    p.add_argument("--activation-cache", help="folder caching the model's activations (default: the run's, else "
                   "runs/activation-cache; 'none': off)")
    p.add_argument("--eval-tokens", type=int, default=4096,
                   help="show `fastsae eval`'s metrics on the first N tokens on the index page (default 4096; 0: none)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("--serve", action="store_true", help="then serve the site on http://127.0.0.1:PORT/ until Ctrl-C")
    p.add_argument("--port", type=int, default=8000, help="port for --serve (default 8000; 0: any free one)")
    p.set_defaults(func=run_browse)
    return p


def open_sae(path: Path, device: str = "cpu"):
    """(SAE, the run's data description or {}) from a run folder or an SAE checkpoint."""
    import fastsae
    from fastsae import runs

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or SAE checkpoint")
    if runs.is_run_folder(path):
        folder = runs.latest_checkpoint(path)
        if folder is None:
            raise FileNotFoundError(f"{path}: a run folder without a complete checkpoint in {runs.CHECKPOINTS_DIRNAME}/ (no SAE yet)")
        try:
            data = json.loads((folder / runs.TRAINER_CFG).read_text()).get("data") or {}
        except (OSError, ValueError):
            data = {}
        return fastsae.load(folder, device=device), data
    try:
        sae = fastsae.load(path, device=device)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no SAE found: neither a `fastsae train` run folder (checkpoints/) nor {exc}") from None
    if isinstance(sae, dict):
        raise ValueError(f"{path}: holds several SAEs ({', '.join(sorted(sae))}); pass the folder of one")
    return sae, {}


def open_transformer_source(args: argparse.Namespace, sae, data: dict):
    """The `TransformerActivations` that --model, --hook, --text, --seq-len, --activation-cache
    and --device describe, each defaulting to the run's (`data`, a run's data description) and
    then to `fastsae train`'s defaults (MiniLM at encoder.layer.3 on pydoc). A transcoder is read
    at --hook and --hook-out, which default to the run's, then to its cfg.json's hook_name and
    hook_name_out (as `fastsae train --hook-in/--hook-out` and SAELens record them)."""
    from fastsae.cli.flags import DEFAULTS
    from fastsae.evals import is_paired
    from fastsae.training.transformer import TransformerActivations

    from_run = data if data.get("kind") == "transformer" else {}
    paired = is_paired(sae)
    recorded = sae.cfg.metadata if paired else {}

    def setting(name: str, default):
        given = getattr(args, name)
        return given if given is not None else from_run.get(name, default)

    model, hook = setting("model", DEFAULTS["model"]), setting("hook", recorded.get("hook_name") or DEFAULTS["hook"])
    hook_out = setting("hook_out", recorded.get("hook_name_out")) if paired else None
    if paired and hook_out is None:
        raise ValueError(f"{args.sae}: a transcoder (d_out={sae.d_out}) is measured against the output of another "
                         "module than its input's: pass --hook-out (and --hook, its input)")
    if not paired and args.hook_out is not None:
        raise ValueError(f"--hook-out: reads a transcoder's target, but {args.sae} is an SAE (d_out unset); drop it")
    text = setting("text", DEFAULTS["text"])
    cache = args.activation_cache or from_run.get("cache_dir") or "runs/activation-cache"
    where = f"{hook!r}" + (f" -> {hook_out!r}" if paired else "")
    print(f"{args.sae}: {sae}; loading {model} at {where} and tokenizing {text!r} ...", flush=True)
    return TransformerActivations(
        model=model, hook=hook, hook_out=hook_out, text=text, seq_len=setting("seq_len", DEFAULTS["seq_len"]),
        # The run's token stream and window settings, so its cached activations are reused.
        seqs_per_chunk=from_run.get("seqs_per_chunk", 32), max_tokens=from_run.get("max_tokens"),
        cache_dir=None if str(cache).lower() == "none" else cache, device=args.device,
    )


def run_browse(args: argparse.Namespace) -> int:
    from fastsae.browse import build_browser, serve

    started = time.perf_counter()
    try:
        if args.tokens < 1:
            raise ValueError(f"--tokens: expected a positive number of tokens, got {args.tokens}")
        if args.features is not None and args.features < 0:
            raise ValueError(f"--features: expected a non-negative number, got {args.features}")
        sae, data = open_sae(Path(args.sae), args.device)
        if data.get("kind") not in (None, "transformer") and args.model is None:
            raise ValueError(f"{args.sae}: the run trained on {data.get('kind')} data, which has no text to show; "
                             "pass --model (and --hook, --text) to browse it on a transformer's activations")
        source = open_transformer_source(args, sae, data)
        features = None if args.features is None else range(min(args.features, sae.d_sae))
        metrics = None
        if args.eval_tokens > 0 and source.d_in == sae.d_in:  # build_browser reports a width mismatch
            # (a transcoder's metrics: its output against the targets at --hook-out)
            from fastsae.evals import evaluate

            metrics = evaluate(sae, source, max_tokens=args.eval_tokens)
        index = build_browser(sae, source, args.out, max_tokens=args.tokens, features=features,
                              n_contexts=args.contexts, title=f"{Path(args.sae).name} ({sae.architecture}, {sae.d_sae} features)",
                              metrics=metrics)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"fastsae browse: {exc}", file=sys.stderr)
        return 2
    print(f"browser of the features: {index.resolve().as_uri()} ({time.perf_counter() - started:.1f} s; opens from the file system)")
    if args.serve:
        serve(index.parent, args.port)
    return 0
