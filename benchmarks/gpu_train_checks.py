"""Checks of the trainer that need a GPU (issue 13), printed as one JSON object.

- sync: torch.cuda.set_sync_debug_mode("warn") over the steps between two log steps of a bf16
  TopK run on device-made synthetic data and on an activation file (pinned read-ahead): every
  synchronising call torch sees is listed, with where it came from.
- quality: a TopK SAE on synthetic features (the quality benchmark's 256 features in 64 dims),
  float32 vs bfloat16 vs float16 compute on the GPU: mean max cosine, FVU, L0.
- rollback: a NaN loss injected at one batch on the GPU is rolled back and refused; the weights
  end equal to a run that refused that batch from the start.

    python benchmarks/gpu_train_checks.py OUT.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

import fastsae
from fastsae.bench import harness
from fastsae.training import ActivationFiles, SyntheticActivations, Trainer, TrainerConfig
from fastsae.training.data import save_activations


def _cfg(**kw):
    args = dict(total_tokens=4096 * 40, batch_size=4096, lr=4e-4, progress=False, log_every_steps=10,
                checkpoint_every_seconds=None, dead_after_tokens=10_000_000)
    args.update(kw)
    return TrainerConfig(**args)


def sync_check(data, dtype: str) -> dict:
    torch.manual_seed(0)
    sae = fastsae.SAE(d_in=data.d_in, d_sae=24576, architecture="topk", k=32, device="cuda")
    trainer = Trainer(sae, data, _cfg(dtype=dtype))
    trainer.train(max_steps=11)  # warm: kernels compiled, Adam state made, a log step behind
    real_step, real_check = trainer._train_step, trainer._check
    found: list[str] = []

    def step(x):
        torch.cuda.set_sync_debug_mode("warn")
        return real_step(x)

    def check():
        torch.cuda.set_sync_debug_mode(0)
        return real_check()

    trainer._train_step, trainer._check = step, check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(max_steps=8)  # steps 12..19, no log step among them
    torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            found.append(f"{w.filename}:{w.lineno}: {str(w.message)[:160]}")
    return {"steps_watched": 8, "synchronising_calls": len(found), "where": sorted(set(found))[:20]}


def quality(dtype: str) -> dict:
    data = SyntheticActivations(d_in=64, n_features=256, l0=4, n_rows=1 << 18, seed=0, chunk_rows=8192, device="cuda")
    torch.manual_seed(0)
    sae = fastsae.SAE(d_in=64, d_sae=512, architecture="topk", k=4, device="cuda")
    cfg = TrainerConfig(total_tokens=600_000, batch_size=1024, lr=4e-3, progress=False, log_every_steps=100,
                        checkpoint_every_seconds=None, shuffle_buffer_rows=1 << 15, dtype=dtype)
    trainer = Trainer(sae, data, cfg)
    result = trainer.train()
    return {"mean_max_cosine": data.score(trainer.export_sae()), "fvu": result["fvu"], "l0": result["l0"],
            "tokens_per_s": result["tokens_per_s"]}


def rollback() -> dict:
    def run(inject: bool):
        data = SyntheticActivations(d_in=64, n_features=256, l0=4, n_rows=1 << 16, seed=1, chunk_rows=1024)
        torch.manual_seed(0)
        sae = fastsae.SAE(d_in=64, d_sae=512, architecture="topk", k=4, device="cuda")
        trainer = Trainer(sae, data, _cfg(total_tokens=1024 * 20, batch_size=1024, shuffle_buffer_rows=1024,
                                          init_sample_rows=1024, log_every_steps=8, dtype="bfloat16"))
        compute, real = trainer.compute_sae, trainer.compute_sae.training_forward
        skip = 10 * 1024

        def forward(x, **kw):
            out = real(x, **kw)
            if trainer.position - 1024 == skip:
                out.loss = out.loss * float("nan")
            return out

        if inject:
            compute.training_forward = forward
        else:  # the reference refuses the same batch on the host

            def patched_train_step(x, _real=trainer._train_step):
                if trainer.position - 1024 == skip:
                    trainer._refuse("reference: this batch is skipped")
                    return False
                return _real(x)

            trainer._train_step = patched_train_step
        trainer.train()
        return trainer

    a, b = run(True), run(False)
    equal = all(torch.equal(p, q) for p, q in zip(a.sae.state_dict().values(), b.sae.state_dict().values()))
    return {"messages": a.messages, "equal_to_reference": equal, "step": a.step, "position": a.position,
            "reference_position": b.position}


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    results: dict = {"device": harness.device_model(torch.device("cuda")), "torch": torch.__version__}
    checks = {
        "sync_synthetic_bf16": lambda: sync_check(
            SyntheticActivations(d_in=768, n_features=4096, l0=32, n_rows=1 << 20, device="cuda"), "bfloat16"),
        "sync_file_bf16": lambda: sync_check(ActivationFiles(file), "bfloat16"),
        "quality_float32": lambda: quality("float32"),
        "quality_bfloat16": lambda: quality("bfloat16"),
        "quality_float16": lambda: quality("float16"),
        "rollback": rollback,
    }
    with tempfile.TemporaryDirectory() as tmp:
        file = save_activations(Path(tmp) / "acts.safetensors",
                                torch.randn(1 << 18, 768, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
        for name, check in checks.items():
            try:
                results[name] = check()
            except Exception as exc:  # report and go on: one broken check must not hide the others
                results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            print(name, json.dumps(results[name])[:600], flush=True)
    if out is not None:
        harness.write_json(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
