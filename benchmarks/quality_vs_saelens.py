"""Training quality against SAELens at equal tokens and at equal wall-clock time (issue 27).

The head to head: all-MiniLM-L6-v2 at encoder.layer.3 on the pydoc corpus (the main job's data,
read from its activation cache, runs/activation-cache, computed there first when absent); the
last `--held-out` rows are held out, the rest is the training set. Both trainers: TopK, k 32,
d_sae 3072, batch 2048, 800k tokens, lr 1e-3, 1% warm-up, linear decay over the last 20%.

- fastsae: the `fastsae train` command's own settings (its parser and `_build`, so the CLI's
  defaults), on the training rows written as an activation file; `--trainer-set` / `--sae-set`
  override one TrainerConfig / SAEConfig field for ablations.
- SAELens (the real package, `pip install sae-lens`; skipped with a message when absent): its
  `SAETrainer` with `TopKTrainingSAE`, `normalize_activations="expected_average_only_in"`, its
  other defaults, fed the same rows, reshuffled every epoch.

Reported for each: FVU (sum ||x - x_hat||^2 / sum ||x - mean x||^2 over the held-out rows, raw
activations) and L0 on the held-out rows, and the seconds of training. Equal wall-clock: fastsae
is run again for as many tokens as its measured throughput fits in SAELens' fit time (its
schedule spread over that budget, as a user given those minutes would), and its time reported.

ReLU + L1 and JumpReLU (`--architecture relu|jumprelu`): SAELens' `StandardTrainingSAE` (its
`l1_coefficient`, `l1_warm_up_steps` 0, L1 of the activations times the decoder row norms) or
`JumpReLUTrainingSAE` (its `l0_coefficient`, "step" L0 loss, threshold 0.01, bandwidth 0.05,
`l0_warm_up_steps` 0), against `fastsae train --architecture relu|jumprelu --l1-coefficient C`.
The sparsity coefficient sets L0, so each trainer takes its own list of coefficients
(`--fastsae-coefficients`, `--saelens-coefficients`), one run per coefficient and seed, and the
comparison is made at matched held-out L0 (README, "Quality against SAELens"). No equal
wall-clock run for these (the coefficients differ per trainer); the seconds are reported.

    python3 benchmarks/quality_vs_saelens.py                 # the head to head, seeds 0 and 1
    python3 benchmarks/quality_vs_saelens.py --tokens 200000 --only fastsae --trainer-set grad_clip_norm=1.0
    python3 benchmarks/quality_vs_saelens.py --architecture relu --out runs/sweep/relu.json --append  # λ 4 and 5, seeds 0, 1
    python3 benchmarks/quality_vs_saelens.py --architecture jumprelu --tokens 300000 --seeds 0 \
        --fastsae-coefficients 0.003 0.03 0.3 --saelens-coefficients 0.003 0.03 0.3 --out runs/sweep/jumprelu.json --append
    python3 benchmarks/quality_vs_saelens.py --combine runs/sweep/*.json runs/sweep-lr/*.json   # the sweeps' runs in --out,
        # with the matched-L0 summary (the relu/jumprelu results file)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's fastsae, not another install's
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality-vs-saelens-cpu-2026-12-03.json"
DEFAULT_OUT_SPARSITY = ROOT / "benchmarks" / "results" / "quality-vs-saelens-relu-jumprelu-cpu-2026-12-03.json"
# relu/jumprelu: the coefficients run when none are given. relu: 4 and 5 in both give held-out L0
# ~24-34 at 800k tokens (README's matched-L0 table); jumprelu: L0 barely depends on it at these
# lengths (README), 0.03 as in its table.
DEFAULT_COEFFICIENTS = {"relu": {"fastsae": [4.0, 5.0], "saelens": [4.0, 5.0]},
                        "jumprelu": {"fastsae": [0.03], "saelens": [0.03]}}


def load_activations(cache: str) -> torch.Tensor:
    """All rows of the main job's data (MiniLM layer 3 on pydoc), through its activation cache."""
    from fastsae.training.transformer import TransformerActivations

    src = TransformerActivations(cache_dir=cache)
    return torch.cat([src.load_chunk(i) for i in range(len(src.chunk_sizes))])


