"""`fastsae.Trainer`: trains an `SAE` on a source of activations.

The loop uses the module and its losses only (`SAE.training_forward`, the decoder-constraint
methods, `save`); it never calls a backend. Per step:
  x = the next batch of the shuffled stream, read ahead by a background thread (pinned host
      buffers, non_blocking copies on a GPU), times the normalisation factor, in the compute dtype
  refuse the batch if it holds NaN/Inf (counted on the host by the reading thread; several in a
  row stop training)
  loss = training_forward(x, sparsity coefficient warmed up, dead_mask for AuxK)
  backward; the gradients go to the float32 master weights (unscaled for float16) while a device
  flag notes any non-finite loss or gradient; unit-norm decoders: drop the gradient along each
  decoder row; Adam step on the master weights (`optim.make_adam`: torch's fused Adam on CUDA, the
  chunked in-place one on the CPU; warm-up then decay of the learning rate);
  unit-norm decoders: renormalise rows; JumpReLU: keep the thresholds positive; count tokens
  since each latent last fired (on the device); add the step's metrics to a device window
  relu: every N steps resample dead latents (Bricken et al. 2023)
Nothing in a step waits for the device. At each log step (and before a checkpoint, a
resampling, the end) the trainer reads the flag and the metrics: if a step since the last such
check had a non-finite loss or gradient, it restores the state copied at that check (weights,
Adam, counters, metrics) and replays those steps checking each one, refusing the bad batch.
Metrics go to metrics.jsonl every `log_every_steps`; checkpoints every few minutes and at the end.

Several processes (torchrun; `fastsae.distributed`): with an `SAE`, data parallel (each rank
reads its slice of every global batch, DDP all-reduces the gradients, slices' losses weighted by
their share); with a `ShardedSAE`, latents split across the ranks, which all read the whole
batch. The ranks take every decision together (refusals, roll-backs, checkpoint times); rank 0
writes the files, and a checkpoint holds the whole SAE and Adam state in either case.

Precision (`TrainerConfig.dtype`): the SAE the trainer holds keeps float32 master weights and
Adam state; with bfloat16 or float16 a twin SAE in that dtype runs forward and backward on a copy
of the weights made at each step (mixed precision, as autocast would give, but with the kernels'
own 16-bit paths). float16 scales the loss by `FLOAT16_LOSS_SCALE` (fixed) so small gradients
stay normal numbers.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from fastsae import distributed as fdist
from fastsae.auxk import DeadLatents
from fastsae.config import SAEConfig
from fastsae.formats import saelens
from fastsae.sae import SAE
from fastsae.sparse import SparseActivations
from fastsae.training import checkpoint as ckpt
from fastsae.training.config import TrainerConfig
from fastsae.training.data import ActivationSource, BatchPrefetcher, ShuffledStream, open_source
from fastsae.training.optim import make_adam
from fastsae.training.provenance import provenance_metadata

METRIC_NAMES = ("loss", "mse", "fvu", "l0", "sparsity_loss", "aux_loss")
# float16 training multiplies the loss by this before backward and divides the float32 gradients
# by it: the gradient of the mean squared error is ~2 * residual / batch (~1e-5 late in training
# at batch 4096), below float16's smallest normal number (6e-5) without it. An overflow is a
# non-finite gradient: the step is rolled back and refused like any other.
FLOAT16_LOSS_SCALE = 1024.0


class BadDataError(RuntimeError):
    """Training stopped because too many batches in a row held NaN or Inf."""


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """The point minimising the sum of Euclidean distances to the rows of `points` [n, d]
    (Weiszfeld's iteration from the mean, in float64)."""
    if points.ndim != 2 or points.shape[0] < 1:
        raise ValueError(f"geometric_median: expected a non-empty [n, d] tensor, got shape {tuple(points.shape)}")
    x = points.double()
    median = x.mean(0)
    for _ in range(max_iter):
        dist = (x - median).norm(dim=1)
        weights = 1.0 / dist.clamp_min(1e-12)  # a point that coincides with the estimate gets a huge weight
        new = (weights[:, None] * x).sum(0) / weights.sum()
        shift = (new - median).norm().item()
        median = new
        if shift <= tol * max(1.0, median.norm().item()):
            break
    return median.to(points.dtype)


@torch.no_grad()
def fold_input_scale(sae: SAE, scale: float) -> SAE:
    """A copy of `sae`, trained on inputs multiplied by `scale`, that takes raw inputs and returns
    raw reconstructions: copy(x) == sae(scale * x) / scale, with the same latents firing."""
    folded = copy.deepcopy(sae)
    if scale == 1.0:
        return folded
    folded.W_enc.mul_(scale)
    folded.b_dec.div_(scale)
    folded.W_dec.div_(scale)
    sae.arch.fold_input_scale(folded, scale)
    return folded


class Trainer:
    """Train `sae` on `data` (an `ActivationSource`) with `cfg`, checkpointing into `out_dir`.

    `Trainer(sae, data, cfg, out_dir).train()` starts a run; `Trainer.resume(out_dir)` continues the
    latest checkpoint in `out_dir` exactly where it stopped (same data order, optimizer state and
    counters), appending to its metrics.jsonl.
    """

    def __init__(
        self,
        sae: SAE,
        data: ActivationSource,
        cfg: Optional[TrainerConfig] = None,
        out_dir: Union[str, Path, None] = None,
        *,
        overwrite: bool = False,
    ):
        if not isinstance(sae, (SAE, fdist.ShardedSAE)):
            raise ValueError(f"Trainer: expected a fastsae.SAE (or a fastsae.distributed.ShardedSAE), got {type(sae).__name__}")
        cfg = TrainerConfig() if cfg is None else cfg
        if not isinstance(cfg, TrainerConfig):
            raise ValueError(f"Trainer: expected a TrainerConfig, got {type(cfg).__name__}")
        if data.d_in != sae.d_in:
            raise ValueError(f"data: expected activations of width d_in={sae.d_in} (the SAE's), got width {data.d_in} from {data!r}")
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
        # ranks all take the whole batch, each holding a slice of the latents.
        self.world_size, self.rank = fdist.get_world_size(), fdist.get_rank()
        self.sharded = isinstance(sae, fdist.ShardedSAE)
        self.data_parallel = self.world_size > 1 and not self.sharded
        cfg.world_size, cfg.shard_latents = self.world_size, self.sharded
        offset, rows = fdist.batch_slice(cfg.batch_size) if self.data_parallel else (0, cfg.batch_size)
        self._rows = slice(offset, offset + rows)
        self._loss_weight = fdist.slice_loss_weight(rows, cfg.batch_size) if self.data_parallel else 1.0
        if self.data_parallel:
            _broadcast_module(sae)  # every rank starts from rank 0's weights
        if not cfg.data:
            try:
                cfg.data = data.describe()
            except ValueError:  # e.g. a corpus given as strings: resume must be handed the source
                cfg.data = {"kind": "unreopenable", "repr": repr(data)}
        cfg.device = str(sae.device)  # a resumed run rebuilds the SAE there
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            if ckpt.list_checkpoints(self.out_dir) or (self.out_dir / ckpt.METRICS_FILENAME).exists():
                if not overwrite:
                    raise FileExistsError(
                        f"{self.out_dir}: holds an earlier run (checkpoints or {ckpt.METRICS_FILENAME}); "
                        "resume it with Trainer.resume / --resume, or pass overwrite=True / --overwrite"
                    )
                if self.rank == 0:
                    _clear_run(self.out_dir)
        self.stream = ShuffledStream(data, seed=cfg.seed, buffer_rows=cfg.shuffle_buffer_rows)
        # torch's fused Adam on CUDA, the chunked in-place one on the CPU (optim.make_adam says why).
        self.optimizer = make_adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, device=sae.device)
        self.dead_strategy = self._resolve_dead_strategy()
        self.compute_sae = self._compute_twin()
        # Data parallel: DDP all-reduces the compute SAE's gradients during its backward.
        self._ddp = fdist.data_parallel(self.compute_sae) if self.data_parallel else None
        device = sae.device
        self._loss_scale = FLOAT16_LOSS_SCALE if cfg.dtype == "float16" else 1.0
        self._inv_scale = torch.full((1,), 1.0 / self._loss_scale, device=device)
        self._nonfinite = torch.zeros(1, device=device)  # > 0: a step since the last check went non-finite

        # Trainer state (everything a checkpoint holds besides weights and Adam's state).
        self.step = 0  # optimizer steps taken
        self.tokens_seen = 0  # rows trained on
        self.position = 0  # rows read from the stream (includes refused batches)
        self.input_scale = 1.0
        self.initialized = False
        self.bad_in_row = 0
        self.refused_batches = 0  # NaN/Inf batches skipped, summed over resumed sessions
        self.elapsed = 0.0  # seconds of training, summed over resumed sessions
        self.n_resamples = 0
        self.tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._window = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=device)
        self._window_steps = 0
        self._window_tokens = 0
        self._window_seconds = 0.0
        self._replay_until = 0  # steps below this one check the device at each step (after a roll-back)
        self._dead_possible = True  # whether a latent can be dead before the next check (AuxK)
        self._aux_capacity = sae.d_sae  # a bound on the dead latents until the next check
        self._snapshot: Optional[dict] = None
        self._prefetcher: Optional[BatchPrefetcher] = None
        self.last_metrics: dict = {}
        self.last_checkpoint: Optional[Path] = None
        self.messages: list[str] = []

    # ------------------------------------------------------------ construction helpers

    def _compute_twin(self) -> SAE:
        """The SAE that runs forward and backward: the master itself in float32, else a copy in
        the compute dtype whose weights are refreshed from the master's at every step."""
        if self.cfg.dtype == "float32":
            return self.sae
        twin_cfg = SAEConfig.from_dict({**self.sae.cfg.to_dict(), "dtype": self.cfg.dtype})
        twin = fdist.ShardedSAE(twin_cfg, group=self.sae.group, _init=False) if self.sharded else SAE(twin_cfg)
        with torch.no_grad():
            for mine, master in zip(twin.state_dict().values(), self.sae.state_dict().values()):
                mine.copy_(master)
        twin.sparse_width_limit = self.sae.sparse_width_limit
        return twin

    def _resolve_dead_strategy(self) -> str:
        arch = self.sae.arch
        strategy = self.cfg.dead_strategy
        if strategy == "auto":
            return arch.default_dead_strategy
        if strategy == "auxk" and not arch.supports_auxk:
            raise ValueError(f"dead_strategy: 'auxk' needs a topk or batchtopk SAE, got {arch.name!r}")
        return strategy

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
    ) -> "Trainer":
        """A trainer that continues the newest complete checkpoint in `out_dir` (data: the saved
        source description is reopened unless a source is given; `dtype`: a compute dtype other
        than the run's, e.g. float32 to continue a bfloat16 run at full precision, no longer
        bit-exact with an uninterrupted run). Under torchrun: `device` is this rank's (default: the
        run's), `shard_latents` splits the latents (default: as the run did); the checkpoint holds
        the whole SAE, so a run continues on any number of processes, re-sharded or re-sliced."""
        out_dir = Path(out_dir)
        folder = ckpt.latest_checkpoint(out_dir)
        if folder is None:
            raise FileNotFoundError(f"{out_dir}: no complete checkpoint to resume from (looked in {out_dir / ckpt.CHECKPOINTS_DIRNAME})")
        cfg = TrainerConfig.load(folder)
        if progress is not None:
            cfg.progress = progress
        if dtype is not None:
            cfg.dtype = dtype
            cfg.__post_init__()  # validates it
        sae_cfg = SAEConfig.from_dict(saelens.read_cfg(folder))
        if cfg.dtype is None:  # a run from before TrainerConfig.dtype computed in its weights' dtype
            cfg.dtype = sae_cfg.dtype if sae_cfg.dtype in ("float32", "bfloat16", "float16") else "float32"
        if device is not None:
            cfg.device = str(device)
        sae_cfg.device = cfg.device
        sae_cfg.dtype = "float32"  # the master weights (saved in float32)
        previous_world, previous_sharded = cfg.world_size, cfg.shard_latents
        shard = previous_sharded if shard_latents is None else shard_latents
        if shard and fdist.get_world_size() > 1:
            sae = fdist.ShardedSAE(sae_cfg, _init=False)  # its slices come from the checkpoint
        else:
            sae = SAE(sae_cfg)
        if data is None:
            data = open_source(cfg.data)
        trainer = cls.__new__(cls)
        # Build as a fresh trainer without the "folder holds a run" check, then load the state.
        cls.__init__(trainer, sae, data, cfg, None)
        trainer.out_dir = out_dir
        trainer._load_state(folder)
        if (previous_world, previous_sharded) != (trainer.world_size, trainer.sharded):
            how = ("latents re-sharded" if trainer.sharded else "batches re-sliced" if trainer.data_parallel
                   else "the SAE whole on this process")
            trainer._say(
                f"resuming a run trained on {previous_world} process(es){' with sharded latents' if previous_sharded else ''} "
                f"on {trainer.world_size}{' with sharded latents' if trainer.sharded else ''}: the checkpoint holds the "
                f"whole SAE, {how}; the data order does not depend on the number of processes"
            )
        if trainer.rank == 0:  # rank 0 owns the run's files
            ckpt.remove_stale_temporaries(out_dir)
            ckpt.truncate_metrics(out_dir, trainer.step)
        rows = ckpt.read_metrics(out_dir)
        trainer.last_metrics = rows[-1] if rows else {}
        return trainer

    # ------------------------------------------------------------ initialisation

    @torch.no_grad()
    def _initialize(self) -> None:
        """Normalisation factor and b_dec from a sample of the data's first rows."""
        cfg = self.cfg
        sample = self.stream.read(0, min(cfg.init_sample_rows, self.stream.rows_per_epoch))
        finite = torch.isfinite(sample).all(dim=1)
        if not finite.any():
            raise BadDataError(f"initialisation: all {sample.shape[0]} sampled rows hold NaN or Inf")
        sample = sample[finite].double()
        if cfg.normalize_activations:
            mean_sq = sample.pow(2).sum(1).mean().item()
            self.input_scale = math.sqrt(self.sae.d_in / mean_sq) if mean_sq > 0 else 1.0
        sample = sample * self.input_scale
        if cfg.b_dec_init == "geometric_median":
            b_dec = geometric_median(sample)
        elif cfg.b_dec_init == "mean":
            b_dec = sample.mean(0)
        else:
            b_dec = torch.zeros(self.sae.d_in, dtype=torch.float64)
        self.sae.b_dec.copy_(b_dec.to(self.sae.dtype))
        self.initialized = True

    # ------------------------------------------------------------ the loop

    def train(self, max_steps: Optional[int] = None) -> dict:
        """Train to `cfg.total_tokens` (or for at most `max_steps` more steps, then checkpoint);
        returns the last metrics, the step, tokens and the checkpoint folder."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.sae.train()
        self.compute_sae.train()
        if not self.initialized:
            self._initialize()
        total = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.step + max_steps)
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not cfg.progress or self.rank != 0, unit="step", dynamic_ncols=True,
                   file=sys.stderr, desc="training")
        self._bar = bar
        self._prefetcher = BatchPrefetcher(self.stream, cfg.batch_size, self.position, self.sae.device, rows=self._rows)
        self._note_dead_possible()
        self._take_snapshot()
        last_save = time.monotonic()
        self._clock = time.perf_counter()
        try:
            while self.step < total:
                position, x, n_bad = self._prefetcher.next()
                self.position = position + cfg.batch_size
                if n_bad:
                    self._refuse(self._bad_batch(position, x, n_bad))
                    continue
                if not self._train_step(x):
                    continue
                bar.update(1)
                resample = self.dead_strategy == "resample" and self._resample_due()
                log = self.step % cfg.log_every_steps == 0 or self.step == cfg.total_steps
                save = self.out_dir is not None and (
                    (cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0)
                    or self._time_to_save(last_save, log)
                )
                if not (resample or log or save):
                    continue
                if not self._check():
                    continue
                if resample:
                    self.resample_dead_latents()
                if log:
                    self._log_metrics()
                if save:
                    self.save_checkpoint()
                    last_save = time.monotonic()
                self._take_snapshot()
                self._clock = time.perf_counter()
            # The last steps (max_steps, or a refused batch at the end) are checked before leaving.
            while not self._check():
                self._replay(total)
        finally:
            bar.close()
            self._bar = None
            if self._prefetcher is not None:
                self._prefetcher.close()
                self._prefetcher = None
        if self._window_steps and self.step == cfg.total_steps:
            self._log_metrics()
        if self.out_dir is not None and self.last_checkpoint_step() != self.step:
            self.save_checkpoint()
        # The last logged row's figures, under the run's own step, tokens and time.
        return {**self.last_metrics, "step": self.step, "tokens": self.tokens_seen, "checkpoint": self.last_checkpoint,
                "elapsed_s": self.elapsed, "refused_batches": self.refused_batches}

    def _time_to_save(self, last_save: float, log: bool) -> bool:
        """Whether checkpoint_every_seconds has passed. On several processes every rank must take
        the same decision (saving is collective when latents are sharded, and it syncs the ranks'
        state): rank 0's clock decides, read at log steps only, so the agreement costs one small
        broadcast per log interval."""
        every = self.cfg.checkpoint_every_seconds
        if every is None:
            return False
        due = time.monotonic() - last_save >= every
        if self.world_size == 1:
            return due
        if not log:
            return False
        flag = torch.tensor([float(due)], device=self.sae.device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any (one decision for all; collective)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.sae.device)
        torch.distributed.all_reduce(t)
        return bool(t.item())

    def _replay(self, total: int) -> None:
        """After a roll-back at the end of `train`: take the rolled-back steps again (checked)."""
        while self.step < total:
            position, x, n_bad = self._prefetcher.next()
            self.position = position + self.cfg.batch_size
            if n_bad:
                self._refuse(self._bad_batch(position, x, n_bad))
                continue
            if self._train_step(x):
                self._bar.update(1)

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
        self.bad_in_row += 1
        self.refused_batches += 1
        self._say(f"step {self.step + 1}: {why}; batch refused ({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.cfg.max_bad_batches:
            kept = self.last_checkpoint or (ckpt.latest_checkpoint(self.out_dir) if self.out_dir else None)
            raise BadDataError(
                f"training stopped at step {self.step + 1}: {self.bad_in_row} batches in a row were refused "
                f"(NaN/Inf); the last good checkpoint is {kept if kept else 'none (no checkpoint was written yet)'}"
            )

    def _bad_batch(self, position: int, x: Tensor, n_bad: int) -> str:
        """The refusal of a batch holding NaN/Inf: how many values, in which rows, and where they
        come from (file and row in it, when the source can say). Only a bad batch gets here, so
        finding its rows on the device costs the sync-free loop nothing."""
        rows = (~torch.isfinite(x)).any(1).nonzero().squeeze(1).tolist()
        where = self.stream.describe_rows(position, rows)
        return f"the batch holds {n_bad} NaN/Inf values in {len(rows)} {'row' if len(rows) == 1 else 'rows'}: {where}"

    def _train_step(self, x_raw: Tensor) -> bool:
        """One optimizer step on a batch already on the device; False if the batch was refused
        (only while replaying rolled-back steps: otherwise nothing here waits for the device)."""
        cfg, master, sae = self.cfg, self.sae, self.compute_sae
        checked = self.step < self._replay_until
        x32 = x_raw.to(torch.float32) * self.input_scale
        x = x32.to(sae.dtype)
        lr = cfg.lr_at(self.step)
        coefficient = cfg.sparsity_coefficient_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mixed = sae is not master
        if mixed:
            with torch.no_grad():
                torch._foreach_copy_(list(sae.parameters()), list(master.parameters()))
        dead_mask = None
        if self.dead_strategy == "auxk" and self._dead_possible:
            dead_mask = self.tokens_since_fired >= cfg.dead_after
            if sae.device.type != "cpu" and not self.sharded:
                # No host sync on an accelerator: the dead latents go in a list whose capacity
                # bounds their count until the next check (on the CPU the mask's count is read).
                dead_mask = DeadLatents.from_mask(dead_mask, capacity=self._aux_capacity)
        forward = self._ddp if self._ddp is not None else sae.training_forward
        out = forward(
            x, sparsity_coefficient=coefficient, dead_mask=dead_mask, k_aux=cfg.aux_k, aux_coefficient=cfg.aux_coefficient
        )
        if checked and self._any_rank(not torch.isfinite(out.loss)):
            if self._ddp is not None:  # DDP expects the forward's backward: a zero one, discarded
                (torch.nan_to_num(out.loss) * 0).backward()
                sae.zero_grad(set_to_none=True)
            self._refuse(f"the loss is not finite ({out.loss.item()}{' on some rank' if self.world_size > 1 else ''})")
            return False
        sae.zero_grad(set_to_none=True)
        if mixed:
            master.zero_grad(set_to_none=True)
        # A data-parallel slice's loss is weighted by its share of the batch (DDP averages).
        scale = self._loss_scale * self._loss_weight
        (out.loss * scale if scale != 1.0 else out.loss).backward()
        found = torch.zeros(1, device=master.device) if checked else self._nonfinite
        grad_norm = None  # the gradients' global norm, where the check below computes it
        found.add_((~torch.isfinite(out.loss.detach())).float())
        if self._loss_scale != 1.0:
            # float16: the float32 copies are unscaled, and a non-finite one flagged, in one pass.
            torch._amp_foreach_non_finite_check_and_unscale_(self._master_grads(mixed), found, self._inv_scale)
        else:
            # Only the flag: the gradients' norms read each one once, in its own dtype (the 16-bit
            # twin's before the copy), and write nothing parameter-sized.
            grads = [p.grad for p in sae.parameters() if p.grad is not None]
            norms = torch.stack(torch._foreach_norm(grads))
            found.add_((~torch.isfinite(norms.float().sum())).float())
            if mixed:
                self._master_grads(mixed)
            elif grads and not self.sharded and master.cfg.decoder_norm != "unit_norm":
                # These are the gradients clipping reads: its global norm from the same norms.
                grad_norm = torch.linalg.vector_norm(norms, 2)
        if checked and self._any_rank(bool(found.item())):
            self._refuse("a gradient is not finite")
            return False
        if master.cfg.decoder_norm == "unit_norm":
            master.remove_gradient_parallel_to_decoder_directions()
        if cfg.grad_clip_norm is not None:
            self._clip_gradients(cfg.grad_clip_norm, grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            if master.cfg.decoder_norm == "unit_norm":
                master.set_decoder_norm_to_unit_norm()
            master.arch.after_optimizer_step(master, sae, cfg)
            if isinstance(out, fdist.ShardedTrainOutput):  # the whole batch's, from the shards
                fired, l0 = out.fired, out.l0
            else:
                fired, l0 = _fired_and_l0(out.acts, master.d_sae)
                if self.data_parallel:  # a latent fired if it fired in any rank's slice
                    fired = fdist.all_reduce_fired(fired)
            self.tokens_since_fired += cfg.batch_size
            self.tokens_since_fired.masked_fill_(fired, 0)
            if out.x_hat.dtype == torch.float32:  # the step's own MSE is this sum already (over rows)
                err = out.mse_loss.detach() * x32.shape[0]
            else:  # a 16-bit step's MSE is rounded: the float32 error instead
                err = torch.nn.functional.mse_loss(out.x_hat.reshape(x.shape).float(), x32, reduction="sum")
            var = (x32 - x32.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
            values = torch.stack([t.float() for t in (out.loss, out.mse_loss, err / var, l0, out.sparsity_loss, out.aux_loss)])
            # Data parallel: weighted by the slice's share, so the ranks' sum / world_size is the
            # batch's mean (FVU: the slices' mean FVU).
            self._window += values.double() * self._loss_weight
        self._window_steps += 1
        self._window_tokens += cfg.batch_size
        self.step += 1
        self.tokens_seen += cfg.batch_size
        self.bad_in_row = 0
        return True

    def _clip_gradients(self, max_norm: float, grad_norm: Optional[Tensor] = None) -> None:
        """Scale the master gradients so their global norm is at most `max_norm` (torch's
        clip_grad_norm_ rule, SAELens' SAETrainer's step: coefficient max_norm / (norm + 1e-6),
        at most 1). On the device, no host sync. `grad_norm`: the global norm when the step's
        finiteness check already computed it from these gradients. Sharded: the norm of the
        whole SAE's gradient (the shards' squares summed over the ranks; b_dec's gradient is the
        same on every rank and counted once)."""
        named = [(name, p.grad) for name, p in self.sae.named_parameters() if p.grad is not None]
        if not named:
            return
        grads = [g for _, g in named]
        if self.sharded:
            squares = torch.stack([g.float().pow(2).sum() for _, g in named])
            is_sharded = torch.tensor([name != "b_dec" for name, _ in named], device=squares.device)
            local = squares[is_sharded].sum()
            torch.distributed.all_reduce(local)
            grad_norm = (local + squares[~is_sharded].sum()).sqrt()
        elif grad_norm is None:
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)), 2)
        coef = (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)
        if grads[0].device.type == "cpu":
            # torch 2.13's CPU _foreach_mul_ by a 0-dim tensor takes a slow path: 12 ms for 2M
            # floats where per-tensor mul_ takes 0.5 ms (clip_grad_norm_ uses it: +10% a step).
            for g in grads:
                g.mul_(coef.to(g.dtype))
        else:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))

    def _master_grads(self, mixed: bool) -> list[Tensor]:
        """The master weights' gradients (float32), copied from the compute twin's when mixed."""
        grads = []
        if not mixed:
            return [p.grad for p in self.sae.parameters() if p.grad is not None]
        for master, twin in zip(self.sae.parameters(), self.compute_sae.parameters()):
            if twin.grad is not None:
                master.grad = twin.grad.to(torch.float32)
                grads.append(master.grad)
        return grads

    # ------------------------------------------------------------ checks and roll-back

    def _check(self) -> bool:
        """Wait for the device and read the non-finite flag. True if every step since the last
        check was finite; otherwise the state of that check is restored, the steps after it are
        taken again with a check each (refusing the bad batch) and False is returned."""
        if self.world_size > 1:  # every rank rolls back together
            torch.distributed.all_reduce(self._nonfinite)
        bad = bool(self._nonfinite.item())
        seconds = time.perf_counter() - self._clock
        self.elapsed += seconds
        self._window_seconds += seconds
        if not bad:
            self._note_dead_possible()
            return True
        snapshot = self._snapshot
        first, last = snapshot["host"]["step"] + 1, self.step
        self._restore_snapshot()
        self._replay_until = last
        self._say(f"steps {first}..{last}: a non-finite loss or gradient; rolled back to step {first - 1} and "
                  "taking those steps again, checking each")
        if self._bar is not None:
            self._bar.n = self.step
            self._bar.refresh()
        self._note_dead_possible()
        self._prefetcher.restart(self.position)
        self._clock = time.perf_counter()
        return False

    def _note_dead_possible(self) -> None:
        """At a check: how many latents can reach `dead_after` tokens without firing before the next
        check (at most `log_every_steps` steps away)? None: the steps until then pass no dead mask
        (AuxK has nothing to do; the result is the same as passing it). Otherwise that count,
        rounded up to a multiple of 64 (fewer distinct shapes), bounds the dead latents until then:
        the capacity of AuxK's list on an accelerator, where counting them each step would wait
        for the device."""
        if self.dead_strategy != "auxk":
            return
        horizon = self.cfg.log_every_steps * self.cfg.batch_size
        possible = int((self.tokens_since_fired + horizon >= self.cfg.dead_after).sum())
        self._dead_possible = possible > 0
        self._aux_capacity = min(self.sae.d_sae, -(-possible // 64) * 64)

    _HOST_STATE = ("step", "tokens_seen", "position", "bad_in_row", "_window_steps", "_window_tokens")
    _HINTS = ("_sparse_hint", "_dense_passes_to_skip", "_overflow_backoff", "_batchtopk_bound", "_dense_hint")  # SAE's, ShardedSAE's

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        """Copy (on the device) what a step changes, for a roll-back to this point."""
        old = self._snapshot or {}
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        for p_index, p in enumerate(self.sae.parameters()):
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"adam.{p_index}.{key}"] = value
        tensors["tokens_since_fired"] = self.tokens_since_fired
        tensors["window"] = self._window
        copies = {}
        for name, value in tensors.items():
            kept = old.get("tensors", {}).get(name)
            if kept is not None and kept.shape == value.shape and kept.dtype == value.dtype and kept.device == value.device:
                copies[name] = kept.copy_(value)  # reuse the previous snapshot's memory
            else:
                copies[name] = value.detach().clone()
        self._snapshot = {
            "tensors": copies,
            "host": {name: getattr(self, name) for name in self._HOST_STATE},
            "hints": {name: getattr(self.compute_sae, name) for name in self._HINTS if hasattr(self.compute_sae, name)},
        }

    @torch.no_grad()
    def _restore_snapshot(self) -> None:
        snap = self._snapshot
        tensors = snap["tensors"]
        for name, value in self.sae.state_dict().items():
            value.copy_(tensors[f"sae.{name}"])
        for p_index, p in enumerate(self.sae.parameters()):
            kept = {key[len(f"adam.{p_index}."):]: v for key, v in tensors.items() if key.startswith(f"adam.{p_index}.")}
            if not kept:
                self.optimizer.state.pop(p, None)
                continue
            state = self.optimizer.state[p]
            for key, value in kept.items():
                if key in state:
                    state[key].copy_(value)
                else:
                    state[key] = value.clone()
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        self._window.copy_(tensors["window"])
        self._nonfinite.zero_()
        for name, value in snap["host"].items():
            setattr(self, name, value)
        for name, value in snap["hints"].items():
            setattr(self.compute_sae, name, value)

    # ------------------------------------------------------------ dead latents

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last `dead_after` tokens (bool [d_sae], on the SAE's device)."""
        return self.tokens_since_fired >= self.cfg.dead_after

    def _resample_due(self) -> bool:
        every = self.cfg.resample_every
        last_allowed = self.cfg.total_steps * (1 - self.cfg.lr_decay_fraction)
        return every > 0 and self.step % every == 0 and self.step < last_allowed

    @torch.no_grad()
    def resample_dead_latents(self) -> int:
        """Re-initialise dead latents from inputs the SAE reconstructs badly (Bricken et al. 2023):
        inputs are drawn with probability proportional to their squared loss; a dead latent's
        decoder row becomes the drawn input's direction (x - b_dec, normalised), its encoder row
        that direction times 0.2 times the mean alive encoder norm, its encoder bias 0, and Adam's
        moments for those entries are reset. Returns how many latents were resampled."""
        sae, cfg = self.sae, self.cfg
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        # The stream is addressable, so peeking at the next rows changes nothing.
        sample = self.stream.read(self.position, cfg.resample_sample_rows)
        sample = sample[torch.isfinite(sample).all(dim=1)] * self.input_scale
        if sample.shape[0] == 0:
            self._say(f"step {self.step}: resampling skipped (no finite rows in the sample)")
            return 0
        sample = sample.to(device=sae.device, dtype=sae.dtype)
        losses = []
        for part in sample.split(4096):
            losses.append((sae(part) - part).pow(2).sum(-1).double().cpu())
        weights = torch.cat(losses).pow(2)
        if not torch.isfinite(weights).all() or weights.sum() <= 0:
            weights = torch.ones_like(weights)
        # One independent draw per dead latent, as the paper describes (with replacement).
        picks = torch.multinomial(weights, n_dead, replacement=True, generator=self.generator)
        chosen = sample[picks.to(sample.device)] - sae.b_dec
        directions = torch.nn.functional.normalize(chosen.float(), dim=1).to(sae.dtype)

        idx = dead.nonzero().squeeze(1).to(sae.device)
        alive = ~dead.to(sae.device)
        if self.sharded:  # this rank's dead latents, with their drawn directions
            mine = (idx >= sae.start) & (idx < sae.stop)
            idx, directions = idx[mine] - sae.start, directions[mine]
            alive = alive[sae.start : sae.stop]
        any_alive = bool(alive.any()) if not self.sharded else self.n_alive() > 0
        enc = sae.enc_weight  # [d_sae, d_in] view of W_enc
        enc_norm = self._mean_row_norm(enc, alive) if any_alive else enc.new_tensor(1.0)
        if sae.cfg.decoder_norm == "unit_norm" or not any_alive:
            dec_norm = 1.0
        else:
            dec_norm = self._mean_row_norm(sae.W_dec, alive)
        sae.W_dec[idx] = directions * dec_norm
        enc[idx] = directions * (0.2 * enc_norm)
        sae.b_enc[idx] = 0
        self._reset_adam(sae.W_dec, idx, dim=0)
        self._reset_adam(sae.b_enc, idx, dim=0)
        self._reset_adam(sae.W_enc, idx, dim=1)  # W_enc is [d_in, d_sae]: latents are columns
        self.tokens_since_fired[dead] = 0
        self.n_resamples += 1
        self._say(f"step {self.step}: resampled {n_dead} dead latents ({n_dead / sae.d_sae:.1%})")
        return n_dead

    def n_alive(self) -> int:
        return int((~self.dead_mask()).sum())

    def _mean_row_norm(self, rows: Tensor, alive: Tensor) -> Tensor:
        """The mean norm of the alive latents' rows (over all shards when sharded)."""
        if not self.sharded:
            return rows[alive].norm(dim=1).mean()
        total = torch.stack([rows[alive].norm(dim=1).sum(), alive.sum().to(rows.dtype)])
        torch.distributed.all_reduce(total)
        return total[0] / total[1]

    def _reset_adam(self, param: Tensor, idx: Tensor, dim: int) -> None:
        state = self.optimizer.state.get(param)
        if not state:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(dim, idx, 0.0)

    # ------------------------------------------------------------ metrics

    def _log_metrics(self) -> dict:
        n = max(1, self._window_steps)
        if self.data_parallel:  # each rank's window holds its slices' weighted figures
            torch.distributed.all_reduce(self._window)
            self._window /= self.world_size
        means = (self._window / n).tolist()
        row = {"step": self.step, "tokens": self.tokens_seen, "world_size": self.world_size,
               "shard_latents": self.sharded}
        row.update({name: float(value) for name, value in zip(METRIC_NAMES, means)})
        row["dead_fraction"] = float(self.dead_mask().double().mean())
        row["tokens_per_s"] = self._window_tokens / self._window_seconds if self._window_seconds > 0 else None
        row["lr"] = self.cfg.lr_at(max(0, self.step - 1))
        row["sparsity_coefficient"] = self.cfg.sparsity_coefficient_at(max(0, self.step - 1))
        row["elapsed_s"] = self.elapsed
        self.last_metrics = row
        self._window.zero_()
        self._window_steps = self._window_tokens = 0
        self._window_seconds = 0.0
        if self.out_dir is not None and self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / ckpt.METRICS_FILENAME, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar = getattr(self, "_bar", None)
        if bar is not None:
            tps = row["tokens_per_s"]
            bar.set_postfix_str(
                f"mse {row['mse']:.4g} fvu {row['fvu']:.3f} l0 {row['l0']:.1f} dead {row['dead_fraction']:.1%} "
                f"tok/s {tps or 0:,.0f} lr {row['lr']:.2g}",
                refresh=False,
            )
        return row

    # ------------------------------------------------------------ checkpoints

    def export_sae(self) -> SAE:
        """The SAE for use on raw activations (the normalisation factor folded in), in eval mode:
        the float32 master weights, with the training dtype noted in cfg.metadata["trained_dtype"]
        (`fastsae.load(folder, dtype=torch.bfloat16)` gives it in that dtype). Latent-sharded:
        collective; the whole SAE, gathered on the CPU of rank 0 (None on the other ranks)."""
        whole = self._whole_sae()
        return None if whole is None else self._export(whole)

    def _whole_sae(self) -> Optional[SAE]:
        """The master SAE; when sharded, gathered on rank 0's CPU (None elsewhere; collective)."""
        return self.sae.gather_sae(dst=0, device="cpu") if self.sharded else self.sae

    def _export(self, whole: SAE) -> SAE:
        sae = fold_input_scale(whole, self.input_scale)
        sae.cfg.metadata["trained_dtype"] = self.cfg.dtype
        for key, value in provenance_metadata(self.cfg.data).items():
            if value is not None:
                sae.cfg.metadata.setdefault(key, value)  # a loaded SAE's own record wins
        if self.world_size > 1:
            sae.cfg.metadata["trained_world_size"] = self.world_size
        return sae.eval()

    def _state_dict(self, whole: SAE) -> dict:
        return {
            "sae": {name: t.detach().cpu().clone() for name, t in whole.state_dict().items()},
            "tokens_since_fired": self.tokens_since_fired.cpu().clone(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "window": self._window.cpu().clone(),
        }

    def _state_json(self) -> dict:
        return {
            "step": self.step,
            "total_steps": self.cfg.total_steps,
            "tokens_seen": self.tokens_seen,
            "position": self.position,
            "input_scale": self.input_scale,
            "initialized": self.initialized,
            "bad_in_row": self.bad_in_row,
            "refused_batches": self.refused_batches,
            "elapsed_s": self.elapsed,
            "n_resamples": self.n_resamples,
            "dead_strategy": self.dead_strategy,
            "window_steps": self._window_steps,
            "window_tokens": self._window_tokens,
            "window_seconds": self._window_seconds,
            "rows_per_epoch": self.stream.rows_per_epoch,
        }

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint atomically; the previous one stays until this one is in place."""
        if self.out_dir is None:
            raise ValueError("save_checkpoint: this trainer has no out_dir")
        bad = [name for name, param in self.sae.named_parameters() if not torch.isfinite(param).all()]
        if self._any_rank(bool(bad)):
            raise RuntimeError(
                f"step {self.step}: parameter {', '.join(bad) or 'of another rank'} holds NaN/Inf; not overwriting "
                f"the last good checkpoint {self.last_checkpoint}"
            )
        # Sharded: the whole SAE and Adam state, gathered on rank 0, make a one-process checkpoint.
        whole = self._whole_sae()
        optimizer_state = self.sae.gather_optimizer_state(self.optimizer, dst=0, device="cpu") if self.sharded else None
        if self.rank != 0:  # rank 0 writes the run's files
            self.last_checkpoint = ckpt.checkpoint_dir(self.out_dir, self.step)
            return self.last_checkpoint
        optimizer_state = optimizer_state if self.sharded else self.optimizer.state_dict()
        state, info = self._state_dict(whole), self._state_json()

        def write(folder: Path) -> None:
            self._export(whole).save(folder)
            self.cfg.save(folder)
            torch.save(optimizer_state, folder / ckpt.OPTIMIZER_PT)
            torch.save(state, folder / ckpt.STATE_PT)
            with open(folder / ckpt.STATE_JSON, "w") as f:
                json.dump(info, f, indent=2)

        self.last_checkpoint = ckpt.write_checkpoint(self.out_dir, self.step, write)
        return self.last_checkpoint

    def _load_state(self, folder: Path) -> None:
        info = ckpt.read_state_json(folder)
        path = folder / ckpt.STATE_PT
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            optimizer_state = torch.load(folder / ckpt.OPTIMIZER_PT, map_location="cpu" if self.sharded else self.sae.device,
                                         weights_only=True)
        except Exception as exc:
            raise ValueError(f"{folder}: cannot read the checkpoint's state: {exc}") from exc
        if self.sharded:  # the checkpoint holds the whole SAE: this rank takes its latents
            self.sae.load_whole_state_dict(state["sae"])
            optimizer_state = self.sae.shard_optimizer_state(optimizer_state, self.optimizer)
        else:
            self.sae.load_state_dict({k: v.to(self.sae.device) for k, v in state["sae"].items()})
        self.optimizer.load_state_dict(optimizer_state)
        self.tokens_since_fired = state["tokens_since_fired"].to(self.sae.device).clone()
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self._window = state["window"].to(self.sae.device).clone()
        self.step = info["step"]
        self.tokens_seen = info["tokens_seen"]
        self.position = info["position"]
        self.input_scale = info["input_scale"]
        self.initialized = info["initialized"]
        self.bad_in_row = info["bad_in_row"]
        self.refused_batches = info.get("refused_batches", 0)  # absent from checkpoints before it was counted
        self.elapsed = info["elapsed_s"]
        self.n_resamples = info["n_resamples"]
        self._window_steps = info["window_steps"]
        self._window_tokens = info["window_tokens"]
        self._window_seconds = info["window_seconds"]
        if info.get("rows_per_epoch") != self.stream.rows_per_epoch:
            self._say(
                f"note: the data has {self.stream.rows_per_epoch:,} rows per epoch, the checkpoint's had "
                f"{info.get('rows_per_epoch')}: the resumed run will not see the same batches"
            )
        self.last_checkpoint = folder


def _fired_and_l0(acts, d_sae: int) -> tuple[Tensor, Tensor]:
    """Which latents fired in the batch (bool [d_sae]) and the mean number active per row
    (no data-dependent shapes: nothing waits for the device)."""
    if isinstance(acts, SparseActivations):
        active = acts.values > 0
        counts = torch.zeros(d_sae, dtype=torch.int32, device=acts.values.device)
        counts.index_add_(0, acts.indices.reshape(-1), active.reshape(-1).to(torch.int32))
        return counts > 0, active.sum(-1).float().mean()
    active = acts > 0
    return active.any(0), active.sum(-1).float().mean()


@torch.no_grad()
def _broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    for t in module.state_dict().values():
        torch.distributed.broadcast(t, src=0)


def _clear_run(out_dir: Path) -> None:
    import shutil

    shutil.rmtree(out_dir / ckpt.CHECKPOINTS_DIRNAME, ignore_errors=True)
    (out_dir / ckpt.METRICS_FILENAME).unlink(missing_ok=True)
