"""`fastsae.Trainer`: trains an `SAE` on a source of activations. This module is the loop; its stateful parts are
their own modules: precision.py (mixed precision, master gradients, clipping), guard.py (refused batches, roll-back),
dead_latents.py, metrics.py, initialization.py (the normalisation factor, b_dec, the saved SAE), checkpoint.py (files,
schedule, state codec), resume.py, data.py (the shuffled stream and its read-ahead).

The loop uses the module and its losses only (`SAE.training_forward`, the decoder-constraint methods, `save`); it never
calls a backend. Per step:
  x = the next batch of the shuffled stream, read ahead by a background thread (pinned host buffers, non_blocking
      copies on a GPU), times the normalisation factor, in the compute dtype
  refuse the batch if it holds NaN/Inf (counted on the host by the reading thread; several in a row stop training)
  loss = training_forward(x, sparsity coefficient warmed up, dead_mask for AuxK)
  backward; the gradients go to the float32 master weights (unscaled for float16) while a device flag notes any
  non-finite loss or gradient; unit-norm decoders: drop the gradient along each decoder row; Adam step on the master
  weights (`optim.make_adam`: torch's fused Adam on CUDA, the chunked in-place one on the CPU; warm-up then decay of
  the learning rate); unit-norm decoders: renormalise rows; the architecture's own constraints (`after_optimizer_step`);
  count tokens since each latent last fired (on the device); add the step's metrics to a device window
  resample strategy: every N steps resample dead latents (Bricken et al. 2023)
Nothing in a step waits for the device. At each log step (and before a checkpoint, a resampling, the end) the trainer
reads the flag and the metrics: if a step since the last such check had a non-finite loss or gradient, it restores the
state copied at that check (weights, Adam, counters, metrics) and replays those steps checking each one, refusing the
bad batch. Metrics go to metrics.jsonl every `log_every_steps`; checkpoints every few minutes and at the end.

Several processes (torchrun; `fastsae.distributed`): with an `SAE`, data parallel (each rank reads its slice of every
global batch, DDP all-reduces the gradients, slices' losses weighted by their share); with a `ShardedSAE`, latents
split across the ranks, which all read the whole batch. The ranks take every decision together (refusals, roll-backs,
checkpoint times); rank 0 writes the files, and a checkpoint holds the whole SAE and Adam state in either case.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from fastsae import distributed as fdist
from fastsae.sae import SAE
from fastsae.training import checkpoint as ckpt
from fastsae.training.config import TrainerConfig
from fastsae.training.data import ActivationSource, ShuffledStream
from fastsae.training.prefetch import BatchPrefetcher
from fastsae.losses import fired_and_l0
from fastsae.training.dead_latents import DeadLatentTracker, resolve_dead_strategy
from fastsae.training.guard import BadDataError, Refusals, RollbackGuard, bad_batch_message
from fastsae.training.initialization import export_for_raw_inputs, finite_rows, initial_b_dec, normalising_scale, paired_width
from fastsae.training.initialization import fold_input_scale, geometric_median  # noqa: F401  (re-exported)
from fastsae.training.metrics import METRIC_NAMES, MetricsWindow, append_metrics_row, progress_postfix
from fastsae.training.optim import make_adam
from fastsae.training.precision import FLOAT16_LOSS_SCALE, Precision
from fastsae.training.resume import open_saved_run, processes_note

__all__ = ["BadDataError", "FLOAT16_LOSS_SCALE", "METRIC_NAMES", "Trainer", "fold_input_scale", "geometric_median"]


class Trainer:
    """Train `sae` on `data` (an `ActivationSource`) with `cfg`, checkpointing into `out_dir`.

    `Trainer(sae, data, cfg, out_dir).train()` starts a run; `Trainer.resume(out_dir)` continues the
    latest checkpoint in `out_dir` exactly where it stopped (same data order, optimizer state and
    counters), appending to its metrics.jsonl. Under torchrun it trains data parallel (an `SAE`) or
    latent-sharded (a `ShardedSAE`); `local=True` trains on this process alone as a one-process run
    (no collective, its files written by this process): several SAEs spread over the ranks.
    """

    def __init__(
        self,
        sae: SAE,
        data: ActivationSource,
        cfg: Optional[TrainerConfig] = None,
        out_dir: Union[str, Path, None] = None,
        *,
        overwrite: bool = False,
        local: bool = False,
    ):
        if not isinstance(sae, (SAE, fdist.ShardedSAE)):
            raise ValueError(f"Trainer: expected a fastsae.SAE (or a fastsae.distributed.ShardedSAE), got {type(sae).__name__}")
        cfg = TrainerConfig() if cfg is None else cfg
        if not isinstance(cfg, TrainerConfig):
            raise ValueError(f"Trainer: expected a TrainerConfig, got {type(cfg).__name__}")
        if data.d_in != sae.d_in:
            raise ValueError(f"data: expected activations of width d_in={sae.d_in} (the SAE's), got width {data.d_in} from {data!r}")
        self.d_out = paired_width(sae, data)  # a transcoder's rows: input, then target
        if sae.dtype != torch.float32:
            raise ValueError(
                f"Trainer: expected an SAE in float32 (its weights are the master weights; choose the compute "
                f"dtype with TrainerConfig.dtype / --dtype), got {str(sae.dtype).removeprefix('torch.')}: pass sae.float()"
            )
        if cfg.dtype is None:
            cfg.dtype = "bfloat16" if sae.device.type == "cuda" else "float32"
        self.sae = sae
        self.data = data
        self.cfg = cfg
        # Processes: the data-parallel ranks each take a slice of every batch; the latent-sharded
        # ranks all take the whole batch, each holding a slice of the latents. `local`: this process
        # alone, even under a process group (no collective; its files and messages are its own).
        self.world_size, self.rank = (1, 0) if local else (fdist.get_world_size(), fdist.get_rank())
        if local and isinstance(sae, fdist.ShardedSAE):
            raise ValueError("Trainer: local=True trains on this process alone; expected a fastsae.SAE, got a ShardedSAE")
        self.sharded = isinstance(sae, fdist.ShardedSAE)
        self.data_parallel = self.world_size > 1 and not self.sharded
        cfg.world_size, cfg.shard_latents = self.world_size, self.sharded
        offset, rows = fdist.batch_slice(cfg.batch_size) if self.data_parallel else (0, cfg.batch_size)
        self._rows = slice(offset, offset + rows)
        self._loss_weight = fdist.slice_loss_weight(rows, cfg.batch_size) if self.data_parallel else 1.0
        if self.data_parallel:  # every rank starts from rank 0's weights (state_dict: detached views)
            for tensor in sae.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        if not cfg.data:
            try:
                cfg.data = data.describe()
            except ValueError:  # e.g. a corpus given as strings: resume must be handed the source
                cfg.data = {"kind": "unreopenable", "repr": repr(data)}
        cfg.device = str(sae.device)  # a resumed run rebuilds the SAE there
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            ckpt.claim_run_folder(self.out_dir, overwrite, clear=self.rank == 0)  # rank 0 owns the run's files
        self.stream = ShuffledStream(data, seed=cfg.seed, buffer_rows=cfg.shuffle_buffer_rows)
        # torch's fused Adam on CUDA, the chunked in-place one on the CPU (optim.make_adam says why).
        self.optimizer = make_adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, device=sae.device)
        strategy = resolve_dead_strategy(sae.arch, cfg.dead_strategy, paired=self.d_out is not None)
        self.precision = Precision(sae, cfg.dtype, self.sharded)
        self.compute_sae = self.precision.compute
        # Data parallel: DDP all-reduces the compute SAE's gradients during its backward.
        self._ddp = fdist.data_parallel(self.compute_sae) if self.data_parallel else None
        self._nonfinite = torch.zeros(1, device=sae.device)  # > 0: a step since the last check went non-finite

        # Trainer state (a checkpoint holds it with the weights, Adam's state and the parts' state).
        self.step = 0  # optimizer steps taken
        self.tokens_seen = 0  # rows trained on
        self.position = 0  # rows read from the stream (includes refused batches)
        self.input_scale = 1.0
        self.initialized = False
        self.elapsed = 0.0  # seconds of training, summed over resumed sessions
        self.messages: list[str] = []
        self.dead = DeadLatentTracker(sae, cfg, strategy, self.sharded, self._say)
        self.refusals = Refusals(cfg.max_bad_batches, self._say)
        self.window = MetricsWindow(sae.device)
        self.guard = RollbackGuard(sae, self.optimizer)
        self._replay_until = 0  # steps below this one check the device at each step (after a roll-back)
        self._prefetcher: Optional[BatchPrefetcher] = None
        self._bar = None
        self.last_metrics: dict = {}
        self.last_checkpoint: Optional[Path] = None

    # The parts' state under the names the trainer has always had.
    dead_strategy = property(lambda self: self.dead.strategy)
    n_resamples = property(lambda self: self.dead.n_resamples)
    generator = property(lambda self: self.dead.generator)
    bad_in_row = property(lambda self: self.refusals.in_row)
    refused_batches = property(lambda self: self.refusals.total)  # NaN/Inf batches skipped, over resumed sessions
    tokens_since_fired = property(lambda self: self.dead.tokens_since_fired,
                                  lambda self, value: setattr(self.dead, "tokens_since_fired", value))

    @classmethod
    def resume(
        cls,
        out_dir: Union[str, Path],
        data: Optional[ActivationSource] = None,
        *,
        progress: Optional[bool] = None,
        dtype: Optional[str] = None,
        device: Optional[str] = None,
        shard_latents: Optional[bool] = None,
        local: bool = False,
    ) -> "Trainer":
        """A trainer that continues the newest complete checkpoint in `out_dir` (data: the saved source description
        is reopened unless a source is given; `dtype`: a compute dtype other than the run's, e.g. float32 to continue a
        bfloat16 run at full precision, no longer bit-exact with an uninterrupted run). Under torchrun: `device` is
        this rank's (default: the run's), `shard_latents` splits the latents (default: as the run did); the checkpoint
        holds the whole SAE, so a run continues on any number of processes, re-sharded or re-sliced (`local`: on this
        process alone, as `Trainer(..., local=True)`)."""
        run = open_saved_run(out_dir, data, progress=progress, dtype=dtype, device=device,
                             shard_latents=False if local else shard_latents)
        # Built as a fresh trainer (no out_dir: no "folder holds a run" check), then its state loaded.
        trainer = cls(run.sae, run.data, run.cfg, local=local)
        trainer.out_dir = out_dir = Path(out_dir)
        note = ckpt.load_trainer_state(trainer, run.folder)
        if note:
            trainer._say(note)
        note = processes_note(run, trainer.world_size, trainer.sharded, trainer.data_parallel)
        if note:
            trainer._say(note)
        if trainer.rank == 0:  # rank 0 owns the run's files
            ckpt.remove_stale_temporaries(out_dir)
            ckpt.truncate_metrics(out_dir, trainer.step)
        rows = ckpt.read_metrics(out_dir)
        trainer.last_metrics = rows[-1] if rows else {}
        return trainer

    # ------------------------------------------------------------ initialisation

    @torch.no_grad()
    def _initialize(self) -> None:
        """Normalisation factor (of the inputs; a transcoder's targets take the same) and b_dec
        (from the targets) from a sample of the data's first rows."""
        cfg = self.cfg
        sample = finite_rows(self.stream.read(0, min(cfg.init_sample_rows, self.stream.rows_per_epoch)))
        d_in = self.sae.d_in
        if cfg.normalize_activations:
            self.input_scale = normalising_scale(sample[:, :d_in], d_in)
        outputs = sample if self.d_out is None else sample[:, d_in:]
        self.sae.b_dec.copy_(initial_b_dec(outputs * self.input_scale, cfg.b_dec_init).to(self.sae.dtype))
        self.initialized = True

    # ------------------------------------------------------------ the loop

    def train(self, max_steps: Optional[int] = None) -> dict:
        """Train to `cfg.total_tokens` (or for at most `max_steps` more steps, then checkpoint);
        returns the last metrics, the step, tokens and the checkpoint folder."""
        self.begin(max_steps)
        try:
            while self.advance():
                pass
        finally:
            self.close()
        return self.finish()

    def begin(self, max_steps: Optional[int] = None) -> None:
        """Start a session of steps (`train` is begin, advance until False, close, finish; a driver of several trainers
        on one data stream interleaves their `advance`)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.sae.train()
        self.compute_sae.train()
        if not self.initialized:
            self._initialize()
        self._total = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.step + max_steps)
        self._ending = False
        self._bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not cfg.progress or self.rank != 0, unit="step",
                         dynamic_ncols=True, file=sys.stderr, desc="training")
        self._prefetcher = BatchPrefetcher(self.stream, cfg.batch_size, self.position, self.sae.device, rows=self._rows)
        self.dead.note_possible()
        self._take_snapshot()
        self._schedule = ckpt.CheckpointSchedule(cfg, self.world_size, self.sae.device)
        self._clock, self._own_seconds = time.perf_counter(), 0.0  # seconds in advance() since the last check

    def advance(self) -> bool:
        """One step (with its check, log, resampling or checkpoint when due); False once the session's steps are all
        taken and checked. Only the time inside `advance` is this trainer's (its tokens/s and elapsed_s): a driver of
        several trainers runs the others' steps between two calls."""
        self._clock = time.perf_counter()
        try:
            return self._advance()
        finally:
            self._own_seconds += time.perf_counter() - self._clock

    def _advance(self) -> bool:
        cfg = self.cfg
        if self._ending or self.step >= self._total:
            # The last steps (max_steps, or a refused batch at the end) are checked before leaving;
            # after a roll-back they are taken again, each checked.
            self._ending = True
            if self.step < self._total:
                self._next_batch()
                return True
            return not self._check()
        if not self._next_batch():
            return True
        resample = self.dead.resample_due(self.step)
        log = self.step % cfg.log_every_steps == 0 or self.step == cfg.total_steps
        save = self.out_dir is not None and self._schedule.due(self.step, log)
        if not (resample or log or save) or not self._check():
            return True
        if resample:
            self.resample_dead_latents()
        if log:
            self._log_metrics()
        if save:
            self.save_checkpoint()
            self._schedule.saved()
        self._take_snapshot()
        self._clock = time.perf_counter()
        return True

    def close(self) -> None:
        """Stop the session's progress bar and read-ahead thread."""
        for part in (self._bar, self._prefetcher):
            if part is not None:
                part.close()
        self._bar = self._prefetcher = None

    def finish(self) -> dict:
        """After `close`: the last metrics row and checkpoint; the run's step, tokens, time."""
        if self.window.steps and self.step == self.cfg.total_steps:
            self._log_metrics()
        if self.out_dir is not None and self.last_checkpoint_step() != self.step:
            self.save_checkpoint()
        # The last logged row's figures, under the run's own step, tokens and time.
        return {**self.last_metrics, "step": self.step, "tokens": self.tokens_seen, "checkpoint": self.last_checkpoint,
                "elapsed_s": self.elapsed, "refused_batches": self.refused_batches}

    def _next_batch(self) -> bool:
        """Read the next batch and take a step on it; False if the batch was refused."""
        position, x, n_bad = self._prefetcher.next()
        self.position = position + self.cfg.batch_size
        if n_bad:
            self._refuse(bad_batch_message(self.stream, position, x, n_bad))
            return False
        if not self._train_step(x):
            return False
        self._bar.update(1)
        return True

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any (one decision for all; collective)."""
        # A local trainer under a process group is one process: no collective.
        return flag if self.world_size == 1 else fdist.any_rank(flag, self.sae.device)

    def last_checkpoint_step(self) -> Optional[int]:
        return None if self.last_checkpoint is None else int(self.last_checkpoint.name.split("_")[-1])

    def _say(self, message: str) -> None:
        self.messages.append(message)
        if getattr(self, "rank", 0) != 0:  # the ranks say the same things: rank 0 speaks
            return
        bar = getattr(self, "_bar", None)
        if bar is not None and not bar.disable:
            bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def _refuse(self, why: str) -> None:
        self.refusals.refuse(self.step + 1, why, self._last_good_checkpoint)

    def _last_good_checkpoint(self) -> Optional[Path]:
        return self.last_checkpoint or (ckpt.latest_checkpoint(self.out_dir) if self.out_dir else None)

    def _train_step(self, x_raw: Tensor) -> bool:
        """One optimizer step on a batch already on the device; False if the batch was refused
        (only while replaying rolled-back steps: otherwise nothing here waits for the device)."""
        cfg, master, sae = self.cfg, self.sae, self.compute_sae
        checked = self.step < self._replay_until
        x32 = x_raw.to(torch.float32) * self.input_scale
        y32 = None if self.d_out is None else x32[:, sae.d_in :]  # a transcoder's rows: input, then target
        x32 = x32 if y32 is None else x32[:, : sae.d_in]
        x = x32.to(sae.dtype)
        lr = cfg.lr_at(self.step)
        coefficient = cfg.sparsity_coefficient_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.precision.refresh_compute_weights()
        dead_mask = self.dead.for_auxk(sae.device)
        forward = self._ddp if self._ddp is not None else sae.training_forward
        paired = {} if y32 is None else {"target": y32.to(sae.dtype)}  # the sharded SAE takes no target
        out = forward(
            x, **paired, sparsity_coefficient=coefficient, dead_mask=dead_mask, k_aux=cfg.aux_k, aux_coefficient=cfg.aux_coefficient,
            aux_normalization=cfg.aux_normalization,
        )
        if checked and self._any_rank(not torch.isfinite(out.loss)):
            if self._ddp is not None:  # DDP expects the forward's backward: a zero one, discarded
                (torch.nan_to_num(out.loss) * 0).backward()
                sae.zero_grad(set_to_none=True)
            self._refuse(f"the loss is not finite ({out.loss.item()}{' on some rank' if self.world_size > 1 else ''})")
            return False
        self.precision.zero_grads()
        # A data-parallel slice's loss is weighted by its share of the batch (DDP averages).
        scale = self.precision.loss_scale * self._loss_weight
        (out.loss * scale if scale != 1.0 else out.loss).backward()
        found = torch.zeros(1, device=master.device) if checked else self._nonfinite
        found.add_((~torch.isfinite(out.loss.detach())).float())
        grad_norm = self.precision.gradients_to_master(found)
        if checked and self._any_rank(bool(found.item())):
            self._refuse("a gradient is not finite")
            return False
        if master.cfg.decoder_norm == "unit_norm":
            master.remove_gradient_parallel_to_decoder_directions()
        self.precision.step(self.optimizer, cfg.grad_clip_norm, grad_norm)  # clipped (None: not), then Adam
        with torch.no_grad():
            if master.cfg.decoder_norm == "unit_norm":
                master.set_decoder_norm_to_unit_norm()
            master.arch.after_optimizer_step(master, sae, cfg)
            if isinstance(out, fdist.ShardedTrainOutput):  # the whole batch's, from the shards
                fired, l0 = out.fired, out.l0
            else:
                fired, l0 = fired_and_l0(out.acts, master.d_sae)
                if self.data_parallel:  # a latent fired if it fired in any rank's slice
                    fired = fdist.all_reduce_fired(fired)
            self.dead.record(fired, cfg.batch_size)
            self.window.add_step(out, x32 if y32 is None else y32, l0, self._loss_weight, cfg.batch_size)
        self.step += 1
        self.tokens_seen += cfg.batch_size
        self.refusals.in_row = 0
        return True

    # ------------------------------------------------------------ checks and roll-back

    def _check(self) -> bool:
        """Wait for the device and read the non-finite flag. True if every step since the last check was finite;
        otherwise the state of that check is restored, the steps after it are taken again with a check each
        (refusing the bad batch) and False is returned."""
        if self.world_size > 1:  # every rank rolls back together
            torch.distributed.all_reduce(self._nonfinite)
        bad = bool(self._nonfinite.item())
        now = time.perf_counter()
        seconds, self._own_seconds, self._clock = self._own_seconds + now - self._clock, 0.0, now
        self.elapsed += seconds
        self.window.seconds += seconds
        if not bad:
            self.dead.note_possible()
            return True
        first, last = self.guard.host["step"] + 1, self.step
        self._restore_snapshot()
        self._replay_until = last
        self._say(f"steps {first}..{last}: a non-finite loss or gradient; rolled back to step {first - 1} and "
                  "taking those steps again, checking each")
        if self._bar is not None:
            self._bar.n = self.step
            self._bar.refresh()
        self.dead.note_possible()
        self._prefetcher.restart(self.position)
        self._clock = time.perf_counter()
        return False

    def _rolled_back_tensors(self) -> dict[str, Tensor]:
        """The device state a step changes besides the weights and Adam's."""
        return {"tokens_since_fired": self.dead.tokens_since_fired, "window": self.window.sums}

    def _take_snapshot(self) -> None:
        host = {"step": self.step, "tokens_seen": self.tokens_seen, "position": self.position,
                "bad_in_row": self.refusals.in_row, "window": self.window.host_state()}
        self.guard.take(self._rolled_back_tensors(), host, self.compute_sae)

    def _restore_snapshot(self) -> None:
        host = self.guard.restore(self._rolled_back_tensors(), self.compute_sae)
        self._nonfinite.zero_()
        self.step, self.tokens_seen, self.position = host["step"], host["tokens_seen"], host["position"]
        self.refusals.in_row = host["bad_in_row"]
        self.window.load_host_state(host["window"])

    # ------------------------------------------------------------ dead latents

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last `dead_after` tokens (bool [d_sae], on the SAE's device)."""
        return self.dead.mask()

    def n_alive(self) -> int:
        return self.dead.n_alive()

    def resample_dead_latents(self) -> int:
        """Re-initialise dead latents from inputs the SAE reconstructs badly (Bricken et al. 2023;
        `DeadLatentTracker.resample`). Returns how many latents were resampled."""

        def read_sample() -> Tensor:
            # The stream is addressable, so peeking at the next rows changes nothing.
            sample = self.stream.read(self.position, self.cfg.resample_sample_rows)
            return sample[torch.isfinite(sample).all(dim=1)] * self.input_scale

        return self.dead.resample(self.optimizer, read_sample, self.step)

    # ------------------------------------------------------------ metrics

    def _log_metrics(self) -> dict:
        means, tokens_per_s = self.window.take_means(self.world_size if self.data_parallel else 1)
        row = {"step": self.step, "tokens": self.tokens_seen, "world_size": self.world_size, "shard_latents": self.sharded,
               **means,
               "dead_fraction": float(self.dead_mask().double().mean()),
               "tokens_per_s": tokens_per_s,
               "lr": self.cfg.lr_at(max(0, self.step - 1)),
               "sparsity_coefficient": self.cfg.sparsity_coefficient_at(max(0, self.step - 1)),
               "elapsed_s": self.elapsed}
        self.last_metrics = row
        if self.out_dir is not None and self.rank == 0:
            append_metrics_row(self.out_dir, row)
        if self._bar is not None:
            self._bar.set_postfix_str(progress_postfix(row), refresh=False)
        return row

    # ------------------------------------------------------------ checkpoints

    def export_sae(self) -> SAE:
        """The SAE for use on raw activations (the normalisation factor folded in), in eval mode: the float32 master
        weights, with the training dtype noted in cfg.metadata["trained_dtype"] (`fastsae.load(folder,
        dtype=torch.bfloat16)` gives it in that dtype). Latent-sharded: collective; the whole SAE, gathered on
        the CPU of rank 0 (None on the other ranks)."""
        whole = self._whole_sae()
        return None if whole is None else self._export(whole)

    def _whole_sae(self) -> Optional[SAE]:
        """The master SAE; when sharded, gathered on rank 0's CPU (None elsewhere; collective)."""
        return self.sae.gather_sae(dst=0, device="cpu") if self.sharded else self.sae

    def _export(self, whole: SAE) -> SAE:
        return export_for_raw_inputs(whole, self.input_scale, self.cfg.dtype, self.cfg.data, self.world_size)

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint atomically; the previous one stays until this one is in place."""
        self.last_checkpoint = ckpt.save_checkpoint(self)
        return self.last_checkpoint
