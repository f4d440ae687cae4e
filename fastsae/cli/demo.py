"""`fastsae demo`: a small TopK SAE fitted to synthetic data, saved and loaded back."""

from __future__ import annotations

import argparse
import time


def run_demo(args: argparse.Namespace) -> int:
    """Fit a small TopK SAE to synthetic sparse data, save it, load it back, and report."""
    import torch

    import fastsae
    from fastsae.ops import dispatch

    torch.manual_seed(args.seed)
    d_in, d_sae, k, n_true = args.d_in, args.d_sae, args.k, args.d_sae // 2
    # Ground truth: n_true unit directions, each row a sparse positive mix of about k of them.
    truth = torch.nn.functional.normalize(torch.randn(n_true, d_in), dim=1)

    def batch(n: int) -> torch.Tensor:
        on = torch.rand(n, n_true) < k / n_true
        return (on * torch.rand(n, n_true) * 2) @ truth

    sae = fastsae.SAE(d_in=d_in, d_sae=d_sae, architecture="topk", k=k)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    backend = dispatch.select(sae.device)[0]
    print(f"fastsae {fastsae.__version__} demo: {sae} on {sae.device}, backend {backend!r}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = batch(args.batch_size)
        out = sae.training_forward(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            fvu = (out.x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
            print(f"step {step:5d}  mse {out.mse_loss.item():.4f}  fvu {fvu.item():.4f}  l0 {out.acts.l0().float().mean().item():.1f}")
    elapsed = time.perf_counter() - start
    print(f"{args.steps} steps of {args.batch_size} rows in {elapsed:.1f} s ({args.steps * args.batch_size / elapsed:,.0f} rows/s)")

    # Each true direction's best cosine match among the decoder rows.
    with torch.no_grad():
        dirs = torch.nn.functional.normalize(sae.W_dec, dim=1)
        score = (truth @ dirs.T).max(dim=1).values.mean().item()
    print(f"mean max cosine similarity to the {n_true} true features: {score:.3f}")

    folder = sae.save(args.out)
    loaded = fastsae.load(folder)
    x = batch(8)
    same = torch.equal(loaded(x), sae(x))
    print(f"saved to {folder} (SAELens layout); reloaded: {'identical outputs' if same else 'OUTPUTS DIFFER'}")
    return 0 if same else 1


def add_demo_parser(sub) -> argparse.ArgumentParser:
    demo = sub.add_parser("demo", help="fit a small TopK SAE on synthetic data, save and reload it")
    demo.add_argument("--d-in", type=int, default=64)
    demo.add_argument("--d-sae", type=int, default=512)
    demo.add_argument("--k", type=int, default=8)
    demo.add_argument("--steps", type=int, default=600)
    demo.add_argument("--batch-size", type=int, default=512)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=run_demo)
    return demo
