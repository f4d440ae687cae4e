"""`fastsae.Trainer`: trains an `SAE` on a source of activations.

The loop uses the module and its losses only (`SAE.training_forward`, the decoder-constraint
methods, `save`); it never calls a backend. Per step:
  x = the next batch of the shuffled stream (times the normalisation factor)
  refuse the batch if it holds NaN/Inf (several in a row stop training)
  loss = training_forward(x, sparsity coefficient warmed up, dead_mask for AuxK)
  backward; unit-norm decoders: drop the gradient along each decoder row; Adam step
  (`fastsae.training.optim.Adam`: torch's update without its parameter-sized temporaries; warm-up
  then decay of the learning rate); unit-norm decoders: renormalise rows; JumpReLU: keep the
  thresholds positive; count tokens since each latent last fired
  relu: every N steps resample dead latents (Bricken et al. 2023)
Metrics go to metrics.jsonl every `log_every_steps`; checkpoints every few minutes and at the end.
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

from fastsae.config import SAEConfig
from fastsae.formats import saelens
from fastsae.sae import SAE
from fastsae.sparse import SparseActivations
from fastsae.training import checkpoint as ckpt
from fastsae.training.config import TrainerConfig
from fastsae.training.data import ActivationSource, ShuffledStream, open_source
from fastsae.training.optim import Adam

METRIC_NAMES = ("loss", "mse", "fvu", "l0", "sparsity_loss", "aux_loss")


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
    if sae.architecture == "batchtopk" and sae.cfg.rescale_acts_by_decoder_norm:
        folded.topk_threshold.div_(scale)  # the rescaled activations shrink by the same factor
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
        if not isinstance(sae, SAE):
            raise ValueError(f"Trainer: expected a fastsae.SAE, got {type(sae).__name__}")
        cfg = TrainerConfig() if cfg is None else cfg
        if not isinstance(cfg, TrainerConfig):
            raise ValueError(f"Trainer: expected a TrainerConfig, got {type(cfg).__name__}")
        if data.d_in != sae.d_in:
            raise ValueError(f"data: expected activations of width d_in={sae.d_in} (the SAE's), got width {data.d_in} from {data!r}")
        self.sae = sae
        self.data = data
        self.cfg = cfg
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
                _clear_run(self.out_dir)
        self.stream = ShuffledStream(data, seed=cfg.seed, buffer_rows=cfg.shuffle_buffer_rows)
        self.optimizer = Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        self.dead_strategy = self._resolve_dead_strategy()

        # Trainer state (everything a checkpoint holds besides weights and Adam's state).
        self.step = 0  # optimizer steps taken
        self.tokens_seen = 0  # rows trained on
        self.position = 0  # rows read from the stream (includes refused batches)
        self.input_scale = 1.0
        self.initialized = False
        self.bad_in_row = 0
        self.elapsed = 0.0  # seconds of training, summed over resumed sessions
        self.n_resamples = 0
        self.tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.int64)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._window = torch.zeros(len(METRIC_NAMES), dtype=torch.float64)
        self._window_steps = 0
        self._window_tokens = 0
        self._window_seconds = 0.0
        self.last_metrics: dict = {}
        self.last_checkpoint: Optional[Path] = None
        self.messages: list[str] = []

    # ------------------------------------------------------------ construction helpers

    def _resolve_dead_strategy(self) -> str:
        arch = self.sae.architecture
        strategy = self.cfg.dead_strategy
        if strategy == "auto":
            return {"relu": "resample", "topk": "auxk", "batchtopk": "auxk"}.get(arch, "none")
        if strategy == "auxk" and arch not in ("topk", "batchtopk"):
            raise ValueError(f"dead_strategy: 'auxk' needs a topk or batchtopk SAE, got {arch!r}")
        return strategy

    @classmethod
    def resume(
        cls,
        out_dir: Union[str, Path],
        data: Optional[ActivationSource] = None,
        *,
        progress: Optional[bool] = None,
    ) -> "Trainer":
        """A trainer that continues the newest complete checkpoint in `out_dir` (data: the saved
        source description is reopened unless a source is given)."""
        out_dir = Path(out_dir)
        folder = ckpt.latest_checkpoint(out_dir)
        if folder is None:
            raise FileNotFoundError(f"{out_dir}: no complete checkpoint to resume from (looked in {out_dir / ckpt.CHECKPOINTS_DIRNAME})")
        cfg = TrainerConfig.load(folder)
        if progress is not None:
            cfg.progress = progress
        sae_cfg = SAEConfig.from_dict(saelens.read_cfg(folder))
        sae_cfg.device = cfg.device
        sae = SAE(sae_cfg)
        if data is None:
            data = open_source(cfg.data)
        trainer = cls.__new__(cls)
        # Build as a fresh trainer without the "folder holds a run" check, then load the state.
        cls.__init__(trainer, sae, data, cfg, None)
        trainer.out_dir = out_dir
        trainer._load_state(folder)
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
        if not self.initialized:
            self._initialize()
        total = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.step + max_steps)
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not cfg.progress, unit="step", dynamic_ncols=True,
                   file=sys.stderr, desc="training")
        self._bar = bar
        last_save = time.monotonic()
        try:
            while self.step < total:
                started = time.perf_counter()
                x = self.stream.read(self.position, cfg.batch_size)
                self.position += cfg.batch_size
                if not self._train_step(x):
                    continue
                seconds = time.perf_counter() - started
                self.elapsed += seconds
                self._window_seconds += seconds
                bar.update(1)
                if self.dead_strategy == "resample" and self._resample_due():
                    self.resample_dead_latents()
                if self.step % cfg.log_every_steps == 0 or self.step == cfg.total_steps:
                    self._log_metrics()
                if self.out_dir is not None and (
                    (cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0)
                    or (cfg.checkpoint_every_seconds is not None and time.monotonic() - last_save >= cfg.checkpoint_every_seconds)
                ):
                    self.save_checkpoint()
                    last_save = time.monotonic()
        finally:
            bar.close()
            self._bar = None
        if self._window_steps and self.step == cfg.total_steps:
            self._log_metrics()
        if self.out_dir is not None and self.last_checkpoint_step() != self.step:
            self.save_checkpoint()
        return {"step": self.step, "tokens": self.tokens_seen, "checkpoint": self.last_checkpoint,
                "elapsed_s": self.elapsed, **self.last_metrics}

    def last_checkpoint_step(self) -> Optional[int]:
        return None if self.last_checkpoint is None else int(self.last_checkpoint.name.split("_")[-1])

    def _say(self, message: str) -> None:
        self.messages.append(message)
        bar = getattr(self, "_bar", None)
        if bar is not None and not bar.disable:
            bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def _refuse(self, why: str) -> None:
        self.bad_in_row += 1
        self._say(f"step {self.step + 1}: {why}; batch refused ({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.cfg.max_bad_batches:
            kept = self.last_checkpoint or (ckpt.latest_checkpoint(self.out_dir) if self.out_dir else None)
            raise BadDataError(
                f"training stopped at step {self.step + 1}: {self.bad_in_row} batches in a row were refused "
                f"(NaN/Inf); the last good checkpoint is {kept if kept else 'none (no checkpoint was written yet)'}"
            )

    def _train_step(self, x_cpu: Tensor) -> bool:
        """One optimizer step on a batch; False if the batch was refused."""
        cfg, sae = self.cfg, self.sae
        bad = ~torch.isfinite(x_cpu)
        if bad.any():
            self._refuse(f"the batch holds {int(bad.sum())} NaN/Inf values (stream rows {self.position - x_cpu.shape[0]}"
                         f"..{self.position - 1})")
            return False
        x = (x_cpu * self.input_scale).to(device=sae.device, dtype=sae.dtype, non_blocking=True)
        lr = cfg.lr_at(self.step)
        coefficient = cfg.sparsity_coefficient_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        dead_mask = None
        if self.dead_strategy == "auxk":
            dead = self.tokens_since_fired >= cfg.dead_after
            if dead.any():
                dead_mask = dead.to(sae.device)
        out = sae.training_forward(
            x, sparsity_coefficient=coefficient, dead_mask=dead_mask, k_aux=cfg.aux_k, aux_coefficient=cfg.aux_coefficient
        )
        if not torch.isfinite(out.loss):
            self._refuse(f"the loss is not finite ({out.loss.item()})")
            return False
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if sae.cfg.decoder_norm == "unit_norm":
            sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        with torch.no_grad():
            if sae.cfg.decoder_norm == "unit_norm":
                sae.set_decoder_norm_to_unit_norm()
            if sae.architecture == "jumprelu":
                sae.threshold.clamp_(min=cfg.jumprelu_min_threshold)
            fired, l0 = _fired_and_l0(out.acts, sae.d_sae)
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired.cpu()] = 0
            err = (out.x_hat.reshape(x.shape) - x).pow(2).sum()
            var = (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
            values = torch.stack([out.loss, out.mse_loss, err / var, l0, out.sparsity_loss, out.aux_loss])
            self._window += values.detach().double().cpu()
        self._window_steps += 1
        self._window_tokens += x.shape[0]
        self.step += 1
        self.tokens_seen += x.shape[0]
        self.bad_in_row = 0
        return True

    # ------------------------------------------------------------ dead latents

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last `dead_after` tokens (bool [d_sae], CPU)."""
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
        enc = sae.enc_weight  # [d_sae, d_in] view of W_enc
        enc_norm = enc[alive].norm(dim=1).mean() if alive.any() else enc.new_tensor(1.0)
        if sae.cfg.decoder_norm == "unit_norm" or not alive.any():
            dec_norm = 1.0
        else:
            dec_norm = sae.W_dec[alive].norm(dim=1).mean()
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
        means = (self._window / n).tolist()
        row = {"step": self.step, "tokens": self.tokens_seen}
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
        if self.out_dir is not None:
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
        """The SAE for use on raw activations (the normalisation factor folded in), in eval mode."""
        sae = fold_input_scale(self.sae, self.input_scale)
        return sae.eval()

    def _state_dict(self) -> dict:
        return {
            "sae": {name: t.detach().cpu().clone() for name, t in self.sae.state_dict().items()},
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "window": self._window.clone(),
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
        for name, param in self.sae.named_parameters():
            if not torch.isfinite(param).all():
                raise RuntimeError(
                    f"step {self.step}: parameter {name} holds NaN/Inf; not overwriting the last good "
                    f"checkpoint {self.last_checkpoint}"
                )
        state, info = self._state_dict(), self._state_json()

        def write(folder: Path) -> None:
            self.export_sae().save(folder)
            self.cfg.save(folder)
            torch.save(self.optimizer.state_dict(), folder / ckpt.OPTIMIZER_PT)
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
            optimizer_state = torch.load(folder / ckpt.OPTIMIZER_PT, map_location=self.sae.device, weights_only=True)
        except Exception as exc:
            raise ValueError(f"{folder}: cannot read the checkpoint's state: {exc}") from exc
        self.sae.load_state_dict({k: v.to(self.sae.device) for k, v in state["sae"].items()})
        self.optimizer.load_state_dict(optimizer_state)
        self.tokens_since_fired = state["tokens_since_fired"].clone()
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self._window = state["window"].clone()
        self.step = info["step"]
        self.tokens_seen = info["tokens_seen"]
        self.position = info["position"]
        self.input_scale = info["input_scale"]
        self.initialized = info["initialized"]
        self.bad_in_row = info["bad_in_row"]
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
    """Which latents fired in the batch (bool [d_sae]) and the mean number active per row."""
    if isinstance(acts, SparseActivations):
        active = acts.values > 0
        fired = torch.zeros(d_sae, dtype=torch.bool, device=acts.values.device)
        fired[acts.indices[active]] = True
        return fired, active.sum(-1).float().mean()
    active = acts > 0
    return active.any(0), active.sum(-1).float().mean()


def _clear_run(out_dir: Path) -> None:
    import shutil

    shutil.rmtree(out_dir / ckpt.CHECKPOINTS_DIRNAME, ignore_errors=True)
    (out_dir / ckpt.METRICS_FILENAME).unlink(missing_ok=True)
