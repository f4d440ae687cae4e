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


@pytest.mark.parametrize("name", baselines.BASELINES)
def test_baselines_compute_fastsae_loss_and_gradients(name):
    sae = fastsae.SAE(d_in=48, d_sae=333, architecture="topk", k=7)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    base = baselines.make_baseline(name, sae)
    x = torch.randn(29, 48)
    out = sae.training_forward(x)
    loss = base.loss(x)
    assert_rel_close(loss.detach(), out.mse_loss.detach().double(), 1e-5)
    out.loss.backward()
    loss.backward()
    for pname in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert_rel_close(getattr(base, pname).grad, getattr(sae, pname).grad, 1e-4, pname)


def test_run_bench_rows():
    shape = runner.Shape(64, 16, 80, 3)
    result = runner.run_bench(device="cpu", shapes=[shape], reps=2, log=lambda s: None)
    rows = result["rows"]
    contenders = result["meta"]["backends"] + ["torch-dense", "torch-sparse"]
    # one row per (op, contender, baseline other than itself)
    assert len(rows) == 3 * (len(contenders) * 2 - 2)
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["shape"] == str(shape) and r["device"] == result["meta"]["device"]
        assert r["backend"] != r["baseline"]
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["floor_ms"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["ms"])
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
    # the same contender's time is the same in every row that names it
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["backend"]), set()).add(r["ms"])
    assert all(len(v) == 1 for v in by.values())
    table = runner.format_table([r for r in rows if r["op"] == "train_step"])
    assert "torch-dense" in table and "x floor" in table


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "--shape", "40,12,50,2", "--reps", "2", "--ops", "encode,decode", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {r["op"] for r in data["rows"]} == {"encode", "decode"}
    assert "encode N40-d12-s50-k2" in capsys.readouterr().out

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import update_readme
    finally:
        sys.path.pop(0)
    table = update_readme._table(data)
    assert "| encode | N40-d12-s50-k2 |" in table


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
    assert {r["backend"] for r in rows} == {"torch"} and len(rows) == 3
    assert all(r["baseline"] is None and r["ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert runner.HUGE_SHAPE.n * runner.HUGE_SHAPE.d_sae > (1 << 34)  # the real threshold excludes it


def test_bench_graph_needs_cuda_and_peers_are_checked():
    with pytest.raises(ValueError, match="graph"):
        runner.run_bench(device="cpu", shapes=[runner.Shape(8, 4, 16, 2)], graph=True, log=lambda s: None)
    with pytest.raises(ValueError, match="peers"):
        runner.run_bench(device="cpu", shapes=[runner.Shape(8, 4, 16, 2)], peers=["sae-lens"], log=lambda s: None)


@pytest.mark.skipif(not peers.importable("saelens"), reason="sae_lens is not installed")
def test_saelens_peer_computes_fastsae_loss_and_gradients():
    sae = fastsae.SAE(d_in=48, d_sae=333, architecture="topk", k=7)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    peer = peers.make_peer("saelens", sae)
    x = torch.randn(29, 48)
    out = sae.training_forward(x)
    loss = peer.loss(x)
    assert_rel_close(loss.detach(), out.mse_loss.detach().double(), 1e-5)
    out.loss.backward()
    loss.backward()
    for pname in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert_rel_close(getattr(peer.sae, pname).grad, getattr(sae, pname).grad, 1e-4, pname)
    result = runner.run_bench(device="cpu", shapes=[runner.Shape(64, 16, 80, 3)], reps=2, log=lambda s: None,
                              backends=["torch"], peers=["saelens"], ops=("encode",))
    assert {r["backend"] for r in result["rows"]} == {"torch", "saelens", "torch-dense", "torch-sparse"}


def test_floor_parts_are_timed_alongside_and_counted_by_their_fastest_round(monkeypatch):
    from fastsae.bench.timing import Timing

    calls = []

    def fake_alternating(fns, reps, warmup=1):
        calls.append(sorted(fns))
        # Contenders: median 10 ms; torch-sparse 4 ms (below any floor here); floor parts:
        # median 30 ms but a fastest round of 8 ms, the figure the floor must use.
        out = {name: Timing(10.0, 9.0, 11.0, reps) for name in fns}
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
    # One alternating call per op, holding the contenders and that op's floor parts together.
    assert calls == [
        sorted(["torch", "torch-dense", "torch-sparse", "floor:matmul"]),
        sorted(["torch", "torch-dense", "torch-sparse", "floor:matmul", "floor:copy"]),
        sorted(["torch", "torch-dense", "torch-sparse", "floor:matmul", "floor:adam-torch", "floor:adam-fastsae"]),
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
