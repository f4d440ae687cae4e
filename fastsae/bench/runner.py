"""`fastsae bench`: encode, decode and train_step for every available backend, against the
pure-torch baselines, measured in the same run on the same inputs.

What each op times:
- encode:     a TopK SAE's sae.encode_sparse(x) under torch.no_grad (baselines: their encode)
- decode:     sae.decode(SparseActivations) (torch-dense decodes the dense [N, d_sae] matrix)
- train_step: the steps training runs (`STEP_CASES`): TopK with AuxK at 0%, 1% and 10% dead
              latents (a dead mask passed every step, as `fastsae train` does once latents can be
              dead), BatchTopK with AuxK at 1%, ReLU with its L1 penalty and JumpReLU with its
              L0 penalty (their dead latents are resampled between steps, or left: no mask),
              and TopK as a skip transcoder with AuxK at 1% (d_out = d_in, trained on a second
              random input as its target; its rows say "transcoder": true, "skip": true).
              ReLU and JumpReLU SAEs are set so that rows hold about k active latents, as a
              trained one does (their bias or threshold at each latent's 1 - k/d_sae quantile).
              Each row names its `architecture` and `dead_fraction`; the baselines and peers run
              the same architecture with the same mask and coefficient.
              Each step: zero_grad, training_forward, backward, Adam step (each contender has its own copy
              of the same initial parameters and its own Adam: fastsae's backends the Adam that
              `fastsae train` runs, `optim.make_adam`: torch's fused Adam on CUDA, on the CPU
              fastsae.training.optim.Adam, torch's update without its parameter-sized
              temporaries; the baselines and peers torch.optim.Adam, as SAELens runs it).
              With graph=True (CUDA), also "<backend>+graph": the same step captured once as a
              CUDA graph and replayed (`fastsae.training.graph.CapturedStep`).
Peers (`fastsae.bench.peers`): SAELens' own training SAEs and sparsify's kernels, when importable,
each also with fastsae's patch of that library in force (`saelens+fastsae`, `sparsify+fastsae`)
(on CUDA by default; `peers=[...]` asks for them anywhere).

Floors (how close to physics each time is): bare operations timed round by round alongside the
contenders, so load on a shared machine hits them alike, each counted by its fastest round (the
contenders by their median), and each also bounded by the same work at the peak rates measured
at the start:
- encode:     the encoder's matrix product: a bare product of its shape (the `matmul_ms`
              column), or its FLOPs at the peak matmul rate
- decode:     the bytes a sparse decode must move (each used decoder row read once, values and
              indices read, output written): a contiguous copy of that many bytes, or the bytes
              at the peak copy bandwidth
- train_step: the encoder product + a bare Adam step on the SAE's parameters, the faster of
              torch's and fastsae's (+ on GPU the bytes of the gradients the sparse passes write,
              at the measured bandwidth)
A median still below its floor is flagged (`floor_is_estimate`, a `*` in the table): the floor
was no bound there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from fastsae.bench import harness, timing
from fastsae.bench.baselines import BASELINE_ARCHITECTURES, BASELINES, BENCH_MATH, make_baseline
from fastsae.bench.harness import write_json  # noqa: F401  (fastsae.bench's API)
from fastsae.bench.peers import PEER_ARCHITECTURES, PEERS, available_peers, make_peer
from fastsae.ops import dispatch, use_backend
from fastsae.sae import SAE
from fastsae.sparse import SparseActivations
from fastsae.training.optim import Adam, make_adam

OPS = ("encode", "decode", "train_step")


@dataclass(frozen=True)
class Shape:
    n: int
    d_in: int
    d_sae: int
    k: int

    def __str__(self) -> str:
        return f"N{self.n}-d{self.d_in}-s{self.d_sae}-k{self.k}"


@dataclass(frozen=True)
class StepCase:
    """A training step to time: the architecture and, for AuxK (topk, batchtopk), the fraction of
    latents marked dead (None: no dead mask); a transcoder (d_out = d_in, so the shapes stay the
    bench's; apply_b_dec_to_input off, as SAELens' and sparsify's) trains on a target, with a skip
    connection W_skip if `skip`."""

    architecture: str
    dead_fraction: Optional[float] = None
    transcoder: bool = False
    skip: bool = False

    def __str__(self) -> str:
        dead = "" if self.dead_fraction is None else f", {self.dead_fraction:.0%} dead"
        kind = (", skip transcoder" if self.skip else ", transcoder") if self.transcoder else ""
        return f"{self.architecture}{kind}{dead}"


# TopK at 0%, 1% and 10% dead, BatchTopK at 1%, ReLU, JumpReLU (`baselines.BENCH_MATH`).
SAE_CASES = tuple(StepCase(name, dead) for name, math in BENCH_MATH.items() for dead in math.dead_fractions)
# The TopK SAE without a dead mask: what encode and decode time.
ENCODE_CASE = StepCase(next(name for name, math in BENCH_MATH.items() if math.encode_case))
# The headline architecture as a skip transcoder, AuxK at 1% dead. No peer computes it (SAELens'
# SkipTranscoder is a ReLU inference class; sparsify's skip coder is not wired as a peer here).
TRANSCODER_CASES = (StepCase(ENCODE_CASE.architecture, 0.01, transcoder=True, skip=True),)
STEP_CASES = SAE_CASES + TRANSCODER_CASES
SPARSITY_COEFFICIENT = 1.0  # the penalty's coefficient (ReLU's L1, JumpReLU's L0), the same for every contender
CPU_SHAPES = [Shape(2048, 768, 16384, 32)]
CPU_QUICK = [Shape(1024, 256, 4096, 16)]
GPU_SHAPES = [
    Shape(4096, 768, 24576, 32),
    Shape(16384, 768, 24576, 32),
    Shape(4096, 4096, 131072, 64),
    Shape(16384, 4096, 131072, 64),
    Shape(8192, 1024, 131072, 32),  # sparsify's own test shape
]
# No dense library fits this on one GPU (its dense pre-activations alone are 128 GiB in bf16):
# fastsae's backends only (`run_bench(..., shapes=[HUGE_SHAPE])`).
HUGE_SHAPE = Shape(65536, 4096, 1 << 20, 64)
DENSE_MAX_ELEMENTS = 1 << 34  # N * d_sae above this (32 GiB of bf16 pre-activations): no dense contenders
GPU_QUICK = [Shape(4096, 768, 24576, 32)]


class _Rotating:
    """Cycles through several input sets so repeated calls do not find them in cache."""

    def __init__(self, items: list):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def bench_sae(shape: Shape, case: StepCase, device: torch.device, dtype: torch.dtype):
    """The SAE a case times: fastsae's initialisation with small random biases; ReLU and JumpReLU
    with each latent's bias (ReLU) or threshold (JumpReLU) at its 1 - k/d_sae quantile on inputs
    like the bench's, so rows hold about k active latents, as in a trained SAE."""
    torch.manual_seed(0)
    math = BENCH_MATH[case.architecture]
    transcoder = dict(d_out=shape.d_in, apply_b_dec_to_input=False, skip_connection=case.skip) if case.transcoder else {}
    sae = SAE(
        d_in=shape.d_in, d_sae=shape.d_sae, architecture=case.architecture, k=shape.k if math.takes_k else None,
        dtype=str(dtype).removeprefix("torch."), device=str(device), **transcoder,
    )
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.01)
        sae.b_dec.normal_(0, 0.01)
        if sae.W_skip is not None:
            sae.W_skip.normal_(0, 0.01)  # a skip connection that has trained a little (it starts at 0)
        if math.calibrate is not None:
            sample = torch.randn(min(shape.n, 4096), shape.d_in, device=device, dtype=torch.float32)
            pre = (sample - sae.b_dec.float()) @ sae.W_enc.float() + sae.b_enc.float()
            math.calibrate(sae, torch.quantile(pre, 1 - min(1.0, shape.k / shape.d_sae), dim=0), dtype)
    return sae


