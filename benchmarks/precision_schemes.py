"""Quality of the precision schemes (issue 13) on the quality benchmark's problem (256 features in 64 dims,
L0 4, 400k tokens, batch 1024, d_sae 512): fp32; mixed (fp32 masters, bf16 compute: fastsae's
choice); bf16 weights with fp32 Adam state (simulated: the weights are rounded to bf16 after
every Adam step, the moments stay fp32); bf16 everything (weights and Adam state bf16).

    python benchmarks/precision_schemes.py OUT.json      # ~2 min per run on 2 quiet CPU cores
"""
import json
import sys

import torch

import fastsae
from fastsae.training import SyntheticActivations, Trainer, TrainerConfig
RUNS = {"relu": (dict(architecture="relu"), dict(sparsity_coefficient=3.0, lr=4e-3)),
        "topk": (dict(architecture="topk", k=4), dict(lr=4e-3))}
out = {}
for arch, (sae_kw, tr_kw) in RUNS.items():
    for scheme in ("float32", "mixed_bf16", "bf16_weights_fp32_adam", "bf16_all"):
        data = SyntheticActivations(d_in=64, n_features=256, l0=4.0, n_rows=1 << 18, seed=0)
        torch.manual_seed(0)
        sae = fastsae.SAE(d_in=64, d_sae=512, **sae_kw)
        cfg = TrainerConfig(total_tokens=400_000, batch_size=1024, seed=0, progress=False, log_every_steps=100,
                            shuffle_buffer_rows=1 << 15, checkpoint_every_seconds=None,
                            dtype="bfloat16" if scheme == "mixed_bf16" else "float32", **tr_kw)
        t = Trainer(sae, data, cfg)
        if scheme in ("bf16_weights_fp32_adam", "bf16_all"):
            real = t.optimizer.step
            def step(*a, _real=real, _t=t, _all=scheme == "bf16_all"):
                r = _real(*a)
                with torch.no_grad():
                    for p in _t.sae.parameters():
                        p.copy_(p.to(torch.bfloat16))
                        if _all and p in _t.optimizer.state:
                            for k in ("exp_avg", "exp_avg_sq"):
                                s = _t.optimizer.state[p][k]; s.copy_(s.to(torch.bfloat16))
                return r
            t.optimizer.step = step
        r = t.train()
        out[f"{arch}/{scheme}"] = {"mean_max_cosine": round(data.score(t.sae), 5), "fvu": round(r["fvu"], 5), "l0": round(r["l0"], 3)}
        print(arch, scheme, out[f"{arch}/{scheme}"], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=2)
