"""Small trainer set-ups shared by the trainer tests: synthetic data and a short run's config."""

from fastsae.training import SyntheticActivations, TrainerConfig


def small_data(**kw) -> SyntheticActivations:
    args = dict(d_in=16, n_features=48, l0=3, n_rows=4096, seed=1, chunk_rows=512)
    args.update(kw)
    return SyntheticActivations(**args)


def small_cfg(**kw) -> TrainerConfig:
    args = dict(total_tokens=256 * 12, batch_size=256, lr=3e-3, progress=False, log_every_steps=2,
                checkpoint_every_seconds=None, shuffle_buffer_rows=1024, init_sample_rows=1024, sparsity_coefficient=0.5)
    args.update(kw)
    return TrainerConfig(**args)


class PoisonedSource(SyntheticActivations):
    """Synthetic rows, with NaN (and, unless `with_inf` is False, +inf) in the chunks listed in
    `poisoned`."""

    poisoned: set = set()
    with_inf = True

    def load_chunk(self, index):
        rows = super().load_chunk(index)
        if index in self.poisoned:
            rows[3, 2] = float("nan")
            if self.with_inf:
                rows[5, 0] = float("inf")
        return rows
