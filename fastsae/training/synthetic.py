"""Synthetic activations with known ground-truth features (sparse superposition), and the score
of a trained SAE against them.

Each row is x = sum_i a_i f_i over `n_features` random unit directions f_i in d_in dimensions
(n_features > d_in: superposition); each feature is on independently with probability
l0 / n_features, with magnitude uniform in [min_magnitude, 1]. A good SAE's decoder rows
recover the f_i: `mean_max_cosine` is, averaged over the true features, the best cosine
similarity of any decoder row to it (1.0 = every feature found exactly).

With `device="cuda"` the rows are made on the GPU (the same features, codes drawn by the
device's generator: different rows from the CPU's, equally reproducible), so synthetic training
moves no data between host and device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastsae.training.seeding import keyed_generator


class SyntheticActivations:
    """A finite (n_rows), reproducible source of sparse-superposition activations."""

    def __init__(
        self,
        d_in: int = 64,
        n_features: int = 256,
        l0: float = 4.0,
        n_rows: int = 1 << 20,
        seed: int = 0,
        chunk_rows: int = 8192,
        min_magnitude: float = 0.0,
        device: str = "cpu",
    ):
        for name, value in (("d_in", d_in), ("n_features", n_features), ("n_rows", n_rows), ("chunk_rows", chunk_rows)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not 0 < l0 <= n_features:
            raise ValueError(f"l0: expected 0 < l0 <= n_features={n_features}, got {l0}")
        if not 0 <= min_magnitude <= 1:
            raise ValueError(f"min_magnitude: expected a value in [0, 1], got {min_magnitude}")
        self._d_in = d_in
        self.n_features = n_features
        self.l0 = float(l0)
        self.n_rows = n_rows
        self.seed = seed
        self.chunk_rows = chunk_rows
        self.min_magnitude = float(min_magnitude)
        self.device = torch.device(device)
        directions = torch.randn(n_features, d_in, generator=keyed_generator(seed, 0x5EED), dtype=torch.float64)
        self.features = torch.nn.functional.normalize(directions, dim=1).to(torch.float32)
        self._features_on_device = self.features.to(self.device)

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def rows_device(self) -> torch.device:
        """Where load_chunk's rows are (the read-ahead takes device-made rows inline)."""
        return self.device

    @property
    def chunk_sizes(self) -> list[int]:
        full, rest = divmod(self.n_rows, self.chunk_rows)
        return [self.chunk_rows] * full + ([rest] if rest else [])

    def sample_codes(self, rows: int, generator: torch.Generator) -> Tensor:
        """Ground-truth feature activations [rows, n_features]."""
        on = torch.rand(rows, self.n_features, generator=generator) < self.l0 / self.n_features
        span = 1.0 - self.min_magnitude
        codes = torch.zeros(rows, self.n_features)
        codes[on] = self.min_magnitude + span * torch.rand(int(on.sum()), generator=generator)
        return codes

    def _device_codes(self, rows: int, generator: torch.Generator) -> Tensor:
        # As sample_codes, without a data-dependent shape (no host synchronisation on a GPU).
        shape = (rows, self.n_features)
        on = torch.rand(shape, generator=generator, device=self.device) < self.l0 / self.n_features
        magnitude = self.min_magnitude + (1.0 - self.min_magnitude) * torch.rand(shape, generator=generator, device=self.device)
        return torch.where(on, magnitude, 0.0)

    def load_chunk(self, index: int) -> Tensor:
        rows = self.chunk_sizes[index]
        if self.device.type == "cpu":
            codes = self.sample_codes(rows, keyed_generator(self.seed, 0xDA7A, index))
            return codes @ self.features
        generator = torch.Generator(self.device).manual_seed(keyed_generator(self.seed, 0xDA7A, index).initial_seed())
        return self._device_codes(rows, generator) @ self._features_on_device

    def describe(self) -> dict:
        return {
            "kind": "synthetic",
            "d_in": self.d_in,
            "n_features": self.n_features,
            "l0": self.l0,
            "n_rows": self.n_rows,
            "seed": self.seed,
            "chunk_rows": self.chunk_rows,
            "min_magnitude": self.min_magnitude,
            "device": str(self.device),
        }

    def score(self, sae) -> float:
        return mean_max_cosine(sae.W_dec, self.features)

    def __repr__(self) -> str:
        return (
            f"SyntheticActivations({self.n_features} features in {self.d_in} dims, L0 {self.l0:g}, "
            f"{self.n_rows:,} rows, seed {self.seed})"
        )


@torch.no_grad()
def mean_max_cosine(W_dec: Tensor, features: Tensor) -> float:
    """Mean over the true features [n, d] of the largest cosine similarity to any decoder row
    [d_sae, d] (rows of zero norm never match)."""
    if W_dec.ndim != 2 or features.ndim != 2 or W_dec.shape[1] != features.shape[1]:
        raise ValueError(
            f"mean_max_cosine: expected W_dec [d_sae, d] and features [n, d] with one d, got "
            f"{tuple(W_dec.shape)} and {tuple(features.shape)}"
        )
    dec = torch.nn.functional.normalize(W_dec.detach().double().cpu(), dim=1)
    true = torch.nn.functional.normalize(features.detach().double().cpu(), dim=1)
    return (true @ dec.T).max(dim=1).values.mean().item()
