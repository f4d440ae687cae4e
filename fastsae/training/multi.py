"""Several SAEs from one forward pass of the model: a data stream shared by several trainers.

`TransformerActivations` with several hooks runs the model once per chunk and captures every hook.
`SharedChunks` keeps each chunk's captures until every hook's stream has taken its part, and
`HookView` is one hook's activation source over them (a source of one hook to the trainer:
`describe()` names that hook, so each run folder is an ordinary run). Trainers on the same hook (a
sweep of k or d_sae) share one `ShuffledStream`, so their rows are read and shuffled once.
`MultiTrainer` drives today's `Trainer`s, one `advance` each in turn, the one furthest behind first,
so the streams stay together and a chunk is computed once for all of them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Optional

from torch import Tensor

from fastsae.training.data import ShuffledStream
from fastsae.training.trainer import Trainer
from fastsae.training.transformer import TransformerActivations


class SharedChunks:
    """Every hook's rows of a chunk from one forward pass, kept until each hook has taken them (or,
    when some hook lags far behind, until `max_chunks` newer chunks have been computed)."""

    def __init__(self, source: TransformerActivations, max_chunks: int = 64):
        self.source = source
        self.max_chunks = max_chunks
        self.forward_passes = 0  # chunks loaded, computed or from the cache (one dropped and taken again counts again)
        self._chunks: OrderedDict[int, tuple[dict[str, Tensor], set[str]]] = OrderedDict()
        self._lock = threading.Lock()  # each stream's read-ahead thread asks for chunks

    def take(self, index: int, hook: str) -> Tensor:
        with self._lock:
            if index not in self._chunks:
                rows = self.source.load_chunks_of_all(index)
                self.forward_passes += 1
                self._chunks[index] = (dict(zip(self.source.hooks, rows)), set())
                while len(self._chunks) > self.max_chunks:
                    self._chunks.popitem(last=False)
            rows, taken = self._chunks[index]
            taken.add(hook)
            if len(taken) == len(rows):
                del self._chunks[index]
            return rows[hook]


class HookView:
    """The activations at one hook of a several-hook source, as a source of its own (everything
    but the hook, the width and the chunks is the shared source's: tokenizer, model, tokens)."""

    def __init__(self, chunks: SharedChunks, hook: str):
        self._chunks, self.hook = chunks, hook
        self._source = chunks.source
        self.d_in = self._source.widths[hook]
        self.d_out = None

    @property
    def chunk_sizes(self) -> list[int]:
        return self._source.chunk_sizes

    def load_chunk(self, index: int) -> Tensor:
        return self._chunks.take(index, self.hook)

    def describe(self) -> dict:
        # The cache root is the shared source's: each hook's chunks sit in that hook's own folder in it.
        return {**self._source.describe(), "hook": self.hook}

    def __getattr__(self, name):
        if name.startswith("_"):  # not delegated (and no recursion before __init__ ran, e.g. in copies)
            raise AttributeError(name)
        return getattr(self._source, name)

    def __repr__(self) -> str:
        return (f"TransformerActivations({self._source.model_spec} at {self.hook!r}, one pass shared by "
                f"{len(self._source.hooks)} hooks, {len(self._source.token_ids):,} tokens, width {self.d_in})")


def hook_views(source: TransformerActivations, buffer_rows: int) -> dict[str, HookView]:
    """One view per hook of `source`, over chunks kept long enough for every hook's stream to take them."""
    # A stream loads a buffer of about `buffer_rows` rows at once; keep a few buffers' worth.
    per_buffer = -(-buffer_rows // max(1, min(source.chunk_sizes))) + 1
    chunks = SharedChunks(source, max_chunks=3 * per_buffer)
    return {hook: HookView(chunks, hook) for hook in source.hooks}


def share_streams(trainers: list[Trainer]) -> None:
    """Trainers reading the same source with the same seed and buffer read one stream (one buffer)."""
    streams: dict[tuple, ShuffledStream] = {}
    for trainer in trainers:
        key = (id(trainer.data), trainer.cfg.seed, trainer.cfg.shuffle_buffer_rows)
        trainer.stream = streams.setdefault(key, trainer.stream)


class MultiTrainer:
    """Train several `Trainer`s together: each takes its own steps (its step, checks, metrics and
    checkpoints in its own run folder); the driver only chooses whose step comes next.

    Each trainer's tokens_per_s and elapsed_s count only the time in its own `advance` calls: its
    steps, checks and waits for data (the model's forward runs in the streams' read-ahead threads, so
    a trainer waits for it only when the read-ahead falls behind). `wall_s` is the whole session's
    (initialisation included), for the run's overall throughput with `tokens_before`.

    Under a process group the trainers are either all data parallel (the same trainers on every
    rank: their collectives come in this driver's order, which depends only on their steps, and the
    ranks agree on those) or all `local` (each rank its own SAEs; no collective at all)."""

    def __init__(self, trainers: dict[str, Trainer]):
        if not trainers:
            raise ValueError("MultiTrainer: expected at least one trainer")
        self.trainers = trainers
        self.wall_s = 0.0
        self.tokens_before = {name: trainer.tokens_seen for name, trainer in trainers.items()}
        share_streams(list(trainers.values()))

    def train(self, max_steps: Optional[int] = None) -> dict[str, dict]:
        """Train every SAE to its total (or `max_steps` more steps each); each one's `train()` result."""
        started = time.perf_counter()
        try:
            return self._train(max_steps)
        finally:
            self.wall_s += time.perf_counter() - started

    def _train(self, max_steps: Optional[int]) -> dict[str, dict]:
        running = list(self.trainers.values())
        begun = []
        try:
            for trainer in running:
                trainer.begin(max_steps)
                begun.append(trainer)
            while running:
                # The one furthest behind goes first: resumed trainers at different steps meet up,
                # after which they take turns and read each chunk while the others still hold it.
                behind = min(trainer.step for trainer in running)
                for trainer in [t for t in running if t.step == behind]:
                    if not trainer.advance():
                        running.remove(trainer)
        finally:
            for trainer in begun:
                trainer.close()
        return {name: trainer.finish() for name, trainer in self.trainers.items()}
