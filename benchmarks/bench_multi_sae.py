"""Several SAEs from one pass of the model against one run per hook, on this CPU.

MiniLM (the default model), its 6 layers `encoder.layer.*`, activations not cached, the same tokens:
one `fastsae train --hook 'encoder.layer.*'` against six `fastsae train --hook encoder.layer.N` (the
sum of their wall clocks, each a fresh process as a user would run it). The issue's target: <= 0.6x.

    python3 benchmarks/bench_multi_sae.py --tokens 100000 --out benchmarks/results/multi-sae-cpu-2026-12-04.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS = 6


def _train(hook: str, out: Path, tokens: int, threads: int) -> tuple[list[str], float]:
    command = [sys.executable, "-m", "fastsae.cli", "train", "--hook", hook, "--tokens", str(tokens),
               "--activation-cache", "none", "--threads", str(threads), "--out", str(out), "--no-progress",
               "--browser-tokens", "0", "--report-features", "0", "--eval-tokens", "0"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return command, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        several_command, several_s = _train("encoder.layer.*", Path(tmp) / "several", args.tokens, args.threads)
        singles = [_train(f"encoder.layer.{layer}", Path(tmp) / f"single{layer}", args.tokens, args.threads)
                   for layer in range(LAYERS)]
    single_s = [seconds for _, seconds in singles]
    result = {
        "what": "one run of 6 SAEs (MiniLM encoder.layer.*) against six single runs, activations not cached",
        "tokens": args.tokens,
        "threads": args.threads,
        "several": {"command": " ".join(several_command), "wall_s": several_s},
        "singles": [{"command": " ".join(command), "wall_s": seconds} for command, seconds in singles],
        "singles_sum_s": sum(single_s),
        "ratio": several_s / sum(single_s),
        "target_ratio": 0.6,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
