"""SAELens' own TopK training step with fastsae's patch against without, in one run.

The step is `SAETrainer._train_step` of the installed SAELens (training_forward_pass with AuxK,
firing statistics, backward, grad-norm clipping, Adam, schedulers) on a `TopKTrainingSAE` at
N-d_in-d_sae-k (default 2048-768-16384-32), with 1% of the latents dead (AuxK on). Contenders:
SAELens unpatched, patched (`apply_to_saelens()`, which also returns the dense hidden_pre), and
patched with `dense_hidden_pre=False`, and that with SAELens' `use_sparse_activations=True` (its COO
feature_acts, which its trainer reads for firing statistics; unpatched SAELens 6.54 fails that
config's backward with the default rescale_acts_by_decoder_norm, so it has no unpatched row). Rounds alternate the contenders so load on a shared machine
hits them alike; medians are kept; ratios are against the unpatched median.

    python3 benchmarks/bench_saelens_patch.py --json benchmarks/results/saelens-patch-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def _make(shape, dead_fraction, seed=0, sparse=False):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    n, d_in, d_sae, k = shape
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, use_sparse_activations=sparse))
    window = 1000
    cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=10**9,
        device="cpu", autocast=False, lr=1e-4, lr_end=1e-4, lr_scheduler_name="constant", lr_warm_up_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=n,
        dead_feature_window=window, feature_sampling_window=10**6, logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae)[: round(dead_fraction * d_sae)]] = True
    x = torch.randn(n, d_in)

    def step():
        trainer.n_forward_passes_since_fired.zero_()
        trainer.n_forward_passes_since_fired[dead] = window + 1  # the same dead set every step
        return trainer._train_step(sae, x)

    return step


def main() -> None:
    import sae_lens

    from fastsae.integrations import apply_to_saelens, revert_saelens

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048,768,16384,32", help="N,d_in,d_sae,k")
    parser.add_argument("--dead", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4:
        raise ValueError(f"--shape: expected N,d_in,d_sae,k, got {args.shape!r}")

    contenders = {
        "saelens": (None, _make(shape, args.dead)),
        "saelens+fastsae": (True, _make(shape, args.dead)),
        "saelens+fastsae (no dense hidden_pre)": (False, _make(shape, args.dead)),
        "saelens+fastsae (no dense hidden_pre, use_sparse_activations)": (False, _make(shape, args.dead, sparse=True)),
    }

    def run(setting, step):
        revert_saelens()
        if setting is not None:
            apply_to_saelens(dense_hidden_pre=setting)
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        revert_saelens()
        return elapsed

    for setting, step in contenders.values():  # warm-up
        run(setting, step)
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, (setting, step) in contenders.items():
            times[name].append(run(setting, step))
    base = statistics.median(times["saelens"])
    rows = [
        {"contender": name, "median_s": statistics.median(t), "times_s": t,
         "speedup_vs_saelens": base / statistics.median(t)}
        for name, t in times.items()
    ]
    for row in rows:
        print(f"{row['contender']:64s} {row['median_s']:8.3f} s  {row['speedup_vs_saelens']:5.2f}x")
    result = {
        "what": "SAELens SAETrainer._train_step on TopKTrainingSAE (AuxK on), patched by fastsae.apply_to_saelens vs not",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "shape": dict(zip(("N", "d_in", "d_sae", "k"), shape)),
        "dead_fraction": args.dead,
        "rounds": args.rounds,
        "torch_threads": args.threads,
        "note": "shared machine: 2 cores used by 4 agents at the time, so one torch thread; rounds alternate the contenders",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "loadavg": os.getloadavg()},
        "versions": {"torch": torch.__version__, "sae_lens": sae_lens.__version__},
        "results": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
