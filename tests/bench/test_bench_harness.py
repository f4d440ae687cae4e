"""The one benchmark harness: its metadata, naming, writer and train step, and the table that
keeps architecture names out of the bench code."""

import copy
import json

import pytest
import torch
from conftest import assert_rel_close

import fastsae
from fastsae import architectures
from fastsae.bench import baselines, harness, peers, runner
from fastsae.training import graph


def test_machine_info_names_the_machine_and_libraries():
    info = harness.machine_info(torch.device("cpu"), torch.float32)
    assert info["device"] == harness.device_name(torch.device("cpu")) and info["device_type"] == "cpu"
    assert info["dtype"] == "float32" and info["torch"] == torch.__version__
    assert info["fastsae"] == fastsae.__version__ and info["threads"] == torch.get_num_threads()
    assert "dtype" not in harness.machine_info(torch.device("cpu"))


def test_results_path_is_one_scheme_and_the_bench_uses_it(tmp_path):
    meta = {"device": "AMD EPYC 7R13 Processor (2 threads)", "device_type": "cpu", "date": "2026-12-04"}
    assert harness.results_path(meta) == harness.RESULTS_DIR / "cpu-amd-epyc-7r13-processor-2026-12-04.json"
    assert harness.results_path({**meta, "device": "NVIDIA H200", "device_type": "cuda"}, kind="auxk", suffix="-x") == (
        harness.RESULTS_DIR / "auxk-cuda-nvidia-h200-2026-12-04-x.json"
    )
    assert runner.default_results_path({"meta": {**meta, "quick": True}}).name == (
        "cpu-amd-epyc-7r13-processor-2026-12-04-quick.json"
    )
    path = harness.write_json({"meta": meta, "rows": [{"ms": 1.5}]}, tmp_path / "a" / "r.json")
    assert json.loads(path.read_text()) == {"meta": meta, "rows": [{"ms": 1.5}]}
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind


def test_time_alternating_times_every_fn_each_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = harness.time_alternating(fns, torch.device("cpu"), reps=4, warmup=2)
    assert set(times) == {"a", "b", "c"} and all(t.samples == 4 and t.min_ms <= t.median_ms <= t.max_ms for t in times.values())
    assert sorted(calls) == sorted(["a", "b", "c"] * 6)
    assert calls[6:9] == ["a", "b", "c"] and calls[9:12] == ["b", "c", "a"]  # the order rotates


@pytest.mark.parametrize("architecture,coefficient", [("topk", 0.0), ("relu", 0.3), ("jumprelu", 0.3)])
def test_train_step_is_zero_grad_forward_backward_step(architecture, coefficient):
    """harness.train_step (the step CapturedStep records) equals the step written out by hand,
    from stale gradients too (it zeroes them first), on float64 parameters."""
    torch.manual_seed(3)
    sae = fastsae.SAE(d_in=13, d_sae=37, architecture=architecture, k=5 if architecture == "topk" else None,
                      dtype="float64")
    twin = copy.deepcopy(sae)
    opt, opt_twin = torch.optim.Adam(sae.parameters(), lr=1e-2), torch.optim.Adam(twin.parameters(), lr=1e-2)
    x = torch.randn(21, 13, dtype=torch.float64)
    mask = torch.rand(37) < 0.3 if architecture == "topk" else None
    for p in sae.parameters():
        p.grad = torch.randn_like(p)
    out = harness.train_step(sae, opt, x, sparsity_coefficient=coefficient, dead_mask=mask)
    ref = twin.training_forward(x, sparsity_coefficient=coefficient, dead_mask=mask)
    ref.loss.backward()
    opt_twin.step()
    assert_rel_close(out.loss.detach(), ref.loss.detach(), 1e-12, "loss")
    for name, p in sae.named_parameters():
        assert_rel_close(p.detach(), getattr(twin, name).detach(), 1e-12, name)
    assert harness.train_step is graph.train_step


