"""pytest-benchmark micro-benchmarks of each op, for every backend that loads here and the two
pure-torch baselines. Not part of the test suite (CI runs tests/ only):

    python3 -m pytest benchmarks/test_bench_ops.py --benchmark-only [--benchmark-json FILE]

Shapes are the CPU `--quick` ones (FASTSAE_BENCH_DEVICE=cuda for the GPU quick shape).
"""

import os

import pytest
import torch

from fastsae.bench.baselines import BASELINES
from fastsae.bench.runner import CPU_QUICK, GPU_QUICK, _contenders
from fastsae.ops import dispatch

DEVICE = torch.device(os.environ.get("FASTSAE_BENCH_DEVICE", "cpu"))
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPE = (GPU_QUICK if DEVICE.type == "cuda" else CPU_QUICK)[0]
BACKENDS = [b for b in dispatch.available_backends(DEVICE.type) if not (DEVICE.type == "cpu" and b == "triton")]


@pytest.mark.parametrize("contender", BACKENDS + list(BASELINES))
@pytest.mark.parametrize("op", ["encode", "decode", "train_step"])
def test_op(benchmark, op, contender):
    fns, _ = _contenders(op, SHAPE, DEVICE, DTYPE, BACKENDS, n_inputs=2)
    benchmark.group = f"{op} {SHAPE}"
    benchmark.extra_info.update(op=op, shape=str(SHAPE), backend=contender, dtype=str(DTYPE))
    benchmark.pedantic(fns[contender], rounds=5, warmup_rounds=1)
