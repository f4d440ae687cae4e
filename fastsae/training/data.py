"""Activation sources and the shuffled, position-addressable stream the trainer reads.

A source is a list of chunks of rows (`chunk_sizes`, `load_chunk(i)` -> float32 [rows, d_in]):
- `ActivationFiles`: a `.safetensors` file holding a 2-D tensor named `activations`, a `.npy`
  file, or a folder of such shards; chunks are contiguous row ranges read lazily (safetensors
  slices, numpy memory maps), so the files are never all in memory.
- `SyntheticActivations` (fastsae.training.synthetic) and `TransformerActivations`
  (fastsae.training.transformer) follow the same protocol.

`ShuffledStream` turns a source into an endless row stream: each epoch visits the chunks in a
seeded random order, groups consecutive chunks into shuffling buffers of about `buffer_rows`
rows, and permutes the rows within each buffer. Row `p` of the stream is a pure function of
(seed, p), so a run resumes exactly from the number of rows it has read, and a sample can be
peeked at without disturbing anything.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Protocol, Union

import numpy as np
import torch
from torch import Tensor

ACTIVATION_SUFFIXES = (".safetensors", ".npy")
SAFETENSORS_KEY = "activations"


class ActivationSource(Protocol):
    """What the trainer needs from a source of activations."""

    @property
    def d_in(self) -> int: ...

    @property
    def chunk_sizes(self) -> list[int]: ...

    def load_chunk(self, index: int) -> Tensor:
        """Rows of chunk `index` as a float32 CPU tensor [chunk_sizes[index], d_in]."""
        ...

    def describe(self) -> dict:
        """A JSON-able description: `open_source(describe())` reopens the same data."""
        ...


# ---------------------------------------------------------------- activation files


class _Shard:
    """One file of activations: its path, row count and width, read by row ranges."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = list(f.keys())
                    if SAFETENSORS_KEY not in keys:
                        raise ValueError(
                            f"{path}: expected a tensor named {SAFETENSORS_KEY!r}, found {sorted(keys)}"
                        )
                    shape = f.get_slice(SAFETENSORS_KEY).get_shape()
                    dtype = f.get_slice(SAFETENSORS_KEY).get_dtype()
            except ValueError:
                raise
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise ValueError(f"{path}: cannot read it as safetensors: {exc}") from exc
            if not str(dtype).upper().startswith(("F", "BF")):
                raise ValueError(f"{path}: expected floating-point activations, got dtype {dtype}")
        elif path.suffix == ".npy":
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: cannot read it as a .npy array: {exc}") from exc
            shape = list(array.shape)
            if array.dtype.kind != "f":
                raise ValueError(f"{path}: expected floating-point activations, got dtype {array.dtype}")
        else:
            raise ValueError(f"{path}: expected a {' or '.join(ACTIVATION_SUFFIXES)} file")
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"{path}: expected a 2-D [rows, d_in] array of activations, got shape {tuple(shape)}")
        self.rows, self.width = int(shape[0]), int(shape[1])

    def read(self, start: int, stop: int) -> Tensor:
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                rows = f.get_slice(SAFETENSORS_KEY)[start:stop]
        else:
            array = np.load(self.path, mmap_mode="r")
            rows = torch.from_numpy(np.array(array[start:stop], dtype=np.float32))
        return rows.to(torch.float32).contiguous()


class ActivationFiles:
    """Activations stored in a file or a folder of shards (read lazily, in chunks of rows)."""

    def __init__(self, path: Union[str, Path], chunk_rows: int = 4096):
        path = Path(path)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows: expected a positive integer, got {chunk_rows}")
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder of activations")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in ACTIVATION_SUFFIXES and p.is_file())
            if not files:
                raise ValueError(f"{path}: the folder holds no {' or '.join(ACTIVATION_SUFFIXES)} shards")
        else:
            files = [path]
        self.path = path
        self.chunk_rows = chunk_rows
        self.shards = [_Shard(f) for f in files]
        width = self.shards[0].width
        for shard in self.shards[1:]:
            if shard.width != width:
                raise ValueError(
                    f"{shard.path}: expected width {width} (as {self.shards[0].path.name}), got {shard.width}"
                )
        self._d_in = width
        # Chunk i covers rows [start, stop) of shard s.
        self._chunks: list[tuple[int, int, int]] = []
        for s, shard in enumerate(self.shards):
            for start in range(0, shard.rows, chunk_rows):
                self._chunks.append((s, start, min(shard.rows, start + chunk_rows)))

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def chunk_sizes(self) -> list[int]:
        return [stop - start for _, start, stop in self._chunks]

    def load_chunk(self, index: int) -> Tensor:
        s, start, stop = self._chunks[index]
        return self.shards[s].read(start, stop)

    def describe(self) -> dict:
        return {"kind": "files", "path": str(self.path), "chunk_rows": self.chunk_rows}

    def __repr__(self) -> str:
        rows = sum(s.rows for s in self.shards)
        return f"ActivationFiles({str(self.path)!r}: {len(self.shards)} shard(s), {rows:,} rows x {self.d_in})"


