"""Training throughput (tokens/s) against the number of processes: `fastsae train` on 1 process and
under `torchrun --nproc-per-node N`, data parallel and with --shard-latents.

    python benchmarks/bench_distributed.py [--ranks 1 2] [--device cpu|cuda]
        [--d-in 256 --d-sae 8192 --k 32 --batch-size 2048 --steps 60]
        [--json benchmarks/results/distributed-<device>-<date>.json]

Each configuration is one run on synthetic data (the CLI's own, with its normalisation, AuxK and
metrics). tokens/s is the mean of the runs' metrics rows after the first (which holds the
start-up: first passes, allocations). On the CPU the cores are split evenly between the
processes (OMP_NUM_THREADS = cores / N), so the comparison is of the same machine used as one
or N processes: there data parallelism pays only if one process could not keep the cores busy,
and sharding is about memory (each process holds 1/N of the weights and Adam state), not speed.
On GPUs (one per process) the throughput should grow with N. A benchmark reports; it asserts
nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from fastsae.bench import harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(ranks: int, shard: bool, args, out: Path) -> dict:
    flags = ["--data", "synthetic", "--synthetic-d-in", str(args.d_in), "--synthetic-features", str(2 * args.d_sae),
             "--synthetic-l0", "16", "--d-sae", str(args.d_sae), "--k", str(args.k), "--batch-size", str(args.batch_size),
             "--tokens", str(args.batch_size * args.steps), "--log-every", str(args.log_every), "--device", args.device,
             "--checkpoint-every", "100000", "--no-progress", "--out", str(out)]
    if shard:
        flags.append("--shard-latents")
    env = dict(os.environ)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    if ranks == 1:
        cmd = [sys.executable, "-m", "fastsae.cli", "train", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "fastsae.cli", "train", *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")]
    return {"ranks": ranks, "shard_latents": shard, "tokens_per_s": sum(steady) / len(steady) if steady else None,
            "windows": len(steady), "threads_per_process": env.get("OMP_NUM_THREADS"), "final_mse": rows[-1]["mse"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            for shard in (False, True) if ranks > 1 else (False,):
                result = _run(ranks, shard, args, Path(tmp) / f"r{ranks}-{'shard' if shard else 'dp'}")
                results.append(result)
                how = "latents sharded" if shard else ("data parallel" if ranks > 1 else "one process")
                tps = result["tokens_per_s"]
                print(f"{ranks} process(es), {how:>15}: {tps:12,.0f} tokens/s  (threads/process "
                      f"{result['threads_per_process']}, final mse {result['final_mse']:.4g})", flush=True)
    if args.json:
        report = {
            "benchmark": "bench_distributed", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "load_average": os.getloadavg()},
            "config": {k: v for k, v in vars(args).items() if k != "json"}, "results": results,
        }
        harness.write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
