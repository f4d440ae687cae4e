"""ReLU training steps on the row-wise sparse path (fastsae::threshold_encode + sparse decode and
backward) against the dense path, as the activations get denser: where the sparse path stops
paying, which is what `SAE.sparse_width_limit` (its default: `SAE.default_sparse_width_limit`)
should say. (The op alone against a bare matrix product: benchmarks/bench_cpp_threshold_encode.py.)

    python benchmarks/bench_sparse_path.py [--rows 2048 --d-in 768 --d-sae 16384]
        [--device cpu|cuda] [--json benchmarks/results/sparse-path-<device>-<date>.json]

For each target density the encoder bias is shifted so that the batch's mean row count (L0) is
about the target; the widest row (m, the sparse form's width) is reported too. Each step is a
ReLU + L1 `training_forward`, backward and fastsae's Adam, timed as `fastsae bench` times
(alternating rounds on CPU; CUDA events with the L2 flushed on GPU), medians of --repeats. Also the encode alone (`encode_sparse` vs the dense
pre-activations + ReLU). A benchmark reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys

import torch

import fastsae
from fastsae.bench import harness
from fastsae.training.optim import Adam


def _bias_for_l0(sae, x, target_l0: float) -> float:
    """The shift of b_enc that makes the mean number of positive pre-activations per row ~target."""
    with torch.no_grad():
        pre = sae._pre_dense(x[:512]).float()
        q = 1.0 - target_l0 / sae.d_sae
        return -float(torch.quantile(pre.flatten()[:: max(1, pre.numel() // 2_000_000)], q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--l0", type=float, nargs="+", default=[16, 64, 256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    torch.manual_seed(0)
    base = fastsae.SAE(d_in=args.d_in, d_sae=args.d_sae, architecture="relu", dtype=dtype, device=str(device))
    x = torch.randn(args.rows, args.d_in, device=device, dtype=base.dtype)
    print(f"ReLU step, {dtype}, rows {args.rows}, d_in {args.d_in}, d_sae {args.d_sae}, device {device}, "
          f"backend {fastsae.ops.select(device)[0]}, default sparse_width_limit {base.default_sparse_width_limit()}")
    print(f"{'L0':>7}{'widest':>8}{'sparse ms':>11}{'dense ms':>10}{'dense/sparse':>14}"
          f"{'encode sparse':>15}{'encode dense':>14}")
    rows = []
    for target in args.l0:
        paths = {}
        for path, limit in (("sparse", args.d_sae), ("dense", 0)):
            sae = fastsae.SAE(base.cfg)
            sae.load_state_dict(base.state_dict())
            with torch.no_grad():
                sae.b_enc.add_(_bias_for_l0(sae, x, target))
            sae.sparse_width_limit = limit
            paths[path] = (sae, Adam(sae.parameters(), lr=1e-5))
        with torch.no_grad():
            positive = paths["dense"][0]._pre_dense(x) > 0
            l0, widest = positive.sum(-1).float().mean().item(), int(positive.sum(-1).max())

        def step(sae, opt):
            harness.train_step(sae, opt, x, sparsity_coefficient=1e-3)

        def encode(sae):
            with torch.no_grad():
                return sae.encode_sparse(x) if sae.sparse_width_limit else sae._pre_dense(x).relu()

        fns = {}
        for path in ("sparse", "dense"):
            fns[path] = lambda path=path: step(*paths[path])
            fns[f"encode_{path}"] = lambda path=path: encode(paths[path][0])
        # CPU: rounds alternate the contenders, so load from other processes falls on all of them
        times = harness.time_alternating(fns, device, reps=args.repeats, warmup=1)
        med = {name: t.median_ms for name, t in times.items()}
        row = {"target_l0": target, "l0": l0, "widest": widest, "ratio_widest_to_d_sae": widest / args.d_sae,
               "sparse_step_ms": med["sparse"], "dense_step_ms": med["dense"],
               "encode_sparse_ms": med["encode_sparse"], "encode_dense_ms": med["encode_dense"]}
        rows.append(row)
        print(f"{l0:7.1f}{widest:8d}{med['sparse']:11.1f}{med['dense']:10.1f}{med['dense'] / med['sparse']:13.2f}x"
              f"{med['encode_sparse']:15.1f}{med['encode_dense']:14.1f}")
    if args.json:
        meta = {"sweep": "relu_sparse_path_vs_l0", "device": str(device), "dtype": dtype, "rows": args.rows, "d_in": args.d_in, "d_sae": args.d_sae,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "date": _dt.date.today().isoformat(),
                "backend": fastsae.ops.select(device)[0]}
        harness.write_json({"meta": meta, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