def save_activations(path: Union[str, Path], activations: Tensor) -> Path:
    """Write a [rows, d_in] tensor as an activations shard that `ActivationFiles` reads."""
    from safetensors.torch import save_file

    path = Path(path)
    if activations.ndim != 2:
        raise ValueError(f"activations: expected a 2-D [rows, d_in] tensor, got shape {tuple(activations.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({SAFETENSORS_KEY: activations.detach().cpu().contiguous()}, str(path))
    return path


def open_source(spec: dict) -> ActivationSource:
    """Reopen a source from its `describe()` dict."""
    kind = spec.get("kind")
    args = {key: value for key, value in spec.items() if key != "kind"}
    if kind == "files":
        return ActivationFiles(**args)
    if kind == "synthetic":
        from fastsae.training.synthetic import SyntheticActivations

        return SyntheticActivations(**args)
    if kind == "transformer":
        from fastsae.training.transformer import TransformerActivations

        return TransformerActivations(**args)
    raise ValueError(
        f"data source: expected kind 'files', 'synthetic' or 'transformer', got {kind!r} "
        f"({spec.get('repr', 'pass the source to Trainer.resume')})"
    )


# ---------------------------------------------------------------- the shuffled stream


def _generator(*keys: int) -> torch.Generator:
    # A distinct, reproducible generator per (seed, epoch, buffer) key.
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class ShuffledStream:
    """An endless, seeded, shuffled stream of a source's rows, readable at any position."""

    def __init__(self, source: ActivationSource, seed: int = 0, buffer_rows: int = 1 << 16):
        sizes = list(source.chunk_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"data source {source!r}: expected at least one non-empty chunk, got sizes {sizes[:8]}")
        if buffer_rows < 1:
            raise ValueError(f"buffer_rows: expected a positive integer, got {buffer_rows}")
        self.source = source
        self.seed = int(seed)
        self.buffer_rows = int(buffer_rows)
        self.sizes = sizes
        self.rows_per_epoch = sum(sizes)
        self._plan_epoch = -1
        self._plan: tuple[list[list[int]], list[int]] = ([], [])
        self._buffer_key: tuple[int, int] | None = None
        self._buffer: Tensor | None = None

    @property
    def d_in(self) -> int:
        return self.source.d_in

    def _epoch_plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """The epoch's buffers (lists of chunk indices) and their cumulative row offsets."""
        if epoch != self._plan_epoch:
            order = torch.randperm(len(self.sizes), generator=_generator(self.seed, epoch)).tolist()
            groups: list[list[int]] = [[]]
            rows = 0
            for chunk in order:
                if rows >= self.buffer_rows:
                    groups.append([])
                    rows = 0
                groups[-1].append(chunk)
                rows += self.sizes[chunk]
            starts = [0]
            for group in groups:
                starts.append(starts[-1] + sum(self.sizes[c] for c in group))
            self._plan_epoch, self._plan = epoch, (groups, starts)
        return self._plan

    def _load_buffer(self, epoch: int, group: int) -> Tensor:
        if self._buffer_key != (epoch, group):
            groups, _ = self._epoch_plan(epoch)
            rows = torch.cat([self._checked_chunk(c) for c in groups[group]])
            perm = torch.randperm(rows.shape[0], generator=_generator(self.seed, epoch, group + 1))
            self._buffer_key, self._buffer = (epoch, group), rows[perm]
        return self._buffer

    def _checked_chunk(self, index: int) -> Tensor:
        rows = self.source.load_chunk(index)
        expected = (self.sizes[index], self.d_in)
        if tuple(rows.shape) != expected:
            raise ValueError(f"data source {self.source!r}: chunk {index} has shape {tuple(rows.shape)}, expected {expected}")
        return rows

    def read(self, position: int, n: int) -> Tensor:
        """Rows [position, position + n) of the stream, as a float32 CPU tensor [n, d_in]."""
        if position < 0 or n < 0:
            raise ValueError(f"read: expected position >= 0 and n >= 0, got {position}, {n}")
        parts = []
        while n > 0:
            epoch, offset = divmod(position, self.rows_per_epoch)
            _, starts = self._epoch_plan(epoch)
            group = bisect.bisect_right(starts, offset) - 1
            buffer = self._load_buffer(epoch, group)
            start = offset - starts[group]
            take = min(n, buffer.shape[0] - start)
            parts.append(buffer[start : start + take])
            position += take
            n -= take
        if not parts:
            return torch.empty(0, self.d_in)
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts)
