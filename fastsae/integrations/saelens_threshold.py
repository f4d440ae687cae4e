"""SAELens' ReLU ("standard") and JumpReLU SAEs on fastsae's row-wise sparse encoder.

Patched: `StandardSAE`, `JumpReLUSAE` (encode, forward), `StandardTrainingSAE`,
`JumpReLUTrainingSAE` (encode, forward, training_forward_pass) and the transcoders built on them,
`Transcoder`, `SkipTranscoder`, `JumpReLUTranscoder`, `JumpReLUSkipTranscoder` (encode, forward,
forward_with_activations; d_out may differ from d_in, W_skip added as SAELens adds it). The encoder is `ops.threshold_encode`
(each row's pre-activations above a per-latent cutoff) and the decoder `ops.sparse_decode`; the
losses are SAELens' own definitions evaluated on those entries, which is exact because every entry
left out contributes zero to the value and to every gradient:

- ReLU: entries with pre > 0. L1 (`lp_norm`) of the activations weighted by ||W_dec,i||.
- JumpReLU, inference class: relu(pre) * 1[pre > threshold], so entries with pre > max(threshold, 0).
- JumpReLU, training class: pre * 1[pre > threshold] with SAELens' straight-through estimators
  (bandwidth, `jumprelu_ste_to_input`). The threshold's pseudo-gradient reads every entry with
  |pre - threshold| < bandwidth / 2, so training takes the entries above threshold - bandwidth / 2
  (minus a margin; the extra entries carry zeros). The "step", "quadratic" and "tanh" sparsity
  losses are sums over those entries; Anthropic's pre-activation loss reads the dead latents' whole
  columns, which come from one small product over those columns.

A call takes SAELens' own (dense) code when the sparse form would not pay, by the rule and the
state fastsae's `SAE` uses (`fastsae.sparse_path.SparsePath`, one per SAELens instance): a row
with more entries than the default width limit (d_sae / 8 on the CPU; 0, so always dense, on GPUs,
where the dense step measured faster). After a row overflows, the next calls go dense for a
doubling number of calls (up to 64) before trying again.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from fastsae import ops
from fastsae.integrations._saelens_common import _fast_ok, _feature_acts, _hidden_pre, sparse_path_of, with_error_term
from fastsae.sparse import pad_at_free_latents

_IN_SAELENS_ATTR = "_fastsae_in_saelens_code"  # set while SAELens' own method runs


def _saelens_code(original: Callable, sae, *args):
    """SAELens' own method, with the patched methods it calls (its forward calls encode) running
    SAELens' code too: one decision per call, and the back-off counts calls, not inner encodes."""
    if sae.__dict__.get(_IN_SAELENS_ATTR):
        return original(sae, *args)
    sae.__dict__[_IN_SAELENS_ATTR] = True
    try:
        return original(sae, *args)
    finally:
        del sae.__dict__[_IN_SAELENS_ATTR]


def _may_try(sae, x) -> bool:
    return not sae.__dict__.get(_IN_SAELENS_ATTR) and _fast_ok(sae, x, PATCHES)


def _jumprelu(sae) -> bool:
    return hasattr(sae, "threshold")


def _is_training_class(sae) -> bool:
    return hasattr(sae, "calculate_aux_loss")


def _threshold(sae, dtype: torch.dtype) -> torch.Tensor:
    return sae.threshold.to(dtype)


def _cutoff(sae, training_pass: bool) -> torch.Tensor:
    """Pre-activations strictly above this enter the sparse form."""
    if not _jumprelu(sae):
        return torch.zeros(sae.cfg.d_sae, dtype=sae.dtype, device=sae.W_enc.device)
    threshold = _threshold(sae, sae.dtype).detach()
    if training_pass and sae.threshold.requires_grad and torch.is_grad_enabled():
        # rectangle((pre - t) / bw) is nonzero for pre > t - bw / 2; the margin keeps entries that
        # rounding could bring in (extra entries carry zeros).
        bandwidth = sae.cfg.jumprelu_bandwidth
        return threshold - (bandwidth / 2 + bandwidth / 16)
    if _is_training_class(sae):
        return threshold  # its JumpReLU is pre * 1[pre > t], negative t included
    return threshold.clamp_min(0)  # relu(pre) * 1[pre > t]


def _sparse_pre(sae, x: torch.Tensor, training_pass: bool):
    """(x2 [N, d_in], pre [N, m] with -inf padding, indices [N, m]) or None for SAELens' dense path."""
    x2 = x.to(sae.dtype).reshape(-1, sae.cfg.d_in)
    path = sparse_path_of(sae)
    limit = min(path.limit(sae.cfg.d_sae, x2.device), sae.cfg.d_sae)
    if limit <= 0:
        return None
    if not path.hint:
        # SAELens' dense code never shows us its rows, so a "look" is simply trying again
        if not path.wants_a_look():
            return None
        path.hint = True
    b_dec_in = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    cutoff = _cutoff(sae, training_pass)
    pre, indices, counts = ops.threshold_encode(x2, sae.W_enc.t(), sae.b_enc, b_dec_in, None, cutoff, limit)
    if pre.shape[1] == limit and int(counts.max()) > limit:
        path.overflowed()
        return None
    path.fitted()
    real = pre != float("-inf")
    return x2, real, pre, pad_at_free_latents(real, indices, sae.cfg.d_sae)


