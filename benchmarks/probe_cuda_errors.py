"""Does a C++ error reach Python as an exception on this GPU machine, or crash the process?

On the first H200 run, the two tests that make the CUDA extension raise (a bad `k`, an
out-of-range index) killed their pytest-xdist worker with a segfault, while the CPU build
raises cleanly here. Each case below runs in a fresh process, so a crash is reported, not
suffered; together they say where the fault lies: torch's own errors, the extension's CPU ops,
its CUDA ops, and after Triton has compiled and run a kernel in the same process.

    python3 benchmarks/probe_cuda_errors.py [--json OUT]
"""

import argparse
import json
import shutil
import subprocess
import sys

_SETUP = "import torch, fastsae\n"
_EXT = "from fastsae.ops import backend_cuda\nops = torch.ops.fastsae_cpp\n"
_ENC = "x = torch.randn(4, 10, device=dev); w = torch.randn(17, 10, device=dev); b = torch.randn(17, device=dev)\n"

CASES = {
    "torch error, CPU": _SETUP + "torch.zeros(2, 3) @ torch.zeros(4, 5)\n",
    "torch error, CUDA": _SETUP + "torch.zeros(2, 3, device='cuda') @ torch.zeros(4, 5, device='cuda')\n",
    "extension check, CPU op": _SETUP + _EXT + "dev = 'cpu'\n" + _ENC + "ops.topk_encode(x, w, b, None, None, 18, None, 0)\n",
    "extension check, CUDA op": _SETUP + _EXT + "dev = 'cuda'\n" + _ENC + "ops.topk_encode(x, w, b, None, None, 18, None, 0)\n",
    "extension index check, CUDA op": _SETUP + _EXT + "dev = 'cuda'\n"
    + "v = torch.randn(3, 4, device=dev); i = torch.full((3, 4), 17, device=dev); W = torch.randn(17, 10, device=dev)\n"
    + "ops.sparse_decode(v, i, W, None, None)\n",
    "extension check after a Triton kernel ran": _SETUP + _EXT + "dev = 'cuda'\n" + _ENC
    + "from fastsae.ops import backend_triton\n"
    + "backend_triton.topk_encode(x, w, b, None, None, 3, None, 0)\ntorch.cuda.synchronize()\n"
    + "ops.topk_encode(x, w, b, None, None, 18, None, 0)\n",
}


# The two tests that crashed their xdist worker on the first H200 run, run serially.
PYTEST_CASE = ["-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:xdist", "-p", "no:cacheprovider",
               "tests/backends/cpp/test_cpp_topk_encode.py::test_kernel_ops_reject_bad_arguments",
               "tests/backends/cpp/test_cpp_sparse_decode.py::test_sparse_decode_rejects_out_of_range_indices"]


def run_pytest_case() -> dict:
    proc = subprocess.run([sys.executable, *PYTEST_CASE], capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    return dict(returncode=proc.returncode, outcome=out[-1] if out else "", tail=out[-12:])


def run_case(code: str) -> dict:
    wrapped = (
        "import faulthandler; faulthandler.enable()\n"
        "try:\n" + "".join(f"    {line}\n" for line in code.splitlines())
        + "except Exception as exc:\n    print('RAISED', type(exc).__name__, str(exc).splitlines()[0][:200])\n"
        "else:\n    print('NO ERROR')\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    row = dict(returncode=proc.returncode, outcome=next((l for l in out if l.startswith(("RAISED", "NO ERROR"))), "CRASHED"),
               tail=out[-12:])
    if row["outcome"] == "CRASHED" and shutil.which("gdb"):  # the native frames of the crash
        gdb = subprocess.run(["gdb", "-batch", "-ex", "run", "-ex", "bt 30", "--args", sys.executable, "-c", wrapped],
                             capture_output=True, text=True, timeout=300)
        row["gdb_backtrace"] = [l for l in gdb.stdout.splitlines() if l.startswith("#")][:30]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {}
    for name, code in CASES.items():
        results[name] = run_case(code)
        print(f"{name:45s} {results[name]['outcome']} (rc {results[name]['returncode']})", flush=True)
    results["the two tests, serially"] = run_pytest_case()
    print(f"{'the two tests, serially':45s} {results['the two tests, serially']['outcome']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
