"""Timers, memory meters and ceilings for `fastsae bench`.

CPU: whole-call wall time, contenders alternated round by round so drift hits all alike; peak
memory as the rise of the process's resident-set high-water mark (Linux VmHWM, reset through
/proc/self/clear_refs after returning freed heap with malloc_trim).
GPU: CUDA events around each call, the L2 cache flushed between calls, inputs rotated by the
caller; each contender timed in two separate passes so the spread between them shows the noise;
peak memory from torch.cuda's allocator statistics.
"""

from __future__ import annotations

import ctypes
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    samples: int
    noise: Optional[float] = None  # GPU: |pass1 - pass2| / median


# ------------------------------------------------------------------ memory


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes by which one call of fn raises memory use above what is live before it (None if
    this platform cannot tell)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _proc_status_bytes("VmRSS")
    fn()
    peak = _proc_status_bytes("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before)


# ------------------------------------------------------------------ CPU timing


def time_cpu_alternating(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, Timing]:
    """Median wall time of each fn; each round runs every fn once, starting from a rotating one."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {
        name: Timing(statistics.median(s), min(s), max(s), len(s)) for name, s in samples.items()
    }


# ------------------------------------------------------------------ GPU timing


class _L2Flusher:
    def __init__(self, device: torch.device):
        # Larger than any Hopper L2 (50-60 MB): writing it evicts the previous call's data.
        self.buf = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)

    def __call__(self):
        self.buf.zero_()


def time_cuda(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 5) -> Timing:
    """Median of per-call CUDA-event times, L2 flushed before each call, in two passes."""
    flush = _L2Flusher(device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    passes = []
    for _ in range(2):
        times = []
        for _ in range(iters):
            flush()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        passes.append(times)
    both = passes[0] + passes[1]
    med = statistics.median(both)
    noise = abs(statistics.median(passes[0]) - statistics.median(passes[1])) / med if med > 0 else None
    return Timing(med, min(both), max(both), len(both), noise)


def time_one(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median ms of fn alone (for ceilings and floors)."""
    if device.type == "cuda":
        return time_cuda(fn, device, iters=max(5, reps)).median_ms
    return time_cpu_alternating({"f": fn}, reps=reps).get("f").median_ms


# ------------------------------------------------------------------ ceilings


def measure_ceilings(device: torch.device, dtype: torch.dtype, reps: int = 5) -> dict[str, float]:
    """Measured peak rates of this device: a large matrix product (TFLOP/s, in `dtype`) and a
    large copy (GB/s, bytes read plus written)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = time_one(lambda: a @ b, device, reps)
    numel = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_one(lambda: dst.copy_(src), device, reps)
    return {
        "matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "copy_gbps": 2 * src.numel() * src.element_size() / (copy_ms * 1e-3) / 1e9,
    }