class _SparseJumpReLU(torch.autograd.Function):
    """SAELens' JumpReLU on sparse entries, threshold gathered per entry: pre * 1[pre > t];
    d/dpre = 1[pre > t] (+ the estimator with ste_to_input), d/dt = -(t / bw) rect((pre - t) / bw)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth, ste_to_input):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return pre * (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        ste = (threshold / bandwidth) * _rectangle((pre - threshold) / bandwidth) * grad
        grad_pre = (pre > threshold) * grad
        if ctx.ste_to_input:
            grad_pre = grad_pre + ste
        return grad_pre, -ste, None, None


class _SparseStep(torch.autograd.Function):
    """SAELens' Step on sparse entries: 1[pre > t]; d/dt = -(1 / bw) rect((pre - t) / bw), and the
    opposite to pre with ste_to_input."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth, ste_to_input):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        ste = (1.0 / ctx.bandwidth) * _rectangle((pre - threshold) / ctx.bandwidth) * grad
        return (ste if ctx.ste_to_input else None), -ste, None, None


def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x)


def _acts(sae, real: torch.Tensor, pre: torch.Tensor, indices: torch.Tensor, training_pass: bool) -> torch.Tensor:
    """The activations at the sparse entries (0 at padding)."""
    pre = torch.where(real, pre, pre.new_zeros(()))  # padding is -inf: no inf * 0
    if not _jumprelu(sae):
        return pre.relu()
    threshold = _threshold(sae, pre.dtype)[indices]
    if _is_training_class(sae):
        ste_to_input = bool(getattr(sae.cfg, "jumprelu_ste_to_input", False))
        # times `real`: no estimator gradient reaches a padding slot's latent
        return _SparseJumpReLU.apply(pre, threshold, sae.cfg.jumprelu_bandwidth, ste_to_input) * real
    return pre.relu() * (pre > threshold).to(pre)


def _decode(sae, values: torch.Tensor, indices: torch.Tensor, lead: tuple) -> torch.Tensor:
    out = ops.sparse_decode(values, indices, sae.W_dec, sae.b_dec, None, check_indices=False)
    return out.reshape(*lead, out.shape[-1])


def _patched_encode(original: Callable) -> Callable:
    @functools.wraps(original)
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sparse = _sparse_pre(self, x, False) if _may_try(self, x) else None
        if sparse is None:
            return _saelens_code(original, self, x)
        _, real, pre, indices = sparse
        return _feature_acts(self, _acts(self, real, pre, indices, False), indices, tuple(x.shape[:-1]))

    encode.__fastsae_original__ = original
    return encode


def _patched_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sparse = _sparse_pre(self, x, False) if _may_try(self, x) else None
        if sparse is None:
            return _saelens_code(original, self, x)
        _, real, pre, indices = sparse
        return with_error_term(self, x, _decode(self, _acts(self, real, pre, indices, False), indices, tuple(x.shape[:-1])))

    forward.__fastsae_original__ = original
    return forward


def _l1_loss(sae, step_input, values: torch.Tensor, indices: torch.Tensor) -> dict:
    weighted = values * sae.W_dec.norm(dim=1)[indices]
    sparsity = weighted.norm(p=sae.cfg.lp_norm, dim=-1)
    return {"l1_loss": (step_input.coefficients["l1"] * sparsity).mean()}


def _jumprelu_losses(sae, step_input, x2, real, pre, values, indices) -> dict:
    cfg = sae.cfg
    threshold = _threshold(sae, pre.dtype)
    w_dec_norm = sae.W_dec.norm(dim=1)
    mode = cfg.jumprelu_sparsity_loss_mode
    if mode in ("step", "quadratic"):
        pre_entries = torch.where(real, pre, pre.new_zeros(()))
        # padding sits at 0 > -inf; its threshold is its own latent's, and 1[0 > t] with t >= 0
        # (the clamp of the training pass) is 0, so the count sees real entries only.
        steps = _SparseStep.apply(pre_entries, threshold[indices], cfg.jumprelu_bandwidth, bool(cfg.jumprelu_ste_to_input))
        l0 = (steps * real).sum(dim=-1)
        per_item = 2 / cfg.target_l0 * (l0 - cfg.target_l0) ** 2 if mode == "quadratic" else l0
    elif mode == "tanh":
        per_item = torch.tanh(cfg.jumprelu_tanh_scale * values * w_dec_norm[indices]).sum(dim=-1)
    else:
        raise ValueError(f"Invalid sparsity loss mode: {mode}")
    losses = {"l0_loss": (step_input.coefficients["l0"] * per_item).mean()}
    if cfg.pre_act_loss_coefficient is not None:
        losses["pre_act_loss"] = _pre_act_loss(sae, step_input.dead_neuron_mask, x2, threshold, w_dec_norm)
    return losses


