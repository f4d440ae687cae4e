"""The trainer's metrics: each step's figures added to a window on the device (no host sync), its
means read at log steps and appended to the run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from fastsae import runs

# nested_loss: Matryoshka's inner levels' MSEs, summed (0 for the other architectures).
METRIC_NAMES = ("loss", "mse", "fvu", "l0", "sparsity_loss", "aux_loss", "nested_loss")


def step_metrics(out, x32: Tensor, l0: Tensor, scratch: Tensor | None = None) -> Tensor:
    """The step's METRIC_NAMES (float32 [7], on the device) from its `TrainOutput` and the float32
    batch it trained on. `scratch` (x32's shape and dtype) holds the centred batch: no batch-sized
    allocation per step (the same bits as without it)."""
    if out.x_hat.dtype == torch.float32:  # the step's own MSE is this sum already (over rows)
        err = out.mse_loss.detach() * x32.shape[0]
    else:  # a 16-bit step's MSE is rounded: the float32 error instead
        err = torch.nn.functional.mse_loss(out.x_hat.reshape(x32.shape).float(), x32, reduction="sum")
    if scratch is None:
        centred = x32 - x32.mean(0)
    else:
        centred = torch.sub(x32, x32.mean(0), out=scratch)
    var = centred.pow_(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
    nested = out.nested_loss if out.nested_loss is not None else out.aux_loss.new_zeros(())
    return torch.stack(
        [t.float() for t in (out.loss, out.mse_loss, err / var, l0, out.sparsity_loss, out.aux_loss, nested)]
    )


class MetricsWindow:
    """Sums of the steps' metrics since the last log step, with their count, tokens and seconds."""

    def __init__(self, device):
        self.sums = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=device)
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0
        self._scratch: Tensor | None = None  # step_metrics' centred batch, reused

    def add_step(self, out, x32: Tensor, l0: Tensor, weight: float, tokens: int) -> None:
        """Add a step's `step_metrics`."""
        scratch = self._scratch
        if scratch is None or scratch.shape != x32.shape or scratch.dtype != x32.dtype or scratch.device != x32.device:
            self._scratch = scratch = torch.empty_like(x32, memory_format=torch.contiguous_format)
        self.add(step_metrics(out, x32, l0, scratch), weight, tokens)

    def add(self, values: Tensor, weight: float, tokens: int) -> None:
        # Data parallel: weighted by the slice's share, so the ranks' sum / world_size is the
        # batch's mean (FVU: the slices' mean FVU).
        self.sums += values.double() * weight
        self.steps += 1
        self.tokens += tokens

    def take_means(self, data_parallel_ranks: int = 1) -> tuple[dict, float | None]:
        """The window's mean of each metric and its tokens per second; the window starts afresh.
        Data parallel: collective (each rank's window holds its slices' weighted figures)."""
        n = max(1, self.steps)
        if data_parallel_ranks > 1:
            torch.distributed.all_reduce(self.sums)
            self.sums /= data_parallel_ranks
        means = {name: float(value) for name, value in zip(METRIC_NAMES, (self.sums / n).tolist())}
        tokens_per_s = self.tokens / self.seconds if self.seconds > 0 else None
        self.sums.zero_()
        self.steps = self.tokens = 0
        self.seconds = 0.0
        return means, tokens_per_s

    def host_state(self) -> dict:
        """What a roll-back restores besides `sums` (the seconds spent stay spent)."""
        return {"steps": self.steps, "tokens": self.tokens}

    def load_host_state(self, state: dict) -> None:
        self.steps, self.tokens = state["steps"], state["tokens"]

    def state_json(self) -> dict:
        return {"window_steps": self.steps, "window_tokens": self.tokens, "window_seconds": self.seconds}

    def load_state_json(self, info: dict) -> None:
        self.steps, self.tokens, self.seconds = info["window_steps"], info["window_tokens"], info["window_seconds"]


def append_metrics_row(out_dir: Path, row: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(runs.metrics_path(out_dir), "a") as f:
        f.write(json.dumps(row) + "\n")


def progress_postfix(row: dict) -> str:
    """The logged figures as the progress bar shows them."""
    tps = row["tokens_per_s"]
    return (f"mse {row['mse']:.4g} fvu {row['fvu']:.3f} l0 {row['l0']:.1f} dead {row['dead_fraction']:.1%} "
            f"tok/s {tps or 0:,.0f} lr {row['lr']:.2g}")
