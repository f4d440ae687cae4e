"""Activation sources and the shuffled, position-addressable stream the trainer reads.

A source is a list of chunks of rows (`chunk_sizes`, `load_chunk(i)` -> float32 [rows, d_in]):
- `ActivationFiles`: a `.safetensors` file holding a 2-D tensor named `activations` (or, for a
  transcoder, two: `inputs` [rows, d_in] and `targets` [rows, d_out]), a `.npy` file, or a folder
  of such shards; chunks are contiguous row ranges (16384 rows by default) read
  lazily through a handle kept open per shard (safetensors slices, numpy memory maps), so the
  files are never all in memory and each read is one large copy.
- `SyntheticActivations` (fastsae.training.synthetic) and `TransformerActivations`
  (fastsae.training.transformer) follow the same protocol.
A paired source (a transcoder's data) says so with `d_out` (None otherwise): its rows are an input
and its target side by side, [rows, d_in + d_out] (`row_width`), so shuffling keeps pairs together
and a plain source's path is unchanged.

`ShuffledStream` turns a source into an endless row stream: each epoch visits the chunks in a
seeded random order, groups consecutive chunks into shuffling buffers of about `buffer_rows`
rows, and permutes the rows within each buffer. Row `p` of the stream is a pure function of
(seed, p), so a run resumes exactly from the number of rows it has read, and a sample can be
peeked at without disturbing anything.

`BatchPrefetcher` (fastsae.training.prefetch) reads the stream's next batches ahead.
"""

from __future__ import annotations

import bisect
import threading
from pathlib import Path
from typing import Optional, Protocol, Union

import numpy as np
import torch
from torch import Tensor

from fastsae.training.seeding import keyed_generator

ACTIVATION_SUFFIXES = (".safetensors", ".npy")
SAFETENSORS_KEY = "activations"
INPUTS_KEY, TARGETS_KEY = "inputs", "targets"  # a transcoder's paired activations


def row_width(source) -> int:
    """The width of a source's rows: d_in, or d_in + d_out for paired inputs and targets."""
    return source.d_in + (getattr(source, "d_out", None) or 0)


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

    def __init__(self, path: Path, key: str = SAFETENSORS_KEY):
        self.path, self.key = path, key
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = list(f.keys())
                    if key not in keys:
                        raise ValueError(
                            f"{path}: expected a tensor named {key!r}, found {sorted(keys)}"
                        )
                    shape = f.get_slice(key).get_shape()
                    dtype = f.get_slice(key).get_dtype()
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
        self._handle = None  # opened on first read and kept (one open per shard, not per chunk)

    def read(self, start: int, stop: int) -> Tensor:
        if self._handle is None:
            if self.path.suffix == ".safetensors":
                from safetensors import safe_open

                self._file = safe_open(str(self.path), framework="pt")
                self._handle = self._file.get_slice(self.key)
            else:
                self._handle = np.load(self.path, mmap_mode="r")
        if self.path.suffix == ".safetensors":
            rows = self._handle[start:stop]
        else:
            rows = torch.from_numpy(np.array(self._handle[start:stop], dtype=np.float32))
        return rows.to(torch.float32).contiguous()

    def __getstate__(self):  # the open handle does not pickle (deepcopy, workers); reopened lazily
        return {**self.__dict__, "_handle": None, "_file": None}


class ActivationFiles:
    """Activations stored in a file or a folder of shards (read lazily, in chunks of rows)."""

    def __init__(self, path: Union[str, Path], chunk_rows: int = 16384):
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
        paired = _holds_pairs(files[0])
        self.shards = [_Shard(f, INPUTS_KEY if paired else SAFETENSORS_KEY) for f in files]
        self.target_shards = [_Shard(f, TARGETS_KEY) for f in files] if paired else None
        self._d_in = _common_width(self.shards)
        self.d_out = _common_width(self.target_shards) if paired else None
        for shard, target in zip(self.shards, self.target_shards or ()):
            if target.rows != shard.rows:
                raise ValueError(f"{shard.path}: {INPUTS_KEY!r} has {shard.rows} rows but {TARGETS_KEY!r} has "
                                 f"{target.rows} (one target row per input row)")
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
        if self.target_shards is None:
            return self.shards[s].read(start, stop)
        return torch.cat([self.shards[s].read(start, stop), self.target_shards[s].read(start, stop)], dim=1)

    def describe(self) -> dict:
        return {"kind": "files", "path": str(self.path), "chunk_rows": self.chunk_rows}

    def row_origin(self, index: int, row: int) -> tuple[str, int]:
        """(file, row in that file) of row `row` of chunk `index`."""
        s, start, _ = self._chunks[index]
        return str(self.shards[s].path), start + row

    def __repr__(self) -> str:
        rows = sum(s.rows for s in self.shards)
        pairs = f" -> {self.d_out}" if self.d_out is not None else ""
        return f"ActivationFiles({str(self.path)!r}: {len(self.shards)} shard(s), {rows:,} rows x {self.d_in}{pairs})"


