"""The one harness every benchmark runs on, `fastsae bench` and the scripts in benchmarks/ alike:
machine metadata, device sync, timing (warm-up, alternating rounds, medians; `timing`), the
results writer (one naming scheme, one JSON layout: {"meta": machine_info(...), "rows": [...]})
and the training step they all time (`train_step`, the step `training.graph.CapturedStep`
captures too).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Callable, Optional

import torch

from fastsae.bench import timing
from fastsae.bench.timing import Timing, measure_ceilings, peak_memory_bytes  # noqa: F401  (the harness's API)
from fastsae.training.graph import train_step  # noqa: F401  (the one step every benchmark times)

RESULTS_DIR = Path("benchmarks/results")


def device_model(device: torch.device = torch.device("cpu")) -> str:
    """The GPU's name, or the CPU's model name (/proc/cpuinfo; else what `platform` says)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return device_model(device)
    return f"{device_model(device)} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn followed by a device sync: one call is then one whole timed unit."""
    def call():
        out = fn()
        sync(device)
        return out
    return call


def module_version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def machine_info(device: torch.device, dtype: Optional[torch.dtype] = None) -> dict:
    """The metadata every results file starts with: the machine, the libraries, the date."""
    from fastsae.version import __version__ as fastsae_version

    device = torch.device(device)
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": module_version("triton"),
        "fastsae": fastsae_version,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if dtype is None:
        del info["dtype"]
    return info


def time_alternating(fns: dict[str, Callable[[], object]], device: torch.device, reps: int,
                     warmup: int = 1) -> dict[str, Timing]:
    """Median time of each fn: on the CPU round by round, the order rotating (drift on a shared
    machine hits all alike); on CUDA each by CUDA events with the L2 flushed, in two passes.
    fns must sync themselves on the CPU (`synced`)."""
    if torch.device(device).type == "cuda":
        return {name: timing.time_cuda(fn, device, iters=reps) for name, fn in fns.items()}
    return timing.time_cpu_alternating(fns, reps=reps, warmup=warmup)


def time_rounds(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, Timing]:
    """Median wall time of each fn on any device, round by round, the order rotating (the
    scripts' timing: fns sync themselves, `synced`)."""
    return timing.time_cpu_alternating(fns, reps=reps, warmup=warmup)


def slug(text: str) -> str:
    """Lower-case words joined by single hyphens (a device name as a file name)."""
    name = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in name.split("-") if p)


def results_path(meta: dict, kind: str = "", suffix: str = "") -> Path:
    """benchmarks/results/[<kind>-]<device_type>-<device>-<date><suffix>.json, one file per
    benchmark, machine and date."""
    device = slug(meta["device"].split("(")[0].strip())
    prefix = f"{kind}-" if kind else ""
    return RESULTS_DIR / f"{prefix}{meta['device_type']}-{device}-{meta['date']}{suffix}.json"


def write_json(result: dict, path: str | Path) -> Path:
    """Write result atomically (a reader never sees half a file); parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return path
