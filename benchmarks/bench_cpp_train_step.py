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
import subprocess
import sys

import torch

import fastsae
from fastsae.bench import baselines, harness
from fastsae.training.optim import Adam

STEPS = ("cpp", "torch", "dense", "embedding_bag")
# The steps that are pure-torch baselines: SAELens' dense TopK, sparsify's embedding-bag decoder.
BASELINE_OF = {"dense": "torch-dense", "embedding_bag": "torch-sparse"}


def make_sae(args, seed: int = 0) -> fastsae.SAE:
    torch.manual_seed(seed)
    return fastsae.SAE(d_in=args.d_in, d_sae=args.d_sae, architecture="topk", k=args.k)


def make_adam(args, model, step_name: str) -> torch.optim.Adam:
    if step_name not in BASELINE_OF and not args.torch_adam:
        return Adam(model.parameters(), lr=1e-4)
    return torch.optim.Adam(model.parameters(), lr=1e-4, fused=True if args.fused_adam else None)


class Contender:
    """One step's model, optimizer and loss: fastsae's SAE under a backend, or a pure-torch
    baseline (`fastsae.bench.baselines`, on a copy of the same parameters)."""

    def __init__(self, args, name: str):
        sae = make_sae(args)
        baseline = BASELINE_OF.get(name)
        self.model = sae if baseline is None else baselines.make_baseline(baseline, sae)
        self.opt = make_adam(args, self.model, name)
        self.name = name

    def loss(self, x):
        if self.name in BASELINE_OF:
            return self.model.loss(x)
        with fastsae.use_backend(self.name):
            return self.model.training_forward(x).loss

    def step(self, x) -> None:
        if self.name in BASELINE_OF:
            self.opt.zero_grad(set_to_none=True)
            self.loss(x).backward()
            self.opt.step()
        else:
            with fastsae.use_backend(self.name):
                harness.train_step(self.model, self.opt, x)


def run_timing(args) -> dict:
    """Median seconds of each step, and of the floor's parts: the encoder's matrix product (into
    a preallocated output) and one Adam step (cpp's, with the gradients of its last step)."""
    x = torch.randn(args.rows, args.d_in)
    contenders = {name: Contender(args, name) for name in STEPS}
    fns = {name: (lambda c=c: c.step(x)) for name, c in contenders.items()}
    cpp = contenders["cpp"]
    pre = torch.empty(args.rows, args.d_sae)
    fns["floor_matmul"] = lambda: torch.mm(x - cpp.model.b_dec.detach(), cpp.model.W_enc.detach(), out=pre)
    fns["floor_adam"] = cpp.opt.step
    # the warm-up round builds the extension and creates Adam's state (cpp's step runs before its Adam)
    times = {name: t.median_ms * 1e-3 for name, t in harness.time_rounds(fns, reps=args.repeats, warmup=1).items()}
    times["floor"] = times["floor_matmul"] + times["floor_adam"]
    return times


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
    contender = Contender(args, args.memory_of)
    for _ in range(2):
        contender.step(x)
    contender.opt.zero_grad(set_to_none=True)
    before = _reset_peak()
    contender.loss(x).backward()
    fwd_bwd = _rss_kib("VmHWM")
    contender.opt.step()
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
