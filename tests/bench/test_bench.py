"""The benchmark harness: rows carry what they claim, and the baselines compute what fastsae does."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_rel_close

import fastsae
from fastsae.bench import baselines, peers, runner
from fastsae.cli import main

REQUIRED = {"op", "shape", "dtype", "device", "backend", "baseline", "ms", "baseline_ms", "speedup", "peak_mem_bytes"}


BASELINE_CASES = [
    (name, case) for case in runner.STEP_CASES for name in baselines.baselines_for(case.architecture)
]


def _case_sae(case, d_in=48, d_sae=333, k=7, n=29):
    """A small SAE set up as the bench sets up its SAEs, and a batch for it."""
    sae = runner.bench_sae(runner.Shape(n, d_in, d_sae, k), case, torch.device("cpu"), torch.float32)
    return sae, torch.randn(n, d_in), runner.dead_mask_for(case, d_sae, torch.device("cpu"))


def _assert_same_step(sae, other, x, mask, coefficient, params, target=None):
    """`other`'s loss (the contender's whole loss) and gradients equal fastsae's training step's."""
    out = sae.training_forward(x, target=target, sparsity_coefficient=coefficient, dead_mask=mask)
    loss = other.loss(x, mask, coefficient) if target is None else other.loss(x, mask, coefficient, target)
    assert_rel_close(loss.detach(), out.loss.detach().double(), 1e-5, "loss")
    out.loss.backward()
    loss.backward()
    for pname in params:
        assert_rel_close(getattr(other, pname).grad, getattr(sae, pname).grad, 1e-4, pname)
    return out


@pytest.mark.parametrize("name,case", BASELINE_CASES, ids=[f"{n}-{c}" for n, c in BASELINE_CASES])
def test_baselines_compute_fastsae_loss_and_gradients(name, case):
    """Every baseline computes the step fastsae computes for its architecture and dead mask: the
    same loss (MSE, sparsity penalty, AuxK) and gradients, so the bench compares equal work."""
    torch.manual_seed(0)
    sae, x, mask = _case_sae(case)
    coefficient = runner.SPARSITY_COEFFICIENT if case.architecture in ("relu", "jumprelu") else 0.0
    base = baselines.make_baseline(name, sae)
    params = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if case.architecture == "jumprelu" else ())
    # A transcoder's step: a second random input as its target, and the skip connection's gradient.
    target = torch.randn_like(x) if case.transcoder else None
    if case.skip:
        assert sae.W_skip is not None and sae.W_skip.abs().sum() > 0 and not sae.cfg.apply_b_dec_to_input
        params += ("W_skip",)
    out = _assert_same_step(sae, base, x, mask, coefficient, params, target)
    if case.dead_fraction:
        assert out.aux_loss > 0  # AuxK took part
    if case.architecture in ("relu", "jumprelu"):
        assert out.sparsity_loss > 0 and 1 <= float(out.acts.l0().float().mean()) <= 4 * 7  # rows hold about k


def test_baselines_refuse_architectures_they_do_not_compute():
    sae = fastsae.SAE(d_in=8, d_sae=16, architecture="relu")
    with pytest.raises(ValueError, match="torch-sparse"):
        baselines.make_baseline("torch-sparse", sae)
    with pytest.raises(ValueError, match="baseline"):
        baselines.make_baseline("torch-dence", sae)


def test_run_bench_rows():
    shape = runner.Shape(64, 16, 80, 3)
    result = runner.run_bench(device="cpu", shapes=[shape], reps=2, log=lambda s: None)
    rows = result["rows"]
    backends = result["meta"]["backends"]

    def expected(n_baselines):
        # one row per (contender, baseline other than itself); a lone baseline has one row of its own
        n = len(backends) + n_baselines
        return n * n_baselines - n_baselines if n_baselines > 1 else len(backends) + n_baselines
    cases = [(op, runner.ENCODE_CASE) for op in ("encode", "decode")] + [("train_step", c) for c in runner.STEP_CASES]
    assert len(rows) == sum(expected(len(baselines.baselines_for(c.architecture))) for _, c in cases)
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["shape"] == str(shape) and r["device"] == result["meta"]["device"]
        assert r["backend"] != r["baseline"]
        assert r["ms"] > 0 and r["floor_ms"] > 0
        if r["baseline"] is not None:
            assert r["baseline_ms"] > 0 and r["speedup"] == pytest.approx(r["baseline_ms"] / r["ms"])
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
    # the steps training runs: each architecture, AuxK at 0, 1 and 10% dead
    steps = {(r["architecture"], r["dead_fraction"]) for r in rows if r["op"] == "train_step"}
    assert steps == {("topk", 0.0), ("topk", 0.01), ("topk", 0.1), ("batchtopk", 0.01), ("matryoshka_batchtopk", 0.01),
                     ("relu", None), ("jumprelu", None)}
    assert {(r["architecture"], r["dead_fraction"]) for r in rows if r["op"] != "train_step"} == {("topk", None)}
    # the same contender's time is the same in every row that names it
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["architecture"], r["dead_fraction"], r.get("transcoder"), r["backend"]), set()).add(r["ms"])
    assert all(len(v) == 1 for v in by.values())
    # the skip transcoder's step: TopK with AuxK at 1%, against both baselines; other rows unmarked
    transcoder_rows = [r for r in rows if "transcoder" in r]
    assert {(r["architecture"], r["dead_fraction"], r["transcoder"], r["skip"]) for r in transcoder_rows} == {
        ("topk", 0.01, True, True)}
    assert {r["backend"] for r in transcoder_rows} == set(backends) | {"torch-dense", "torch-sparse"}
    assert all("skip" not in r for r in rows if "transcoder" not in r)
    table = runner.format_table([r for r in rows if r["op"] == "train_step" and r["dead_fraction"] == 0.01])
    assert "torch-dense" in table and "x floor" in table


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "--shape", "40,12,50,2", "--reps", "2", "--ops", "encode,decode", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {r["op"] for r in data["rows"]} == {"encode", "decode"}
    assert "encode N40-d12-s50-k2" in capsys.readouterr().out

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import update_readme
    finally:
        sys.path.pop(0)
    table = update_readme._table(data)
    assert "| encode | N40-d12-s50-k2 |" in table


def test_bench_cli_times_the_architectures_asked_for(tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["bench", "--shape", "40,12,50,2", "--reps", "2", "--ops", "train_step",
               "--architectures", "matryoshka_batchtopk,relu", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["architecture"] for r in rows} == {"matryoshka_batchtopk", "relu"}
    with pytest.raises(SystemExit, match="--architectures: expected some of .* got 'toppk'"):
        main(["bench", "--ops", "train_step", "--architectures", "toppk"])


def test_bench_cli_times_the_transcoder_cases_asked_for(tmp_path):
    out = tmp_path / "t.json"
    args = ["bench", "--shape", "40,12,50,2", "--reps", "2", "--ops", "train_step", "--architectures", "topk"]
    assert main(args + ["--transcoders", "only", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["transcoder"] and r["skip"] and r["dead_fraction"] == 0.01 for r in rows)
    assert main(args + ["--transcoders", "exclude", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["dead_fraction"] for r in rows} == {0.0, 0.01, 0.1} and not any("transcoder" in r for r in rows)


def test_bench_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="--ops"):
        main(["bench", "--ops", "encoder"])
    with pytest.raises(SystemExit, match="--shape"):
        main(["bench", "--shape", "1,2,3"])


def test_gather_weighted_sum_matches_float64_in_bf16():
    """The torch-sparse baseline's decoder on CUDA in 16 bits (embedding_bag has no bf16 backward
    there): checked here on the CPU in bf16 against float64, values and gradients."""
    torch.manual_seed(0)
    w64 = torch.randn(333, 48, dtype=torch.float64)
    v64 = torch.randn(29, 7, dtype=torch.float64)
    idx = torch.stack([torch.randperm(333)[:7] for _ in range(29)])
    w = w64.bfloat16().requires_grad_()
    v = v64.bfloat16().requires_grad_()
    out = baselines.gather_weighted_sum(v, idx, w)
    assert out.dtype == torch.bfloat16
    wr, vr = w.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    ref = torch.nn.functional.embedding_bag(idx, wr, per_sample_weights=vr, mode="sum")
    assert (out.double() - ref).abs().max() <= 2e-2 * ref.abs().max()
    g = torch.randn(29, 48, dtype=torch.float64)
    out.backward(g.bfloat16())
    ref.backward(g)
    assert (w.grad.double() - wr.grad).abs().max() <= 2e-2 * wr.grad.abs().max()
    assert (v.grad.double() - vr.grad).abs().max() <= 2e-2 * vr.grad.abs().max()


def test_shape_too_large_for_dense_runs_fastsae_only(monkeypatch):
    monkeypatch.setattr(runner, "DENSE_MAX_ELEMENTS", 64 * 79)  # this shape's N * d_sae is above it
    shape = runner.Shape(64, 16, 80, 3)
    result = runner.run_bench(device="cpu", shapes=[shape], reps=2, log=lambda s: None, backends=["torch"])
    rows = result["rows"]
    assert {r["backend"] for r in rows} == {"torch"} and len(rows) == 2 + len(runner.STEP_CASES)
    assert all(r["baseline"] is None and r["ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert runner.HUGE_SHAPE.n * runner.HUGE_SHAPE.d_sae > (1 << 34)  # the real threshold excludes it


def test_bench_graph_needs_cuda_and_peers_are_checked():
    with pytest.raises(ValueError, match="graph"):
        runner.run_bench(device="cpu", shapes=[runner.Shape(8, 4, 16, 2)], graph=True, log=lambda s: None)
    with pytest.raises(ValueError, match="peers"):
        runner.run_bench(device="cpu", shapes=[runner.Shape(8, 4, 16, 2)], peers=["sae-lens"], log=lambda s: None)


@pytest.mark.skipif(not peers.importable("saelens"), reason="sae_lens is not installed")
@pytest.mark.parametrize("case", runner.SAE_CASES, ids=str)  # no peer runs the transcoder cases
def test_saelens_peer_computes_fastsae_loss_and_gradients(case):
    """SAELens' own training SAE, as the bench runs it, computes fastsae's step (AuxK on the same
    mask, the same sparsity penalty): a like-for-like comparison."""
    torch.manual_seed(0)
    sae, x, mask = _case_sae(case)
    coefficient = runner.SPARSITY_COEFFICIENT if case.architecture in ("relu", "jumprelu") else 0.0
    peer = peers.make_peer("saelens", sae, coefficient)
    params = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if case.architecture == "jumprelu" else ())

    class Params:  # the peer's parameters under fastsae's names
        def __getattr__(self, name):
            return getattr(peer.sae, name)
    out = sae.training_forward(x, sparsity_coefficient=coefficient, dead_mask=mask)
    loss = peer.loss(x, mask, coefficient)
    assert_rel_close(loss.detach(), out.loss.detach().double(), 1e-5, "loss")
    out.loss.backward()
    loss.backward()
    for pname in params:
        assert_rel_close(getattr(Params(), pname).grad, getattr(sae, pname).grad, 1e-4, pname)


@pytest.mark.skipif(not peers.importable("saelens"), reason="sae_lens is not installed")
def test_bench_runs_the_saelens_peer_with_each_step():
    result = runner.run_bench(device="cpu", shapes=[runner.Shape(64, 16, 80, 3)], reps=2, log=lambda s: None,
                              backends=["torch"], peers=["saelens"], ops=("encode", "train_step"))
    assert {r["backend"] for r in result["rows"]} == {"torch", "saelens", "torch-dense", "torch-sparse"}
    with_peer = {(r["architecture"], r["dead_fraction"]) for r in result["rows"] if r["backend"] == "saelens" and r["op"] == "train_step"}
    assert with_peer == {(c.architecture, c.dead_fraction) for c in runner.STEP_CASES}


def test_floor_parts_are_timed_alongside_and_counted_by_their_fastest_round(monkeypatch):
    from fastsae.bench.timing import Timing

    calls = []

    def fake_alternating(fns, reps, warmup=1):
        calls.append(sorted(fns))
        # Contenders: median 10 ms; torch-sparse 4 ms (below any floor here); floor parts:
        # median 30 ms but a fastest round of 8 ms, the figure the floor must use.
        out = {name: Timing(10.0, 9.0, 11.0, reps) for name in fns}
        if "torch-sparse" in fns:
            out["torch-sparse"] = Timing(4.0, 3.0, 5.0, reps)
        for name in fns:
            if name.startswith(runner.FLOOR_PREFIX):
                out[name] = Timing(30.0, 8.0 if name.endswith("matmul") else 1.0, 40.0, reps)
        return out

    monkeypatch.setattr(runner.timing, "time_cpu_alternating", fake_alternating)
    # Peak rates so low that the at-peak bounds never undercut the timed parts.
    monkeypatch.setattr(runner.timing, "measure_ceilings",
                        lambda *a, **k: {"matmul_tflops": 1e-12, "copy_gbps": 1e-12})
    lines = []
    result = runner.run_bench(device="cpu", shapes=[runner.Shape(32, 8, 40, 2)], backends=["torch"], reps=2,
                              log=lines.append)
    # One alternating call per op (and train_step case), holding the contenders and that op's floor
    # parts together.
    step_parts = ["floor:matmul", "floor:adam-torch", "floor:adam-fastsae"]
    assert calls == [
        sorted(["torch", "torch-dense", "torch-sparse", "floor:matmul"]),
        sorted(["torch", "torch-dense", "torch-sparse", "floor:matmul", "floor:copy"]),
    ] + [
        sorted(["torch", *baselines.baselines_for(case.architecture), *step_parts]) for case in runner.STEP_CASES
    ]
    floors = {r["op"]: r["floor_ms"] for r in result["rows"]}
    assert floors == {"encode": 8.0, "decode": 1.0, "train_step": 9.0}
    for r in result["rows"]:
        assert r["of_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
        assert r["floor_is_estimate"] == (r["ms"] < r["floor_ms"])
    flagged = {(r["op"], r["backend"]) for r in result["rows"] if r["floor_is_estimate"]}
    assert flagged == {("encode", "torch-sparse"), ("train_step", "torch-sparse")}
    encode_table = next(text for text in lines if text.startswith("encode"))
    assert "0.50x*" in encode_table and "the floor is only an estimate here" in encode_table
    decode_table = next(text for text in lines if text.startswith("decode"))
    assert "*" not in decode_table
