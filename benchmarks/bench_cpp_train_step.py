"""One TopK training step on CPU (forward, backward, Adam): the `cpp` backend against the floor
and two pure-torch baselines, through the public API.

    python benchmarks/bench_cpp_train_step.py [--rows 2048 --d-in 768 --d-sae 16384 --k 32]

Steps timed (fp32, medians over --repeats rounds that alternate the steps, so that load from
other processes falls on all of them alike):
  cpp            fastsae.SAE.training_forward + backward + Adam, backend "cpp"
  torch          the same, backend "torch" (fastsae's reference ops)
  (both with the Adam `fastsae train` runs, fastsae.training.optim.Adam: torch's update without
  parameter-sized temporaries; --torch-adam gives them torch.optim.Adam like the baselines)
  dense          SAELens' way: dense pre-activations, top-k, dense acts @ W_dec, autograd
  embedding_bag  sparsify's fallback: dense pre-activations and top-k, F.embedding_bag decode
  floor          the encoder's one matrix product (into a preallocated output) plus one Adam
                 step on the same parameters (cpp's Adam)
Memory: each step runs in a fresh process (Linux): after two warm-up steps, /proc/self/clear_refs
resets the peak resident memory; reported are the peaks of forward+backward and of the whole
step above the resident memory just before the step (so parameters and Adam state are not
counted, gradients and temporaries are), and the process' peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fastsae
from fastsae.training.optim import Adam

STEPS = ("cpp", "torch", "dense", "embedding_bag")


def make_sae(args, seed: int = 0) -> fastsae.SAE:
    torch.manual_seed(seed)
    return fastsae.SAE(d_in=args.d_in, d_sae=args.d_sae, architecture="topk", k=args.k)


def make_adam(args, sae, step_name: str) -> torch.optim.Adam:
    if step_name in ("cpp", "torch") and not args.torch_adam:
        return Adam(sae.parameters(), lr=1e-4)
    return torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True if args.fused_adam else None)


def fastsae_loss(backend: str):
    def loss(sae, x):
        with fastsae.use_backend(backend):
            return sae.training_forward(x).loss

    return loss


def dense_loss(sae, x):
    """SAELens' TopK: dense pre-activations, top-k scattered into dense acts, dense decode."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    x_hat = acts @ sae.W_dec + sae.b_dec
    return (x_hat - x).pow(2).sum(-1).mean()


def embedding_bag_loss(sae, x):
    """sparsify's fallback: dense pre-activations and top-k, decode with F.embedding_bag."""
    pre = F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    top = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    x_hat = F.embedding_bag(top.indices, sae.W_dec, per_sample_weights=top.values, mode="sum") + sae.b_dec
    return (x_hat - x).pow(2).sum(-1).mean()


def loss_fn(name: str):
    return {"dense": dense_loss, "embedding_bag": embedding_bag_loss}.get(name) or fastsae_loss(name)


def train_step(sae, opt, x, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss(sae, x).backward()
    opt.step()


def floor_parts(sae, opt, x, out) -> tuple[float, float]:
    """Seconds of the encoder's matrix product (into a preallocated output), and of one Adam
    step (with the gradients of the step just taken)."""
    x_in = x - sae.b_dec.detach()
    t0 = time.perf_counter()
    torch.mm(x_in, sae.W_enc.detach(), out=out)
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run_timing(args) -> dict:
    x = torch.randn(args.rows, args.d_in)
    setups = {}
    for name in STEPS:
        sae = make_sae(args)
        opt = make_adam(args, sae, name)
        train_step(sae, opt, x, loss_fn(name))  # warm-up: builds the extension, creates Adam's state
        setups[name] = (sae, opt, loss_fn(name))
    pre = torch.empty(args.rows, args.d_sae)
    times = {name: [] for name in STEPS + ("floor", "floor_matmul", "floor_adam")}
    for _ in range(args.repeats):
        for name in STEPS:
            sae, opt, loss = setups[name]
            t0 = time.perf_counter()
            train_step(sae, opt, x, loss)
            times[name].append(time.perf_counter() - t0)
        sae, opt, _ = setups["cpp"]
        mm, adam = floor_parts(sae, opt, x, pre)
        times["floor_matmul"].append(mm)
        times["floor_adam"].append(adam)
        times["floor"].append(mm + adam)
    return {name: statistics.median(v) for name, v in times.items()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset the process' peak resident memory (VmHWM) to its current size; returns that size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS")


def measure_memory_child(args) -> None:
    """Runs in a fresh process: peak resident memory of one step of `args.memory_of`, of its
    forward + backward and of the whole step (with Adam), above the memory before the step."""
    x = torch.randn(args.rows, args.d_in)
    sae = make_sae(args)
    opt = make_adam(args, sae, args.memory_of)
    loss = loss_fn(args.memory_of)
    for _ in range(2):
        train_step(sae, opt, x, loss)
    opt.zero_grad(set_to_none=True)
    before = _reset_peak()
    loss(sae, x).backward()
    fwd_bwd = _rss_kib("VmHWM")
    opt.step()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"peak_mib": peak / 1024, "step_mib": (peak - before) / 1024,
                      "fwd_bwd_mib": (fwd_bwd - before) / 1024}))


def run_memory(args) -> dict:
    out = {}
    for name in STEPS:
        cmd = [sys.executable, __file__, "--memory-of", name, "--rows", str(args.rows), "--d-in", str(args.d_in),
               "--d-sae", str(args.d_sae), "--k", str(args.k), "--threads", str(args.threads)]
        cmd += ["--fused-adam"] if args.fused_adam else []
        cmd += ["--torch-adam"] if args.torch_adam else []
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fused-adam", action="store_true", help="torch.optim.Adam(fused=True) where torch's Adam runs")
    parser.add_argument("--torch-adam", action="store_true", help="torch.optim.Adam for fastsae's steps too")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-of", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        measure_memory_child(args)
        return 0

    print(f"TopK training step, fp32, rows {args.rows}, d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, "
          f"{args.threads} threads, torch {torch.__version__}, fastsae steps with "
          f"{'torch' if args.torch_adam else 'fastsae'}'s Adam, baselines with torch's{' (fused)' if args.fused_adam else ''}")
    t = run_timing(args)
    floor = t["floor"]
    print(f"floor {floor * 1e3:7.1f} ms  (encoder matmul {t['floor_matmul'] * 1e3:.1f} ms + Adam {t['floor_adam'] * 1e3:.1f} ms)")
    mem = {} if args.no_memory else run_memory(args)
    for name in STEPS:
        line = f"{name:14s}{t[name] * 1e3:7.1f} ms  {t[name] / floor:4.2f}x floor  {t['dense'] / t[name]:5.2f}x faster than dense"
        line += f"  {t['embedding_bag'] / t[name]:5.2f}x faster than embedding_bag"
        print(line)
    if mem:
        print("memory above the state before the step (parameters, Adam state): forward+backward / whole step")
        for name in STEPS:
            m, d = mem[name], mem["dense"]
            print(f"{name:14s}fwd+bwd {m['fwd_bwd_mib']:7.1f} MiB ({m['fwd_bwd_mib'] / d['fwd_bwd_mib']:.2f} of dense)"
                  f"  step {m['step_mib']:7.1f} MiB ({m['step_mib'] / d['step_mib']:.2f} of dense)"
                  f"  process peak {m['peak_mib']:7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
