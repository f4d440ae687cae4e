"""`fastsae browse`: a static feature browser for a trained SAE.

One streaming pass of the SAE over a transformer's activations gathers each feature's density,
maximum and mean activation, histogram and top-activating contexts (`stats`); the site (`site`)
is plain HTML, CSS and JavaScript that works from the file system. Uses only the public
`fastsae.SAE` (its `encode_sparse`) and a data source with the `TransformerActivations` protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from fastsae.evals import is_paired
from fastsae.browse.site import make_server, serve, token_strings, write_site
from fastsae.browse.stats import (
    FeatureStats,
    FeatureStatsAccumulator,
    collect_stats,
    encoded_batches,
    nearest_by_decoder,
)

__all__ = [
    "FeatureStats",
    "FeatureStatsAccumulator",
    "build_browser",
    "collect_stats",
    "encoded_batches",
    "make_server",
    "nearest_by_decoder",
    "serve",
    "token_strings",
    "write_site",
]


@torch.no_grad()
def build_browser(
    sae,
    source,
    out,
    max_tokens: Optional[int] = 100_000,
    features: Optional[Sequence[int]] = None,
    n_contexts: int = 16,
    title: Optional[str] = None,
    batch_rows: int = 4096,
    metrics: Optional[dict] = None,
) -> Path:
    """Scan up to `max_tokens` tokens of `source` (a `TransformerActivations`: it holds the token
    stream and the tokenizer) with `sae` and write the site into `out`; `metrics`: a `fastsae eval`
    result shown on the index page. A transcoder's latents are read from the source's inputs (its
    `hook`; a paired source's targets are not needed). Returns index.html's path."""
    if source.d_in != sae.d_in:
        raise ValueError(
            f"model width: {source!r} gives activations of width {source.d_in}, but the SAE reads d_in={sae.d_in} "
            "(pick the --model and --hook the SAE was trained on)"
        )
    stats = collect_stats(sae, source, max_tokens=max_tokens, batch_rows=batch_rows, n_contexts=n_contexts)
    if stats.n_tokens == 0:
        raise ValueError(f"max_tokens: expected a positive number of tokens to scan, got {max_tokens}")
    alive = int((stats.counts > 0).sum())
    if is_paired(sae):  # the latents read the input hook; the metrics compare the output with the target
        what = f"{sae.architecture} transcoder, d_in {sae.d_in} -> d_out {sae.d_out}{' with skip' if sae.W_skip is not None else ''}"
        where = f"latents at {source.hook!r}" + (f", output against {source.hook_out!r}" if getattr(source, "hook_out", None) else "")
    else:
        what, where = f"{sae.architecture} SAE, d_in {sae.d_in}", ""
    summary = (
        f"{what}, d_sae {sae.d_sae}; {stats.n_tokens:,} tokens of {source!r}; {alive:,} features fired"
        + (f"; {where}" if where else "")
    )
    kind = "transcoder" if is_paired(sae) else "SAE"
    return write_site(
        stats, out, source.token_ids, source.tokenizer, sae.W_dec, features=features,
        title=title or f"{sae.architecture} {kind} ({sae.d_sae} features)", summary=summary, metrics=metrics,
    )
