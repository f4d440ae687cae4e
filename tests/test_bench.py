"""The benchmark harness: rows carry what they claim, and the baselines compute what fastsae does."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_rel_close

import fastsae
from fastsae.bench import baselines, runner
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
