"""What a trained SAE's features respond to: for a few features, the tokens and contexts of a
transformer corpus that activate them most."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from fastsae.evals import split_rows
from fastsae.sae import SAE


@dataclass
class FeatureExamples:
    feature: int
    frequency: float  # fraction of tokens on which it fires
    examples: list[tuple[float, int]] = field(default_factory=list)  # (activation, token position), best first


@torch.no_grad()
def top_activations(sae: SAE, source, n_examples: int = 5, max_rows: Optional[int] = None, batch_rows: int = 4096):
    """Scan the source's chunks in order: each feature's firing frequency and its `n_examples`
    largest activations with their token positions. Returns (frequency [d_sae], values
    [n_examples, d_sae], positions [n_examples, d_sae])."""
    d_sae = sae.d_sae
    best_values = torch.full((n_examples, d_sae), -float("inf"))
    best_positions = torch.full((n_examples, d_sae), -1, dtype=torch.int64)
    counts = torch.zeros(d_sae, dtype=torch.int64)
    seen = 0
    for index in range(len(source.chunk_sizes)):
        if max_rows is not None and seen >= max_rows:
            break
        rows = split_rows(source, source.load_chunk(index))[0]  # a transcoder's latents read its inputs
        positions = source.chunk_token_positions(index)
        for part, pos in zip(rows.split(batch_rows), positions.split(batch_rows)):
            acts = sae.encode(part.to(device=sae.device, dtype=sae.dtype)).float().cpu()
            counts += (acts > 0).sum(0)
            merged_values = torch.cat([best_values, acts])
            merged_positions = torch.cat([best_positions, pos[:, None].expand(-1, d_sae)])
            top = merged_values.topk(n_examples, dim=0)
            best_values = top.values
            best_positions = merged_positions.gather(0, top.indices)
            seen += part.shape[0]
    return counts.double() / max(1, seen), best_values, best_positions


def pick_features(frequency: Tensor, n: int) -> list[int]:
    """`n` alive features spread over the firing-frequency ranks (the densest tenth left out:
    dense features are rarely the interpretable ones)."""
    alive = (frequency > 0).nonzero().squeeze(1)
    if alive.numel() == 0:
        return []
    order = alive[frequency[alive].argsort()]  # rarest first
    order = order[: max(1, int(len(order) * 0.9))]
    if len(order) <= n:
        return order.tolist()
    picks = torch.linspace(len(order) * 0.2, len(order) - 1, n).round().long()
    return order[picks].tolist()


def _context(tokenizer, token_ids: Tensor, position: int, before: int = 8, after: int = 4) -> tuple[str, str]:
    """(token, its context with the token marked) for a position in the token stream."""
    lo, hi = max(0, position - before), min(len(token_ids), position + after + 1)
    left = tokenizer.decode(token_ids[lo:position].tolist())
    token = tokenizer.decode(token_ids[position : position + 1].tolist()).strip()
    right = tokenizer.decode(token_ids[position + 1 : hi].tolist())
    text = f"{left} [[{token}]] {right}".replace("\n", " ")
    return token, " ".join(text.split())


def feature_report(sae: SAE, source, n_features: int = 6, n_examples: int = 4, max_rows: Optional[int] = 65536) -> str:
    """A short text report: for `n_features` features, their frequency, top tokens and contexts."""
    frequency, values, positions = top_activations(sae, source, n_examples, max_rows)
    alive = int((frequency > 0).sum())
    lines = [f"features that fired on the first {min(max_rows or 10**18, sum(source.chunk_sizes)):,} tokens: "
             f"{alive:,} of {sae.d_sae:,}"]
    for f in pick_features(frequency, n_features):
        lines.append(f"feature {f} (fires on {frequency[f].item():.2%} of tokens):")
        for j in range(n_examples):
            value, position = values[j, f].item(), int(positions[j, f])
            if position < 0 or value <= 0:
                break
            token, text = _context(source.tokenizer, source.token_ids, position)
            lines.append(f"  {value:7.2f}  {token!r:14}  {text}")
    return "\n".join(lines)
