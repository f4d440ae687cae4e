"""The ReLU / JumpReLU row-wise sparse encode on CPU (fastsae.ops.threshold_encode): the `cpp`
kernel against its floor and the pure-torch reference, through the public API.

    python benchmarks/bench_cpp_threshold_encode.py [--rows 2048 --d-in 768 --d-sae 16384 --kept 0.01 0.05]

For each kept fraction, b_enc is set so that a ReLU cutoff (0) keeps about that fraction of the
pre-activations (x ~ N(0, 1), W_enc rows ~ N(0, 1/d_in), so x . w ~ N(0, 1)). Timed (fp32,
medians over --repeats rounds that alternate the contenders, so that load from other processes
falls on all of them alike):
  cpp     fastsae.ops.threshold_encode, backend "cpp" (blocked tiles, kept lists, [N, m] outputs)
  torch   the same, backend "torch" (fastsae.reference: row-chunked addmm, nonzero, scatter)
  floor   torch.addmm(b_enc, x, W_enc.T) into a preallocated [N, d_sae] output
Memory: each contender runs in a fresh process (Linux) after a warm-up on 8 rows; reported is
the peak resident memory of one call above the resident memory just before it, next to the size
of its [N, m] outputs and of a dense [N, d_sae] fp32 matrix.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from statistics import NormalDist

import torch

import fastsae
from fastsae import ops

CONTENDERS = ("cpp", "torch", "floor")


def make_inputs(args, kept: float, rows: int | None = None):
    torch.manual_seed(0)
    rows = rows or args.rows
    x = torch.randn(rows, args.d_in)
    enc = torch.randn(args.d_sae, args.d_in) / args.d_in**0.5
    # P(N(0, 1) + b > 0) = kept
    b_enc = torch.full((args.d_sae,), NormalDist().inv_cdf(kept)) + 0.05 * torch.randn(args.d_sae)
    cutoff = torch.zeros(args.d_sae)
    return x, enc, b_enc, cutoff


def encode(name: str, x, enc, b_enc, cutoff, out=None):
    if name == "floor":
        return torch.addmm(b_enc, x, enc.t(), out=out)
    with fastsae.use_backend(name):
        return ops.threshold_encode(x, enc, b_enc, None, None, cutoff, enc.shape[0])


def run_timing(args, kept: float) -> tuple[dict, dict]:
    x, enc, b_enc, cutoff = make_inputs(args, kept)
    dense = torch.empty(args.rows, args.d_sae)
    for name in CONTENDERS:
        encode(name, x, enc, b_enc, cutoff, dense)  # warm-up (builds the extension)
    values, _, counts = encode("cpp", x, enc, b_enc, cutoff)
    shape = {"kept": counts.double().mean().item() / args.d_sae, "width": values.shape[1],
             "max_count": int(counts.max())}
    times = {name: [] for name in CONTENDERS}
    for _ in range(args.repeats):
        for name in CONTENDERS:
            t0 = time.perf_counter()
            encode(name, x, enc, b_enc, cutoff, dense)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}, shape


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_child(args) -> None:
    """In a fresh process: peak resident memory of one call of `args.memory_of` above before it."""
    kept = args.kept[0]
    encode(args.memory_of, *make_inputs(args, kept, rows=8))  # loads the extension, warms up
    x, enc, b_enc, cutoff = make_inputs(args, kept)
    dense = torch.empty(args.rows, args.d_sae) if args.memory_of == "floor" else None
    if dense is not None:
        dense.fill_(0)  # resident before the call: the floor writes a preallocated output
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _rss_kib("VmRSS")
    encode(args.memory_of, x, enc, b_enc, cutoff, dense)
    print(json.dumps({"call_mib": (_rss_kib("VmHWM") - before) / 1024}))


def run_memory(args, kept: float) -> dict:
    out = {}
    for name in CONTENDERS:
        cmd = [sys.executable, __file__, "--memory-of", name, "--rows", str(args.rows), "--d-in", str(args.d_in),
               "--d-sae", str(args.d_sae), "--kept", str(kept), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])["call_mib"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--kept", type=float, nargs="+", default=[0.01, 0.05], help="fractions kept by the cutoff")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-of", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        measure_memory_child(args)
        return 0

    print(f"threshold encode (ReLU cutoff), fp32, rows {args.rows}, d_in {args.d_in}, d_sae {args.d_sae}, "
          f"{args.threads} threads, torch {torch.__version__}")
    dense_mib = args.rows * args.d_sae * 4 / 2**20
    for kept in args.kept:
        t, shape = run_timing(args, kept)
        out_mib = args.rows * shape["width"] * (4 + 8) / 2**20
        print(f"kept {shape['kept'] * 100:.2f}% (target {kept * 100:g}%), width m {shape['width']} "
              f"(largest row count {shape['max_count']}); outputs {out_mib:.1f} MiB, dense fp32 {dense_mib:.1f} MiB")
        mem = {} if args.no_memory else run_memory(args, kept)
        for name in CONTENDERS:
            line = f"  {name:6s}{t[name] * 1e3:8.1f} ms  {t[name] / t['floor']:5.2f}x floor"
            if mem:
                line += f"  peak above before the call {mem[name]:7.1f} MiB"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
