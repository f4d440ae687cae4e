"""Several SAEs from one pass of the model: --hook patterns, one forward per chunk for every hook,
a run folder per SAE with its hook in cfg.json, resuming together, sweeps of --k and --d-sae."""

import json

import pytest
import torch
from helpers.tiny_models import save_tiny_bert

pytest.importorskip("transformers", reason="transformers is installed by the [train] and [test] extras")

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] the a of to and is in it for def class return print x y".split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS)


@pytest.fixture
def corpus(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(["the x of y is in it for def class return print x to and is a"] * 40))
    return text


def _train(tiny_bert, corpus, out, *extra):
    from fastsae.cli import main

    return main(["train", "--model", str(tiny_bert), "--text", str(corpus), "--seq-len", "16", "--k", "3",
                 "--tokens", "600", "--batch-size", "100", "--out", str(out), "--no-progress", "--report-features", "0",
                 "--browser-tokens", "0", "--eval-tokens", "0", "--activation-cache", "none", *extra])


def test_hook_patterns_match_whole_name_parts(tiny_bert):
    from fastsae.training.transformer import TransformerActivations

    src = TransformerActivations(tiny_bert, hook=["encoder.layer.*", "embeddings"], text=["the x of y"] * 4, seq_len=8)
    assert src.hooks == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "embeddings"]
    assert src.hook == "encoder.layer.0" and src.d_in == 24


def test_a_pattern_matching_nothing_lists_the_module_names(tiny_bert):
    from fastsae.training.transformer import TransformerActivations

    with pytest.raises(ValueError, match=r"no module matching 'decoder\.\*'.*encoder\.layer\.0"):
        TransformerActivations(tiny_bert, hook=["decoder.*"], text=["the x of y"] * 4, seq_len=8)


def test_every_hook_from_one_forward_pass(tiny_bert, corpus, monkeypatch, tmp_path):
    from fastsae.training.multi import hook_views
    from fastsae.training.transformer import TransformerActivations

    src = TransformerActivations(tiny_bert, hook=["encoder.layer.0", "encoder.layer.2"], text=corpus, seq_len=16)
    calls = []
    src.model.register_forward_hook(lambda *a: calls.append(1))
    src.model.register_forward_pre_hook(lambda *a: calls.append("pass"))
    views = hook_views(src, buffer_rows=1 << 16)
    n = len(src.chunk_sizes)
    for index in range(n):
        a, b = views["encoder.layer.0"].load_chunk(index), views["encoder.layer.2"].load_chunk(index)
        single = TransformerActivations(tiny_bert, hook="encoder.layer.2", text=corpus, seq_len=16)
        assert torch.equal(b, single.load_chunk(index)) and a.shape == b.shape
    assert calls.count("pass") == n  # one pass per chunk for both hooks


def test_several_hooks_train_from_one_pass_each_in_its_run_folder(tiny_bert, corpus, tmp_path, monkeypatch, capsys):
    import fastsae
    from fastsae.training import transformer

    passes = []
    original = transformer.TransformerActivations.load_chunks_of_all
    monkeypatch.setattr(transformer.TransformerActivations, "load_chunks_of_all",
                        lambda self, index: passes.append(index) or original(self, index))
    out = tmp_path / "run"
    assert _train(tiny_bert, corpus, out, "--hook", "encoder.layer.*") == 0, capsys.readouterr()
    n_chunks = len(transformer.TransformerActivations(tiny_bert, hook="encoder.layer.0", text=corpus, seq_len=16).chunk_sizes)
    assert len(passes) <= n_chunks + 1  # each chunk once (and one sample read for initialisation)
    for layer in range(3):
        folder = out / f"encoder.layer.{layer}"
        sae = fastsae.load(folder)
        assert sae.cfg.metadata["hook_name"] == f"encoder.layer.{layer}"
        assert sae.cfg.metadata["model_name"] == str(tiny_bert)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 6 and (folder / "summary.json").is_file()


def test_several_saes_resume_together(tiny_bert, corpus, tmp_path, monkeypatch, capsys):
    import fastsae
    from fastsae.runs import latest_checkpoint
    from fastsae.training.multi import MultiTrainer

    out, whole = tmp_path / "run", tmp_path / "whole"
    args = ("--hook", "encoder.layer.0", "--hook", "encoder.layer.1")
    assert _train(tiny_bert, corpus, whole, *args) == 0
    with monkeypatch.context() as patch:  # stopped after 3 of its 6 steps
        original = MultiTrainer.train
        patch.setattr(MultiTrainer, "train", lambda self, max_steps=None: original(self, max_steps=3))
        assert _train(tiny_bert, corpus, out, *args) == 0
    for hook in ("encoder.layer.0", "encoder.layer.1"):
        assert latest_checkpoint(out / hook).name.endswith("_000000003")
    capsys.readouterr()
    assert _train(tiny_bert, corpus, out, *args, "--resume") == 0
    assert "resuming 2 SAEs" in capsys.readouterr().out
    for hook in ("encoder.layer.0", "encoder.layer.1"):
        assert latest_checkpoint(out / hook).name.endswith("_000000006")
        resumed, straight = fastsae.load(out / hook), fastsae.load(whole / hook)
        for name, tensor in straight.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[name], tensor)


def test_a_sweep_names_each_folder_by_k_and_d_sae(tiny_bert, corpus, tmp_path):
    import fastsae

    out = tmp_path / "run"
    assert _train(tiny_bert, corpus, out, "--hook", "encoder.layer.1", "--k", "2,4", "--d-sae", "48") == 0
    plan = json.loads((out / "sae_runs.json").read_text())["runs"]
    assert [entry["folder"] for entry in plan] == ["encoder.layer.1/k2-d48", "encoder.layer.1/k4-d48"]
    assert [fastsae.load(out / entry["folder"]).cfg.k for entry in plan] == [2, 4]


