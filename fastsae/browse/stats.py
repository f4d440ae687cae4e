"""Per-feature statistics of an SAE over a token stream, in one streaming pass over its sparse
activations: density, maximum and mean activation, a histogram, the top-activating contexts
(a bounded heap per feature, kept as a [d_sae, K] tensor and merged batch by batch, never a
Python heap per token), and, beside the pass, the nearest features by decoder cosine.

Everything is vectorised over the (row, latent) entries of a batch's `SparseActivations`, so the
cost of a batch grows with its nonzero entries, not with d_sae x rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor

from fastsae.evals import split_rows

EMPTY_EXPONENT = -1000  # a histogram that has seen nothing yet


@dataclass
class FeatureStats:
    """What the pass found. Feature f's histogram has `n_bins` bins of width 2**hist_exponent[f]
    starting at 0; its top contexts are `top_values[f]` (descending, -inf where fewer fired) at
    stream positions `top_positions[f]` (-1 where empty), with the feature's activation on each
    token of the window [position - before, position + after] in `context_acts[f, j]` (NaN where
    the window leaves the stream)."""

    n_tokens: int
    counts: Tensor  # int64 [d_sae]: tokens on which the feature fired
    sums: Tensor  # float64 [d_sae]: sum of its activations
    max_values: Tensor  # float32 [d_sae]: 0 where it never fired
    hist: Tensor  # int64 [d_sae, n_bins]
    hist_exponent: Tensor  # int64 [d_sae]
    top_values: Tensor  # float32 [d_sae, K]
    top_positions: Tensor  # int64 [d_sae, K]
    context_acts: Tensor  # float32 [d_sae, K, before + 1 + after]
    before: int
    after: int

    @property
    def d_sae(self) -> int:
        return self.counts.shape[0]

    @property
    def density(self) -> Tensor:
        """Fraction of tokens on which each feature fired (float64 [d_sae])."""
        return self.counts.double() / max(1, self.n_tokens)

    @property
    def mean_values(self) -> Tensor:
        """Mean activation where the feature fired (0 where it never did)."""
        return self.sums / self.counts.clamp_min(1).double()

    def histogram(self, feature: int) -> tuple[float, list[int]]:
        """(bin width, counts) of one feature, trimmed after the last non-empty bin."""
        counts = self.hist[feature]
        nonzero = counts.nonzero()
        if nonzero.numel() == 0:
            return 0.0, []
        last = int(nonzero.max())
        return 2.0 ** int(self.hist_exponent[feature]), counts[: last + 1].tolist()


class FeatureStatsAccumulator:
    """Feed it consecutive batches of one token stream's sparse activations with `update`, then
    call `finish`. Rows must come in stream order; `positions` say where each row sits in the
    stream (a gap is allowed: context windows never reach across it)."""

    def __init__(self, d_sae: int, n_contexts: int = 16, before: int = 12, after: int = 4, n_bins: int = 64):
        if d_sae < 1:
            raise ValueError(f"d_sae: expected a positive integer, got {d_sae}")
        if n_contexts < 1:
            raise ValueError(f"n_contexts: expected a positive integer, got {n_contexts}")
        if before < 0 or after < 0:
            raise ValueError(f"before, after: expected non-negative context sizes, got {before}, {after}")
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins: expected a power of two >= 2 (bins merge in pairs), got {n_bins}")
        self.d_sae, self.k, self.before, self.after, self.n_bins = d_sae, n_contexts, before, after, n_bins
        self.log2_bins = n_bins.bit_length() - 1
        width = before + 1 + after
        self.n_tokens = 0
        self.counts = torch.zeros(d_sae, dtype=torch.int64)
        self.sums = torch.zeros(d_sae, dtype=torch.float64)
        self.max_values = torch.zeros(d_sae, dtype=torch.float32)
        self.hist = torch.zeros(d_sae, n_bins, dtype=torch.int64)
        self.hist_exponent = torch.full((d_sae,), EMPTY_EXPONENT, dtype=torch.int64)
        self.top_values = torch.full((d_sae, n_contexts), -float("inf"), dtype=torch.float32)
        self.top_positions = torch.full((d_sae, n_contexts), -1, dtype=torch.int64)
        self.context_acts = torch.full((d_sae, n_contexts, width), float("nan"), dtype=torch.float32)
        self.offsets = torch.arange(-before, after + 1)
        # Rows kept from the previous batch: the last `before` (already scanned; the left side of
        # the next rows' windows) and the last `after` (not scanned yet: their right side had not come).
        self._carry: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self._pending = 0  # rows at the end of the carry not scanned yet
        self._keys: Optional[Tensor] = None
        self._key_values: Optional[Tensor] = None

    # ------------------------------------------------------------ the pass

    @torch.no_grad()
    def update(self, values: Tensor, indices: Tensor, positions: Tensor) -> None:
        """One batch: `values`, `indices` [N, m] (a `SparseActivations`' tensors, any width; entries
        <= 0 are padding or silent), `positions` int64 [N]."""
        if values.ndim != 2 or values.shape != indices.shape:
            raise ValueError(f"values, indices: expected one shape [N, m], got {tuple(values.shape)} and {tuple(indices.shape)}")
        if positions.shape != values.shape[:1]:
            raise ValueError(f"positions: expected [{values.shape[0]}], got {tuple(positions.shape)}")
        values = values.detach().float().cpu()
        indices = indices.cpu()
        positions = positions.cpu().long()
        if self._carry is not None:
            cv, ci, cp = self._carry
            m = max(cv.shape[1], values.shape[1])
            values = torch.cat([_pad_cols(cv, m), _pad_cols(values, m)])
            indices = torch.cat([_pad_cols(ci, m), _pad_cols(indices, m)])
            positions = torch.cat([cp, positions])
            first = cv.shape[0] - self._pending
        else:
            first = 0
        stop = values.shape[0] - self.after  # rows whose right-hand window has arrived
        if stop > first:
            self._scan(values, indices, positions, first, stop)
        keep = self.before + self.after
        tail = max(0, values.shape[0] - keep)
        self._carry = (values[tail:].clone(), indices[tail:].clone(), positions[tail:].clone())
        self._pending = values.shape[0] - max(first, stop)

    def finish(self) -> FeatureStats:
        """Scan the rows still waiting for their right-hand context (at the end of the stream)."""
        if self._carry is not None and self._pending > 0:
            values, indices, positions = self._carry
            self._scan(values, indices, positions, values.shape[0] - self._pending, values.shape[0])
        self._carry, self._pending = None, 0
        return FeatureStats(
            n_tokens=self.n_tokens, counts=self.counts, sums=self.sums, max_values=self.max_values,
            hist=self.hist, hist_exponent=self.hist_exponent, top_values=self.top_values,
            top_positions=self.top_positions, context_acts=self.context_acts, before=self.before, after=self.after,
        )

    def _scan(self, values: Tensor, indices: Tensor, positions: Tensor, first: int, stop: int) -> None:
        """Count rows [first, stop) of the buffer (the rows around them give the context windows)."""
        self.n_tokens += stop - first
        self._keys = None  # the buffer's sorted (row, latent) keys, built when a window needs them
        block = values[first:stop]
        fired = block > 0
        v = block[fired]
        if v.numel() == 0:
            return
        f = indices[first:stop][fired]
        row = fired.nonzero()[:, 0] + first
        self.counts += torch.bincount(f, minlength=self.d_sae)
        self.sums.index_add_(0, f, v.double())
        self.max_values.scatter_reduce_(0, f, v, "amax")
        self._add_to_histograms(v, f)
        self._merge_top(values, indices, positions, v, f, row)

    def _add_to_histograms(self, v: Tensor, f: Tensor) -> None:
        # Linear bins from 0 whose width, a power of two, doubles (adjacent bins merging, exactly)
        # whenever a larger activation arrives: no second pass to find each feature's range.
        batch_max = torch.zeros(self.d_sae).scatter_reduce_(0, f, v, "amax")
        touched = batch_max > 0
        need = torch.frexp(batch_max / self.n_bins).exponent.long()  # v / n_bins < 2**need
        old = self.hist_exponent
        new = torch.where(touched, torch.maximum(old, need), old)
        shift = (new - old).clamp(max=self.log2_bins)
        for s in shift.unique().tolist():
            if s <= 0:
                continue
            rows = (shift == s).nonzero().squeeze(1)
            merged = self.hist[rows].view(len(rows), self.n_bins >> s, 1 << s).sum(-1)
            self.hist[rows] = torch.cat([merged, merged.new_zeros(len(rows), self.n_bins - merged.shape[1])], 1)
        self.hist_exponent = new
        bins = torch.ldexp(v, -new[f]).long().clamp_(0, self.n_bins - 1)
        self.hist.view(-1).index_add_(0, f * self.n_bins + bins, torch.ones_like(bins))

    def _merge_top(self, values, indices, positions, v, f, row) -> None:
        # Only entries beating their feature's current K-th best can enter its heap.
        beats = v > self.top_values[f, -1]
        if not bool(beats.any()):
            return
        v, f, row = v[beats], f[beats], row[beats]
        # Group by feature, best first within a group, and keep each group's first K.
        order = torch.argsort(v, descending=True, stable=True)
        order = order[torch.argsort(f[order], stable=True)]
        v, f, row = v[order], f[order], row[order]
        feats, group_sizes = torch.unique_consecutive(f, return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(feats)), group_sizes)
        starts = torch.cumsum(group_sizes, 0) - group_sizes
        rank = torch.arange(len(f)) - starts[group]
        head = rank < self.k
        v, f, row, group, rank = v[head], f[head], row[head], group[head], rank[head]

        n, k, width = len(feats), self.k, self.offsets.numel()
        cand_values = torch.full((n, k), -float("inf"))
        cand_values[group, rank] = v
        cand_entry = torch.full((n, k), -1, dtype=torch.int64)
        cand_entry[group, rank] = torch.arange(len(v))
        best = torch.cat([self.top_values[feats], cand_values], 1).topk(k, dim=1)  # held entries win ties
        from_new = best.indices >= k
        held = best.indices.clamp(max=k - 1)
        new_positions = self.top_positions[feats].gather(1, held)
        new_acts = self.context_acts[feats].gather(1, held[:, :, None].expand(-1, -1, width))
        # Windows only for the candidates that made it in.
        entry = cand_entry.gather(1, (best.indices - k).clamp(min=0))[from_new]
        new_positions[from_new] = positions[row[entry]]
        new_acts[from_new] = self._window_acts(values, indices, positions, f[entry], row[entry])
        self.top_values[feats] = best.values
        self.top_positions[feats] = new_positions
        self.context_acts[feats] = new_acts

    def _window_acts(self, values, indices, positions, f, row) -> Tensor:
        """Feature f's activation on each token of the window around each (f, row): [C, width]."""
        if len(f) == 0:
            return torch.zeros(0, self.offsets.numel())
        n_rows = values.shape[0]
        if self._keys is None:
            # The buffer's entries as sorted (row, latent) keys: each window token is one binary search.
            fired = values > 0
            keys = fired.nonzero()[:, 0] * self.d_sae + indices[fired]
            keys, order = keys.sort()
            self._keys, self._key_values = keys, values[fired][order]
        keys, key_values = self._keys, self._key_values
        rows = row[:, None] + self.offsets[None, :]
        inside = (rows >= 0) & (rows < n_rows)
        rows = rows.clamp(0, n_rows - 1)
        # A window never reaches across a gap in the stream (e.g. a --tokens cut between files).
        inside &= positions[rows] == positions[row][:, None] + self.offsets[None, :]
        if keys.numel() == 0:
            return torch.where(inside, 0.0, float("nan"))
        queries = rows * self.d_sae + f[:, None]
        at = torch.searchsorted(keys, queries).clamp_(max=keys.numel() - 1)
        acts = torch.where(keys[at] == queries, key_values[at], 0.0)
        return torch.where(inside, acts, float("nan"))


