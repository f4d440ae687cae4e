"""Evaluation metrics of an SAE, as SAELens' `evals.py` defines them, accumulated in float64 over
streamed chunks (memory bounded by one chunk; the result does not depend on the chunk size).

Activation metrics (`ActivationMetrics`, over the tokens' activations x and reconstructions x_hat):
- explained_variance = 1 - (sum_t ||x_t - x_hat_t||^2) / (sum_t ||x_t - mean(x)||^2): mean-centred,
  a ratio of sums over all tokens (SAELens' `ExplainedVarianceCalculator`); fvu = 1 - explained_variance.
- mse = mean over tokens of ||x - x_hat||^2 (summed over dimensions, as SAELens' `mse`).
- cosine_similarity = mean over tokens of cos(x, x_hat) (0 where either is the zero vector;
  SAELens gives NaN there).
- l2_ratio = mean over tokens of ||x_hat|| / ||x|| (||x|| < 1e-4 counted as 1, as SAELens).
- relative_reconstruction_bias = (sum_t ||x_hat_t||^2) / (sum_t <x_t, x_hat_t>) (Bricken/Rajamanoharan
  eq. 10): a ratio of sums over all tokens. SAELens takes this ratio per batch and averages the
  ratios, so the two agree when SAELens sees the tokens as one batch.
- l0, l1 = mean over tokens of the number of nonzero latents and of the sum of |latent|.
- density of a latent = fraction of tokens on which it is nonzero; dead_fraction = fraction of
  latents of density 0; dense_fraction = fraction of density > `dense_threshold` (0.1);
  density_histogram: counts of the live latents' log10 density in bins.

Downstream metrics (`DownstreamMetrics`), the reconstruction spliced into the model at its hook at
the window's real tokens (not the special tokens added around it):
- causal LM: ce_loss_without_sae, ce_loss_with_sae, ce_loss_with_ablation (zero),
  ce_loss_with_mean_ablation (the hook's mean activation over the evaluated tokens), means over
  the predicted positions; ce_loss_score = (ce_abl - ce_sae) / (ce_abl - ce_clean) (SAELens'
  name for "CE loss recovered"), ce_loss_score_mean_ablation likewise; kl_div_with_sae,
  kl_div_with_ablation, kl_div_with_mean_ablation = mean over positions of KL(clean || spliced);
  kl_div_score = (kl_abl - kl_sae) / kl_abl.
- encoder (no LM head, e.g. MiniLM): on the final hidden states h at the real tokens,
  hidden_mse_with_sae / _with_ablation / _with_mean_ablation = mean over tokens of ||h' - h||^2 and
  hidden_score = 1 - hidden_mse_with_sae / hidden_mse_with_ablation (1: the SAE changes nothing
  downstream, 0: as bad as zeroing the hook), hidden_score_mean_ablation likewise;
  hidden_cosine_with_sae = mean over tokens of cos(h_sae, h).

Transcoders (`cfg.d_out` set; paired sources, whose rows are an input and its target side by side):
the activation metrics compare the transcoder's output sae(x) (its skip term included) with the
target y instead of x_hat with x (explained variance, FVU, MSE, cosine, L2 ratio, relative
reconstruction bias and the mean all over y); L0, L1 and the densities come from the latents of x.
Downstream, the model runs once per variant: the output of `hook_out`'s module is replaced at the
window's real tokens by sae(the output of `hook`'s module, from the same forward pass), by zeros or
by y's mean, and scored as above (the MLP replaced by the transcoder, as circuit-tracer does).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

ACTIVATION_KEYS = ("explained_variance", "fvu", "mse", "cosine_similarity", "l2_ratio", "relative_reconstruction_bias",
                   "l0", "l1", "dead_fraction", "dense_fraction")
DENSE_THRESHOLD = 0.1
HISTOGRAM_EDGES = tuple(float(e) for e in range(-8, 1))  # log10 density bins [-8, -7), ..., [-1, 0]


class ActivationMetrics:
    """Streaming sums for the activation metrics. `add(x, x_hat, values, indices)` per batch
    (`values`/`indices`: the sparse latents, or `values` dense [n, d_sae] with indices None); for a
    transcoder x is the target and x_hat its prediction, `d_in` their width (d_out)."""

    def __init__(self, d_in: int, d_sae: int, dense_threshold: float = DENSE_THRESHOLD):
        self.d_in, self.d_sae, self.dense_threshold = d_in, d_sae, dense_threshold
        self.n = 0
        # Sums of x - shift (the first batch's mean): the variance E||x - shift||^2 - ||E[x - shift]||^2
        # then cancels no large mean component (activations often have one).
        self.shift: Optional[Tensor] = None
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sums = dict.fromkeys(("sq_norm", "sq_resid", "cos", "l2_ratio", "xhat_sq", "x_dot_xhat", "l0", "l1"), 0.0)
        self.counts = torch.zeros(d_sae, dtype=torch.int64)

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, values: Tensor, indices: Optional[Tensor] = None) -> None:
        if x.shape != x_hat.shape or x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x, x_hat: expected two [rows, {self.d_in}] tensors, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        x, x_hat = x.detach().double().cpu(), x_hat.detach().double().cpu()
        values = values.detach().double().cpu()
        s = self.sums
        norm_x, norm_xh = x.norm(dim=1), x_hat.norm(dim=1)
        dot = (x * x_hat).sum(1)
        if self.shift is None:
            self.shift = x.mean(0)
        xs = x - self.shift
        self.n += x.shape[0]
        self.sum_x += xs.sum(0)
        s["sq_norm"] += xs.pow(2).sum().item()
        s["sq_resid"] += (x - x_hat).pow(2).sum().item()
        denom = norm_x * norm_xh
        s["cos"] += torch.where(denom > 0, dot / denom.clamp_min(1e-300), 0.0).sum().item()
        s["l2_ratio"] += (norm_xh / torch.where(norm_x.abs() < 1e-4, 1.0, norm_x)).sum().item()
        s["xhat_sq"] += norm_xh.pow(2).sum().item()
        s["x_dot_xhat"] += dot.sum().item()
        on = values != 0
        s["l0"] += on.sum().item()
        s["l1"] += values.abs().sum().item()
        if indices is None:
            self.counts += on.sum(0)
        else:
            self.counts.scatter_add_(0, indices.detach().cpu().reshape(-1), on.reshape(-1).long())

    @property
    def mean(self) -> Tensor:
        """The mean activation (float64 [d_in]) of the tokens added so far."""
        if self.shift is None:
            return torch.zeros(self.d_in, dtype=torch.float64)
        return self.shift + self.sum_x / max(1, self.n)

    @property
    def density(self) -> Tensor:
        return self.counts.double() / max(1, self.n)

    def compute(self) -> dict:
        if self.n == 0:
            raise ValueError("no tokens to evaluate (expected at least one row of activations)")
        s, n = self.sums, self.n
        mse = s["sq_resid"] / n
        variance = s["sq_norm"] / n - (self.sum_x / n).pow(2).sum().item()
        if variance < 1e-10:
            ev = 1.0 if mse < 1e-10 else 0.0
        else:
            ev = 1.0 - mse / variance
        density = self.density
        alive = density[density > 0]
        hist = torch.histc(alive.log10().clamp(HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1]), bins=len(HISTOGRAM_EDGES) - 1,
                           min=HISTOGRAM_EDGES[0], max=HISTOGRAM_EDGES[-1]) if alive.numel() else torch.zeros(len(HISTOGRAM_EDGES) - 1)
        return {
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "mse": mse,
            "cosine_similarity": s["cos"] / n,
            "l2_ratio": s["l2_ratio"] / n,
            "relative_reconstruction_bias": s["xhat_sq"] / s["x_dot_xhat"] if s["x_dot_xhat"] != 0 else math.nan,
            "l0": s["l0"] / n,
            "l1": s["l1"] / n,
            "dead_fraction": (density == 0).double().mean().item(),
            "dense_fraction": (density > self.dense_threshold).double().mean().item(),
            "dense_threshold": self.dense_threshold,
            "density_histogram": {"log10_density_edges": list(HISTOGRAM_EDGES), "counts": [int(c) for c in hist.tolist()],
                                  "dead": int((density == 0).sum())},
            "n_tokens": n,
        }


@torch.no_grad()
def reconstruct(sae, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(output, values, indices) of `sae` on rows x [n, d_in] through the sparse path: the
    reconstruction, or a transcoder's prediction of its target (its skip term included, as sae(x))."""
    x = x.to(device=sae.device, dtype=sae.dtype)
    sparse = sae.encode_sparse(x)
    out = sae.decode(sparse)
    if sae.W_skip is not None:
        out = torch.addmm(out, x, sae.W_skip.t())
    return out, sparse.values, sparse.indices


