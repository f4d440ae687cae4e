"""SAELens' own training step with fastsae's patch against without, in one run.

The step is `SAETrainer._train_step` of the installed SAELens (training_forward_pass with AuxK,
firing statistics, backward, grad-norm clipping, Adam, schedulers) on a `TopKTrainingSAE` at
N-d_in-d_sae-k (default 2048-768-16384-32), with 1% of the latents dead (AuxK on); with
`--architecture standard|jumprelu`, on a StandardTrainingSAE / JumpReLUTrainingSAE whose b_enc puts
rows at about k active latents (a trained SAE's regime; a fresh ReLU SAE fires on half its latents
and takes SAELens' dense code under the patch). Contenders:
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
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fastsae.bench import harness


def _threshold_sae(architecture: str, d_in: int, d_sae: int, l0: int, x: torch.Tensor):
    """A StandardTrainingSAE or JumpReLUTrainingSAE in a trained SAE's sparsity regime: each
    latent's b_enc puts its pre-activation above 0 (the threshold for JumpReLU) on a fraction
    l0 / d_sae of the batch's rows, so rows hold about l0 active latents."""
    from sae_lens.saes import (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, StandardTrainingSAE,
                               StandardTrainingSAEConfig)

    if architecture == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=1.0))
    else:
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l0_coefficient=1.0))
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc
        cut = pre.quantile(1 - l0 / d_sae, dim=0)
        offset = sae.threshold.detach() if architecture == "jumprelu" else 0.0
        sae.b_enc.copy_(offset - cut)
    return sae


def _make(shape, dead_fraction, seed=0, sparse=False, architecture="topk"):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    n, d_in, d_sae, k = shape
    torch.manual_seed(seed)
    x = torch.randn(n, d_in)
    if architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, use_sparse_activations=sparse))
    elif architecture == "batchtopk":
        from sae_lens.saes import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    elif architecture == "matryoshka_batchtopk":
        from sae_lens.saes import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k=k, matryoshka_widths=list(matryoshka_levels(d_sae))))
    else:
        sae = _threshold_sae(architecture, d_in, d_sae, k, x)
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

    def step():
        trainer.n_forward_passes_since_fired.zero_()
        trainer.n_forward_passes_since_fired[dead] = window + 1  # the same dead set every step
        step.last = trainer._train_step(sae, x)  # its L0 is read after the timing
        path = sae.__dict__.get("_fastsae_sparse_path")  # threshold families: did the last call fit?
        step.sparse_path = path is not None and path.hint and path.overflow_backoff == 1
        return step.last

    return step


def matryoshka_levels(d_sae: int) -> tuple[int, ...]:
    return (d_sae // 16, d_sae // 4, d_sae)


_CLASSES = {"topk": "TopKTrainingSAE (AuxK on)", "batchtopk": "BatchTopKTrainingSAE (AuxK on)",
            "matryoshka_batchtopk": "MatryoshkaBatchTopKTrainingSAE (levels d_sae/16, d_sae/4, d_sae; AuxK on)", "standard": "StandardTrainingSAE (ReLU + L1)",
            "jumprelu": "JumpReLUTrainingSAE (step L0 loss)"}


def main() -> None:
    import sae_lens

    from fastsae.integrations import apply_to_saelens, revert_saelens

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048,768,16384,32", help="N,d_in,d_sae,k (for standard/jumprelu, k is the rows' L0)")
    parser.add_argument("--architecture", choices=("topk", "batchtopk", "matryoshka_batchtopk", "standard", "jumprelu"), default="topk",
                        help="the SAELens training class: TopK, BatchTopK, Matryoshka BatchTopK (AuxK on for these), "
                             "StandardTrainingSAE (ReLU + L1) or JumpReLUTrainingSAE")
    parser.add_argument("--dead", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--note", default="rounds alternate the contenders", help="written into the results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4:
        raise ValueError(f"--shape: expected N,d_in,d_sae,k, got {args.shape!r}")

    arch = args.architecture
    contenders = {
        "saelens": (None, _make(shape, args.dead, architecture=arch)),
        "saelens+fastsae": (True, _make(shape, args.dead, architecture=arch)),
        "saelens+fastsae (no dense hidden_pre)": (False, _make(shape, args.dead, architecture=arch)),
    }
    if arch == "topk":
        contenders["saelens+fastsae (no dense hidden_pre, use_sparse_activations)"] = (
            False, _make(shape, args.dead, sparse=True))

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
    for _, step in contenders.values():
        acts = step.last.feature_acts
        acts = acts.to_dense() if acts.is_sparse else acts
        step.l0 = float((acts != 0).sum(-1).float().mean())
    base = statistics.median(times["saelens"])
    rows = [
        {"contender": name, "median_s": statistics.median(t), "times_s": t,
         "speedup_vs_saelens": base / statistics.median(t), "l0": contenders[name][1].l0,
         **({"sparse_path": contenders[name][1].sparse_path} if arch in ("standard", "jumprelu") and name != "saelens" else {})}
        for name, t in times.items()
    ]
    for row in rows:
        print(f"{row['contender']:64s} {row['median_s']:8.3f} s  {row['speedup_vs_saelens']:5.2f}x  L0 {row['l0']:.1f}"
              + (f"  sparse path {row['sparse_path']}" if "sparse_path" in row else ""))
    result = {
        "what": f"SAELens SAETrainer._train_step on {_CLASSES[arch]}, patched by fastsae.apply_to_saelens vs not",
        "architecture": arch,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "shape": dict(zip(("N", "d_in", "d_sae", "target_l0" if arch in ("standard", "jumprelu") else "k"), shape)),
        "dead_fraction": args.dead,
        "rounds": args.rounds,
        "torch_threads": args.threads,
        "note": args.note,
        "machine": {"platform": platform.platform(), "processor": harness.device_model(), "cpu_count": os.cpu_count(),
                    "loadavg": os.getloadavg()},
        "versions": {"torch": torch.__version__, "sae_lens": sae_lens.__version__},
        "results": rows,
    }
    if args.json:
        harness.write_json(result, args.json)


if __name__ == "__main__":
    main()
