"""The process group: joining it from torchrun's environment, this process's rank, leaving it."""

from __future__ import annotations

import datetime
import os
import sys
from typing import NoReturn, Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group (torchrun, or `init_process_group` by hand)."""
    return dist.is_available() and dist.is_initialized()


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank if `flag` is True on any: one decision for all (a collective over the
    default group; `flag` itself outside one). `device`: where the count goes (CUDA for NCCL)."""
    if not is_distributed():
        return bool(flag)
    on_cuda = device is not None and torch.device(device).type == "cuda"
    total = torch.tensor([float(flag)], device=device if on_cuda else "cpu")
    dist.all_reduce(total)
    return bool(total.item())


def shutdown(barrier: bool = True) -> None:
    """Leave the process group, if in one. With `barrier`, every rank first waits for the others,
    so none tears its connections down while a peer still finishes its last writes.
    Pass barrier=False on a failure path, where a peer may never arrive."""
    if not is_distributed():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process now, after `shutdown`, without the interpreter's finalisation.

    Why: torch's DistributedDataParallel keeps its process group alive after
    `destroy_process_group` (its gloo worker threads are still running at exit, whatever is
    deleted first), and at interpreter finalisation those threads abort the process about once in
    23 runs ("terminate called without an active exception", SIGABRT), after all the work is
    done. Plain torch reproduces it (3 gloo ranks, DDP, barrier, destroy_process_group, exit):
    7 aborts in 160 runs; ending with os._exit instead, 0 in 160.
    Everything fastsae writes is closed by then; only the standard streams are flushed here."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing left to save
            pass
    os._exit(code)


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """torchrun (and torch.distributed.launch) set these for every worker."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: Optional[str] = None, timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes in the environment (NCCL when `device` is CUDA,
    gloo otherwise) and return this rank's device (cuda:LOCAL_RANK for CUDA). A collective that
    waits longer than `timeout_s` (a peer died or hangs) raises instead of blocking forever."""
    if not launched_by_torchrun():
        raise RuntimeError("init_from_env: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set (launch with torchrun)")
    want_cuda = device is not None and torch.device(device).type == "cuda"
    if want_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        rank_device = torch.device("cuda", local_rank)
    else:
        rank_device = torch.device(device) if device is not None else torch.device("cpu")
    if not is_distributed():
        dist.init_process_group(
            backend="nccl" if want_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": rank_device} if want_cuda else {}),
        )
    return rank_device