@torch.no_grad()
def evaluate(encode_decode, x: torch.Tensor, batch: int = 4096) -> dict:
    """FVU and L0 of `encode_decode(x) -> (acts, x_hat)` on rows x (raw activations), and the
    latents that never fire on them."""
    err = 0.0
    l0 = 0.0
    fired = None
    for part in x.split(batch):
        acts, x_hat = encode_decode(part)
        err += (x_hat.double() - part.double()).pow(2).sum().item()
        l0 += (acts != 0).sum().item()
        hit = (acts != 0).any(0)
        fired = hit if fired is None else fired | hit
    var = (x.double() - x.double().mean(0)).pow(2).sum().item()
    return {"fvu": err / var, "l0": l0 / x.shape[0], "dead_on_held_out": int((~fired).sum().item())}


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def run_fastsae(train_file: Path, held: torch.Tensor, args, seed: int, tokens: int, out_dir: Path,
                coefficient: float | None = None) -> dict:
    """`fastsae train --data TRAIN` with the CLI's defaults (plus overrides), evaluated on `held`;
    relu/jumprelu with `--l1-coefficient coefficient`."""
    import fastsae
    from fastsae.cli import build_parser
    from fastsae.cli.train import build_run as _build
    from fastsae.training.data import ActivationFiles
    from fastsae.training.trainer import Trainer

    argv = ["train", "--data", str(train_file), "--d-sae", str(args.d_sae), "--k", str(args.k),
            "--batch-size", str(args.batch_size), "--tokens", str(tokens), "--lr", str(args.lr),
            "--seed", str(seed), "--no-progress", "--out", str(out_dir), "--overwrite"]
    if args.architecture != "topk":
        argv += ["--architecture", args.architecture, "--l1-coefficient", str(coefficient)]
    argv += args.fastsae_flags.split()
    cli_args = build_parser().parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(seed)
    data = ActivationFiles(str(train_file))
    sae, cfg = _build(cli_args, data)
    sae_over, trainer_over = _parse_sets(args.sae_set), _parse_sets(args.trainer_set)
    if sae_over:
        torch.manual_seed(seed)  # the same draw as the CLI's, with the changed settings
        sae = fastsae.SAE(dataclasses.replace(sae.cfg, **sae_over))
    if trainer_over:
        cfg = dataclasses.replace(cfg, **trainer_over)
    cfg.checkpoint_every_seconds = None
    trainer = Trainer(sae, data, cfg, out_dir, overwrite=True)
    trainer.train()
    wall = time.perf_counter() - started
    exported = trainer.export_sae()

    def encode_decode(x):
        acts = exported.encode(x)
        return acts, exported.decode(acts)

    row = evaluate(encode_decode, held)
    row.update(trainer="fastsae", architecture=args.architecture, coefficient=coefficient, seed=seed, tokens=trainer.tokens_seen, steps=trainer.step,
               train_s=trainer.elapsed, wall_s=wall, tokens_per_s=trainer.tokens_seen / trainer.elapsed,
               sae_overrides=sae_over, trainer_overrides=trainer_over, cli_flags=args.fastsae_flags,
               rescale_acts_by_decoder_norm=sae.cfg.rescale_acts_by_decoder_norm,
               trainer_cfg={k: v for k, v in cfg.to_dict().items() if k not in ("data",)})
    return row


def saelens_sae(args, d_in: int, coefficient: float | None):
    """SAELens' training SAE for --architecture, its defaults but for the sparsity setting."""
    common = dict(d_in=d_in, d_sae=args.d_sae, dtype="float32", device="cpu",
                  normalize_activations="expected_average_only_in")
    if args.architecture == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        return TopKTrainingSAE(TopKTrainingSAEConfig(k=args.k, **common))
    if args.architecture == "relu":
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=coefficient, **common))
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=coefficient, **common))