def is_paired(sae) -> bool:
    """Whether `sae` is measured against targets (a transcoder, d_out set) rather than its input."""
    return sae.cfg.d_out is not None


def split_rows(source, rows: Tensor) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of a chunk's rows: a paired source's rows are both side by side; a plain
    source's rows are their own targets."""
    if getattr(source, "d_out", None) is None:
        return rows, rows
    return rows[:, : source.d_in], rows[:, source.d_in :]


def check_source(sae, source, what: str) -> None:
    """A ValueError naming what is wrong when `source`'s rows do not fit `sae`."""
    if source.d_in != sae.d_in:
        raise ValueError(f"{what}: expected activations of width d_in={sae.d_in} (the SAE's), got width {source.d_in}")
    d_out = getattr(source, "d_out", None)
    if is_paired(sae) and d_out is None:
        raise ValueError(f"{what}: a transcoder (d_out={sae.d_out}) is measured against targets; expected paired "
                         "activations (files holding `inputs` and `targets`, or a model read at --hook and --hook-out), "
                         "got its inputs only")
    if not is_paired(sae) and d_out is not None:
        raise ValueError(f"{what}: pairs inputs with targets of width {d_out}, a transcoder's data; this SAE "
                         "(d_out unset) reconstructs its input: pass its inputs alone")
    if d_out is not None and d_out != sae.d_out:
        raise ValueError(f"{what}: expected targets of width d_out={sae.d_out} (the transcoder's), got width {d_out}")


