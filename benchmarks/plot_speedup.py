"""Speed-up of each backend over the pure-torch baselines as d_sae grows; writes a PNG and the
rows behind it.

    python3 benchmarks/plot_speedup.py [--device cpu|cuda] [--ops train_step,encode] [--out DIR]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastsae.bench.runner import Shape, default_results_path, run_bench, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ops", default="train_step,encode")
    p.add_argument("--d-sae", default=None, help="comma-separated d_sae values")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.device == "cuda":
        n, d_in, k, sweep = 4096, 768, 32, [8192, 24576, 65536, 131072]
    else:
        n, d_in, k, sweep = 1024, 256, 16, [2048, 4096, 8192, 16384, 32768]
    if args.d_sae:
        sweep = [int(v) for v in args.d_sae.split(",")]
    ops = tuple(args.ops.split(","))
    result = run_bench(device=args.device, ops=ops, shapes=[Shape(n, d_in, s, k) for s in sweep])
    result["meta"]["sweep"] = "d_sae"
    stem = default_results_path(result).stem + "-sweep-d_sae"
    out = Path(args.out)
    write_json(result, out / f"{stem}.json")

    fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        rows = [r for r in result["rows"] if r["op"] == op and not r["is_baseline"]]
        for backend in sorted({r["backend"] for r in rows}):
            for baseline, style in (("torch-dense", "-o"), ("torch-sparse", "--s")):
                pts = sorted((r["d_sae"], r["speedup"]) for r in rows if r["backend"] == backend and r["baseline"] == baseline)
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=f"{backend} vs {baseline}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_sae")
        ax.set_ylabel("speed-up (x)")
        ax.set_title(f"{op}, N={n}, d_in={d_in}, k={k}")
        ax.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"fastsae on {meta['device']} ({meta['dtype']}, {meta['date']})", fontsize=9)
    fig.tight_layout()
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
