"""The ReLU / JumpReLU row-wise sparse encode on CPU (fastsae.ops.threshold_encode): the `cpp`
kernel against its floor and the pure-torch reference, through the public API.

    python benchmarks/bench_cpp_threshold_encode.py [--rows 2048 --d-in 768 --d-sae 16384 --kept 0.01 0.05]

For each kept fraction, b_enc is set so that a ReLU cutoff (0) keeps about that fraction of the
pre-activations (x ~ N(0, 1), W_enc rows ~ N(0, 1/d_in), so x . w ~ N(0, 1)). Timed (fp32,
medians over --repeats rounds that alternate the contenders, so that load from other processes
falls on all of them alike; fastsae.bench.harness):
  cpp     fastsae.ops.threshold_encode, backend "cpp" (blocked tiles, kept lists, [N, m] outputs)
  torch   the same, backend "torch" (fastsae.reference: row-chunked addmm, nonzero, scatter)
  floor   torch.addmm(b_enc, x, W_enc.T) into a preallocated [N, d_sae] output
Memory: the rise of the resident-set peak in one call above the memory before it (Linux; freed
heap returned first), next to the size of the [N, m] outputs and of a dense [N, d_sae] matrix.
The floor's preallocated output is live before its call, so not counted.
"""

from __future__ import annotations

import argparse
import sys
from statistics import NormalDist

import torch

import fastsae
from fastsae import ops
from fastsae.bench import harness

CONTENDERS = ("cpp", "torch", "floor")


def make_inputs(args, kept: float):
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.d_in)
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


def run(args, kept: float) -> tuple[dict, dict, dict]:
    """Median milliseconds and peak memory (MiB above before the call) of each contender, and
    the selection's shape."""
    x, enc, b_enc, cutoff = make_inputs(args, kept)
    dense = torch.empty(args.rows, args.d_sae)
    fns = {name: (lambda name=name: encode(name, x, enc, b_enc, cutoff, dense)) for name in CONTENDERS}
    times = harness.time_rounds(fns, args.repeats)  # its warm-up round builds the extension
    values, _, counts = fns["cpp"]()
    shape = {"kept": counts.double().mean().item() / args.d_sae, "width": values.shape[1],
             "max_count": int(counts.max())}
    del values, counts
    mem = {}
    for name in CONTENDERS:
        peak = harness.peak_memory_bytes(fns[name], torch.device("cpu"))
        mem[name] = None if peak is None else peak / 2**20
    return {name: t.median_ms for name, t in times.items()}, mem, shape


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--kept", type=float, nargs="+", default=[0.01, 0.05], help="fractions kept by the cutoff")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"threshold encode (ReLU cutoff), fp32, rows {args.rows}, d_in {args.d_in}, d_sae {args.d_sae}, "
          f"{args.threads} threads, torch {torch.__version__}")
    dense_mib = args.rows * args.d_sae * 4 / 2**20
    for kept in args.kept:
        t, mem, shape = run(args, kept)
        out_mib = args.rows * shape["width"] * (4 + 8) / 2**20
        print(f"kept {shape['kept'] * 100:.2f}% (target {kept * 100:g}%), width m {shape['width']} "
              f"(largest row count {shape['max_count']}); outputs {out_mib:.1f} MiB, dense fp32 {dense_mib:.1f} MiB")
        for name in CONTENDERS:
            peak = "?" if mem[name] is None else f"{mem[name]:.1f}"
            print(f"  {name:6s}{t[name]:8.1f} ms  {t[name] / t['floor']:5.2f}x floor  peak above before the call {peak} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