@torch.no_grad()
def activation_metrics(sae, source, max_tokens: Optional[int] = None, batch_rows: int = 4096,
                       dense_threshold: float = DENSE_THRESHOLD, first_chunk: int = 0) -> ActivationMetrics:
    """Stream up to `max_tokens` rows of `source` (`d_in`, `chunk_sizes`, `load_chunk`), from chunk
    `first_chunk` on, through the SAE in batches of `batch_rows`; returns the filled accumulator
    (`.compute()` for the dict)."""
    check_source(sae, source, repr(source))
    acc = ActivationMetrics(sae.d_out, sae.d_sae, dense_threshold)  # over the targets (a plain SAE's: its inputs)
    for index in range(first_chunk, len(source.chunk_sizes)):
        left = None if max_tokens is None else max_tokens - acc.n
        if left is not None and left <= 0:
            break
        rows = source.load_chunk(index)
        if left is not None:
            rows = rows[:left]
        for part in rows.split(batch_rows):
            inputs, targets = split_rows(source, part)
            output, values, indices = reconstruct(sae, inputs)
            acc.add(targets, output, values, indices)
    return acc


# ------------------------------------------------------------------------------ downstream


def is_causal_lm(model_path) -> bool:
    """Whether the Hugging Face model folder holds a causal LM (an LM head to score tokens with)."""
    import json
    from pathlib import Path

    config = json.loads((Path(model_path) / "config.json").read_text())
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


