"""The feature browser's statistics pass against the encoding it rides on.

`fastsae browse` encodes each batch with `SAE.encode_sparse` and feeds the sparse activations to
`FeatureStatsAccumulator` (density, max/mean, histogram, top contexts with their windows). The
target: the statistics cost at most 2x the encoding of the same tokens. Both are timed here on
the same batches (encoded once, then the pass replayed), for each d_sae; the nearest-feature
search and the site writing are timed too, for the record.

    python benchmarks/bench_browse_stats.py                    # MiniLM layer 3 on pydoc, d_sae 3072 and 24576
    python benchmarks/bench_browse_stats.py --data random      # Gaussian rows (no transformers needed)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import fastsae
from fastsae.bench import harness
from fastsae.browse import FeatureStatsAccumulator, nearest_by_decoder


def rows_from(data: str, n: int, d_in: int, seed: int) -> tuple[torch.Tensor, object]:
    if data == "random":
        return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed)), None
    from fastsae.training.transformer import TransformerActivations

    src = TransformerActivations("minilm", hook="encoder.layer.3", text="pydoc", cache_dir="runs/activation-cache")
    parts, got = [], 0
    for i in range(len(src.chunk_sizes)):
        parts.append(src.load_chunk(i))
        got += parts[-1].shape[0]
        if got >= n:
            break
    return torch.cat(parts)[:n], src


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("minilm", "random"), default="minilm")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--d-sae", type=int, nargs="+", default=[3072, 24576])
    p.add_argument("--architecture", default="topk")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-rows", type=int, default=4096)
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", help="append the rows to this file")
    args = p.parse_args()

    torch.manual_seed(0)
    x, src = rows_from(args.data, args.tokens, 384, 0)
    positions = torch.arange(x.shape[0])
    batches = list(zip(x.split(args.batch_rows), positions.split(args.batch_rows)))
    print(f"{x.shape[0]:,} rows of width {x.shape[1]} ({args.data}), batches of {args.batch_rows}, "
          f"{torch.get_num_threads()} threads, {harness.device_model()}")
    rows = []
    for d_sae in args.d_sae:
        sae = fastsae.SAE(d_in=x.shape[1], d_sae=d_sae, architecture=args.architecture,
                          k=args.k if args.architecture in ("topk", "batchtopk") else None).eval()
        with torch.no_grad():
            sae.encode_sparse(batches[0][0])  # warm-up (first-use compilation, allocations)
            encoded = []

            def encode():
                encoded.clear()
                for part, pos in batches:
                    acts = sae.encode_sparse(part)
                    encoded.append((acts.values, acts.indices, pos))

            def stats_pass():
                acc = FeatureStatsAccumulator(d_sae, n_contexts=args.contexts)
                for values, indices, pos in encoded:
                    acc.update(values, indices, pos)
                return acc.finish()

            # best of --reps rounds (encode first: the stats pass reads what it encoded)
            best = {name: t.min_ms * 1e-3 for name, t in harness.time_rounds(
                {"encode": encode, "stats": stats_pass}, reps=args.reps, warmup=0).items()}
            t_encode, t_stats = best["encode"], best["stats"]
            t_nearest = harness.time_rounds(
                {"nearest": lambda: nearest_by_decoder(sae.W_dec, torch.arange(d_sae))}, reps=1, warmup=0
            )["nearest"].min_ms * 1e-3
            t_site = None
            if src is not None:
                from fastsae.browse import write_site

                stats = stats_pass()
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    write_site(stats, tmp, src.token_ids, src.tokenizer, sae.W_dec)
                    t_site = time.perf_counter() - start
        row = {"d_sae": d_sae, "tokens": x.shape[0], "data": args.data, "architecture": args.architecture,
               "encode_s": t_encode, "stats_s": t_stats, "ratio": t_stats / t_encode,
               "nearest_all_s": t_nearest, "write_site_s": t_site, "threads": torch.get_num_threads()}
        rows.append(row)
        print(f"d_sae {d_sae:6d}: encode {t_encode:6.2f} s  stats pass {t_stats:6.2f} s  ratio {row['ratio']:.2f}x "
              f"(target <= 2x)  nearest (all features) {t_nearest:5.2f} s"
              + (f"  write site {t_site:5.2f} s" if t_site is not None else ""), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
