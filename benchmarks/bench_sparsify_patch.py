"""sparsify's own SparseCoder training step with fastsae's patch against without, in one run.

The step is what sparsify's Trainer does per hook point with `loss_fn="fvu"`: the installed
sparsify's `SparseCoder.forward(x, dead_mask=...)` (encode, decode, FVU, AuxK) and the backward
of fvu + auxk_alpha * auxk_loss, on a SparseCoder at N-d_in-d_sae-k (default 2048-768-16384-32),
with 1% of the latents dead (AuxK on). Contenders: sparsify unpatched (its torch path on a CPU:
`eager_decode`, what SPARSIFY_DISABLE_TRITON=1 selects; its default decoder is a GPU-only Triton
kernel) and patched (`apply_to_sparsify()`); with `--multi-topk`, both again with
`multi_topk=True` (sparsify's Multi-TopK loss, fvu + multi_topk_fvu / 8 as its Trainer). Rounds
alternate the contenders so load on a shared machine hits them alike; medians are kept; ratios are
against the unpatched median of the same configuration.

    python3 benchmarks/bench_sparsify_patch.py --json benchmarks/results/sparsify-patch-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fastsae.bench import harness

AUXK_ALPHA = 1 / 32


def _make(shape, dead_fraction, multi_topk=False, seed=0):
    from sparsify import SparseCoder, SparseCoderConfig

    n, d_in, d_sae, k = shape
    torch.manual_seed(seed)
    sc = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k, multi_topk=multi_topk), dtype=torch.float32)
    with torch.no_grad():
        sc.encoder.bias.normal_(0, 0.01)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae)[: round(dead_fraction * d_sae)]] = True
    x = torch.randn(n, d_in)

    def step():
        for p in sc.parameters():
            p.grad = None
        out = sc(x, dead_mask=dead)
        (out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        return out

    return step


def main() -> None:
    import sparsify
    import sparsify.sparse_coder as sparse_coder_module
    import sparsify.utils as sparsify_utils

    from fastsae.integrations import apply_to_sparsify, revert_sparsify

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048,768,16384,32", help="N,d_in,d_sae,k")
    parser.add_argument("--dead", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--multi-topk", action="store_true", help="also time multi_topk=True")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4:
        raise ValueError(f"--shape: expected N,d_in,d_sae,k, got {args.shape!r}")
    if not torch.cuda.is_available():
        sparse_coder_module.decoder_impl = sparsify_utils.eager_decode  # sparsify's torch path

    contenders = {
        "sparsify": ("sparsify", False, _make(shape, args.dead)),
        "sparsify+fastsae": ("sparsify", True, _make(shape, args.dead)),
    }
    if args.multi_topk:
        contenders["sparsify multi_topk"] = ("sparsify multi_topk", False, _make(shape, args.dead, multi_topk=True))
        contenders["sparsify+fastsae multi_topk"] = ("sparsify multi_topk", True, _make(shape, args.dead, multi_topk=True))

    def run(patched, step):
        revert_sparsify()
        if patched:
            apply_to_sparsify()
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        revert_sparsify()
        return elapsed

    for _, patched, step in contenders.values():  # warm-up
        run(patched, step)
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, (_, patched, step) in contenders.items():
            times[name].append(run(patched, step))
    rows = []
    for name, (base_name, _, _) in contenders.items():
        base = statistics.median(times[base_name])
        median = statistics.median(times[name])
        rows.append({"contender": name, "median_s": median, "times_s": times[name],
                     "speedup_vs_unpatched": base / median})
    for row in rows:
        print(f"{row['contender']:32s} {row['median_s']:8.3f} s  {row['speedup_vs_unpatched']:5.2f}x")
    result = {
        "what": "sparsify SparseCoder training step (forward with dead_mask + backward of fvu + auxk_alpha * auxk_loss"
                " [+ multi_topk_fvu / 8]), patched by fastsae.apply_to_sparsify vs not",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "shape": dict(zip(("N", "d_in", "d_sae", "k"), shape)),
        "dead_fraction": args.dead,
        "auxk_alpha": AUXK_ALPHA,
        "rounds": args.rounds,
        "torch_threads": args.threads,
        "sparsify_decoder": sparse_coder_module.decoder_impl.__name__,
        "note": "shared machine: 2 cores shared with other jobs, so one torch thread; rounds alternate the contenders",
        "machine": {"platform": platform.platform(), "processor": harness.device_model(), "cpu_count": os.cpu_count(),
                    "loadavg": os.getloadavg()},
        "versions": {"torch": torch.__version__, "sparsify": sparsify.__version__},
        "results": rows,
    }
    if args.json:
        harness.write_json(result, args.json)


if __name__ == "__main__":
    main()
