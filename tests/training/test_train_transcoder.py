"""Training transcoders: paired activation files (`inputs` and `targets`), the Trainer on them
(FVU against the target, resume, the saved transcoder), a transformer read at two hooks in one
pass, `fastsae train --hook-in A --hook-out B`, and one clear error for each bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

import fastsae
from fastsae import SAE
from fastsae.cli import main
from fastsae.training import ActivationFiles, Trainer, TrainerConfig, save_activations
from fastsae.training.synthetic import mean_max_cosine
from helpers.tiny_models import save_tiny_bert

D_IN, D_OUT, N_FEATURES, ROWS = 20, 12, 24, 8192


def _pairs(seed=0, rows=ROWS):
    """x = f @ u, y = f @ g: a sparse map whose output directions g are known."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(N_FEATURES, D_IN, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(N_FEATURES, D_OUT, generator=gen), dim=1)
    f = (torch.rand(rows, N_FEATURES, generator=gen) < 3 / N_FEATURES) * (0.5 + torch.rand(rows, N_FEATURES, generator=gen))
    return f @ u, f @ g, g


def _cfg(**kw):
    args = dict(total_tokens=256 * 24, batch_size=256, lr=3e-3, progress=False, log_every_steps=4,
                checkpoint_every_seconds=None, shuffle_buffer_rows=2048, init_sample_rows=1024)
    return TrainerConfig(**{**args, **kw})


def _transcoder(**kw):
    args = dict(d_in=D_IN, d_sae=48, d_out=D_OUT, architecture="topk", k=4, apply_b_dec_to_input=False)
    return SAE(**{**args, **kw})


def test_paired_files_hold_inputs_and_targets_side_by_side(tmp_path):
    x, y, _ = _pairs(rows=100)
    save_activations(tmp_path / "a.safetensors", x[:60], y[:60])
    save_activations(tmp_path / "b.safetensors", x[60:], y[60:])
    data = ActivationFiles(tmp_path, chunk_rows=32)
    assert (data.d_in, data.d_out) == (D_IN, D_OUT) and sum(data.chunk_sizes) == 100
    rows = torch.cat([data.load_chunk(i) for i in range(len(data.chunk_sizes))])
    assert torch.equal(rows, torch.cat([x, y], dim=1))
    plain = ActivationFiles(save_activations(tmp_path / "plain" / "p.safetensors", x))
    assert plain.d_out is None  # an SAE's files read as before


