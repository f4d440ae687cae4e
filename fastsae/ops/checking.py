"""One check per op call (`fastsae.validation`), whichever way the op is called.

The public wrappers (`fastsae.ops.topk_encode`, ...) check first, because their contract is
wider than what reaches an op through the dispatcher: a numpy array or a float `k` is refused
with a ValueError naming it, where the dispatcher would raise a TypeError. They then call the
raw op through `call_checked`, inside which the op's implementations (real and fake) skip their
own check. A direct call of `torch.ops.fastsae.*` (a user, a compiled graph) is outside it, so
there the op checks.
"""

from __future__ import annotations

import contextvars
from typing import Callable

import torch

_checked = contextvars.ContextVar("fastsae_ops_checked", default=False)


def call_checked(op: Callable, *args):
    """op(*args) for arguments the caller has just checked, the op's own check skipped.

    While torch.compile traces, the op is called plainly: the compiled graph runs it later
    without this wrapper around it, so the op checks then, on real tensors (index ranges too)."""
    if torch.compiler.is_compiling():
        return op(*args)
    token = _checked.set(True)
    try:
        return op(*args)
    finally:
        _checked.reset(token)


def wrapper_reads_ranges(check_indices: bool) -> bool:
    """Whether a public wrapper reads its index ranges itself: when asked to, in eager mode.
    A traced call leaves them to the compiled graph's op (fake tensors hold no data)."""
    return check_indices and not torch.compiler.is_compiling()


def op_checks() -> bool:
    """Whether an op's implementation runs its check: always, except inside `call_checked`."""
    return not _checked.get()
