"""The input contract of fastsae's ops: one check function per op, shared by every backend.

`fastsae.ops` (the public entry points) and the raw `torch.ops.fastsae.*` ops (their real and
fake implementations) call these before any backend runs, once per call (`fastsae.ops.checking`),
so the torch reference, cpp, triton and cuda backends all refuse the same inputs with the same
`ValueError`, whose message names the argument, what was expected and what came.

The contract, for every op:
- tensors are `torch.Tensor`s (a numpy array or a list is refused, not converted);
- the leading float tensor (x, values, grad_pre, grad_out) is float16, bfloat16, float32 or
  float64, and every other float tensor has exactly its dtype (no silent promotion); indices are
  int64 (aux_latents: int64 latents or -1); threshold_encode's cutoff is in the accumulation type (float32, or
  float64 for float64 x);
- every tensor is on the leading tensor's device;
- shapes are exact (no broadcasting): [N, d_in], [d_sae, d_in], vectors of d_sae or d_in;
- any strides (non-contiguous, expanded) and any sizes the shapes allow (N = 0, d_in = 0);
- NaN and Inf are data, never refused (they flow through as in the dense formula);
- indices lie in [0, d_sae): checked on the data, hence only where tensors have data (not
  fake or meta tensors) and only when `check_range` is set (see `check_index_range`).
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _tensor(name: str, t, what: str) -> Tensor:
    """`t` as a tensor, or a ValueError saying what `name` should have been."""
    if not isinstance(t, Tensor):
        _fail(f"{name}: expected {what}, got {'None' if t is None else type(t).__name__}")
    return t


def _integer(name: str, v, low: int, high: int, bound: str) -> int:
    """A Python int (not a bool) in [low, high]."""
    if isinstance(v, bool) or not isinstance(v, int):
        what = bound if bound.startswith("an integer") else f"an integer {bound}"
        _fail(f"{name}: expected {what}, got {type(v).__name__} {v!r}")
    if not low <= v <= high:
        _fail(f"{name}: expected {bound}, got {v}")
    return v


def _leading(name: str, t, what: str) -> Tensor:
    """The tensor that sets the op's dtype and device: 2-D and floating."""
    t = _tensor(name, t, f"a 2-D floating-point tensor {what}")
    if t.ndim != 2:
        _fail(f"{name}: expected a 2-D tensor {what}, got shape {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        _fail(f"{name}: expected a floating-point dtype (float16, bfloat16, float32 or float64), got {t.dtype}")
    return t


def _same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        _fail(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")


def _like(name: str, t, shape: tuple, ref_name: str, ref: Tensor, dims: str) -> Tensor:
    """A float tensor of exactly `shape`, with `ref`'s dtype and device."""
    what = f"a tensor of shape {shape} ({dims})"
    t = _tensor(name, t, what)
    if _shape(t) != shape:
        kind = "a vector" if len(shape) == 1 else "a tensor"
        _fail(f"{name}: expected {kind} of shape {shape}, got shape {_shape(t)} ({dims})")
    if t.dtype != ref.dtype:
        _fail(f"{name}: expected dtype {ref.dtype}, got {t.dtype} (every floating argument takes {ref_name}'s dtype)")
    _same_device(name, t, ref_name, ref)
    return t


def _optional_like(name: str, t, shape: tuple, ref_name: str, ref: Tensor, dims: str) -> None:
    if t is not None:
        _like(name, t, shape, ref_name, ref, dims)


def _indices(name: str, t, shape: tuple, ref_name: str, ref: Tensor) -> Tensor:
    t = _tensor(name, t, f"an int64 tensor of shape {shape}")
    if _shape(t) != shape:
        _fail(f"{name}: expected shape {shape} (as {ref_name}), got {_shape(t)}")
    if t.dtype != torch.int64:
        _fail(f"{name}: expected dtype torch.int64, got {t.dtype}")
    _same_device(name, t, ref_name, ref)
    return t


def _has_data(t: Tensor) -> bool:
    """Whether `t`'s values can be read: not a meta tensor, not a fake tensor of a trace."""
    if t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def check_index_range(name: str, indices: Tensor, d_sae: int) -> None:
    """Every index in [0, d_sae), else a ValueError with the range that came.

    Reading the values costs a device-to-host sync on an accelerator, so callers pass
    `check_range=False` for indices that fastsae's own encoders produced (the SAE module's
    training step, the autograd backward of an op whose forward checked or produced them):
    that keeps the TopK training step free of host syncs. On CPU the check is a cheap pass and
    the default everywhere. It never runs on fake or meta tensors (no data: torch.compile's
    tracing and the meta device), so traced code holds no data-dependent branch; a compiled
    graph checks at run time, inside the op's real implementation.
    """
    if indices.numel() == 0 or not _has_data(indices):
        return
    lo, hi = torch.aminmax(indices.detach())
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= d_sae:
        _fail(f"{name}: expected latent indices in [0, {d_sae}) (d_sae={d_sae}), got values in [{lo}, {hi}]")


# ------------------------------------------------------------------ one function per op


def _x_and_encoder(x, enc_weight) -> tuple[Tensor, int, int]:
    """x [N, d_in] and enc_weight [d_sae, d_in], alike; returns (x, d_sae, d_in)."""
    x = _leading("x", x, "[N, d_in]")
    enc_weight = _tensor("enc_weight", enc_weight, "a 2-D tensor [d_sae, d_in]")
    if enc_weight.ndim != 2:
        _fail(f"enc_weight: expected a 2-D tensor [d_sae, d_in], got shape {_shape(enc_weight)}")
    d_sae, d_in = enc_weight.shape
    if x.shape[1] != d_in:
        _fail(f"x: expected last dimension d_in={d_in} (enc_weight's), got shape {_shape(x)}")
    _like("enc_weight", enc_weight, (d_sae, d_in), "x", x, "[d_sae, d_in]")
    return x, d_sae, d_in


def check_encoder_inputs(x, enc_weight, b_enc, b_dec, dec_norm) -> tuple[int, int]:
    """What both encoders take; returns (d_sae, d_in)."""
    x, d_sae, d_in = _x_and_encoder(x, enc_weight)
    if d_sae >= 2**31:
        _fail(f"enc_weight: expected fewer than 2^31 latents, got d_sae={d_sae}")
    _like("b_enc", b_enc, (d_sae,), "x", x, f"d_sae={d_sae}")
    _optional_like("b_dec", b_dec, (d_in,), "x", x, f"d_in={d_in}")
    _optional_like("dec_norm", dec_norm, (d_sae,), "x", x, f"d_sae={d_sae}")
    return d_sae, d_in


def check_topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, check_range: bool = True) -> None:
    d_sae, _ = check_encoder_inputs(x, enc_weight, b_enc, b_dec, dec_norm)
    _integer("k", k, 1, d_sae, f"1 <= k <= d_sae={d_sae}")
    _integer("k_aux", k_aux, 0, d_sae, f"0 <= k_aux <= d_sae={d_sae}")
    if aux_latents is not None:
        check_aux_latents(aux_latents, d_sae, x, check_range)


def check_aux_latents(aux_latents, d_sae: int, ref: Tensor, check_range: bool) -> Tensor:
    """AuxK's list of latents: int64 [C] with C <= d_sae, on ref's device, each in [0, d_sae) or -1
    (an empty entry; the range is read only with `check_range`, as for indices)."""
    aux_latents = _tensor("aux_latents", aux_latents, f"an int64 vector of at most d_sae={d_sae} latents")
    if aux_latents.ndim != 1 or aux_latents.shape[0] > d_sae:
        _fail(f"aux_latents: expected a vector of at most d_sae={d_sae} latents, got shape {_shape(aux_latents)}")
    if aux_latents.dtype != torch.int64:
        _fail(f"aux_latents: expected dtype torch.int64, got {aux_latents.dtype}")
    _same_device("aux_latents", aux_latents, "x", ref)
    if check_range and aux_latents.numel() and _has_data(aux_latents):
        lo, hi = torch.aminmax(aux_latents.detach())
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= d_sae:
            _fail(f"aux_latents: expected latents in [0, {d_sae}) or -1 (empty), got values in [{lo}, {hi}]")
    return aux_latents


def check_threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width, any_float_cutoff: bool = False) -> None:
    """The raw op's contract: cutoff in the accumulation type. With `any_float_cutoff`,
    `fastsae.ops.threshold_encode`'s: any floating cutoff on x's device (which it then converts)."""
    d_sae, _ = check_encoder_inputs(x, enc_weight, b_enc, b_dec, dec_norm)
    if any_float_cutoff:
        if not isinstance(cutoff, Tensor):
            _fail(f"cutoff: expected a tensor of shape ({d_sae},), got {type(cutoff).__name__}")
        if not cutoff.is_floating_point():
            _fail(f"cutoff: expected a floating-point tensor, got {cutoff.dtype}")
    cutoff = _tensor("cutoff", cutoff, f"a tensor of shape ({d_sae},)")
    if _shape(cutoff) != (d_sae,):
        _fail(f"cutoff: expected a vector of shape ({d_sae},), got shape {_shape(cutoff)} (d_sae={d_sae})")
    acc = accumulation_dtype(x.dtype)
    if cutoff.dtype != acc and not (any_float_cutoff and cutoff.device == x.device):
        _fail(f"cutoff: expected dtype {acc} (the accumulation type of {x.dtype} inputs), got {cutoff.dtype}")
    _same_device("cutoff", cutoff, "x", x)
    _integer("max_width", max_width, 0, d_sae, f"an integer 0 <= max_width <= d_sae={d_sae}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64: the type the kernels compare and accumulate in."""
    return torch.promote_types(dtype, torch.float32)


def check_topk_encode_backward(grad_pre, indices, x, enc_weight, b_dec, check_range: bool = True) -> None:
    x, d_sae, d_in = _x_and_encoder(x, enc_weight)
    grad_pre = _tensor("grad_pre", grad_pre, "a 2-D tensor [N, m]")
    if grad_pre.ndim != 2 or grad_pre.shape[0] != x.shape[0]:
        _fail(f"grad_pre: expected a 2-D tensor [N, m] with N={x.shape[0]} rows (as x), got shape {_shape(grad_pre)}")
    _like("grad_pre", grad_pre, _shape(grad_pre), "x", x, "[N, m]")
    _indices("indices", indices, _shape(grad_pre), "grad_pre", grad_pre)
    _optional_like("b_dec", b_dec, (d_in,), "x", x, f"d_in={d_in}")
    if check_range:
        check_index_range("indices", indices, d_sae)


def check_sparse_decode(values, indices, W_dec, b_dec, dec_norm, check_range: bool = True) -> None:
    values = _leading("values", values, "[N, m]")
    _indices("indices", indices, _shape(values), "values", values)
    W_dec = _tensor("W_dec", W_dec, "a 2-D tensor [d_sae, d_in]")
    if W_dec.ndim != 2:
        _fail(f"W_dec: expected a 2-D tensor [d_sae, d_in], got shape {_shape(W_dec)}")
    d_sae, d_in = W_dec.shape
    _like("W_dec", W_dec, (d_sae, d_in), "values", values, "[d_sae, d_in]")
    _optional_like("b_dec", b_dec, (d_in,), "values", values, f"d_in={d_in}")
    _optional_like("dec_norm", dec_norm, (d_sae,), "values", values, f"d_sae={d_sae}")
    if check_range:
        check_index_range("indices", indices, d_sae)


def check_sparse_decode_with_aux(values, indices, W_dec, b_dec, dec_norm, aux_pre, aux_latents, check_range: bool = True) -> None:
    check_sparse_decode(values, indices, W_dec, b_dec, dec_norm, check_range)
    latents = check_aux_latents(aux_latents, W_dec.shape[0], values, check_range)
    shape = (values.shape[0], latents.shape[0])
    _like("aux_pre", aux_pre, shape, "values", values, f"[N, C] with N={shape[0]} (as values), C={shape[1]} (as aux_latents)")


def check_sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm, check_range: bool = True) -> None:
    check_sparse_decode(values, indices, W_dec, None, dec_norm, check_range)
    n, d_in = values.shape[0], W_dec.shape[1]
    _like("grad_out", grad_out, (n, d_in), "values", values, "[N, d_in]")