def dead_mask_for(case: StepCase, d_sae: int, device: torch.device) -> Optional[torch.Tensor]:
    """The case's dead latents, a fixed random set (None without AuxK)."""
    if case.dead_fraction is None:
        return None
    generator = torch.Generator().manual_seed(1)
    mask = torch.zeros(d_sae, dtype=torch.bool)
    mask[torch.randperm(d_sae, generator=generator)[: round(case.dead_fraction * d_sae)]] = True
    return mask.to(device)


def _contenders(
    op: str, shape: Shape, device: torch.device, dtype: torch.dtype, backends: list[str], n_inputs: int,
    baselines: tuple[str, ...] = BASELINES, peers: tuple[str, ...] = (), graph: bool = False,
    case: StepCase = ENCODE_CASE,
):
    """{name: fn} for one op, shape and (train_step) case; fns take no arguments and run one call."""
    sae = bench_sae(shape, case, device, dtype)
    baselines = tuple(b for b in baselines if case.architecture in BASELINE_ARCHITECTURES[b])
    peers = tuple(p for p in peers if case.architecture in PEER_ARCHITECTURES[p] and not case.transcoder)
    xs = _Rotating([torch.randn(shape.n, shape.d_in, device=device, dtype=dtype) for _ in range(n_inputs)])
    # A transcoder's target for each input: a second random input of the same shape.
    targets = [torch.randn_like(x) for x in xs.items] if case.transcoder else None

    def batch() -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = xs.next()
        return x, None if targets is None else targets[xs.i]
    fns: dict[str, Callable[[], object]] = {}

    if op == "encode":
        for b in backends:
            def run(b=b):
                with use_backend(b), torch.no_grad():
                    return sae.encode_sparse(xs.next())
            fns[b] = run
        for name in baselines:
            base = make_baseline(name, sae)
            fns[name] = lambda base=base: _no_grad(base.encode, xs.next())
        for name in peers:
            peer = make_peer(name, sae)
            fns[name] = lambda peer=peer: _no_grad(peer.encode, xs.next())
    elif op == "decode":
        # The torch reference forms the dense pre-activations whole: shapes too large for that
        # (no baselines) take the default backend's bounded-memory encoder.
        with torch.no_grad(), use_backend("torch" if baselines else "auto"):
            sparse = [sae.encode_sparse(x) for x in xs.items]
            dense = [s.to_dense() for s in sparse] if "torch-dense" in baselines else []
        sp, de = _Rotating(sparse), _Rotating(dense)
        for b in backends:
            def run(b=b):
                with use_backend(b), torch.no_grad():
                    return sae.decode(sp.next())
            fns[b] = run
        for name in baselines:
            base = make_baseline(name, sae)
            if name == "torch-dense":
                fns[name] = lambda base=base: _no_grad(base.decode, de.next())
            else:
                fns[name] = lambda base=base: _no_grad(base.decode, _pair(sp.next()))
    elif op == "train_step":
        mask = dead_mask_for(case, shape.d_sae, device)
        coefficient = sparsity_coefficient(case)
        for b in backends:
            model = copy.deepcopy(sae)
            opt = make_adam(model.parameters(), lr=1e-4, device=device)

            def run(b=b, model=model, opt=opt):
                x, y = batch()
                with use_backend(b):
                    harness.train_step(model, opt, x, target=y, sparsity_coefficient=coefficient, dead_mask=mask)
            fns[b] = run
            # (a captured step reads no target)
            if graph and device.type == "cuda" and BENCH_MATH[case.architecture].capturable and not case.transcoder:
                fns[f"{b}+graph"] = _captured_step(b, sae, xs, device, mask)
        for name in list(baselines) + list(peers):
            base = make_baseline(name, sae) if name in BASELINES else make_peer(name, sae, coefficient)
            opt = torch.optim.Adam(base.parameters(), lr=1e-4)

            def run(base=base, opt=opt):
                x, y = batch()
                opt.zero_grad(set_to_none=True)
                (base.loss(x, mask, coefficient) if y is None else base.loss(x, mask, coefficient, y)).backward()
                opt.step()
            fns[name] = run
    else:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")

    return {name: harness.synced(fn, device) for name, fn in fns.items()}, sae


