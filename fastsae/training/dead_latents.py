"""Dead latents in training: tokens since each latent last fired (counted on the device), the
dead mask AuxK reads, and resampling (Bricken et al. 2023) with Adam's moments reset.

The strategy is the architecture's ("auto": `Architecture.default_dead_strategy`), or the one
`TrainerConfig.dead_strategy` names.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fastsae import architectures
from fastsae.auxk import DeadLatents


def resolve_dead_strategy(arch, strategy: str, paired: bool = False) -> str:
    """The strategy a run uses: "auto" asks the architecture; "auxk" needs one that supports it.
    Resampling draws new latents from inputs the SAE reconstructs badly, which a transcoder
    (`paired`: trained on inputs and targets) does not do: "auto" gives it "none" instead."""
    if strategy == "auto":
        return "none" if paired and arch.default_dead_strategy == "resample" else arch.default_dead_strategy
    if strategy == "resample" and paired:
        raise ValueError("dead_strategy: 'resample' re-initialises latents from inputs the SAE reconstructs badly; "
                         "a transcoder reconstructs no input (use 'auxk' where the architecture has it, or 'none')")
    if strategy == "auxk" and not arch.supports_auxk:
        with_auxk = " or ".join(n for n in architectures.names() if architectures.get(n).supports_auxk)
        raise ValueError(f"dead_strategy: 'auxk' needs a {with_auxk} SAE, got {arch.name!r}")
    return strategy


class DeadLatentTracker:
    """Tokens since each latent fired, and what the run's strategy does with the dead ones."""

    def __init__(self, sae, cfg, strategy: str, sharded: bool, say: Callable[[str], None]):
        self.sae = sae
        self.cfg = cfg
        self.strategy = strategy
        self.sharded = sharded
        self.say = say
        self.tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=sae.device)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # resampling's draws
        self.n_resamples = 0
        self._possible = True  # whether a latent can be dead before the next check (AuxK)
        self._aux_capacity = sae.d_sae  # a bound on the dead latents until the next check

    def mask(self) -> Tensor:
        """Latents that have not fired in the last `dead_after` tokens (bool [d_sae], on the SAE's device)."""
        return self.tokens_since_fired >= self.cfg.dead_after

    def n_alive(self) -> int:
        return int((~self.mask()).sum())

    def note_possible(self) -> None:
        """At a check: how many latents can reach `dead_after` tokens without firing before the next
        check (at most `log_every_steps` steps away)? None: the steps until then pass no dead mask
        (AuxK has nothing to do; the result is the same as passing it). Otherwise that count,
        rounded up to a multiple of 64 (fewer distinct shapes), bounds the dead latents until then:
        the capacity of AuxK's list on an accelerator, where counting them each step would wait
        for the device."""
        if self.strategy != "auxk":
            return
        horizon = self.cfg.log_every_steps * self.cfg.batch_size
        possible = int((self.tokens_since_fired + horizon >= self.cfg.dead_after).sum())
        self._possible = possible > 0
        self._aux_capacity = min(self.sae.d_sae, -(-possible // 64) * 64)

    def for_auxk(self, device: torch.device):
        """The dead latents for this step's AuxK loss, or None (no AuxK, or none can be dead)."""
        if self.strategy != "auxk" or not self._possible:
            return None
        dead_mask = self.tokens_since_fired >= self.cfg.dead_after
        if device.type != "cpu" and not self.sharded:
            # No host sync on an accelerator: the dead latents go in a list whose capacity
            # bounds their count until the next check (on the CPU the mask's count is read).
            return DeadLatents.from_mask(dead_mask, capacity=self._aux_capacity)
        return dead_mask

    def record(self, fired: Tensor, tokens: int) -> None:
        """A step of `tokens` rows in which the latents `fired` fired."""
        self.tokens_since_fired += tokens
        self.tokens_since_fired.masked_fill_(fired, 0)

    def resample_due(self, step: int) -> bool:
        every = self.cfg.resample_every
        last_allowed = self.cfg.total_steps * (1 - self.cfg.lr_decay_fraction)
        return self.strategy == "resample" and every > 0 and step % every == 0 and step < last_allowed

    @torch.no_grad()
    def resample(self, optimizer: torch.optim.Optimizer, read_sample: Callable[[], Tensor], step: int) -> int:
        """Re-initialise dead latents from inputs the SAE reconstructs badly (`read_sample()`: rows
        of the normalised data, NaN/Inf rows dropped), drawn with probability proportional to
        their squared loss: a dead latent's
        decoder row becomes the drawn input's direction (x - b_dec, normalised), its encoder row
        that direction times 0.2 times the mean alive encoder norm, its encoder bias 0, and Adam's
        moments for those entries are reset. Returns how many latents were resampled."""
        sae = self.sae
        dead = self.mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        sample = read_sample()
        if sample.shape[0] == 0:
            self.say(f"step {step}: resampling skipped (no finite rows in the sample)")
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
        _reset_adam(optimizer, sae.W_dec, idx, dim=0)
        _reset_adam(optimizer, sae.b_enc, idx, dim=0)
        _reset_adam(optimizer, sae.W_enc, idx, dim=1)  # W_enc is [d_in, d_sae]: latents are columns
        self.tokens_since_fired[dead] = 0
        self.n_resamples += 1
        self.say(f"step {step}: resampled {n_dead} dead latents ({n_dead / sae.d_sae:.1%})")
        return n_dead

    def _mean_row_norm(self, rows: Tensor, alive: Tensor) -> Tensor:
        """The mean norm of the alive latents' rows (over all shards when sharded)."""
        if not self.sharded:
            return rows[alive].norm(dim=1).mean()
        total = torch.stack([rows[alive].norm(dim=1).sum(), alive.sum().to(rows.dtype)])
        torch.distributed.all_reduce(total)
        return total[0] / total[1]


def _reset_adam(optimizer: torch.optim.Optimizer, param: Tensor, idx: Tensor, dim: int) -> None:
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, idx, 0.0)