def test_train_step_unit_norm_and_found_inf():
    """Unit-norm decoders come out of the step with unit rows; a non-finite loss sets found_inf,
    and the fused Adam then leaves every parameter as it was."""
    sae = fastsae.SAE(d_in=9, d_sae=20, architecture="relu", decoder_norm="unit_norm", dtype="float64")
    opt = torch.optim.Adam(sae.parameters(), lr=0.1, fused=True)
    found_inf = torch.zeros(())
    after = []
    harness.train_step(sae, opt, torch.randn(11, 9, dtype=torch.float64), sparsity_coefficient=0.1,
                       found_inf=found_inf, after_step=lambda: after.append(1))
    assert_rel_close(sae.W_dec.norm(dim=1), torch.ones(20, dtype=torch.float64), 1e-12, "row norms")
    assert float(found_inf) == 0.0 and after == [1]
    # found_inf with the default decoder norm (no renormalisation after the step): nothing moves.
    sae = fastsae.SAE(d_in=9, d_sae=20, architecture="relu", dtype="float64")
    opt = torch.optim.Adam(sae.parameters(), lr=0.1, fused=True)
    x = torch.full((11, 9), float("nan"), dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    harness.train_step(sae, opt, x, found_inf=found_inf)
    assert float(found_inf) == 1.0
    assert all(torch.equal(p, before[n]) for n, p in sae.named_parameters())


def test_bench_math_is_keyed_by_the_architecture_registry():
    """Every architecture the bench times is a registered one, and its table row is what the
    baselines and the step cases follow (so no bench code names an architecture)."""
    for name in list(baselines.BENCH_MATH) + list(peers.SAELENS_CLASSES):
        assert architectures.get(name).name == name
    assert set(peers.PEER_ARCHITECTURES["saelens"]) == set(baselines.BENCH_MATH)
    assert {c.architecture for c in runner.STEP_CASES} == set(baselines.BENCH_MATH)
    assert baselines.BASELINE_ARCHITECTURES["torch-dense"] == tuple(baselines.BENCH_MATH)
    for name, math in baselines.BENCH_MATH.items():
        assert math.auxk == architectures.get(name).supports_auxk, name
        assert math.dead_fractions == tuple(c.dead_fraction for c in runner.SAE_CASES if c.architecture == name)
        assert (runner.sparsity_coefficient(runner.StepCase(name)) > 0) == (math.penalty is not None)
    # and the transcoder cases: the headline architecture as a skip transcoder, AuxK at 1% dead
    assert runner.STEP_CASES == runner.SAE_CASES + runner.TRANSCODER_CASES
    assert runner.TRANSCODER_CASES == (runner.StepCase(runner.ENCODE_CASE.architecture, 0.01, True, True),)


def test_the_bench_follows_each_architectures_reference_training():
    """The bench's tables are built from the registry: an architecture is benched exactly when it
    says how SAELens trains it (`reference_training`), with its own k, AuxK and math; one of them,
    the one sparsify trains, is the headline that encode and decode time."""
    described = {n for n in architectures.names() if architectures.get(n).reference_training is not None}
    assert set(baselines.BENCH_MATH) == set(peers.SAELENS_CLASSES) == described
    for name, math in baselines.BENCH_MATH.items():
        arch, ref = architectures.get(name), architectures.get(name).reference_training
        assert (math.takes_k, math.auxk) == (arch.uses_k, arch.supports_auxk), name
        assert (math.activate, math.penalty, math.calibrate) == (ref.activate, ref.penalty, ref.calibrate), name
        assert (math.calibrate is None) == arch.uses_k, name  # without k, the bench sets the sparsity
    headline = [name for name, math in baselines.BENCH_MATH.items() if math.encode_case]
    assert headline == [runner.ENCODE_CASE.architecture] == list(baselines.BASELINE_ARCHITECTURES["torch-sparse"])
    assert runner.STEP_CASES[0].architecture == headline[0]


@pytest.mark.skipif(not peers.importable("saelens"), reason="sae_lens is not installed")
def test_reference_training_names_saelens_classes_that_exist():
    import sae_lens

    for name, ref in peers.SAELENS_CLASSES.items():
        assert hasattr(sae_lens, ref.saelens_class) and hasattr(sae_lens, ref.saelens_class + "Config"), name
