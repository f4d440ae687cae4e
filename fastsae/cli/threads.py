"""How many CPU threads `fastsae train` gives torch."""

from __future__ import annotations

import os
import time


def choose_threads(requested, omp_env, torch_default: int, cpus: int, busy: float) -> tuple[int, str]:
    """(threads, why) for a CPU run. torch's default, one thread per core, assumes the cores are
    free; on a busy machine its threads wait at every parallel region for peers the kernel has
    preempted, and fewer threads finish sooner. So, unless asked otherwise, take the cores that
    other work left idle at the start (`busy`: how many cores it occupied), at least one."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads: expected a positive integer, got {requested}")
        return requested, "--threads"
    if omp_env:
        return torch_default, "OMP_NUM_THREADS"
    idle = max(1, min(torch_default, int(cpus - busy + 0.5)))
    if idle == torch_default:
        return idle, "torch's default: one per core"
    return idle, f"other work kept {busy:.1f} of {cpus} cores busy at the start"


def busy_cores(samples: int = 10, interval_s: float = 0.02) -> float:
    """How many cores other processes occupy: the lower of the 1-minute load average (slow to
    forget a job that just ended) and the runnable tasks seen now in /proc/loadavg, less this
    process (blind to a job that pauses for a moment). 0 where neither can be read."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    running = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return load
        time.sleep(interval_s)
    return max(0.0, min(load, sum(running) / len(running)))


def set_threads(requested, device: str) -> None:
    """Set torch's thread count for a run on `device` (a CPU run, or --threads given) and say why."""
    import torch

    if torch.device(device).type != "cpu" and requested is None:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    default = torch.get_num_threads()
    busy = busy_cores() if requested is None and not os.environ.get("OMP_NUM_THREADS") else 0.0
    threads, why = choose_threads(requested, os.environ.get("OMP_NUM_THREADS"), default, cpus, busy)
    torch.set_num_threads(threads)
    print(f"threads: {threads} ({why}; --threads N to choose)")