def _captured_step(backend: str, sae, xs, device: torch.device, mask: Optional[torch.Tensor]):
    """The train_step of `backend` captured as one CUDA graph (captured at the first call, which the
    timing's warm-up absorbs); each call copies the next input (and the dead mask, whose count
    sets AuxK's capacity) into the graph's buffers and replays."""
    from fastsae.training.graph import CapturedStep

    model = copy.deepcopy(sae)
    opt = make_adam(model.parameters(), lr=1e-4, device=device, capturable=True)
    holder = {}
    capacity = int(mask.sum()) if mask is not None else None

    def run():
        with use_backend(backend):
            if "step" not in holder:
                holder["step"] = CapturedStep(
                    model, opt, xs.items[0].shape[0], auxk=mask is not None, aux_capacity=capacity
                )
            return holder["step"].run(xs.next(), mask)
    return run


def sparsity_coefficient(case: StepCase) -> float:
    """The penalty coefficient a case's step runs with (0 for architectures without one)."""
    return SPARSITY_COEFFICIENT if BENCH_MATH[case.architecture].penalty is not None else 0.0


def _no_grad(fn, arg):
    with torch.no_grad():
        return fn(arg)


def _pair(sparse: SparseActivations):
    return sparse.values, sparse.indices


FLOOR_PREFIX = "floor:"


