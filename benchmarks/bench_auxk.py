"""The TopK training step with AuxK against the same step without a dead mask, in one run.

For each shape, one SAE and one batch per contender: the step (training_forward, backward, Adam:
the trainer's Adam) without a mask, and with a dead mask of 0%, 1% and 10% random latents (AuxK on,
`k_aux` d_in / 2, the mask passed as `fastsae train` passes it on the CPU). Rounds alternate the
contenders (so load on a shared machine hits them alike); medians are kept and each ratio is
against the mask-less step's median. Targets (issue 21, the CPU's): 1.05x / 1.10x / 1.20x.

    python3 benchmarks/bench_auxk.py --json benchmarks/results/auxk-cpu-<date>.json
    python3 benchmarks/bench_auxk.py --device cuda --shape 4096,768,24576,32 ...   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

import torch

import fastsae
from fastsae.bench import harness
from fastsae.training.optim import make_adam

SHAPES = ["2048,256,4096,16", "2048,768,16384,32"]
DEAD_FRACTIONS = (0.0, 0.01, 0.10)
TARGETS = {0.0: 1.05, 0.01: 1.10, 0.10: 1.20}


def measure(shape: str, device: torch.device, dtype: torch.dtype, rounds: int, backend: str) -> dict:
    n, d_in, d_sae, k = (int(v) for v in shape.split(","))
    contenders = {}
    generator = torch.Generator().manual_seed(1)
    for frac in (None, *DEAD_FRACTIONS):
        torch.manual_seed(0)
        sae = fastsae.SAE(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, device=str(device),
                          dtype=str(dtype).removeprefix("torch."))
        opt = make_adam(sae.parameters(), lr=1e-5, device=device)
        x = torch.randn(n, d_in, device=device, dtype=dtype)
        mask = None
        if frac is not None:
            mask = torch.zeros(d_sae, dtype=torch.bool)
            mask[torch.randperm(d_sae, generator=generator)[: round(frac * d_sae)]] = True
            mask = mask.to(device)

        def step(sae=sae, opt=opt, x=x, mask=mask):
            with fastsae.use_backend(backend):
                harness.train_step(sae, opt, x, dead_mask=mask)
        contenders["none" if frac is None else f"{frac:.0%}"] = harness.synced(step, device)
    # two warm-up rounds (the extension, the allocator)
    times = harness.time_rounds(contenders, reps=rounds, warmup=2)
    base = times["none"].median_ms
    rows = []
    for name, t in times.items():
        frac = None if name == "none" else float(name.rstrip("%")) / 100
        row = {"shape": shape, "dead": name, "dead_fraction": frac, "ms": t.median_ms, "ms_min": t.min_ms,
               "ms_max": t.max_ms, "x_no_mask": t.median_ms / base, "samples": t.samples}
        if frac is not None:
            row["target"] = TARGETS[frac]
            row["met"] = row["x_no_mask"] <= TARGETS[frac]
        rows.append(row)
        print(f"{shape} {name:>5}: {row['ms']:8.1f} ms ({row['ms_min']:.1f}-{row['ms_max']:.1f})  "
              f"{row['x_no_mask']:.3f}x the step without a mask" + (f"  (target {row['target']:.2f}x)" if frac is not None else ""),
              flush=True)
    return {"shape": shape, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--shape", action="append", metavar="N,D_IN,D_SAE,K", help=f"default: {SHAPES}")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"device": harness.device_model(device), "device_type": device.type, "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "backend": fastsae.ops.select(device)[0] if args.backend == "auto" else args.backend,
              "date": dt.date.today().isoformat(), "rounds": args.rounds, "load_average": os.getloadavg(),
              "shapes": [measure(s, device, dtype, args.rounds, args.backend) for s in args.shape or SHAPES]}
    result["load_average_after"] = os.getloadavg()
    if args.json:
        harness.write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
