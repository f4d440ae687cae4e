"""Shared by the SAELens integration tests: the tolerances against SAELens, a fixture that leaves
SAELens unpatched around each test, and SAELens' own trainer on a few small batches."""

import pytest
import torch

# fastsae's patched classes against SAELens' own code, per dtype.
SAELENS_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


@pytest.fixture(autouse=True)
def unpatched_saelens():
    """Each test starts and ends with SAELens' classes unpatched (import it into a test module)."""
    from fastsae.integrations import revert_saelens

    revert_saelens()
    yield
    revert_saelens()


def fit_with_saelens_trainer(sae, d_in: int, steps: int = 6, batch: int = 16, seed: int = 7):
    """Train `sae` with SAELens' `SAETrainer` on `steps` random batches; returns the trainer."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    batches = [torch.randn(batch, d_in) for _ in range(steps)]
    cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=steps * batch,
        device="cpu", autocast=False, lr=3e-3, lr_end=3e-3, lr_scheduler_name="constant", lr_warm_up_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=batch,
        dead_feature_window=2, feature_sampling_window=1000, logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(batches))
    trainer.fit()
    return trainer
