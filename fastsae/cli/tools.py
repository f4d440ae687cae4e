"""The small commands of `fastsae`: backends, bench, convert and aot."""

from __future__ import annotations

import argparse
import os
import sys


def _backends(args: argparse.Namespace) -> int:
    import torch

    from fastsae.ops import dispatch

    requested = dispatch.requested_backend()
    env = os.environ.get(dispatch.ENV_VAR, "").strip()
    print(f"requested: {requested} ({dispatch.ENV_VAR}={env})" if env
          else f"requested: {requested} (the default; {dispatch.ENV_VAR} is not set)")
    for device in ("cpu", "cuda"):
        if device == "cuda" and not _cuda_visible():
            # The backends would import, but nothing can run without a device.
            print("cuda: none (torch sees no CUDA device)")
            continue
        names = dispatch.available_backends(device)
        try:
            in_use = f"in use: {dispatch.select(torch.device(device))[0]}"
        except (ValueError, RuntimeError) as exc:
            in_use = f"in use: none, {exc}"
        print(f"{device}: {', '.join(names) or '-'} ({in_use})")
    return 0


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _bench(args: argparse.Namespace) -> int:
    from fastsae.bench import runner

    ops = tuple(args.ops.split(",")) if args.ops else runner.OPS
    for op in ops:
        if op not in runner.OPS:
            raise SystemExit(f"fastsae bench: --ops: expected some of {runner.OPS}, got {op!r}")
    backends = args.backends.split(",") if args.backends else None
    shapes = None
    if args.shape:
        try:
            shapes = [runner.Shape(*(int(v) for v in s.split(","))) for s in args.shape]
        except (TypeError, ValueError):
            raise SystemExit(f"fastsae bench: --shape: expected N,D_IN,D_SAE,K (integers), got {args.shape}")
    cases = runner.STEP_CASES
    if args.architectures:
        wanted = args.architectures.split(",")
        benched = sorted({case.architecture for case in runner.STEP_CASES})
        for name in wanted:
            if name not in benched:
                raise SystemExit(f"fastsae bench: --architectures: expected some of {benched}, got {name!r}")
        cases = tuple(case for case in runner.STEP_CASES if case.architecture in wanted)
    if args.transcoders != "include":
        cases = tuple(case for case in cases if case.transcoder == (args.transcoders == "only"))
    result = runner.run_bench(
        device=args.device, quick=args.quick, ops=ops, shapes=shapes, backends=backends, reps=args.reps,
        peers=args.peers.split(",") if args.peers else None, graph=args.graph, cases=cases,
    )
    if args.json:
        path = runner.write_json(result, runner.default_results_path(result) if args.json == "auto" else args.json)
        print(f"wrote {len(result['rows'])} rows to {path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Read a checkpoint in any format fastsae reads; write it as SAELens (default) or sparsify."""
    from pathlib import Path

    from fastsae import formats

    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        print(f"fastsae convert: error: {dst} exists and is not empty (pass --overwrite to write into it)", file=sys.stderr)
        return 2
    try:
        fmt = formats.detect(args.src)
        if fmt == "fastsae_run":
            from fastsae.runs import latest_checkpoint

            fmt = f"fastsae train run, newest checkpoint {latest_checkpoint(args.src).name}"
        loaded = formats.convert(args.src, dst, to=args.to)
    except (OSError, ValueError) as exc:
        print(f"fastsae convert: error: {exc}", file=sys.stderr)
        return 1
    saes = loaded if isinstance(loaded, dict) else {"": loaded}
    for name, sae in saes.items():
        where = dst / name if name else dst
        print(f"{args.src} ({fmt}{': ' + name if name else ''}) -> {where} ({args.to}): {sae}")
    return 0


def _aot(args: argparse.Namespace) -> int:
    """Compile every Triton kernel for a GPU architecture (no GPU needed) and report resources."""
    import json

    from fastsae.kernels import aot

    arch = int(args.arch.lower().removeprefix("sm_").rstrip("a"))
    header = f"{'kernel':<24} {'regs':>4} {'spill':>5} {'smem':>7} {'wgmma':>5}  config"
    print(header)

    def show(row: dict) -> None:
        print(f"{row['kernel']:<24} {row['registers']:>4} {row['spills']:>5} {row['shared_bytes']:>7} "
              f"{'yes' if row['uses_wgmma'] else 'no':>5}  {row['config']}", flush=True)

    rows = aot.run(arch, quick=args.quick, only=args.kernel, progress=show)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="time encode, decode and train_step against pure-torch baselines")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--quick", action="store_true", help="small shapes, about a minute on 2 CPU cores")
    bench.add_argument("--json", metavar="FILE", help="write the rows to FILE ('auto': benchmarks/results/<device>-<date>.json)")
    bench.add_argument("--ops", help="comma-separated subset of encode,decode,train_step")
    bench.add_argument("--backends", help="comma-separated backends (default: all that load for the device)")
    bench.add_argument("--reps", type=int, help="timed repetitions per contender")
    bench.add_argument("--shape", action="append", metavar="N,D_IN,D_SAE,K", help="custom shape (repeatable)")
    bench.add_argument("--architectures", help="comma-separated: time train_step for these architectures only "
                       "(default: every architecture the bench compares)")
    bench.add_argument("--transcoders", choices=("include", "only", "exclude"), default="include",
                       help="train_step: time the transcoder cases too (default), only them, or not")
    bench.add_argument("--peers", help="comma-separated of saelens,sparsify,saelens+fastsae,sparsify+fastsae (default: those importable, on cuda)")
    bench.add_argument("--graph", action="store_true", help="also time each backend's train_step captured as a CUDA graph")
    bench.set_defaults(func=_bench)


def add_other_parsers(sub) -> None:
    backends = sub.add_parser("backends", help="list the backends that load on this machine")
    backends.set_defaults(func=_backends)

    convert = sub.add_parser(
        "convert",
        help="convert a checkpoint (SAELens, sparsify, dictionary_learning, OpenAI .pt, Gemma Scope .npz)",
        description="Read SRC in any format fastsae reads (detected) and write DST as SAELens (default), sparsify, "
        "circuit-tracer or dictionary_learning.",
    )
    convert.add_argument("src", metavar="SRC", help="checkpoint folder or file")
    convert.add_argument("dst", metavar="DST", help="output folder")
    from fastsae.formats import SAVE_FORMATS

    convert.add_argument("--to", choices=SAVE_FORMATS, default="saelens", help="output format")
    convert.add_argument("--overwrite", action="store_true", help="write into DST even if it is not empty")
    convert.set_defaults(func=_convert)

    aot = sub.add_parser("aot", help="compile every Triton kernel for a GPU architecture and report registers, spills, shared memory")
    aot.add_argument("--arch", default="sm_90", help="target architecture, e.g. sm_90 (H100)")
    aot.add_argument("--json", help="write the rows (kernel, config, registers, spills, shared_bytes, uses_wgmma) here")
    aot.add_argument("--quick", action="store_true", help="one configuration per kernel")
    aot.add_argument("--kernel", help="only kernels whose name contains this")
    aot.set_defaults(func=_aot)