class DownstreamMetrics:
    """Streaming sums of the downstream metrics (see the module's docstring)."""

    VARIANTS = ("sae", "ablation", "mean_ablation")

    def __init__(self, causal: bool):
        self.causal = causal
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def _add(self, key: str, per_item: Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + per_item.double().sum().item()
        self.counts[key] = self.counts.get(key, 0) + per_item.numel()

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else math.nan

    @torch.no_grad()
    def add_causal(self, clean: Tensor, spliced, input_ids: Tensor, positions: Tensor, has_next: Tensor):
        """clean: logits [b, s, vocab]; spliced: (variant, logits) pairs, taken one at a time (so one
        spliced batch of logits is alive at once); positions: bool [b, s], the tokens scored (KL);
        has_next: bool [b, s], whether position i's prediction of token i + 1 is scored (CE)."""
        targets = torch.zeros_like(input_ids)
        targets[:, :-1] = input_ids[:, 1:]
        targets = targets[positions]
        ce_mask = has_next[positions]
        logp_clean = clean[positions].double().log_softmax(-1)  # [P, vocab]: the scored positions only

        def ce(logp: Tensor) -> Tensor:
            return -logp.gather(-1, targets[:, None]).squeeze(-1)[ce_mask]

        self._add("ce_loss_without_sae", ce(logp_clean))
        p_clean = logp_clean.exp()
        for variant, logits in spliced:
            logp = logits[positions].double().log_softmax(-1)
            self._add(f"ce_loss_with_{variant}", ce(logp))
            self._add(f"kl_div_with_{variant}", (p_clean * (logp_clean - logp)).sum(-1))
            del logits, logp

    @torch.no_grad()
    def add_encoder(self, clean: Tensor, spliced, positions: Tensor):
        """clean: final hidden states [b, s, d]; spliced: (variant, hidden states) pairs; positions: bool [b, s]."""
        h = clean[positions].double()
        for variant, out in spliced:
            h2 = out[positions].double()
            self._add(f"hidden_mse_with_{variant}", (h2 - h).pow(2).sum(-1))
            if variant == "sae":
                denom = h.norm(dim=-1) * h2.norm(dim=-1)
                self._add("hidden_cosine_with_sae", torch.where(denom > 0, (h * h2).sum(-1) / denom.clamp_min(1e-300), 0.0))

    def compute(self) -> dict:
        out = {key: self.mean(key) for key in sorted(self.sums)}

        def score(bad: float, ours: float, good: float) -> float:
            return (bad - ours) / (bad - good) if bad != good else math.nan

        if self.causal:
            clean = out["ce_loss_without_sae"]
            out["ce_loss_score"] = score(out["ce_loss_with_ablation"], out["ce_loss_with_sae"], clean)
            out["ce_loss_score_mean_ablation"] = score(out["ce_loss_with_mean_ablation"], out["ce_loss_with_sae"], clean)
            out["kl_div_score"] = score(out["kl_div_with_ablation"], out["kl_div_with_sae"], 0.0)
            out["kl_div_score_mean_ablation"] = score(out["kl_div_with_mean_ablation"], out["kl_div_with_sae"], 0.0)
            out["n_predictions"] = self.counts["ce_loss_without_sae"]
        else:
            out["hidden_score"] = score(out["hidden_mse_with_ablation"], out["hidden_mse_with_sae"], 0.0)
            out["hidden_score_mean_ablation"] = score(out["hidden_mse_with_mean_ablation"], out["hidden_mse_with_sae"], 0.0)
            out["n_tokens_downstream"] = self.counts["hidden_mse_with_sae"]
        return out


@torch.no_grad()
def downstream_metrics(sae, source, mean: Tensor, max_tokens: Optional[int] = None, batch_windows: int = 8,
                       model=None, first_window: int = 0) -> dict:
    """Run `source`'s model (a `TransformerActivations`) over its windows, up to `max_tokens` real
    tokens, clean and with the hook's output replaced at the real tokens by the SAE's
    reconstruction, by zeros and by `mean` [d_out] (a transcoder: `source.hook_out`'s output
    replaced by its prediction from `source.hook`'s output in the same pass). A causal LM (config
    architectures ending in ForCausalLM / LMHeadModel) is scored by CE loss and KL; any other
    model by its final hidden states. `model`: the causal LM to use (default: loaded from the
    source's folder). Windows from `first_window` on."""
    check_source(sae, source, repr(source))
    causal = model is not None or is_causal_lm(source.model_path)
    if causal and model is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(source.model_path)).to(source.device).eval()
    if not causal:
        model = source.model
    base = model.base_model if causal else model
    paired = is_paired(sae)
    hook_out = source.hook_out if paired else source.hook  # the module whose output is replaced

    def module_at(name: str):
        try:
            return base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"hook: {source.model_path} has no module {name!r} in {type(base).__name__}") from None

    reads, module = module_at(source.hook), module_at(hook_out)
    acc = DownstreamMetrics(causal)
    state: dict = {"mode": None, "keep": None, "inputs": None}

    def capture(_module, _inputs, output):  # a transcoder's input, from the pass it splices into
        if state["mode"] == "sae":
            acts = output[0] if isinstance(output, (tuple, list)) else output
            state["inputs"] = acts[state["keep"].to(acts.device)]

    def splice(_module, _inputs, output):
        mode = state["mode"]
        if mode is None:
            return None
        acts = output[0] if isinstance(output, (tuple, list)) else output
        keep = state["keep"].to(acts.device)
        x = acts[keep]
        if mode == "sae":
            if paired:
                x, state["inputs"] = state["inputs"], None
                if x is None:
                    raise ValueError(f"hook_out {hook_out!r}: its module ran before the hook {source.hook!r} in "
                                     "the forward pass (a transcoder reads its input upstream of its output)")
            new = sae(x.to(device=sae.device, dtype=sae.dtype))
        elif mode == "ablation":
            new = torch.zeros_like(x)
        else:
            new = mean.to(x.device, x.dtype).expand_as(x)
        acts = acts.clone()
        acts[keep] = new.to(device=acts.device, dtype=acts.dtype)
        if isinstance(output, tuple):
            return (acts, *output[1:])
        if isinstance(output, list):
            return [acts, *output[1:]]
        return acts

    handles = [reads.register_forward_hook(capture)] if paired else []
    handles.append(module.register_forward_hook(splice))
    seen = 0
    try:
        for first in range(first_window, source.n_windows, batch_windows):
            if max_tokens is not None and seen >= max_tokens:
                break
            input_ids, attention, keep = source.window_inputs(first, min(source.n_windows, first + batch_windows))
            if max_tokens is not None:  # the budget's last window may be cut short: drop the tokens beyond it
                over = keep.flatten().cumsum(0).reshape(keep.shape) > max_tokens - seen
                keep = keep & ~over
            seen += int(keep.sum())
            kwargs = {"input_ids": input_ids.to(source.device), "attention_mask": attention.to(source.device)}

            def run(mode):
                state["mode"], state["keep"] = mode, keep
                out = model(**kwargs)
                return out.logits if causal else out.last_hidden_state

            clean = run(None)
            spliced = ((variant, run(variant)) for variant in DownstreamMetrics.VARIANTS)  # run lazily, one at a time
            if causal:
                # Predictions from a real token of the next token in the sequence (special end token included).
                nxt = torch.zeros_like(keep)
                nxt[:, :-1] = attention[:, 1:].bool()
                acc.add_causal(clean, spliced, input_ids.to(clean.device), keep.to(clean.device), nxt.to(clean.device))
            else:
                acc.add_encoder(clean, spliced, keep.to(clean.device))
    finally:
        for handle in handles:
            handle.remove()
        state["mode"] = state["inputs"] = None
    if seen == 0:
        raise ValueError("downstream: no tokens to evaluate")
    return acc.compute()


