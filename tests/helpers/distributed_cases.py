"""The training runs tests/model/test_distributed.py compares: one process against N processes (gloo, CPU).

Two kinds: the bare step (`CASES`: training_forward, backward, Adam, the dead-latent counter
feeding AuxK, on fixed random batches) and the `Trainer` (`TRAINER_CASES`: its data slices,
loss weighting, agreement on checks, ReLU resampling across shards, the whole SAE at the end).

Run as a module (tests/ on PYTHONPATH), it is one rank of a multi-process run:
    python -m helpers.distributed_cases RANK WORLD_SIZE PORT OUT_DIR
Each rank trains every case of `CASES` (data parallel and latent-sharded) and rank 0 writes the
whole SAE's weights after the first and the last step to OUT_DIR/<case>.pt. `run_case(case)`
without a process group is the one-process run on the same data and seed.

The loop is the trainer's step (training_forward, backward, Adam, the dead-latent counter feeding
AuxK) on fixed random batches.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fastsae import SAE, SAEConfig
from fastsae import distributed as fdist
from fastsae.training.optim import Adam

STEPS = 20
BATCH = 10  # uneven slices on 3 processes (4, 3, 3)
D_IN = 8
D_SAE = 26  # uneven shards on 3 processes (9, 9, 8)
DEAD_AFTER = 2 * BATCH  # latents die within the run, so AuxK takes part

# name -> (SAE options, how the run is split, ReLU's sparse width limit on each shard)
CASES = {
    "topk_dp": (dict(architecture="topk", k=3), "data", None),
    "relu_dp": (dict(architecture="relu"), "data", None),
    "topk_shard": (dict(architecture="topk", k=3), "latents", None),
    "topk_rescaled_shard": (dict(architecture="topk", k=4, rescale_acts_by_decoder_norm=True, decoder_norm="unit_norm"), "latents", None),
    "relu_shard_dense": (dict(architecture="relu"), "latents", None),  # random init: rows too dense, the dense path
    "relu_shard_sparse": (dict(architecture="relu"), "latents", D_SAE),  # always the row-wise sparse path
}


def batches(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS, BATCH, D_IN, generator=g) * 2 + 0.5


def initial_sae(options: dict) -> SAE:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, **options))
    with torch.no_grad():
        sae.b_dec.copy_(torch.linspace(-0.5, 0.5, D_IN))  # nonzero: its gradient has both parts
    return sae


def run_case(name: str) -> dict:
    """Train case `name` on this process group (or alone) and return, on rank 0, the whole SAE's
    weights after step 1 and after the last step and the losses per step."""
    options, split, width_limit = CASES[name]
    sae = initial_sae(options)
    world = fdist.get_world_size()
    if world > 1 and split == "latents":
        model = fdist.ShardedSAE.from_sae(sae)
        model.sparse_width_limit = width_limit
        params = model
    elif world > 1:
        model = fdist.data_parallel(sae)
        params = sae
    else:
        sae.sparse_width_limit = width_limit
        model = params = sae
    adam = Adam(params.parameters(), lr=3e-3)
    tokens_since_fired = torch.zeros(D_SAE, dtype=torch.int64)
    snapshots, losses, dead_steps = {}, [], 0
    for step, x in enumerate(batches()):
        dead = tokens_since_fired >= DEAD_AFTER
        dead_steps += bool(dead.any())
        kwargs = dict(sparsity_coefficient=0.3 if options["architecture"] == "relu" else 0.0,
                      dead_mask=dead if dead.any() and options["architecture"] == "topk" else None)
        if world > 1 and split == "data":
            offset, rows = fdist.batch_slice(BATCH)
            out = model(x[offset : offset + rows], **kwargs)
            weight = fdist.slice_loss_weight(rows, BATCH)
        else:
            out = model.training_forward(x, **kwargs) if model is params else model(x, **kwargs)
            weight = 1.0
        adam.zero_grad(set_to_none=True)
        (out.loss * weight).backward()
        if params.cfg.decoder_norm == "unit_norm":
            params.remove_gradient_parallel_to_decoder_directions()
        adam.step()
        if params.cfg.decoder_norm == "unit_norm":
            params.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            if isinstance(out, fdist.ShardedTrainOutput):
                fired = out.fired
            else:
                active = out.acts.values > 0
                fired = torch.zeros(D_SAE, dtype=torch.bool)
                fired[out.acts.indices[active]] = True
                fired = fdist.all_reduce_fired(fired)
            tokens_since_fired += BATCH
            tokens_since_fired[fired] = 0
        losses.append(float(out.mse_loss.detach()) if split == "latents" or world == 1 else None)
        if step in (0, STEPS - 1):
            whole = params.gather_sae() if isinstance(params, fdist.ShardedSAE) else params
            if whole is not None:
                snapshots[step + 1] = {k: v.detach().clone() for k, v in whole.state_dict().items()}
    return {"weights": snapshots, "mse": losses, "dead_steps": dead_steps, "sae": whole}


# name -> (SAE options, split, trainer options)
TRAINER_CASES = {
    "trainer_topk_dp": (dict(architecture="topk", k=3), "data", {}),
    "trainer_relu_shard_resample": (dict(architecture="relu"), "latents",
                                    dict(sparsity_coefficient=10.0, resample_every_steps=6, dead_after_tokens=BATCH)),
}


def run_trainer_case(name: str) -> dict:
    """Train trainer case `name` on this process group (or alone); on rank 0: the exported SAE's
    weights, the logged metrics and the trainer's messages."""
    from fastsae.training import Trainer, TrainerConfig
    from fastsae.training.synthetic import SyntheticActivations

    options, split, trainer_options = TRAINER_CASES[name]
    sae = initial_sae(options)
    if fdist.get_world_size() > 1 and split == "latents":
        sae = fdist.ShardedSAE.from_sae(sae)
    data = SyntheticActivations(d_in=D_IN, n_features=40, l0=3.0, n_rows=4096, seed=3)
    cfg = TrainerConfig(total_tokens=STEPS * BATCH, batch_size=BATCH, lr=3e-3, log_every_steps=5, checkpoint_every_seconds=None,
                        progress=False, seed=0, init_sample_rows=256, **trainer_options)
    trainer = Trainer(sae, data, cfg)
    trainer.train()
    exported = trainer.export_sae()
    weights = None if exported is None else {k: v.detach().clone() for k, v in exported.state_dict().items()}
    return {"weights": weights, "n_resamples": trainer.n_resamples, "metrics": trainer.last_metrics,
            "messages": trainer.messages, "dead": trainer.dead_mask().clone()}


def main(rank: int, world: int, port: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    fdist.ShardedSAE.gather_chunk_elements = 7 * D_IN  # gathers for saving go in several pieces
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name in CASES:
            result = run_case(name)
            sae = result.pop("sae")
            if rank == 0:
                torch.save(result, out_dir / f"{name}.pt")
                if CASES[name][1] == "latents":
                    sae.save(out_dir / f"{name}_sae")  # gathered from the shards
        for name in TRAINER_CASES:
            result = run_trainer_case(name)
            if rank == 0:
                torch.save(result, out_dir / f"{name}.pt")
        fdist.shutdown()  # every rank done before any leaves
    except BaseException:
        fdist.shutdown(barrier=False)
        raise
    fdist.exit_process(0)  # as `fastsae train` does: DDP's gloo threads can abort the interpreter's exit


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