def test_a_transcoder_trains_on_pairs_and_saves(tmp_path):
    x, y, g = _pairs()
    save_activations(tmp_path / "pairs.safetensors", x, y)
    data = ActivationFiles(tmp_path / "pairs.safetensors", chunk_rows=2048)
    trainer = Trainer(_transcoder(), data, _cfg(total_tokens=256 * 96), tmp_path / "run")
    assert trainer.dead_strategy == "auxk"
    result = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < 0.5 * rows[0]["fvu"]
    saved = fastsae.load(tmp_path / "run")
    assert saved.d_out == D_OUT and saved.cfg.d_out == D_OUT
    # FVU is against the target: the saved transcoder's on the data agrees with the last rows'
    with torch.no_grad():
        pred = saved(x)
    fvu = ((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()
    assert fvu == pytest.approx(result["fvu"], rel=0.25, abs=0.02)
    assert mean_max_cosine(saved.W_dec, g) > 0.8


def test_resume_continues_a_transcoder_run_exactly(tmp_path):
    x, y, _ = _pairs(seed=1, rows=4096)
    save_activations(tmp_path / "pairs.safetensors", x, y)
    data = ActivationFiles(tmp_path / "pairs.safetensors", chunk_rows=1024)
    cfg = dict(total_tokens=256 * 12, checkpoint_every_steps=6)
    whole = Trainer(_transcoder(skip_connection=True, architecture="relu", k=None), data, _cfg(**cfg), tmp_path / "a")
    whole.train()
    torch.manual_seed(0)
    part = Trainer(_transcoder(skip_connection=True, architecture="relu", k=None), data, _cfg(**cfg), tmp_path / "b")
    part.train(max_steps=6)
    resumed = Trainer.resume(tmp_path / "b")
    resumed.train()
    for name, p in whole.sae.named_parameters():
        assert torch.equal(p, dict(resumed.sae.named_parameters())[name]), name
    assert resumed.dead_strategy == "none"  # relu resamples; a transcoder reconstructs no input


def test_bad_pairs_get_one_clear_error(tmp_path):
    x, y, _ = _pairs(rows=64)
    plain = ActivationFiles(save_activations(tmp_path / "plain.safetensors", x))
    pairs = ActivationFiles(save_activations(tmp_path / "pairs.safetensors", x, y))
    with pytest.raises(ValueError, match="a transcoder .* trains on paired activations"):
        Trainer(_transcoder(), plain, _cfg())
    with pytest.raises(ValueError, match="pairs inputs with targets of width 12: train a transcoder"):
        Trainer(SAE(d_in=D_IN, d_sae=32, architecture="topk", k=2), pairs, _cfg())
    with pytest.raises(ValueError, match=r"expected targets of width d_out=7 \(the SAE's\), got width 12"):
        Trainer(_transcoder(d_out=7), pairs, _cfg())
    with pytest.raises(ValueError, match="dead_strategy: 'resample' .* a transcoder reconstructs no input"):
        Trainer(_transcoder(architecture="relu", k=None), pairs, _cfg(dead_strategy="resample"))
    save_file({"inputs": x, "targets": y[:50]}, tmp_path / "rows.safetensors")
    with pytest.raises(ValueError, match=r"rows.safetensors: 'inputs' has 64 rows but 'targets' has 50"):
        ActivationFiles(tmp_path / "rows.safetensors")
    with pytest.raises(ValueError, match="targets: expected a 2-D .* with the inputs' 64 rows"):
        save_activations(tmp_path / "bad.safetensors", x, y[:10])
    (tmp_path / "mixed").mkdir()
    save_activations(tmp_path / "mixed" / "a.safetensors", x, y)
    save_activations(tmp_path / "mixed" / "b.safetensors", x, y[:, :5])
    with pytest.raises(ValueError, match=r"b.safetensors: expected width 12 .*'targets'.*got 5"):
        ActivationFiles(tmp_path / "mixed")


def test_fastsae_train_on_paired_files(tmp_path, capsys):
    x, y, _ = _pairs(rows=2048)
    save_activations(tmp_path / "pairs.safetensors", x, y)
    rc = main(["train", "--data", str(tmp_path / "pairs.safetensors"), "--architecture", "batchtopk", "--k", "3",
               "--d-sae", "40", "--batch-size", "256", "--tokens", "2048", "--out", str(tmp_path / "run"),
               "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    sae = fastsae.load(tmp_path / "run")
    assert (sae.d_in, sae.d_out, sae.cfg.apply_b_dec_to_input) == (D_IN, D_OUT, False)
    assert "ActivationFiles" in capsys.readouterr().out


# ---------------------------------------------------------------- a transformer at two hooks


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is installed by the [train] and [test] extras")
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] the a of to and is in it for def class return print x y".split()
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), words)


DOCS = ["the x of y is in it for def class return print x", "to and is in it the a of x y print return class"] * 3


def test_two_hooks_are_read_in_one_pass(tiny_bert, tmp_path):
    from fastsae.training.transformer import TransformerActivations

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS))
    both = TransformerActivations(tiny_bert, hook="encoder.layer.0.attention", hook_out="encoder.layer.0.intermediate",
                                  text=corpus, seq_len=8, seqs_per_chunk=2)
    assert (both.d_in, both.d_out) == (24, 48)
    inputs = TransformerActivations(tiny_bert, hook="encoder.layer.0.attention", text=corpus, seq_len=8, seqs_per_chunk=2)
    outputs = TransformerActivations(tiny_bert, hook="encoder.layer.0.intermediate", text=DOCS, seq_len=8, seqs_per_chunk=2)
    assert inputs.d_out is None
    for i in range(len(both.chunk_sizes)):
        torch.testing.assert_close(both.load_chunk(i), torch.cat([inputs.load_chunk(i), outputs.load_chunk(i)], 1))
    assert both.describe()["hook_out"] == "encoder.layer.0.intermediate" and "hook_out" not in inputs.describe()
    with pytest.raises(ValueError, match="has no module 'encoder.layer.7'"):
        TransformerActivations(tiny_bert, hook="encoder.layer.0", hook_out="encoder.layer.7", text=DOCS, seq_len=8)


def test_fastsae_train_hook_in_hook_out(tiny_bert, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS * 4))
    rc = main(["train", "--model", str(tiny_bert), "--hook-in", "encoder.layer.1.attention", "--hook-out",
               "encoder.layer.1.output", "--text", str(corpus), "--seq-len", "8", "--architecture", "relu",
               "--d-sae", "32", "--batch-size", "32", "--tokens", "128", "--out", str(tmp_path / "run"),
               "--activation-cache", "none", "--no-progress", "--threads", "1"])
    said = capsys.readouterr()
    assert rc == 0, said.err
    # the end of the run as for an SAE: eval against the targets (an encoder: the recovered score), report, browser
    assert "against the targets" in said.out and "final hidden states: recovered" in said.out
    assert "features that fired" in said.out and (tmp_path / "run" / "browser" / "index.html").is_file()
    sae = fastsae.load(tmp_path / "run")
    assert (sae.d_in, sae.d_out, sae.architecture) == (24, 24, "relu") and not sae.cfg.apply_b_dec_to_input
    cfg = TrainerConfig.load(next((tmp_path / "run" / "checkpoints").iterdir()))
    assert cfg.data["hook"] == "encoder.layer.1.attention" and cfg.data["hook_out"] == "encoder.layer.1.output"
    # --resume compares --hook-out with the run's
    rc = main(["train", "--resume", "--out", str(tmp_path / "run"), "--hook-out", "encoder.layer.2.output"])
    assert rc == 2 and "hook_out" in capsys.readouterr().err.replace("-", "_")