def _holds_pairs(path: Path) -> bool:
    """Whether a shard holds a transcoder's `inputs` and `targets` (and no `activations`)."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:
        return False  # _Shard says what is wrong with the file
    return SAFETENSORS_KEY not in keys and {INPUTS_KEY, TARGETS_KEY} <= keys


def _common_width(shards: list) -> int:
    for shard in shards[1:]:
        if shard.width != shards[0].width:
            raise ValueError(f"{shard.path}: expected width {shards[0].width} (as {shards[0].path.name}'s "
                             f"{shard.key!r}), got {shard.width}")
    return shards[0].width


def save_activations(path: Union[str, Path], activations: Tensor, targets: Optional[Tensor] = None) -> Path:
    """Write a [rows, d_in] tensor as an activations shard that `ActivationFiles` reads; with
    `targets` [rows, d_out], a transcoder's paired shard (`inputs` and `targets`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if activations.ndim != 2:
        raise ValueError(f"activations: expected a 2-D [rows, d_in] tensor, got shape {tuple(activations.shape)}")
    tensors = {SAFETENSORS_KEY: activations}
    if targets is not None:
        if targets.ndim != 2 or targets.shape[0] != activations.shape[0]:
            raise ValueError(f"targets: expected a 2-D [rows, d_out] tensor with the inputs' {activations.shape[0]} rows, "
                             f"got shape {tuple(targets.shape)}")
        tensors = {INPUTS_KEY: activations, TARGETS_KEY: targets}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: t.detach().cpu().contiguous() for key, t in tensors.items()}, str(path))
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
        self._buffer: tuple[Tensor, Tensor] | None = None  # (rows in chunk order, their shuffle)
        self._storage: Tensor | None = None  # the buffers' memory, reused
        # The prefetch thread and the trainer (initialisation, resampling) may read at once.
        self._lock = threading.Lock()

    @property
    def d_in(self) -> int:
        return self.source.d_in

    @property
    def row_width(self) -> int:
        return row_width(self.source)

    def _make_plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """The epoch's buffers (lists of chunk indices) and their cumulative row offsets."""
        order = torch.randperm(len(self.sizes), generator=keyed_generator(self.seed, epoch)).tolist()
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
        return groups, starts

    def _epoch_plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        if epoch != self._plan_epoch:
            self._plan_epoch, self._plan = epoch, self._make_plan(epoch)
        return self._plan

    def chunks_read(self, stop: int) -> list[int]:
        """The chunks whose buffers the stream loads to serve its rows [0, `stop`), sorted (what a run of
        `stop` rows reads: a cache can be filled with them before training)."""
        if stop < 0:
            raise ValueError(f"chunks_read: expected stop >= 0, got {stop}")
        chunks: set[int] = set()
        for epoch in range(-(-stop // self.rows_per_epoch)):
            groups, starts = self._make_plan(epoch)
            rows_left = stop - epoch * self.rows_per_epoch
            chunks.update(chunk for group, start in zip(groups, starts) if start < rows_left for chunk in group)
            if len(chunks) == len(self.sizes):  # every later epoch reads the same chunks again
                break
        return sorted(chunks)

    def origin(self, position: int, _cache: dict | None = None) -> tuple[int, int]:
        """(chunk index, row within that chunk) of stream row `position`. Recomputes the shuffle
        rather than touching the cached buffer, so it is safe beside a reader."""
        if position < 0:
            raise ValueError(f"origin: expected a position >= 0, got {position}")
        cache = {} if _cache is None else _cache  # plans and permutations, for many look-ups
        epoch, offset = divmod(position, self.rows_per_epoch)
        if epoch not in cache:
            cache[epoch] = self._make_plan(epoch)
        groups, starts = cache[epoch]
        group = bisect.bisect_right(starts, offset) - 1
        if (epoch, group) not in cache:
            n_rows = starts[group + 1] - starts[group]
            cache[epoch, group] = torch.randperm(n_rows, generator=keyed_generator(self.seed, epoch, group + 1))
        row = int(cache[epoch, group][offset - starts[group]])
        for chunk in groups[group]:
            if row < self.sizes[chunk]:
                return chunk, row
            row -= self.sizes[chunk]
        raise AssertionError("unreachable: the permutation covers the buffer's rows")

    def describe_rows(self, position: int, offsets) -> str:
        """Where rows `position + offsets` of the stream come from, for messages: their files and
        file rows when the source can say (`row_origin`), else their chunks, then the stream rows."""
        offsets = sorted(int(o) for o in offsets)
        row_origin = getattr(self.source, "row_origin", None)
        by_place: dict[str, list[int]] = {}
        cache: dict = {}
        for offset in offsets:
            chunk, row = self.origin(position + offset, cache)
            place, row = row_origin(chunk, row) if row_origin is not None else (f"chunk {chunk}", row)
            by_place.setdefault(place, []).append(row)
        parts = [f"{place} {'row' if len(rows) == 1 else 'rows'} {_ranges(rows)}" for place, rows in by_place.items()]
        where = "; ".join(parts) if parts else "no rows"
        if not offsets:
            return where
        first, last = position + offsets[0], position + offsets[-1]
        return f"{where} (stream row {first})" if first == last else f"{where} (stream rows {first}..{last})"

    def _load_buffer(self, epoch: int, group: int) -> tuple[Tensor, Tensor]:
        """The buffer's rows in chunk order and the permutation that shuffles them (reads gather
        their rows through it: no shuffled copy of the whole buffer is made)."""
        if self._buffer_key != (epoch, group):
            groups, _ = self._epoch_plan(epoch)
            chunks = [self._checked_chunk(c) for c in groups[group]]
            rows = torch.cat(chunks, out=self._reused_storage(chunks))
            perm = torch.randperm(rows.shape[0], generator=keyed_generator(self.seed, epoch, group + 1))
            if rows.device.type == "cuda":  # rows made on the GPU: the order goes there without a wait
                perm = perm.pin_memory().to(rows.device, non_blocking=True)
            self._buffer_key, self._buffer = (epoch, group), (rows, perm)
        return self._buffer

    def _reused_storage(self, chunks: list[Tensor]) -> Tensor:
        """Where the next buffer's rows go: the previous buffer's memory when it is large enough.
        A fresh 64 MiB tensor on the CPU costs its page faults at every buffer (15 ms against 3 ms
        for writing into touched memory, 2 cores)."""
        n_rows, first = sum(c.shape[0] for c in chunks), chunks[0]
        numel = n_rows * self.row_width
        old = self._storage
        if old is None or old.numel() < numel or old.dtype != first.dtype or old.device != first.device:
            self._buffer = None  # the old buffer's memory is released before the new one is taken
            self._storage = old = torch.empty(numel, dtype=first.dtype, device=first.device)
        return old[:numel].view(n_rows, self.row_width)

    def _checked_chunk(self, index: int) -> Tensor:
        rows = self.source.load_chunk(index)
        expected = (self.sizes[index], self.row_width)
        if tuple(rows.shape) != expected:
            raise ValueError(f"data source {self.source!r}: chunk {index} has shape {tuple(rows.shape)}, expected {expected}")
        return rows

    def read(self, position: int, n: int, out: Optional[Tensor] = None) -> Tensor:
        """Rows [position, position + n) of the stream, as a float32 tensor [n, d_in] on the
        source's device (the CPU for files), written into `out` when given."""
        if position < 0 or n < 0:
            raise ValueError(f"read: expected position >= 0 and n >= 0, got {position}, {n}")
        with self._lock:
            return self._read(position, n, out)

    def _read(self, position: int, n: int, out: Optional[Tensor]) -> Tensor:
        # Each buffer's rows are gathered before the next buffer takes its memory.
        pieces, written = [], 0
        while n > 0:
            epoch, offset = divmod(position, self.rows_per_epoch)
            _, starts = self._epoch_plan(epoch)
            group = bisect.bisect_right(starts, offset) - 1
            rows, perm = self._load_buffer(epoch, group)
            start = offset - starts[group]
            take = min(n, rows.shape[0] - start)
            picks = perm[start : start + take]
            if out is not None:
                torch.index_select(rows, 0, picks, out=out[written : written + take])
            else:
                pieces.append(rows.index_select(0, picks))
            written += take
            position += take
            n -= take
        if out is not None:
            return out
        if not pieces:
            return torch.empty(0, self.row_width)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _ranges(rows: list[int], limit: int = 8) -> str:
    """'3, 7..9, 12' for sorted row numbers, at most `limit` ranges (then how many more rows)."""
    rows = sorted(set(rows))
    spans: list[list[int]] = []
    for row in rows:
        if spans and row == spans[-1][1] + 1:
            spans[-1][1] = row
        else:
            spans.append([row, row])
    shown = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in spans[:limit])
    rest = sum(b - a + 1 for a, b in spans[limit:])
    return shown + (f" and {rest} more" if rest else "")