def _pre_act_loss(sae, mask: Optional[torch.Tensor], x2, threshold, w_dec_norm) -> torch.Tensor:
    """Anthropic's pre-activation loss over the dead latents' columns only (SAELens' definition
    multiplies every other column by 0)."""
    if mask is None or not mask.any():
        return x2.new_tensor(0.0)
    dead = mask.nonzero().squeeze(1)
    x_in = x2 - sae.b_dec * sae.cfg.apply_b_dec_to_input
    pre = x_in @ sae.W_enc[:, dead] + sae.b_enc[dead]
    per_item = ((threshold[dead] - pre).relu() * mask[dead].to(pre) * w_dec_norm[dead]).sum(dim=-1)
    return sae.cfg.pre_act_loss_coefficient * per_item.mean()


def _patched_training_forward_pass(original: Callable) -> Callable:
    @functools.wraps(original)
    def training_forward_pass(self, step_input):
        from sae_lens.saes.sae import TrainStepOutput

        sae_in = step_input.sae_in
        if not _may_try(self, sae_in):
            return _saelens_code(original, self, step_input)
        if _jumprelu(self):
            with torch.no_grad():  # SAELens' projection, before its forward pass
                self.threshold.data.clamp_(min=0.0)
        sparse = _sparse_pre(self, sae_in, True)
        if sparse is None:
            return _saelens_code(original, self, step_input)
        x2, real, pre, indices = sparse
        values = _acts(self, real, pre, indices, True)
        lead = tuple(sae_in.shape[:-1])
        sae_out = _decode(self, values, indices, lead)
        mse_loss = self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        if _jumprelu(self):
            aux = _jumprelu_losses(self, step_input, x2, real, pre, values, indices)
        else:
            aux = _l1_loss(self, step_input, values, indices)
        loss = mse_loss
        for value in aux.values():
            loss = loss + value
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=_feature_acts(self, values, indices, lead),
            hidden_pre=_hidden_pre(self, sae_in, None),
            loss=loss,
            losses={"mse_loss": mse_loss, **aux},
        )

    training_forward_pass.__fastsae_original__ = original
    return training_forward_pass


def _transcoder_out(sae, x: torch.Tensor):
    """SAELens' transcoder forward: (decode(encode(x)) [+ x W_skip^T], activations), or None."""
    sparse = _sparse_pre(sae, x, False) if _may_try(sae, x) and x.dtype == sae.dtype else None
    if sparse is None:
        return None
    _, real, pre, indices = sparse
    values = _acts(sae, real, pre, indices, False)
    lead = tuple(x.shape[:-1])
    sae_out = sae.hook_sae_recons(_decode(sae, values, indices, lead))
    if hasattr(sae, "W_skip"):
        sae_out = sae_out + x @ sae.W_skip.T
    return sae_out, (values, indices, lead)


def _patched_transcoder_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _transcoder_out(self, x)
        return _saelens_code(original, self, x) if out is None else out[0]

    forward.__fastsae_original__ = original
    return forward


def _patched_transcoder_forward_with_activations(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward_with_activations(self, x: torch.Tensor):
        out = _transcoder_out(self, x)
        if out is None:
            return _saelens_code(original, self, x)
        sae_out, (values, indices, lead) = out
        return sae_out, _feature_acts(self, values, indices, lead)

    forward_with_activations.__fastsae_original__ = original
    return forward_with_activations


def _family_check(sae) -> bool:
    return sae.cfg.d_sae > 0


_INFERENCE = {"encode": _patched_encode, "forward": _patched_forward}
_TRAINING = {**_INFERENCE, "training_forward_pass": _patched_training_forward_pass}
_TRANSCODER = {
    "encode": _patched_encode,
    "forward": _patched_transcoder_forward,
    "forward_with_activations": _patched_transcoder_forward_with_activations,
}
PATCHES = {
    "StandardSAE": _INFERENCE,
    "JumpReLUSAE": _INFERENCE,
    "StandardTrainingSAE": _TRAINING,
    "JumpReLUTrainingSAE": _TRAINING,
    "Transcoder": _TRANSCODER,
    "SkipTranscoder": _TRANSCODER,
    "JumpReLUTranscoder": _TRANSCODER,
    "JumpReLUSkipTranscoder": _TRANSCODER,
}
FAMILY_CHECKS = {name: _family_check for name in PATCHES}
