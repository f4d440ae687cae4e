"""The trainer's guard against bad data and non-finite steps: batches refused (NaN/Inf rows, or a
non-finite loss or gradient found while replaying), too many in a row stopping training, and the
roll-back snapshot taken at each check.

Nothing in a step waits for the device, so a non-finite step is found only at the next check (a
log step, a checkpoint, a resampling, the end). The snapshot holds what the steps since the last
check changed (weights, Adam's state, counters, metrics, the sparse path's state) as device
copies, reused from check to check; restoring it lets those steps be taken again, each checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor


class BadDataError(RuntimeError):
    """Training stopped because too many batches in a row held NaN or Inf."""


def bad_batch_message(stream, position: int, x: Tensor, n_bad: int) -> str:
    """The refusal of a batch holding NaN/Inf: how many values, in which rows, and where they
    come from (file and row in it, when the source can say). Only a bad batch gets here, so
    finding its rows on the device costs the sync-free loop nothing."""
    rows = (~torch.isfinite(x)).any(1).nonzero().squeeze(1).tolist()
    where = stream.describe_rows(position, rows)
    return f"the batch holds {n_bad} NaN/Inf values in {len(rows)} {'row' if len(rows) == 1 else 'rows'}: {where}"


class Refusals:
    """Counts refused batches; `max_in_row` refusals in a row stop training."""

    def __init__(self, max_in_row: int, say: Callable[[str], None]):
        self.max_in_row = max_in_row
        self.say = say
        self.in_row = 0
        self.total = 0  # summed over resumed sessions

    def refuse(self, step: int, why: str, last_good: Callable[[], Optional[Path]]) -> None:
        """Refuse the batch of `step` (the 1-based step it would have been); `last_good` names the
        checkpoint to point at if training stops here."""
        self.in_row += 1
        self.total += 1
        self.say(f"step {step}: {why}; batch refused ({self.in_row} in a row)")
        if self.in_row >= self.max_in_row:
            kept = last_good()
            raise BadDataError(
                f"training stopped at step {step}: {self.in_row} batches in a row were refused "
                f"(NaN/Inf); the last good checkpoint is {kept if kept else 'none (no checkpoint was written yet)'}"
            )


def _sparse_path_state(sae) -> dict:
    """The plain numbers that pick the module's next path (`sparse_path`, which the SAE and the
    sharded SAE both keep)."""
    return {"sparse_path": sae.sparse_path.state_dict()}


def _load_sparse_path_state(sae, state: dict) -> None:
    sae.sparse_path.load_state_dict(state["sparse_path"])


class RollbackGuard:
    """Device copies of the master SAE, Adam's state and the named `tensors` given to `take`,
    with host values and the compute SAE's sparse-path state, put back by `restore`."""

    def __init__(self, sae, optimizer: torch.optim.Optimizer):
        self.sae = sae
        self.optimizer = optimizer
        self._tensors: dict[str, Tensor] = {}
        self._host: dict = {}
        self._path: dict = {}

    @property
    def host(self) -> dict:
        """The host values of the last snapshot."""
        return self._host

    def _watched(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        watched = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        for p_index, p in enumerate(self.sae.parameters()):
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    watched[f"adam.{p_index}.{key}"] = value
        watched.update(tensors)
        return watched

    @torch.no_grad()
    def take(self, tensors: dict[str, Tensor], host: dict, compute_sae) -> None:
        """Copy (on the device) what a step changes, for a roll-back to this point."""
        copies = {}
        for name, value in self._watched(tensors).items():
            kept = self._tensors.get(name)
            if kept is not None and kept.shape == value.shape and kept.dtype == value.dtype and kept.device == value.device:
                copies[name] = kept.copy_(value)  # reuse the previous snapshot's memory
            else:
                copies[name] = value.detach().clone()
        self._tensors = copies
        self._host = dict(host)
        self._path = _sparse_path_state(compute_sae)

    @torch.no_grad()
    def restore(self, tensors: dict[str, Tensor], compute_sae) -> dict:
        """Copy the snapshot back into the SAE, Adam's state and `tensors` (the same names as
        given to `take`), and the compute SAE's path state; returns the host values."""
        kept_tensors = self._tensors
        for name, value in self.sae.state_dict().items():
            value.copy_(kept_tensors[f"sae.{name}"])
        for p_index, p in enumerate(self.sae.parameters()):
            prefix = f"adam.{p_index}."
            kept = {key[len(prefix):]: v for key, v in kept_tensors.items() if key.startswith(prefix)}
            if not kept:
                self.optimizer.state.pop(p, None)
                continue
            state = self.optimizer.state[p]
            for key, value in kept.items():
                if key in state:
                    state[key].copy_(value)
                else:
                    state[key] = value.clone()
        for name, value in tensors.items():
            value.copy_(kept_tensors[name])
        _load_sparse_path_state(compute_sae, self._path)
        return dict(self._host)