def _floor_parts(op: str, shape: Shape, sae, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """The bare operations a floor is built from, timed round by round alongside the contenders
    (so machine load hits them alike) and counted by their fastest round:
    floor:matmul a product of the encoder's shape; decode: floor:copy, a contiguous copy moving
    the bytes a sparse decode must move; train_step: one bare Adam step each for torch's Adam and
    fastsae's (the faster one counts)."""
    es = torch.empty((), dtype=dtype).element_size()
    # A shape whose product does not fit is timed on a chunk of rows and scaled.
    x = torch.randn(_matmul_rows(shape), shape.d_in, device=device, dtype=dtype)
    w = sae.W_enc.detach().contiguous()
    parts: dict[str, Callable[[], object]] = {FLOOR_PREFIX + "matmul": lambda: x @ w}
    if op == "decode":
        src = torch.empty(max(1, _decode_bytes(shape, es) // (2 * es)), device=device, dtype=dtype)
        dst = torch.empty_like(src)
        parts[FLOOR_PREFIX + "copy"] = lambda: dst.copy_(src)
    elif op == "train_step":
        params = [p.detach().clone().requires_grad_() for p in sae.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        makers = [("adam-torch", torch.optim.Adam), ("adam-fastsae", Adam)]
        if device.type == "cuda":
            makers.append(("adam-fused", lambda ps, lr: make_adam(ps, lr=lr, device=device)))
        for name, make in makers:
            opt = make(params, lr=1e-4)
            opt.step()  # allocate the state outside the timing
            parts[FLOOR_PREFIX + name] = opt.step
    return parts


def _matmul_rows(shape: Shape) -> int:
    # A shape whose product does not fit is timed on a chunk of rows and scaled.
    return min(shape.n, max(1, DENSE_MAX_ELEMENTS // 4 // shape.d_sae))


def _decode_bytes(shape: Shape, es: int) -> int:
    """Each used decoder row read once, values and int64 indices read, the output written."""
    used_rows = min(shape.n * shape.k, shape.d_sae)
    return used_rows * shape.d_in * es + shape.n * shape.k * (es + 8) + shape.n * shape.d_in * es


def _floor_ms(op: str, shape: Shape, dtype: torch.dtype, ceilings: dict, part_ms: dict[str, float],
              device: torch.device) -> tuple[float, float]:
    """(floor_ms, matmul_ms) from the parts' fastest rounds (`part_ms`); each part is also
    bounded by the same work at the peak rates measured at the start, whichever is lower, so a
    slow library path for this shape cannot make the floor lenient."""
    es = torch.empty((), dtype=dtype).element_size()
    bare_ms = part_ms[FLOOR_PREFIX + "matmul"] * shape.n / _matmul_rows(shape)
    at_peak_ms = 2 * shape.n * shape.d_in * shape.d_sae / (ceilings["matmul_tflops"] * 1e12) * 1e3
    matmul_ms = min(bare_ms, at_peak_ms)
    bw = ceilings["copy_gbps"] * 1e9
    if op == "encode":
        return matmul_ms, bare_ms
    if op == "decode":
        return min(part_ms[FLOOR_PREFIX + "copy"], _decode_bytes(shape, es) / bw * 1e3), bare_ms
    # train_step: encoder product + the fastest bare Adam step
    floor = matmul_ms + min(ms for name, ms in part_ms.items() if name.startswith(FLOOR_PREFIX + "adam"))
    if device.type == "cuda":
        # the dense gradients of W_enc and W_dec written once each
        floor += 2 * shape.d_sae * shape.d_in * es / bw * 1e3
    return floor, bare_ms


def run_bench(
    device: str = "cpu",
    quick: bool = False,
    ops: tuple[str, ...] = OPS,
    shapes: Optional[list[Shape]] = None,
    backends: Optional[list[str]] = None,
    reps: Optional[int] = None,
    log: Callable[[str], None] = print,
    peers: Optional[list[str]] = None,
    graph: bool = False,
    cases: tuple[StepCase, ...] = STEP_CASES,
) -> dict:
    """Measure and return {"meta": ..., "rows": [...]}: encode and decode of a TopK SAE, and
    train_step for each of `cases`. Shapes whose dense pre-activations exceed DENSE_MAX_ELEMENTS
    run fastsae's backends only (no baselines, no peers)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch sees no CUDA device")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if shapes is None:
        shapes = (GPU_QUICK if quick else GPU_SHAPES) if dev.type == "cuda" else (CPU_QUICK if quick else CPU_SHAPES)
    if backends is None:
        backends = dispatch.available_backends(dev.type)
        if dev.type == "cpu":
            backends = [b for b in backends if b != "triton"]  # the interpreter is not a CPU backend
    if peers is None:
        peers = available_peers(dev.type) if dev.type == "cuda" else []
    for name in peers:
        if name not in PEERS:
            raise ValueError(f"peers: expected names among {PEERS}, got {name!r}")
    if graph and dev.type != "cuda":
        raise ValueError(f"graph: CUDA-graph capture needs device cuda, got {device}")
    reps = reps or (20 if dev.type == "cuda" else (3 if quick else 5))
    n_inputs = 4 if dev.type == "cuda" else 2
    ceilings = timing.measure_ceilings(dev, dtype, reps=3)
    meta = {
        **harness.machine_info(dev, dtype),
        "ceilings": ceilings,
        "backends": backends,
        "peers": list(peers),
        "graph": graph,
        "quick": quick,
    }
    log(f"fastsae bench on {meta['device']} ({meta['dtype']}): backends {backends}, "
        f"ceilings {ceilings['matmul_tflops']:.2f} TFLOP/s matmul, {ceilings['copy_gbps']:.1f} GB/s copy")
    rows = []
    for shape in shapes:
        for op in ops:
            for case in cases if op == "train_step" else (ENCODE_CASE,):
                dense_fits = shape.n * shape.d_sae <= DENSE_MAX_ELEMENTS
                fns, sae = _contenders(
                    op, shape, dev, dtype, backends, n_inputs,
                    baselines=BASELINES if dense_fits else (), peers=tuple(peers) if dense_fits else (), graph=graph,
                    case=case,
                )
                parts = _floor_parts(op, shape, sae, dev, dtype)
                warm = 2 if op == "train_step" else 1
                times = harness.time_alternating({**fns, **parts}, dev, reps=reps, warmup=warm)
                mems = {name: timing.peak_memory_bytes(fn, dev) for name, fn in fns.items()}
                floor, matmul_ms = _floor_ms(op, shape, dtype, ceilings, {n: times[n].min_ms for n in parts}, dev)
                contender_times = {n: t for n, t in times.items() if n not in parts}
                new_rows = _rows(op, shape, meta, contender_times, mems, floor, matmul_ms, case)
                rows.extend(new_rows)
                log(format_table(new_rows, title=f"{op} {shape}" + (f" {case}" if op == "train_step" else "")))
                del fns, sae, parts
    return {"meta": meta, "rows": rows}


def _rows(op, shape, meta, times, mems, floor, matmul_ms, case: StepCase = ENCODE_CASE) -> list[dict]:
    """One row per (contender, baseline) pair other than a baseline against itself; a contender
    with no other baseline to compare with (a shape too large for them, or the only baseline of
    an architecture) gets one row, baseline None."""
    out = []
    present = [bl for bl in BASELINES if bl in times]
    for name in times:
        t = times[name]
        row = {
            "op": op,
            "shape": str(shape),
            "architecture": case.architecture,
            "dead_fraction": case.dead_fraction,
            **({"transcoder": True, "skip": case.skip} if case.transcoder else {}),
            "n": shape.n, "d_in": shape.d_in, "d_sae": shape.d_sae, "k": shape.k,
            "dtype": meta["dtype"],
            "device": meta["device"],
            "backend": name,
            "is_baseline": name in BASELINES,
            "ms": t.median_ms,
            "ms_min": t.min_ms,
            "ms_max": t.max_ms,
            "samples": t.samples,
            "noise": t.noise,
            "tokens_per_s": shape.n / (t.median_ms * 1e-3),
            "peak_mem_bytes": mems[name],
            "floor_ms": floor,
            "matmul_ms": matmul_ms,  # a bare product of the encoder's shape, same dtype (fastest round)
            "of_floor": t.median_ms / floor if floor else None,
            # Below the floor, the floor was no bound here (e.g. a rate the parts did not reach):
            # it is then only an estimate, and the table says so.
            "floor_is_estimate": bool(floor) and t.median_ms < floor,
        }
        if op in ("encode", "train_step"):
            row["tflops"] = 2 * shape.n * shape.d_in * shape.d_sae / (t.median_ms * 1e-3) / 1e12
        if not [bl for bl in present if bl != name]:  # nothing to compare with: the row alone
            out.append({**row, "baseline": None, "baseline_ms": None, "speedup": None, "baseline_peak_mem_bytes": None})
        for bl in present:
            if bl != name:
                out.append({
                    **row,
                    "baseline": bl,
                    "baseline_ms": times[bl].median_ms,
                    "speedup": times[bl].median_ms / t.median_ms,
                    "baseline_peak_mem_bytes": mems[bl],
                })
    return out


def _mb(v: Optional[int]) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def format_table(rows: list[dict], title: str = "") -> str:
    """One line per contender: median (min-max), tokens/s, peak MiB, speed-ups, x floor."""
    by_name: dict[str, dict] = {}
    for r in rows:
        d = by_name.setdefault(r["backend"], {"row": r})
        d[r["baseline"]] = r["speedup"]
    lines = [title] if title else []
    lines.append(f"  {'contender':<13}{'ms (min-max)':>26}{'tokens/s':>12}{'peak MiB':>10}"
                 f"{'vs dense':>10}{'vs sparse':>11}{'x floor':>9}")
    beaten = False
    for name, d in by_name.items():
        r = d["row"]
        spread = f"{r['ms']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f})"
        vs_dense = d.get("torch-dense", 1.0 if name == "torch-dense" else None)
        vs_sparse = d.get("torch-sparse", 1.0 if name == "torch-sparse" else None)
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        mark = "*" if r.get("floor_is_estimate") else " "
        beaten = beaten or mark == "*"
        lines.append(
            f"  {name:<13}{spread:>26}{r['tokens_per_s']:>12,.0f}{_mb(r['peak_mem_bytes']):>10}"
            f"{fmt(vs_dense):>10}{fmt(vs_sparse):>11}{r['of_floor']:>8.2f}x{mark}"
        )
    if beaten:
        lines.append("  * below the floor (fastest rounds of its parts, timed alongside): "
                     "the floor is only an estimate here")
    return "\n".join(lines)


def default_results_path(result: dict) -> Path:
    return harness.results_path(result["meta"], suffix="-quick" if result["meta"].get("quick") else "")