def _pad_cols(t: Tensor, m: int) -> Tensor:
    if t.shape[1] == m:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], m - t.shape[1])], 1)


@torch.no_grad()
def collect_stats(sae, source, max_tokens: Optional[int] = None, batch_rows: int = 4096, **options) -> FeatureStats:
    """Encode the source's chunks in order (up to `max_tokens` rows) with `sae.encode_sparse` and
    accumulate `FeatureStats`. `source`: `chunk_sizes`, `load_chunk(i)`, `chunk_token_positions(i)`
    (a `TransformerActivations`). `options` go to `FeatureStatsAccumulator`."""
    acc = FeatureStatsAccumulator(sae.d_sae, **options)
    for values, indices, positions in encoded_batches(sae, source, max_tokens, batch_rows):
        acc.update(values, indices, positions)
    return acc.finish()


def encoded_batches(sae, source, max_tokens: Optional[int] = None, batch_rows: int = 4096) -> Iterable:
    """(values, indices, positions) of each batch of the source's rows, in stream order."""
    seen = 0
    for index in range(len(source.chunk_sizes)):
        if max_tokens is not None and seen >= max_tokens:
            return
        rows = split_rows(source, source.load_chunk(index))[0]  # a transcoder's latents read its inputs
        positions = source.chunk_token_positions(index)
        if max_tokens is not None:
            rows, positions = rows[: max_tokens - seen], positions[: max_tokens - seen]
        for part, pos in zip(rows.split(batch_rows), positions.split(batch_rows)):
            acts = sae.encode_sparse(part.to(device=sae.device, dtype=sae.dtype))
            seen += part.shape[0]
            yield acts.values, acts.indices, pos


@torch.no_grad()
def nearest_by_decoder(W_dec: Tensor, features: Tensor, n: int = 8, chunk_rows: int = 1024) -> tuple[Tensor, Tensor]:
    """For each feature in `features`, the `n` other features whose decoder rows have the largest
    cosine with its own: (indices [F, n], cosines [F, n]). Works through `chunk_rows` features at
    a time, so memory is chunk_rows x d_sae however large d_sae."""
    d_sae = W_dec.shape[0]
    n = min(n, d_sae - 1)
    unit = torch.nn.functional.normalize(W_dec.detach().float(), dim=1)
    features = torch.as_tensor(features, dtype=torch.int64, device=unit.device)
    out_idx, out_cos = [], []
    for lo in range(0, len(features), chunk_rows):
        feats = features[lo : lo + chunk_rows]
        sims = unit[feats] @ unit.T
        sims[torch.arange(len(feats), device=sims.device), feats] = -float("inf")
        top = sims.topk(n, dim=1)
        out_idx.append(top.indices.cpu())
        out_cos.append(top.values.cpu())
    if not out_idx:
        return torch.zeros(0, n, dtype=torch.int64), torch.zeros(0, n)
    return torch.cat(out_idx), torch.cat(out_cos)
