"""`fastsae aot`: every Triton kernel compiles for the H100 (sm_90) on this machine, without a
GPU, with no register spills, shared memory within the SM's 227 KiB, and wgmma (HGMMA) in the
encoder's matrix products."""

import json
import os
import subprocess
import sys

import pytest
from helpers.paths import ROOT

from fastsae.kernels import sparse_backward, sparse_decode, threshold_encode, topk_encode


@pytest.mark.slow
def test_aot_compiles_every_kernel_for_h100(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path / "aot.json"
    # The interpreter (set for the other tests on a CPU machine) cannot compile: a fresh process.
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # really compile, whatever ran before
    proc = subprocess.run(
        [sys.executable, "-m", "fastsae.cli", "aot", "--arch", "sm_90", "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert rows and set(rows[0]) == {"kernel", "config", "registers", "spills", "shared_bytes", "uses_wgmma"}
    kernels = {
        name for module in (topk_encode, threshold_encode, sparse_decode, sparse_backward) for name in dir(module) if name.endswith("_kernel")
    }
    assert {row["kernel"] for row in rows} == kernels
    for row in rows:
        assert row["spills"] == 0, row
        assert 0 < row["registers"] <= 255, row
        assert row["shared_bytes"] <= 227 * 1024, row
    matmuls = [
        row for row in rows if row["kernel"] in ("_topk_select_kernel", "_encode_columns_kernel", "_threshold_select_kernel")
    ]
    assert len(matmuls) == 3 and all(row["uses_wgmma"] for row in matmuls)