def evaluate(sae, source, max_tokens: Optional[int] = None, downstream: bool = True, batch_rows: int = 4096,
             batch_windows: int = 8, dense_threshold: float = DENSE_THRESHOLD, first_chunk: int = 0) -> dict:
    """The activation metrics of `sae` on `source` (from chunk `first_chunk` on), and with
    `downstream` (and a source with a model, a `TransformerActivations`) the downstream ones on the
    same tokens, in one dict."""
    acc = activation_metrics(sae, source, max_tokens, batch_rows, dense_threshold, first_chunk)
    result = acc.compute()
    if is_paired(sae):
        result["transcoder"] = True  # the metrics compare its output with the targets
    if downstream and hasattr(source, "window_inputs"):
        result.update(downstream_metrics(sae, source, acc.mean, max_tokens, batch_windows,
                                         first_window=first_chunk * source.seqs_per_chunk))
    return result


def tail_chunk(source, tokens: int) -> int:
    """The first chunk of the shortest run of last chunks of `source` that holds `tokens` rows."""
    sizes, total = source.chunk_sizes, 0
    for index in range(len(sizes) - 1, -1, -1):
        total += sizes[index]
        if total >= tokens:
            return index
    return 0


def format_metrics(m: dict) -> str:
    """A few lines for a terminal."""
    lines = ["a transcoder: its output against the targets (not its input)"] if m.get("transcoder") else []
    lines += [
        f"explained variance {m['explained_variance']:.4f}  fvu {m['fvu']:.4f}  mse {m['mse']:.4g}  "
        f"cosine {m['cosine_similarity']:.4f}  l2 ratio {m['l2_ratio']:.4f}  "
        f"rel. reconstruction bias {m['relative_reconstruction_bias']:.4f}",
        f"l0 {m['l0']:.2f}  l1 {m['l1']:.4g}  dead {m['dead_fraction']:.2%}  "
        f"dense (> {m['dense_threshold']:g}) {m['dense_fraction']:.2%}  on {m['n_tokens']:,} tokens",
    ]
    if "ce_loss_score" in m:
        lines.append(
            f"CE loss clean {m['ce_loss_without_sae']:.4f}  with SAE {m['ce_loss_with_sae']:.4f}  zero-ablated "
            f"{m['ce_loss_with_ablation']:.4f}  mean-ablated {m['ce_loss_with_mean_ablation']:.4f}; recovered "
            f"{m['ce_loss_score']:.4f} (vs zero), {m['ce_loss_score_mean_ablation']:.4f} (vs mean)")
        lines.append(f"KL(clean || with SAE) {m['kl_div_with_sae']:.4g}  (zero-ablated {m['kl_div_with_ablation']:.4g}, "
                     f"score {m['kl_div_score']:.4f})")
    if "hidden_score" in m:
        lines.append(
            f"final hidden states: recovered {m['hidden_score']:.4f} (vs zero), {m['hidden_score_mean_ablation']:.4f} "
            f"(vs mean); cosine to clean {m['hidden_cosine_with_sae']:.4f}")
    hist = m["density_histogram"]
    bins = "  ".join(f"[1e{int(a)},1e{int(b)}):{c}" for a, b, c in zip(hist["log10_density_edges"], hist["log10_density_edges"][1:], hist["counts"]))
    lines.append(f"latent density histogram: dead:{hist['dead']}  {bins}")
    return "\n".join(lines)