def test_one_hook_keeps_the_single_run_layout(tiny_bert, corpus, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_bert, corpus, out, "--hook", "encoder.layer.1") == 0
    assert (out / "metrics.jsonl").is_file() and not (out / "sae_runs.json").exists()


def test_a_sweep_on_activation_data_shares_one_stream(tmp_path):
    import fastsae
    from fastsae.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--k", "2,4", "--tokens", "600", "--batch-size", "100", "--out",
                 str(out), "--no-progress", "--eval-tokens", "0"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["k2-d512", "k4-d512"]
    assert fastsae.load(out / "k4-d512").cfg.k == 4


def test_the_activation_cache_serves_a_second_run_without_the_model(tiny_bert, corpus, tmp_path, monkeypatch):
    import fastsae
    from fastsae.training import transformer

    cache, hooks = tmp_path / "cache", ("--hook", "encoder.layer.0", "--hook", "encoder.layer.2")
    forwards = []
    original = transformer.TransformerActivations._run_windows
    monkeypatch.setattr(transformer.TransformerActivations, "_run_windows",
                        lambda self, first, stop, split=False: forwards.append(first) or original(self, first, stop, split))
    assert _train(tiny_bert, corpus, tmp_path / "first", *hooks, "--activation-cache", str(cache)) == 0
    assert forwards  # the first run computed the activations
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # one folder per hook
    forwards.clear()
    assert _train(tiny_bert, corpus, tmp_path / "second", *hooks, "--activation-cache", str(cache)) == 0
    assert forwards == []  # every chunk, and the widths, from the cache
    for hook in ("encoder.layer.0", "encoder.layer.2"):
        first, second = fastsae.load(tmp_path / "first" / hook), fastsae.load(tmp_path / "second" / hook)
        for name, tensor in first.state_dict().items():
            assert torch.equal(second.state_dict()[name], tensor), (hook, name)
    # A one-hook run at a cached hook reads the same folder; a hook not cached runs the model.
    assert _train(tiny_bert, corpus, tmp_path / "single", "--hook", "encoder.layer.2", "--activation-cache", str(cache)) == 0
    assert forwards == []
    hooks = ("--hook", "encoder.layer.0", "--hook", "encoder.layer.1")
    assert _train(tiny_bert, corpus, tmp_path / "other", *hooks, "--activation-cache", str(cache)) == 0
    assert forwards and len([p for p in cache.iterdir() if p.is_dir()]) == 3


def test_cache_chunks_runs_the_model_only_for_chunks_some_hook_lacks(tiny_bert, corpus, tmp_path):
    from fastsae.training.transformer import TransformerActivations

    hooks = ["encoder.layer.0", "encoder.layer.2"]
    src = TransformerActivations(tiny_bert, hook=hooks, text=corpus, seq_len=8, cache_dir=tmp_path / "cache")
    passes = []
    src.model.register_forward_pre_hook(lambda *a: passes.append(1))
    assert src.cache_chunks([0, 2]) == 2 and len(passes) == 2
    (src.cache_dirs["encoder.layer.2"] / "chunk_000002.safetensors").unlink()
    assert src.cache_chunks([0, 1, 2]) == 2 and len(passes) == 4  # chunk 1 new, chunk 2 for its missing hook
    single = TransformerActivations(tiny_bert, hook="encoder.layer.2", text=corpus, seq_len=8)
    for index in range(3):  # what the cache holds is what the model gives
        assert torch.equal(src.load_chunks_of_all(index)[1], single.load_chunk(index))
    assert len(passes) == 4
    with pytest.raises(ValueError, match="cache_chunks: expected a source with a cache_dir"):
        TransformerActivations(tiny_bert, hook=hooks, text=corpus, seq_len=8).cache_chunks([0])


def test_each_sae_times_only_its_own_steps(tmp_path):
    import time

    import fastsae
    from fastsae.ops import use_backend
    from fastsae.training import Trainer, TrainerConfig
    from fastsae.training.multi import MultiTrainer
    from fastsae.training.synthetic import SyntheticActivations

    data = SyntheticActivations(d_in=8, n_features=20, l0=2.0, n_rows=2048, seed=0)
    trainers = {}
    for name in ("quick", "slow"):
        cfg = TrainerConfig(total_tokens=20 * 32, batch_size=32, log_every_steps=10, checkpoint_every_seconds=None,
                            progress=False, seed=0, init_sample_rows=256)
        trainers[name] = Trainer(fastsae.SAE(d_in=8, d_sae=32, architecture="topk", k=2), data, cfg)
    slow_step = trainers["slow"]._train_step
    trainers["slow"]._train_step = lambda x: time.sleep(0.1) or slow_step(x)  # 20 steps: 2 s
    multi = MultiTrainer(trainers)
    with use_backend("torch"):  # no backend's first-call load inside the quick SAE's first step
        multi.train()
    quick, slow = trainers["quick"], trainers["slow"]
    assert slow.elapsed >= 2.0 and multi.wall_s >= 2.0
    assert quick.elapsed < 1.0  # before: its window held the other SAE's steps too (over 2 s)
    assert quick.last_metrics["tokens_per_s"] > 2 * slow.last_metrics["tokens_per_s"]
    assert multi.tokens_before == {"quick": 0, "slow": 0}
