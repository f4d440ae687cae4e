"""One SAE's run under `fastsae train`: the data source the flags describe, the fresh SAE and
TrainerConfig they give, and what a finished run prints and writes (times, metrics, eval, feature
report, browser, summary.json). Used by the one-SAE command (train.py) and by several SAEs
(several.py), each of which reports its SAEs one by one."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fastsae.cli.eval import nan_as_null
from fastsae.cli.flags import data_settings, run_config, setting


def open_data(args):
    """The data source the flags describe."""
    from fastsae.training.data import ActivationFiles
    from fastsae.training.synthetic import SyntheticActivations

    if args.data == "synthetic":
        # made on the GPU when training there
        return SyntheticActivations(**data_settings(args, "synthetic"), seed=setting(args, "seed"), device=setting(args, "device"))
    if args.data is not None:
        return ActivationFiles(args.data)
    from fastsae.training.transformer import TransformerActivations

    cache = None if str(args.activation_cache).lower() == "none" else args.activation_cache
    print(f"loading {setting(args, 'model')} and tokenizing {setting(args, 'text')!r} ...", flush=True)
    return TransformerActivations(**data_settings(args, "transformer"), cache_dir=cache, device=setting(args, "device"))


def build_run(args, data, device=None):
    """A fresh SAE (this rank's shard with --shard-latents) and TrainerConfig from the flags."""
    import fastsae
    from fastsae.training.config import TrainerConfig

    sae_settings, trainer_settings = run_config(args, data.d_in)
    device = str(device) if device is not None else setting(args, "device")
    d_out = getattr(data, "d_out", None)  # paired data: a transcoder, no b_dec on its input (as SAELens')
    pairs = {} if d_out is None else {"d_out": d_out, "apply_b_dec_to_input": False}
    sae_cfg = fastsae.SAEConfig(d_in=data.d_in, **sae_settings, **pairs, device=device)
    cfg = TrainerConfig(**trainer_settings, data=data.describe())
    arch = sae_cfg.architecture
    if args.shard_latents:
        from fastsae import distributed as fdist

        if arch not in fdist.SHARDABLE_ARCHITECTURES:
            raise ValueError(f"--shard-latents: supports {', '.join(fdist.SHARDABLE_ARCHITECTURES)}, got --architecture {arch} "
                             "(train it data parallel: drop --shard-latents)")
        # Each rank initialises only its latents, in fixed blocks: the same SAE on any number of
        # processes (one included), and the whole SAE never exists on one device.
        if fdist.get_world_size() > 1:
            return fdist.ShardedSAE(sae_cfg, seed=cfg.seed), cfg
        return fdist.sharded_initial_sae(sae_cfg, seed=cfg.seed), cfg
    return fastsae.SAE(sae_cfg), cfg


def secs(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"



def report(args, trainer, data, out: Path, result: dict, started: float, trained_before: float) -> int:
    """What a finished run prints and writes after its steps: times, metrics, eval, features, summary.json."""
    m = trainer.last_metrics
    wall = time.perf_counter() - started
    this_session = result["elapsed_s"] - trained_before
    times = f"{secs(this_session)} in training steps, {secs(wall)} wall clock (with loading, data and checkpoints)"
    if trained_before > 0:
        times = f"this session {times}; the whole run {secs(result['elapsed_s'])} in training steps"
    print(f"done: {result['step']:,} steps, {result['tokens']:,} tokens; {times}")
    if result["refused_batches"]:
        print(f"refused batches (NaN/Inf): {result['refused_batches']:,}, not trained on (messages above)")
    if "mse" in m:  # none yet when stopped before the first logged step
        print(f"final metrics (last logged steps): mse {m['mse']:.4g}  fvu {m['fvu']:.4f}  "
              f"l0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}")
    print(f"final SAE: {result['checkpoint']} (SAELens layout; fastsae.load({str(out)!r}) and "
          f"`fastsae convert {out} DST` read a run folder's newest checkpoint)")
    print(f"metrics: {out / 'metrics.jsonl'}")
    exported = trainer.export_sae()  # collective when sharded; None on ranks other than 0
    if exported is None:
        return 0
    if hasattr(data, "score"):
        print(f"mean max cosine similarity to the {data.n_features} true features: {data.score(exported):.4f}")
    evaluation = None
    # A transcoder's eval compares its output with the targets (and splices it in at --hook-out);
    # its feature report and browser show what its latents read at --hook-in.
    if args.eval_tokens > 0:
        from fastsae.evals import evaluate, format_metrics, tail_chunk

        eval_started = time.perf_counter()
        try:
            evaluation = evaluate(exported, data, max_tokens=args.eval_tokens,
                                  first_chunk=tail_chunk(data, args.eval_tokens))
            print(f"\neval (`fastsae eval`) on the data's last {evaluation['n_tokens']:,} tokens "
                  f"(a slice of the training data, not held out from it; {time.perf_counter() - eval_started:.1f} s):")
            print(format_metrics(evaluation))
        except (OSError, ValueError) as exc:  # the trained SAE is saved whatever happens here
            print(f"fastsae train: no eval: {exc}", file=sys.stderr)
    if hasattr(data, "tokenizer") and args.report_features > 0:
        from fastsae.training.report import feature_report

        print()
        print(feature_report(exported, data, n_features=args.report_features))
    if hasattr(data, "tokenizer") and args.browser_tokens > 0:
        from fastsae import runs
        from fastsae.browse import build_browser

        browse_started = time.perf_counter()
        try:
            site = build_browser(exported, data, runs.browser_dir(out), max_tokens=args.browser_tokens, title=out.name,
                                 metrics=evaluation)
            print(f"\nbrowser of the features: {site.resolve().as_uri()} (open it in a browser; "
                  f"{time.perf_counter() - browse_started:.1f} s; `fastsae browse {out}` rebuilds it)")
        except (OSError, ValueError) as exc:  # the trained SAE is saved whatever happens here
            print(f"fastsae train: no feature browser: {exc}", file=sys.stderr)
    summary = {k: v for k, v in m.items()}
    if evaluation is not None:
        summary["eval"] = nan_as_null(evaluation)  # NaN as null: summary.json stays strict JSON
    summary["checkpoint"] = str(result["checkpoint"])
    summary["refused_batches"] = result["refused_batches"]
    summary["training_s_this_session"] = this_session
    summary["wall_s_this_session"] = wall
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return 0