def run_saelens(train: torch.Tensor, held: torch.Tensor, args, seed: int, tokens: int,
                coefficient: float | None = None) -> dict:
    """SAELens' own SAETrainer + its training SAE (TopK, Standard, JumpReLU) on the same rows,
    evaluated on `held`."""
    from sae_lens import __version__ as saelens_version
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    steps = tokens // args.batch_size
    sae = saelens_sae(args, train.shape[1], coefficient)
    cfg = SAETrainerConfig(
        total_training_samples=steps * args.batch_size, train_batch_size_samples=args.batch_size, lr=args.lr,
        lr_end=args.lr, lr_warm_up_steps=max(1, steps // 100), lr_decay_steps=int(steps * 0.2), device="cpu",
        n_batches_for_norm_estimate=args.saelens_norm_batches)

    def provider():
        g = torch.Generator().manual_seed(seed)
        while True:  # each epoch a fresh permutation of the training rows
            order = torch.randperm(train.shape[0], generator=g)
            for start in range(0, train.shape[0] - args.batch_size + 1, args.batch_size):
                yield train[order[start : start + args.batch_size]]

    started = time.perf_counter()
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
    fitted = trainer.fit()  # the normalisation factor is folded in at the end
    fit_s = time.perf_counter() - started
    fitted.eval()

    def encode_decode(x):
        acts = fitted.encode(x)
        return acts, fitted.decode(acts)

    row = evaluate(encode_decode, held)
    row.update(trainer="saelens", version=saelens_version, architecture=args.architecture, coefficient=coefficient,
               seed=seed, tokens=trainer.n_training_samples,
               steps=trainer.n_training_steps, train_s=fit_s, wall_s=fit_s, tokens_per_s=trainer.n_training_samples / fit_s,
               dead_feature_window=cfg.dead_feature_window,
               sae_cfg={k: v for k, v in sae.cfg.to_dict().items() if k not in ("metadata",)})
    return row


def _fastsae_config(row: dict) -> str:
    """A fastsae row's settings in words (its flags and overrides that move it to SAELens' choices)."""
    flags, over = row.get("cli_flags") or "", row.get("trainer_overrides") or {}
    parts = [words for present, words in (("--b-dec-init zeros" in flags, "b_dec zeros"),
                                          (over.get("sparsity_warmup_fraction") == 0.0, "no warm-up"),
                                          ("--dead-strategy none" in flags, "no resampling")) if present]
    return "fastsae" + (" + " + ", ".join(parts) if parts else " defaults")


def _fvu_at_l0(points: list, target: float, reach: float = 1.5):
    """(FVU, how) at L0 `target` from (L0, FVU) points: linear between the two that bracket it, or
    along the nearest two's line when it lies at most `reach` beyond them; (None, None) otherwise."""
    pts = sorted(points)
    for (la, fa), (lb, fb) in zip(pts, pts[1:]):
        if la <= target <= lb:
            return (fa + (fb - fa) * (target - la) / (lb - la) if lb > la else (fa + fb) / 2), "interpolated"
    if len(pts) >= 2:
        for (la, fa), (lb, fb) in ((pts[0], pts[1]), (pts[-2], pts[-1])):
            if lb > la and min(abs(target - la), abs(target - lb)) <= reach:
                return fa + (fb - fa) * (target - la) / (lb - la), "extrapolated"
    return None, None


def combine(files: list, out: str) -> dict:
    """The runs of several results files (relu/jumprelu sweeps written with --append) in one file,
    with a matched-L0 summary: each fastsae run beside SAELens' FVU at its L0 (same architecture,
    seed, steps and lr)."""
    runs = []
    for name in files:
        with open(name) as f:
            d = json.load(f)
        runs.extend(d.get("runs", [d]))
    runs.sort(key=lambda r: r["date"])
    rows = [{**row, "lr": r["settings"]["lr"]} for r in runs for row in r["rows"] if row.get("architecture", "topk") != "topk"]
    summary = []
    for r in rows:
        if r["trainer"] != "fastsae":
            continue
        steps = r["tokens"] // 2048
        lens = [(o["l0"], o["fvu"]) for o in rows if o["trainer"] == "saelens" and o["architecture"] == r["architecture"]
                and o["seed"] == r["seed"] and o["lr"] == r["lr"] and abs(o["tokens"] // 2048 - steps) <= 1]
        ref, how = _fvu_at_l0(lens, r["l0"])
        summary.append({"architecture": r["architecture"], "tokens": r["tokens"], "lr": r["lr"], "seed": r["seed"],
                        "fastsae": _fastsae_config(r),
                        "coefficient": r["coefficient"], "l0": round(r["l0"], 2), "fvu": round(r["fvu"], 4),
                        "dead_on_held_out": r["dead_on_held_out"],
                        "saelens_fvu_at_this_l0": None if ref is None else round(ref, 4), "how": how,
                        "fastsae_over_saelens": None if ref is None else round(r["fvu"] / ref - 1, 4)})
    result = {
        "benchmark": "quality_vs_saelens", "issue": 27,
        "what": "ReLU + L1 and JumpReLU: SAELens (SAETrainer + StandardTrainingSAE / JumpReLUTrainingSAE, their "
                "defaults but the sparsity coefficient) against fastsae train --architecture relu|jumprelu "
                "--l1-coefficient C (its defaults, or with the flags and overrides each row records), at several "
                "coefficients; MiniLM layer 3 on pydoc, the last 16,384 rows held out; d_sae 3072, batch 2048, "
                "lr 1e-3 (the JumpReLU runs with lr 1e-2: each run's settings and each summary row say), 1% warm-up, decay over the last 20%, gradients clipped at 1, float32, one thread each on "
                "a shared 2-core CPU, several runs at once at times (the seconds are rough)",
        "matched_l0": "saelens_fvu_at_this_l0: SAELens' held-out FVU linearly interpolated in L0 between its two runs "
                      "(same seed, steps and lr) that bracket this fastsae run's L0, or along the line of its two nearest "
                      "runs when the L0 lies at most 1.5 beyond them (how: extrapolated); null otherwise",
        "combined_from": [Path(name).name for name in files],
        "summary": summary, "runs": runs,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    for row in summary:
        print(row)
    print(f"wrote {out}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--architecture", choices=("topk", "relu", "jumprelu"), default="topk")
    p.add_argument("--fastsae-coefficients", type=float, nargs="+",
                   help="relu: L1 / jumprelu: L0 coefficients for fastsae, one run each (--l1-coefficient)")
    p.add_argument("--saelens-coefficients", type=float, nargs="+",
                   help="relu: l1_coefficient / jumprelu: l0_coefficient values for SAELens, one run each")
    p.add_argument("--tokens", type=int, default=800_000)
    p.add_argument("--d-sae", type=int, default=3072)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--held-out", type=int, default=16384, help="the last rows, held out for evaluation")
    p.add_argument("--only", choices=("fastsae", "saelens"), help="run one trainer only")
    p.add_argument("--no-wallclock", action="store_true", help="skip the equal wall-clock run")
    p.add_argument("--fastsae-flags", default="", help="extra `fastsae train` flags, e.g. '--dead-strategy none'")
    p.add_argument("--trainer-set", action="append", help="TrainerConfig field=value for fastsae (ablations)")
    p.add_argument("--sae-set", action="append", help="SAEConfig field=value for fastsae (ablations)")
    p.add_argument("--saelens-norm-batches", type=int, default=4,
                   help="batches SAELens reads for its normalisation estimate (4 x 2048: fastsae's 8192 rows)")
    p.add_argument("--saelens-from", help="take SAELens' equal-token rows (same tokens, per seed) from this results JSON "
                   "instead of training again")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(ROOT / "runs" / "activation-cache"))
    p.add_argument("--work", default=str(ROOT / "runs" / "quality-vs-saelens"))
    p.add_argument("--out", help="results JSON ('-': print only; default: the topk or the relu/jumprelu file)")
    p.add_argument("--append", action="store_true", help="add this invocation to --out's list of runs instead of "
                   "replacing the file (relu/jumprelu sweeps)")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="train nothing: put these results files' runs (relu/jumprelu) in --out with a matched-L0 summary")
    args = p.parse_args(argv)
    if args.combine:
        combine(args.combine, args.out or str(DEFAULT_OUT_SPARSITY))
        return 0
    if args.out is None:
        args.out = str(DEFAULT_OUT if args.architecture == "topk" else DEFAULT_OUT_SPARSITY)
    if args.architecture == "topk":
        if args.fastsae_coefficients or args.saelens_coefficients:
            p.error("--fastsae-coefficients / --saelens-coefficients: relu and jumprelu only")
        fast_coefs, lens_coefs = [None], [None]
    else:
        fast_coefs = args.fastsae_coefficients or DEFAULT_COEFFICIENTS[args.architecture]["fastsae"]
        lens_coefs = args.saelens_coefficients or DEFAULT_COEFFICIENTS[args.architecture]["saelens"]
        args.no_wallclock = True
    torch.set_num_threads(args.threads)

    x = load_activations(args.cache)
    train, held = x[: -args.held_out].contiguous(), x[-args.held_out :].contiguous()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_file = work.parent / "quality-vs-saelens-train.safetensors"  # shared by runs in other --work folders
    if not train_file.exists() or os.path.getsize(train_file) < train.numel() * 4:
        from safetensors.torch import save_file

        tmp = train_file.with_suffix(f".{os.getpid()}.tmp")
        save_file({"activations": train}, str(tmp))
        os.replace(tmp, train_file)  # atomic: concurrent runs never read a half-written file
    print(f"data: {train.shape[0]:,} training rows, {held.shape[0]:,} held out, d_in {x.shape[1]}", flush=True)

    have_saelens = args.only != "fastsae"
    if have_saelens:
        try:
            import sae_lens  # noqa: F401
        except ModuleNotFoundError:
            print("sae-lens is not installed (pip install sae-lens): SAELens' runs skipped", flush=True)
            have_saelens = False
    rows = []
    reuse = {}
    if args.saelens_from:  # SAELens' rows of an earlier run of the same settings
        with open(args.saelens_from) as f:
            earlier = json.load(f)
        for row in earlier["rows"]:
            if (row["trainer"] == "saelens" and row["comparison"] == "equal_tokens"
                    and row["tokens"] // args.batch_size == args.tokens // args.batch_size
                    and row.get("architecture", "topk") == args.architecture):
                reuse[row["seed"], row.get("coefficient")] = {k: v for k, v in row.items() if k != "comparison"} | {
                    "reused_from": f"{Path(args.saelens_from).name}: an earlier --only saelens run of these settings"}

    def report(row, what):
        rows.append({**row, "comparison": what})
        coef = f" coef {row['coefficient']:g}" if row.get("coefficient") is not None else ""
        print(f"{what:>14} {row['trainer']:>8}{coef} seed {row['seed']}: fvu {row['fvu']:.4f}  l0 {row['l0']:.1f}  "
              f"dead {row['dead_on_held_out']}  "
              f"{row['tokens']:,} tokens in {row['train_s']:.1f} s train ({row['wall_s']:.1f} s wall)", flush=True)

    for seed in args.seeds:
        saelens_row = None
        for coef in lens_coefs:
            if reuse.get((seed, coef)) is not None:
                saelens_row = reuse[seed, coef]
                report(saelens_row, "equal_tokens")
            elif have_saelens:
                saelens_row = run_saelens(train, held, args, seed, args.tokens, coef)
                report(saelens_row, "equal_tokens")
        if args.only == "saelens":
            continue
        for coef in fast_coefs:
            name = f"fastsae-seed{seed}" if coef is None else f"fastsae-{args.architecture}-{coef:g}-seed{seed}"
            fast = run_fastsae(train_file, held, args, seed, args.tokens, work / name, coef)
            report(fast, "equal_tokens")
        if saelens_row is not None and not args.no_wallclock:
            budget = saelens_row["train_s"]
            steps = max(1, int(budget * fast["tokens_per_s"] / args.batch_size))
            wc = run_fastsae(train_file, held, args, seed, steps * args.batch_size, work / f"fastsae-wc-seed{seed}")
            wc["saelens_fit_s"] = budget
            report(wc, "equal_wallclock")

    result = {
        "benchmark": "quality_vs_saelens",
        "issue": 27,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": args.threads, "torch": torch.__version__},
        "data": {"model": "all-MiniLM-L6-v2", "hook": "encoder.layer.3", "text": "pydoc", "train_rows": train.shape[0],
                 "held_out_rows": held.shape[0], "held_out": "the last rows of the token stream"},
        "settings": {k: getattr(args, k) for k in ("architecture", "tokens", "d_sae", "k", "batch_size", "lr", "seeds",
                                                   "fastsae_flags", "trainer_set", "sae_set", "saelens_norm_batches")}
        | {"fastsae_coefficients": fast_coefs, "saelens_coefficients": lens_coefs},
        "argv": sys.argv[1:] if argv is None else list(argv),
        "rows": rows,
    }
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if args.append and Path(args.out).exists():
            with open(args.out) as f:
                earlier = json.load(f)
            if "runs" in earlier:  # keeps its other keys (a --combine summary then wants --combine again)
                result = {**earlier, "runs": earlier["runs"] + [result]}
            else:
                result = {"benchmark": result["benchmark"], "issue": 27, "runs": [earlier, result]}
        elif args.append:
            result = {"benchmark": result["benchmark"], "issue": 27, "runs": [result]}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
